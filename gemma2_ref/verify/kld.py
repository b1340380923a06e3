"""A candidate's corpus distributions against the reference's: perplexity, KL-divergence, Δp, same top-1, with
llama-perplexity's definitions (tools/perplexity/perplexity.cpp, llama-cpp-python 0.3.36's vendored llama.cpp).

Per scored position, p the reference's distribution, q the candidate's, t the actual next token:

    nll        -log q(t) and -log p(t); PPL = exp(mean nll)                                  (:201-206, :1889-1897)
    KLD        sum_i p_i (log p_i - log q_i)                                                  (:210-231)
    Δp         q(t) - p(t); RMS Δp = sqrt(mean Δp²)                                         (:238-245, :1966-1971)
    same top   argmax q == argmax p (each the first of equal maxima)                          (:192-199, :219-236)

and over the corpus, as llama-perplexity reports them (its `mean_and_uncertainty` and `covariance`, :1745-1762):
mean ± sqrt(var/(n-1)), ln(PPL(cand)/PPL(ref)) ± sqrt(s_c² + s_r² - 2 cov), median and percentiles of the
sorted KLDs with its linear interpolation (:1919-1931), same top ± sqrt(f(1-f)/(n-1)).

Two differences, both stated: llama.cpp skips base entries with log p <= -16 (:226); we sum over every stored id.
With --top-k K (the reference stores its K most likely ids), the KLD is the sum over those ids plus the
log-sum inequality's value for the rest, P log(P/Q) with P, Q the two distributions' mass outside them: a lower
bound on the exact KLD that is exact when K = V. The most it can be below the exact value is
P (log p_K - min_i log q_i) - P log(P/Q), with p_K the K-th largest reference probability (every tail p_i is at
most p_K) and the candidate's smallest log-probability (stored per position): `kld_truncation_bound`, the mean
of that per-position bound, reported with the mean KLD.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from .corpus import CorpusError, CorpusGolden, first_scored, load_corpus

# exit 1 past any of these: 3x the worse of transformers bfloat16 and llama.cpp q8_0 on the trained tiny model
# (scripts/measure_corpus_kld.py calibrated_thresholds, from benchmarks/corpus_kld-tiny.json; docs/corpus.md)
THRESHOLDS = {"kld_mean": 0.0007, "kld_p99": 0.004, "same_top1": 0.97}
JSON_KEYS = (
    "ppl_ref",
    "ppl_cand",
    "ln_ppl_ratio",
    "kld_mean",
    "kld_median",
    "kld_p99",
    "kld_max",
    "dp_rms",
    "same_top1",
    "scored_tokens",
)


@dataclass
class Positions:
    """Per scored position (in corpus order): the values every statistic is made of."""

    nll_ref: np.ndarray
    nll_cand: np.ndarray
    kld: np.ndarray
    dp: np.ndarray
    same_top1: np.ndarray
    truncation: np.ndarray  # the most the KLD may be below the exact one (0 with --top-k all)
    ref_top1: np.ndarray
    cand_top1: np.ndarray


def position_values(ref_shard: dict, cand_shard: dict, top_k: int | None) -> dict[str, np.ndarray]:
    """The per-position values of one shard pair, (n, R) each, in float64."""
    lp_r = np.asarray(ref_shard["logprobs"], np.float64)
    lp_c = np.asarray(cand_shard["logprobs"], np.float64)
    p = np.exp(lp_r)
    kld = np.sum(p * (lp_r - lp_c), axis=-1)
    trunc = np.zeros_like(kld)
    if top_k is not None:
        tiny = np.finfo(np.float64).tiny
        P = np.clip(1 - p.sum(-1), tiny, 1)
        Q = np.clip(1 - np.exp(lp_c).sum(-1), tiny, 1)
        tail = P * np.log(P / Q)
        kld = kld + tail
        trunc = np.maximum(P * (lp_r[..., -1] - np.asarray(cand_shard["min_logprob"])) - tail, 0)
    nll_r = -np.asarray(ref_shard["target_logprob"], np.float64)
    nll_c = -np.asarray(cand_shard["target_logprob"], np.float64)
    return {
        "nll_ref": nll_r,
        "nll_cand": nll_c,
        "kld": kld,
        "dp": np.exp(-nll_c) - np.exp(-nll_r),
        "same_top1": np.asarray(ref_shard["top1"]) == np.asarray(cand_shard["top1"]),
        "truncation": trunc,
        "ref_top1": np.asarray(ref_shard["top1"]),
        "cand_top1": np.asarray(cand_shard["top1"]),
    }


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """perplexity.cpp:1745-1753: mean, and sqrt(var/(n-1)) when var > 0 and n > 10 (else 0)."""
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    f = float(np.sum(values) / n)
    df = float(np.sum(np.square(values)) / n) - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """perplexity.cpp:1754-1761: (mean(ab) - mean(a) mean(b)) / (n-1), 0 below 10 values."""
    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.sum(a * b)) / n - float(np.sum(a)) / n * float(np.sum(b)) / n) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp:1925-1931: linear interpolation between the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, len(sorted_values) - 1)])


def median(sorted_values: np.ndarray) -> float:
    """perplexity.cpp:1921-1922: the middle value, or the mean of the two middle ones."""
    n = len(sorted_values)
    return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2])


def summary(v: dict[str, np.ndarray]) -> dict:
    """The corpus statistics of flattened per-position values (llama-perplexity's report)."""
    nll_r, nll_c, kld, dp, same = (v[k].reshape(-1) for k in ("nll_ref", "nll_cand", "kld", "dp", "same_top1"))
    n = len(kld)
    lr, lr_unc = mean_and_uncertainty(nll_r)
    lc, lc_unc = mean_and_uncertainty(nll_c)
    ratio_unc = math.sqrt(max(lc_unc**2 + lr_unc**2 - 2 * covariance(nll_c, nll_r), 0.0))
    k_mean, k_unc = mean_and_uncertainty(kld)
    ks = np.sort(kld.astype(np.float32))  # llama.cpp sorts float values
    mse, mse_unc = mean_and_uncertainty(np.square(dp))
    rms = math.sqrt(mse)
    top = float(np.mean(same))
    return {
        "ppl_ref": math.exp(lr),
        "ppl_ref_unc": math.exp(lr) * lr_unc,
        "ppl_cand": math.exp(lc),
        "ppl_cand_unc": math.exp(lc) * lc_unc,
        "ln_ppl_ratio": lc - lr,
        "ln_ppl_ratio_unc": ratio_unc,
        "kld_mean": k_mean,
        "kld_mean_unc": k_unc,
        "kld_median": median(ks),
        "kld_p90": percentile(ks, 0.90),
        "kld_p95": percentile(ks, 0.95),
        "kld_p99": percentile(ks, 0.99),
        "kld_max": float(ks[-1]),
        "dp_rms": rms,
        "dp_rms_unc": 0.5 / rms * mse_unc if rms > 0 else 0.0,
        "same_top1": top,
        "same_top1_unc": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        "kld_truncation_bound": float(np.mean(v["truncation"])),
        "scored_tokens": int(n),
    }


# -- a comparison ----------------------------------------------------------------------------------------------


@dataclass
class CorpusComparison:
    reference: str
    candidate: str
    stats: dict
    chunks: list[dict]
    worst: list[dict]
    thresholds: dict
    top_k: int | None
    failures: list[str] = field(default_factory=list)
    kld: np.ndarray | None = None  # (n_chunks, R) per position, for --plot

    @property
    def passed(self) -> bool:
        return not self.failures


def check_pair(ref: CorpusGolden, cand: CorpusGolden) -> None:
    """Two corpus goldens of one corpus and model, the candidate made against this very reference."""
    if ref.role != "reference":
        raise CorpusError(f"{ref.path}: a candidate corpus golden cannot be the reference; give the reference first")
    m, c = ref.manifest, cand.manifest
    if cand.role == "reference":
        for key in ("corpus", "ctx", "n_chunks", "top_k"):
            if m[key] != c[key]:
                raise CorpusError(
                    f"{cand.path}: another corpus golden than {ref.path} ({key} {c[key]!r} vs "
                    f"{m[key]!r}): compare goldens of the same corpus, ctx and --top-k"
                )
        if m["model"]["config"] != c["model"]["config"]:
            raise CorpusError(f"{cand.path}: another model's corpus golden than {ref.path} (config.json differs)")
        if m["top_k"] != "all":
            raise CorpusError(
                f"{cand.path} is a reference with its own top-{m['top_k']} ids: make the candidate "
                f"with `gemma2-ref corpus ... --reference {ref.path}`, or both with --top-k all"
            )
        return
    if c["reference"]["manifest_sha256"] != m["manifest_sha256"]:
        raise CorpusError(
            f"{cand.path} was made against another reference (manifest {c['reference']['path']}), not "
            f"{ref.path}: compare it with its own reference"
        )


def compare_corpus(
    reference, candidate, thresholds: dict | None = None, tokenizer=None, worst: int = 10
) -> CorpusComparison:
    """REF a corpus golden; CAND a candidate corpus golden (or a reference one with --top-k all), or a llama.cpp
    base file. Streams a shard at a time; holds only per-position scalars."""
    from .llamacpp_kld import candidate_shard, check_against_reference, is_base_file, read_base_file

    ref = reference if isinstance(reference, CorpusGolden) else load_corpus(reference)
    given = isinstance(candidate, CorpusGolden)
    base = read_base_file(candidate) if not given and is_base_file(candidate) else None
    cand = None if base is not None else candidate if isinstance(candidate, CorpusGolden) else load_corpus(candidate)
    if base is not None:
        check_against_reference(base, ref)
    else:
        check_pair(ref, cand)
    parts = []
    for i, s in enumerate(ref.shards):
        r = ref.shard(i)
        if base is not None:
            c = candidate_shard(base, tuple(s["chunks"]), None if ref.top_k is None else r["ids"], r["tokens"])
        else:
            c = cand.shard(i)
        vals = position_values(r, c, ref.top_k)
        bad = ~np.isfinite(vals["kld"])
        if bad.any():
            chunk, row = np.argwhere(bad)[0]
            raise CorpusError(f"{candidate}: non-finite log-probabilities at chunk {s['chunks'][0] + chunk} row {row}")
        parts.append(vals)
    v = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # (n_chunks, R) each
    stats = summary(v)
    thresholds = dict(THRESHOLDS, **(thresholds or {}))
    failures = [
        f"{k} {stats[k]:.4g} {'<' if k == 'same_top1' else '>'} {t:g}"
        for k, t in thresholds.items()
        if (stats[k] < t if k == "same_top1" else stats[k] > t)
    ]
    chunks = [
        {
            "chunk": c,
            **{
                k: summary({n: a[c : c + 1] for n, a in v.items()})[k]
                for k in ("ppl_ref", "ppl_cand", "ln_ppl_ratio", "kld_mean", "kld_max", "same_top1")
            },
        }
        for c in range(len(v["kld"]))
    ]
    return CorpusComparison(
        str(ref.path),
        str(candidate.path if given else candidate),
        stats,
        chunks,
        worst_positions(ref, v, worst, tokenizer),
        thresholds,
        ref.top_k,
        failures,
        v["kld"],
    )


def worst_positions(ref: CorpusGolden, v: dict, n: int, tokenizer) -> list[dict]:
    """The n positions of largest KLD, with the text before them and the tokens each side predicts first."""
    flat = np.argsort(-v["kld"].reshape(-1), kind="stable")[:n]
    R, first = v["kld"].shape[1], first_scored(ref.manifest["ctx"])
    tokens = ref.tokens()
    out = []
    for f in flat:
        c, row = divmod(int(f), R)
        pos = first + row
        rec = {
            "chunk": c,
            "position": pos,
            "kld": float(v["kld"][c, row]),
            "target": int(tokens[c, pos + 1]),
            "ref_top1": int(v["ref_top1"][c, row]),
            "cand_top1": int(v["cand_top1"][c, row]),
        }
        if tokenizer is not None:
            rec["context"] = tokenizer.decode(tokens[c, max(1, pos - 11) : pos + 1].tolist())
            for key in ("target", "ref_top1", "cand_top1"):
                rec[key + "_text"] = tokenizer.decode([rec[key]])
        out.append(rec)
    return out


def to_json(result: CorpusComparison) -> str:
    """The stable keys (JSON_KEYS) first, then the uncertainties, percentiles, chunks and worst positions."""
    body = {k: result.stats[k] for k in JSON_KEYS}
    body.update({k: v for k, v in result.stats.items() if k not in body})
    body.update(
        reference=result.reference,
        candidate=result.candidate,
        passed=result.passed,
        failures=result.failures,
        thresholds=result.thresholds,
        chunks=result.chunks,
        worst=result.worst,
    )
    return json.dumps(body, indent=1)


def format_report(result: CorpusComparison, max_chunks: int = 20) -> str:
    s = result.stats
    lines = [
        f"reference  {result.reference}",
        f"candidate  {result.candidate}",
        "",
        "chunk        PPL(ref)       PPL(cand)   ln(PPL ratio)     mean KLD      max KLD   same top-1",
    ]
    for c in result.chunks[:max_chunks]:
        lines.append(
            f"{c['chunk']:5d}  {c['ppl_ref']:14.4f}  {c['ppl_cand']:14.4f}  {c['ln_ppl_ratio']:14.6f}  "
            f"{c['kld_mean']:11.6f}  {c['kld_max']:11.6f}  {100 * c['same_top1']:9.2f} %"
        )
    if len(result.chunks) > max_chunks:
        lines.append(f"  ... {len(result.chunks) - max_chunks} more chunks (--json has them all)")
    lines += [
        "",
        f"scored tokens              {s['scored_tokens']}",
        f"PPL(ref)                   {s['ppl_ref']:.6f} ± {s['ppl_ref_unc']:.6f}",
        f"PPL(cand)                  {s['ppl_cand']:.6f} ± {s['ppl_cand_unc']:.6f}",
        f"ln(PPL(cand)/PPL(ref))     {s['ln_ppl_ratio']:.6f} ± {s['ln_ppl_ratio_unc']:.6f}",
        f"mean KLD                   {s['kld_mean']:.6f} ± {s['kld_mean_unc']:.6f}"
        + (
            f"  (top-{result.top_k}: at most {s['kld_truncation_bound']:.3g} below the exact value)"
            if s["kld_truncation_bound"] > 0
            else ""
        ),
        f"median / p90 / p95 / p99   {s['kld_median']:.6f} / {s['kld_p90']:.6f} / {s['kld_p95']:.6f} / "
        f"{s['kld_p99']:.6f}",
        f"max KLD                    {s['kld_max']:.6f}",
        f"RMS Δp                     {100 * s['dp_rms']:.3f} ± {100 * s['dp_rms_unc']:.3f} %",
        f"same top-1                 {100 * s['same_top1']:.3f} ± {100 * s['same_top1_unc']:.3f} %",
        "",
        "largest KLD positions:",
    ]
    for w in result.worst:
        text = repr(w.get("context", ""))[-50:]
        lines.append(
            f"  chunk {w['chunk']:4d} pos {w['position']:5d}  KLD {w['kld']:9.5f}  {text} -> "
            f"{w.get('target_text', w['target'])!r} (ref {w.get('ref_top1_text', w['ref_top1'])!r}, "
            f"cand {w.get('cand_top1_text', w['cand_top1'])!r})"
        )
    verdict = "PASS" if result.passed else "FAIL: " + "; ".join(result.failures)
    limits = ", ".join(f"{k} {'>=' if k == 'same_top1' else '<='} {v:g}" for k, v in result.thresholds.items())
    lines += ["", f"{verdict}  (limits: {limits})"]
    return "\n".join(lines)

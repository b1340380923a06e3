"""Calibrate `gemma2-ref compare`'s corpus thresholds (verify/kld.py THRESHOLDS): measure what corpus KLD each
candidate gives on the trained tiny model, write benchmarks/corpus_kld-tiny.json and docs/corpus.md's table from it.

    python scripts/measure_corpus_kld.py OUT_DIR --write          # measure, then write the json and the docs table
    python scripts/measure_corpus_kld.py --docs-only              # the docs table from the committed json
    python scripts/measure_corpus_kld.py OUT_DIR --models random-2b --chunks 4     # another model, printed only

Models: `tiny` (bundled, trained; its query_pre_attn_scalar 32 differs from head_dim 64, which llama.cpp cannot
express: every GGUF of it carries that error); `tiny-qfold`, the same trained model with the query scale folded
into q_proj (W_q x sqrt(64/32), query_pre_attn_scalar = head_dim, float32 weights: the same function, which
llama.cpp computes exactly, so its GGUFs show the quantization alone); `random-2b` (Gemma 2 2B's layer shapes with
2 layers, the 2048-id tokenizer, random bf16 weights). Candidates: gemma2-ref float64, transformers float32 /
bfloat16, llama.cpp f32 / bf16 / q8_0 / q4_0 / q4_k_m (converted and quantized with llama.cpp's own tools).
The thresholds follow from the json by `calibrated_thresholds` (tests/test_corpus_tables.py checks both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import gemma2_ref as g2  # noqa: E402
from gemma2_ref.storage.checkpoints import random_weights, save_checkpoint  # noqa: E402
from gemma2_ref.verify import corpus as C  # noqa: E402
from gemma2_ref.verify import kld as K  # noqa: E402

CANDIDATES = {
    "tiny": [
        ("gemma2-ref", "float64"),
        ("transformers", "float32"),
        ("transformers", "bfloat16"),
        ("llama.cpp", "f32"),
        ("llama.cpp", "q8_0"),
        ("llama.cpp", "q4_0"),
    ],
    "tiny-qfold": [
        ("gemma2-ref", "float64"),
        ("llama.cpp", "f32"),
        ("llama.cpp", "bf16"),
        ("llama.cpp", "q8_0"),
        ("llama.cpp", "q4_k_m"),
        ("llama.cpp", "q4_0"),
    ],
}
CANDIDATES["random-2b"] = CANDIDATES["tiny"]
JSON = ROOT / "benchmarks" / "corpus_kld-tiny.json"
DOCS = ROOT / "docs" / "corpus.md"
BEGIN, END = "<!-- corpus-kld-table: scripts/measure_corpus_kld.py -->", "<!-- /corpus-kld-table -->"
# the margin of each threshold over the candidates that must pass (calibrated_thresholds)
MARGIN = {"kld_mean": 3.0, "kld_p99": 3.0, "same_top1": 0.5}
MUST_PASS = [("tiny", "transformers", "bfloat16"), ("tiny-qfold", "llama.cpp", "q8_0")]


def corpus_arguments(doc: str, models: str, chunks: int, ctx: int = 128) -> argparse.ArgumentParser:
    """The options this script and benchmarks/corpus_speed.py share: OUT_DIR, --models, --ctx, --chunks."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", help="scratch directory for the corpus goldens and checkpoints")
    ap.add_argument("--models", default=models, help=f"comma-separated (default {models})")
    ap.add_argument("--ctx", type=int, default=ctx, help=f"tokens per chunk (default {ctx})")
    ap.add_argument("--chunks", type=int, default=chunks, help=f"chunks of the bundled corpus (default {chunks})")
    return ap


def random_2b(directory: Path) -> Path:
    """2B's layer shapes, 2 layers, vocabulary 2048 (the bundled tokenizer), random bf16 weights."""
    from llamacpp_random_checkpoint import released_token_files

    if (directory / "config.json").is_file():
        return directory
    from gemma2_ref.model.config import alternating_layer_types

    cfg = g2.PRESETS["2b"].replace(
        num_hidden_layers=2, layer_types=alternating_layer_types(2), vocab_size=2048, max_position_embeddings=1024
    )
    save_checkpoint(
        directory,
        cfg,
        random_weights(cfg, seed=11, scale=2.0),
        "BF16",
        tokenizer=g2.bundled_path("tiny") / "tokenizer.model",
    )
    return released_token_files(directory)


def tiny_qfold(directory: Path) -> Path:
    """The trained tiny model with its query scale folded into q_proj: scores q.k / sqrt(query_pre_attn_scalar)
    = (c q).k / sqrt(head_dim) with c = sqrt(head_dim / query_pre_attn_scalar); float32 weights, so the fold
    itself rounds once (~6e-8 relative) and llama.cpp, which scales by head_dim, computes the same model."""
    import numpy as np

    from gemma2_ref.storage.weights import index_checkpoint, to_compute_dtype

    if (directory / "config.json").is_file():
        return directory
    tiny = g2.bundled_path("tiny")
    cfg = g2.load_config(tiny)
    c = np.float32(np.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar))
    tensors = {}
    for name, ref in index_checkpoint(tiny, cfg).items():
        raw = np.memmap(ref.file, np.uint16, "r", ref.offset, ref.shape)
        tensors[name] = to_compute_dtype(np.asarray(raw), ref.dtype, np.dtype(np.float32))
        if name.endswith("self_attn.q_proj.weight"):
            tensors[name] = tensors[name] * c
    folded = cfg.replace(query_pre_attn_scalar=float(cfg.head_dim))
    return save_checkpoint(directory, folded, tensors, "F32", tokenizer=tiny / "tokenizer.model")


def checkpoint_of(name: str, out: Path) -> str:
    if name == "random-2b":
        return str(random_2b(out / "random-2b"))
    if name == "tiny-qfold":
        return str(tiny_qfold(out / "tiny-qfold"))
    return name


def backend_record(name: str, dtype: str, model) -> dict:
    if name == C.REFERENCE_BACKEND:
        return {"name": name, "dtype": dtype}
    from gemma2_ref.adapters import BACKENDS, load_adapter

    return {"name": name, "adapter": BACKENDS[name], **load_adapter(name).corpus_backend(model, dtype)}


def measure(name: str, out: Path, ctx: int, chunks: int) -> list[dict]:
    model = checkpoint_of(name, out)
    rows = []
    ref = out / f"{name}-ref-all"
    t0 = time.perf_counter()
    C.write_corpus(model, ref, ctx=ctx, chunks=chunks, top_k="all")
    print(f"{name} reference: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for backend, dtype in CANDIDATES[name]:
        path = out / f"{name}-{backend}-{dtype}"
        C.write_corpus(model, path, backend=backend_record(backend, dtype, model), reference=ref)
        exact = K.compare_corpus(ref, path).stats
        row = {"model": name, "backend": backend, "dtype": dtype, **{k: exact[k] for k in K.JSON_KEYS}}
        row["kld_p99_unc"], row["kld_mean_unc"] = None, exact["kld_mean_unc"]
        for k in (32, 8):
            s = truncated_stats(C.load_corpus(ref), C.load_corpus(path), k)
            row[f"kld_mean_top{k}"], row[f"bound_top{k}"] = s["kld_mean"], s["kld_truncation_bound"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def truncated_stats(ref_all, cand_all, k: int) -> dict:
    """The statistics `--top-k k` gives: the reference's k most likely ids (corpus.top_k_ids of its full
    distribution, as `corpus --top-k k` stores them) and both sides' log-probs there, from the two full goldens."""
    import numpy as np

    parts = []
    for i in range(len(ref_all.shards)):
        r, c = ref_all.shard(i), cand_all.shard(i)
        lp_r, lp_c = np.asarray(r["logprobs"]), np.asarray(c["logprobs"])
        ids = np.stack([C.top_k_ids(row, k) for row in lp_r.astype(np.float64)])
        ref_k = dict(r, logprobs=np.take_along_axis(lp_r, ids, axis=-1))
        cand_k = dict(c, logprobs=np.take_along_axis(lp_c, ids, axis=-1))
        parts.append(K.position_values(ref_k, cand_k, k))
    return K.summary({n: np.concatenate([p[n] for p in parts]) for n in parts[0]})


def round_up(x: float) -> float:
    """x rounded up to one significant digit (0.0123 -> 0.02)."""
    import math

    e = math.floor(math.log10(x))
    return math.ceil(x / 10**e) * 10**e


def calibrated_thresholds(rows: list[dict]) -> dict:
    """The defaults `compare` judges a corpus by: MARGIN times the worst of the candidates that must pass
    (MUST_PASS: a bfloat16 port, llama.cpp's q8_0 of a model it computes exactly), rounded up to one digit;
    same top-1: the pass candidates' worst disagreement doubled (1 - 2 (1 - worst))."""
    chosen = [r for r in rows if (r["model"], r["backend"], r["dtype"]) in MUST_PASS]
    if len(chosen) != len(MUST_PASS):
        raise SystemExit(f"the json lacks some of {MUST_PASS}: measure them (--models tiny,tiny-qfold)")
    worst_top1 = min(r["same_top1"] for r in chosen)
    return {
        "kld_mean": round_up(MARGIN["kld_mean"] * max(r["kld_mean"] for r in chosen)),
        "kld_p99": round_up(MARGIN["kld_p99"] * max(r["kld_p99"] for r in chosen)),
        "same_top1": round(1 - round_up((1 - worst_top1) / MARGIN["same_top1"]), 6),
    }


def verdict(row: dict, thresholds: dict) -> str:
    bad = [k for k, t in thresholds.items() if (row[k] < t if k == "same_top1" else row[k] > t)]
    return "pass" if not bad else "fails " + ", ".join(bad)


def table(rows: list[dict], thresholds: dict | None = None) -> str:
    head = (
        "| model | candidate | PPL ref | PPL cand | ln ratio | mean KLD | p99 KLD | max KLD | RMS Δp | same top-1 "
        "| mean KLD top-32 (bound) |" + (" default verdict |" if thresholds else "")
    )
    lines = [head, "|" + "---|" * (11 + bool(thresholds))]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} {r['dtype']} | {r['ppl_ref']:.3f} | {r['ppl_cand']:.3f} | "
            f"{r['ln_ppl_ratio']:.2e} | {r['kld_mean']:.2e} | {r['kld_p99']:.2e} | {r['kld_max']:.2e} | "
            f"{100 * r['dp_rms']:.3f} % | {100 * r['same_top1']:.2f} % | {r['kld_mean_top32']:.2e} "
            f"({r['bound_top32']:.2g}) |" + (f" {verdict(r, thresholds)} |" if thresholds else "")
        )
    return "\n".join(lines)


def docs_block(measured: dict) -> str:
    """docs/corpus.md's calibration table and thresholds, from the json (tests/test_corpus_tables.py)."""
    t = calibrated_thresholds(measured["rows"])
    m = measured["meta"]
    return "\n".join(
        [
            BEGIN,
            f"{m['chunks']} chunks of {m['ctx']} tokens of the bundled corpus ({m['scored_tokens']} scored positions), "
            f"llama-cpp-python {m['llama_cpp_python']}, load average {m['load_average'][0]:.1f} "
            f"(`python scripts/measure_corpus_kld.py OUT --write`; benchmarks/corpus_kld-tiny.json):",
            "",
            table(measured["rows"], t),
            "",
            f"Defaults: mean KLD <= {t['kld_mean']:g}, p99 KLD <= {t['kld_p99']:g}, same top-1 >= {t['same_top1']:g}.",
            END,
        ]
    )


def write_docs(measured: dict) -> None:
    text = DOCS.read_text(encoding="utf-8")
    a, b = text.index(BEGIN), text.index(END) + len(END)
    DOCS.write_text(text[:a] + docs_block(measured) + text[b:], encoding="utf-8")


def main() -> None:
    ap = corpus_arguments(__doc__, "tiny,tiny-qfold", 32)
    ap.add_argument("--write", action="store_true", help=f"write {JSON.name} and docs/corpus.md's table")
    ap.add_argument("--docs-only", action="store_true", help="only docs/corpus.md's table, from the committed json")
    args = ap.parse_args()
    if args.docs_only:
        write_docs(json.loads(JSON.read_text()))
        return
    if args.out is None:
        ap.error("give OUT_DIR (or --docs-only)")
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        rows += measure(name, args.out, args.ctx, args.chunks)
        (args.out / "measurements.json").write_text(json.dumps(rows, indent=1))
    import llama_cpp

    meta = {
        "ctx": args.ctx,
        "chunks": args.chunks,
        "scored_tokens": rows[0]["scored_tokens"],
        "llama_cpp_python": llama_cpp.__version__,
        "load_average": [load[0], os.getloadavg()[0]],
    }
    measured = {"meta": meta, "rows": rows}
    if args.write:
        JSON.write_text(json.dumps(measured, indent=1) + "\n")
        write_docs(measured)
    print(table(rows, calibrated_thresholds(rows) if args.write else None))


if __name__ == "__main__":
    main()

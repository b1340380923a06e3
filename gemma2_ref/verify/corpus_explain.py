"""Where a corpus KLD comes from: for the chunks with the largest mean KLD, a per-tap golden case of the chunk
through the candidate's own backend and the reference's golden of the same input, compared tap by tap
(compare.py) and diagnosed (diagnose.py), then read as an error curve along the depth.

    the input       the chunk's tokens as the candidate saw them: <bos> first (perplexity.cpp:569-576)
    the rows        the scored ones, ctx/2 .. ctx-1 (positions=(first_scored, ctx)): where the KLD was measured
    the candidate   the backend its corpus manifest records: gemma2-ref with its --mistake, transformers in its
                    dtype, llama.cpp on the very GGUF (its sha256 checked) with the corpus run's f16 KV cache
    the curve       rel L2 of every tap in execution order; the error is born at the first tap past BORN, and
                    a tap "grows" it when its rel L2 is >= GROWTH times the largest rel L2 of every tap before it
                    (at least FLOOR, float32's rounding of a few operations); per layer the residual stream's
                    rel L2 at layers.i.output and the worst tap

Nothing here writes a second comparison: compare_and_diagnose gives the CaseComparison and the Diagnosis.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import tempfile
from pathlib import Path

import numpy as np

from ..model.tokenizer import BOS
from .corpus import REFERENCE_BACKEND, CorpusError, CorpusGolden, first_scored
from .golden import load_case, sha256_file

GROWTH = 3.0  # "grows 10x at layers.3.mlp.out": listed when a tap's rel L2 is >= 3x the largest one before it
FLOOR = 1e-6  # below this a rel L2 is float32 rounding: growth is counted from here
BORN = 1e-5  # the first tap at least this far off: where the error is born (10x float32's rounding)
ENGINE_OPTIONS = ("gguf", "kv_cache_type", "attn_implementation")  # candidate-record keys write_golden takes


def worst_chunks(chunks: list[dict], n: int) -> list[int]:
    """The n chunks of largest mean KLD (compare_corpus's per-chunk rows), largest first."""
    order = sorted(chunks, key=lambda c: (-c["kld_mean"], c["chunk"]))
    return [c["chunk"] for c in order[:n]]


def chunk_input(ref: CorpusGolden, chunk: int) -> np.ndarray:
    """(ctx,) int64: the chunk's tokens with <bos> first, as every backend ran it."""
    ids = ref.tokens()[chunk].astype(np.int64)
    ids[0] = BOS
    return ids


def write_reference_case(model, ids: np.ndarray, out: Path, positions, taps) -> Path:
    from .golden import model_info
    from .suites import generate_case

    return generate_case(model, ids, out, taps=taps, info=model_info(model), positions=positions)


def write_candidate_case(cand: CorpusGolden, model, ids: np.ndarray, out: Path, positions, taps) -> Path:
    """The chunk through the candidate's backend, as its corpus manifest records it."""
    backend = cand.manifest["backend"]
    if backend["name"] == REFERENCE_BACKEND:
        from ..storage.loader import load_model
        from .golden import model_info
        from .mistakes import find, inject
        from .suites import generate_case

        ours = load_model(model.path, backend["dtype"])
        info = model_info(ours)
        if backend.get("mistake"):
            ours = inject(ours, find(ours.config, backend["mistake"]))
        return generate_case(ours, ids, out, taps=taps, info=info, positions=positions)
    gguf = backend.get("gguf")
    if gguf is not None:
        if not Path(gguf).is_file():
            raise CorpusError(f"{cand.path}: its GGUF {gguf} is not here: --explain runs the very file the corpus ran")
        if backend.get("gguf_sha256") and sha256_file(gguf) != backend["gguf_sha256"]:
            raise CorpusError(f"{gguf}: sha256 differs from the one {cand.path} records (the GGUF was replaced)")
    options = {k: backend[k] for k in ENGINE_OPTIONS if backend.get(k) is not None}
    adapter = importlib.import_module(backend["adapter"])
    return adapter.write_golden(model.path, ids, out, dtype=backend["dtype"], taps=taps, positions=positions, **options)


def error_curve(comparison) -> dict:
    """Where the error is born and where it grows (module docstring), from a CaseComparison's taps."""
    taps = [t for t in comparison.compared if t.rel_l2 is not None and math.isfinite(t.rel_l2)]
    growth, before = [], FLOOR
    for t in taps:
        if t.rel_l2 >= GROWTH * before:
            growth.append({"tap": t.name, "rel_l2": t.rel_l2, "from": before, "factor": t.rel_l2 / before})
        before = max(before, t.rel_l2)
    layers: dict[str, dict] = {}
    for t in taps:
        key = t.layer if t.layer.isdigit() else ("embed" if t.name == "embed" else "final")
        row = layers.setdefault(key, {"layer": key, "output_rel_l2": None, "worst_rel_l2": 0.0, "worst_tap": None})
        if t.name.endswith(".output") or t.name in ("embed", "logits"):
            row["output_rel_l2"] = t.rel_l2
        if t.rel_l2 >= row["worst_rel_l2"]:
            row["worst_rel_l2"], row["worst_tap"] = t.rel_l2, t.name
    born = next((t for t in taps if t.rel_l2 >= BORN), None)
    first = comparison.first_divergence
    return {
        "born_at": born.name if born else None,
        "born_rel_l2": born.rel_l2 if born else None,
        "first_divergence": first.name if first else None,
        "error_lead": (comparison.error_lead() or first).name if first else None,
        "growth": growth,
        "layers": list(layers.values()),
        "logits_rel_l2": next((t.rel_l2 for t in taps if t.name == "logits"), None),
    }


def explain_chunk(ref, cand, model, chunk: int, profile, out: Path, taps="default", diagnose=None, log=None) -> dict:
    """One chunk: both cases written under out/chunk-N/, compared and (for a small model) diagnosed."""
    from .compare import auto_profile, get_profile
    from .diagnose import compare_and_diagnose

    ctx = ref.manifest["ctx"]
    ids, positions = chunk_input(ref, chunk), (first_scored(ctx), ctx)
    ref_case = write_reference_case(model, ids, out / f"chunk-{chunk}" / "reference", positions, taps)
    cand_case = write_candidate_case(cand, model, ids, out / f"chunk-{chunk}" / "candidate", positions, taps)
    r, c = load_case(ref_case), load_case(cand_case)
    profile = profile or get_profile(auto_profile(c))
    results, diagnoses, skipped = compare_and_diagnose(r, c, profile, diagnose, model.path, log=log)
    comparison, diagnosis = results[0], diagnoses.get(str(r.path))
    return {
        "chunk": chunk,
        "reference_case": str(ref_case),
        "candidate_case": str(cand_case),
        "profile": comparison.profile.name,
        "passed": comparison.passed,
        **error_curve(comparison),
        "diagnosis": diagnosis.to_dict() if diagnosis else None,
        "diagnosis_skipped": skipped,
        "_comparison": comparison,
        "_diagnosis": diagnosis,
    }


def explain_corpus(
    reference, candidate, chunks: list[dict], n: int, *, model=None, out=None, profile=None, diagnose=None, log=None
) -> list[dict]:
    """explain_chunk for the n worst chunks of a corpus comparison (`chunks`: its per-chunk rows). `model`: the
    reference's checkpoint (default: the one its manifest names); `out`: keep the cases there (default: a
    temporary directory, removed after)."""
    from ..storage.loader import load_model, resolve_checkpoint
    from .corpus import load_corpus
    from .hashes import weights_sha256

    ref = reference if isinstance(reference, CorpusGolden) else load_corpus(reference)
    if not isinstance(candidate, CorpusGolden) and not Path(candidate, "manifest.json").is_file():
        raise CorpusError(
            f"--explain {candidate}: a llama.cpp base file names no engine to re-run; explain a candidate "
            f"corpus golden (`gemma2-ref corpus MODEL --backend ... --reference REF`)"
        )
    cand = candidate if isinstance(candidate, CorpusGolden) else load_corpus(candidate)
    if cand.role != "candidate":
        raise CorpusError(f"--explain {cand.path}: a reference corpus golden names no candidate backend to re-run")
    info = ref.manifest["model"]
    source = model or (info["name"] if info.get("bundled") else info["path"])
    ours = load_model(resolve_checkpoint(source), ref.manifest["backend"]["dtype"])
    if weights_sha256(ours.weights.files) != info.get("weights", {}):
        raise CorpusError(
            f"{ours.path}: weight files differ from the ones {ref.path} was made from: pass --model with that "
            f"checkpoint"
        )
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    keep = contextlib.nullcontext(out) if out is not None else tempfile.TemporaryDirectory(prefix="gemma2-ref-explain-")
    with keep as where:
        found = [
            explain_chunk(ref, cand, ours, c, profile, Path(where), diagnose=diagnose, log=log)
            for c in worst_chunks(chunks, n)
        ]
    if out is None:
        for e in found:
            e["reference_case"] = e["candidate_case"] = None  # removed with the temporary directory
    return found


def public(explained: list[dict]) -> list[dict]:
    """The JSON of explain_corpus's records (without the comparison objects)."""
    return [{k: v for k, v in e.items() if not k.startswith("_")} for e in explained]


def format_explanation(e: dict, kld_mean: float | None = None) -> str:
    from .diagnose import format_diagnosis

    head = f"chunk {e['chunk']}" + (f" (mean KLD {kld_mean:.4g})" if kld_mean is not None else "")
    lines = [f"{head}: the scored rows through both engines, tap by tap (profile {e['profile']})"]
    if e["born_at"] is None:
        lines.append(f"  every tap within rel L2 {BORN:g} of the reference: no error to explain")
    else:
        lines.append(f"  error born at {e['born_at']} (rel L2 {e['born_rel_l2']:.3g})")
    for g in e["growth"]:
        was = f"< {FLOOR:g}" if g["from"] <= FLOOR else f"{g['from']:.3g}"
        lines.append(f"  grows {g['factor']:.3g}x at {g['tap']} (rel L2 {was} before it -> {g['rel_l2']:.3g})")
    lines.append(f"  first divergence (profile {e['profile']}): {e['first_divergence'] or 'none'}")
    lines.append("  layer     residual rel L2   worst rel L2  worst tap")
    for row in e["layers"]:
        out = "-" if row["output_rel_l2"] is None else f"{row['output_rel_l2']:.3e}"
        lines.append(f"  {row['layer']:>6}  {out:>15}  {row['worst_rel_l2']:13.3e}  {row['worst_tap']}")
    if e["_diagnosis"] is not None:
        lines.append("  " + format_diagnosis(e["_diagnosis"]).replace("\n", "\n  "))
    elif e["diagnosis_skipped"]:
        lines.append(f"  ({e['diagnosis_skipped']})")
    if e["candidate_case"]:
        lines.append(f"  cases: {e['reference_case']} {e['candidate_case']} (gemma2-ref compare / diagnose them)")
    return "\n".join(lines)

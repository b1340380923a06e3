"""Measure what corpus KLD each candidate gives, to set `gemma2-ref compare`'s corpus thresholds (verify/kld.py
THRESHOLDS) and docs/corpus.md's table, and what --top-k does to the KLD against --top-k all.

    python scripts/measure_corpus_kld.py OUT_DIR [--models tiny,random-2b] [--ctx 128] [--chunks 8]

Models: `tiny` (bundled; its query_pre_attn_scalar 32 differs from head_dim 64, which llama.cpp cannot express),
`random-2b` (Gemma 2 2B's layer shapes, D=2304 H=8 K=4 Dh=256 F=9216, with 2 layers, the bundled 2048-id
tokenizer, random bf16 weights: a model llama.cpp describes exactly). Candidates: gemma2-ref float64,
transformers float32 / bfloat16, llama.cpp f32 / bf16 / q8_0 / q4_0 (converted and quantized with llama.cpp's own
tools). Writes OUT_DIR/measurements.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
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

CANDIDATES = [
    ("gemma2-ref", "float64"),
    ("transformers", "float32"),
    ("transformers", "bfloat16"),
    ("llama.cpp", "f32"),
    ("llama.cpp", "bf16"),
    ("llama.cpp", "q8_0"),
    ("llama.cpp", "q4_0"),
]


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


def backend_record(name: str, dtype: str, model) -> dict:
    if name == C.REFERENCE_BACKEND:
        return {"name": name, "dtype": dtype}
    from gemma2_ref.adapters import BACKENDS, load_adapter

    return {"name": name, "adapter": BACKENDS[name], **load_adapter(name).corpus_backend(model, dtype)}


def measure(model: str, out: Path, ctx: int, chunks: int) -> list[dict]:
    rows = []
    ref = out / f"{Path(model).name}-ref-all"
    t0 = time.perf_counter()
    C.write_corpus(model, ref, ctx=ctx, chunks=chunks, top_k="all")
    print(f"{model} reference: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for name, dtype in CANDIDATES:
        path = out / f"{Path(model).name}-{name}-{dtype}"
        C.write_corpus(model, path, backend=backend_record(name, dtype, model), reference=ref)
        exact = K.compare_corpus(ref, path).stats
        row = {"model": Path(model).name, "backend": name, "dtype": dtype, **{k: exact[k] for k in K.JSON_KEYS}}
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


def table(rows: list[dict]) -> str:
    head = (
        "| model | candidate | PPL ref | PPL cand | ln ratio | mean KLD | p99 KLD | max KLD | RMS Δp | same top-1 "
        "| mean KLD top-32 (bound) | mean KLD top-8 (bound) |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} {r['dtype']} | {r['ppl_ref']:.3f} | {r['ppl_cand']:.3f} | "
            f"{r['ln_ppl_ratio']:.2e} | {r['kld_mean']:.2e} | {r['kld_p99']:.2e} | {r['kld_max']:.2e} | "
            f"{100 * r['dp_rms']:.3f} % | {100 * r['same_top1']:.2f} % | {r['kld_mean_top32']:.2e} "
            f"({r['bound_top32']:.2g}) | {r['kld_mean_top8']:.2e} ({r['bound_top8']:.2g}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", default="tiny,random-2b")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.models.split(","):
        model = str(random_2b(args.out / "random-2b")) if m == "random-2b" else m
        rows += measure(model, args.out, args.ctx, args.chunks)
        (args.out / "measurements.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()

"""Measure the noise floors that set `gemma2-ref compare`'s tolerance profiles.

Between two *correct* implementations, how large are the per-tap errors? For each model below:

    ours float32        vs ours float64                 (float32 rounding alone)
    transformers eager float32 vs ours float64/float32  (another correct float32 implementation)
    transformers eager bfloat16 vs ours float32         (a correct bfloat16 backend; bf16-stored weights)
    transformers eager float16  vs ours float32         (a correct float16 backend)
    ours float32 on Q8_0-quantised weights vs ours float32 (an 8-bit weight backend)

Prints, per pair, the worst rel L2 and max/absmax over every tap and the logits' KL / top-1 / top-5.
Run: python scripts/measure_noise_floors.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import gemma2_ref as g2
from gemma2_ref.bfloat16 import round_to_bf16
from gemma2_ref.checkpoints import random_weights, save_checkpoint
from gemma2_ref.compare import Profile, compare_activations
from gemma2_ref.data import bundled_path

LOOSE = Profile("measure", rel_l2=np.inf, max_rel=np.inf, kl=np.inf, top1=0.0, top5=0.0)

MODELS = {
    # the tiny preset's shapes, random weights
    "tiny-random": dict(preset="tiny"),
    # 2B-like depth and ratios at small width: 26 layers, H/K = 2, head_dim = query_pre_attn_scalar
    "2b-shaped": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=16,
        max_position_embeddings=256,
    ),
    # the 2B's real widths (D, F, heads, head_dim) at 4 layers and a small vocabulary: long dot products
    "2b-width": dict(
        vocab_size=4096,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=16,
        max_position_embeddings=256,
    ),
    # 27B-like: query_pre_attn_scalar = D/H != head_dim
    "27b-shaped": dict(
        vocab_size=4096,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        query_pre_attn_scalar=48,
        sliding_window=16,
        max_position_embeddings=256,
    ),
}


def q8_0(w: np.ndarray) -> np.ndarray:
    """Q8_0-style quantisation (llama.cpp): blocks of 32 along the input axis, scale absmax/127, round."""
    if w.ndim != 2 or w.shape[1] % 32:
        return w
    b = w.reshape(w.shape[0], -1, 32)
    scale = np.abs(b).max(-1, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.round(b / scale) * scale).reshape(w.shape).astype(w.dtype)


def worst(result) -> dict:
    taps = [t for t in result.taps if t.rel_l2 is not None]
    lg = next(t.logits for t in taps if t.name == "logits")
    wr = max(taps, key=lambda t: t.rel_l2)
    wm = max(taps, key=lambda t: t.max_rel)
    return {
        "rel_l2": wr.rel_l2,
        "rel_l2_tap": wr.name,
        "max_rel": wm.max_rel,
        "max_rel_tap": wm.name,
        "logits_rel_l2": next(t.rel_l2 for t in taps if t.name == "logits"),
        "kl_max": lg["kl_max"],
        "top1": lg["top1_exact"],
        "top5": lg["top5"],
    }


def show(label: str, w: dict) -> None:
    print(
        f"  {label:44s} rel L2 {w['rel_l2']:.2e} ({w['rel_l2_tap']}), max/absmax {w['max_rel']:.2e} "
        f"({w['max_rel_tap']}); logits rel L2 {w['logits_rel_l2']:.2e}, KL max {w['kl_max']:.2e}, "
        f"top-1 {w['top1']:.3f}, top-5 {w['top5']:.3f}",
        flush=True,
    )


def measure(name: str, spec: dict, tmp: Path, seq: int, hf: bool) -> None:
    if spec.get("preset") == "tiny" or spec.get("bundled"):
        cfg = g2.PRESETS["tiny"]
    else:
        cfg = g2.PRESETS["tiny"].replace(
            **spec,
            layer_types=tuple(
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec["num_hidden_layers"])
            ),
        )
    tok = bundled_path("tiny") / "tokenizer.model"
    if spec.get("bundled"):
        f32_dir = bf16_dir = bundled_path("tiny")
        weights = None
    else:
        weights = random_weights(cfg, seed=11, scale=2.0)
        f32_dir = save_checkpoint(tmp / f"{name}-f32", cfg, weights, "F32", tokenizer=tok)
        bf16_dir = save_checkpoint(tmp / f"{name}-bf16", cfg, weights, "BF16", tokenizer=tok)
    rng = np.random.default_rng(0)
    ids = np.concatenate([[2], rng.integers(3, cfg.vocab_size, seq - 1)])
    print(
        f"{name}: {cfg.num_hidden_layers} layers, D={cfg.hidden_size}, {seq} tokens (window {cfg.sliding_window})",
        flush=True,
    )
    taps = "all"
    ours32 = g2.load_model(f32_dir).forward(ids, taps=taps)
    ours64 = g2.load_model(f32_dir, dtype="float64").forward(ids, taps=taps)
    show("ours float32 vs ours float64", worst(compare_activations(ours64, ours32, LOOSE)))
    ours32_bf = g2.load_model(bf16_dir).forward(ids, taps=taps)
    if weights is not None:
        qdir = tmp / f"{name}-q8"
        q = {k: q8_0(round_to_bf16(v)) for k, v in weights.items()}
        save_checkpoint(qdir, cfg, q, "F32", tokenizer=tok)
        show(
            "ours float32 on Q8_0 weights vs ours float32",
            worst(compare_activations(ours32_bf, g2.load_model(qdir).forward(ids, taps=taps), LOOSE)),
        )
    if not hf:
        return
    from gemma2_ref.adapters import transformers as adapter

    for dtype, ckpt, ref, ref_label in (
        ("float32", f32_dir, ours64, "ours float64"),
        ("float32", f32_dir, ours32, "ours float32"),
        ("bfloat16", bf16_dir, ours32_bf, "ours float32"),
        ("float16", bf16_dir, ours32_bf, "ours float32"),
    ):
        acts = adapter.capture(adapter.load(ckpt, dtype), ids, taps, cfg)
        show(f"transformers eager {dtype} vs {ref_label}", worst(compare_activations(ref, acts, LOOSE)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models only")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--models", help="comma-separated subset of: " + ", ".join([*MODELS, "bundled-tiny"]))
    args = ap.parse_args()
    models = dict(MODELS)
    models["bundled-tiny"] = dict(bundled=True)
    if args.quick:
        models = {k: v for k, v in models.items() if "tiny" in k}
    if args.models:
        models = {k: models[k] for k in args.models.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in models.items():
            cfg_window = 32 if "tiny" in name else spec["sliding_window"]
            measure(name, spec, Path(tmp), seq=cfg_window + 8, hf=not args.no_hf)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make the walkthrough's figures from the same code the chapters run.

    python walkthrough/make_figures.py                 # writes walkthrough/figures/*.png
    python walkthrough/make_figures.py --out /tmp/fig  # somewhere else (the test suite does this)

Needs matplotlib (`pip install -e '.[plot]'`, also in the `[test]` extra). Runs headless (Agg backend).
Every number plotted is computed here by gemma2_ref's own functions on the bundled tiny model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # tiny matrices: BLAS threads only add waiting (see runner.py)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gemma2_ref as g2  # noqa: E402
from gemma2_ref.config import PRESETS  # noqa: E402
from gemma2_ref.mistakes import inject  # noqa: E402
from gemma2_ref.model import attention_mask, rope_frequencies, soft_cap  # noqa: E402
from gemma2_ref.taps import LARGE_TAPS, LAYER_TAPS  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures"

# The prompts the chapters use for the same pictures.
ATTENTION_PROMPT = "The assert statement is a convenient way to insert debugging assertions"  # chapter 6
LONG_PROMPT = ("Assert statements are a convenient way to insert debugging assertions into a program. "
               "The simple form is equivalent to: if debug, if not expression, raise AssertionError. "
               "The extended form is equivalent to: if debug, if not expression1, raise AssertionError(expression2).")
DIVERGENCE_MISTAKES = [  # (title, mistakes): chapter 13
    ("attention soft-cap dropped", "drop_attn_softcap"),
    ("query scale head_dim (64) instead of 32", "query_scale=head_dim"),
    ("sliding window one too wide", "window_offset=+1"),
    ("exact erf GELU", "exact_gelu"),
]


def save(plt, fig, path: Path) -> Path:
    """Write the figure as a PNG (100 dpi, trimmed) and free it."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def masks(plt, out: Path) -> Path:
    cfg = PRESETS["tiny"]
    pos = np.arange(80)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1, 0.55]})
    for ax, (title, window) in zip(axes, [(f"sliding layer (window {cfg.sliding_window})", cfg.sliding_window),
                                          ("global layer (causal)", None)]):
        ax.imshow(attention_mask(pos, pos, window), cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
    kinds = np.array([[0 if cfg.is_sliding(i) else 1 for i in range(cfg.num_hidden_layers)]]).T
    axes[2].imshow(kinds, cmap="coolwarm", vmin=-0.5, vmax=1.5, aspect=0.5)
    for i in range(cfg.num_hidden_layers):
        axes[2].text(0, i, "sliding" if cfg.is_sliding(i) else "global", ha="center", va="center", fontsize=11)
    axes[2].set_yticks(range(cfg.num_hidden_layers), [f"layer {i}" for i in range(cfg.num_hidden_layers)])
    axes[2].set_xticks([])
    axes[2].set_title("tiny model layers")
    fig.suptitle("Attention masks: a query sees the keys shaded (i - window < j <= i on sliding layers)")
    fig.tight_layout()
    return save(plt, fig, out / "masks.png")


def rope_figure(plt, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for Dh, label in [(64, "tiny (head_dim 64)"), (128, "27B (head_dim 128)"), (256, "2B/9B (head_dim 256)")]:
        f = rope_frequencies(Dh, 10000.0, np.float64)
        i = np.arange(Dh // 2)
        axes[0].semilogy(i / (Dh // 2), f, label=label)
        axes[1].semilogy(i / (Dh // 2), 2 * np.pi / f, label=label)
    axes[0].set_title("frequency f_i = 10000^(-2i/Dh) (radians per token)")
    axes[1].set_title("wavelength 2 pi / f_i (tokens)")
    axes[1].axhline(8192, color="gray", ls="--", lw=1)
    axes[1].text(0.02, 8192 * 1.3, "context 8192", color="gray")
    axes[1].axhline(4096, color="gray", ls=":", lw=1)
    axes[1].text(0.02, 4096 / 2.2, "window 4096", color="gray")
    for ax in axes:
        ax.set_xlabel("pair index i / (Dh/2)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save(plt, fig, out / "rope_frequencies.png")


def softcap_figure(plt, out: Path) -> Path:
    x = np.linspace(-150, 150, 1201)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, x, color="gray", ls="--", lw=1, label="no cap (identity)")
    ax.plot(x, soft_cap(x, 50.0), label="attention scores: 50 tanh(x / 50)")
    ax.plot(x, soft_cap(x, 30.0), label="final logits: 30 tanh(x / 30)")
    ax.set_ylim(-70, 70)
    ax.set_xlabel("x (before the cap)")
    ax.set_ylabel("after the cap")
    ax.set_title("Gemma 2 logit soft-capping")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save(plt, fig, out / "softcap.png")


def attention_map(plt, out: Path, model, tok) -> Path:
    ids = tok.encode(ATTENTION_PROMPT)
    pieces = [p.replace("\u2581", "_") for p in tok.pieces(ids)]
    trace = model.forward(ids, taps="layers.*.attn.probs")
    heads = [(0, 0), (1, 3), (2, 0), (3, 3)]  # (layer, head); layer 1 head 3 is the one chapter 6 prints
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.6))
    for ax, (layer, head) in zip(axes, heads):
        probs = trace[f"layers.{layer}.attn.probs"][head]
        ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        kind = "sliding" if model.config.is_sliding(layer) else "global"
        ax.set_title(f"layer {layer} ({kind}), head {head}")
        ax.set_xticks(range(len(ids)), pieces, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ids)), pieces, fontsize=7)
        ax.set_xlabel("key")
    axes[0].set_ylabel("query")
    fig.suptitle("Tiny model attention probabilities (each row sums to 1)")
    fig.tight_layout()
    return save(plt, fig, out / "attention_map.png")


def divergence_map(plt, out: Path, model, tok) -> Path:
    from matplotlib.colors import LogNorm

    ids = tok.encode(LONG_PROMPT)
    good = model.forward(ids, taps="default")
    rows = [t for t in LAYER_TAPS if t not in LARGE_TAPS and t != "input"]
    L = model.config.num_hidden_layers
    fig, axes = plt.subplots(1, len(DIVERGENCE_MISTAKES), figsize=(4.2 * len(DIVERGENCE_MISTAKES) + 1.5, 6.5))
    for ax, (title, mistake) in zip(axes, DIVERGENCE_MISTAKES):
        bad = inject(model, mistake).forward(ids, taps="default")
        err = np.zeros((len(rows), L))
        for i in range(L):
            for r, tap in enumerate(rows):
                a, b = bad[f"layers.{i}.{tap}"].astype(np.float64), good[f"layers.{i}.{tap}"].astype(np.float64)
                err[r, i] = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        im = ax.imshow(np.maximum(err, 1e-9), cmap="magma", norm=LogNorm(vmin=1e-9, vmax=1), aspect="auto",
                       interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(L), [f"layer {i}" for i in range(L)])
        ax.set_yticks(range(len(rows)), rows if ax is axes[0] else [])
    fig.colorbar(im, ax=axes, shrink=0.8, label="relative L2 error vs the correct model (1e-9 = identical)")
    fig.suptitle(f"Where each mistake first shows: per-layer, per-tap error on a {len(ids)}-token prompt")
    return save(plt, fig, out / "divergence.png")


def gelu_figure(plt, out: Path) -> Path:
    from gemma2_ref.model import gelu_exact, gelu_tanh

    x = np.linspace(-5, 3, 801)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(x, gelu_tanh(x), label="gelu_tanh (Gemma 2)")
    axes[0].plot(x, gelu_exact(x), ls="--", label="gelu_exact (erf)")
    axes[0].set_title("GELU")
    axes[1].plot(x, gelu_tanh(x) - gelu_exact(x))
    axes[1].set_title("gelu_tanh - gelu_exact")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("x")
    axes[0].legend()
    fig.tight_layout()
    return save(plt, fig, out / "gelu.png")


def make_all(out: Path = FIGURES) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    model = g2.load_model("tiny")
    tok = g2.load_tokenizer("tiny")
    return [masks(plt, out), rope_figure(plt, out), softcap_figure(plt, out), attention_map(plt, out, model, tok),
            divergence_map(plt, out, model, tok), gelu_figure(plt, out)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Make the walkthrough's figures (PNG) from gemma2_ref.")
    parser.add_argument("--out", type=Path, default=FIGURES, help=f"output directory (default {FIGURES})")
    args = parser.parse_args(argv)
    for path in make_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

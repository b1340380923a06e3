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
LONG_PROMPT = (
    "Assert statements are a convenient way to insert debugging assertions into a program. "
    "The simple form is equivalent to: if debug, if not expression, raise AssertionError. "
    "The extended form is equivalent to: if debug, if not expression1, raise AssertionError(expression2)."
)
DIVERGENCE_PROMPT = LONG_PROMPT.rsplit(" The extended form", 1)[0]  # chapter 13's golden case: its first two sentences
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
    for ax, (title, window) in zip(
        axes, [(f"sliding layer (window {cfg.sliding_window})", cfg.sliding_window), ("global layer (causal)", None)]
    ):
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
    # Plotted against the pair index i itself: against i / (Dh/2) the three curves would be one line, since
    # 10000^(-2i/Dh) depends on i / Dh only. Same span of frequencies, more pairs to cover it for larger Dh.
    for Dh, label, style in [
        (64, "tiny (head_dim 64)", "o-"),
        (128, "27B (head_dim 128)", "-"),
        (256, "2B/9B (head_dim 256)", "--"),
    ]:
        f = rope_frequencies(Dh, 10000.0, np.float64)
        i = np.arange(Dh // 2)
        axes[0].semilogy(i, f, style, label=label, markersize=2.5)
        axes[1].semilogy(i, 2 * np.pi / f, style, label=label, markersize=2.5)
    axes[0].set_title("frequency f_i = 10000^(-2i/Dh) (radians per token)")
    axes[1].set_title("wavelength 2 pi / f_i (tokens)")
    axes[1].axhline(8192, color="gray", ls="--", lw=1)
    axes[1].text(1, 8192 * 1.3, "context 8192", color="gray")
    axes[1].axhline(4096, color="gray", ls=":", lw=1)
    axes[1].text(1, 4096 / 2.2, "window 4096", color="gray")
    for ax in axes:
        ax.set_xlabel("pair index i (dimensions i and i + Dh/2)")
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


def token_labels(tok, ids) -> list[str]:
    """Pieces as readable tick labels: SentencePiece's word-boundary mark shown as a leading space marker."""
    return [p.replace("\u2581", "\u2423") if p != "<bos>" else "<bos>" for p in tok.pieces(ids)]


def attention_map(plt, out: Path, model, tok) -> Path:
    ids = tok.encode(ATTENTION_PROMPT)
    labels = token_labels(tok, ids)
    trace = model.forward(ids, taps="layers.*.attn.probs")
    heads = [(0, 0), (1, 3), (2, 0), (3, 3)]  # (layer, head); layer 1 head 3 is the one chapter 6 prints
    fig, axes = plt.subplots(2, 2, figsize=(16, 15), layout="constrained")
    for ax, (layer, head) in zip(axes.flat, heads):
        probs = trace[f"layers.{layer}.attn.probs"][head]
        im = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        kind = "sliding" if model.config.is_sliding(layer) else "global"
        ax.set_title(f"layer {layer} ({kind}), head {head}", fontsize=13)
        ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=10)
        ax.set_yticks(range(len(ids)), labels, fontsize=10)
        ax.set_xlabel("key (the token attended to)", fontsize=11)
        if ax in axes[:, 0]:
            ax.set_ylabel("query (the token attending)", fontsize=11)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention probability (each row sums to 1; 0 right of the diagonal)")
    fig.suptitle(
        f'Tiny model attention probabilities for "{ATTENTION_PROMPT}"  (\u2423 = a space before the piece)', fontsize=13
    )
    return save(plt, fig, out / "attention_map.png")


# Colour steps of the divergence map: one per decade below 1e-2 (where float32 rounding and the small mistakes
# live), then 1e-2, 3e-2, 0.1, 0.3, 1, each its own colour, so "a few percent" and "tens of percent" differ.
DIVERGENCE_LEVELS = [0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1]


def divergence_map(plt, out: Path, model, tok) -> Path:
    from matplotlib.colors import BoundaryNorm

    cmap = plt.get_cmap("turbo", len(DIVERGENCE_LEVELS) - 1)
    norm = BoundaryNorm(DIVERGENCE_LEVELS, cmap.N)
    ids = tok.encode(DIVERGENCE_PROMPT)
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
        im = ax.imshow(np.maximum(err, 1e-12), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for (r, i), e in np.ndenumerate(err):  # the value itself, so no colour has to be read off the bar
            text = "0" if e == 0 else f"{e:.0e}".replace("e-0", "e-")
            red, green, blue, _ = cmap(norm(max(e, 1e-12)))
            ax.text(
                i,
                r,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white",
            )
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(L), [f"layer {i}" for i in range(L)])
        ax.set_yticks(range(len(rows)), rows if ax is axes[0] else [])
    bar = fig.colorbar(
        im,
        ax=axes,
        shrink=0.9,
        ticks=DIVERGENCE_LEVELS,
        spacing="uniform",
        label="relative L2 error vs the correct model (0 = bit-identical)",
    )
    bar.ax.set_yticklabels(["0"] + [f"{v:g}" for v in DIVERGENCE_LEVELS[1:]])
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


NEW_IN_GEMMA2 = "#f6c85f"  # boxes for what Gemma 2 added over Gemma 1
PLAIN = "#d9e6f2"


def _box(ax, x, y, w, h, text, color=PLAIN, fontsize=10, tap=None):
    """A labelled box centred at (x, y); `tap` is written beside it in grey (the canonical tap name)."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=color, ec="#333333", lw=1
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    if tap:
        ax.text(x + w / 2 + 0.12, y, tap, ha="left", va="center", fontsize=8, color="#666666", family="monospace")


def _arrow(ax, x0, y0, x1, y1, **kw):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.2, color="#333333", **kw))


def block_diagram(plt, out: Path) -> Path:
    """The whole model (left) and one decoder layer (right), drawn from the equations of chapter 10, with
    the tap names beside the boxes and Gemma 2's additions over Gemma 1 highlighted."""
    from matplotlib.patches import Patch

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 11), gridspec_kw={"width_ratios": [0.85, 1.15]})
    for ax in (left, right):
        ax.set_xlim(0, 10)
        ax.set_ylim(0, 20)
        ax.axis("off")

    # -- the stack, bottom to top --------------------------------------------------------------------------
    left.set_title("Gemma 2: the whole model", fontsize=14)
    x = 4.2
    _box(left, x, 1.0, 5.2, 0.9, "token ids (S,)   <bos> first")
    _box(left, x, 2.7, 5.2, 1.1, "embed: x = E[ids] * sqrt(D)\n(sqrt(D) in the activation dtype)", tap="embed")
    layers = [
        ("layer 0: sliding window 4096", NEW_IN_GEMMA2),
        ("layer 1: global", PLAIN),
        ("layer 2: sliding window 4096", NEW_IN_GEMMA2),
        ("...", "white"),
        ("layer L-1: global", PLAIN),
    ]
    ys = [4.6, 6.2, 7.8, 9.2, 10.6]
    for (text, color), y in zip(layers, ys):
        if text == "...":
            left.text(x, y, "...  (L = 26 / 42 / 46 layers)", ha="center", va="center", fontsize=10)
        else:
            _box(left, x, y, 5.2, 1.0, "decoder layer\n" + text, color=color, tap="layers.i.*" if y == ys[0] else None)
    _box(left, x, 12.4, 5.2, 0.9, "final_norm: RMSNorm", tap="final_norm")
    _box(left, x, 14.0, 5.2, 1.0, "x @ E.T   (tied: the same E)", tap="logits_raw")
    _box(left, x, 15.7, 5.2, 1.0, "soft_cap(logits, 30)", color=NEW_IN_GEMMA2, tap="logits")
    _box(left, x, 17.4, 5.2, 0.9, "logits (S, V): next-token scores")
    for y0, y1 in [
        (1.45, 2.15),
        (3.25, 4.1),
        (5.1, 5.7),
        (6.7, 7.3),
        (8.3, 8.9),
        (9.5, 10.1),
        (11.1, 11.95),
        (12.85, 13.5),
        (14.5, 15.2),
        (16.2, 16.95),
    ]:
        _arrow(left, x, y0, x, y1)
    left.annotate(
        "",
        xy=(x - 2.6, 14.0),
        xytext=(x - 2.6, 2.7),
        arrowprops=dict(arrowstyle="-", ls="--", color="#888888", connectionstyle="bar,fraction=-0.08"),
    )
    left.text(
        0.3, 8.4, "one matrix E (V x D), used twice", ha="center", va="center", fontsize=9, color="#555555", rotation=90
    )

    # -- one layer, bottom to top: the residual stream is the vertical line on the left ------------------------
    right.set_title("One decoder layer (chapters 4 to 9)", fontsize=14)
    r = 1.0  # x of the residual stream
    right.plot([r, r], [0.6, 19.2], color="#333333", lw=2)
    right.text(r, 0.3, "x (S, D)", ha="center", fontsize=10)
    right.text(r, 19.5, "out (S, D)", ha="center", fontsize=10)
    c = 4.6  # x of the sub-blocks
    steps_attn = [
        (1.6, "pre_attn_norm: RMSNorm, scale (1 + w)", PLAIN, "pre_attn_norm"),
        (2.9, "q = h Wq,  k = h Wk,  v = h Wv\n(grouped-query: K = H/2 kv heads)", NEW_IN_GEMMA2, "attn.q_proj ..."),
        (4.2, "RoPE on q and k (theta 10000, half-split)", PLAIN, "attn.q_rope"),
        (5.5, "scores = q k^T * query_pre_attn_scalar^-0.5\n(27B: 144^-0.5, not head_dim^-0.5)", NEW_IN_GEMMA2, None),
        (6.8, "soft_cap(scores, 50)", NEW_IN_GEMMA2, "attn.scores"),
        (
            8.1,
            "mask: causal; window 4096 on even layers\nsoftmax (float32), then probs @ v",
            NEW_IN_GEMMA2,
            "attn.probs",
        ),
        (9.4, "o_proj: (S, H*Dh) -> (S, D)", PLAIN, "attn.out"),
        (10.6, "post_attn_norm: RMSNorm", NEW_IN_GEMMA2, "post_attn_norm"),
    ]
    steps_mlp = [
        (12.3, "pre_ffw_norm: RMSNorm", PLAIN, "pre_ffw_norm"),
        (13.6, "gate = h Wg,  up = h Wu   (D -> F)", PLAIN, "mlp.gate, mlp.up"),
        (14.9, "gelu_tanh(gate) * up", PLAIN, "mlp.hidden"),
        (16.2, "down: (S, F) -> (S, D)", PLAIN, "mlp.out"),
        (17.4, "post_ffw_norm: RMSNorm", NEW_IN_GEMMA2, "post_ffw_norm"),
    ]
    for steps, add_y in ((steps_attn, 11.3), (steps_mlp, 18.3)):
        for y, text, color, tap in steps:
            _box(right, c, y, 5.0, 0.95 if "\n" not in text else 1.15, text, color=color, fontsize=9, tap=tap)
        for (y0, *_), (y1, *_) in zip(steps, steps[1:]):
            _arrow(right, c, y0 + 0.5, c, y1 - 0.55)
        first, last = steps[0][0], steps[-1][0]
        right.annotate(
            "",
            xy=(c - 2.5, first),
            xytext=(r, first - 0.7),
            arrowprops=dict(arrowstyle="->", color="#333333", connectionstyle="angle,angleA=0,angleB=90"),
        )
        right.plot([r], [add_y], "o", ms=20, mfc="white", mec="#333333", zorder=3)
        right.text(r, add_y, "+", ha="center", va="center", fontsize=14, zorder=4)
        right.annotate(
            "",
            xy=(r + 0.3, add_y),
            xytext=(c, last + 0.5),
            arrowprops=dict(arrowstyle="->", color="#333333", connectionstyle="angle,angleA=90,angleB=0"),
        )
    right.text(r - 0.15, 11.75, "resid_mid", ha="right", fontsize=8, color="#666666", family="monospace")
    right.text(r - 0.15, 18.75, "output", ha="right", fontsize=8, color="#666666", family="monospace")
    right.text(r - 0.15, 1.2, "input", ha="right", fontsize=8, color="#666666", family="monospace")
    fig.legend(
        handles=[
            Patch(fc=NEW_IN_GEMMA2, ec="#333333", label="new in Gemma 2 (not in Gemma 1)"),
            Patch(fc=PLAIN, ec="#333333", label="as in Gemma 1"),
            Patch(fc="white", ec="white", label="grey monospace: the tap name (chapter 10)"),
        ],
        loc="lower center",
        ncol=3,
        fontsize=11,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(plt, fig, out / "block_diagram.png")


def rmsnorm_figure(plt, out: Path, model, tok) -> Path:
    """What RMSNorm does to the tiny model's residual stream, and the learned scales (1 + w) it applies."""
    ids = tok.encode("The assert statement is a convenient way to insert debugging assertions into a program")
    trace = model.forward(ids, taps=["layers.3.input", "layers.3.pre_attn_norm"])
    x, y = trace["layers.3.input"].astype(np.float64), trace["layers.3.pre_attn_norm"].astype(np.float64)
    unit = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + model.config.rms_norm_eps)

    def rms(a):
        return np.sqrt(np.mean(a**2, axis=-1))

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    pos = np.arange(len(ids))
    axes[0].plot(pos, rms(x), "o-", label="residual stream x (layers.3.input)")
    axes[0].plot(pos, rms(unit), "s-", label="x / rms(x): every token RMS 1")
    axes[0].plot(pos, rms(y), "^-", label="times (1 + w): pre_attn_norm tap")
    axes[0].set_xticks(pos, token_labels(tok, ids), rotation=90, fontsize=8)
    axes[0].set_ylabel("root mean square over the D = 128 dims")
    axes[0].set_title("Layer 3: RMS per token before and after the norm")
    axes[0].legend(fontsize=8)
    d = np.arange(x.shape[1])
    axes[1].plot(d, x[5], lw=1, label=f"x at token 5 ({token_labels(tok, ids)[5]!r})")
    axes[1].plot(d, y[5], lw=1, label="rms_norm(x) at token 5")
    axes[1].set_xlabel("dimension")
    axes[1].set_title("One token's vector: direction kept, length reset")
    axes[1].legend(fontsize=8)
    names = ("pre_attn_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm")
    scales = [1 + getattr(model.weights.layer(3), n).astype(np.float64) for n in names]
    scales.append(1 + model.weights.final_norm().astype(np.float64))
    axes[2].boxplot(scales, showfliers=True)
    axes[2].set_xticks(range(1, 6), ["pre_attn", "post_attn", "pre_ffw", "post_ffw", "final_norm"], fontsize=9)
    axes[2].axhline(1.0, color="gray", ls="--", lw=1)
    axes[2].set_ylabel("learned scale 1 + w, per dimension")
    axes[2].set_title("Learned scales 1 + w: layer 3 norms, and final_norm")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save(plt, fig, out / "rmsnorm.png")


def kv_cache_figure(plt, out: Path, model, tok) -> Path:
    """The KV cache after chapter 11's prefill (37 tokens) and 5 decode steps: a global layer appends, a
    sliding layer keeps a ring of `window` slots (here 32) and overwrites the oldest in place."""
    from gemma2_ref.generate import EMPTY, KVCache

    prompt = tok.encode(
        "Assert statements are a convenient way to insert debugging assertions into a program. "
        "The simple form, assert expression, is equivalent to"
    )
    cache = KVCache(model.config)
    step = model.forward(prompt, kv_cache=cache, logits_at="last")
    for _ in range(5):
        step = model.forward([int(step["logits"][-1].argmax())], kv_cache=cache, logits_at="last")
    glob, ring = cache.key_positions(1), cache.key_positions(0)
    W, newest = len(ring), int(cache.length) - 1
    fig = plt.figure(figsize=(15, 6.2))
    ax0 = fig.add_axes([0.03, 0.62, 0.94, 0.28])
    ax1 = fig.add_axes([0.03, 0.02, 0.45, 0.55])
    ax2 = fig.add_axes([0.52, 0.06, 0.45, 0.5])
    for slot, p in enumerate(glob):
        color = NEW_IN_GEMMA2 if p >= len(prompt) else PLAIN
        ax0.add_patch(plt.Rectangle((slot, 0), 0.95, 1, fc=color, ec="#333333"))
        ax0.text(slot + 0.47, 0.5, str(int(p)), ha="center", va="center", fontsize=8)
    ax0.set_xlim(-0.2, len(glob) + 0.2)
    ax0.set_ylim(-0.6, 1.2)
    ax0.axis("off")
    ax0.set_title(
        f"Global layer (1, 3): one slot per position, appended; {len(glob)} slots after "
        f"{len(prompt)} prompt tokens + 5 decoded (yellow)",
        fontsize=11,
    )
    # the ring: slot s holds the latest position p with p % W == s
    theta = np.pi / 2 - 2 * np.pi * np.arange(W) / W
    ax1.set_aspect("equal")
    ax1.axis("off")
    for s_, p in enumerate(ring):
        p = int(p)
        color = NEW_IN_GEMMA2 if p >= len(prompt) else ("white" if p == EMPTY else PLAIN)
        x, y = np.cos(theta[s_]), np.sin(theta[s_])
        ax1.add_patch(
            plt.Circle(
                (x, y), 0.085, fc=color, ec="#c0392b" if p == newest else "#333333", lw=2.5 if p == newest else 1
            )
        )
        ax1.text(x, y, str(p), ha="center", va="center", fontsize=8)
        ax1.text(1.2 * x, 1.2 * y, f"s{s_}", ha="center", va="center", fontsize=7, color="#777777")
    ax1.set_xlim(-1.35, 1.35)
    ax1.set_ylim(-1.3, 1.3)
    ax1.text(0, 0.12, f"sliding layer (0, 2):\nring of W = {W} slots", ha="center", va="center", fontsize=11)
    ax1.text(
        0,
        -0.3,
        f"position p goes to slot p % {W}:\npositions {W}..{newest}\nhave overwritten 0..{newest - W}"
        f"\n(newest: red ring)",
        ha="center",
        va="center",
        fontsize=8.5,
    )
    # memory at full size
    from gemma2_ref.config import PRESETS

    names, everything, ringed = ["2b", "9b", "27b"], [], []
    for name in names:
        c = PRESETS[name]
        per = 2 * c.num_key_value_heads * c.head_dim * 2
        n_sl = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
        everything.append(c.num_hidden_layers * 8192 * per / 2**30)
        ringed.append(((c.num_hidden_layers - n_sl) * 8192 + n_sl * c.sliding_window) * per / 2**30)
    xs = np.arange(3)
    ax2.bar(xs - 0.2, everything, 0.4, label="every layer keeps 8192 positions", color=PLAIN, ec="#333333")
    ax2.bar(xs + 0.2, ringed, 0.4, label="sliding layers keep a ring of 4096", color=NEW_IN_GEMMA2, ec="#333333")
    for x_, a, b in zip(xs, everything, ringed):
        ax2.text(x_ - 0.2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=9)
        ax2.text(x_ + 0.2, b, f"{b:.2f}", ha="center", va="bottom", fontsize=9)
    ax2.set_xticks(xs, ["Gemma 2 2B", "9B", "27B"])
    ax2.set_ylabel("KV cache, GiB per sequence (bf16)")
    ax2.set_title("Cache at the full 8192-token context (chapter 11's table)", fontsize=11)
    ax2.legend(fontsize=9, loc="upper left")
    return save(plt, fig, out / "kv_cache.png")


DISTILL_POSITION = 13  # the distribution predicted after "A for loop walks over the items of a list"
DISTILL_TEXT = (
    "A for loop walks over the items of a list, and a with statement makes sure that a file "
    "is closed when the block ends."
)  # chapter 12's sentence


def distillation_figure(plt, out: Path, tok) -> Path:
    """Equation (1)'s target at one position: the teacher's whole distribution, not just the next token."""
    teacher, student = g2.load_model("tiny-teacher"), g2.load_model("tiny")
    ids = tok.encode(DISTILL_TEXT)

    def probs(m):
        z = m.logits(ids).astype(np.float64)
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(-1, keepdims=True)

    P_T, P_S = probs(teacher), probs(student)
    pos = DISTILL_POSITION
    nxt = ids[pos + 1]
    top = list(np.argsort(-P_T[pos])[:12])
    if nxt not in top:
        top[-1] = nxt
    labels = [repr(p.replace("\u2581", "\u2423")) for p in tok.pieces([int(t) for t in top])]
    xs = np.arange(len(top))
    fig, ax = plt.subplots(figsize=(13, 4.8))
    ax.bar(xs - 0.2, P_T[pos, top], 0.4, label="teacher P_T(x | context): the target of equation (1)", color="#4c72b0")
    ax.bar(xs + 0.2, P_S[pos, top], 0.4, label="student P_S(x | context)", color="#dd8452")
    k = top.index(nxt)
    ax.annotate(
        "the token that actually follows:\nthe one-hot target of ordinary training",
        xy=(k, P_T[pos, nxt]),
        xytext=(k + 1.5, max(P_T[pos, top]) * 0.9),
        arrowprops=dict(arrowstyle="->"),
        fontsize=9,
    )
    ax.set_xticks(xs, labels, fontsize=10)
    ax.set_ylabel("probability")
    context = tok.decode(ids[1 : pos + 1])
    kl = float(np.sum(P_T[pos] * (np.log(P_T[pos]) - np.log(P_S[pos]))))
    ax.set_title(
        f"Next token after {context!r}: the teacher's 12 most likely tokens "
        f"(KL(teacher || student) here {kl:.2f} nats)",
        fontsize=11,
    )
    ax.legend(fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return save(plt, fig, out / "distillation.png")


def make_all(out: Path = FIGURES) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    model = g2.load_model("tiny")
    tok = g2.load_tokenizer("tiny")
    return [
        block_diagram(plt, out),
        masks(plt, out),
        rope_figure(plt, out),
        softcap_figure(plt, out),
        rmsnorm_figure(plt, out, model, tok),
        attention_map(plt, out, model, tok),
        divergence_map(plt, out, model, tok),
        gelu_figure(plt, out),
        kv_cache_figure(plt, out, model, tok),
        distillation_figure(plt, out, tok),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Make the walkthrough's figures (PNG) from gemma2_ref.")
    parser.add_argument("--out", type=Path, default=FIGURES, help=f"output directory (default {FIGURES})")
    args = parser.parse_args(argv)
    for path in make_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The figures of walkthrough chapters 14 and 15, drawn from scripts/experiments.log.json (no training here).

    python scripts/plot_experiments.py                  # writes walkthrough/figures/{experiments,post_training}_*.png
    python scripts/plot_experiments.py --out /tmp/fig   # somewhere else (the test suite does this)

Every value plotted is read from the committed log; the chapters print the same values from the same log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "scripts" / "experiments.log.json"
FIGURES = ROOT / "walkthrough" / "figures"

FIGURE_NAMES = (
    "experiments_distillation.png",
    "experiments_architecture.png",
    "experiments_inference.png",
    "post_training.png",
)


def save(plt, fig, path: Path) -> Path:
    """Write the figure as a PNG (100 dpi, trimmed) and free it, as walkthrough/make_figures.py does."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def curve(ax, run: dict, key: str, label: str, x: str = "tokens", **kw):
    xs = [p[x] / (1e6 if x == "tokens" else 1) for p in run["curve"]]
    ax.plot(xs, [p[key] for p in run["curve"]], marker="o", ms=3, label=label, **kw)


def distillation(plt, log: dict, out: Path) -> Path:
    e = log["distill-vs-scratch"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    final = e["distilled"]["final"]["held_out_ce"]
    curve(ax, e["distilled"], "held_out_ce", f"distilled from tiny-teacher ({final:.3f})")
    curve(ax, e["scratch"], "held_out_ce", f"from scratch, next-token CE ({e['scratch']['final']['held_out_ce']:.3f})")
    ax.axhline(
        e["teacher_held_out"]["held_out_ce"],
        color="grey",
        ls="--",
        label=f"the teacher, 2.3M parameters ({e['teacher_held_out']['held_out_ce']:.3f})",
    )
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("The tiny shape (1.44M parameters), same init, batches and steps")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.legend()
    ax.grid(alpha=0.3)
    return save(plt, fig, out / "experiments_distillation.png")


def architecture(plt, log: dict, out: Path) -> Path:
    dw, gm = log["deep-vs-wide"], log["gqa-vs-mha"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    runs = [
        ("4 x D=128, K=2 (tiny)", dw["base (4 x 128)"]),
        ("8 x D=88 (deeper)", dw["deep (8 x 88)"]),
        ("2 x D=184 (wider)", dw["wide (2 x 184)"]),
        ("4 x D=128, K=4 (multi-head)", gm["mha (K=4)"]),
    ]
    for label, run in runs:
        curve(ax, run, "held_out_ce", f"{label}: {run['params'] / 1e6:.2f}M, {run['final']['held_out_ce']:.3f}")
    for key, run in log.get("seed-spread", {}).items():  # the same shapes from other seeds: final value only
        if key in ("partial", "run"):
            continue
        shape, seeds = key.split(" seeds ")
        ce = run["final"]["held_out_ce"]
        color = "C0" if shape.startswith("gqa") else "C3"
        ax.plot(run["tokens"] / 1e6, ce, "x", ms=9, mew=2, color=color, label=f"{shape}, seeds {seeds}: {ce:.3f}")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("Distilled students of (nearly) equal size")
    ax.set_ylim(top=min(5.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    g = gm["generate"]
    labels = ["GQA (K=2)", "MHA (K=4)"]
    kib = [g["gqa"]["cache_bytes"] / 1024, g["mha"]["cache_bytes"] / 1024]
    tps = [g["gqa"]["decode_tok_s_median"], g["mha"]["decode_tok_s_median"]]
    bars = bx.bar([0, 1], kib, color=["C0", "C3"], width=0.5)
    bx.bar_label(bars, [f"{k:.0f} KiB" for k in kib])
    bx.set_xticks([0, 1], [f"{lab}\n{t:.0f} tok/s decode" for lab, t in zip(labels, tps)])
    bx.set_ylabel(f"KV cache after {g['prompt_tokens'] + g['new_tokens']} positions (KiB)")
    bx.set_title("gemma2_ref.generate, NumPy, 1 thread")
    return save(plt, fig, out / "experiments_architecture.png")


def inference(plt, log: dict, out: Path) -> Path:
    w, s = log["window"], log["softcap"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = list(w["length 128"]["variants"])
    for k, (length, colour) in enumerate((("length 128", "C0"), ("length 512", "C1"))):
        ppl = [w[length]["variants"][v]["held_out_ppl"] for v in labels]
        bars = ax.bar(
            [i + 0.38 * k for i in range(len(labels))],
            ppl,
            width=0.38,
            color=colour,
            label=f"{length.split()[1]}-token sequences",
        )
        ax.bar_label(bars, [f"{p:.1f}" for p in ppl], fontsize=8)
    ax.set_xticks(
        [i + 0.19 for i in range(len(labels))],  # two lines each: one line overlaps its neighbours
        [f"window {v}".replace(" (", "\n(") if v[0].isdigit() else v.replace(" ", "\n", 1) for v in labels],
        fontsize=9,
    )
    ax.set_ylabel("held-out perplexity")
    ax.set_title("tiny (trained with window 32), window changed at inference")
    ax.legend()
    labels = list(s["variants"])
    ppl = [s["variants"][v]["held_out_ppl"] for v in labels]
    bars = bx.bar(range(len(labels)), ppl, color="C2", width=0.5)
    bx.bar_label(
        bars,
        [f"{p:.2f}\ntop-1 {s['variants'][v]['top1_agreement_with_trained']:.2%}" for p, v in zip(ppl, labels)],
        fontsize=8,
    )
    bx.set_xticks(range(len(labels)), [v.replace(" cap", "\ncap", 1) for v in labels], fontsize=8)
    bx.set_ylabel("held-out perplexity (128-token sequences)")
    bx.set_ylim(0, max(ppl) * 1.2)
    bx.set_title("tiny, soft-caps removed at inference")
    return save(plt, fig, out / "experiments_inference.png")


def post_training(plt, log: dict, out: Path) -> Path:
    it, op = log["tiny-it"], log["on-policy"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label in ("run A (seed 100) = tiny-it", "run B (seed 101)"):
        curve(ax, it[label], "held_out_sft", label, x="step")
    ax.axhline(
        it["merged (mean of A and B)"]["held_out_sft_bf16"], color="grey", ls="--", label="weight average of A and B"
    )
    ax.axhline(it["tiny (before SFT)"]["held_out_sft"], color="k", ls=":", label="tiny, before SFT")
    ax.set_xlabel("SFT step (batch 16)")
    ax.set_ylabel("held-out SFT loss (nats per model-turn token)")
    ax.set_title("SFT of tiny on chat turns, and model merging")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for label in ("on-policy (student samples)", "off-policy (teacher samples)"):
        curve(bx, op[label], "held_out_sft", label, x="step")
    bx.axhline(op["tiny-it (start)"]["held_out_sft"], color="k", ls=":", label="tiny-it (start)")
    bx.set_xlabel("distillation step (batch 8)")
    bx.set_ylabel("held-out SFT loss (nats per model-turn token)")
    bx.set_title("Distilling tiny-it from an SFT'd teacher")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    return save(plt, fig, out / "post_training.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=FIGURES)
    ap.add_argument("--log", type=Path, default=LOG)
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(args.log.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for make in (distillation, architecture, inference, post_training):
        print(make(plt, log, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

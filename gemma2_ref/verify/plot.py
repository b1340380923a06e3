"""A picture of a comparison: each tap's error along the depth of the model, the profile's limits, the first
divergence marked. What a backend author would rather look at than read.

    from gemma2_ref.compare import PROFILES, compare_cases
    from gemma2_ref.plot import plot_divergence
    plot_divergence(compare_cases(reference, candidate, PROFILES["fp32"]), "divergence.png")

Two panels share the x axis, the depth: `embed`, then layer 0, 1, ..., then the final taps. Inside a layer
the taps sit in execution order, so a layer spans one unit of x. One line per tap kind (output, attn.q_rope,
mlp.out, ...) joins that tap across layers, on a log scale:

    top     rel L2 = ||c - r|| / ||r||            and the profile's limit (dashed)
    bottom  max |c - r| / max |r|                 and the profile's limit (dashed)

The first diverging tap is circled; when it failed on its rows past the sliding window alone (compare judges
them on their own), a triangle shows their error.

An exact tap (error 0) is drawn on the floor of the axis, a non-finite one on its ceiling. matplotlib is
imported here only, when plot_divergence is called (`pip install 'gemma2-ref[plot]'`), with the Agg backend:
no display needed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

# Tap kinds in execution order, each with its colour: the residual stream in black, norms in greys,
# attention in blues and purples, the MLP in oranges and greens.
KIND_STYLES = {
    "input": ("#7f7f7f", 1.0),
    "pre_attn_norm": ("#bdbdbd", 1.0),
    "attn.q_proj": ("#9ecae1", 1.0),
    "attn.k_proj": ("#6baed6", 1.0),
    "attn.v_proj": ("#4292c6", 1.0),
    "attn.q_rope": ("#2171b5", 1.0),
    "attn.k_rope": ("#08519c", 1.0),
    "attn.scores": ("#bcbddc", 1.2),
    "attn.probs": ("#9e9ac8", 1.2),
    "attn.context": ("#6a51a3", 1.5),
    "attn.out": ("#3f007d", 1.5),
    "post_attn_norm": ("#969696", 1.0),
    "resid_mid": ("#525252", 1.2),
    "pre_ffw_norm": ("#737373", 1.0),
    "mlp.gate": ("#fdae6b", 1.0),
    "mlp.up": ("#fd8d3c", 1.0),
    "mlp.hidden": ("#d94801", 1.2),
    "mlp.out": ("#31a354", 1.5),
    "post_ffw_norm": ("#a1d99b", 1.0),
    "output": ("#000000", 2.5),
}
FINAL_STYLES = {"final_norm": ("#000000", "s"), "logits_raw": ("#e7298a", "D"), "logits": ("#ce1256", "D")}
LIMIT_COLOR = "#d62728"


def _depth(taps) -> tuple[dict[str, float], int]:
    """x position of every compared tap: embed at -1, layer i's kinds spread over [i, i + 1) in execution
    order, the final taps over [N, N + 1). Returns ({tap: x}, N)."""
    layer_of = {t.name: int(m.group(1)) for t in taps if (m := re.fullmatch(r"layers\.(\d+)\..+", t.name))}
    n_layers = max(layer_of.values()) + 1 if layer_of else 0
    kinds = [k for k in KIND_STYLES if any(_kind(t.name) == k for t in taps)]
    kinds += [k for k in dict.fromkeys(_kind(n) for n in layer_of) if k not in kinds]
    finals = [t.name for t in taps if t.name not in layer_of and t.name != "embed"]
    x = {}
    for t in taps:
        if t.name == "embed":
            x[t.name] = -1.0
        elif t.name in layer_of:
            x[t.name] = layer_of[t.name] + kinds.index(_kind(t.name)) / max(len(kinds), 1)
        else:
            x[t.name] = n_layers + finals.index(t.name) / max(len(finals), 1)
    return x, n_layers


def _kind(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def _axis_range(values: list[float], limit: float) -> tuple[float, float]:
    """(floor, ceiling) of a log axis holding every finite positive value and the limit, with room."""
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0] + [limit]
    lo, hi = min(finite), max(finite)
    return 10 ** (math.floor(math.log10(lo)) - 1), 10 ** (math.ceil(math.log10(hi)) + 1)


def _panel(ax, taps, x, metric: str, limit: float, limit_label: str, first) -> None:
    """One metric of every tap against depth, a line per kind, its limit and the first divergence."""
    values = [getattr(t, metric) for t in taps]
    floor, ceiling = _axis_range(values, limit)

    def y(v):
        if v is None or not math.isfinite(v):
            return ceiling / 1.5  # shape mismatch or non-finite: on the ceiling
        return max(v, floor * 1.5)  # exact: on the floor

    by_kind: dict[str, list] = {}
    for t in taps:
        by_kind.setdefault(_kind(t.name), []).append(t)
    for kind, group in by_kind.items():
        xs, ys = [x[t.name] for t in group], [y(getattr(t, metric)) for t in group]
        if kind in KIND_STYLES:
            color, width = KIND_STYLES[kind]
            ax.plot(xs, ys, "-o", color=color, lw=width, ms=2.5 + width, label=kind, zorder=2 + width)
        else:  # embed and the final taps: single markers
            color, marker = FINAL_STYLES.get(kind, ("#000000", "o"))
            ax.plot(xs, ys, marker, color=color, ms=7, label=kind, zorder=4)
    bad = [t for t in taps if getattr(t, metric) is None or not math.isfinite(getattr(t, metric))]
    if bad:
        ax.plot(
            [x[t.name] for t in bad],
            [y(None)] * len(bad),
            "x",
            color=LIMIT_COLOR,
            ms=9,
            mew=2,
            label="shape mismatch / non-finite",
            zorder=9,
        )
    ax.axhline(limit, color=LIMIT_COLOR, ls="--", lw=1.2, zorder=1)
    ax.text(
        0.995,
        limit * 1.25,
        limit_label,
        color=LIMIT_COLOR,
        fontsize=8,
        ha="right",
        va="bottom",
        transform=ax.get_yaxis_transform(),
    )
    if first is not None:
        fx, fy = x[first.name], y(getattr(first, metric))
        ax.axvline(fx, color=LIMIT_COLOR, ls=":", lw=1, zorder=1)
        ax.plot([fx], [fy], "o", ms=14, mfc="none", mec=LIMIT_COLOR, mew=2, zorder=10)
        past = getattr(first, "past_window", None)  # its rows at positions >= window, judged on their own
        if past and "past_window" in first.failed:
            ax.plot([fx], [y(past[metric])], "^", ms=9, color=LIMIT_COLOR, zorder=11)
            ax.annotate(
                f"its {past['rows']} rows past the window",
                (fx, y(past[metric])),
                xytext=(8, 0),
                textcoords="offset points",
                color=LIMIT_COLOR,
                fontsize=8,
                va="center",
                bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1},
            )
    ax.set_yscale("log")
    ax.set_ylim(floor, ceiling)
    ax.grid(True, which="major", axis="y", color="#e0e0e0", lw=0.6)


def _short(path) -> str:
    """The last two parts of a case path: suite/case or parent/case."""
    return "/".join(Path(str(path)).parts[-2:])


def _title(comparison, profile, first) -> str:
    name, ref = _short(comparison.candidate), _short(comparison.reference)
    if comparison.passed:
        verdict = f"PASS ({len(comparison.compared)} taps within {profile.name})"
    elif first is None:
        verdict = "FAIL: " + (comparison.input_mismatch or "nothing compared")
    else:
        shown = first.rel_l2 if first.rel_l2 is not None else float("nan")
        verdict = f"FAIL: first divergence {first.name} (rel L2 {shown:.3g}; fails {', '.join(first.failed)})"
    return f"{name} vs {ref}, profile {profile.name}: {verdict}"


def plot_divergence(comparison, path, profile=None) -> Path:
    """Draw `comparison` (a compare.CaseComparison) to `path` (PNG, SVG or PDF by its suffix) and return it.
    `profile`: whose limits to draw (default: the one the comparison used)."""
    from .optional import require

    matplotlib = require("matplotlib", "--plot (drawing the comparison)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile = profile or comparison.profile
    taps = comparison.compared
    if not taps:
        raise ValueError(
            f"{comparison.candidate}: no tap was compared with {comparison.reference}, nothing "
            f"to plot ({comparison.input_mismatch or 'the candidate holds none of its taps'})"
        )
    x, n_layers = _depth(taps)
    first = comparison.first_divergence
    first = first if first is not None and first.name in x else None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, height_ratios=(3, 2))
    _panel(top, taps, x, "rel_l2", profile.rel_l2, f"{profile.name} limit {profile.rel_l2:g}", first)
    _panel(bottom, taps, x, "max_rel", profile.max_rel, f"{profile.name} limit {profile.max_rel:g}", first)
    top.set_ylabel("rel L2  ||c - r|| / ||r||")
    bottom.set_ylabel("max |c - r| / max |r|")
    for i in range(0, n_layers, 2):  # alternate layers shaded, so a layer's taps read as one block
        for ax in (top, bottom):
            ax.axvspan(i, i + 1, color="#f4f4f4", zorder=0)
    step = max(1, math.ceil(n_layers / 24))
    ticks = [-1.0] + [i + 0.5 for i in range(0, n_layers, step)] + [n_layers + 0.5]
    labels = ["embed"] + [str(i) for i in range(0, n_layers, step)] + ["final"]
    bottom.set_xticks(ticks, labels)
    bottom.set_xlabel("layer (inside a layer: taps in execution order, left to right)")
    bottom.set_xlim(-1.6, n_layers + 1.1)
    if first is not None:
        top.annotate(
            first.name,
            (x[first.name], top.get_ylim()[1]),
            xytext=(4, -12),
            textcoords="offset points",
            color=LIMIT_COLOR,
            fontsize=9,
            fontweight="bold",
            va="top",
        )
    handles, names = top.get_legend_handles_labels()
    top.legend(
        handles,
        names,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        title="tap kind",
        title_fontsize=9,
    )
    fig.suptitle(_title(comparison, profile, first), fontsize=10, x=0.01, ha="left")
    logits = next((t for t in taps if t.name == "logits" and t.logits), None)
    if logits:
        lg = logits.logits
        fig.text(
            0.01,
            0.005,
            f"logits: KL max {lg['kl_max']:.3g} nats (limit {profile.kl:g}), top-1 "
            f"{lg['top1']:.1%}, top-5 overlap {lg['top5']:.1%}",
            fontsize=8,
            ha="left",
        )
    footnotes = []
    if any(t.rel_l2 == 0 for t in taps):
        footnotes.append("error 0 (exact): drawn on the floor")
    if comparison.missing:
        footnotes.append("not in the candidate: " + ", ".join(sorted({_kind(n) for n in comparison.missing})))
    fig.text(0.99, 0.005, "; ".join(footnotes), fontsize=8, ha="right", color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparisons(comparisons, path) -> list[Path]:
    """`compare --plot FILE`: one comparison to FILE; a suite's to FILE-<case>.<suffix>, one per case that
    has taps to draw. Returns the files written."""
    path = Path(path)
    drawable = [c for c in comparisons if c.compared]
    if len(comparisons) == 1:
        return [plot_divergence(c, path) for c in drawable]
    return [
        plot_divergence(c, path.with_name(f"{path.stem}-{Path(str(c.candidate)).name}{path.suffix}")) for c in drawable
    ]


def plot_corpus(result, path) -> Path:
    """`compare REF CAND --plot` on corpus goldens: the KLD of every scored position along the corpus (log scale,
    chunk boundaries dotted, the mean-KLD limit dashed) and the histogram of log10 KLD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kld = np.asarray(result.kld)  # (n_chunks, R)
    floor = 1e-12
    flat = np.maximum(kld.reshape(-1), floor)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), gridspec_kw={"height_ratios": [2, 1]})
    top.semilogy(flat, lw=0.6, color="#2171b5")
    for c in range(1, kld.shape[0]):
        top.axvline(c * kld.shape[1], color="#bdbdbd", lw=0.5, ls=":")
    top.axhline(result.thresholds["kld_mean"], color="#d62728", ls="--", lw=1, label="mean-KLD limit")
    top.set(
        xlabel="scored position (chunk after chunk)",
        ylabel="KLD (nats)",
        title=f"{Path(result.candidate).name} vs {Path(result.reference).name}: mean KLD "
        f"{result.stats['kld_mean']:.3g}, p99 {result.stats['kld_p99']:.3g}",
    )
    top.legend(loc="upper right")
    bottom.hist(np.log10(flat), bins=60, color="#6baed6")
    bottom.set(xlabel="log10 KLD", ylabel="positions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

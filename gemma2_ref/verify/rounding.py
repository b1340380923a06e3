"""The precision stage of a diagnosis: which RMSNorm arithmetic reproduces a low-precision candidate's rounding.

RMSNorm's precision mistakes (NORM_ROUNDINGS: the normalised x cast to the activation dtype before the (1 + w)
multiply, (1 + w) rounded to bfloat16, the mean of squares accumulated in bfloat16) each add about one rounding
per norm. In a bfloat16 run that is inside the `measured` profile, so a tap-by-tap comparison cannot tell them
from a correct backend. But a norm is a deterministic function of its input: given the candidate's *own* input to
a norm (`layers.i.input` for `pre_attn_norm`, `attn.out`, `resid_mid`, `mlp.out`, the last layer's `output` for
`final_norm`) and the weights held in the candidate's dtype, each hypothesis -- the correct RMSNorm (float32 inside,
one rounding at the end) and each mistake -- predicts the candidate's output bit for bit. No error propagates into
this test: every norm is checked on what the candidate itself fed it.

The evidence is counted on the elements where two hypotheses predict different values (discriminating elements):

    reproduces    the best hypothesis equals >= REPRODUCE of the candidate's elements, and against each rival it
                  is right on >= SIDE of the >= MIN_DISCRIMINATING elements where the two disagree
    too weak      fewer than MIN_DISCRIMINATING elements tell the best from some rival (e.g. (1 + w) is exact in
                  bfloat16 for every weight the norms hold): no choice is made
    none          no hypothesis reproduces the candidate's rounding (another order of the float32 operations,
                  another rounding, or a mistake in the norm's weights): nothing is named
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..model.gemma2 import rms_norm
from ..model.taps import Taps, round_to_dtype
from .mistakes import MistakenTaps

NORM_ROUNDINGS = ("norm_cast_before_scale", "norm_scale_in_bf16", "norm_variance_in_bf16")
CORRECT = "correct"
HYPOTHESES = (CORRECT,) + NORM_ROUNDINGS
NORM_INPUTS = {
    "pre_attn_norm": "input",
    "post_attn_norm": "attn.out",
    "pre_ffw_norm": "resid_mid",
    "post_ffw_norm": "mlp.out",
}
LAYERS_CHECKED = 1  # layer 0's four norms (and final_norm): S x D x 5 elements, enough on every model measured

REPRODUCE = 0.99
SIDE = 0.9
MIN_DISCRIMINATING = 50


@dataclass
class RoundingEvidence:
    dtype: str
    taps: list[str]  # the norm outputs checked
    elements: int
    agree: dict[str, int] = field(default_factory=dict)  # hypothesis -> elements equal to its prediction
    best: str | None = None
    rivals: dict[str, tuple[int, float]] = field(default_factory=dict)  # rival -> (discriminating, best's share)
    verdict: str = "none"  # "reproduces", "too weak", "none", or "not applicable"
    weights: str = ""  # the norm weights as the predictions used them: the candidate's dtype, or "as stored"
    why: str = ""

    @property
    def named(self) -> str | None:
        """The mistake the candidate's rounding reproduces, or None (the correct norm, or no choice)."""
        return self.best if self.verdict == "reproduces" and self.best != CORRECT else None

    def share(self, hypothesis: str) -> float:
        return self.agree.get(hypothesis, 0) / self.elements if self.elements else 0.0

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "taps": self.taps,
            "elements": self.elements,
            "equal_share": {h: self.share(h) for h in self.agree},
            "best": self.best,
            "discriminating": {r: {"elements": n, "best_share": s} for r, (n, s) in self.rivals.items()},
            "verdict": self.verdict,
            "weights": self.weights,
            "named": self.named,
            "why": self.why,
        }


def norm_cases(model, activations: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(norm tap, the candidate's input to it, its weight) for layer 0's norms and final_norm, where the candidate
    holds both the norm's output and its input."""
    cfg, out = model.config, []
    for i in range(min(LAYERS_CHECKED, cfg.num_hidden_layers)):
        w = model.weights.layer(i)
        for norm, source in NORM_INPUTS.items():
            name, src = f"layers.{i}.{norm}", f"layers.{i}.{source}"
            if getattr(cfg, norm, True) is False:
                continue  # a config without this post-norm (the Gemma 1 layer)
            if name in activations and src in activations:
                out.append((name, activations[src], np.asarray(getattr(w, norm))))
    last = f"layers.{cfg.num_hidden_layers - 1}.output"
    if "final_norm" in activations and last in activations:
        out.append(("final_norm", activations[last], np.asarray(model.weights.final_norm())))
    return out


def predict(x: np.ndarray, w: np.ndarray, eps: float, hypothesis: str, dtype: str, weights_in_dtype: bool = True):
    """The norm's output as a `dtype` backend computing `hypothesis` produces it, from its input x (already
    `dtype` values) and the weight held in `dtype` (or, `weights_in_dtype=False`, as the checkpoint stores it)."""
    w = w.astype(np.float32)
    w = round_to_dtype(w, dtype) if weights_in_dtype else w
    taps = Taps([], round_to=dtype) if hypothesis == CORRECT else MistakenTaps(hypothesis, [], round_to=dtype)
    return round_to_dtype(rms_norm(x.astype(np.float32), w, eps, taps), dtype)


def rmsnorm_rounding(model, activations: dict, dtype: str) -> RoundingEvidence:
    """Which RMSNorm arithmetic reproduces a `dtype` ("bfloat16" / "float16") candidate's norm outputs, bit for
    bit, from its own inputs to them (module docstring). The weights are taken as a `dtype` backend holds them;
    when the checkpoint's are not `dtype` values, also as stored (a backend keeping float32 norm weights), and
    the form that reproduces more elements is kept (`RoundingEvidence.weights`)."""
    cases = norm_cases(model, activations)
    evidence = RoundingEvidence(dtype, [name for name, _, _ in cases], 0)
    if not cases:
        evidence.verdict, evidence.why = "not applicable", "the candidate holds no norm output with its input"
        return evidence
    inputs = [np.asarray(x, np.float32) for _, x, _ in cases]
    if any(not np.array_equal(round_to_dtype(x, dtype), x, equal_nan=True) for x in inputs):
        evidence.verdict, evidence.why = "not applicable", f"the candidate's norm inputs are not {dtype} values"
        return evidence
    eps = model.config.rms_norm_eps
    cand = np.concatenate([np.asarray(activations[name], np.float32).ravel() for name, _, _ in cases])
    stored_in_dtype = all(np.array_equal(round_to_dtype(w.astype(np.float32), dtype), w) for _, _, w in cases)
    tried = []
    for in_dtype in (True,) if stored_in_dtype else (True, False):
        preds = {
            h: np.concatenate([predict(x, w, eps, h, dtype, in_dtype).ravel() for x, (_, _, w) in zip(inputs, cases)])
            for h in HYPOTHESES
        }
        tried.append(count(replace(evidence, weights=dtype if in_dtype else "as stored"), cand, preds))
    evidence = max(tried, key=lambda e: e.agree[e.best])
    evidence.verdict, evidence.why = judge(evidence)
    return evidence


def count(evidence: RoundingEvidence, cand: np.ndarray, preds: dict) -> RoundingEvidence:
    """The elements each hypothesis reproduces, the best one, and against each rival the discriminating elements
    and the best's share of them (finite elements only)."""
    finite = np.isfinite(cand) & np.all([np.isfinite(p) for p in preds.values()], axis=0)
    cand, preds = cand[finite], {h: p[finite] for h, p in preds.items()}
    evidence.elements = int(cand.size)
    evidence.agree = {h: int((p == cand).sum()) for h, p in preds.items()}
    best = evidence.best = max(HYPOTHESES, key=lambda h: evidence.agree[h])
    evidence.rivals = {}
    for rival in HYPOTHESES:
        if rival != best:
            disc = preds[best] != preds[rival]
            n = int(disc.sum())
            evidence.rivals[rival] = (n, float((cand[disc] == preds[best][disc]).mean()) if n else 0.0)
    return evidence


def judge(e: RoundingEvidence) -> tuple[str, str]:
    """The verdict and its reason, from the counts (module docstring)."""
    if e.share(e.best) < REPRODUCE:
        return "none", f"the closest, {e.best}, equals only {e.share(e.best):.1%} of the elements (< {REPRODUCE:.0%})"
    weak = [r for r, (n, _) in e.rivals.items() if n < MIN_DISCRIMINATING]
    if weak:
        return "too weak", (
            f"{e.best} and {', '.join(weak)} differ on fewer than {MIN_DISCRIMINATING} elements: too weak to choose"
        )
    split = [r for r, (_, s) in e.rivals.items() if s < SIDE]
    if split:
        return "none", f"against {', '.join(split)} the candidate sides with {e.best} on < {SIDE:.0%} of the elements"
    worst = max(e.rivals, key=lambda r: e.agree[r])  # the rival reproducing the most elements
    n, s = e.rivals[worst]
    return (
        "reproduces",
        f"against the closest rival, {worst}, it is right on {s:.1%} of the {n} elements where they differ",
    )


def format_rounding(e: RoundingEvidence) -> str:
    """One paragraph for the diagnosis report."""
    if e.verdict == "not applicable":
        return f"RMSNorm rounding ({e.dtype}, bit level): not checked: {e.why}"
    shares = ", ".join(f"{h} {e.share(h):.2%}" for h in HYPOTHESES)
    head = (
        f"RMSNorm rounding ({e.dtype}, bit level, {len(e.taps)} norm outputs from the candidate's own inputs, "
        f"{e.elements} elements, weights {'in ' + e.weights if e.weights != 'as stored' else 'as stored'}): "
        f"equal to the prediction of {shares}"
    )
    tail = {
        "reproduces": "it rounds as the correct RMSNorm (float32 inside, one rounding at the end)"
        if e.best == CORRECT
        else f"it rounds as {e.best}",
        "too weak": "no choice",
        "none": "no hypothesis reproduces it",
    }[e.verdict]
    return f"{head}; {tail}: {e.why}"

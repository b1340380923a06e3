"""Compare a candidate's activations with a reference golden, tap by tap, in execution order.

Per tap (all metrics in float64, relative to the reference so that one threshold serves every layer):

    rel_l2    ||c - r|| / ||r||                   the error's size relative to the tensor's
    max_rel   max |c - r| / max |r|               the worst single element, relative to the tap's scale
    cosine    <c, r> / (||c|| ||r||)              reported, not thresholded (it follows from rel_l2)

and for `logits` (after the final soft-cap), per token position:

    KL(P_ref || P_cand)                           of the next-token distributions, in nats; max over positions
    top-1 agreement                               fraction of positions with the same most likely token;
                                                  a disagreement is excused when the reference's two tokens are
                                                  within the profile's logit tolerance of each other (a tie)
    top-5 overlap                                 mean |top5(ref) & top5(cand)| / 5

A tap fails when any thresholded metric exceeds its profile limit. The *first diverging tap* is the first
tap in execution order that fails: errors propagate forward, so the first failure is where to look.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..model.gemma2 import log_softmax
from ..model.jsonfile import is_number
from ..model.taps import LARGE_TAPS, canonical_order, sequence_axis
from ..model.tokenizer import BOS, END_OF_TURN, EOS, PAD, START_OF_TURN
from .golden import Case, GoldenError, Suite, case_pairs, slice_positions
from .mistakes import REFS

# -- tolerance profiles -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    rel_l2: float  # max ||c - r|| / ||r|| per tap
    max_rel: float  # max  max|c - r| / max|r| per tap
    kl: float  # max per-token KL(P_ref || P_cand) of the logits, nats
    top1: float  # min fraction of positions whose top-1 token agrees (ties within tolerance excused)
    top5: float  # min mean top-5 overlap
    why: str = ""
    per_tap: dict | None = None  # {tap: (rel_l2, max_rel)}: limits of their own (the measured profile)

    def __post_init__(self):
        """Limits are finite numbers >= 0 (agreements in [0, 1]): a NaN limit would let every candidate pass."""
        checks = [(k, getattr(self, k), None) for k in ("rel_l2", "max_rel", "kl")]
        checks += [(k, getattr(self, k), 1.0) for k in ("top1", "top5")]
        checks += [(f"per_tap[{tap!r}]", v, None) for tap, pair in (self.per_tap or {}).items() for v in pair]
        for key, value, high in checks:
            if not (is_number(value) and value >= 0 and (high is None or value <= high)):
                raise ValueError(
                    f"profile {self.name!r}: `{key}` is {value!r}; a limit is a finite number >= 0"
                    + (" and <= 1 (a fraction)" if high else "")
                )

    def limits(self, tap: str) -> tuple[float, float]:
        """(rel L2, max abs / absmax) limits of one tap."""
        return (self.per_tap or {}).get(tap, (self.rel_l2, self.max_rel))

    def describe(self) -> str:
        if self.per_tap:
            rel = [v[0] for v in self.per_tap.values()]
            return (
                f"{self.name}: per-tap limits, rel L2 {min(rel):.2g} to {max(rel):.2g}; logits KL <= "
                f"{self.kl:.2g} nats, top-1 >= {self.top1:.2g}, top-5 overlap >= {self.top5:.2g}"
            )
        return (
            f"{self.name}: rel L2 <= {self.rel_l2:g}, max abs <= {self.max_rel:g} x tap absmax, "
            f"logits KL <= {self.kl:g} nats, top-1 >= {self.top1:g}, top-5 overlap >= {self.top5:g}"
        )


# Thresholds are set from measured noise floors (README, "Goldens and comparing other backends"):
# the largest error seen between two correct implementations, times a margin, and still far below the
# smallest error any known mistake produces.
PROFILES = {
    "fp32": Profile(
        "fp32",
        rel_l2=5e-5,
        max_rel=2.5e-4,
        kl=1e-6,
        top1=1.0,
        top5=0.99,
        why="float32 compute on the stored weights. Measured worst over every tap (random models "
        "of 4-26 layers, 40 tokens): ours float32 vs float64 2.0e-5 rel L2 / 4.8e-5 max; "
        "transformers eager float32 vs ours 1.7e-5 / 4.5e-5; logits KL < 2e-10. Limits: 2.5x "
        "and 5x that. The smallest known mistake on the tiny model, sqrt(128) rounded to "
        "bfloat16 at `embed`, is 1.0e-4",
    ),
    "bf16": Profile(
        "bf16",
        rel_l2=0.15,
        max_rel=0.4,
        kl=0.05,
        top1=0.9,
        top5=0.8,
        why="bfloat16 activations (8 significant bits: 0.4% per rounding). Measured transformers "
        "eager bfloat16 vs ours float32 (bf16-stored weights): 1.2e-2 / 3.0e-2 (bundled trained tiny), "
        "9.4e-2 / 0.24 (random tiny), 9.7e-2 / 0.22 (random 12 layers); logits KL <= 2.6e-2. "
        "A random 26-layer model reaches 0.25 / 0.63 (random deep models amplify rounding): "
        "pass --rtol/--atol there. Catches gross mistakes only: check subtle ones with a "
        "float32 run",
    ),
    "fp16": Profile(
        "fp16",
        rel_l2=0.05,
        max_rel=0.15,
        kl=5e-3,
        top1=0.95,
        top5=0.9,
        why="float16 activations (11 significant bits). Measured transformers eager float16 vs "
        "ours float32: 1.5e-3 / 3.1e-3 (bundled trained tiny) up to 3.4e-2 / 0.11 (random 26 "
        "layers); logits KL <= 5.3e-4",
    ),
    "q8": Profile(
        "q8",
        rel_l2=0.25,
        max_rel=0.6,
        kl=0.1,
        top1=0.8,
        top5=0.7,
        why="8-bit block-quantised weights (Q8_0: 32-value blocks, absmax/127 scale), float32 "
        "compute. Measured (simulated Q8_0 in gemma2_ref) vs the unquantised weights: "
        "0.135 / 0.36 (random tiny), 0.145 / 0.32 (random 12 layers), logits KL <= 1.2e-2; "
        "random 26 layers: 0.39 / 1.1 (chaotic)",
    ),
}


def profile_help() -> str:
    return "\n".join(
        f"  {p.describe()}\n" + textwrap.fill(p.why, 100, initial_indent="      ", subsequent_indent="      ")
        for p in PROFILES.values()
    )


def get_profile(name: str = "fp32", **overrides) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(PROFILES[name], name=name + ("+custom" if changes else ""), **changes)


def auto_profile(candidate: Case) -> str:
    """The profile that fits the candidate's compute dtype: bfloat16 -> bf16, float16 -> fp16, else fp32."""
    dtype = str(candidate.compute_dtype or "")
    return {
        "bfloat16": "bf16",
        "bf16": "bf16",
        "float16": "fp16",
        "fp16": "fp16",
        "half": "fp16",
        "q8_0": "q8",
        "int8": "q8",
    }.get(dtype, "fp32")


# -- metrics ----------------------------------------------------------------------------------------------


@dataclass
class TapResult:
    name: str
    status: str  # "pass", "fail", "shape" (shapes differ: fails), "missing" (not in the candidate)
    shape: list | None = None
    candidate_shape: list | None = None
    max_abs: float | None = None
    max_abs_index: list | None = None
    scale: float | None = None  # max |reference|
    max_rel: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    logits: dict | None = None  # kl_mean, kl_max, kl_max_position, top1, top5, top1_disagreements
    failed: list = field(default_factory=list)  # which metrics exceeded their limit
    scale_fit: dict | None = None  # a failing tap that is the reference times one number: {"scale", "rel_l2_after"}
    past_window: dict | None = None  # the rows whose attention differs between sliding and global, on their own
    non_finite: dict | None = None  # {"candidate"/"reference": {"nan", "inf", "first"}} where NaN / Inf appear

    @property
    def layer(self) -> str:
        m = re.fullmatch(r"layers\.(\d+)\..*", self.name)
        return m.group(1) if m else self.name

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "missing")

    def summary(self) -> str:
        if self.status == "missing":
            return f"{self.name}: not in the candidate"
        if self.status == "shape":
            return f"{self.name}: shape {self.candidate_shape} in the candidate, {self.shape} in the reference"
        if self.non_finite:  # its errors are not numbers: say where the NaN / Inf are instead
            return f"{self.name}: {describe_non_finite(self.non_finite)}"
        s = f"{self.name}: "
        s += (
            f"rel L2 {self.rel_l2:.3g}, max abs {self.max_abs:.3g} at {tuple(self.max_abs_index)} "
            f"({self.max_rel:.3g} x absmax {self.scale:.3g}), cosine {self.cosine:.8f}"
        )
        if self.scale_fit:
            s += (
                f"; a pure rescaling: candidate = {self.scale_fit['scale']:.6g} x reference (rel L2 "
                f"{self.scale_fit['rel_l2_after']:.2g} after that factor)"
            )
        if self.past_window:
            w = self.past_window
            s += (
                f"; the {w['rows']} rows past the sliding window (positions >= {w['window']}) alone: rel L2 "
                f"{w['rel_l2']:.3g}, max abs / absmax {w['max_rel']:.3g}"
            )
        if self.logits:
            lg = self.logits
            s += (
                f"; KL mean {lg['kl_mean']:.3g} max {lg['kl_max']:.3g} (position {lg['kl_max_position']}), "
                f"top-1 {lg['top1']:.1%}, top-5 overlap {lg['top5']:.1%}"
            )
        return s


BLOCK_VALUES = 1 << 22  # values per float64 block: a tap is compared a block at a time, never copied whole


def value_blocks(a: np.ndarray, row: int = 1):
    """(offset, block) over a tap's values in C order, float64, BLOCK_VALUES at a time (a multiple of `row`
    values: whole rows of length `row`). A tap of one block is the whole tap: the sums below are then exactly
    the unblocked NumPy expressions."""
    flat = a.reshape(-1)
    step = max(row, BLOCK_VALUES // row * row)
    for i in range(0, flat.size, step):
        yield i, flat[i : i + step].astype(np.float64)


def count_non_finite(a: np.ndarray) -> dict | None:
    """{"nan": count, "inf": count, "first": index of the first} for an array holding NaN or Inf, else None."""
    nan = inf = 0
    first = None
    for i, block in value_blocks(a):
        bad = ~np.isfinite(block)
        if bad.any():
            n = int(np.isnan(block).sum())
            nan, inf = nan + n, inf + int(bad.sum()) - n
            first = first if first is not None else i + int(np.argmax(bad))
    if first is None:
        return None
    return {"nan": nan, "inf": inf, "first": [int(j) for j in np.unravel_index(first, a.shape)]}


def describe_non_finite(found: dict) -> str:
    """ "2 NaN and 0 Inf in the candidate, first at index (0, 5)" for each side that has them."""
    return "; ".join(
        f"{f['nan']} NaN and {f['inf']} Inf in the {side}, first at index {tuple(f['first'])}"
        for side, f in found.items()
    )


def logits_metrics(ref: np.ndarray, cand: np.ndarray, tie: float) -> dict:
    """Per-position KL(P_ref || P_cand), top-1 agreement, top-5 overlap.

    A top-1 disagreement is excused when the reference prefers its token by less than `tie` x the
    position's logit standard deviation: within the profile's tolerance the two are tied."""
    V = ref.shape[-1]
    kl, agree, exact, overlap = [], [], [], []
    for (_, r), (_, c) in zip(value_blocks(ref, V), value_blocks(cand, V)):
        r, c = r.reshape(-1, V), c.reshape(-1, V)  # a block of positions
        lr, lc = log_softmax(r), log_softmax(c)
        kl.append(np.maximum((np.exp(lr) * (lr - lc)).sum(axis=-1), 0.0))  # (positions,)
        top_r, top_c = r.argmax(-1), c.argmax(-1)
        rows = np.arange(len(r))
        gap = r[rows, top_r] - r[rows, top_c]  # how much the reference prefers its own choice
        agree.append((top_r == top_c) | (gap <= tie * r.std(axis=-1)))
        exact.append(top_r == top_c)
        k = min(5, V)
        t5r = np.argpartition(-r, k - 1, axis=-1)[:, :k]
        t5c = np.argpartition(-c, k - 1, axis=-1)[:, :k]
        overlap.append(np.array([len(set(a) & set(b)) / k for a, b in zip(t5r, t5c)]))
    kl, agree, exact, overlap = (np.concatenate(x) for x in (kl, agree, exact, overlap))
    pos = np.unravel_index(int(kl.argmax()), ref.shape[:-1])
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_max_position": [int(i) for i in pos],
        "top1": float(agree.mean()),
        "top1_exact": float(exact.mean()),
        "top1_disagreements": int((~agree).sum()),
        "top5": float(overlap.mean()),
    }


def error_sums(ref: np.ndarray, cand: np.ndarray) -> dict:
    """What compare_tap's metrics are made of, in float64, a block at a time: the largest |c - r| (Inf where
    the candidate is not finite) and its flat index, max |r|, and the dot products r.r, d.d, c.c, r.c with
    d = c - r and the candidate's non-finite values taken as 0."""
    out = {"max_abs": -1.0, "at": 0, "scale": 0.0, "rr": 0.0, "dd": 0.0, "cc": 0.0, "rc": 0.0, "bad": False}
    for (i, r), (_, c) in zip(value_blocks(ref), value_blocks(cand)):
        diff = np.abs(c - r)
        bad = ~np.isfinite(c)
        diff[bad] = np.inf
        j = int(np.argmax(diff))
        if diff[j] > out["max_abs"]:
            out["max_abs"], out["at"] = float(diff[j]), i + j
        out["scale"] = max(out["scale"], float(np.abs(r).max()))
        d, cz = np.where(bad, 0, c - r), np.where(bad, 0, c)
        out["rr"] += float(r.dot(r))
        out["dd"] += float(d.dot(d))
        out["cc"] += float(cz.dot(cz))
        out["rc"] += float(r.dot(cz))
        out["bad"] |= bool(bad.any())
    return out


def compare_tap(name: str, ref: np.ndarray, cand: np.ndarray | None, profile: Profile) -> TapResult:
    if cand is None:
        return TapResult(name, "missing", shape=list(ref.shape))
    if ref.shape != cand.shape:
        return TapResult(name, "shape", shape=list(ref.shape), candidate_shape=list(cand.shape), failed=["shape"])
    e = error_sums(ref, cand) if ref.size else None
    idx = [int(i) for i in np.unravel_index(e["at"], ref.shape)] if e else []
    max_abs, scale, bad = (e["max_abs"], e["scale"], e["bad"]) if e else (0.0, 0.0, False)
    nr, nd, nc = (math.sqrt(e[k]) for k in ("rr", "dd", "cc")) if e else (0.0, 0.0, 0.0)
    rel_l2 = math.inf if bad else (nd / nr if nr > 0 else (0.0 if nd == 0 else math.inf))
    cosine = float(e["rc"] / (nr * nc)) if nr > 0 and nc > 0 else float(nr == nc)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    res = TapResult(name, "pass", list(ref.shape), list(cand.shape), max_abs, idx, scale, max_rel, rel_l2, cosine)
    found = {side: f for side, f in (("candidate", count_non_finite(cand)), ("reference", count_non_finite(ref))) if f}
    if found:
        res.non_finite = found
        res.failed.append("non_finite")
    rel_limit, max_limit = profile.limits(name)
    if rel_l2 > rel_limit:
        res.failed.append("rel_l2")
    if max_rel > max_limit:
        res.failed.append("max_rel")
    if name == "logits" and ref.ndim >= 1 and ref.size and not bad:
        res.logits = logits_metrics(ref, cand, tie=2 * rel_limit)
        if res.logits["kl_max"] > profile.kl:
            res.failed.append("kl")
        if res.logits["top1"] < profile.top1:
            res.failed.append("top1")
        if res.logits["top5"] < profile.top5:
            res.failed.append("top5")
    if res.failed:
        res.status = "fail"
        res.scale_fit = fit_scale(name, ref, cand, profile, e) if e and not bad else None
    return res


def fit_scale(name: str, ref: np.ndarray, cand: np.ndarray, profile: Profile, sums: dict) -> dict | None:
    """The one number s with c ~ s r (least squares), when it explains the error: what is left after it is
    within the profile, or under a tenth of the error before. A wrong scale outside the catalogue (a query
    multiplied by 32 where 32^-0.5 is right) then still gets a lead. `sums`: error_sums(ref, cand)."""
    rr = sums["rr"]
    if rr == 0:
        return None
    s = sums["rc"] / rr
    before = math.sqrt(sums["dd"]) / math.sqrt(rr)
    left = sum(float(np.square(c - s * r).sum()) for (_, r), (_, c) in zip(value_blocks(ref), value_blocks(cand)))
    after = math.sqrt(left) / math.sqrt(rr)
    if abs(s - 1) < 1e-6 or after > max(profile.limits(name)[0], 0.1 * before):
        return None
    return {"scale": s, "rel_l2_after": after}


def decode_step_of(row: int, decode: dict) -> str:
    """Which forward of a decode case (manifest extra.decode) computed `row`, in words."""
    prefill, chunks = decode["prefill"], decode.get("chunks")
    if chunks is None:
        step = f"decode step {row - prefill}" if row >= prefill else "the prefill"
        return f"{step} (prefill {prefill} tokens, then one token per forward through the KV cache)"
    ends = np.cumsum(chunks)
    k = int(np.searchsorted(ends, row, side="right"))
    start = int(ends[k] - chunks[k])
    last_chunk = max(i for i in range(k + 1) if chunks[i] > 1 or i == 0)
    what = "the prefill" if k == 0 else f"chunk {k}" if chunks[k] > 1 else f"decode step {k - last_chunk - 1}"
    return (
        f"{what} (forward {k} of the chunks {', '.join(map(str, chunks[:3]))}"
        f"{', ...' if len(chunks) > 3 else ''}: positions {start}..{int(ends[k]) - 1})"
    )


def first_failing_row(ref: np.ndarray, cand: np.ndarray, rel_limit: float) -> int | None:
    """The first position (row) whose own relative L2 error exceeds the limit: in a decode case, the step."""
    row = int(np.prod(ref.shape[1:]))
    for (i, r), (_, c) in zip(value_blocks(ref, row), value_blocks(cand, row)):
        r, c = r.reshape(-1, row), c.reshape(-1, row)
        err = np.linalg.norm(c - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-30)
        bad = np.flatnonzero(~(err <= rel_limit))  # NaN counts as bad
        if len(bad):
            return i // row + int(bad[0])
    return None


def judge_rows_past_window(
    taps: list[TapResult], ref: dict, cand: dict, profile: Profile, window: int, first_position: int, batched: bool
) -> None:
    """Judge the rows at positions >= window on their own: only there does a sliding layer differ from a
    global one, and averaged with the rows before them an error there can hide (2 of 34 rows in the tiny
    model's window case). A tap whose rows past the window fail fails, with reason "past_window"."""
    for t in taps:
        if t.status != "pass" or t.name not in cand or not t.name.startswith("layers."):
            continue
        axis = sequence_axis(t.name, ref[t.name].ndim, batched)
        start = window - first_position  # the first row whose position is >= window
        if not 0 <= start < ref[t.name].shape[axis]:
            continue
        rows = [slice(None)] * ref[t.name].ndim
        rows[axis] = slice(start, None)
        part = compare_tap(t.name, ref[t.name][tuple(rows)], cand[t.name][tuple(rows)], profile)
        t.past_window = {
            "window": window,
            "rows": ref[t.name].shape[axis] - start,
            "rel_l2": part.rel_l2,
            "max_rel": part.max_rel,
        }
        if part.failed:
            t.failed.append("past_window")
            t.status = "fail"


# -- comparing cases and suites -----------------------------------------------------------------------------


@dataclass
class CaseComparison:
    reference: str
    candidate: str
    profile: Profile
    taps: list[TapResult]
    extra: list[str]  # candidate taps the reference does not have
    notes: list[str]
    input_mismatch: str | None = None
    blind_spots: list[str] | None = None  # known mistakes this case cannot show under this profile (diagnose)
    not_checked: str | None = None  # why the candidate has no such case (its backend cannot run it): no failure

    @property
    def compared(self) -> list[TapResult]:
        return [t for t in self.taps if t.status != "missing"]

    @property
    def missing(self) -> list[str]:
        return [t.name for t in self.taps if t.status == "missing"]

    @property
    def first_divergence(self) -> TapResult | None:
        return next((t for t in self.taps if not t.ok), None)

    def error_lead(self) -> TapResult | None:
        """The first tap whose error already reaches half the profile's limit, when that is before the first
        divergence: under a loose profile the end (logits) can fail first while the error grew in layer 0."""
        first = self.first_divergence
        for t in self.compared:
            if t is first:
                return None
            if t.rel_l2 is not None and t.rel_l2 >= 0.5 * self.profile.limits(t.name)[0]:
                return t
        return None

    @property
    def passed(self) -> bool:
        return bool(self.compared) and self.first_divergence is None and self.input_mismatch is None

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "passed": self.passed,
            "profile": asdict(self.profile),
            "first_divergence": first.name if first else None,
            "error_lead": (self.error_lead() or first).name if first else None,
            "input_mismatch": self.input_mismatch,
            "missing": self.missing,
            "extra": self.extra,
            "notes": self.notes,
            "blind_spots": self.blind_spots,
            "not_checked": self.not_checked,
            "taps": [asdict(t) for t in self.taps],
            "layers": layer_table(self.taps),
        }


def describe_ids_difference(ref_ids: np.ndarray, cand_ids: np.ndarray) -> str:
    """A sentence about how the candidate's token ids differ from the reference's (BOS problems first)."""
    r, c = np.atleast_2d(ref_ids), np.atleast_2d(cand_ids)
    if r.shape[0] == c.shape[0] and r.shape[1] == c.shape[1] + 1 and (r[:, 1:] == c).all() and (r[:, 0] == BOS).all():
        return "the candidate's token ids lack the leading <bos> (2) the reference has"
    if r.shape[0] == c.shape[0] and c.shape[1] == r.shape[1] + 1 and (c[:, 1:] == r).all() and (c[:, 0] == BOS).all():
        return "the candidate's token ids start with a doubled <bos> (2, 2)"
    split = split_special_token(r[0], c[0]) if r.shape[0] == c.shape[0] == 1 else None
    if split:
        return split
    if r.shape != c.shape:
        return f"the candidate ran token ids of shape {list(c.shape)}, the reference {list(r.shape)}"
    where = np.argwhere(r != c)
    return (
        f"the candidate ran different token ids ({len(where)} differ, first at index {tuple(int(i) for i in where[0])})"
    )


SPECIAL_TOKENS = {
    PAD: "<pad>",
    EOS: "<eos>",
    BOS: "<bos>",
    START_OF_TURN: "<start_of_turn>",
    END_OF_TURN: "<end_of_turn>",
}


def split_special_token(ref: np.ndarray, cand: np.ndarray) -> str | None:
    """Where the reference has a special token (one id) and the candidate, from there on, several other ids
    before the two agree again: its tokenizer does not treat the token as special (llama.cpp #8244)."""
    n = 0
    while n < min(len(ref), len(cand)) and ref[n] == cand[n]:
        n += 1
    if n == len(ref) or n == len(cand) or int(ref[n]) not in SPECIAL_TOKENS or len(cand) <= len(ref):
        return None
    after = int(ref[n + 1]) if n + 1 < len(ref) else None  # where the two realign
    ends = [
        j
        for j in range(n + 2, len(cand) + 1)
        if (after is None and j == len(cand)) or (j < len(cand) and int(cand[j]) == after)
    ]
    if not ends:
        return None
    pieces = cand[n : ends[0]]
    return (
        f"the candidate's tokenizer split {SPECIAL_TOKENS[int(ref[n])]} (id {int(ref[n])}, at index {n}) into "
        f"{len(pieces)} pieces, ids {[int(i) for i in pieces]}: it does not mark the chat tokens special "
        f"({REFS['special_tokens']}; `gemma2-ref tokenize` shows the pieces)"
    )


def compare_activations(
    ref: dict,
    cand: dict,
    profile: Profile,
    order: list[str] | None = None,
    reference="reference",
    candidate="candidate",
    ref_ids=None,
    cand_ids=None,
    notes=None,
) -> CaseComparison:
    """Compare two {tap: array} dicts in execution order (the reference's taps define what is expected)."""
    order = order or canonical_order(ref)
    taps = [compare_tap(n, ref[n], cand.get(n), profile) for n in order]
    extra = [n for n in canonical_order(cand) if n not in ref]
    mismatch = None
    if (
        ref_ids is not None
        and cand_ids is not None
        and (np.shape(ref_ids) != np.shape(cand_ids) or not np.array_equal(ref_ids, cand_ids))
    ):
        mismatch = describe_ids_difference(np.asarray(ref_ids), np.asarray(cand_ids))
    return CaseComparison(reference, candidate, profile, taps, extra, list(notes or []), mismatch)


def align_positions(ref: dict, ref_pos, cand: dict, cand_pos, batched: bool) -> tuple[dict, dict, str | None]:
    """Cut both sides to the query positions they share, when one stores only some (golden `positions`)."""
    if ref_pos is None and cand_pos is None:
        return ref, cand, None

    def span(acts, pos):
        if pos is not None:
            return tuple(pos)
        name, a = next(iter(acts.items()))
        return 0, a.shape[sequence_axis(name, a.ndim, batched)]

    (ra, rb), (ca, cb) = span(ref, ref_pos), span(cand, cand_pos)
    lo, hi = max(ra, ca), min(rb, cb)
    if lo >= hi:
        return ref, cand, f"no common positions: reference holds {ra}..{rb - 1}, candidate {ca}..{cb - 1}"
    ref = slice_positions(ref, (lo - ra, hi - ra), batched)
    cand = slice_positions(cand, (lo - ca, hi - ca), batched)
    return ref, cand, f"positions {lo}..{hi - 1} compared (what both hold)"


def slice_tokens(activations: dict, attention_mask) -> dict:
    """A padded batch's taps at its tokens only, (B, S, ...) -> (N, ...) for its N tokens: what padding rows
    hold is nobody's business. Scores and probs (B, H, S, T) keep the tokens' query rows, as (N, H, T), with
    the padding key columns zeroed (a correct model gives them probability 0, and compares the rest)."""
    if attention_mask is None:
        return activations
    mask = np.asarray(attention_mask, dtype=bool)  # (B, S)
    out = {}
    for name, a in activations.items():
        if name.endswith(LARGE_TAPS):
            a = np.where(mask[:, None, None, :], a, 0).transpose(0, 2, 1, 3)  # (B, S, H, T)
        out[name] = a[mask]
    return out


def comparable(reference: Case, acts: dict, acts_positions=None) -> tuple[dict, dict, str | None]:
    """The reference's taps and `acts` cut to what both hold: the same query positions, and for a padded
    batch the tokens only. Returns (reference view, acts view, a note or None)."""
    ref_view, view, note = align_positions(
        reference.activations, reference.positions, acts, acts_positions, reference.batched
    )
    if reference.attention_mask is not None and reference.positions is None and acts_positions is None:
        ref_view, view = slice_tokens(ref_view, reference.attention_mask), slice_tokens(view, reference.attention_mask)
        note = f"padded batch: the {int(reference.attention_mask.sum())} tokens' rows compared, not the padding"
    return ref_view, view, note


def check_compare_arguments(ref, cand, profile) -> None:
    """compare_cases' arguments are what it compares: two loaded cases and a profile (or a function giving one)."""
    for what, value in (("reference", ref), ("candidate", cand)):
        if not isinstance(value, Case):
            raise TypeError(
                f"compare_cases: the {what} is {type(value).__name__} {value!r:.60}, expected a golden "
                f"Case: load it first with gemma2_ref.golden.load_golden(path)"
            )
    if not (isinstance(profile, Profile) or callable(profile)):
        raise TypeError(
            f"compare_cases: the profile is {type(profile).__name__} {profile!r:.60}, expected a Profile "
            f"(gemma2_ref.compare.PROFILES['fp32'] or get_profile(name, ...)) or a function of the "
            f"reference case giving one"
        )


def refuse_non_finite_reference(result: CaseComparison) -> None:
    """A reference golden is never NaN or Inf (the reference refuses to produce one): name its first such tap."""
    bad = next((t for t in result.taps if t.non_finite and "reference" in t.non_finite), None)
    if bad is not None:
        f = bad.non_finite["reference"]
        raise GoldenError(
            f"{result.reference}: the reference holds non-finite values, first at tap {bad.name!r} "
            f"({f['nan']} NaN and {f['inf']} Inf, the first at index {tuple(f['first'])}): it is not "
            f"a golden gemma2-ref wrote; regenerate it with `gemma2-ref golden`"
        )


def compare_cases(ref: Case, cand: Case, profile) -> CaseComparison:
    """`profile`: a Profile, or a function of the reference case giving one (the measured profile)."""
    check_compare_arguments(ref, cand, profile)
    profile = profile if isinstance(profile, Profile) else profile(ref)
    notes = list(cand.notes)
    if not ref.verified:
        notes.append("the reference was not hash-verified (no manifest, token ids unknown)")
    if not cand.verified:
        notes.append("the candidate was not hash-verified")
    ref_acts, cand_acts, note = comparable(ref, cand.activations, cand.positions)
    if note:
        notes.append(note)
    result = compare_activations(
        ref_acts, cand_acts, profile, ref.tap_names, str(ref.path), str(cand.path), ref.token_ids, cand.token_ids, notes
    )
    refuse_non_finite_reference(result)
    config = (ref.manifest.get("model") or {}).get("config") or {}
    if config.get("sliding_window") and ref.attention_mask is None:
        first_position = max((ref.positions or (0, 0))[0], (cand.positions or (0, 0))[0])
        judge_rows_past_window(
            result.taps, ref_acts, cand_acts, profile, int(config["sliding_window"]), first_position, ref.batched
        )
    first = result.first_divergence
    decode = (ref.manifest.get("extra") or {}).get("decode")
    if first is not None and decode and first.status == "fail" and not ref.batched and ref.positions is None:
        row = first_failing_row(ref_acts[first.name], cand_acts[first.name], profile.limits(first.name)[0])
        if row is not None:
            result.notes.append(f"{first.name} first fails at position {row}: {decode_step_of(row, decode)}")
    if first is not None and first.scale_fit and first.name.endswith("attn.scores") and config:
        implied = float(config["query_pre_attn_scalar"]) / first.scale_fit["scale"] ** 2
        result.notes.append(
            f"{first.name} is the reference's scores times {first.scale_fit['scale']:.6g}: the "
            f"candidate scales queries by query_pre_attn_scalar = {implied:.4g} (the reference's "
            f"is {config['query_pre_attn_scalar']:g})"
        )
    return result


def compare_goldens(ref: Case | Suite, cand: Case | Suite, profile, log=None) -> list[CaseComparison]:
    """Case vs case, or suite vs suite case by case (a case missing from the candidate suite fails, unless its
    suite.json says why its backend could not write it: then it is not checked). `log(line)`: progress."""
    pairs = case_pairs(ref, cand)
    if isinstance(ref, Case):
        return [compare_cases(ref, cand, profile)]
    out = []
    for n, (case, theirs, skipped) in enumerate(pairs):
        if log is not None:
            log(f"case {n + 1}/{len(pairs)} {case.name}: comparing")
        if theirs is not None:
            out.append(compare_cases(case, theirs, profile))
        elif skipped is not None:
            out.append(
                CaseComparison(
                    str(case.path),
                    f"{cand.path}/{case.name}",
                    profile,
                    [],
                    [],
                    [],
                    not_checked=f"the candidate has no `{case.name}` case ({skipped})",
                )
            )
        else:
            out.append(
                CaseComparison(
                    str(case.path),
                    f"{cand.path}/{case.name}",
                    profile,
                    [],
                    [],
                    [f"case {case.name!r} is missing from the candidate suite"],
                )
            )
    return out


# -- reports ----------------------------------------------------------------------------------------------


def layer_table(taps: list[TapResult]) -> list[dict]:
    """One row per layer (embed, 0..N-1, final): taps compared / failed, worst rel L2 and max/absmax."""
    rows: dict[str, dict] = {}
    for t in taps:
        key = t.layer if t.layer.isdigit() else ("embed" if t.name == "embed" else "final")
        row = rows.setdefault(
            key,
            {
                "layer": key,
                "compared": 0,
                "failed": 0,
                "missing": 0,
                "worst_rel_l2": 0.0,
                "worst_max_rel": 0.0,
                "first_failure": None,
            },
        )
        if t.status == "missing":
            row["missing"] += 1
            continue
        row["compared"] += 1
        if not t.ok:
            row["failed"] += 1
            row["first_failure"] = row["first_failure"] or t.name
        if t.non_finite:
            row["non_finite"] = True
        if t.rel_l2 is not None:
            row["worst_rel_l2"] = max(row["worst_rel_l2"], t.rel_l2)
            row["worst_max_rel"] = max(row["worst_max_rel"], t.max_rel)
        elif t.status == "shape":
            row["worst_rel_l2"] = row["worst_max_rel"] = math.inf
    return list(rows.values())


def group_names(names: list[str]) -> str:
    """layers.0.attn.q_rope, layers.1.attn.q_rope, layers.0.input, ... -> 'layers.*.{attn.q_rope, input} (2 each)'."""
    per_layer: dict[str, int] = {}
    others = []
    for n in names:
        m = re.fullmatch(r"layers\.\d+\.(.+)", n)
        if m:
            per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + 1
        else:
            others.append(n)
    parts = []
    counts = sorted(set(per_layer.values()))
    if len(counts) == 1 and len(per_layer) > 1:
        parts.append(f"layers.*.{{{', '.join(per_layer)}}} ({counts[0]} each)")
    else:
        parts += [f"layers.*.{k} ({v})" if v > 1 else f"layers.*.{k}" for k, v in per_layer.items()]
    return ", ".join(parts + others)


def wrap(line: str, indent: int = 11, width: int = 110) -> str:
    return textwrap.fill(
        line, width=width, subsequent_indent=" " * indent, break_long_words=False, break_on_hyphens=False
    )


def format_report(result: CaseComparison, all_taps: bool = False) -> str:
    """The text report of one case: what was compared, the per-layer table, the logits, the verdict."""
    lines = report_header(result)
    if result.not_checked:
        return "\n".join([*lines, f"NOT CHECKED: {result.not_checked}"])
    if not result.taps:
        return "\n".join([*lines, "FAIL: nothing to compare"])
    lines += ["", *layer_table_lines(result)]
    if all_taps:
        lines += ["", "per tap, execution order:"] + [
            f"  {'ok  ' if t.ok else 'FAIL'} {t.summary()}" for t in result.taps if t.status != "missing"
        ]
    logits = next((t for t in result.taps if t.name == "logits" and t.logits), None)
    if logits:
        lines += ["", logits_line(logits.logits)]
    return "\n".join([*lines, "", *verdict_lines(result)])


def report_header(result: CaseComparison) -> list[str]:
    """Which goldens, which profile, which taps were compared, and the notes."""
    lines = [
        f"reference  {result.reference}",
        f"candidate  {result.candidate}",
        wrap(f"profile    {result.profile.describe()}"),
    ]
    lines.append(
        wrap(
            f"taps       {len(result.compared)} compared of {len(result.taps)} in the reference"
            + (f"; missing from the candidate: {group_names(result.missing)}" if result.missing else "")
        )
    )
    if result.extra:
        lines.append(wrap(f"           not in the reference (ignored): {group_names(result.extra)}"))
    lines += [f"note       {note}" for note in result.notes]
    if result.input_mismatch:
        lines.append(f"INPUT      {result.input_mismatch}")
    return lines


def layer_table_lines(result: CaseComparison) -> list[str]:
    """One row per layer: taps compared, failed, the worst errors, the first failing tap."""
    lines = [
        f"{'layer':>6}  {'taps':>5}  {'failed':>6}  {'worst rel L2':>12}  {'worst max/absmax':>16}  first failing tap"
    ]
    for row in layer_table(result.taps):
        if row["compared"] == 0:
            lines.append(f"{row['layer']:>6}  {0:>5}  {'':>6}  {'(not in candidate)':>12}")
            continue
        lines.append(
            f"{row['layer']:>6}  {row['compared']:>5}  {row['failed']:>6}  "
            f"{number_cell(row, 'worst_rel_l2', 12)}  "
            f"{number_cell(row, 'worst_max_rel', 16)}  {row['first_failure'] or ''}"
        )
    return lines


def logits_line(lg: dict) -> str:
    """KL, top-1 and top-5 agreement of the output distributions."""
    return wrap(
        f"logits: KL mean {lg['kl_mean']:.3g} max {lg['kl_max']:.3g} nats (position "
        f"{lg['kl_max_position']}); top-1 agreement {lg['top1']:.1%} ({lg['top1_disagreements']} "
        f"disagreement(s) beyond ties; exact {lg['top1_exact']:.1%}); top-5 overlap "
        f"{lg['top5']:.1%}",
        8,
    )


def verdict_lines(result: CaseComparison) -> list[str]:
    """The first non-finite tap, then PASS (and what the case cannot show) or FAIL at the first divergence."""
    p, first, lines = result.profile, result.first_divergence, []
    non_finite = next((t for t in result.taps if t.non_finite), None)
    if non_finite is not None:
        lines.append(
            wrap(
                f"NON-FINITE the candidate's first tap holding NaN or Inf is {non_finite.name}: "
                f"{describe_non_finite(non_finite.non_finite)}",
                11,
            )
        )
    if result.passed:
        lines.append(f"PASS: {len(result.compared)} taps within the {p.name} profile")
        if result.blind_spots:
            lines.append(
                wrap(
                    f"      but this case cannot show, under this profile: {', '.join(result.blind_spots)} "
                    f"(each made by the reference model passes too)",
                    6,
                )
            )
    elif first is None:
        lines.append("FAIL: " + (result.input_mismatch or "nothing was compared"))
    else:
        where = f"layer {first.layer}, {first.name.split('.', 2)[2]}" if first.layer.isdigit() else first.name
        lines.append(
            wrap(f"FAIL: first diverging tap: {first.name} ({where}): " + "; ".join(failure_reasons(first, p)), 6)
        )
        lines.append(wrap(f"      {first.summary()}", 6))
        lead = result.error_lead()
        if lead is not None:
            lines.append(
                wrap(
                    f"      the error grew earlier: {lead.name} already has rel L2 {lead.rel_l2:.3g} (half "
                    f"the limit or more): look there first",
                    6,
                )
            )
    return lines


def number_cell(row: dict, key: str, width: int) -> str:
    """A layer table cell: the worst error, or, where it is not a number, why ("NaN/Inf": a tap holds them;
    "shape": shapes differ), never a bare "inf"."""
    value = row[key]
    if math.isfinite(value):
        return f"{value:>{width}.3g}"
    return f"{'NaN/Inf' if row.get('non_finite') else 'shape':>{width}}"


def failure_reasons(t: TapResult, p: Profile) -> list[str]:
    """Why a tap failed, one phrase per exceeded limit."""
    out = []
    for f in t.failed:
        if f in ("rel_l2", "max_rel") and "non_finite" in t.failed:
            continue  # an error with NaN / Inf in it is not a number: where they are is the reason
        if f == "non_finite":
            out.append(describe_non_finite(t.non_finite))
        elif f == "shape":
            out.append(f"shape {t.candidate_shape} in the candidate, {t.shape} in the reference")
        elif f == "rel_l2":
            out.append(f"rel L2 {t.rel_l2:.3g} > {p.limits(t.name)[0]:.3g}")
        elif f == "max_rel":
            out.append(f"max abs / absmax {t.max_rel:.3g} > {p.limits(t.name)[1]:.3g}")
        elif f == "kl":
            out.append(f"KL {t.logits['kl_max']:.3g} > {p.kl:g}")
        elif f == "top1":
            out.append(f"top-1 agreement {t.logits['top1']:.1%} < {p.top1:.0%}")
        elif f == "top5":
            out.append(f"top-5 overlap {t.logits['top5']:.1%} < {p.top5:.0%}")
        elif f == "past_window":
            w = t.past_window
            out.append(
                f"rows past the sliding window (positions >= {w['window']}) alone: rel L2 {w['rel_l2']:.3g} "
                f"/ max {w['max_rel']:.3g} (limits {p.limits(t.name)[0]:.3g} / {p.limits(t.name)[1]:.3g})"
            )
    return out


def json_safe(obj):
    """Strict JSON: infinities and NaN (e.g. the error of a non-finite candidate) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_json(results: list[CaseComparison], extra: dict | None = None) -> str:
    body = {
        "passed": all(r.passed or r.not_checked for r in results),
        "cases": [r.to_dict() for r in results],
        **(extra or {}),
    }
    return json.dumps(json_safe(body), indent=1, allow_nan=False)

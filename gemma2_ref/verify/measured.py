"""The `measured` tolerance profile: limits set from the reference's own rounding error, not by hand.

Fixed profiles (compare.PROFILES) carry one limit for every tap, and real projects bump such limits by hand
when a deeper model exceeds them (MaxText gemma-2b 0.01 -> 0.015). Here the reference re-runs the same case
with every intermediate rounded to the candidate's activation dtype as it is produced (model.forward's
`round_to`: what a backend storing activations in bfloat16 or float16 does) and measures, tap by tap, how
far that lands from the float32 golden. Each tap's limit is a stated multiple of that error:

    rel L2            MARGIN_REL_L2 x measured   (at least the fp32 profile's limit)
    max abs / absmax  MARGIN_MAX x measured      (at least the fp32 profile's limit)
    logits KL         MARGIN_KL x measured max KL (at least 1e-6 nats)
    top-1, top-5      measured agreement - SLACK_AGREEMENT

Measured against transformers on the bundled tiny model and random 12- and 26-layer models (eager, in
bfloat16 and float16, against our float32): its error over the emulation's, per tap, has a median of 1.0
to 1.1; at worst 1.5 for rel L2, 3.7 for max abs, 3.5 for the logits' KL. The margins cover that, twice.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .compare import PROFILES, Profile, compare_activations

MARGIN_REL_L2 = 4.0
MARGIN_MAX = 8.0
MARGIN_KL = 10.0
SLACK_AGREEMENT = 0.1
DTYPE_OF_PROFILE = {"bf16": "bfloat16", "fp16": "float16"}


def measured_profile(model, reference, dtype: str = "bfloat16") -> Profile:
    """Per-tap limits for comparing a `dtype` candidate with `reference` (a golden Case of `model`)."""
    from ..model.inputs import padded_positions
    from .compare import comparable

    floor = PROFILES["fp32"]
    wanted = [n for n in reference.tap_names if n in reference.activations]
    mask = reference.attention_mask
    emulated = model.forward(
        reference.token_ids, taps=wanted, round_to=dtype, positions=None if mask is None else padded_positions(mask)
    )
    ref, emulated, _ = comparable(reference, emulated)
    result = compare_activations(ref, emulated, floor)
    fixed = PROFILES["bf16" if dtype == "bfloat16" else "fp16"]
    per_tap = {
        t.name: (max(MARGIN_REL_L2 * t.rel_l2, floor.rel_l2), max(MARGIN_MAX * t.max_rel, floor.max_rel))
        if math.isfinite(t.rel_l2) and math.isfinite(t.max_rel)
        else (fixed.rel_l2, fixed.max_rel)  # the emulation overflowed here (float16): no measurement
        for t in result.compared
        if t.rel_l2 is not None
    }
    logits = next((t.logits for t in result.compared if t.name == "logits" and t.logits), None)
    base = replace(
        fixed,
        name=f"measured-{dtype}",
        why=f"each tap's limit {MARGIN_REL_L2:g}x (rel L2) and {MARGIN_MAX:g}x (max abs) the error of "
        f"the reference re-run with {dtype} rounding after every operation (gemma2_ref.measured)",
    )
    if logits:
        base = replace(
            base,
            kl=max(MARGIN_KL * logits["kl_max"], 1e-6),
            top1=max(0.0, logits["top1"] - SLACK_AGREEMENT),
            top5=max(0.0, logits["top5"] - SLACK_AGREEMENT),
        )
    return replace(base, per_tap=per_tap)

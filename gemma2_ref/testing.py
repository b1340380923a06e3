"""For other projects' test suites: assert that a backend's activations match a gemma2_ref golden.

    from gemma2_ref.testing import assert_matches_golden

    def test_my_backend_matches_gemma2_ref():
        acts = my_backend.run(ids, capture=True)        # {canonical tap name: array}, any subset of taps
        assert_matches_golden("golden/window", acts, profile="bf16", token_ids=ids)

On failure the AssertionError message is `gemma2-ref compare`'s report: the first diverging tap, its metrics
and a per-layer table. NumPy only.
"""

from __future__ import annotations

import numpy as np

from .compare import CaseComparison, align_positions, compare_activations, format_report, get_profile
from .golden import Case, apply_name_map, load_golden


def assert_matches_golden(golden_dir, activations: dict, profile: str = "fp32", token_ids=None, name_map=None,
                          **overrides) -> CaseComparison:
    """Compare `activations` ({tap: array}; only the taps you have) with the golden case at `golden_dir`.

    profile: "fp32", "bf16", "fp16" or "q8"; overrides: rel_l2=, max_rel=, kl=, top1=, top5=.
    token_ids: the ids your backend ran (checked against the golden's, so a missing <bos> is named).
    name_map: your tensor names -> canonical names (see gemma2_ref.golden.apply_name_map).
    Returns the comparison when it passes; raises AssertionError with the report when it does not."""
    reference = load_golden(golden_dir)
    if not isinstance(reference, Case):
        raise ValueError(f"{golden_dir} is a suite: pass one of its case directories")
    acts = {name: np.asarray(a) for name, a in apply_name_map(activations, name_map).items()}
    unknown = [n for n in acts if n not in reference.activations]
    ref_acts, acts, _ = align_positions(reference.activations, reference.positions, acts, None, reference.batched)
    result = compare_activations(ref_acts, acts, get_profile(profile, **overrides),
                                 reference.tap_names, str(reference.path), "activations under test",
                                 reference.token_ids, None if token_ids is None else np.asarray(token_ids))
    if not result.compared:
        raise AssertionError(f"none of the {len(acts)} given activations is a tap of {reference.path} "
                             f"(given: {unknown[:5]}...); use canonical names such as 'layers.0.output' or "
                             f"pass name_map=")
    if not result.passed:
        raise AssertionError("activations do not match the golden\n" + format_report(result))
    return result

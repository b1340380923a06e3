"""For other projects' test suites: assert that a backend's activations match a gemma2_ref golden.

    from gemma2_ref.testing import assert_matches_golden

    def test_my_backend_matches_gemma2_ref():
        acts = my_backend.run(ids, capture=True)        # {canonical tap name: array}, any subset of taps
        assert_matches_golden("golden/window", acts, profile="bf16", token_ids=ids)

On failure the AssertionError message is `gemma2-ref compare`'s report: the first diverging tap, its metrics
and a per-layer table, and (when the golden's model is at hand and small) the diagnosis: which known Gemma 2
mistake the activations look like. NumPy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .compare import CaseComparison, format_report, get_profile
from .diagnose import compare_and_diagnose, format_diagnosis
from .golden import FORMAT_VERSION, Case, load_golden
from .names import apply_name_map


def assert_matches_golden(
    golden_dir,
    activations: dict,
    profile: str = "fp32",
    token_ids=None,
    name_map=None,
    diagnose: bool | None = None,
    **overrides,
) -> CaseComparison:
    """Compare `activations` ({tap: array}; only the taps you have) with the golden case at `golden_dir`.

    profile: "fp32", "bf16", "fp16" or "q8"; overrides: rel_l2=, max_rel=, kl=, top1=, top5=.
    token_ids: the ids your backend ran (checked against the golden's, so a missing <bos> is named).
    name_map: your tensor names -> canonical names (see gemma2_ref.adapters.names.apply_name_map).
    diagnose: on failure, re-run the golden's model with each known mistake: None (default) when the model
    is small, True always, False never. Returns the comparison when it passes; raises AssertionError with
    the report when it does not."""
    reference = load_golden(golden_dir)
    if not isinstance(reference, Case):
        raise ValueError(f"{golden_dir} is a suite: pass one of its case directories")
    acts = {name: np.asarray(a) for name, a in apply_name_map(activations, name_map).items()}
    unknown = [n for n in acts if n not in reference.activations]
    if len(unknown) == len(acts):
        raise AssertionError(
            f"none of the {len(acts)} given activations is a tap of {reference.path} "
            f"(given: {unknown[:5]}...); use canonical names such as 'layers.0.output' or "
            f"pass name_map="
        )
    ids = None if token_ids is None else np.asarray(token_ids).tolist()
    candidate = Case(
        Path("activations under test"),
        {"format_version": FORMAT_VERSION, "producer": {"name": "activations under test"}, "input": {"token_ids": ids}},
        acts,
    )
    results, diagnoses, _ = compare_and_diagnose(reference, candidate, get_profile(profile, **overrides), diagnose)
    result = results[0]
    if not result.passed:
        report = format_report(result)
        if result.reference in diagnoses:
            report += "\n\n" + format_diagnosis(diagnoses[result.reference])
        raise AssertionError("activations do not match the golden\n" + report)
    return result

"""The decode case: a prefill, then one token per forward through the KV cache, every tap's rows stacked so
that row prefill + k is decode step k. transformers' own cache path passes it; a decode loop whose
positions stop advancing fails at the step where they do, and the report names that step."""

import numpy as np

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref.adapters import transformers as adapter
from gemma2_ref.compare import PROFILES, compare_cases, format_report
from gemma2_ref.generate import decode_taps

TINY = g2.bundled_path("tiny")
FP32 = PROFILES["fp32"]


def test_the_cache_path_equals_the_full_forward_row_by_row():
    model = g2.load_model("tiny")
    case = G.load_case("golden/decode")
    assert case.manifest["extra"]["decode"] == {**case.manifest["extra"]["decode"], "prefill": 40, "steps": 64}
    full = model.forward(case.token_ids, taps="residual")
    cached = decode_taps(model, case.token_ids, 40, "residual")
    for name in full:
        np.testing.assert_allclose(cached[name], full[name], rtol=2e-5, atol=2e-5)


def test_transformers_own_kv_cache_decode_passes_the_fp32_profile(tmp_path):
    case = G.load_case("golden/decode")
    cand = G.load_case(adapter.write_golden(TINY, case.token_ids, tmp_path / "hf", prefill=40))
    result = compare_cases(case, cand, FP32)
    assert result.passed, format_report(result)
    assert cand.manifest["extra"]["decode"]["steps"] == 64


def test_positions_that_stop_advancing_in_the_decode_loop_are_found_at_their_step(tmp_path):
    case = G.load_case("golden/decode")
    stuck = [[list(range(40))]] + [[[40]]] * 64  # every decode step at position 40
    cand = G.load_case(adapter.write_golden(TINY, case.token_ids, tmp_path / "hf", prefill=40, position_ids=stuck))
    result = compare_cases(case, cand, FP32)
    assert not result.passed
    assert any("first fails at position 41: decode step 1" in n for n in result.notes), result.notes

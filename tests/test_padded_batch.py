"""Padded batches: each row at its own positions, padding never attended. Checked against transformers with an
attention mask (and position ids from it, as its generate() makes them); the two ways transformers users got
it wrong (transformers #32848: only the last row right) are named by diagnose."""

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref.adapters import transformers as adapter
from gemma2_ref.compare import PROFILES, compare_cases, format_report
from gemma2_ref.diagnose import diagnose, format_diagnosis
from gemma2_ref.inputs import EMPTY, pad_batch, padded_positions

TINY = g2.bundled_path("tiny")
FP32 = PROFILES["fp32"]


def test_each_row_of_a_padded_batch_equals_that_prompt_run_alone():
    model = g2.load_model("tiny")
    rows = [[2, 651, 700, 800, 900, 1000, 1200], [2, 500, 600]]
    for side in ("left", "right"):
        ids, mask = pad_batch(rows, side=side)
        assert padded_positions(mask)[1].tolist() == (
            [EMPTY] * 4 + [0, 1, 2] if side == "left" else [0, 1, 2] + [EMPTY] * 4
        )
        logits = model.forward(ids, positions=padded_positions(mask))["logits"]
        for b, row in enumerate(rows):
            alone = model.logits(row)
            np.testing.assert_allclose(logits[b][mask[b].astype(bool)], alone, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["padded_batch", "padded_batch_right"])
def test_transformers_with_the_attention_mask_passes_the_fp32_profile(case, tmp_path):
    reference = G.load_case(f"golden/{case}")
    cand = G.load_case(
        adapter.write_golden(
            TINY, reference.token_ids, tmp_path / "hf", taps="all", attention_mask=reference.attention_mask.astype(int)
        )
    )
    result = compare_cases(reference, cand, FP32)
    assert result.passed, format_report(result)
    assert any("padded batch" in n for n in result.notes)


def test_a_batch_run_without_its_padding_mask_in_transformers_is_named(tmp_path):
    reference = G.load_case("golden/padded_batch")
    cand = G.load_case(adapter.write_golden(TINY, reference.token_ids, tmp_path / "hf", taps="default"))
    diag = diagnose(g2.load_model("tiny"), reference, cand, FP32)
    assert not diag.base.passed
    assert diag.named and diag.named[0].variant.name == "padding_not_masked", format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)


def test_positions_counted_from_the_padding_change_only_the_rotated_queries_and_keys(tmp_path):
    """RoPE makes every score a function of m - n: a left-padded row whose positions start at its padding
    (not at its first token) gives the same attention, context and logits, in transformers and here. Only
    q_rope / k_rope, the absolute rotations, differ; so this is no mistake for a prefill, and not named."""
    reference = G.load_case("golden/padded_batch")
    S = reference.token_ids.shape[1]
    cand = G.load_case(
        adapter.write_golden(
            TINY,
            reference.token_ids,
            tmp_path / "hf",
            taps="default",
            attention_mask=reference.attention_mask.astype(int),
            position_ids=np.tile(np.arange(S), (2, 1)),
        )
    )
    assert compare_cases(reference, cand, FP32).passed  # transformers exposes no q_rope / k_rope
    mask = reference.attention_mask
    ours = g2.load_model("tiny").forward(
        reference.token_ids, taps="default", positions=np.where(mask, np.arange(S), EMPTY)
    )
    result = compare_cases(
        reference,
        G.load_case(G.write_case(tmp_path / "ours", ours, reference.token_ids, attention_mask=mask.astype(int))),
        FP32,
    )
    failing = {t.name.split(".", 2)[-1] for t in result.taps if not t.ok}
    assert failing == {"attn.q_rope", "attn.k_rope"}, failing

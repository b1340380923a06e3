"""What the real backends taught compare: an error hiding in a few rows, an error that grew upstream of where
it first fails, a wrong scale outside the catalogue, a PASS that could not have seen a mistake, and a partial
explanation that says what is left (issue "Real backends, checked for real")."""

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.compare import PROFILES, compare_cases, format_report
from gemma2_ref.diagnose import compare_and_diagnose, diagnose, format_diagnosis
from gemma2_ref.mistakes import inject

W = 32  # the tiny model's sliding window


@pytest.fixture(scope="module")
def tiny():
    return g2.load_model("tiny")


@pytest.fixture(scope="module")
def window_ids():
    return G.load_case("golden/window").token_ids  # W + 2 tokens


@pytest.fixture(scope="module")
def reference(tiny, window_ids, tmp_path_factory):
    return G.load_case(
        S.generate_case(
            tiny, window_ids, tmp_path_factory.mktemp("ref") / "case", taps="all", info=G.model_info(tiny, "tiny")
        )
    )


def candidate(tmp_path, acts, ids, name="cand"):
    return G.load_case(G.write_case(tmp_path / name, acts, ids))


def test_an_error_only_in_the_rows_past_the_window_fails_on_those_rows(reference, tmp_path):
    acts = dict(reference.activations)
    ctx = acts["layers.0.attn.context"].copy()
    ctx[W:] *= 1 + 1e-4  # the 2 rows past the window: 1e-4 there, 2.4e-5 over the whole tap
    acts["layers.0.attn.context"] = ctx
    result = compare_cases(reference, candidate(tmp_path, acts, reference.token_ids), PROFILES["fp32"])
    first = result.first_divergence
    assert first.name == "layers.0.attn.context" and first.failed == ["past_window"]
    assert first.rel_l2 < PROFILES["fp32"].rel_l2 < first.past_window["rel_l2"]
    assert "rows past the sliding window (positions >= 32) alone" in format_report(result)


def test_a_pass_says_which_known_mistakes_it_could_not_have_seen(tiny, reference, tmp_path):
    """mlx-lm without a sliding window passed the bf16 profile on the window case: the PASS now says so."""
    acts = inject(tiny, "no_sliding_window").forward(reference.token_ids, taps="default")
    cand = candidate(tmp_path, acts, reference.token_ids)
    results, _, _ = compare_and_diagnose(reference, cand, PROFILES["bf16"])
    assert results[0].passed and "no_sliding_window" in results[0].blind_spots
    assert "cannot show, under this profile: " in " ".join(format_report(results[0]).split())
    results, _, _ = compare_and_diagnose(reference, cand, PROFILES["fp32"])
    assert not results[0].passed  # a float32 run of the same backend shows it


def test_the_error_lead_points_upstream_of_a_late_first_divergence(reference, tmp_path):
    """A q8_0 GGUF failed first at `logits` while its error had grown in layer 0 (0.165 < q8's 0.25)."""
    rng = np.random.default_rng(0)
    acts = dict(reference.activations)
    out = acts["layers.0.mlp.out"]
    acts["layers.0.mlp.out"] = out + 0.2 * np.linalg.norm(out) / np.sqrt(out.size) * rng.standard_normal(out.shape)
    acts["logits"] = acts["logits"] + 3 * rng.standard_normal(acts["logits"].shape)
    result = compare_cases(reference, candidate(tmp_path, acts, reference.token_ids), PROFILES["q8"])
    assert result.first_divergence.name == "logits"
    assert result.error_lead().name == "layers.0.mlp.out"
    assert "the error grew earlier: layers.0.mlp.out" in format_report(result)


def test_a_wrong_scale_outside_the_catalogue_is_reported_with_its_factor_and_implied_scalar(tiny, reference, tmp_path):
    """gemma's BY_EMBED_DIM_DIV_NUM_HEADS-style slip: a query scale no catalogue entry has (here 1.5 x)."""
    acts = dict(reference.activations)
    acts["layers.0.attn.scores"] = acts["layers.0.attn.scores"] * 1.5
    result = compare_cases(reference, candidate(tmp_path, acts, reference.token_ids), PROFILES["fp32"])
    first = result.first_divergence
    assert first.name == "layers.0.attn.scores" and first.scale_fit["scale"] == pytest.approx(1.5, rel=1e-6)
    implied = tiny.config.query_pre_attn_scalar / 1.5**2
    assert f"query_pre_attn_scalar = {implied:.4g}" in " ".join(result.notes)


def test_a_partial_explanation_says_what_remains(tiny, reference, tmp_path):
    """A mistake plus bfloat16-like noise: the mistake explains the first divergence, and what is left after
    it passes a looser profile (precision), instead of stopping at "the divergence moves on"."""
    rng = np.random.default_rng(1)
    acts = inject(tiny, "query_scale=head_dim").forward(reference.token_ids, taps="default")
    noisy = {
        n: a if n.startswith(("embed", "layers.0.")) else a * (1 + 3e-3 * rng.standard_normal(a.shape))
        for n, a in acts.items()
    }
    cand = candidate(tmp_path, noisy, reference.token_ids)
    diag = diagnose(tiny, reference, cand, PROFILES["fp32"])
    best = diag.named[0]
    assert best.variant.name.startswith("query_scale=head_dim") and best.verdict == "explains the first divergence"
    assert best.remains == "fp16"
    assert "what remains passes the fp16 profile: precision" in " ".join(format_diagnosis(diag).split())


def test_a_candidate_tokenizer_that_splits_a_special_token_is_told_so(tiny, tmp_path):
    """llama.cpp #8244: converted tokenizers that did not mark <start_of_turn> special split it in pieces."""
    reference = G.load_case("golden/special_tokens")
    ids = reference.token_ids.tolist()
    at = ids.index(106)
    split = ids[:at] + [60, 61, 62, 63] + ids[at + 1 :]  # "<", "start", "_of_", "turn>" in some tokenizer
    cand = candidate(tmp_path, tiny.forward(np.array(split), taps="residual"), np.array(split))
    result = compare_cases(reference, cand, PROFILES["fp32"])
    assert not result.passed
    assert result.input_mismatch.startswith(
        f"the candidate's tokenizer split <start_of_turn> (id 106, at index {at}) into 4 pieces, ids [60, 61, 62, 63]"
    )

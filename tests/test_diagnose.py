"""Each known Gemma 2 mistake: a candidate made with it fails `compare` at the tap where the mistake first
acts, and `diagnose` names it, from the candidate's activations alone."""

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.checkpoints import random_weights, save_checkpoint
from gemma2_ref.cli import main as cli
from gemma2_ref.compare import PROFILES, compare_cases
from gemma2_ref.diagnose import diagnose, format_diagnosis, load_reference_model
from gemma2_ref.mistakes import combine, find, inject, known_mistakes

W = 8  # sliding window of the test model
# A small model where every mistake is visible: query_pre_attn_scalar (24) != head_dim (16) != D/H (18),
# and sqrt(D) = sqrt(72) = 8.485 rounds to 8.5 in bfloat16.
CFG = g2.PRESETS["tiny"].replace(
    vocab_size=512,
    hidden_size=72,
    intermediate_size=144,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=W,
    max_position_embeddings=64,
)
FP32 = PROFILES["fp32"]

# mistake -> the tap where it first acts (with the "default" taps; attn.probs when "all" taps are stored)
CASES = {
    "drop_attn_softcap": "layers.0.attn.context",
    "drop_final_softcap": "logits",
    "no_sliding_window": "layers.0.attn.context",
    "window_offset=+1": "layers.0.attn.context",
    "window_offset=-1": "layers.0.attn.context",
    "query_scale=head_dim (16)": "layers.0.attn.context",
    "query_scale=224": "layers.0.attn.context",
    "normalizer_dtype=bfloat16": "embed",
    "norm_offset=0": "layers.0.pre_attn_norm",
    "norm_offset=2": "layers.0.pre_attn_norm",
    "exact_gelu": "layers.0.mlp.hidden",
    "no_post_attn_norm": "layers.0.post_attn_norm",
    "no_post_ffw_norm": "layers.0.post_ffw_norm",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = save_checkpoint(tmp_path_factory.mktemp("diag_model"), CFG, random_weights(CFG, seed=5, scale=2.0), "F32")
    return g2.load_model(d)


def ids_of(n: int, seed: int = 0) -> np.ndarray:
    return np.concatenate([[2], np.random.default_rng(seed).integers(3, CFG.vocab_size, n - 1)])


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """A golden past the window: positions up to W + 3."""
    out = tmp_path_factory.mktemp("ref") / "case"
    return G.load_case(S.generate_case(model, ids_of(W + 4), out, taps="default"))


def candidate(model, tmp_path, ids, mistake, taps="default"):
    """What a backend with this mistake would write: its activations and the ids it ran, nothing else."""
    return G.load_case(
        G.write_case(tmp_path / "cand", inject(model, mistake).forward(ids, taps=taps), ids, producer="some backend")
    )


@pytest.mark.parametrize("name", list(CASES))
def test_each_mistake_fails_where_it_first_acts_and_is_named(model, reference, tmp_path, name):
    first_tap = CASES[name]
    cand = candidate(model, tmp_path, reference.token_ids, name)
    result = compare_cases(reference, cand, FP32)
    assert not result.passed
    assert result.first_divergence.name == first_tap
    if "window" in name:  # the window mistakes change only queries that reach the window's edge
        assert result.first_divergence.max_abs_index[0] >= W - 1
    diag = diagnose(model, reference, cand, FP32)
    assert diag.named[0].variant.name == name, format_diagnosis(diag)
    assert diag.named[0].verdict == "matches"


@pytest.mark.parametrize("name", ["no_sliding_window", "window_offset=+1", "window_offset=-1"])
def test_window_mistakes_are_invisible_before_the_window(model, tmp_path, name):
    ids = ids_of(W - 1)  # every key stays inside the window, even one key narrower
    short = G.load_case(S.generate_case(model, ids, tmp_path / "short"))
    cand = candidate(model, tmp_path, ids, name)
    assert compare_cases(short, cand, FP32).passed


def test_with_attention_scores_stored_scale_and_window_mistakes_are_told_apart(model, tmp_path):
    ids = ids_of(W + 4)
    ref = G.load_case(S.generate_case(model, ids, tmp_path / "ref_all", taps="all"))
    probs_only = {n: a for n, a in ref.activations.items() if not n.endswith("attn.scores")}
    # the query scale acts on the scores; the window acts at the mask, after them: scores agree, probs differ
    scale = candidate(model, tmp_path, ids, "query_scale=head_dim", taps="all")
    assert compare_cases(ref, scale, FP32).first_divergence.name == "layers.0.attn.scores"
    window = candidate(model, tmp_path, ids, "window_offset=+1", taps="all")
    first = compare_cases(ref, window, FP32).first_divergence
    head, query, key = first.max_abs_index
    assert first.name == "layers.0.attn.probs" and query - key == W  # the key exactly `window` back
    from gemma2_ref.compare import compare_activations

    assert compare_activations(probs_only, scale.activations, FP32).first_divergence.name == "layers.0.attn.probs"


@pytest.mark.parametrize("name, ids_kind", [("no_bos", "no_bos"), ("double_bos", "double_bos")])
def test_a_missing_or_doubled_bos_is_named(model, reference, tmp_path, name, ids_kind):
    ids = reference.token_ids[1:] if ids_kind == "no_bos" else np.concatenate([[2], reference.token_ids])
    cand = G.load_case(G.write_case(tmp_path / "cand", model.forward(ids, taps="default"), ids))
    result = compare_cases(reference, cand, FP32)
    assert result.first_divergence.name == "embed" and result.first_divergence.status == "shape"
    assert "<bos>" in result.input_mismatch
    assert diagnose(model, reference, cand, FP32).named[0].variant.name == name


def test_a_bos_mistake_is_named_even_when_the_candidate_records_the_reference_ids(model, reference, tmp_path):
    acts = model.forward(reference.token_ids[1:], taps="default")  # the backend dropped <bos> internally
    cand = G.load_case(G.write_case(tmp_path / "cand", acts, reference.token_ids))
    assert diagnose(model, reference, cand, FP32).named[0].variant.name == "no_bos"


def test_two_mistakes_at_once_are_named_together(model, reference, tmp_path):
    cand = candidate(
        model, tmp_path, reference.token_ids, combine(find(CFG, "exact_gelu"), find(CFG, "drop_final_softcap"))
    )
    diag = diagnose(model, reference, cand, FP32)
    assert diag.named[0].verdict == "matches"
    assert set(diag.named[0].variant.name.split(" + ")) == {"exact_gelu", "drop_final_softcap"}
    assert any(r.variant.name == "exact_gelu" and r.verdict == "explains the first divergence" for r in diag.named)


def test_correct_but_less_precise_candidates_are_not_blamed_on_a_mistake(model, reference, tmp_path):
    acts = model.forward(reference.token_ids, taps="default")
    rng = np.random.default_rng(1)
    noisy = {n: (a * (1 + 3e-3 * rng.standard_normal(a.shape))).astype(np.float32) for n, a in acts.items()}
    cand = G.load_case(G.write_case(tmp_path / "noisy", noisy, reference.token_ids))
    diag = diagnose(model, reference, cand, FP32)
    assert not diag.base.passed and diag.named == []
    assert diag.passes_profile == "fp16"  # 0.3% relative noise: within float16 precision
    assert "its errors look like fp16 precision, not a mistake" in " ".join(format_diagnosis(diag).split())


def test_every_variant_explains_itself_with_a_public_reference(model):
    for v in known_mistakes(model.config):
        assert v.what and v.refs, v.name


def test_the_reference_model_must_have_the_recorded_weights(model, reference, tmp_path):
    assert load_reference_model(reference).path == model.path
    other = save_checkpoint(tmp_path / "other", CFG, random_weights(CFG, seed=6, scale=2.0), "F32")
    with pytest.raises(ValueError, match="weight files differ"):
        load_reference_model(reference, other)


def test_cli_compare_and_diagnose_name_the_mistake(model, reference, tmp_path, capsys):
    cand = candidate(model, tmp_path, reference.token_ids, "drop_attn_softcap")
    assert cli(["compare", str(reference.path), str(cand.path)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "FAIL: first diverging tap: layers.0.attn.context (layer 0, attn.context)" in out
    assert "MATCHES: drop_attn_softcap" in out and "vLLM #5908" in out
    assert cli(["diagnose", str(reference.path), str(cand.path)]) == 0
    assert "MATCHES: drop_attn_softcap" in capsys.readouterr().out


def test_json_reports_carry_the_diagnosis(model, reference, tmp_path, capsys):
    import json

    cand = candidate(model, tmp_path, reference.token_ids, "norm_offset=2")
    assert cli(["compare", str(reference.path), str(cand.path), "--json"]) == 1
    case = json.loads(capsys.readouterr().out)["cases"][0]
    assert case["first_divergence"] == "layers.0.pre_attn_norm"
    assert case["diagnosis"]["named"][0]["variant"] == "norm_offset=2"
    assert cli(["diagnose", str(reference.path), str(cand.path), "--json"]) == 0
    named = json.loads(capsys.readouterr().out)["cases"][0]["named"][0]
    assert named["verdict"] == "matches" and named["passes_against_variant"] is True


def test_a_residual_stream_candidate_is_diagnosed_from_what_it_has(model, reference, tmp_path):
    acts = inject(model, "drop_attn_softcap").forward(reference.token_ids, taps="residual")
    cand = G.load_case(G.write_case(tmp_path / "resid", acts, reference.token_ids))
    result = compare_cases(reference, cand, FP32)
    assert result.first_divergence.name == "layers.0.output"  # the coarsest place the candidate can show
    assert diagnose(model, reference, cand, FP32).named[0].variant.name == "drop_attn_softcap"


def test_compare_still_reports_when_the_reference_model_is_not_here(model, tmp_path, capsys):
    import json

    ids = ids_of(W + 2)
    ref_dir = S.generate_case(model, ids, tmp_path / "ref")
    m = json.loads((ref_dir / G.MANIFEST).read_text())
    m["model"]["path"] = str(tmp_path / "gone")
    m["manifest_sha256"] = G._manifest_checksum(m)
    (ref_dir / G.MANIFEST).write_text(json.dumps(m))
    cand = candidate(model, tmp_path, ids, "exact_gelu")
    assert cli(["compare", str(ref_dir), str(cand.path)]) == 1
    captured = capsys.readouterr()
    assert "first diverging tap: layers.0.mlp.hidden" in " ".join(captured.out.split())
    assert "no diagnosis" in captured.err and "pass --model" in captured.err


def test_a_variant_that_barely_moves_the_failing_tap_is_not_named_though_it_passes(model, reference, tmp_path):
    """A candidate just past the bf16 limit at one tap, off the reference in the direction some variant moves
    that tap (by far less than the limit): against the variant it passes, but it is only ~1x closer to it than
    to the reference. That is a borderline tolerance, not evidence of the mistake (the KerasHub bf16 long
    case in the README was named "MATCHES" four times so)."""
    bf16, at = PROFILES["bf16"], "layers.0.mlp.hidden"
    acts = model.forward(reference.token_ids, taps="default")
    moved = inject(model, "exact_gelu").forward(reference.token_ids, taps="default")[at]
    r, d = acts[at].astype(np.float64), (moved - acts[at]).astype(np.float64)
    delta = np.linalg.norm(d) / np.linalg.norm(r)
    assert 0 < delta < 0.01 * bf16.rel_l2  # the variant barely moves the tap
    # rel L2 limit + delta / 2 from the reference, limit - delta / 2 from the variant
    acts[at] = (r + (bf16.rel_l2 + delta / 2) * np.linalg.norm(r) * d / np.linalg.norm(d)).astype(np.float32)
    cand = G.load_case(G.write_case(tmp_path / "borderline", acts, reference.token_ids))
    diag = diagnose(model, reference, cand, bf16)
    assert not diag.base.passed and diag.base.first_divergence.name == at
    passing = [r for r in diag.results if r.comparison.passed]
    assert [r.variant.name for r in passing] == ["exact_gelu"] and passing[0].ratio < 1.5
    assert diag.named == [] and "no known Gemma 2 mistake" in format_diagnosis(diag)


# -- the precision stage: RMSNorm's rounding, bit for bit (verify/rounding.py) ----------------------------------


def bf16_candidate(model, tmp_path, ids, mistake=None):
    """A bfloat16 backend's case (every activation rounded as produced), correct or with `mistake`."""
    run = inject(model, mistake) if mistake else model
    acts = run.forward(ids, taps="default", round_to="bfloat16")
    return G.load_case(G.write_case(tmp_path / "bf16", acts, ids, producer="a bf16 backend", compute_dtype="bfloat16"))


def with_zero_norm_weights(model):
    """The model with every RMSNorm weight 0 (transformers' initialisation): (1 + w) = 1 exactly in any dtype."""
    import dataclasses

    from gemma2_ref.verify.mistakes import NORMS, TransformedWeights

    zero = lambda w: dataclasses.replace(w, **{n: np.zeros_like(getattr(w, n)) for n in NORMS})  # noqa: E731
    return type(model)(model.config, TransformedWeights(model.weights, zero, np.zeros_like), model.dtype, model.path)


@pytest.mark.parametrize("name", ["norm_cast_before_scale", "norm_scale_in_bf16", "norm_variance_in_bf16"])
def test_the_precision_stage_names_the_rmsnorm_arithmetic_a_bf16_candidate_rounds_with(
    model, reference, tmp_path, name
):
    from gemma2_ref.verify.rounding import rmsnorm_rounding

    cand = bf16_candidate(model, tmp_path, reference.token_ids, name)
    evidence = rmsnorm_rounding(model, cand.activations, "bfloat16")
    assert evidence.verdict == "reproduces" and evidence.named == name, evidence.why
    clean = rmsnorm_rounding(model, bf16_candidate(model, tmp_path, reference.token_ids).activations, "bfloat16")
    assert clean.verdict == "reproduces" and clean.best == "correct" and clean.named is None, clean.why


def test_the_precision_stage_says_too_weak_when_the_arithmetics_cannot_differ(model, reference, tmp_path):
    """With (1 + w) = 1 the scale's rounding and the cast before it change nothing: no choice is made."""
    from gemma2_ref.verify.rounding import rmsnorm_rounding

    flat = with_zero_norm_weights(model)
    evidence = rmsnorm_rounding(flat, bf16_candidate(flat, tmp_path, reference.token_ids).activations, "bfloat16")
    assert evidence.verdict == "too weak" and evidence.named is None, evidence.why
    assert {r for r, (n, _) in evidence.rivals.items() if n == 0} == {"norm_cast_before_scale", "norm_scale_in_bf16"}


def test_the_precision_stage_names_nothing_it_cannot_reproduce(model, reference, tmp_path):
    """Another mistake in the norms' weights: no arithmetic reproduces them. Float32 activations: not checked."""
    from gemma2_ref.verify.rounding import rmsnorm_rounding

    shifted = rmsnorm_rounding(
        model, bf16_candidate(model, tmp_path, reference.token_ids, "norm_offset=2").activations, "bfloat16"
    )
    assert shifted.verdict == "none" and shifted.named is None, shifted.why
    float32 = rmsnorm_rounding(model, model.forward(reference.token_ids, taps="default"), "bfloat16")
    assert float32.verdict == "not applicable" and "not bfloat16 values" in float32.why


def test_compare_names_a_rounding_mistake_in_a_passing_bf16_case(model, reference, tmp_path, capsys):
    import json

    cand = bf16_candidate(model, tmp_path, reference.token_ids, "norm_scale_in_bf16")
    assert cli(["compare", str(reference.path), str(cand.path), "--profile", "bf16"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the candidate passes the bf16 profile, but:" in out and "REPRODUCES ITS ROUNDING: norm_scale_in_bf16" in out
    assert cli(["diagnose", str(reference.path), str(cand.path), "--profile", "bf16", "--json"]) == 0
    case = json.loads(capsys.readouterr().out)["cases"][0]
    assert case["rounding"]["named"] == "norm_scale_in_bf16"
    assert case["named"][0]["verdict"] == "reproduces its rounding"
    assert case["named"][0]["passes_against_variant"] is None  # no variant was re-run: the evidence is "rounding"

"""compare: per-tap metrics, profiles, the first diverging tap, reports, exit codes, assert_matches_golden."""

import json

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.cli import build_parser
from gemma2_ref.cli import main as cli
from gemma2_ref.compare import PROFILES, compare_activations, compare_tap, format_report, get_profile, logits_metrics
from gemma2_ref.testing import assert_matches_golden

FP32 = PROFILES["fp32"]


@pytest.fixture(scope="module")
def run():
    model = g2.load_model("tiny")
    ids = np.array(g2.load_tokenizer("tiny").encode("The cat sat on the mat."))
    return model, ids, model.forward(ids, taps="default")


@pytest.fixture()
def reference(tmp_path, run):
    model, ids, acts = run
    return G.write_case(tmp_path / "ref", acts, ids, model=G.model_info(model, "tiny"))


def perturbed(acts: dict, name: str, rel: float, seed: int = 0) -> dict:
    """A copy of acts with noise of relative L2 size `rel` added to one tap."""
    out = dict(acts)
    a = acts[name]
    noise = np.random.default_rng(seed).normal(size=a.shape)
    out[name] = (a + rel * np.linalg.norm(a) / np.linalg.norm(noise) * noise).astype(a.dtype)
    return out


def test_identical_activations_pass_with_zero_error(run):
    _, ids, acts = run
    result = compare_activations(acts, acts, FP32, ref_ids=ids, cand_ids=ids)
    assert result.passed and result.first_divergence is None
    assert all(t.rel_l2 == 0 and t.max_abs == 0 and t.cosine == pytest.approx(1) for t in result.compared)
    logits = next(t for t in result.taps if t.name == "logits").logits
    assert logits["kl_max"] == 0 and logits["top1"] == 1 and logits["top5"] == 1


def test_metrics_are_relative_to_the_reference_tap():
    ref = np.array([[3.0, 4.0], [0.0, 0.0]])
    cand = np.array([[3.0, 4.5], [0.0, 0.0]])
    t = compare_tap("layers.0.output", ref, cand, FP32)
    assert t.max_abs == pytest.approx(0.5) and t.max_abs_index == [0, 1]
    assert t.rel_l2 == pytest.approx(0.5 / 5.0) and t.max_rel == pytest.approx(0.5 / 4.0)
    assert t.status == "fail" and t.failed == ["rel_l2", "max_rel"]


def test_logits_metrics_kl_and_top_k():
    ref = np.array([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    cand = ref.copy()
    cand[1] = [3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # position 1 now prefers token 0
    m = logits_metrics(ref, cand, tie=0.0)
    p, q = np.exp(ref[1]) / np.exp(ref[1]).sum(), np.exp(cand[1]) / np.exp(cand[1]).sum()
    assert m["kl_max"] == pytest.approx(float((p * np.log(p / q)).sum()))
    assert m["kl_max_position"] == [1] and m["top1"] == 0.5 and m["top1_disagreements"] == 1


def test_top1_disagreement_on_a_tie_is_excused():
    ref = np.array([[1.0, 1.0 - 1e-7, -3.0, 0.5]])
    cand = np.array([[1.0 - 1e-7, 1.0, -3.0, 0.5]])
    assert logits_metrics(ref, cand, tie=1e-4)["top1"] == 1.0
    assert logits_metrics(ref, cand, tie=0.0)["top1"] == 0.0


def test_first_divergence_is_the_earliest_failing_tap_in_execution_order(run):
    _, _, acts = run
    cand = perturbed(perturbed(acts, "layers.3.output", 1e-1), "layers.1.mlp.up", 1e-3)
    result = compare_activations(acts, cand, FP32)
    assert not result.passed
    assert result.first_divergence.name == "layers.1.mlp.up"  # before the larger error in layer 3
    report = " ".join(format_report(result).split())
    assert "FAIL: first diverging tap: layers.1.mlp.up (layer 1, mlp.up)" in report


def test_noise_below_the_profile_passes_and_above_fails(run):
    _, _, acts = run
    assert compare_activations(acts, perturbed(acts, "layers.2.output", 1e-6), FP32).passed
    assert not compare_activations(acts, perturbed(acts, "layers.2.output", 1e-3), FP32).passed
    assert compare_activations(acts, perturbed(acts, "layers.2.output", 1e-3), PROFILES["bf16"]).passed


def test_a_candidate_with_some_taps_is_compared_on_those_and_told_what_is_missing(run):
    _, _, acts = run
    residual = {n: a for n, a in acts.items() if n == "embed" or n.endswith(".output") or n == "logits"}
    result = compare_activations(acts, residual, FP32)
    assert result.passed and len(result.compared) == len(residual)
    assert "layers.0.attn.q_rope" in result.missing
    assert "missing from the candidate: layers.*.{input, pre_attn_norm, " in " ".join(format_report(result).split())
    logits_only = compare_activations(acts, {"logits": acts["logits"]}, FP32)
    assert logits_only.passed and [t.name for t in logits_only.compared] == ["logits"]


def test_a_candidate_with_no_common_tap_fails(run):
    _, _, acts = run
    assert not compare_activations(acts, {"something.else": np.zeros(3)}, FP32).passed


def test_a_shape_mismatch_fails_at_that_tap(run):
    _, _, acts = run
    cand = dict(acts, embed=acts["embed"][1:])
    result = compare_activations(acts, cand, FP32)
    assert result.first_divergence.name == "embed" and result.first_divergence.status == "shape"


def test_different_token_ids_are_reported(run):
    _, ids, acts = run
    result = compare_activations(acts, acts, FP32, ref_ids=ids, cand_ids=ids[1:])
    assert not result.passed and "lack the leading <bos>" in result.input_mismatch


def test_profile_overrides_replace_single_limits():
    p = get_profile("fp32", rel_l2=1e-3)
    assert p.rel_l2 == 1e-3 and p.max_rel == FP32.max_rel and p.name == "fp32+custom"
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("int4")


def test_help_states_every_profile_with_its_thresholds_and_reasoning():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["compare"].format_help()
    for p in PROFILES.values():
        assert p.describe() in text
        assert p.why.split(".")[0][:40] in " ".join(text.split())


# -- the command line -----------------------------------------------------------------------------------------


def test_cli_exit_codes_and_json(tmp_path, reference, run, capsys):
    model, ids, acts = run
    good = G.write_case(tmp_path / "good", acts, ids)
    bad = G.write_case(tmp_path / "bad", perturbed(acts, "layers.0.attn.out", 1e-2), ids)
    assert cli(["compare", str(reference), str(good)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert cli(["compare", str(reference), str(bad), "--json", "--no-diagnose"]) == 1
    out = json.loads(capsys.readouterr().out)
    case = out["cases"][0]
    assert out["passed"] is False and case["first_divergence"] == "layers.0.attn.out"
    assert case["layers"][1]["first_failure"] == "layers.0.attn.out"
    tap = next(t for t in case["taps"] if t["name"] == "layers.0.attn.out")
    assert tap["rel_l2"] == pytest.approx(1e-2, rel=1e-3)
    assert cli(["compare", str(reference), str(bad), "--rtol", "0.1", "--atol", "0.1"]) == 0


def test_cli_compares_a_bare_safetensors_file_through_a_name_map(tmp_path, reference, run, capsys):
    from gemma2_ref.weights import write_safetensors

    _, _, acts = run
    theirs = {f"blk.{i}.out": acts[f"layers.{i}.output"] for i in range(4)} | {"result_output": acts["logits"]}
    write_safetensors(tmp_path / "mine.safetensors", theirs)
    code = cli(
        [
            "compare",
            str(reference),
            str(tmp_path / "mine.safetensors"),
            "--name-map",
            "blk.{i}.out=layers.{i}.output",
            "--name-map",
            "result_output=logits",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "5 compared" in out and "no manifest" in out


def test_suites_are_compared_case_by_case(tmp_path, run, capsys):
    model, _, _ = run
    tok = g2.load_tokenizer("tiny")
    S.generate_suite(model, tok, tmp_path / "ref", model_name="tiny", taps="residual")
    S.generate_suite(model, tok, tmp_path / "cand", model_name="tiny", taps="residual")
    assert cli(["compare", str(tmp_path / "ref"), str(tmp_path / "cand")]) == 0
    assert "suite: 12 of 12 cases pass" in capsys.readouterr().out
    bad = G.load_case(tmp_path / "cand" / "chat")
    acts = perturbed(bad.activations, "layers.1.output", 1e-2)
    G.write_case(tmp_path / "cand" / "chat", acts, bad.token_ids)
    assert cli(["compare", str(tmp_path / "ref"), str(tmp_path / "cand"), "--no-diagnose"]) == 1
    assert "suite: 11 of 12 cases pass; failing: chat" in capsys.readouterr().out
    (tmp_path / "cand" / "suite.json").unlink()  # a backend writing case by case need not write suite.json
    (tmp_path / "cand" / "batch" / "manifest.json").rename(tmp_path / "batch-manifest.json")
    assert cli(["compare", str(tmp_path / "ref"), str(tmp_path / "cand"), "--no-diagnose"]) == 1
    out = capsys.readouterr().out
    assert "case 'batch' is missing from the candidate suite" in out and "10 of 12 cases pass" in out


# -- assert_matches_golden ------------------------------------------------------------------------------------


def test_assert_matches_golden_passes_and_fails_with_the_first_divergence(reference, run):
    _, ids, acts = run
    result = assert_matches_golden(reference, acts, token_ids=ids)
    assert result.passed
    with pytest.raises(AssertionError, match=r"first diverging tap: layers\.2\.mlp\.gate") as err:
        assert_matches_golden(reference, perturbed(acts, "layers.2.mlp.gate", 1e-2), profile="fp32")
    assert "rel L2 0.01" in str(err.value)
    assert_matches_golden(reference, perturbed(acts, "layers.2.mlp.gate", 1e-2), profile="bf16")
    assert_matches_golden(reference, {"out.final": acts["logits"]}, name_map={"out.final": "logits"})
    with pytest.raises(AssertionError, match="none of the 1 given activations"):
        assert_matches_golden(reference, {"out.final": acts["logits"]})

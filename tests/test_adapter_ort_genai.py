"""The ONNX Runtime GenAI adapter: the model built by the engine's own builder, its intermediates read from the
built graph, its decode and padded batches through the Generator. The verdicts of docs/backends/ort_genai.md
as tests: in float32 the engine differs from ours by the builder's two roundings and nothing else (sqrt(D) rounded
to two decimals, builders/gemma.py:22; (1 + w) added in the checkpoint's bfloat16, builders/base.py:3163), its KV
cache decodes right, and a left-padded batch runs with its padding attended (src/models/position_inputs.cpp)."""

import dataclasses

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.model import gemma2 as model_code
from gemma2_ref.model.bfloat16 import round_to_bf16
from gemma2_ref.verify.compare import PROFILES, compare_cases
from gemma2_ref.verify.mistakes import NORMS, TransformedWeights
from gemma2_ref.verify.suites import SUITES
from tests.helpers.backends import require
from tests.helpers.hf_reference import LIKE_27B, hf_config, make_checkpoint

require("onnxruntime_genai", "pip install -e '.[ort-genai]'")
from gemma2_ref.adapters import ort_genai as adapter  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model = g2.load_model("tiny")
    return (
        model,
        adapter.build("tiny"),
        {c.name: c for c in SUITES["coverage"](model.config, g2.load_tokenizer("tiny"))},
    )


def as_the_builder_built_it(model, bf16_checkpoint: bool, monkeypatch):
    """Our model with the builder's two roundings: the embedding times round(sqrt(D), 2), and (for a bfloat16
    checkpoint, which transformers 5 loads as bfloat16) each RMSNorm's (1 + w) rounded to bfloat16."""

    def plus_one_in_bf16(w):
        return (round_to_bf16((1 + w).astype(np.float32)).astype(np.float32) - 1).astype(w.dtype)

    def builder_embed(ids, embedding, normalizer=None):
        return (embedding[ids] * np.float32(np.round(np.sqrt(embedding.shape[1]), 2))).astype(embedding.dtype)

    monkeypatch.setattr(model_code, "embed", builder_embed)
    if not bf16_checkpoint:
        return model
    weights = TransformedWeights(
        model.weights,
        lambda w: dataclasses.replace(w, **{n: plus_one_in_bf16(getattr(w, n)) for n in NORMS}),
        plus_one_in_bf16,
    )
    return type(model)(model.config, weights, model.dtype, model.path)


def test_float32_differs_from_ours_only_by_the_builders_two_roundings(tiny, tmp_path, monkeypatch):
    model, built, cases = tiny
    ids = np.asarray(cases["window"].ids)  # past the window of 32
    cand = G.load_case(adapter.write_golden("tiny", ids, tmp_path / "ort", taps="all", model_dir=built))
    ours = G.load_case(S.generate_case(model, ids, tmp_path / "ours", taps="all"))
    plain = compare_cases(ours, cand, PROFILES["fp32"])
    assert not plain.passed and plain.first_divergence.name == "embed"
    ratio = cand.activations["embed"] / ours.activations["embed"]
    assert np.allclose(ratio[ours.activations["embed"] != 0], 11.31 / np.sqrt(128), rtol=1e-6)
    builder_like = G.load_case(
        S.generate_case(as_the_builder_built_it(model, True, monkeypatch), ids, tmp_path / "builder", taps="all")
    )
    result = compare_cases(builder_like, cand, PROFILES["fp32"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)
    sliding_k_rope = {f"layers.{i}.attn.k_rope" for i in range(4) if model.config.is_sliding(i)}
    assert [t.name for t in result.compared] == [
        n for n in adapter.reachable_taps(model.config) if n not in sliding_k_rope
    ]  # the window cache lost them
    assert cand.manifest["producer"]["name"] == "onnxruntime-genai"


def test_a_prompt_inside_the_window_gives_every_k_rope(tiny, tmp_path, monkeypatch):
    model, built, cases = tiny
    ids = np.asarray(cases["short"].ids)
    cand = G.load_case(adapter.write_golden("tiny", ids, tmp_path / "ort", taps="default", model_dir=built))
    assert "layers.0.attn.k_rope" in cand.activations
    ref = G.load_case(S.generate_case(as_the_builder_built_it(model, True, monkeypatch), ids, tmp_path / "b"))
    assert compare_cases(ref, cand, PROFILES["fp32"]).passed


def test_27b_like_query_scale_and_a_window_smaller_than_the_prompt(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "27b", hf_config(**LIKE_27B), seed=3, scale=2.0)  # float32 weights
    model = g2.load_model(ckpt)
    ids = np.concatenate([[2], np.random.default_rng(1).integers(3, model.config.vocab_size, 12)])
    cand = G.load_case(adapter.write_golden(ckpt, ids, tmp_path / "ort", taps="default"))
    ours = G.load_case(S.generate_case(model, ids, tmp_path / "ours"))
    assert compare_cases(ours, cand, PROFILES["fp32"]).first_divergence.name == "embed"  # round(sqrt(96), 2)
    ref = G.load_case(S.generate_case(as_the_builder_built_it(model, False, monkeypatch), ids, tmp_path / "b"))
    result = compare_cases(ref, cand, PROFILES["fp32"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)


def test_the_generator_decodes_through_its_own_cache_past_the_window(tiny, monkeypatch):
    model, built, cases = tiny
    case = cases["decode"]
    ids = np.asarray(case.ids)
    assert len(ids) - case.prefill > model.config.sliding_window  # the ring wraps during the steps
    logits = adapter.capture(built, ids, model.config, prefill=case.prefill)["logits"]
    expected = as_the_builder_built_it(model, True, monkeypatch).logits(ids)
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 5e-6


def test_a_left_padded_batch_runs_with_its_padding_attended(tiny, monkeypatch):
    model, built, cases = tiny
    case = cases["padded_batch"]
    ids, mask = np.asarray(case.ids), np.asarray(case.attention_mask).astype(bool)
    logits = adapter.capture(built, ids, model.config, attention_mask=case.attention_mask)["logits"]
    builder = as_the_builder_built_it(model, True, monkeypatch)
    short = int(np.argmin(mask.sum(1)))
    masked = builder.logits(ids[short][mask[short]])
    attended = builder.logits(ids[short])  # the <pad> tokens as ordinary tokens, positions from index 0
    assert np.abs(logits[short][mask[short]] - masked).max() > 0.5
    assert np.abs(logits[short][mask[short]] - attended[mask[short]]).max() < 1e-4


def test_a_right_padded_batch_is_refused_by_the_runtime(tiny):
    model, built, cases = tiny
    case = cases["padded_batch_right"]
    with pytest.raises(NotImplementedError, match="seqlens_k"):
        adapter.capture(built, np.asarray(case.ids), model.config, attention_mask=case.attention_mask)


def test_int8_passes_the_q8_profile(tiny, tmp_path):
    model, _, cases = tiny
    ids = np.asarray(cases["window"].ids)
    cand = G.load_case(adapter.write_golden("tiny", ids, tmp_path / "int8", dtype="int8", taps="residual"))
    assert cand.compute_dtype == "int8"
    ours = G.load_case(S.generate_case(model, ids, tmp_path / "ours", taps="residual"))
    assert compare_cases(ours, cand, PROFILES["q8"]).passed
    assert not compare_cases(ours, cand, PROFILES["fp32"]).passed


def test_cli_golden_backend_onnxruntime_genai(tmp_path):
    from gemma2_ref.cli import main as cli

    assert (
        cli(
            [
                "golden",
                "tiny",
                "--tokens",
                "2 5 9 11",
                "--out",
                str(tmp_path / "c"),
                "--backend",
                "onnxruntime-genai",
                "--taps",
                "residual",
            ]
        )
        == 0
    )
    assert G.load_case(tmp_path / "c").manifest["producer"]["adapter"] == "gemma2_ref.adapters.ort_genai"

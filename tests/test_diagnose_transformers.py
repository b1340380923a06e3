"""Diagnosis checked against an independent implementation: each known mistake is made *in transformers*
(a config edit, a weight edit, a patched module or other input ids), its activations are captured with the
transformers adapter, and `diagnose` must name the mistake from those activations alone.

tests/test_diagnose.py builds its candidates with our own forward (mistakes.inject), where "matches" holds by
construction; here nothing of gemma2_ref runs on the candidate's side but the capture."""

import math

import numpy as np
import pytest
import torch
from transformers import Gemma2ForCausalLM

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.adapters import transformers as adapter
from gemma2_ref.compare import PROFILES, compare_cases, format_report
from gemma2_ref.diagnose import diagnose, format_diagnosis
from tests.helpers.hf_reference import (
    DIAGNOSABLE,
    DIAGNOSABLE_WINDOW,
    diagnosable_checkpoint,
    hf_config,
    make_checkpoint,
)

W = DIAGNOSABLE_WINDOW
FP32 = PROFILES["fp32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return diagnosable_checkpoint(tmp_path_factory.mktemp("hf_diag"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return g2.load_model(checkpoint)


@pytest.fixture(scope="module")
def ids():
    return np.concatenate([[2], np.random.default_rng(3).integers(3, 300, W + 5)])  # past the window


@pytest.fixture(scope="module")
def reference(model, ids, tmp_path_factory):
    return G.load_case(S.generate_case(model, ids, tmp_path_factory.mktemp("ref") / "case", taps="default"))


def hf_with(checkpoint, **config_changes):
    return Gemma2ForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", **config_changes
    ).eval()


@torch.no_grad()
def shift_norms(hf, shift: float):
    for name, p in hf.named_parameters():
        if "norm" in name:
            p += shift
    return hf


def bf16_normalizer(hf):
    emb = hf.model.embed_tokens
    emb.embed_scale = torch.tensor(math.sqrt(DIAGNOSABLE["hidden_size"])).to(torch.bfloat16).float()
    return hf


MISTAKES = {  # name -> how transformers is made to commit it
    "drop_attn_softcap": lambda ck: hf_with(ck, attn_logit_softcapping=None),
    "drop_final_softcap": lambda ck: hf_with(ck, final_logit_softcapping=None),
    "no_sliding_window": lambda ck: hf_with(ck, layer_types=["full_attention"] * 4),
    "window_offset=+1": lambda ck: hf_with(ck, sliding_window=W + 1),
    "window_offset=-1": lambda ck: hf_with(ck, sliding_window=W - 1),
    "query_scale=head_dim (16)": lambda ck: hf_with(ck, query_pre_attn_scalar=16),
    "query_scale=224": lambda ck: hf_with(ck, query_pre_attn_scalar=224),
    "exact_gelu": lambda ck: hf_with(ck, hidden_activation="gelu"),
    "norm_offset=0": lambda ck: shift_norms(hf_with(ck), -1.0),
    "norm_offset=2": lambda ck: shift_norms(hf_with(ck), +1.0),
    "normalizer_dtype=bfloat16": lambda ck: bf16_normalizer(hf_with(ck)),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_made_in_transformers_is_named(checkpoint, model, reference, ids, tmp_path, name):
    hf = MISTAKES[name](checkpoint)
    cand = G.load_case(adapter.write_golden(checkpoint, ids, tmp_path / "cand", hf_model=hf, taps="default"))
    result = compare_cases(reference, cand, FP32)
    assert not result.passed
    diag = diagnose(model, reference, cand, FP32)
    assert diag.named and diag.named[0].variant.name == name, format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)


@pytest.mark.parametrize("name", ["no_bos", "double_bos"])
def test_a_bos_mistake_in_transformers_input_is_named(checkpoint, model, reference, ids, tmp_path, name):
    ran = ids[1:] if name == "no_bos" else np.concatenate([[2], ids])
    cand = G.load_case(adapter.write_golden(checkpoint, ran, tmp_path / "cand", hf_model=hf_with(checkpoint)))
    diag = diagnose(model, reference, cand, FP32)
    assert diag.named[0].variant.name == name and diag.named[0].verdict == "matches", format_diagnosis(diag)


def test_clean_transformers_raises_no_alarm(checkpoint, reference, ids, tmp_path):
    cand = G.load_case(adapter.write_golden(checkpoint, ids, tmp_path / "cand", hf_model=hf_with(checkpoint)))
    assert compare_cases(reference, cand, FP32).passed


def test_a_window_mistake_decodes_through_a_cache_sized_for_its_window(model, ids):
    """A mistaken model is just a model: its KV-cache decode equals its own full forward (the ring is sized
    from the changed config), and both equal transformers with the same mistake."""
    from gemma2_ref.generate import generate
    from gemma2_ref.mistakes import inject

    wide = inject(model, "window_offset=+1")
    out = generate(wide, ids[:4], max_new_tokens=len(ids) + 4, stop_ids=(), keep_logits=True)
    full = wide.logits(np.concatenate([ids[:4], out.tokens[:-1]]))
    np.testing.assert_allclose(np.stack(out.logits), full[3:], rtol=2e-5, atol=2e-5)
    correct = model.logits(np.concatenate([ids[:4], out.tokens[:-1]]))
    assert np.abs(full[W:] - correct[W:]).max() > 1e-3  # past the window the mistake shows


# -- the bug classes backends shipped beyond the original twelve, made in transformers ---------------------------


def interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """RoPE on pairs (2i, 2i+1), GPT-J / Meta style, with transformers' own cos / sin (half-split layout)."""
    half = q.shape[-1] // 2
    c, s = cos.unsqueeze(unsqueeze_dim)[..., :half], sin.unsqueeze(unsqueeze_dim)[..., :half]

    def rotate(x):
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2)

    return rotate(q), rotate(k)


def tiled_repeat_kv(hidden_states, n_rep):
    """kv heads tiled (k0, k1, k0, k1, ...) where repeat_interleave (k0, k0, k1, k1, ...) is right."""
    return hidden_states if n_rep == 1 else hidden_states.repeat(1, n_rep, 1, 1)


def unscaled_embedding(hf):
    hf.model.embed_tokens.embed_scale = torch.tensor(1.0)
    return hf


MODELING = "transformers.models.gemma2.modeling_gemma2"
NEW_MISTAKES = {  # name -> (how transformers commits it, a function patched in its modeling module or None)
    "sliding_layers=odd": (lambda ck: hf_with(ck, layer_types=["full_attention", "sliding_attention"] * 2), None),
    "rope_theta=1e6": (lambda ck: hf_with(ck, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), None),
    "embed_unscaled": (lambda ck: unscaled_embedding(hf_with(ck)), None),
    "rope_layout=interleaved": (hf_with, ("apply_rotary_pos_emb", interleaved_rope)),
    "gqa_mapping=tiled": (hf_with, ("repeat_kv", tiled_repeat_kv)),
}


@pytest.mark.parametrize("name", list(NEW_MISTAKES))
def test_a_shipped_bug_class_made_in_transformers_is_named(
    checkpoint, model, reference, ids, tmp_path, monkeypatch, name
):
    make, patch = NEW_MISTAKES[name]
    if patch:
        monkeypatch.setattr(f"{MODELING}.{patch[0]}", patch[1])
    cand = G.load_case(
        adapter.write_golden(checkpoint, ids, tmp_path / "cand", hf_model=make(checkpoint), taps="default")
    )
    diag = diagnose(model, reference, cand, FP32)
    assert diag.named and diag.named[0].variant.name == name, format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)


def test_a_float16_overflow_is_named_at_the_tap_where_the_reference_leaves_the_float16_range(tmp_path):
    cfg = hf_config(**{**DIAGNOSABLE, "num_hidden_layers": 2})
    ck = make_checkpoint(tmp_path / "big", cfg, seed=2, scale=2.0)
    with torch.no_grad():  # an embedding so large that the residual stream leaves float16's range
        hf = Gemma2ForCausalLM.from_pretrained(ck, dtype=torch.float32)
        hf.model.embed_tokens.weight *= 30000.0
        hf.save_pretrained(ck)
    ids = np.concatenate([[2], np.random.default_rng(5).integers(3, 300, 6)])
    ours = g2.load_model(ck)
    reference = G.load_case(S.generate_case(ours, ids, tmp_path / "ref", taps="default"))
    fp16 = adapter.load(ck, "float16")
    cand = G.load_case(adapter.write_golden(ck, ids, tmp_path / "cand", dtype="float16", hf_model=fp16))
    diag = diagnose(ours, reference, cand, PROFILES["fp16"])
    assert diag.named and diag.named[0].variant.name == "fp16_overflow", format_diagnosis(diag)
    assert "the reference reaches" in diag.named[0].variant.what
    assert "at embed, first of its taps past 65504: run in bfloat16 or float32" in diag.named[0].variant.what


# -- a skipped post-norm: transformers' own layer with its post-norm module replaced by the identity ---------------


def without(hf, norm: str):
    """Every decoder layer's `norm` (post_attention_layernorm / post_feedforward_layernorm) an identity: the
    Gemma 1 layer, which adds the sub-block's output to the residual stream as it is."""
    for layer in hf.model.layers:
        setattr(layer, norm, torch.nn.Identity())
    return hf


@pytest.mark.parametrize(
    "name, norm, tap",
    [
        ("no_post_attn_norm", "post_attention_layernorm", "post_attn_norm"),
        ("no_post_ffw_norm", "post_feedforward_layernorm", "post_ffw_norm"),
    ],
)
def test_a_post_norm_skipped_in_transformers_is_found_at_that_norm_and_named(
    checkpoint, model, reference, ids, tmp_path, name, norm, tap
):
    cand = G.load_case(
        adapter.write_golden(
            checkpoint, ids, tmp_path / "cand", taps="default", hf_model=without(hf_with(checkpoint), norm)
        )
    )
    result = compare_cases(reference, cand, FP32)
    assert not result.passed and result.first_divergence.name == f"layers.0.{tap}"
    diag = diagnose(model, reference, cand, FP32)
    assert diag.named and diag.named[0].variant.name == name, format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)


# -- issue 28: the norm mapping, the shifted logits, and the arithmetic of RMSNorm in bfloat16 ------------------


@torch.no_grad()
def norms_swapped(hf):
    """A Llama converter's mapping: HF's post_attention_layernorm loaded as the pre-FFN norm and back."""
    for layer in hf.model.layers:
        a, b = layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)
    return hf


@torch.no_grad()
def centred_unembedding(hf):
    """TransformerLens's center_unembed: the output head's rows minus their mean over the vocabulary (untied
    from the embedding, which keeps its values), so each row of raw logits loses its mean before the soft-cap."""
    w = hf.lm_head.weight.detach().clone()
    hf.lm_head.weight = torch.nn.Parameter(w - w.mean(dim=0, keepdim=True))
    return hf


@pytest.mark.parametrize(
    "name, make",
    [
        ("norm_swap", lambda ck: norms_swapped(hf_with(ck))),
        ("logits_shifted", lambda ck: centred_unembedding(hf_with(ck))),
    ],
)
def test_a_norm_mapping_or_logit_shift_made_in_transformers_is_named(
    checkpoint, model, reference, ids, tmp_path, name, make
):
    cand = G.load_case(
        adapter.write_golden(checkpoint, ids, tmp_path / "cand", hf_model=make(checkpoint), taps="default")
    )
    diag = diagnose(model, reference, cand, FP32, combine=False)
    assert diag.named and diag.named[0].variant.name == name, format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)


def rms_cast_before_scale(self, x):
    """Llama's order: the normalised x cast to the activation dtype, then times (1 + w)."""
    normed = self._norm(x.float()).type_as(x)
    return (normed.float() * (1.0 + self.weight.float())).type_as(x)


def rms_scale_in_bf16(self, x):
    """(1 + w) computed in the weight's bfloat16."""
    return (self._norm(x.float()) * (1.0 + self.weight.to(torch.bfloat16)).float()).type_as(x)


def rms_variance_in_bf16(self, x):
    """The mean of squares accumulated in bfloat16: each square and each running sum a bfloat16."""
    squares = x.to(torch.bfloat16) * x.to(torch.bfloat16)
    total = torch.zeros(squares.shape[:-1] + (1,), dtype=torch.bfloat16)
    for j in range(squares.shape[-1]):
        total = total + squares[..., j : j + 1]
    variance = (total / squares.shape[-1]).float()
    return (x.float() * torch.rsqrt(variance + self.eps) * (1.0 + self.weight.float())).type_as(x)


PRECISION = {
    "norm_cast_before_scale": rms_cast_before_scale,
    "norm_scale_in_bf16": rms_scale_in_bf16,
    "norm_variance_in_bf16": rms_variance_in_bf16,
}


def bf16_candidate(checkpoint, ids, out, monkeypatch=None, norm=None):
    if norm is not None:
        monkeypatch.setattr(f"{MODELING}.Gemma2RMSNorm.forward", norm)
    return G.load_case(
        adapter.write_golden(
            checkpoint, ids, out, dtype="bfloat16", taps="default", hf_model=adapter.load(checkpoint, "bfloat16")
        )
    )


@pytest.fixture(scope="module")
def measured(model, reference):
    from gemma2_ref.measured import measured_profile

    return measured_profile(model, reference, "bfloat16")


@pytest.mark.parametrize("name", list(PRECISION))
def test_an_rmsnorm_precision_mistake_in_bfloat16_transformers_within_the_measured_profile_is_named_by_its_rounding(
    checkpoint, model, reference, ids, measured, tmp_path, monkeypatch, name
):
    """On this model (D = 72) each of RMSNorm's arithmetic mistakes moves a bfloat16 run by about one more
    bfloat16 rounding per norm: the measured profile (4x the reference's own bfloat16 error) passes it. The
    precision stage re-computes layer 0's norms and final_norm from the candidate's own inputs under each
    hypothesis: only the mistake's arithmetic reproduces every element (measured: 100% against at most 77.5%
    for the rivals), so it is named, and no other mistake is."""
    cand = bf16_candidate(checkpoint, ids, tmp_path / "cand", monkeypatch, PRECISION[name])
    result = compare_cases(reference, cand, measured)
    assert result.passed, format_report(result)
    diag = diagnose(model, reference, cand, measured, combine=False)
    assert [(r.variant.name, r.verdict) for r in diag.named] == [(name, "reproduces its rounding")], format_diagnosis(
        diag
    )
    assert diag.rounding.share(name) == 1.0 and diag.rounding.share("correct") < 0.9, format_diagnosis(diag)
    assert f"REPRODUCES ITS ROUNDING: {name}" in format_diagnosis(diag)
    assert diag.to_dict()["rounding"]["named"] == name


def test_a_norm_cast_before_scale_in_float16_transformers_is_named_by_its_rounding(
    checkpoint, model, reference, ids, tmp_path, monkeypatch
):
    """Llama's order of the cast in a float16 run: the stage reproduces it in float16 as well."""
    from gemma2_ref.measured import measured_profile

    monkeypatch.setattr(f"{MODELING}.Gemma2RMSNorm.forward", rms_cast_before_scale)
    cand = G.load_case(
        adapter.write_golden(
            checkpoint,
            ids,
            tmp_path / "cand",
            dtype="float16",
            taps="default",
            hf_model=adapter.load(checkpoint, "float16"),
        )
    )
    diag = diagnose(model, reference, cand, measured_profile(model, reference, "float16"), combine=False)
    assert [r.variant.name for r in diag.named] == ["norm_cast_before_scale"], format_diagnosis(diag)


@pytest.mark.parametrize("dtype, fixed", [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")])
def test_clean_transformers_in_each_dtype_names_nothing(checkpoint, model, reference, ids, tmp_path, dtype, fixed):
    """Zero false alarms: transformers as it is, in float32, bfloat16 and float16, against our float32 golden:
    its fixed profile and (half precision) the measured one pass, and a diagnosis under the tight fp32 profile
    names no mistake for the float32 run."""
    from gemma2_ref.measured import measured_profile

    cand = G.load_case(
        adapter.write_golden(
            checkpoint, ids, tmp_path / "cand", dtype=dtype, taps="default", hf_model=adapter.load(checkpoint, dtype)
        )
    )
    profiles = [PROFILES[fixed]] + ([measured_profile(model, reference, dtype)] if dtype != "float32" else [])
    for profile in profiles:
        diag = diagnose(model, reference, cand, profile, combine=False)
        assert diag.base.passed and not diag.named, format_diagnosis(diag)
        if dtype != "float32":  # the precision stage ran, and found the correct RMSNorm's rounding
            assert diag.rounding.verdict == "reproduces" and diag.rounding.best == "correct", format_diagnosis(diag)


@pytest.mark.parametrize(
    "made, named, ruled_out",
    [
        ("no_sliding_window", "no_sliding_window", "sliding_layers=odd"),
        ("sliding_layers=odd", "sliding_layers=odd", "no_sliding_window"),
    ],
)
def test_a_partial_explanation_a_later_tap_contradicts_is_ruled_out_not_named(
    checkpoint, model, reference, ids, tmp_path, made, named, ruled_out
):
    """No window and the window on the odd layers agree at layer 0 (global in both) and part at layer 1: the
    candidate's later taps tell them apart, so one is named and the other listed as ruled out at that tap."""
    types = {
        "no_sliding_window": ["full_attention"] * 4,
        "sliding_layers=odd": ["full_attention", "sliding_attention"] * 2,
    }[made]
    cand = G.load_case(
        adapter.write_golden(
            checkpoint, ids, tmp_path / "cand", taps="default", hf_model=hf_with(checkpoint, layer_types=types)
        )
    )
    diag = diagnose(model, reference, cand, FP32)
    assert [r.variant.name for r in diag.named] == [named], format_diagnosis(diag)
    ruled = {r.variant.name: r.ruled_out_at for r in diag.results if r.ruled_out_at}
    assert ruled_out in ruled and ruled[ruled_out].startswith("layers.1."), format_diagnosis(diag)
    assert f"{ruled_out} at layers.1." in format_diagnosis(diag)
    assert {"variant": ruled_out, "at": ruled[ruled_out]} in diag.to_dict()["ruled_out"]


def test_rmsnorm_variance_accumulated_in_bfloat16_is_named_under_the_measured_profile_on_a_wide_model(
    tmp_path, monkeypatch
):
    """At D = 1024 a running bfloat16 sum of the squares loses enough (SGLang #27540) to leave bfloat16's noise:
    transformers in bfloat16 with that RMSNorm fails the measured profile at the first norm and is named (84x
    closer to the variant, re-run with bfloat16 rounding, than to the reference). (1 + w) in bfloat16 stays
    within the noise there too."""
    from gemma2_ref.measured import measured_profile

    wide = {**DIAGNOSABLE, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 2}
    ck = make_checkpoint(tmp_path / "wide", hf_config(**wide), seed=11, scale=2.0)
    ours = g2.load_model(ck)
    ids = np.concatenate([[2], np.random.default_rng(3).integers(3, 300, 12)])
    reference = G.load_case(S.generate_case(ours, ids, tmp_path / "ref", taps="default"))
    measured = measured_profile(ours, reference, "bfloat16")
    cand = bf16_candidate(ck, ids, tmp_path / "cand", monkeypatch, rms_variance_in_bf16)
    result = compare_cases(reference, cand, measured)
    assert not result.passed and result.first_divergence.name == "layers.0.pre_attn_norm", format_report(result)
    diag = diagnose(ours, reference, cand, measured, combine=False)
    assert [r.variant.name for r in diag.named] == ["norm_variance_in_bf16"], format_diagnosis(diag)
    assert diag.named[0].verdict == "matches"

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
from gemma2_ref.compare import PROFILES, compare_cases
from gemma2_ref.diagnose import diagnose, format_diagnosis
from tests.helpers.hf_reference import DIAGNOSABLE, DIAGNOSABLE_WINDOW, diagnosable_checkpoint, hf_config, make_checkpoint

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
    return Gemma2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager",
                                             **config_changes).eval()


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
def test_a_shipped_bug_class_made_in_transformers_is_named(checkpoint, model, reference, ids, tmp_path, monkeypatch,
                                                            name):
    make, patch = NEW_MISTAKES[name]
    if patch:
        monkeypatch.setattr(f"{MODELING}.{patch[0]}", patch[1])
    cand = G.load_case(adapter.write_golden(checkpoint, ids, tmp_path / "cand", hf_model=make(checkpoint),
                                            taps="default"))
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


# -- a skipped post-norm: transformers' own layer with its post-norm module replaced by the identity ---------------

def without(hf, norm: str):
    """Every decoder layer's `norm` (post_attention_layernorm / post_feedforward_layernorm) an identity: the
    Gemma 1 layer, which adds the sub-block's output to the residual stream as it is."""
    for layer in hf.model.layers:
        setattr(layer, norm, torch.nn.Identity())
    return hf


@pytest.mark.parametrize("name, norm, tap", [("no_post_attn_norm", "post_attention_layernorm", "post_attn_norm"),
                                             ("no_post_ffw_norm", "post_feedforward_layernorm", "post_ffw_norm")])
def test_a_post_norm_skipped_in_transformers_is_found_at_that_norm_and_named(checkpoint, model, reference, ids,
                                                                              tmp_path, name, norm, tap):
    cand = G.load_case(adapter.write_golden(checkpoint, ids, tmp_path / "cand", taps="default",
                                            hf_model=without(hf_with(checkpoint), norm)))
    result = compare_cases(reference, cand, FP32)
    assert not result.passed and result.first_divergence.name == f"layers.0.{tap}"
    diag = diagnose(model, reference, cand, FP32)
    assert diag.named and diag.named[0].variant.name == name, format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)

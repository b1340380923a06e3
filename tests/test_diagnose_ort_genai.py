"""The ONNX Runtime GenAI model builder's two roundings, named by `diagnose` from the engine's own activations:
the embedding normalizer sqrt(D) rounded to two decimals (builders/gemma.py:22: `normalizer_decimals=2`) and
RMSNorm's (1 + w) added in the checkpoint's bfloat16 (builders/base.py:3163: `norm_scale_in_bf16`). In a float32
run of the bundled (bfloat16-stored) tiny model both show; from a float32 checkpoint only the normalizer does."""

import numpy as np

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.verify.compare import PROFILES
from gemma2_ref.verify.diagnose import diagnose, format_diagnosis
from gemma2_ref.verify.suites import SUITES
from tests.helpers.backends import require
from tests.helpers.hf_reference import hf_config, make_checkpoint

require("onnxruntime_genai", "pip install -e '.[ort-genai]'")
from gemma2_ref.adapters import ort_genai as adapter  # noqa: E402

FP32 = PROFILES["fp32"]


def test_the_builders_two_roundings_on_a_bfloat16_checkpoint_are_named_together(tmp_path):
    model = g2.load_model("tiny")
    case = next(c for c in SUITES["coverage"](model.config, g2.load_tokenizer("tiny")) if c.name == "window")
    ids = np.asarray(case.ids)
    cand = G.load_case(
        adapter.write_golden("tiny", ids, tmp_path / "ort", taps="default", model_dir=adapter.build("tiny"))
    )
    reference = G.load_case(S.generate_case(model, ids, tmp_path / "ours", taps="default"))
    diag = diagnose(model, reference, cand, FP32)
    named = [(r.variant.name, r.verdict) for r in diag.named]
    assert named[0] == ("normalizer_decimals=2 + norm_scale_in_bf16", "matches"), format_diagnosis(diag)


def test_a_float32_checkpoint_shows_only_the_normalizer(tmp_path):
    like_27b = dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ckpt = make_checkpoint(tmp_path / "27b", hf_config(**like_27b, query_pre_attn_scalar=24), seed=3, scale=2.0)
    model = g2.load_model(ckpt)
    ids = np.concatenate([[2], np.random.default_rng(1).integers(3, model.config.vocab_size, 12)])
    cand = G.load_case(adapter.write_golden(ckpt, ids, tmp_path / "ort", taps="default"))
    reference = G.load_case(S.generate_case(model, ids, tmp_path / "ours", taps="default"))
    diag = diagnose(model, reference, cand, FP32)
    assert [(r.variant.name, r.verdict) for r in diag.named] == [("normalizer_decimals=2", "matches")], (
        format_diagnosis(diag)
    )

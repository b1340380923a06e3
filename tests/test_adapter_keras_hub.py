"""The KerasHub adapter: keras-hub 0.32.0's GemmaBackbone (Keras 3.15.1 on JAX 0.10.2, CPU), loaded by KerasHub
itself from a Hugging Face directory, every canonical tap recorded from its layers' calls, checked against
gemma2_ref.

Measured, worst rel L2 over every tap (all 84 of the tiny model), fp32 profile limit 5e-5:

    bundled tiny, KerasHub as shipped             FAIL at layers.0.attn.scores: scores x 0.709 = (32/64)^0.5,
                                                  --diagnose: query_scale=head_dim (64) MATCHES
    bundled tiny, query scale repaired            7.96e-7 (window, 34 tokens), 7.4e-7 (long, 66): PASS
    random, query_pre_attn_scalar = head_dim, 66  4.5e-6: PASS as shipped (the 2B / 9B setting)
    the same without attention soft-cap, fused    4.2e-6: PASS, sliding window honoured on the fused path

KerasHub's decoder block hands its attention layer query_head_dim_normalize=True whatever the config says
(keras_hub/src/models/gemma/gemma_decoder_block.py:68), so a model whose query_pre_attn_scalar is not head_dim
(27B, and the tiny model) runs with head_dim^-0.5.
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras

import gemma2_ref as g2  # noqa: E402
from gemma2_ref import golden as G  # noqa: E402
from gemma2_ref import suites as S  # noqa: E402
from gemma2_ref.adapters import load_adapter  # noqa: E402
from gemma2_ref.checkpoints import random_weights, save_checkpoint  # noqa: E402
from gemma2_ref.compare import PROFILES, compare_cases  # noqa: E402
from gemma2_ref.data import bundled_path  # noqa: E402
from gemma2_ref.diagnose import diagnose  # noqa: E402
from tests.helpers.backends import require  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
INSTALL = (
    "pip install 'gemma2-ref[keras]' && pip install --no-deps keras-hub==0.32.0  (README: keras-hub's "
    "tensorflow-text would pull a second tensorflow)"
)
TINY = bundled_path("tiny")
W = g2.PRESETS["tiny"].sliding_window  # 32


@pytest.fixture(scope="module")
def adapter():
    if importlib.util.find_spec("keras_hub") is None:
        require("keras_hub", INSTALL)  # skips (fails under CI) with the install line
    return load_adapter("keras-hub")  # the adapter imports keras_hub itself, triton first (_import_keras)


@pytest.fixture(scope="module")
def repaired(adapter):
    """KerasHub on the tiny model with the query scale its decoder block drops handed back."""
    return adapter.load(TINY, "float32", fix_query_scale=True)


def long_ids(seed: int = 11) -> np.ndarray:
    """<bos> and 2W + 1 random tokens: the last rows see twice past the window."""
    return np.concatenate([[2], np.random.default_rng(seed).integers(3, 2048, 2 * W + 1)])


def ours(checkpoint, ids, tmp_path, taps="all", attention_mask=None):
    return G.load_case(
        S.generate_case(g2.load_model(checkpoint), ids, tmp_path / "ours", taps=taps, attention_mask=attention_mask)
    )


def theirs(adapter, checkpoint, ids, tmp_path, name="keras", **options):
    return G.load_case(adapter.write_golden(checkpoint, ids, tmp_path / name, **options))


def failing(result):
    return "\n".join(t.summary() for t in result.taps if not t.ok)


def test_keras_hub_scales_queries_by_head_dim_and_the_diagnosis_names_it(adapter, tmp_path):
    ref = G.load_case(GOLDEN / "short")
    cand = theirs(adapter, TINY, ref.token_ids, tmp_path, taps="all")
    assert cand.manifest["producer"]["query_head_dim_normalize"] is True  # the converter said False
    result = compare_cases(ref, cand, PROFILES["fp32"])
    assert result.first_divergence.name == "layers.0.attn.scores"  # q_rope and k_rope before it pass
    scores = result.first_divergence  # a pure rescaling by (32 / 64)^0.5
    assert scores.scale_fit["scale"] == pytest.approx((32 / 64) ** 0.5, rel=1e-2)
    best = diagnose(g2.load_model(TINY), ref, cand, PROFILES["fp32"]).named[0]
    assert (best.variant.name, best.verdict) == ("query_scale=head_dim (64)", "matches")


def test_with_the_query_scale_repaired_every_tap_passes_fp32_past_the_window(adapter, repaired, tmp_path):
    ref = G.load_case(GOLDEN / "long")  # 66 tokens, twice the window
    cand = theirs(adapter, TINY, ref.token_ids, tmp_path, taps="all", keras_model=repaired)
    result = compare_cases(ref, cand, PROFILES["fp32"])
    assert result.passed, failing(result)
    assert [t.name for t in result.compared] == adapter.reachable_taps(g2.load_config(TINY))
    assert not result.missing  # every canonical tap, attention scores and probabilities included
    assert max(t.rel_l2 for t in result.compared) < 5e-6  # measured 7.4e-7


def test_a_checkpoint_whose_query_pre_attn_scalar_is_head_dim_passes_as_shipped(adapter, tmp_path):
    """The 2B / 9B setting: KerasHub's hard-coded head_dim^-0.5 is then right."""
    cfg = g2.PRESETS["tiny"].replace(query_pre_attn_scalar=64)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg, seed=3, scale=2.0), "F32")
    ids = long_ids()
    result = compare_cases(ours(ckpt, ids, tmp_path, "default"), theirs(adapter, ckpt, ids, tmp_path), PROFILES["fp32"])
    assert result.passed, failing(result)
    assert max(t.rel_l2 for t in result.compared) < 2e-5  # measured 4.5e-6


def test_flash_attention_is_refused_on_cpu_for_a_soft_capped_model(adapter, repaired, tmp_path):
    """KerasHub never takes its fused branch on CPU (gemma_attention.py:120-135); forced, Keras refuses the
    soft-cap off TPU (keras/src/ops/nn.py:2925-2932) instead of dropping it."""
    with pytest.raises(ValueError, match="attn_logits_soft_cap is only supported for JAX on TPU"):
        adapter.write_golden(
            TINY, G.load_case(GOLDEN / "short").token_ids, tmp_path / "k", keras_model=repaired, flash_attention=True
        )


@pytest.mark.filterwarnings("ignore::gemma2_ref.config.ConfigWarning")  # no attention soft-cap: not Gemma 2
def test_forced_flash_attention_keeps_the_sliding_window(adapter, tmp_path):
    """keras-hub #2186 (window off under flash attention) is fixed: the window mask is applied before the
    branch (gemma_attention.py:153-159). Without attention soft-cap the fused branch runs on CPU."""
    cfg = g2.PRESETS["tiny"].replace(query_pre_attn_scalar=64, attn_logit_softcapping=None)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg, seed=3, scale=2.0), "F32")
    ids = long_ids()
    cand = theirs(adapter, ckpt, ids, tmp_path, flash_attention=True)
    assert cand.manifest["producer"]["flash_attention"] is True
    result = compare_cases(ours(ckpt, ids, tmp_path, "default"), cand, PROFILES["fp32"])
    assert result.passed, failing(result)
    # the fused op has no softmax layer to record: the probabilities are out of reach
    assert not any(n.endswith("attn.probs") for n in cand.activations)


def test_left_padding_shifts_only_the_rope_taps(adapter, repaired, tmp_path):
    """KerasHub ropes every row from position 0 (_apply_rope's start_index, gemma_attention.py:102-111): a
    left-padded row's tokens sit at positions shifted by its padding. RoPE is relative, so attention and
    everything after it still match; right padding matches everywhere."""
    for case, bad in (
        ("padded_batch_right", set()),
        ("padded_batch", {f"layers.{i}.attn.{x}_rope" for i in range(4) for x in "qk"}),
    ):
        ref = G.load_case(GOLDEN / case)
        cand = theirs(
            adapter,
            TINY,
            ref.token_ids,
            tmp_path,
            name=case,
            taps="all",
            keras_model=repaired,
            attention_mask=ref.attention_mask,
        )
        result = compare_cases(ref, cand, PROFILES["fp32"])
        assert {t.name for t in result.taps if not t.ok} == bad, case


def test_bfloat16_with_the_query_scale_repaired_passes_the_bf16_profile(adapter, tmp_path):
    ref = G.load_case(GOLDEN / "window")
    model = adapter.load(TINY, "bfloat16", fix_query_scale=True)
    cand = theirs(adapter, TINY, ref.token_ids, tmp_path, dtype="bfloat16", keras_model=model)
    assert cand.compute_dtype == "bfloat16"
    assert compare_cases(ref, cand, PROFILES["bf16"]).passed
    assert compare_cases(ref, cand, PROFILES["fp32"]).first_divergence.name == "embed"


def test_the_cli_runs_keras_hub_in_a_fresh_process_beside_vllm(adapter, tmp_path):
    """A fresh `gemma2-ref golden --backend keras-hub`: with vLLM installed, `import keras_hub` imports vLLM and
    triton, whose LLVM aborted the process when it loaded after TensorFlow's (the README's install line has all
    three). In this test process the import order was already settled; a new one is where it mattered."""
    import subprocess
    import sys

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gemma2_ref.cli",
            "golden",
            "tiny",
            "--tokens",
            "2 651 652",
            "--backend",
            "keras-hub",
            "--out",
            str(tmp_path / "k"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "k" / "manifest.json").is_file()

"""Every place Gemma 2 implementations round, tested exactly on its own (portable: element-wise NumPy only).

These are the decisions a regenerated golden would otherwise guard only through a same-machine hash:
the embedding normalizer is a number in the activation dtype, RMSNorm computes in (at least) float32 whatever
the activations are, and RoPE angles are position x frequency in the compute dtype."""

import math

import numpy as np

import gemma2_ref as g2
from gemma2_ref.bfloat16 import round_to_bf16
from gemma2_ref.model import embed, rms_norm, rope, rope_frequencies
from gemma2_ref.verify.mistakes import normalizer_value


def test_the_normalizer_is_sqrt_d_rounded_to_the_activation_dtype_before_the_multiply():
    model = g2.load_model("tiny")
    E = model.weights.embedding()  # float32
    ids = np.arange(2, 60)[None]
    x = embed(ids, E)
    np.testing.assert_array_equal(x, E[ids] * np.float32(math.sqrt(E.shape[1])))
    unrounded = (E[ids].astype(np.float64) * math.sqrt(E.shape[1])).astype(np.float32)
    assert (x != unrounded).any()  # a float64 normalizer is a different model, and this test sees it
    np.testing.assert_array_equal(embed(ids, E, np.float64(math.sqrt(E.shape[1]))), unrounded)
    bf16 = embed(ids, E, normalizer_value("bfloat16", E.dtype, E.shape[1]))
    np.testing.assert_array_equal(bf16, E[ids] * round_to_bf16(np.float32(math.sqrt(E.shape[1]))))
    assert round_to_bf16(np.float32(math.sqrt(3584))) == 59.75  # the 9B's sqrt(D) = 59.87 in bfloat16 (not 60)
    assert round_to_bf16(np.float32(math.sqrt(4608))) == 68.0  # the 27B's 67.88


def test_rms_norm_computes_in_float32_even_for_float16_activations():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 256)) * 40).astype(np.float16)
    w = rng.standard_normal(256).astype(np.float16) * np.float16(0.3)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == np.float16
    x32 = x.astype(np.float32)
    in32 = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(1e-6)) * (1 + w.astype(np.float32))
    np.testing.assert_array_equal(y, in32.astype(np.float16))
    with np.errstate(over="ignore"):
        in16 = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float16(1e-6)) * (np.float16(1) + w)
    assert (y != in16).any()  # x^2 overflows float16 here: computing in float16 is the mistake


def test_rope_angles_are_position_times_frequency_in_the_compute_dtype():
    Dh, theta, positions = 64, 10000.0, np.array([0, 1, 4097, 8191])
    x = np.zeros((1, len(positions), 1, Dh), np.float32)
    x[..., 0] = 1.0  # dimension 0, paired with Dh/2: rope gives (cos a, ..., sin a, ...) of angle a
    y = rope(x, positions, theta)[0, :, 0]
    angles = positions.astype(np.float32) * rope_frequencies(Dh, theta, np.float32)[0]
    np.testing.assert_array_equal(y[:, 0], np.cos(angles))
    np.testing.assert_array_equal(y[:, Dh // 2], np.sin(angles))
    freqs = rope_frequencies(Dh, theta, np.float32)
    assert freqs.dtype == np.float32
    np.testing.assert_array_equal(freqs, (1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float32) / np.float32(Dh))))
    wide = (positions[:, None] * (1.0 / theta ** (np.arange(0, Dh, 2) / Dh))).astype(np.float32)
    f32 = positions[:, None].astype(np.float32) * freqs
    assert (wide != f32).any()  # float64 angles would be another rounding: this test tells them apart

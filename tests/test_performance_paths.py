"""The fast paths are the same computation: rewriting for speed must not change a single bit."""

import numpy as np
import pytest

from gemma2_ref.model import gelu_tanh, linear, soft_cap


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tokens", [1, 3, 128, 255, 256, 300, 1023, 1024, 1100])
@pytest.mark.parametrize("d_in, d_out", [(96, 200), (77, 513), (256, 72)])
def test_linear_weight_first_and_input_first_matmuls_are_bit_identical(tokens, dtype, d_in, d_out):
    """linear() multiplies weight-first for short float32 inputs (faster with OpenBLAS threads): the same
    bits as x @ w.T."""
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((1, tokens, d_in)).astype(dtype)
    w = rng.standard_normal((d_out, d_in)).astype(dtype)
    y = linear(x, w)
    assert y.shape == (1, tokens, d_out) and y.flags.c_contiguous
    np.testing.assert_array_equal(y, (x[0] @ w.T)[None])


def test_in_place_gelu_and_soft_cap_equal_their_formulas_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, s, 20000) for s in (1e-3, 1.0, 10.0, 300.0)]).astype(np.float32)
    f = np.float32
    formula = f(0.5) * x * (1 + np.tanh(f(np.sqrt(2 / np.pi)) * (x + f(0.044715) * x * x * x)))
    np.testing.assert_array_equal(gelu_tanh(x), formula)
    np.testing.assert_array_equal(soft_cap(x, 30.0), np.tanh(x / f(30.0)) * f(30.0))
    before = x.copy()
    gelu_tanh(x), soft_cap(x, 50.0)
    np.testing.assert_array_equal(x, before)  # pure: the input is untouched

"""fast.py computes model.py's formulas with less memory or a better BLAS split: the same values.

Where the two run the same element-wise operations in the same order (the in-place soft-cap) they are
equal bit for bit on any machine. Where they call BLAS differently (weight-first matmul, attention over
trimmed key ranges), a BLAS may sum in another order: they agree to float rounding everywhere, and bit for bit
on the machine that made the committed goldens (opt-in: GEMMA2_REF_SAME_MACHINE=1)."""

import os

import numpy as np
import pytest

from gemma2_ref.fast import attention_in_blocks, gelu_tanh_, linear, soft_cap_
from gemma2_ref.model import attention, gelu_tanh, soft_cap
from gemma2_ref.taps import NO_TAPS

SAME_MACHINE = os.environ.get("GEMMA2_REF_SAME_MACHINE") == "1"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tokens", [1, 3, 128, 255, 256, 300, 1023, 1024, 1100])
@pytest.mark.parametrize("d_in, d_out", [(96, 200), (77, 513), (256, 72)])
def test_linear_is_x_times_w_transposed_whichever_matrix_goes_first(tokens, dtype, d_in, d_out):
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((1, tokens, d_in)).astype(dtype)
    w = rng.standard_normal((d_out, d_in)).astype(dtype)
    y = linear(x, w)
    assert y.shape == (1, tokens, d_out) and y.flags.c_contiguous
    exact = (x[0].astype(np.float64) @ w.T.astype(np.float64))[None]
    eps = np.finfo(dtype).eps
    assert np.abs(y - exact).max() <= 4 * eps * np.sqrt(d_in) * np.abs(exact).max()  # float rounding only
    if SAME_MACHINE:
        np.testing.assert_array_equal(y, (x[0] @ w.T)[None])


def test_in_place_gelu_equals_the_formula_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, s, 20000) for s in (1e-3, 1.0, 10.0, 300.0)]).astype(np.float32)
    expected = gelu_tanh(x)
    y = x.copy()
    assert gelu_tanh_(y) is y
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("layout", ["C", "transposed", "strided"])
def test_in_place_gelu_in_cache_blocks_covers_every_value_in_any_layout(layout):
    """More values than one GELU_BLOCK (and not a multiple of it), row-major, in another axis order, or a
    strided view: every value overwritten with the formula's."""
    from gemma2_ref.fast import GELU_BLOCK

    rng = np.random.default_rng(1)
    base = rng.normal(0, 3, (2, 3 * GELU_BLOCK // 1000 + 7, 1000)).astype(np.float32)
    x = {
        "C": base.copy(),
        "transposed": base.transpose(2, 0, 1).copy().transpose(1, 2, 0),
        "strided": base.copy()[:, ::2],
    }[layout]
    expected = gelu_tanh(x)
    assert gelu_tanh_(x) is x
    np.testing.assert_array_equal(x, expected)


def test_in_place_soft_cap_equals_the_formula_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, s, 20000) for s in (1e-3, 1.0, 10.0, 300.0)]).astype(np.float32)
    expected = soft_cap(x, 30.0)
    y = x.copy()
    assert soft_cap_(y, 30.0) is y
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(soft_cap_(x.copy(), None), x)


def test_the_formulas_are_pure_and_what_they_say():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, s, 20000) for s in (1e-3, 1.0, 10.0, 300.0)]).astype(np.float32)
    f = np.float32
    formula = f(0.5) * x * (1 + np.tanh(f(np.sqrt(2 / np.pi)) * (x + f(0.044715) * x * x * x)))
    np.testing.assert_array_equal(gelu_tanh(x), formula)
    np.testing.assert_array_equal(soft_cap(x, 30.0), np.tanh(x / f(30.0)) * f(30.0))
    before = x.copy()
    gelu_tanh(x), soft_cap(x, 50.0)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 30])
def test_attention_in_query_blocks_over_trimmed_keys_equals_attention_at_once(window, block_bytes):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 17, 4, 8)).astype(np.float32) * 3
    k = rng.standard_normal((2, 17, 2, 8)).astype(np.float32) * 3
    v = rng.standard_normal((2, 17, 2, 8)).astype(np.float32)
    pos = np.arange(17)
    whole = attention(q, k, v, pos, pos, window, 8**-0.5, 50.0)
    blocked = attention_in_blocks(attention, q, k, v, pos, pos, window, 8**-0.5, 50.0, NO_TAPS, block_bytes)
    # blocks multiply matrices of other shapes: float32 rounding (1.2e-6 here with numpy 2.3.5's OpenBLAS), no more
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)


# -- linear on a weight left as stored (a streamed layer): converted a block of rows at a time -------------


def _bf16_weight(rng, d_out, d_in):
    from gemma2_ref.bfloat16 import f32_to_bf16_bits

    return f32_to_bf16_bits(rng.standard_normal((d_out, d_in), dtype=np.float32))  # (out, in) uint16 bits


@pytest.mark.parametrize("tokens", [1, 2, 15, 16, 64, 255, 256, 300])
@pytest.mark.parametrize("d_in, d_out", [(96, 256), (77, 512), (256, 4096), (96, 200), (77, 513), (256, 4100)])
@pytest.mark.parametrize("block_bytes", [1, 40_000, 1 << 30])  # one aligned block of rows, a few, all of them
def test_linear_on_stored_bf16_equals_linear_on_the_converted_matrix(monkeypatch, tokens, d_in, d_out, block_bytes):
    """The same products and sums as converting the whole matrix first. A decode step (one row of x) on a
    matrix whose rows are a multiple of 256 (every Gemma 2 projection) is bit-identical: OpenBLAS's
    matrix-vector kernel sums each output in the same order in a block as in the whole matrix when both are
    cut at aligned rows (blocks start at multiples of STORED_BLOCK_ALIGN; its threads split 513 rows unevenly,
    and 1 output of 513 then differs in the last bit). A prefill's matrix product may be split by BLAS
    differently for a block than for the whole matrix: float rounding."""
    from gemma2_ref import fast
    from gemma2_ref.bfloat16 import bf16_bits_to_f32

    monkeypatch.setattr(fast, "STORED_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(fast, "STORED_PREFILL_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(tokens + d_out)
    bits = _bf16_weight(rng, d_out, d_in)
    x = rng.standard_normal((1, tokens, d_in)).astype(np.float32)
    converted = linear(x, bf16_bits_to_f32(bits))
    released = []
    y = linear(x, fast.StoredWeight(bits, np.float32, release=lambda: released.append(1)))
    assert y.shape == converted.shape and y.dtype == np.float32 and y.flags.c_contiguous
    assert released == [1]  # the file pages may go once the product is done
    if tokens == 1 and d_out % 256 == 0:
        np.testing.assert_array_equal(y, converted)
    exact = x[0].astype(np.float64) @ bf16_bits_to_f32(bits).T.astype(np.float64)
    assert np.abs(y[0] - exact).max() <= 4 * np.finfo(np.float32).eps * np.sqrt(d_in) * np.abs(exact).max()


@pytest.mark.parametrize("tokens", [1, 40])
def test_linear_on_stored_weights_in_other_dtypes(monkeypatch, tokens):
    """bf16 stored, float64 compute (every block widened exactly); float16 stored; float32 stored with a
    float32 compute dtype: nothing to convert, the stored matrix itself is multiplied (bit-identical)."""
    from gemma2_ref import fast
    from gemma2_ref.bfloat16 import bf16_bits_to_f32

    monkeypatch.setattr(fast, "STORED_BLOCK_BYTES", 1)
    monkeypatch.setattr(fast, "STORED_PREFILL_BLOCK_BYTES", 1)
    rng = np.random.default_rng(tokens)
    bits = _bf16_weight(rng, 300, 48)
    x64 = rng.standard_normal((tokens, 48))
    wide = linear(x64, fast.StoredWeight(bits, np.float64))
    np.testing.assert_allclose(wide, x64 @ bf16_bits_to_f32(bits).astype(np.float64).T, rtol=1e-12, atol=1e-12)
    half = bf16_bits_to_f32(bits).astype(np.float16)
    x = x64.astype(np.float32)
    np.testing.assert_allclose(
        linear(x, fast.StoredWeight(half, np.float32)), linear(x, half.astype(np.float32)), rtol=1e-5, atol=1e-5
    )
    single = bf16_bits_to_f32(bits)
    np.testing.assert_array_equal(linear(x, fast.StoredWeight(single, np.float32)), linear(x, single))
    np.testing.assert_array_equal(np.asarray(fast.StoredWeight(bits, np.float32)), single)  # for a permutation


def test_widening_bf16_gives_every_bit_pattern_its_float32_exactly():
    """All 65536 bfloat16 patterns (NaNs, infinities, subnormals, -0 included) against Python's own decoding of
    the pattern as the top half of an IEEE float32 (struct: an implementation that is not NumPy's), compared
    bit for bit; in any layout of the bits (a transposed view), into a buffer holding other values."""
    import struct

    from gemma2_ref import fast

    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    expect = np.array(
        [
            struct.unpack("<I", struct.pack("<f", struct.unpack("<f", struct.pack("<I", int(b) << 16))[0]))[0]
            if (int(b) & 0x7F80) != 0x7F80
            else int(b) << 16
            for b in bits.ravel()
        ],
        np.uint32,
    )
    for layout in (bits, bits.T):
        out = np.full(layout.shape, np.float32(7.5))
        got = fast.widen_bf16(layout, out)
        assert got is out
        np.testing.assert_array_equal(
            got.view(np.uint32), expect.reshape(256, 256) if layout is bits else expect.reshape(256, 256).T
        )

"""The fast path: model.py's formulas computed with less memory or a better use of BLAS, same values.

Read model.py for what Gemma 2 computes; this file only changes *how*, and tests/test_fast.py checks each
function here bit for bit against the formula it stands in for:

    linear               x @ w.T, weight-first for few rows (OpenBLAS splits a matmul's threads by rows);
                         a StoredWeight (a layer not kept converted: bf16 as stored) is converted a block of
                         rows at a time into one cache-sized buffer and multiplied block by block, so a
                         streamed step reads each stored byte once and no float32 copy of the layer exists
    soft_cap_            cap * tanh(x / cap) in place: the final logits are (S, 256000)
    gelu_tanh_           the tanh GELU in place, in the formula's order of operations, a cache-sized block at a
                         time: (S, F) is the largest activation of a layer, and the formula's temporaries and
                         passes over memory cost 2x-4x its time
    attention_in_blocks  attention() over blocks of queries, each on the key range its mask lets through,
                         so a long prompt never holds a whole (H, S, S) score matrix
"""

from __future__ import annotations

import math

import numpy as np

# Below this many float32 rows, linear() multiplies weight-first. Measured with 2 OpenBLAS threads on one
# 2B layer's projections: on a busy machine weight-first made a 128-token prefill 2.2x faster; on an idle
# one it is 1.4x faster at 8-32 rows, about even from 64 to 224, and 1.2x slower from 256 rows on, where its
# transposing copy costs more than the better thread split saves.
WEIGHT_FIRST_ROWS = 256

# A StoredWeight is converted this many compute-dtype bytes at a time (whole rows, a multiple of
# STORED_BLOCK_ALIGN of them): for a decode step, a block that stays in cache between its conversion and its
# matrix-vector product (256 KiB to 2 MiB took the same time here, 4 MiB a little more: floor_matrix.md);
# a prefill, which spends S multiply-adds on every converted value, takes bigger blocks and so fewer BLAS
# calls (each call re-packs x and wakes the BLAS threads: on a busy 2-core machine, 1 MiB blocks made a
# 64-token prefill of a 9B gate_proj 5x slower than 16 MiB ones).
STORED_BLOCK_BYTES = 1 << 20
STORED_PREFILL_BLOCK_BYTES = 16 << 20
STORED_PREFILL_ROWS = 16  # from this many rows of x, a product is a prefill's
# Blocks start at multiples of this many weight rows: OpenBLAS's matrix-vector kernels then group rows as
# they do for the whole matrix, and a decode step is bit-identical to x @ w.T (measured at 16, 64 and 256
# rows; 73 changed 1% of the values in the last bit).
STORED_BLOCK_ALIGN = 64

GELU_BLOCK = 1 << 17  # values: 512 KiB of float32 and as much scratch, within a core's L2 cache
MAX_SCORES_BYTES = 256 << 20  # one block of attention scores (B, H, block, keys) at most


class StoredWeight:
    """A linear weight (out, in) as the checkpoint stores it, for linear() to convert a block at a time.

    `stored`: bfloat16 bit patterns (uint16, NumPy has no bfloat16), or float16 / float32 / float64 values,
    usually a view on a memory-mapped file; `dtype`: the compute dtype. Conversion is exact (bf16 is the top
    half of a float32), so the values are those of the converted matrix. `release()`, if given, is called
    after each product: the file pages read may leave the process's resident memory (weights.MappedFiles)."""

    def __init__(self, stored: np.ndarray, dtype, release=None):
        self.stored, self.dtype, self.release = stored, np.dtype(dtype), release

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    @property
    def nbytes(self) -> int:
        """The stored bytes (what this weight keeps in memory or reads from a file)."""
        return self.stored.nbytes

    def convert(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Rows [r0, r1) in the compute dtype, written into `out` ((r1 - r0, in)). Returns out."""
        block = self.stored[r0:r1]
        if self.stored.dtype == np.uint16:  # bfloat16 bits: shifted into the high half of a float32
            if self.dtype == np.float32:
                return widen_bf16(block, out)
            out[...] = np.left_shift(block, 16, dtype=np.uint32).view(np.float32)
            return out
        out[...] = block
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole matrix in the compute dtype (for code that wants an array, e.g. a permutation)."""
        whole = self.convert(0, self.shape[0], np.empty(self.shape, self.dtype))
        return whole if dtype is None else whole.astype(dtype, copy=False)


def widen_bf16(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> their float32 values, written into `out` (bits' shape). Returns out.

    A contiguous cast into out's bytes, then a shift in place: two passes over a block that stays in cache,
    each a plain loop; one `np.left_shift(bits, 16, dtype=np.uint32)` casts through NumPy's ufunc buffers
    instead: 1.1x the time on a block in L2, 1.0-1.05x streamed; writing the bits into the high halves of the
    float32s is 1.2-1.5x (benchmarks/floor_matrix.md). The values are the same, exactly."""
    wide = out.view(np.uint32)
    np.copyto(wide, bits)
    wide <<= 16
    return out


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T for a checkpoint weight stored (out, in); one BLAS call over all leading axes (a StoredWeight:
    one per block of its rows)."""
    if isinstance(w, StoredWeight):
        return _linear_stored(x, w)
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if len(rows) < WEIGHT_FIRST_ROWS and rows.dtype == w.dtype == np.float32:
        # The same products and sums (bit-identical in float32; float64 kernels may differ in the last
        # bit, so float64 keeps x @ w.T), but OpenBLAS shares a matmul between its threads along the rows
        # of the first matrix: a short prompt or a decode step has too few rows, so the weight goes first.
        y = np.ascontiguousarray((w @ rows.T).T)
    else:
        y = rows @ w.T
    return y.reshape(*x.shape[:-1], w.shape[0])


def _linear_stored(x: np.ndarray, w: StoredWeight) -> np.ndarray:
    """linear(x, w.convert(whole)) with w's rows converted a block at a time into one reused buffer: the same
    products and sums. Bit-identical for few rows (the weight-first matrix-vector products, blocks aligned);
    for a prefill's matrix product BLAS may sum in another order (float rounding, tests/test_fast.py)."""
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
    out_features, in_features = w.shape
    if w.stored.dtype == w.dtype:  # nothing to convert: multiply the stored matrix itself
        y = linear(x, w.stored)
        if w.release is not None:
            w.release()
        return y
    block_bytes = STORED_PREFILL_BLOCK_BYTES if len(rows) >= STORED_PREFILL_ROWS else STORED_BLOCK_BYTES
    step = block_bytes // max(1, in_features * w.dtype.itemsize) // STORED_BLOCK_ALIGN * STORED_BLOCK_ALIGN
    step = min(out_features, max(STORED_BLOCK_ALIGN, step))
    buffer = np.empty((step, in_features), w.dtype)  # (block rows, in): the only converted weights there are
    weight_first = len(rows) < WEIGHT_FIRST_ROWS and rows.dtype == w.dtype == np.float32  # as linear() does
    y = np.empty((out_features, len(rows)) if weight_first else (len(rows), out_features), rows.dtype)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        block = w.convert(r0, r1, buffer[: r1 - r0])  # (r1 - r0, in)
        if weight_first:
            np.matmul(block, rows.T, out=y[r0:r1])  # (r1 - r0, tokens)
        else:
            np.matmul(rows, block.T, out=y[:, r0:r1])  # (tokens, r1 - r0)
    if w.release is not None:
        w.release()
    y = np.ascontiguousarray(y.T) if weight_first else y
    return y.reshape(*x.shape[:-1], out_features)


def soft_cap_(x: np.ndarray, cap: float | None) -> np.ndarray:
    """model.soft_cap(x, cap), overwriting x (no temporary the size of x). Returns x."""
    if cap is None:
        return x
    c = x.dtype.type(cap)
    x /= c
    np.tanh(x, out=x)
    x *= c
    return x


def gelu_tanh_(x: np.ndarray) -> np.ndarray:
    """model.gelu_tanh(x), overwriting x: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Returns x.

    Nine passes over x: done a block of GELU_BLOCK values at a time, each block stays in cache through all
    nine instead of each pass reading (S, F) from memory (2x faster at 2048 x 9216)."""
    flat = np.ravel(x, order="K")  # x's values in memory order: a view when x is contiguous in any axis order
    if not np.may_share_memory(flat, x):  # a strided view of something larger: one block, in place on x
        return _gelu_tanh_block(x, np.empty_like(x))
    t = np.empty(min(flat.size, GELU_BLOCK), x.dtype)  # the one new buffer; x is needed to the end
    for start in range(0, flat.size, GELU_BLOCK):
        block = flat[start : start + GELU_BLOCK]
        _gelu_tanh_block(block, t[: block.size])
    return x


def _gelu_tanh_block(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """gelu_tanh_ on x, with t (x's shape) as scratch: the formula's operations in its order."""
    f = x.dtype.type
    np.multiply(f(0.044715), x, out=t)
    t *= x
    t *= x
    t += x
    t *= f(math.sqrt(2.0 / math.pi))
    np.tanh(t, out=t)
    t += 1
    t *= f(0.5)  # (1 + tanh) / 2 is exact, so x * that equals (0.5 x)(1 + tanh)
    np.multiply(t, x, out=x)
    return x


def attention_in_blocks(
    attend, q, k, v, q_pos, k_pos, window, scale, softcap, taps, max_scores_bytes: int = MAX_SCORES_BYTES
) -> np.ndarray:
    """attend(q, k, v, q_pos, k_pos, window, scale, softcap, taps) (model.attention) over blocks of queries.

    Each block gets only the keys its mask can let through when keys are in position order (a prefill):
    keys more than `window` behind the block's first query, or after its last one, would get probability 0.
    The scores / probs taps need every query against every key: then the whole sequence is one block."""
    B, S, H, _ = q.shape
    T = k.shape[1]
    if taps.wants("attn.scores") or taps.wants("attn.probs"):
        return attend(q, k, v, q_pos, k_pos, window, scale, softcap, taps)
    block = max(1, min(S, max_scores_bytes // max(1, B * H * T * q.itemsize)))
    keys_in_order = k_pos.ndim == 1 and (T <= 1 or bool(np.all(k_pos[1:] > k_pos[:-1])))  # not per row
    context = np.empty((B, S, H * v.shape[-1]), dtype=q.dtype)
    for s0 in range(0, S, block):
        s1 = min(S, s0 + block)
        lo, hi = 0, T
        if keys_in_order:
            if window is not None:  # the block's earliest query sees keys from (its position - window + 1)
                lo = int(np.searchsorted(k_pos, q_pos[s0:s1].min() - window + 1, side="left"))
            hi = int(np.searchsorted(k_pos, q_pos[s0:s1].max(), side="right"))
        context[:, s0:s1] = attend(
            q[:, s0:s1], k[:, lo:hi], v[:, lo:hi], q_pos[..., s0:s1], k_pos[..., lo:hi], window, scale, softcap, taps
        )
    return context

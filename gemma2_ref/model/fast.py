"""The fast path: model.py's formulas computed with less memory or a better use of BLAS, same values.

Read model.py for what Gemma 2 computes; this file only changes *how*, and tests/test_fast.py checks each
function here bit for bit against the formula it stands in for:

    linear               x @ w.T, weight-first for few rows (OpenBLAS splits a matmul's threads by rows)
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

GELU_BLOCK = 1 << 17  # values: 512 KiB of float32 and as much scratch, within a core's L2 cache
MAX_SCORES_BYTES = 256 << 20  # one block of attention scores (B, H, block, keys) at most


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T for a checkpoint weight stored (out, in); one BLAS call over all leading axes."""
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if len(rows) < WEIGHT_FIRST_ROWS and rows.dtype == w.dtype == np.float32:
        # The same products and sums (bit-identical in float32; float64 kernels may differ in the last
        # bit, so float64 keeps x @ w.T), but OpenBLAS shares a matmul between its threads along the rows
        # of the first matrix: a short prompt or a decode step has too few rows, so the weight goes first.
        y = np.ascontiguousarray((w @ rows.T).T)
    else:
        y = rows @ w.T
    return y.reshape(*x.shape[:-1], w.shape[0])


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
        block = flat[start:start + GELU_BLOCK]
        _gelu_tanh_block(block, t[:block.size])
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


def attention_in_blocks(attend, q, k, v, q_pos, k_pos, window, scale, softcap, taps,
                        max_scores_bytes: int = MAX_SCORES_BYTES) -> np.ndarray:
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
        context[:, s0:s1] = attend(q[:, s0:s1], k[:, lo:hi], v[:, lo:hi], q_pos[..., s0:s1], k_pos[..., lo:hi],
                                   window, scale, softcap, taps)
    return context

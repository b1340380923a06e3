"""bfloat16 in NumPy, which has no bfloat16 type: bit patterns held as uint16, values as float32.

bfloat16 is the top half of a float32 (8 exponent bits, 7 mantissa bits), so bf16 -> f32 is exact: shift
the 16 bits left by 16. f32 -> bf16 rounds to nearest, ties to even, as torch does.
"""

from __future__ import annotations

import numpy as np


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32, exactly (bf16 is the high half of an f32)."""
    out = bits.astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounding to nearest, ties to even (as torch does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a (quiet) NaN
    return rounded


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16, returned as float32."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x))

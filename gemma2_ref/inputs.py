"""What users hand the model, checked before any work starts, with errors that say what is wrong and where."""

from __future__ import annotations

import numpy as np


def check_ids(ids, vocab_size: int) -> np.ndarray:
    """Token ids as an int64 (B, S) array, with a clear error for anything a forward cannot take."""
    arr = np.asarray(ids)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"token ids must be integers (a list, or a (batch, seq) array), got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"token ids must be 1-D (seq,) or 2-D (batch, seq), got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError("token ids are empty: a forward needs at least one token (normally <bos>)")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise ValueError(f"token id {int(arr[where])} at index {where} is outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int64).reshape(-1, arr.shape[-1])

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


EMPTY = np.int64(1) << 62  # the position of a padding token, or of a cache slot not yet written: "in the future"


def check_positions(positions, batch: int, seq: int) -> np.ndarray:
    """Positions as int64, (S,) for every row or (B, S) per row (a padded batch)."""
    arr = np.asarray(positions)
    if not np.issubdtype(arr.dtype, np.integer) or arr.shape not in ((seq,), (batch, seq)):
        raise ValueError(f"positions must be integers shaped ({seq},) or ({batch}, {seq}), got {arr.dtype} "
                         f"{arr.shape}")
    return arr.astype(np.int64)


def padded_positions(attention_mask) -> np.ndarray:
    """Per-row positions of a padded batch from its attention mask (B, S) (1: a token, 0: padding): each row's
    tokens count 0, 1, 2, ... from its first real token, wherever the padding is; padding sits at EMPTY."""
    mask = np.asarray(attention_mask).astype(bool)
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask, positions, EMPTY).astype(np.int64)


def pad_batch(rows, pad_id: int = 0, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Token id lists of different lengths as one (B, S) batch padded with `pad_id` on `side`, and its
    attention mask (1: a token, 0: padding)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    S = max(len(r) for r in rows)
    ids = np.full((len(rows), S), pad_id, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for b, row in enumerate(rows):
        where = slice(S - len(row), S) if side == "left" else slice(0, len(row))
        ids[b, where], mask[b, where] = row, 1
    return ids, mask

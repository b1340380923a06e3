"""What users hand the model, checked before any work starts, with errors that say what is wrong and where.

Every command applies the same rules: token ids are integers inside the vocabulary, and a prompt is at most
the model's context (`max_position_embeddings`) long.
"""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Input the model cannot take. The message names the option or argument and what to give instead."""


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


def parse_token_ids(text: str, option: str = "--tokens") -> list[int]:
    """'2 651 1234' or '2,651,1234' -> [2, 651, 1234]; an empty list or a non-integer names `option`."""
    items = text.replace(",", " ").split()
    if not items:
        raise InputError(
            f"{option} is empty: give at least one token id, e.g. {option} '2 651 1234' "
            f"(2 is <bos>), or use --prompt TEXT"
        )
    ids = []
    for n, item in enumerate(items):
        try:
            ids.append(int(item))
        except ValueError:
            raise InputError(
                f"{option}: {item!r} (item {n + 1}) is not an integer token id; give ids "
                f"separated by spaces or commas, e.g. '2 651 1234'"
            ) from None
    return ids


def check_prompt(ids, cfg, option: str = "the prompt") -> list[int]:
    """The one rule every command applies to a prompt: ids inside the vocabulary, at most the context."""
    for n, t in enumerate(ids):
        if not 0 <= t < cfg.vocab_size:
            raise InputError(
                f"{option}: token id {t} (item {n + 1}) is outside the vocabulary [0, {cfg.vocab_size}) of the model"
            )
    check_context(len(ids), cfg, option)
    return list(ids)


def check_context(length: int, cfg, what: str = "the prompt") -> None:
    """Refuse a prompt longer than the model's context: positions beyond it were never trained."""
    if length > cfg.max_position_embeddings:
        raise InputError(
            f"{what} has {length} tokens, more than the model's context "
            f"(max_position_embeddings = {cfg.max_position_embeddings} in its config.json): "
            f"shorten it"
        )
    if length == 0:
        raise InputError(f"{what} is empty: a forward needs at least one token (normally <bos>)")


def check_position_range(positions, length: int, option: str = "--positions") -> tuple[int, int]:
    """(start, stop or None) -> a query-position range [start, stop) inside a prompt of `length` tokens."""
    start, stop = positions
    stop = length if stop is None else stop
    if not 0 <= start < stop <= length:
        raise InputError(
            f"{option} {start}:{stop} is not a range inside the prompt's {length} tokens: give "
            f"START:STOP with 0 <= START < STOP <= {length}"
        )
    return start, stop


EMPTY = np.int64(1) << 62  # the position of a padding token, or of a cache slot not yet written: "in the future"


def check_positions(positions, batch: int, seq: int) -> np.ndarray:
    """Positions as int64, (S,) for every row or (B, S) per row (a padded batch)."""
    arr = np.asarray(positions)
    if not np.issubdtype(arr.dtype, np.integer) or arr.shape not in ((seq,), (batch, seq)):
        raise ValueError(f"positions must be integers shaped ({seq},) or ({batch}, {seq}), got {arr.dtype} {arr.shape}")
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

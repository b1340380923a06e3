"""What every adapter declares and what they share: the protocol `gemma2-ref golden --backend` calls, the taps a
capture is asked for, and writing the captured activations as a candidate golden case.

An adapter is a module with:

    CAPABILITIES = Capabilities(padded_batch=..., decode=...)   what it runs besides one plain sequence
    reachable_taps(cfg) -> list[str]                            the canonical taps it can expose, in order
    backend_options(checkpoint, args) -> dict                   what to load once for every case of a suite
    write_golden(checkpoint, ids, out_dir, *, dtype, taps, text, description, positions, **options) -> Path

`padded_batch`: write_golden takes `attention_mask` (B, S); `decode`: it takes `prefill` and runs the rest of
the ids one token per step through the engine's own KV cache. A case an adapter cannot run is refused with
`NotImplementedError` (a suite skips it and says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model.taps import select_taps
from ..verify.golden import model_info_from_files, write_case
from ..verify.suites import decode_extra

PROTOCOL = ("CAPABILITIES", "reachable_taps", "backend_options", "write_golden")
MATRIX_TAPS = ("attn.scores", "attn.probs")  # (H, S, T): a decode step's T differs from the prefill's


@dataclass(frozen=True)
class Capabilities:
    padded_batch: bool = False  # write_golden(..., attention_mask=(B, S))
    decode: bool = False  # write_golden(..., prefill=n): ids[n:] one token per step through the engine's cache
    chunked_prefill: bool = False  # write_golden(..., prefill=n, chunks=[...]): the ids in forwards of those lengths
    limit: str = ""  # any other kind of case it refuses, in words (the backends table shows it)

    def refusal(self, backend: str, case: dict) -> str | None:
        """Why this backend cannot run a case given `attention_mask` / `prefill` / `chunks` (None: it can)."""
        if "attention_mask" in case and not self.padded_batch:
            return f"the {backend} adapter does not run padded batches"
        if "prefill" in case and not self.decode:
            return f"the {backend} adapter does not run a KV-cache decode"
        if "chunks" in case and not self.chunked_prefill:
            return f"the {backend} adapter does not run a chunked prefill"
        return None


def check_protocol(module) -> None:
    """Refuse an adapter module that does not declare the whole protocol, naming what it lacks."""
    missing = [name for name in PROTOCOL if not hasattr(module, name)]
    if missing:
        raise TypeError(f"adapter {module.__name__} lacks {', '.join(missing)} (see gemma2_ref/adapters/base.py)")
    if not isinstance(module.CAPABILITIES, Capabilities):
        raise TypeError(f"adapter {module.__name__}: CAPABILITIES must be a base.Capabilities")


def wanted_taps(cfg, taps, decode: bool = False) -> set[str]:
    """The canonical taps a capture keeps: those asked for, and always the logits; a decode case has no
    (H, S, T) attention matrices (each step attends to another number of keys)."""
    wanted = set(select_taps(cfg, taps)) | {"logits"}
    return {n for n in wanted if not n.endswith(MATRIX_TAPS)} if decode else wanted


def write_candidate(
    out_dir,
    acts: dict,
    ids,
    *,
    checkpoint,
    cfg,
    producer: dict,
    adapter: str,
    compute_dtype: str,
    text=None,
    description=None,
    positions=None,
    attention_mask=None,
    prefill: int | None = None,
    chunks=None,
    model: dict | None = None,
) -> Path:
    """Write what a backend computed as a golden case: the producer (the engine's name and versions, then the
    adapter module), the checkpoint's model_info, and for a decode case its prefill and step count."""
    extra = None if prefill is None else {"decode": decode_extra(int(np.shape(ids)[-1]), prefill, chunks)}
    return write_case(
        out_dir,
        acts,
        np.asarray(ids),
        producer={**producer, "adapter": adapter},
        model=model or model_info_from_files(checkpoint, cfg),
        text=text,
        compute_dtype=compute_dtype,
        description=description,
        positions=positions,
        attention_mask=attention_mask,
        extra=extra,
    )

"""Taps: the canonical names of every intermediate tensor, their shapes, and the recorder the forward offers
them to. One table serves the forward, the golden budgets, the adapters and the tests.

    embed                                    (S, D)
    layers.{i}.input ... layers.{i}.output   LAYER_TAPS, per layer, in execution order
    final_norm (S, D), logits_raw (S, V), logits (S, V)

A leading batch axis is added when the forward is given a (batch, seq) input. docs/architecture.md lists
each tap's meaning (MEANING).
"""

from __future__ import annotations

import copy
import fnmatch
import re

import numpy as np

from .bfloat16 import round_to_bf16
from .config import Gemma2Config

LAYER_TAPS = (
    "input",
    "pre_attn_norm",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.q_rope",
    "attn.k_rope",
    "attn.scores",
    "attn.probs",
    "attn.context",
    "attn.out",
    "post_attn_norm",
    "resid_mid",
    "pre_ffw_norm",
    "mlp.gate",
    "mlp.up",
    "mlp.hidden",
    "mlp.out",
    "post_ffw_norm",
    "output",
)
LARGE_TAPS = ("attn.scores", "attn.probs")  # (H, S, T) each: opt-in only
FINAL_TAPS = ("final_norm", "logits_raw", "logits")

# What each tap holds (docs/architecture.md's tap table is generated from this and tap_shape: scripts/make_docs.py)
MEANING = {
    "embed": "embedding rows x normalizer sqrt(D) (rounded to the activation dtype)",
    "input": "residual stream entering layer i",
    "pre_attn_norm": "input RMSNorm output",
    "attn.q_proj": "query projection, heads split, before RoPE",
    "attn.k_proj": "key projection, heads split, before RoPE",
    "attn.v_proj": "value projection, heads split",
    "attn.q_rope": "queries after RoPE",
    "attn.k_rope": "keys after RoPE",
    "attn.scores": "q·k x scale, soft-capped, before the mask (opt-in: large)",
    "attn.probs": "after the causal / sliding mask and softmax (opt-in: large)",
    "attn.context": "probs @ v, heads merged, before o_proj",
    "attn.out": "after o_proj",
    "post_attn_norm": "post-attention RMSNorm output (with `post_attn_norm=False`, the Gemma 1 layer: `attn.out`)",
    "resid_mid": "residual after the attention block",
    "pre_ffw_norm": "pre-feed-forward RMSNorm output",
    "mlp.gate": "gate projection",
    "mlp.up": "up projection",
    "mlp.hidden": "gelu_tanh(gate) * up",
    "mlp.out": "after the down projection",
    "post_ffw_norm": "post-feed-forward RMSNorm output (with `post_ffw_norm=False`: `mlp.out`)",
    "output": "residual stream leaving layer i",
    "final_norm": "final RMSNorm output",
    "logits_raw": "tied unembedding, before the final soft-cap",
    "logits": "after the final soft-cap",
}


def tap_names(cfg: Gemma2Config) -> list[str]:
    """Every canonical tap name, in execution order."""
    names = ["embed"]
    for i in range(cfg.num_hidden_layers):
        names += [f"layers.{i}.{t}" for t in LAYER_TAPS]
    return names + list(FINAL_TAPS)


def tap_kind(name: str) -> str:
    """ "layers.3.attn.q_rope" -> "attn.q_rope"; "embed", "logits" stay as they are."""
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def taps_of_kinds(cfg: Gemma2Config, layer_kinds) -> list[str]:
    """embed, the final taps, and each layer's taps whose kind is in `layer_kinds` (e.g. LAYER_TAPS), in
    execution order: what an adapter whose backend exposes those kinds can capture."""
    return [n for n in tap_names(cfg) if not n.startswith("layers.") or tap_kind(n) in layer_kinds]


def tap_shape(cfg: Gemma2Config, name: str, seq: int, keys: int | None = None) -> tuple[int, ...]:
    """The shape of one sequence's tap (no batch axis): `seq` query positions, `keys` key positions
    (default `seq`: a prefill; a decode step attends to its cache)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kind = tap_kind(name)
    if kind in ("attn.q_proj", "attn.q_rope"):
        return (seq, H, Dh)
    if kind in ("attn.k_proj", "attn.k_rope", "attn.v_proj"):
        return (seq, K, Dh)
    if kind in LARGE_TAPS:
        return (H, seq, seq if keys is None else keys)
    if kind == "attn.context":
        return (seq, H * Dh)
    if kind in ("mlp.gate", "mlp.up", "mlp.hidden"):
        return (seq, F)
    if kind in ("logits_raw", "logits"):
        return (seq, V)
    return (seq, D)


def select_taps(cfg: Gemma2Config, which) -> list[str]:
    """Resolve a tap set: "all", "default" (all but scores/probs), "residual", or names / glob patterns."""
    names = tap_names(cfg)
    if which is None:
        return ["logits"]
    if isinstance(which, str) and which in ("all", "default", "residual"):
        if which == "all":
            return names
        if which == "default":
            return [n for n in names if not n.endswith(LARGE_TAPS)]
        return [n for n in names if n in ("embed", "final_norm", "logits") or n.endswith(".output")]
    patterns = [which] if isinstance(which, str) else list(which)
    chosen = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(
                f"tap pattern {pattern!r} matches no tap of this model; tap names look like "
                f"'embed', 'layers.0.attn.q_rope', 'layers.*.output', 'logits'"
            )
        chosen.update(matched)
    return [n for n in names if n in chosen]


def canonical_order(names) -> list[str]:
    """Tap names in execution order (embed, layers by number and step, final_norm, logits_raw, logits);
    names that are not canonical taps come last, sorted."""

    def key(name: str):
        if name == "embed":
            return (0, 0, 0, name)
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m and m.group(2) in LAYER_TAPS:
            return (1, int(m.group(1)), LAYER_TAPS.index(m.group(2)), name)
        if name in FINAL_TAPS:
            return (2, FINAL_TAPS.index(name), 0, name)
        return (3, 0, 0, name)

    return sorted(names, key=key)


def sequence_axis(name: str, ndim: int, batched: bool) -> int:
    """The query-position axis of a tap: 0 for (S, ...), 1 for (H, S, T) scores/probs; +1 with a batch."""
    return (1 if name.endswith(LARGE_TAPS) else 0) + (1 if batched else 0)


def tap_bytes(cfg: Gemma2Config, taps, batch: int, seq: int, itemsize: int = 4, rows: int | None = None) -> int:
    """Bytes the taps of one case take: `seq` tokens run, `rows` query positions stored (default all)."""
    names = set(select_taps(cfg, taps)) | {"logits"}
    per_row = sum(int(np.prod(tap_shape(cfg, n, 1, keys=seq))) for n in names)
    return per_row * batch * (seq if rows is None else rows) * itemsize


class NonFiniteError(ValueError):
    """The forward produced NaN or Inf. The message names the first tap (execution order), where, how many."""


def first_non_finite(trace: dict) -> tuple[str, tuple[int, ...], int, int, int] | None:
    """The first tap in execution order holding a NaN or Inf: (name, index of the first one, NaN count,
    Inf count, size), or None when every value is finite. One np.isfinite pass over what is recorded."""
    for name in canonical_order(trace):
        a = trace[name]
        if not np.isfinite(a).all():
            bad = ~np.isfinite(a)
            nan = int(np.isnan(a).sum())
            return name, tuple(int(i) for i in np.argwhere(bad)[0]), nan, int(bad.sum()) - nan, int(a.size)
    return None


NORM_STEPS = ("rms.squares", "rms.variance", "rms.normed", "rms.scale")  # gemma2.rms_norm's inner steps


class Taps:
    """Every named intermediate passes through here: `x = taps("name", x)`. Records the requested ones
    (copies, so later in-place work cannot change them), or hands each to `sink(name, value)` the moment it
    is produced (golden.CaseWriter writes it to disk there, so a case's taps are never all in memory; the
    sink must be done with the value when it returns). With `round_to` ("bfloat16" or "float16") it also
    rounds each value to that dtype and returns the rounded one, so the rest of the forward computes on it:
    a float32 forward then makes the rounding errors of a backend that stores its activations in that dtype.
    RMSNorm's inner steps (NORM_STEPS) pass through untouched: a correct backend computes them in float32;
    a subclass may round them (verify/mistakes.py: a backend that does not). `layer(i)` keeps the class."""

    def __init__(self, wanted, prefix: str = "", out: dict | None = None, round_to: str | None = None, sink=None):
        self.ordered = list(wanted)  # the requested names, in the order the forward returns them
        self.wanted = wanted if isinstance(wanted, (set, frozenset)) else set(wanted)
        self.prefix = prefix
        self.out = {} if out is None else out
        self.round_to = round_to
        self.sink = sink
        if round_to not in (None, "bfloat16", "float16"):
            raise ValueError(f"round_to must be 'bfloat16', 'float16' or None, not {round_to!r}")

    def wants(self, name: str) -> bool:
        return self.prefix + name in self.wanted

    def __call__(self, name: str, value: np.ndarray) -> np.ndarray:
        if name in NORM_STEPS:
            return value
        value = round_to_dtype(value, self.round_to)
        if self.prefix + name in self.wanted:
            if self.sink is not None:
                self.sink(self.prefix + name, value)
            else:
                self.out[self.prefix + name] = np.array(value, copy=True)
        return value

    def layer(self, i: int) -> Taps:
        """The recorder for layer i's taps (the same recorder, its names prefixed `layers.{i}.`)."""
        inner = copy.copy(self)
        inner.prefix = f"layers.{i}."
        return inner

    def unbatched_sink(self) -> Taps:
        """The same recorder whose sink receives one sequence's tap (the batch axis of one dropped)."""
        inner, sink = copy.copy(self), self.sink
        inner.sink = lambda name, value: sink(name, value[0])
        return inner


def round_to_dtype(value: np.ndarray, dtype: str | None) -> np.ndarray:
    """`value` rounded to bfloat16 or float16 (kept in its own dtype); None: as it is."""
    if dtype == "bfloat16":
        return round_to_bf16(value.astype(np.float32, copy=False)).astype(value.dtype, copy=False)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return value.astype(np.float16).astype(value.dtype)
    return value


NO_TAPS = Taps(frozenset())

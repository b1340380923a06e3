"""Text generation: a KV cache, a prefill, then one token at a time. NumPy only.

    cache = KVCache(cfg)                               keys/values of every position seen so far
    logits = forward(prompt, kv_cache=cache)[-1]       prefill: the whole prompt in one pass
    repeat:  t = sample_next(logits, ...)              greedy (argmax) or temperature / top-k / top-p
             logits = forward([t], kv_cache=cache)[-1] decode: one new position, attending to the cache

The cache is where backends most often go wrong, so it is kept as plain as the forward:

* A **global** layer attends to every earlier position: its cache keeps all keys and values, in a buffer
  preallocated to a capacity (grown by doubling, never re-concatenated per token).
* A **sliding** layer (window W) never looks further back than W - 1 positions, so its cache is a ring
  buffer of exactly W slots: position p lives in slot p % W, overwriting position p - W, which no later
  query can see. Memory stays O(W) however long the generation runs (4096 slots for every Gemma 2 size).

The forward calls `cache.update(layer, k, v, positions)` with this step's keys/values (after RoPE) and
attends over what it returns. Attention builds its mask from absolute positions, so the ring buffer can hand
its filled slots over in slot order; a slot not yet written carries position EMPTY (far in the future), which
causality hides (slots fill from 0 up, so EMPTY slots only show when positions do not start at 0).

Prefill longer than the window: the prompt's queries need the prompt's own keys up to W - 1 back, which a
ring of W slots cannot hold all at once. So `update` returns the cached slots *plus* this step's keys, and
only afterwards keeps the last W of them in the ring. A one-token decode step can write first and return
the ring itself (the slot it overwrites holds position p - W, outside the window): no copy.
The ring follows the config's window, so a model with a window mistake (mistakes.py: `sliding_window`
+-1, every layer global) decodes through a cache sized for *its* window, as the mistaken backend would.

The decode loop is where backends go wrong in ways a prefill never shows. The known ones (verify/mistakes.py,
`decode_*` and `prefill_chunk_overflows_ring`) are not switches here: a mistaken model hands `generate` and
`decode_taps` its own cache (`model.kv_cache(capacity)`, a KVCache subclass in verify/mistakes.py), so it
decodes as the mistaken backend does, through this same loop.

Taps work in decode steps too, with the same names and one position: (1, D), (1, H, Dh), ... The
attention taps `attn.scores` / `attn.probs` then have one column per cache slot, (H, 1, T), in the cache's
order (slot order for a sliding layer, with EMPTY slots masked); `KVCache.key_positions(layer)` gives the
position of each column.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .config import Gemma2Config
from .gemma2 import softmax
from .inputs import EMPTY  # the position of an unfilled slot: "in the future", so the causal mask hides it
from .taps import LARGE_TAPS, select_taps
from .tokenizer import END_OF_TURN, EOS

# -- the KV cache -----------------------------------------------------------------------------------------


@dataclass
class LayerCache:
    """One layer's keys and values: (B, slots, K, Dh) each, and the absolute position held in each slot."""

    k: np.ndarray
    v: np.ndarray
    pos: np.ndarray  # (slots,) int64, EMPTY where nothing was written yet
    window: int | None  # None: global (append), else a ring buffer of `window` slots (the layer's window)
    filled: int = 0  # slots in use: a prefix [0, filled) (a ring fills slots 0, 1, ... before it wraps)


class KVCache:
    """Per-layer keys/values for incremental decoding: global layers append, sliding layers keep a ring.

    `length` is the number of positions processed so far (the next token's default position). Buffers are
    allocated on the first `update` (they take the batch size and dtype of the keys). `capacity`: the number
    of positions a global layer preallocates (e.g. prompt + new tokens); it grows by doubling if exceeded."""

    def __init__(self, cfg: Gemma2Config, capacity: int | None = None):
        self.cfg = cfg
        self.capacity = capacity
        self.length = 0
        self.prefill: int | None = None  # positions in the first forward (the first decode step's position)
        self.layers: list[LayerCache | None] = [None] * cfg.num_hidden_layers

    # -- the protocol forward() uses -------------------------------------------------------------------
    def update(self, layer: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray):
        """Add this step's k, v (B, S, K, Dh) at `positions` (S,); return (k_all, v_all, k_pos) to attend over."""
        c = self.layers[layer]
        if c is None:
            c = self.layers[layer] = self._allocate(layer, k, len(positions))
        if c.window is None:
            seen = _append(c, k, v, positions)
        else:
            seen = _ring_update(c, k, v, positions)
        return seen

    def advance(self, steps: int) -> None:
        if self.prefill is None:
            self.prefill = steps
        self.length += steps

    # -- inspection ------------------------------------------------------------------------------------
    def key_positions(self, layer: int) -> np.ndarray:
        """The position of each key column this layer's attention sees in a one-token decode step."""
        c = self.layers[layer]
        if c is None:
            return np.zeros(0, np.int64)
        return c.pos[: c.filled].copy()

    def memory_bytes(self) -> int:
        """Bytes held by the key/value buffers (allocated capacity, not only the filled part)."""
        return sum(c.k.nbytes + c.v.nbytes + c.pos.nbytes for c in self.layers if c is not None)

    def _allocate(self, layer: int, k: np.ndarray, steps: int) -> LayerCache:
        B, _, K, Dh = k.shape
        window = self.cfg.window(layer)
        slots = window if window is not None else max(self.capacity or 0, self.length + steps, 1)
        return LayerCache(
            np.zeros((B, slots, K, Dh), k.dtype),
            np.zeros((B, slots, K, Dh), k.dtype),
            np.full(slots, EMPTY, np.int64),
            window,
        )


def _append(c: LayerCache, k, v, positions):
    """Global layer: write after the filled slots (doubling the buffer when full), return everything."""
    n, S = c.filled, k.shape[1]
    if n + S > c.pos.shape[0]:
        slots = max(2 * c.pos.shape[0], n + S)
        grown = [np.zeros((c.k.shape[0], slots) + c.k.shape[2:], c.k.dtype) for _ in range(2)]
        grown[0][:, :n], grown[1][:, :n] = c.k[:, :n], c.v[:, :n]
        pos = np.full(slots, EMPTY, np.int64)
        pos[:n] = c.pos[:n]
        c.k, c.v, c.pos = grown[0], grown[1], pos
    c.k[:, n : n + S], c.v[:, n : n + S], c.pos[n : n + S] = k, v, positions
    c.filled = n + S
    return c.k[:, : n + S], c.v[:, : n + S], c.pos[: n + S]  # views: keys in position order


def _ring_update(c: LayerCache, k, v, positions):
    """Sliding layer: position p goes to slot p % W. Returns what this step's queries may need."""
    W, S, n = c.window, k.shape[1], c.filled
    if S == 1:  # decode: the overwritten slot held position p - W, which the window hides anyway
        slot = int(positions[0]) % W
        c.k[:, slot], c.v[:, slot], c.pos[slot] = k[:, 0], v[:, 0], positions[0]
        c.filled = max(n, slot + 1)
        return c.k[:, : c.filled], c.v[:, : c.filled], c.pos[: c.filled]  # slot order; EMPTY slots are masked
    # prefill / chunk: attend over the cached slots and all S new keys, then keep the last W in the ring
    k_all = np.concatenate([c.k[:, :n], k], axis=1)
    v_all = np.concatenate([c.v[:, :n], v], axis=1)
    pos_all = np.concatenate([c.pos[:n], positions])
    keep = slice(max(0, S - W), S)
    slots = positions[keep] % W
    c.k[:, slots], c.v[:, slots], c.pos[slots] = k[:, keep], v[:, keep], positions[keep]
    c.filled = max(n, int(slots.max()) + 1)
    return k_all, v_all, pos_all


# -- choosing the next token ------------------------------------------------------------------------------


def greedy(logits: np.ndarray) -> int:
    """The most likely token; on a tie the lowest id (np.argmax returns the first maximum)."""
    return int(np.argmax(logits))


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties broken towards the lower id), set the rest to -inf."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    order = np.argsort(-logits, kind="stable")  # descending, equal logits in id order
    out = np.full_like(logits, -np.inf)
    out[order[:k]] = logits[order[:k]]
    return out


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p (at least one)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    n_keep = int(np.searchsorted(np.cumsum(probs), p, side="left")) + 1  # first prefix reaching p
    n_keep = min(max(n_keep, 1), logits.shape[-1])  # rounding can leave the full sum a hair below p = 1
    out = np.full_like(logits, -np.inf)
    out[order[:n_keep]] = logits[order[:n_keep]]
    return out


FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 1.1754944e-38, the smallest normal float32


def min_temperature(peak: float) -> float:
    """The smallest temperature T for which logits / T stays finite in float32, when |logit| <= `peak`.

    Sampling divides the logits by T. After Gemma 2's final soft-cap c, |logit| <= c (c * tanh, |tanh| <= 1),
    so every logit / T is at most c / T, finite in float32 while c / T <= FLOAT32_MAX: T >= c / FLOAT32_MAX
    (30 / 3.4e38 = 8.8e-38 for Gemma 2), rounded up to the next float32 so that the division in float32 stays
    finite too, and never below the smallest normal float32 (a subnormal temperature has lost its precision).
    Below it, logit / T is inf, softmax gives NaN, and a sampler silently returns a fixed token."""
    t = np.float32(peak / FLOAT32_MAX)
    if float(t) < peak / FLOAT32_MAX:
        t = np.nextafter(t, np.float32(np.inf))
    return max(float(t), FLOAT32_TINY)


def check_sampling(temperature, top_k=None, top_p=None) -> None:
    """The sampling settings, refused with a line naming the argument: a NaN, an Inf, a negative."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.number))
        or not (math.isfinite(temperature) and temperature >= 0)
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if 0 < temperature < FLOAT32_TINY:
        raise ValueError(
            f"temperature {temperature!r} underflows float32 (the smallest normal is "
            f"{FLOAT32_TINY:.8g}): give 0 for greedy decoding or a temperature >= {FLOAT32_TINY:.8g}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next(
    logits: np.ndarray,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> int:
    """The next token from one row of logits (V,). temperature 0: greedy, and top_k / top_p are ignored.
    Otherwise, as Hugging Face does it: logits / temperature, then top-k, then top-p, then one draw.
    Logits holding NaN or +Inf, or a temperature below min_temperature(max |logit|), are refused: either
    would make every probability NaN and the draw meaningless."""
    check_sampling(temperature, top_k, top_p)
    logits = np.asarray(logits)
    bad = np.flatnonzero(np.isnan(logits) | (logits == np.inf))
    if len(bad):
        raise ValueError(
            f"the logits hold {'NaN' if np.isnan(logits.flat[bad[0]]) else '+Inf'} at token "
            f"{int(bad[0])} ({len(bad)} such of {logits.size}): no token can be chosen from them"
        )
    if temperature == 0:
        return greedy(logits)
    finite = logits[np.isfinite(logits)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if temperature < min_temperature(peak):
        raise ValueError(
            f"temperature {temperature!r} is too small for these logits: max |logit| {peak:.6g} / "
            f"temperature overflows float32; the smallest is {min_temperature(peak):.8g} (or 0 for "
            f"greedy decoding)"
        )
    x = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    probs = softmax(x)
    rng = rng if rng is not None else np.random.default_rng()
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))  # a zero-probability token has
    return min(token, int(np.flatnonzero(probs)[-1]))  # an empty interval: never drawn


# -- generation -------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What `generate` produced: the new tokens (a stop token included, as the last one), why it stopped
    ("stop", "max_new_tokens" or "context"), the logits each token was chosen from (if kept), the taps of
    each forward (index 0 = the prefill), timings and the cache size."""

    tokens: list[int] = field(default_factory=list)
    stop_reason: str = "max_new_tokens"
    logits: list[np.ndarray] = field(default_factory=list)
    taps: list[dict] = field(default_factory=list)
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # one-token forwards after the prefill
    decode_seconds: float = 0.0
    cache_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        def rate(tokens_per_s):  # no rate for no tokens, rather than "nan tok/s"
            return f" ({tokens_per_s:.1f} tok/s)" if tokens_per_s == tokens_per_s else ""

        return (
            f"prefill {self.prefill_tokens} tokens in {self.prefill_seconds:.3f} s"
            f"{rate(self.prefill_tokens_per_s)}, decode {self.decode_tokens} tokens in "
            f"{self.decode_seconds:.3f} s{rate(self.decode_tokens_per_s)}, "
            f"cache {self.cache_bytes / 2**20:.2f} MiB"
        )


def check_generation(cfg: Gemma2Config, prompt: np.ndarray, max_new_tokens, temperature, top_k, top_p) -> None:
    """generate's arguments, refused before any work: one 1-D prompt within the context, a count >= 0, and
    sampling settings that keep logits / temperature finite (min_temperature)."""
    if prompt.ndim != 1:
        raise ValueError(f"generate takes one prompt, a 1-D sequence of token ids; got shape {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = cfg.max_position_embeddings
    if len(prompt) > context:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens, more than the model's context (max_position_embeddings = {context})"
        )
    check_sampling(temperature, top_k, top_p)
    cap = cfg.final_logit_softcapping
    if cap is not None and 0 < temperature < min_temperature(cap):
        raise ValueError(
            f"temperature {temperature!r} is below {min_temperature(cap):.8g}, the smallest for which "
            f"logits / temperature stays finite in float32 (|logits| <= final_logit_softcapping = "
            f"{cap:g}): give 0 for greedy decoding or a larger temperature"
        )


def generate(
    model,
    ids,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids=(EOS, END_OF_TURN),
    on_token=None,
    taps=None,
    keep_logits: bool = False,
    progress=None,
) -> Generation:
    """Continue the 1-D token ids `ids` (the prompt, <bos> included) by up to `max_new_tokens` tokens.

    Greedy by default (temperature 0); otherwise seeded sampling with optional top-k / top-p. Stops after
    emitting a token in `stop_ids` (<eos>, <end_of_turn>), after `max_new_tokens`, or at the model's
    context length. `on_token(token)` is called as each token is chosen (streaming). `taps` are recorded
    for every forward (see the module docstring for decode-step shapes). `progress(done, total)` is passed
    to the prefill forward. Load the model with `keep_converted=True` (or "auto") unless it does not fit in
    memory: otherwise every decode step converts every layer's weights again."""
    prompt = np.asarray(ids)
    check_generation(model.config, prompt, max_new_tokens, temperature, top_k, top_p)
    context = model.config.max_position_embeddings
    rng = np.random.default_rng(seed)
    stop = {int(t) for t in stop_ids}
    cache = model.kv_cache(min(len(prompt) + max_new_tokens, context))
    out = Generation(prefill_tokens=len(prompt))
    if max_new_tokens == 0:
        return out

    t0 = time.perf_counter()
    step = model.forward(prompt, taps=taps, kv_cache=cache, logits_at="last", progress=progress)
    out.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        logits = step["logits"][-1]  # (V,)
        if taps is not None:
            out.taps.append({name: value for name, value in step.items() if name != "logits"})
        if keep_logits:
            out.logits.append(logits)
        token = sample_next(logits, temperature, top_k, top_p, rng)
        out.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop:
            out.stop_reason = "stop"
            break
        if len(out.tokens) == max_new_tokens:
            break
        if len(prompt) + out.decode_tokens >= context:
            out.stop_reason = "context"
            break
        step = model.forward([token], taps=taps, kv_cache=cache, logits_at="last")
        out.decode_tokens += 1
    out.decode_seconds = time.perf_counter() - t0 if out.decode_tokens else 0.0
    out.cache_bytes = cache.memory_bytes()
    return out


def decode_taps(model, ids, prefill: int, taps="default", chunks=None) -> dict[str, np.ndarray]:
    """The taps of the KV-cache path, teacher-forced: a prefill of ids[:prefill], then ids[prefill:] one token
    per forward, each step's taps (one position) stacked after the prefill's along the positions: the same
    names and shapes as a full forward over `ids`, computed as a backend's decode loop computes them. Row
    `prefill + k` is decode step k. `chunks`: the lengths of the forwards instead (a chunked prefill, e.g.
    (W, 2W, 1, 1, ...): chunks[0] is the prefill; they sum to len(ids)). Scores and probs are left out (each
    step attends to another number of cache slots). The cache is the model's own (`model.kv_cache`, sized for
    all of `ids`: a static cache), so a model with a decode-loop mistake (mistakes.inject) makes it."""
    ids = np.asarray(ids)
    sizes = list(chunks) if chunks is not None else [prefill] + [1] * (len(ids) - prefill)
    if ids.ndim != 1 or not 0 < prefill < len(ids) or sizes[0] != prefill or sum(sizes) != len(ids) or min(sizes) < 1:
        raise ValueError(
            f"decode_taps takes 1-D ids, a prefill of 1 .. {len(ids) - 1} tokens and chunks of at "
            f"least one token summing to {len(ids)}, starting with the prefill; got {ids.shape}, "
            f"{prefill} and {sizes[:8]}"
        )
    names = [n for n in select_taps(model.config, taps) if not n.endswith(LARGE_TAPS)]
    cache = model.kv_cache(len(ids))
    starts = np.cumsum([0] + sizes[:-1])
    steps = [model.forward(ids[s : s + n], taps=names, kv_cache=cache) for s, n in zip(starts, sizes)]
    return {name: np.concatenate([s[name] for s in steps], axis=0) for name in steps[0]}


class TextStream:
    """Incremental detokenization for streaming: `push(token)` returns the text added by that token.

    A token's text depends on its neighbours: byte-fallback pieces <0xE2><0x82><0xAC> make one "€" only
    together, and SentencePiece drops the leading space of the first piece it decodes. So we decode a few
    prompt tokens (`prefix`) plus the whole continuation each time and emit what was added, holding back
    while the text ends in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer, prefix=()):
        self.tokenizer = tokenizer
        self.prefix = [int(t) for t in list(prefix)[-8:]]
        self.ids: list[int] = []
        self.printed = tokenizer.decode(self.prefix)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.prefix + self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed) :], text
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        text = self.tokenizer.decode(self.prefix + self.ids)
        new = text[len(self.printed) :] if text.startswith(self.printed) else ""
        self.printed = text
        return new

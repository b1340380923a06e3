"""The Gemma 2 forward pass in NumPy: small pure functions, one per idea, composed by `forward`.

Read top to bottom, this file is the model:

    x = E[ids] * sqrt(D)                                   embed            (normalizer in the activation dtype)
    for each layer i:                                      decoder_layer
        h = x + post_attn_norm(attention(pre_attn_norm(x)))     sliding window on even layers, global on odd
        x = h + post_ffw_norm(mlp(pre_ffw_norm(h)))             GeGLU: down(gelu_tanh(gate(h)) * up(h))
    logits = soft_cap(final_norm(x) @ E.T, 30)             tied output head, final soft-cap

Arrays carry a leading batch axis inside: (B, S, D). Every intermediate is offered to a `Taps` recorder
under its canonical name (DESIGN.md); taps that were not asked for cost a set lookup.

Computation is in float32 (default) or float64. Where released implementations round, we round the same
way, explicitly: the embedding normalizer is cast to the activation dtype before the multiply, RMSNorm is
computed in (at least) float32, RoPE angles are computed in the activation dtype, softmax in float32.

`Mistakes` switches on, one at a time, the errors real Gemma 2 implementations made. They are explicit
options of this forward (not patches), so `diagnose` and the walkthrough can run and show each one.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np

from .config import Gemma2Config
from .weights import LayerWeights, round_to_bf16


@dataclass(frozen=True)
class Mistakes:
    """Known Gemma 2 implementation errors. The default, `Mistakes()`, is the correct model."""
    drop_attn_softcap: bool = False  # fast attention kernels without soft-capping (vLLM #5908, llama.cpp #8156)
    drop_final_softcap: bool = False  # logits not soft-capped at 30
    no_sliding_window: bool = False  # every layer global (llama.cpp #8227, transformers #32522)
    window_offset: int = 0  # +1: a sliding query sees `window` keys back too; -1: one fewer (off by one)
    query_scale: float | None = None  # scale by this**-0.5, e.g. head_dim or 224, not query_pre_attn_scalar
    normalizer_dtype: str | None = None  # "bfloat16": sqrt(D) rounded to bf16; "float64": never rounded
    norm_offset: float = 1.0  # RMSNorm scale (offset + w): 0.0 = the +1 forgotten, 2.0 = applied twice
    exact_gelu: bool = False  # erf GELU instead of the tanh approximation

    def describe(self) -> str:
        changed = [f"{k}={v!r}" for k, v in self.__dict__.items() if v != getattr(CORRECT, k)]
        return ", ".join(changed) or "correct Gemma 2"


CORRECT = Mistakes()


# -- taps -------------------------------------------------------------------------------------------------

LAYER_TAPS = (
    "input", "pre_attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.q_rope", "attn.k_rope",
    "attn.scores", "attn.probs", "attn.context", "attn.out", "post_attn_norm", "resid_mid", "pre_ffw_norm",
    "mlp.gate", "mlp.up", "mlp.hidden", "mlp.out", "post_ffw_norm", "output",
)
LARGE_TAPS = ("attn.scores", "attn.probs")  # (H, S, S) each: opt-in only


def tap_names(cfg: Gemma2Config) -> list[str]:
    """Every canonical tap name, in execution order."""
    names = ["embed"]
    for i in range(cfg.num_hidden_layers):
        names += [f"layers.{i}.{t}" for t in LAYER_TAPS]
    return names + ["final_norm", "logits_raw", "logits"]


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
            raise ValueError(f"tap pattern {pattern!r} matches no tap of this model; tap names look like "
                             f"'embed', 'layers.0.attn.q_rope', 'layers.*.output', 'logits'")
        chosen.update(matched)
    return [n for n in names if n in chosen]


class Taps:
    """Records the requested intermediates (copies, so later in-place work cannot change them)."""

    def __init__(self, wanted, prefix: str = "", out: dict | None = None):
        self.wanted = wanted if isinstance(wanted, (set, frozenset)) else set(wanted)
        self.prefix = prefix
        self.out = {} if out is None else out

    def wants(self, name: str) -> bool:
        return self.prefix + name in self.wanted

    def __call__(self, name: str, value: np.ndarray) -> None:
        if self.prefix + name in self.wanted:
            self.out[self.prefix + name] = np.array(value, copy=True)

    def layer(self, i: int) -> "Taps":
        return Taps(self.wanted, f"layers.{i}.", self.out)


NO_TAPS = Taps(frozenset())


# -- the components ---------------------------------------------------------------------------------------

# Below this many float32 rows, linear() multiplies weight-first. Measured with 2 OpenBLAS threads on one
# 2B layer's projections: on a busy machine weight-first made a 128-token prefill 2.2x faster; on an idle
# one it is 1.4x faster at 8-32 rows, about even from 64 to 224, and 1.2x slower from 256 rows on, where its
# transposing copy costs more than the better thread split saves.
WEIGHT_FIRST_ROWS = 256


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


def embed(ids: np.ndarray, embedding: np.ndarray, normalizer_dtype: str | None = None) -> np.ndarray:
    """E[ids] * sqrt(D). The normalizer is a number *in the activation dtype*: in bfloat16, sqrt(3584) =
    59.87 is stored as 60.0, and the model was trained with that 60.0 (transformers #29402)."""
    x = embedding[ids]  # (B, S, D)
    D = embedding.shape[1]
    normalizer = np.array(math.sqrt(D), dtype=x.dtype)
    if normalizer_dtype == "bfloat16":
        normalizer = round_to_bf16(np.float32(math.sqrt(D))).astype(x.dtype)
    elif normalizer_dtype == "float64":
        normalizer = np.float64(math.sqrt(D))
    return (x * normalizer).astype(x.dtype, copy=False)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, offset: float = 1.0) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * (1 + w), computed in float32 (or wider), then cast back.

    Gemma stores the scale as an offset from 1: a zero weight is the identity scale."""
    dtype = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(dtype, copy=False)
    inv_rms = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + dtype.type(eps))  # (B, S, 1)
    return (x32 * inv_rms * (dtype.type(offset) + w.astype(dtype))).astype(x.dtype, copy=False)


def rope_frequencies(head_dim: int, theta: float, dtype=np.float32) -> np.ndarray:
    """theta^(-2i/Dh) for i = 0 .. Dh/2 - 1: (Dh/2,), from 1 (fast) down to ~1/theta (slow)."""
    dtype = np.dtype(dtype)
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=dtype) / dtype.type(head_dim)))


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary position embedding, half-split layout ("rotate_half"): dimension j is paired with j + Dh/2.

    x (B, S, heads, Dh), positions (S,). Angles are computed in x's dtype, as released implementations do."""
    Dh = x.shape[-1]
    angles = positions.astype(x.dtype)[:, None] * rope_frequencies(Dh, theta, x.dtype)  # (S, Dh/2)
    angles = np.concatenate([angles, angles], axis=-1)[None, :, None, :]  # (1, S, 1, Dh)
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def soft_cap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """cap * tanh(x / cap): smooth, odd, slope 1 at 0, bounded by +-cap. None: no cap."""
    if cap is None:
        return x
    y = np.divide(x, x.dtype.type(cap), out=np.empty_like(x))  # one new array (also for 0-d input), then
    # in place: the final logits are (S, 256000)
    np.tanh(y, out=y)
    y *= x.dtype.type(cap)
    return y


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (PyTorch's approximate='tanh'): Gemma 2's activation.

        gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"""
    f = x.dtype.type
    # x is (B, S, F), the largest activation of a layer: build the result in one buffer, in place,
    # in the formula's order of operations (so the values are exactly the formula's).
    t = f(0.044715) * x
    t *= x
    t *= x
    t += x
    t *= f(math.sqrt(2.0 / math.pi))
    np.tanh(t, out=t)
    t += 1
    t *= f(0.5)  # (1 + tanh) / 2 is exact, so x * that equals (0.5 x)(1 + tanh)
    t *= x
    return t


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """GELU with the exact erf, x * Phi(x): *not* Gemma 2's activation (a known mistake, for diagnosis).

    NumPy has no erf; Abramowitz & Stegun 7.1.26 is accurate to 1.5e-7, well inside float32 GELU noise."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(x.dtype, copy=False)


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """(S, T) True where query i may attend to key j: j <= i, and for a sliding layer i - window < j."""
    delta = q_pos[:, None] - k_pos[None, :]  # how far back the key is
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    return allowed


def softmax_(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
              window: int | None, scale: float, softcap: float | None, taps: Taps = NO_TAPS,
              max_scores_bytes: int = 256 << 20) -> np.ndarray:
    """Grouped-query attention with soft-capped scores.

    q (B, S, H, Dh); k, v (B, T, K, Dh); q_pos (S,), k_pos (T,) absolute positions, so the same function
    serves a prefill and a KV-cache decode step (where keys may sit in any order, e.g. a ring buffer).
    Returns the context (B, S, H*Dh), heads merged.

    Each kv head serves G = H/K query heads: query head h uses kv head h // G. The G query heads of a
    group are stacked along the rows, so each group is one (G*S, Dh) @ (Dh, T) matmul.
    Queries are processed in blocks (bounded memory for long prompts); when keys are in position order,
    each block only touches the keys its mask can let through.
    """
    B, S, H, Dh = q.shape
    T, K = k.shape[1], k.shape[2]
    G = H // K
    want_scores = taps.wants("attn.scores") or taps.wants("attn.probs")
    block = S if want_scores else max(1, min(S, max_scores_bytes // max(1, B * H * T * q.itemsize)))
    keys_in_order = T <= 1 or bool(np.all(k_pos[1:] > k_pos[:-1]))
    kT = k.transpose(0, 2, 3, 1)  # (B, K, Dh, T)
    vK = v.transpose(0, 2, 1, 3)  # (B, K, T, Dh)
    context = np.empty((B, S, K, G, Dh), dtype=q.dtype)
    for s0 in range(0, S, block):
        s1 = min(S, s0 + block)
        lo, hi = 0, T
        if keys_in_order and not want_scores:
            if window is not None:  # the block's earliest query sees keys from (its position - window + 1)
                lo = int(np.searchsorted(k_pos, q_pos[s0:s1].min() - window + 1, side="left"))
            hi = int(np.searchsorted(k_pos, q_pos[s0:s1].max(), side="right"))
        n = s1 - s0
        qg = q[:, s0:s1].reshape(B, n, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * n, Dh)
        scores = qg @ kT[..., lo:hi]  # (B, K, G*n, t)
        scores *= scale
        if softcap is not None:
            scores /= softcap
            np.tanh(scores, out=scores)
            scores *= softcap
        scores = scores.reshape(B, K, G, n, hi - lo)
        taps("attn.scores", scores.reshape(B, H, n, hi - lo))
        allowed = attention_mask(q_pos[s0:s1], k_pos[lo:hi], window)  # (n, t)
        scores += np.where(allowed, 0, -np.inf).astype(scores.dtype)  # masked keys get probability 0
        probs = softmax_(scores)
        taps("attn.probs", probs.reshape(B, H, n, hi - lo))
        out = probs.reshape(B, K, G * n, hi - lo) @ vK[:, :, lo:hi]  # (B, K, G*n, Dh)
        context[:, s0:s1] = out.reshape(B, K, G, n, Dh).transpose(0, 3, 1, 2, 4)
    return context.reshape(B, S, H * Dh)


def mlp(x: np.ndarray, w: LayerWeights, taps: Taps = NO_TAPS, exact_gelu: bool = False) -> np.ndarray:
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)). x (B, S, D) -> (B, S, D) via (B, S, F)."""
    gate = linear(x, w.gate_proj)
    taps("mlp.gate", gate)
    up = linear(x, w.up_proj)
    taps("mlp.up", up)
    hidden = gelu_exact(gate) if exact_gelu else gelu_tanh(gate)
    hidden *= up  # in place: gelu returned a new (B, S, F) array
    taps("mlp.hidden", hidden)
    out = linear(hidden, w.down_proj)
    taps("mlp.out", out)
    return out


def decoder_layer(x: np.ndarray, w: LayerWeights, positions: np.ndarray, cfg: Gemma2Config, layer: int,
                  taps: Taps = NO_TAPS, mistakes: Mistakes = CORRECT, kv_cache=None) -> np.ndarray:
    """One Gemma 2 block, with norms both before *and* after each sub-block:

        h   = x + post_attn_norm(attention(pre_attn_norm(x)))
        out = h + post_ffw_norm(mlp(pre_ffw_norm(h)))

    x (B, S, D). With `kv_cache` (see generate.py), this step's keys/values are added to the cache and
    attention runs over everything the cache holds for this layer."""
    B, S, D = x.shape
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps, offset = cfg.rms_norm_eps, mistakes.norm_offset
    taps("input", x)

    h = rms_norm(x, w.pre_attn_norm, eps, offset)
    taps("pre_attn_norm", h)
    q = linear(h, w.q_proj).reshape(B, S, H, Dh)
    k = linear(h, w.k_proj).reshape(B, S, K, Dh)
    v = linear(h, w.v_proj).reshape(B, S, K, Dh)
    taps("attn.q_proj", q)
    taps("attn.k_proj", k)
    taps("attn.v_proj", v)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    taps("attn.q_rope", q)
    taps("attn.k_rope", k)

    k_pos = positions
    if kv_cache is not None:
        k, v, k_pos = kv_cache.update(layer, k, v, positions)  # (B, T, K, Dh) x2, (T,)
    window = None if mistakes.no_sliding_window else cfg.window(layer)
    if window is not None:
        window += mistakes.window_offset
    scale = (mistakes.query_scale or cfg.query_pre_attn_scalar) ** -0.5
    softcap = None if mistakes.drop_attn_softcap else cfg.attn_logit_softcapping
    context = attention(q, k, v, positions, k_pos, window, scale, softcap, taps)
    taps("attn.context", context)
    a = linear(context, w.o_proj)
    taps("attn.out", a)
    a = rms_norm(a, w.post_attn_norm, eps, offset)
    taps("post_attn_norm", a)
    x = x + a
    taps("resid_mid", x)

    h = rms_norm(x, w.pre_ffw_norm, eps, offset)
    taps("pre_ffw_norm", h)
    m = mlp(h, w, taps, mistakes.exact_gelu)
    m = rms_norm(m, w.post_ffw_norm, eps, offset)
    taps("post_ffw_norm", m)
    x = x + m
    taps("output", x)
    return x


def check_ids(ids, vocab_size: int) -> np.ndarray:
    """Token ids as an int64 (B, S) array, with a clear error for anything a forward cannot take."""
    arr = np.asarray(ids)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"token ids must be integers (a list, or a rectangular (batch, seq) array), "
                         f"got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"token ids must be 1-D (seq,) or 2-D (batch, seq), got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError("token ids are empty: a forward needs at least one token (normally <bos>)")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise ValueError(f"token id {int(arr[where])} at index {where} is outside the vocabulary "
                         f"[0, {vocab_size})")
    return arr.astype(np.int64).reshape(-1, arr.shape[-1])


def forward(weights, cfg: Gemma2Config, ids, taps="none", mistakes: Mistakes = CORRECT,
            positions: np.ndarray | None = None, kv_cache=None, logits_at: str = "all",
            progress=None) -> dict[str, np.ndarray]:
    """Run Gemma 2 on token ids (S,) or (B, S). Returns {"logits": ..., **requested taps}.

    `weights` gives `embedding()`, `layer(i)` and `final_norm()` in the compute dtype (weights.Weights).
    `positions` default to 0..S-1 (continuing after the cache when decoding). `logits_at="last"` computes
    the output head for the last position only (generation). `progress(done, total)` is called per layer.
    """
    batched = np.ndim(ids) == 2
    ids = check_ids(ids, cfg.vocab_size)
    B, S = ids.shape
    wanted = [] if taps in (None, "none") else select_taps(cfg, taps)
    rec = Taps(wanted)
    if positions is None:
        start = kv_cache.length if kv_cache is not None else 0
        positions = np.arange(start, start + S)
    positions = np.asarray(positions, dtype=np.int64)

    embedding = weights.embedding()
    x = embed(ids, embedding, mistakes.normalizer_dtype)  # (B, S, D)
    rec("embed", x)
    n = cfg.num_hidden_layers
    for i in range(n):
        x = decoder_layer(x, weights.layer(i), positions, cfg, i, rec.layer(i), mistakes, kv_cache)
        if progress is not None:
            progress(i + 1, n)
    if kv_cache is not None:
        kv_cache.advance(S)

    x = rms_norm(x, weights.final_norm(), cfg.rms_norm_eps, mistakes.norm_offset)
    rec("final_norm", x)
    if logits_at == "last":
        x = x[:, -1:]
    logits = linear(x, embedding)  # (B, S, V): the output head is the embedding, transposed
    rec("logits_raw", logits)
    logits = soft_cap(logits, None if mistakes.drop_final_softcap else cfg.final_logit_softcapping)
    out = {name: rec.out[name] for name in wanted if name in rec.out}
    out["logits"] = logits
    if not batched:
        out = {name: value[0] for name, value in out.items()}
    return out


# -- loading ----------------------------------------------------------------------------------------------

class Model:
    """A loaded checkpoint: its config, its memory-mapped weights, and the compute dtype."""

    def __init__(self, config: Gemma2Config, weights, dtype, path=None):
        self.config, self.weights, self.dtype, self.path = config, weights, np.dtype(dtype), path

    def forward(self, ids, taps=None, mistakes: Mistakes = CORRECT, **kw) -> dict[str, np.ndarray]:
        """{"logits": (S, V) or (B, S, V), **taps}. `taps`: "all", "default", "residual", names or globs."""
        return forward(self.weights, self.config, ids, taps, mistakes, **kw)

    def logits(self, ids, mistakes: Mistakes = CORRECT) -> np.ndarray:
        """Logits after the final soft-cap: (S, V), or (B, S, V) for a batch."""
        return self.forward(ids, None, mistakes)["logits"]

    def close(self) -> None:
        self.weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self.config
        return (f"Model({self.path or 'in memory'}: {c.num_hidden_layers} layers, D={c.hidden_size}, "
                f"H={c.num_attention_heads}/K={c.num_key_value_heads}, compute {self.dtype})")

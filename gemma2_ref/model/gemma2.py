"""The Gemma 2 forward pass in NumPy: small pure functions, one per idea, composed by `forward`.

Read top to bottom, this file is the model:

    x = E[ids] * sqrt(D)                                   embed            (normalizer in the activation dtype)
    for each layer i:                                      decoder_layer
        h = x + post_attn_norm(attention(pre_attn_norm(x)))     sliding window on even layers, global on odd
        x = h + post_ffw_norm(mlp(pre_ffw_norm(h)))             GeGLU: down(gelu_tanh(gate(h)) * up(h))
    logits = soft_cap(final_norm(x) @ E.T, 30)             tied output head, final soft-cap

Every number comes from the config (config.py); arrays carry a batch axis inside: (B, S, D); every
intermediate is offered to a `Taps` recorder under its canonical name (taps.py). Float32 (default) or
float64. Where released implementations round, we round the same way, explicitly: the embedding normalizer
in the activation dtype, RMSNorm in (at least) float32, RoPE angles in the compute dtype. Three heavy steps
call fast.py (same values, less memory or time): `linear`, GELU and the final soft-cap in place,
attention in query blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from .config import Gemma2Config
from .fast import attention_in_blocks, gelu_tanh_, linear, soft_cap_
from .inputs import check_context, check_ids, check_positions
from .taps import NO_TAPS, Taps, select_taps


@dataclass
class LayerWeights:
    """One decoder layer's weights in the compute dtype, named as the taps are. Linear weights are (out, in):
    arrays, or for a layer streamed from a checkpoint fast.StoredWeight (the stored bf16, which `linear`
    converts a block at a time: the same values)."""

    q_proj: np.ndarray  # (H*Dh, D)
    k_proj: np.ndarray  # (K*Dh, D)
    v_proj: np.ndarray  # (K*Dh, D)
    o_proj: np.ndarray  # (D, H*Dh)
    gate_proj: np.ndarray  # (F, D)
    up_proj: np.ndarray  # (F, D)
    down_proj: np.ndarray  # (D, F)
    pre_attn_norm: np.ndarray  # (D,) stored as an offset from 1: the scale is (1 + w)
    post_attn_norm: np.ndarray  # (D,)
    pre_ffw_norm: np.ndarray  # (D,)
    post_ffw_norm: np.ndarray  # (D,)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


# -- the components ---------------------------------------------------------------------------------------


def embed(ids: np.ndarray, embedding: np.ndarray, normalizer=None) -> np.ndarray:
    """E[ids] * sqrt(D). The normalizer is a number *in the activation dtype*: in bfloat16, sqrt(3584) =
    59.87 is 59.75 and sqrt(4608) = 67.88 is 68.0, and a bfloat16 backend multiplies by those (transformers
    #29402 made Hugging Face's Gemma round it so).

    `normalizer`: the number to multiply by, when it is not sqrt(D) in the compute dtype (a NumPy scalar: the
    product is computed in its dtype and the result cast back; verify/mistakes.py gives the wrong ones)."""
    x = embedding[ids]  # (B, S, D)
    if normalizer is None:
        normalizer = np.array(math.sqrt(embedding.shape[1]), x.dtype)
    return (x * normalizer).astype(x.dtype, copy=False)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, taps: Taps = NO_TAPS) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * (1 + w), computed in float32 (or wider), then cast back.

    Gemma stores the scale as an offset from 1: a zero weight is the identity scale. The steps are offered
    to the recorder as `rms.*` (taps.NORM_STEPS: never recorded, never rounded by a correct recorder), so a
    backend that rounds one of them can be modelled by a recorder (verify/mistakes.py)."""
    dtype = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(dtype, copy=False)
    variance = taps("rms.variance", np.mean(taps("rms.squares", x32 * x32), axis=-1, keepdims=True))  # (B, S, 1)
    normed = taps("rms.normed", x32 * (1.0 / np.sqrt(variance + dtype.type(eps))))
    return (normed * taps("rms.scale", dtype.type(1.0) + w.astype(dtype))).astype(x.dtype, copy=False)


def rope_frequencies(head_dim: int, theta: float, dtype=np.float32) -> np.ndarray:
    """theta^(-2i/Dh) for i = 0 .. Dh/2 - 1: (Dh/2,), from 1 (fast) down to ~1/theta (slow)."""
    dtype = np.dtype(dtype)
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=dtype) / dtype.type(head_dim)))


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary position embedding, half-split layout ("rotate_half"): dimension j is paired with j + Dh/2.

    x (B, S, heads, Dh), positions (S,) or per row (B, S). Angles are positions * frequencies in x's dtype:
    float32, as transformers computes them (its PR #29285) before casting cos / sin to the activation dtype.
    JAX gemma divides positions by timescales instead and keeps cos / sin in float32: last-bit differences."""
    Dh = x.shape[-1]
    angles = positions.astype(x.dtype)[..., None] * rope_frequencies(Dh, theta, x.dtype)  # ([B,] S, Dh/2)
    angles = np.concatenate([angles, angles], axis=-1)[..., None, :]  # ([B,] S, 1, Dh)
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def soft_cap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """cap * tanh(x / cap): smooth, odd, slope 1 at 0, bounded by +-cap. None: no cap."""
    return x if cap is None else cap * np.tanh(x / cap)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (PyTorch's approximate='tanh', HF's "gelu_pytorch_tanh"): Gemma 2's."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """GELU with the exact erf, x * Phi(x) (HF's "gelu"): *not* Gemma 2's activation.

    NumPy has no erf; Abramowitz & Stegun 7.1.26 is accurate to 1.5e-7, well inside float32 GELU noise."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(x.dtype, copy=False)


# config.hidden_activation -> the function; Gemma 2's is gelu_tanh above, computed in place (fast.gelu_tanh_)
ACTIVATION_FUNCTIONS = {"gelu_pytorch_tanh": gelu_tanh_, "gelu": gelu_exact}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)), shifted by the max so exp never overflows."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(softmax(x)), without forming the probabilities (exact for very unlikely tokens)."""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """(S, T) True where query i may attend to key j: j <= i, and for a sliding layer i - window < j.
    Per-row positions (B, S), (B, T) give (B, S, T): a padding token sits at a position in the future
    (inputs.EMPTY), so no real query sees it."""
    delta = q_pos[..., :, None] - k_pos[..., None, :]  # how far back the key is
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    return allowed


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    window: int | None,
    scale: float,
    softcap: float | None,
    taps: Taps = NO_TAPS,
) -> np.ndarray:
    """Grouped-query attention with soft-capped scores: softmax(mask(cap(q k^T * scale))) v.

    q (B, S, H, Dh); k, v (B, T, K, Dh); q_pos (S,), k_pos (T,) absolute positions (or per row, (B, S) and
    (B, T)), so the same function serves a prefill, a padded batch and a KV-cache decode step (keys in any
    order, e.g. a ring buffer). Returns the context (B, S, H*Dh), heads merged. Each kv head serves G = H/K
    query heads: query head h uses kv head h // G."""
    B, S, H, Dh = q.shape
    T, K = k.shape[1], k.shape[2]
    G = H // K
    qg = q.reshape(B, S, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * S, Dh)  # a group's heads stacked
    scores = (qg @ k.transpose(0, 2, 3, 1)) * scale  # (B, K, G*S, T)
    scores = taps("attn.scores", soft_cap(scores, softcap).reshape(B, H, S, T)).reshape(B, K, G, S, T)
    allowed = attention_mask(q_pos, k_pos, window)  # (S, T), or (B, S, T) per row
    allowed = allowed[:, None, None] if allowed.ndim == 3 else allowed
    scores = np.where(allowed, scores, -np.inf)  # masked keys: probability 0
    probs = taps("attn.probs", softmax(scores).reshape(B, H, S, T))
    context = probs.reshape(B, K, G * S, T) @ v.transpose(0, 2, 1, 3)  # (B, K, G*S, Dh)
    return context.reshape(B, K, G, S, Dh).transpose(0, 3, 1, 2, 4).reshape(B, S, H * Dh)


def mlp(x: np.ndarray, w: LayerWeights, activation=gelu_tanh, taps: Taps = NO_TAPS) -> np.ndarray:
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)). x (B, S, D) -> (B, S, D) via (B, S, F)."""
    gate = taps("mlp.gate", linear(x, w.gate_proj))
    up = taps("mlp.up", linear(x, w.up_proj))
    hidden = activation(gate)  # in place on gate: its tap was copied
    hidden *= up
    hidden = taps("mlp.hidden", hidden)
    return taps("mlp.out", linear(hidden, w.down_proj))


def decoder_layer(
    x: np.ndarray,
    w: LayerWeights,
    positions: np.ndarray,
    cfg: Gemma2Config,
    layer: int,
    taps: Taps = NO_TAPS,
    kv_cache=None,
) -> np.ndarray:
    """One Gemma 2 block, with norms both before *and* after each sub-block:

        h   = x + post_attn_norm(attention(pre_attn_norm(x)))
        out = h + post_ffw_norm(mlp(pre_ffw_norm(h)))

    (A config without a post-norm, `post_attn_norm=False` / `post_ffw_norm=False`, is the Gemma 1 layer: the
    sub-block's output is added as it is, and its tap holds that output.)

    x (B, S, D). With `kv_cache` (see generate.py), this step's keys/values are added to the cache and
    attention runs over everything the cache holds for this layer (the keys' positions as the cache gives
    them: the mask is built from those)."""
    B, S, D = x.shape
    H, K, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    x = taps("input", x)

    h = taps("pre_attn_norm", rms_norm(x, w.pre_attn_norm, eps, taps))
    q = taps("attn.q_proj", linear(h, w.q_proj).reshape(B, S, H, Dh))
    k = taps("attn.k_proj", linear(h, w.k_proj).reshape(B, S, K, Dh))
    v = taps("attn.v_proj", linear(h, w.v_proj).reshape(B, S, K, Dh))
    q = taps("attn.q_rope", rope(q, positions, cfg.rope_theta))
    k = taps("attn.k_rope", rope(k, positions, cfg.rope_theta))
    k_pos = positions
    if kv_cache is not None:
        k, v, k_pos = kv_cache.update(layer, k, v, positions)  # (B, T, K, Dh) x2, (T,)
    context = attention_in_blocks(
        attention,
        q,
        k,
        v,
        positions,
        k_pos,
        cfg.window(layer),
        cfg.query_pre_attn_scalar**-0.5,
        cfg.attn_logit_softcapping,
        taps,
    )
    context = taps("attn.context", context)
    a = taps("attn.out", linear(context, w.o_proj))
    a = taps("post_attn_norm", rms_norm(a, w.post_attn_norm, eps, taps) if cfg.post_attn_norm else a)
    x = taps("resid_mid", x + a)

    h = taps("pre_ffw_norm", rms_norm(x, w.pre_ffw_norm, eps, taps))
    m = mlp(h, w, ACTIVATION_FUNCTIONS[cfg.hidden_activation], taps)
    m = taps("post_ffw_norm", rms_norm(m, w.post_ffw_norm, eps, taps) if cfg.post_ffw_norm else m)
    return taps("output", x + m)


def forward(
    weights,
    cfg: Gemma2Config,
    ids,
    taps="none",
    positions: np.ndarray | None = None,
    kv_cache=None,
    logits_at="all",
    progress=None,
    normalizer=None,
    round_to: str | None = None,
    sink=None,
) -> dict[str, np.ndarray]:
    """Run Gemma 2 on token ids (S,) or (B, S). Returns {"logits": ..., **requested taps}.

    `weights` gives `embedding()`, `layer(i)` and `final_norm()` in the compute dtype: weights.Weights (a
    memory-mapped checkpoint) or any object with those three methods, e.g. plain arrays in a REPL.
    `positions` default to 0..S-1 (continuing after the cache when decoding); per row (B, S) for a padded
    batch (inputs.padded_positions: padding at inputs.EMPTY). `logits_at="last"` computes
    the output head for the last position only (generation), `(start, stop)` for those positions only (a
    golden storing only them; logits_raw too). `progress(done, total)` is called per layer. `sink(name, value)`
    receives each requested tap as it is produced, shaped as the returned dict would hold it (taps.Taps).
    `normalizer`: see `embed`. `round_to` ("bfloat16", "float16"): every tapped intermediate is rounded to that
    dtype as it is produced, the way a backend storing activations in it rounds (taps.Taps); the reference's
    own rounding error, from which the `measured` tolerance profile is set (verify/measured.py).
    `taps` may also be a recorder (a taps.Taps, or a subclass modelling a backend's rounding): it then
    decides what is recorded, rounded and sunk (`round_to` and `sink` are shorthands for building one)."""
    batched = np.ndim(ids) == 2
    ids = check_ids(ids, cfg.vocab_size)
    B, S = ids.shape
    rec = (
        taps
        if isinstance(taps, Taps)
        else Taps([] if taps in (None, "none") else select_taps(cfg, taps), round_to=round_to, sink=sink)
    )
    if rec.sink is not None and not batched:
        rec = rec.unbatched_sink()  # the sink receives each tap shaped as the returned dict holds it
    start = kv_cache.length if kv_cache is not None else 0
    check_context(start + S, cfg, "the token ids" if kv_cache is None else "the cache plus these token ids")
    if positions is None:
        positions = np.arange(start, start + S)
    positions = check_positions(positions, B, S)

    embedding = weights.embedding()
    x = rec("embed", embed(ids, embedding, normalizer))  # (B, S, D)
    n = cfg.num_hidden_layers
    for i in range(n):
        x = decoder_layer(x, weights.layer(i), positions, cfg, i, rec.layer(i), kv_cache)
        if progress is not None:
            progress(i + 1, n)
    if kv_cache is not None:
        kv_cache.advance(S)

    x = rec("final_norm", rms_norm(x, weights.final_norm(), cfg.rms_norm_eps, rec))
    if logits_at == "last":
        x = x[:, -1:]
    elif logits_at != "all":
        x = x[:, slice(*logits_at)]
    logits = linear(x, embedding)  # (B, S, V): the output head is the embedding, transposed
    logits = rec("logits_raw", logits)
    logits = soft_cap_(logits, cfg.final_logit_softcapping)  # = soft_cap(logits, cap), in place: (S, V) is big
    out = {name: rec.out[name] for name in rec.ordered if name in rec.out}
    out["logits"] = logits
    if not batched:
        out = {name: value[0] for name, value in out.items()}
    return out

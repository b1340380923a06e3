"""A solution to walkthrough/exercises/my_gemma.py, written as a learner would: plain NumPy, one function per
idea, nothing imported from gemma2_ref. `gemma2-ref exercise check walkthrough/exercises/solution.py` passes
(tests/test_exercise.py checks it). Read it after trying: the chapters explain each line."""

import math

import numpy as np


def embed(ids, embedding):
    x = embedding[ids]  # (B, S, D)
    return x * np.array(math.sqrt(embedding.shape[1]), dtype=x.dtype)  # sqrt(D) in the activations' dtype


def rms_norm(x, w, eps):
    x32 = x.astype(np.float32)
    normed = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + w.astype(np.float32))).astype(x.dtype)  # the scale is 1 + w


def rope(x, positions, theta):
    Dh = x.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float32) / Dh)  # (Dh/2,)
    angles = positions.astype(np.float32)[:, None] * freqs  # (S, Dh/2)
    cos = np.cos(np.concatenate([angles, angles], axis=-1))[:, None, :]  # (S, 1, Dh)
    sin = np.sin(np.concatenate([angles, angles], axis=-1))[:, None, :]
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2 :]  # dimension i is paired with i + Dh/2
    return x * cos + np.concatenate([-x2, x1], axis=-1) * sin


def soft_cap(x, cap):
    return x if cap is None else cap * np.tanh(x / cap)


def attention_mask(q_pos, k_pos, window):
    back = q_pos[:, None] - k_pos[None, :]  # (S, T): how far back key j is from query i
    allowed = back >= 0
    if window is not None:
        allowed &= back < window
    return allowed


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v, q_pos, k_pos, window, scale, softcap):
    B, S, H, Dh = q.shape
    K = k.shape[2]
    k = np.repeat(k, H // K, axis=2)  # (B, T, H, Dh): query head h uses kv head h // (H / K)
    v = np.repeat(v, H // K, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) * scale  # (B, H, S, T)
    scores = soft_cap(scores, softcap)
    scores = np.where(attention_mask(q_pos, k_pos, window), scores, -np.inf)
    probs = softmax(scores.astype(np.float32))
    context = np.einsum("bhst,bthd->bshd", probs, v)  # (B, S, H, Dh)
    return context.reshape(B, S, H * Dh).astype(q.dtype)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def mlp(x, w):
    return (gelu_tanh(x @ w.gate_proj.T) * (x @ w.up_proj.T)) @ w.down_proj.T


def decoder_layer(x, w, positions, cfg, layer):
    B, S, D = x.shape
    H, K, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    h = rms_norm(x, w.pre_attn_norm, eps)
    q = rope((h @ w.q_proj.T).reshape(B, S, H, Dh), positions, cfg.rope_theta)
    k = rope((h @ w.k_proj.T).reshape(B, S, K, Dh), positions, cfg.rope_theta)
    v = (h @ w.v_proj.T).reshape(B, S, K, Dh)
    context = attention(
        q, k, v, positions, positions, cfg.window(layer), cfg.query_pre_attn_scalar**-0.5, cfg.attn_logit_softcapping
    )
    x = x + rms_norm(context @ w.o_proj.T, w.post_attn_norm, eps)  # norms before *and* after
    return x + rms_norm(mlp(rms_norm(x, w.pre_ffw_norm, eps), w), w.post_ffw_norm, eps)

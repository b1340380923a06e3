"""Gemma 2, written by you: the exercise template.

Copy this file, write the functions (in NumPy), and check them:

    cp walkthrough/exercises/my_gemma.py my_gemma.py
    gemma2-ref exercise check my_gemma.py              # every function you have written
    gemma2-ref exercise check my_gemma.py --only rope  # one of them

Each function you write runs inside the reference forward of the bundled tiny model, in place of the
reference's own, and every intermediate (tap) is compared with the reference's. A function that is wrong
gets the first tap where it differs and, when its numbers match a mistake real Gemma 2 implementations
made, that mistake's name and the chapter that explains it. A function still raising NotImplementedError is
"not written yet" and the reference's is used; keep every function in the file, written or not.

Shapes: B batch, S queries, T keys, D hidden size, H query heads, K kv heads, Dh head dim, F MLP width.
Arrays are float32. The chapters of walkthrough/ explain each function; gemma2_ref/model/gemma2.py is the
reference (reading it first spoils the exercise).
"""


def embed(ids, embedding):
    """ids (B, S) int -> (B, S, D): the rows of `embedding` (V, D), times sqrt(D) in the rows' dtype.
    Chapter 3."""
    raise NotImplementedError("embed")


def rms_norm(x, w, eps):
    """x (..., D), w (D,) -> (..., D): x / sqrt(mean(x^2) + eps) times the scale, computed in float32. The
    checkpoint stores the scale as an offset: w = 0 means a scale of 1. Chapter 4."""
    raise NotImplementedError("rms_norm")


def rope(x, positions, theta):
    """x (B, S, heads, Dh), positions (S,) -> (B, S, heads, Dh): rotary position embedding, frequencies
    theta^(-2i/Dh) for i = 0 .. Dh/2 - 1, in Gemma's layout (which dimensions form a pair?). Chapter 5."""
    raise NotImplementedError("rope")


def soft_cap(x, cap):
    """x (any shape) -> same shape: smoothly limited to (-cap, cap); cap None means no cap. Chapter 7."""
    raise NotImplementedError("soft_cap")


def attention_mask(q_pos, k_pos, window):
    """q_pos (S,), k_pos (T,) positions -> (S, T) bool, True where query i may attend to key j: causal, and
    on a sliding layer (window not None) only the last `window` positions, the query's own included.
    Chapter 8."""
    raise NotImplementedError("attention_mask")


def attention(q, k, v, q_pos, k_pos, window, scale, softcap):
    """Grouped-query attention. q (B, S, H, Dh); k, v (B, T, K, Dh); q_pos (S,), k_pos (T,); window: the
    sliding window or None (global); scale: what the scores are multiplied by; softcap: the scores' cap.
    -> context (B, S, H * Dh), heads merged. Each kv head serves H / K query heads (which ones?); the
    softmax in float32. Chapters 6, 7 and 8."""
    raise NotImplementedError("attention")


def gelu_tanh(x):
    """The GELU Gemma uses, elementwise: which approximation? Chapter 9."""
    raise NotImplementedError("gelu_tanh")


def mlp(x, w):
    """x (B, S, D) -> (B, S, D): Gemma 2's gated feed-forward with w.gate_proj (F, D), w.up_proj (F, D),
    w.down_proj (D, F); linear weights are (out, in), so a projection is x @ W.T. Chapter 9."""
    raise NotImplementedError("mlp")


def decoder_layer(x, w, positions, cfg, layer):
    """One Gemma 2 block. x (B, S, D), positions (S,), cfg a gemma2_ref Gemma2Config, layer its index.
    w has q_proj (H*Dh, D), k_proj, v_proj (K*Dh, D), o_proj (D, H*Dh), the MLP's three, and the norms
    pre_attn_norm, post_attn_norm, pre_ffw_norm, post_ffw_norm (D,). What you need from cfg:
    num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_theta, query_pre_attn_scalar,
    attn_logit_softcapping, and cfg.window(layer) (the sliding window of this layer, or None). Use your own
    functions above. Chapters 4, 6 and 10."""
    raise NotImplementedError("decoder_layer")

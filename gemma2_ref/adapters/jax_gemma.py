"""DeepMind's `gemma` library (3.3.0, JAX + Flax linen; its Gemma 2 transformer) -> a golden case under the
canonical tap names.

`gemma` reads its own checkpoints (Orbax), not Hugging Face's, so the adapter does four things:

1. config: our Gemma2Config -> gemma's `TransformerConfig` (gemma/gm/nn/_config.py:58-84), the
   query normalisation chosen from `query_pre_attn_scalar` (see `query_pre_attn_norm` below);
2. parameters: the HF tensors -> gemma's tree, checked against the shapes `Transformer.init` would make
   (`gemma_params`);
3. capture: a Flax method interceptor sows every module call's first array input and its output into the
   `intermediates` collection (it runs inside gemma's own `nn.jit`); the model's code is untouched;
4. taps: gemma's fused tensors split (kv_einsum (2, B, S, K, Dh) -> k_proj, v_proj; gating_einsum
   (B, S, 2, F) -> mlp.gate, mlp.up), heads moved to the canonical axes.

What is reachable, per layer (module paths under `layer_{i}`):

    layers.{i}.input / output        Block input / output[1]
    pre_attn_norm, post_attn_norm, pre_ffw_norm, post_ffw_norm   the RMSNorms' outputs
    attn.q_proj                      attn/q_einsum output (B, S, H, Dh)  (qkv_einsum[0] when K == H)
    attn.k_proj / v_proj             attn/kv_einsum output split         (qkv_einsum[1:] when K == H)
    attn.probs                       attn/attention_weights (an Identity on the softmax), (B, S, H, S)
    attn.context / attn.out          attn/attn_vec_einsum input (B, S, H, Dh) -> (B, S, H*Dh) / output
    resid_mid                        pre_ffw_norm's input
    mlp.gate / up / hidden / out     gating_einsum output split; the `linear` einsum's input / output
    embed, final_norm, logits_raw, logits   embedder.encode, final_norm, embedder.decode, Output.logits

Not reachable: `attn.q_rope` / `attn.k_rope` (`apply_rope` is a function, not a module) and `attn.scores`
(computed inside Attention.__call__, gemma/gm/nn/_modules.py:240-256).

jax, flax and gemma are imported here only, when a function below is called (`pip install 'gemma2-ref[jax]'`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model.taps import taps_of_kinds
from .base import Capabilities, wanted_taps, write_candidate

REACHABLE = (
    "input",
    "pre_attn_norm",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
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
JAX_DTYPES = ("float32", "bfloat16", "float16")


CAPABILITIES = Capabilities(padded_batch=True)  # input_mask; no cache path here


def reachable_taps(cfg) -> list[str]:
    """The canonical taps this adapter can capture, in execution order."""
    return taps_of_kinds(cfg, REACHABLE)


# -- 1. config -----------------------------------------------------------------------------------------------


def query_pre_attn_norm(cfg):
    """gemma's QueryPreAttentionNormalisation for cfg.query_pre_attn_scalar.

    gemma multiplies queries by `TransformerConfig.query_pre_attn_scalar()` (_modules.py:202) and offers
    three options (_config.py:45-55, 90-98):
        BY_ONE_OVER_SQRT_HEAD_DIM                  head_dim ** -0.5               (2B, 9B)
        BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS   (embed_dim // num_heads) ** -0.5   (27B: 4608 // 32 = 144)
        BY_EMBED_DIM_DIV_NUM_HEADS                 embed_dim // num_heads, NOT its inverse square root: a
                                                   query scaled by 32 instead of 32^-0.5 on the tiny model
    so it can express query_pre_attn_scalar only when it equals head_dim or embed_dim // num_heads."""
    from gemma.gm.nn._config import QueryPreAttentionNormalisation as Q

    scalar = float(cfg.query_pre_attn_scalar)
    if scalar == cfg.head_dim:
        return Q.BY_ONE_OVER_SQRT_HEAD_DIM
    if scalar == cfg.hidden_size // cfg.num_attention_heads:
        return Q.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
    raise ValueError(
        f"gemma cannot express query_pre_attn_scalar {scalar:g}: its options scale queries by "
        f"head_dim^-0.5 ({cfg.head_dim}) or (embed_dim // num_heads)^-0.5 "
        f"({cfg.hidden_size // cfg.num_attention_heads}) only (gemma/gm/nn/_config.py)"
    )


def gemma_config(cfg, query_norm=None):
    """gemma's TransformerConfig for our Gemma2Config. `query_norm`: a QueryPreAttentionNormalisation
    member or its name, to override the choice (e.g. to see what BY_EMBED_DIM_DIV_NUM_HEADS does)."""
    from gemma.gm.nn._config import QueryPreAttentionNormalisation, TransformerConfig
    from gemma.gm.nn._modules import AttentionType

    if isinstance(query_norm, str):
        query_norm = QueryPreAttentionNormalisation[query_norm]
    kinds = tuple(
        AttentionType.LOCAL_SLIDING if cfg.is_sliding(i) else AttentionType.GLOBAL for i in range(cfg.num_hidden_layers)
    )
    theta = int(cfg.rope_theta)
    if theta != cfg.rope_theta:
        raise ValueError(f"gemma takes an integer RoPE base frequency; this config has rope_theta {cfg.rope_theta}")
    return TransformerConfig(
        num_embed=cfg.vocab_size,
        embed_dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        num_kv_heads=cfg.num_key_value_heads,
        final_logit_softcap=cfg.final_logit_softcapping,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        attention_types=kinds,
        query_pre_attn_norm=query_norm or query_pre_attn_norm(cfg),
        attn_logits_soft_cap=cfg.attn_logit_softcapping,
        sliding_window_size=cfg.sliding_window,
        transpose_gating_einsum=True,  # gating_einsum (2, F, D): gate and up stacked as HF stores them (F, D)
        local_base_frequency=theta,
        global_base_frequency=theta,
    )


# -- 2. parameters -----------------------------------------------------------------------------------------


def read_hf_tensors(checkpoint: Path) -> dict:
    """Every tensor of a checkpoint's model*.safetensors files, as jax arrays in their stored dtype."""
    from safetensors.flax import load_file

    files = sorted(Path(checkpoint).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{checkpoint}: no model*.safetensors files (a Hugging Face Gemma 2 checkpoint "
            f"directory has model.safetensors or model-0000k-of-0000n.safetensors)"
        )
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def gemma_params(hf: dict, cfg, dtype) -> dict:
    """The HF tensors as gemma's parameter tree, cast to `dtype`.

    HF Linear weights are (out, in); gemma's einsums name their axes (_modules.py:144-160, 336-385):
        q_einsum        (H, D, Dh)     <- q_proj (H*Dh, D)
        kv_einsum       (2, K, D, Dh)  <- k_proj, v_proj (K*Dh, D) stacked   [qkv_einsum (3, H, D, Dh) if K == H]
        attn_vec_einsum (H, Dh, D)     <- o_proj (D, H*Dh)
        gating_einsum   (2, F, D)      <- gate_proj, up_proj (F, D) stacked (transpose_gating_einsum)
        linear          (F, D)         <- down_proj (D, F)
    RMSNorm `scale` is stored as HF stores it, an offset from 1 (gemma computes x * (1 + scale) too)."""
    import jax.numpy as jnp

    H, K, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size

    def get(name):
        if name not in hf:
            raise KeyError(f"checkpoint tensor {name} is missing (gemma's parameter tree needs it)")
        return jnp.asarray(hf[name], dtype)

    def heads(w, n):  # (n*Dh, D) -> (n, D, Dh)
        return w.reshape(n, Dh, D).transpose(0, 2, 1)

    params = {
        "embedder": {"input_embedding": get("model.embed_tokens.weight")},
        "final_norm": {"scale": get("model.norm.weight")},
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = (get(p + f"self_attn.{x}_proj.weight") for x in "qkv")
        attn = {"attn_vec_einsum": {"w": get(p + "self_attn.o_proj.weight").T.reshape(H, Dh, D)}}
        if K == H:  # gemma fuses q, k and v when every query head has its own kv head
            attn["qkv_einsum"] = {"w": jnp.stack([heads(q, H), heads(k, K), heads(v, K)])}
        else:
            attn["q_einsum"] = {"w": heads(q, H)}
            attn["kv_einsum"] = {"w": jnp.stack([heads(k, K), heads(v, K)])}
        params[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": get(p + "input_layernorm.weight")},
            "attn": attn,
            "post_attention_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "pre_ffw_norm": {"scale": get(p + "pre_feedforward_layernorm.weight")},
            "mlp": {
                "gating_einsum": jnp.stack([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                "linear": get(p + "mlp.down_proj.weight").T,
            },
            "post_ffw_norm": {"scale": get(p + "post_feedforward_layernorm.weight")},
        }
    return params


def check_params(model, params: dict, seq: int = 2) -> None:
    """Refuse a converted tree whose names or shapes differ from what gemma's own init builds."""
    import jax
    import jax.numpy as jnp

    want = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, seq), jnp.int32)))["params"]
    flat_want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(want)}
    flat_have = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for name in sorted(set(flat_want) | set(flat_have)):
        if flat_want.get(name) != flat_have.get(name):
            raise ValueError(
                f"converted gemma parameter {name}: shape {flat_have.get(name)}, gemma's "
                f"Transformer.init makes {flat_want.get(name)} (None: absent)"
            )


def load(checkpoint, dtype: str = "float32", query_norm=None):
    """(gemma Transformer, its params) for a Hugging Face checkpoint directory, computing in `dtype`."""
    import jax.numpy as jnp
    from gemma.gm.nn._transformer import Transformer

    from ..model.config import load_config

    if dtype not in JAX_DTYPES:
        raise ValueError(f"jax-gemma dtype must be one of {JAX_DTYPES}, not {dtype!r}")
    cfg = load_config(checkpoint)
    model = Transformer(config=gemma_config(cfg, query_norm), dtype=getattr(jnp, dtype))
    params = gemma_params(read_hf_tensors(Path(checkpoint)), cfg, getattr(jnp, dtype))
    check_params(model, params)
    return model, params


# -- 3. capture --------------------------------------------------------------------------------------------


def _sow_calls(want_probs: bool):
    """A Flax interceptor: every module call's first array input and its output, sown as `intermediates`
    under the module's path. Einsums that share their parent's scope (FeedForward's gating_einsum and
    linear, nn.share_scope) are told apart by their weight name."""
    import jax

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module, method = context.module, context.method_name
        if method not in ("__call__", "encode", "decode"):
            return out
        if not want_probs and module.name == "attention_weights":
            return out  # (B, S, H, S) per layer: only when asked for
        tag = getattr(module, "weight_name", "w")
        tag = method if tag == "w" else tag
        x = next((a for a in args if isinstance(a, jax.Array)), None)
        module.sow("intermediates", tag + ".in", x)
        module.sow("intermediates", tag, out)
        return out

    return interceptor


def run_sown(model, params, ids: np.ndarray, want_probs: bool, attention_mask=None) -> tuple[np.ndarray, dict]:
    """gemma's forward on (B, S) ids: (logits, {module path/tag: array}). Positions and the causal mask are
    given explicitly: by default gemma derives them from `tokens != 0` and would treat id 0 as padding.
    A padded batch (`attention_mask` (B, S), 1 for a token): each row's tokens count positions from 0, and
    no query sees a padding key."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    B, S = ids.shape
    tokens = np.ones((B, S), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    positions = jnp.asarray(np.maximum(np.cumsum(tokens, axis=-1) - 1, 0))  # (B, S)
    causal = np.tril(np.ones((S, S), bool))[None] & tokens[:, None, :]  # (B, S, S); the window is gemma's to add
    with nn.intercept_methods(_sow_calls(want_probs)):
        out, state = model.apply(
            {"params": params},
            jnp.asarray(ids, jnp.int32),
            positions=positions,
            attention_mask=jnp.asarray(causal),
            return_last_only=False,
            mutable=["intermediates"],
        )
    sown = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        state["intermediates"], is_leaf=lambda x: isinstance(x, tuple)
    ):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if len(leaf) != 1:
            raise RuntimeError(f"gemma called {name} {len(leaf)} times in one forward; the adapter expects once")
        sown[name] = leaf[0]
    return out.logits, sown


def capture(model, params, ids, cfg, taps="default", attention_mask=None) -> dict[str, np.ndarray]:
    """Run gemma on ids (S,) or (B, S) (padded: with its `attention_mask`); the requested canonical taps it
    can reach as float32 NumPy arrays (bfloat16 values are exact in float32). No batch axis for 1-D ids."""
    wanted = wanted_taps(cfg, taps)
    batched = np.ndim(ids) == 2
    ids2 = np.atleast_2d(np.asarray(ids))
    logits, sown = run_sown(model, params, ids2, any(n.endswith("attn.probs") for n in wanted), attention_mask)
    B, S = ids2.shape
    fused_qkv = cfg.num_key_value_heads == cfg.num_attention_heads
    got = {
        "embed": sown["embedder/encode"],
        "final_norm": sown["final_norm/__call__"],
        "logits_raw": sown["embedder/decode"],
        "logits": logits,
    }
    for i in range(cfg.num_hidden_layers):
        L, p = f"layer_{i}/", f"layers.{i}."
        if fused_qkv:  # (3, B, S, H, Dh)
            q, k, v = sown[L + "attn/qkv_einsum/__call__"]
        else:  # (B, S, H, Dh) and (2, B, S, K, Dh)
            q = sown[L + "attn/q_einsum/__call__"]
            k, v = sown[L + "attn/kv_einsum/__call__"]
        gate_up = sown[L + "mlp/gating_einsum"]  # (B, S, 2, F)
        got.update(
            {
                p + "input": sown[L + "__call__.in"],
                p + "pre_attn_norm": sown[L + "pre_attention_norm/__call__"],
                p + "attn.q_proj": q,
                p + "attn.k_proj": k,
                p + "attn.v_proj": v,
                p + "attn.context": sown[L + "attn/attn_vec_einsum/__call__.in"].reshape(B, S, -1),
                p + "attn.out": sown[L + "attn/attn_vec_einsum/__call__"],
                p + "post_attn_norm": sown[L + "post_attention_norm/__call__"],
                p + "resid_mid": sown[L + "pre_ffw_norm/__call__.in"],
                p + "pre_ffw_norm": sown[L + "pre_ffw_norm/__call__"],
                p + "mlp.gate": gate_up[..., 0, :],
                p + "mlp.up": gate_up[..., 1, :],
                p + "mlp.hidden": sown[L + "mlp/linear.in"],
                p + "mlp.out": sown[L + "mlp/linear"],
                p + "post_ffw_norm": sown[L + "post_ffw_norm/__call__"],
                p + "output": sown[L + "__call__"][1],  # Block returns (cache, outputs)
            }
        )
        if L + "attn/attention_weights/__call__" in sown:  # (B, S, H, S) -> (B, H, S, S)
            got[p + "attn.probs"] = sown[L + "attn/attention_weights/__call__"].transpose(0, 2, 1, 3)
    out = {n: np.asarray(a, dtype=np.float32) for n, a in got.items() if n in wanted}
    return out if batched else {n: a[0] for n, a in out.items()}


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend jax-gemma`: convert the parameters once for every case of a suite."""
    return {"gemma_model": load(checkpoint, args.dtype)}


def write_golden(
    checkpoint,
    ids,
    out_dir,
    *,
    dtype: str = "float32",
    taps="default",
    text: str | None = None,
    description: str | None = None,
    positions=None,
    query_norm=None,
    gemma_model=None,
    attention_mask=None,
) -> Path:
    """Run DeepMind's gemma on a checkpoint directory and write a golden case (producer: jax-gemma).

    query_norm: override the query normalisation option (a QueryPreAttentionNormalisation name);
    gemma_model: a (Transformer, params) pair from `load` (the same checkpoint and dtype) to reuse;
    attention_mask: (B, S), 1 for a token, 0 for padding, for a padded batch."""
    import flax
    import gemma
    import jax

    from ..model.config import load_config

    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint)
    model, params = gemma_model or load(checkpoint, dtype, query_norm)
    acts = capture(model, params, ids, cfg, taps, attention_mask)
    producer = {
        "name": "jax-gemma",
        "version": gemma.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "device": str(jax.devices()[0]),
        "dtype": dtype,
        "query_pre_attn_norm": model.config.query_pre_attn_norm.name,
    }
    return write_candidate(
        out_dir,
        acts,
        ids,
        checkpoint=checkpoint,
        cfg=cfg,
        producer=producer,
        adapter=__name__,
        compute_dtype=dtype,
        text=text,
        description=description,
        positions=positions,
        attention_mask=attention_mask,
    )

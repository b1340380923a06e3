"""KerasHub's Gemma 2 (keras-hub 0.32.0, `GemmaBackbone` on Keras 3.15 with the JAX backend, CPU) -> a golden
case under the canonical tap names.

KerasHub loads the Hugging Face directory itself (`GemmaBackbone.from_preset(directory)`: config and weights
through keras_hub/src/utils/transformers/convert_gemma.py). Keras layers have no hooks, so the adapter stands a
recorder in for the `call` of each layer it wants to watch (an instance attribute over the class method: the
recorder calls the real `call`, keeps its input or output, and returns the output untouched; the attributes are
deleted afterwards). The backbone runs eagerly, its own code. Line numbers below are of the installed
keras_hub/src/models/gemma/ files (gemma_backbone.py, gemma_decoder_block.py, gemma_attention.py):

    embed                     decoder_block_0's input: x = token_embedding(ids) * sqrt(D) (backbone.py:153-154)
    layers.{i}.input / output decoder_block_{i} (GemmaDecoderBlock.call) input / output
    pre_attn_norm, post_attn_norm, post_ffw_norm   pre_attention_norm / post_attention_norm / post_ffw_norm
    attn.q_proj / k_proj / v_proj    attention.query_dense / key_dense / value_dense outputs (B, S, H or K, Dh)
    attn.q_rope / k_rope      attention._apply_rope's two calls, queries first (attention.py:293, 307), with
                              KerasHub's interleave of the two halves (attention.py:112-117: the same
                              permutation of Dh for q and k) undone, back to Hugging Face's half-split layout
    attn.scores / probs       attention.softmax (a keras Softmax layer, attention.py:94, 201): input, the scaled
                              and soft-capped logits (B, K, G, T, S) -> (B, H, T, S); output, the probabilities.
                              Not reachable under flash_attention=True (the fused op has no softmax layer).
    attn.context / attn.out   attention.output_dense input (B, S, H, Dh) -> (B, S, H*Dh) / output
    resid_mid / pre_ffw_norm  pre_ffw_norm input / output
    mlp.gate / mlp.up         ffw_gating / ffw_gating_2 outputs;  mlp.hidden / mlp.out: ffw_linear input / output
    final_norm                final_normalization output (the backbone's output)
    logits                    token_embedding(final_norm, reverse=True), as GemmaCausalLM computes them
    logits_raw                the same call with the embedding's logit_soft_cap set to None for it: the tied
                              matmul and the final soft-cap are one call
                              (keras/src/layers/core/reversible_embedding.py:137-143)

Every canonical tap is reachable on the default (non-fused) path.

What KerasHub does with a Gemma 2 config (verified in the installed source):
- The query scale ignores `query_pre_attn_scalar` unless it equals head_dim: the converter sets
  `query_head_dim_normalize = head_dim == query_pre_attn_scalar` (convert_gemma.py:32-35), the backbone hands it
  to each GemmaDecoderBlock (backbone.py:129), but the block builds its CachedGemmaAttention with
  `query_head_dim_normalize=True` hard-coded (decoder_block.py:68), so queries are always scaled by
  head_dim^-0.5 (attention.py:146-147). 27B (query_pre_attn_scalar 144, head_dim 128) and the tiny model
  (32 vs 64) are run with the wrong scale: `compare` fails at layer 0's attention and `--diagnose` names
  `query_scale=head_dim`.
- The sliding window is honoured, on both paths: every even layer gets it (backbone.py:122), the mask
  keeps keys with |i - j| < window (attention.py:229-231, with the causal mask: i - window < j <= i), and it is
  applied before the fused/non-fused branch (attention.py:153-159). keras-hub #2186 (window silently off under
  flash attention) is fixed in this version.
- The attention soft-cap: 50 * tanh(s / 50) on the non-fused path (attention.py:192-196).
- RoPE's base frequency is fixed at 10000 (attention.py:96-98) and the converter does not read `rope_theta`;
  `rms_norm_eps` is not read either (default 1e-6): `load` refuses a config with other values.
- Flash attention: there is no fused path on CPU. `_use_fused_attention_op` returns False on anything but a GPU
  or TPU (attention.py:120-135). `flash_attention=True` forces that branch (the one TPUs take) to see what it
  computes: it calls keras.ops.dot_product_attention with `attn_logits_soft_cap`, which Keras refuses off TPU
  with a ValueError (keras/src/ops/nn.py:2925-2932); on a checkpoint without attention soft-cap it runs
  jax.nn.dot_product_attention (keras/src/backend/jax/nn.py:1800-1813), window mask included.

keras and keras_hub are imported here only, when a function below is called (`pip install 'gemma2-ref[keras]'`,
then keras-hub itself with --no-deps: README). KERAS_BACKEND is set to jax unless already set.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
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
FUSED_UNREACHABLE = ("attn.scores", "attn.probs")  # the fused op computes them inside one call
KERAS_DTYPES = ("float32", "bfloat16", "float16")
ROPE_THETA = 10_000.0  # CachedGemmaAttention.build: RotaryEmbedding(max_wavelength=10_000.0)


CAPABILITIES = Capabilities(padded_batch=True)  # padding_mask; no cache path here


def reachable_taps(cfg, flash_attention: bool = False) -> list[str]:
    """The canonical taps this adapter can capture, in execution order."""
    kinds = [k for k in REACHABLE if not (flash_attention and k in FUSED_UNREACHABLE)]
    return taps_of_kinds(cfg, kinds)


def _import_keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if "tensorflow" not in sys.modules and importlib.util.find_spec("vllm") and importlib.util.find_spec("triton"):
        # `import keras_hub` imports vLLM when it is installed (keras_hub/src/vllm/registry.py), vLLM imports
        # triton, and triton's LLVM loaded after TensorFlow's (which keras_hub imports) aborts the process ("Option
        # 'bitcode-mdindex-threshold' registered more than once"). Loaded first, all three coexist.
        import triton  # noqa: F401
    import keras
    import keras_hub

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"the keras-hub adapter runs Keras on JAX, but Keras was already imported with the "
            f"{keras.backend.backend()!r} backend: set KERAS_BACKEND=jax before anything imports keras"
        )
    return keras, keras_hub


def check_config(cfg) -> None:
    """Refuse a config KerasHub's converter would silently run differently (other than its query scale, which
    is the finding this adapter exists to show)."""
    if float(cfg.rope_theta) != ROPE_THETA:
        raise ValueError(
            f"KerasHub's Gemma attention fixes RoPE's base frequency at {ROPE_THETA:g} "
            f"(keras_hub/src/models/gemma/gemma_attention.py:96-98); this checkpoint has rope_theta "
            f"{cfg.rope_theta:g}"
        )
    if float(cfg.rms_norm_eps) != 1e-6:
        raise ValueError(
            f"KerasHub's Gemma 2 converter does not read rms_norm_eps (it keeps 1e-6); this "
            f"checkpoint has {cfg.rms_norm_eps:g}"
        )
    if any(cfg.is_sliding(i) != (i % 2 == 0) for i in range(cfg.num_hidden_layers)):
        raise ValueError(
            "KerasHub puts the sliding window on layers 0, 2, 4, ... (gemma_backbone.py:122); this "
            "checkpoint's layer_types differ"
        )


def load(checkpoint, dtype: str = "float32", fix_query_scale: bool = False):
    """KerasHub's GemmaBackbone for a Hugging Face checkpoint directory, weights and compute in `dtype`.

    fix_query_scale: hand each attention layer the backbone's `query_head_dim_normalize`, which
    GemmaDecoderBlock drops (gemma_decoder_block.py:68 passes True): KerasHub with that one line repaired."""
    from ..model.config import load_config

    if dtype not in KERAS_DTYPES:
        raise ValueError(f"keras-hub dtype must be one of {KERAS_DTYPES}, not {dtype!r}")
    check_config(load_config(checkpoint))
    _, keras_hub = _import_keras()
    backbone = keras_hub.models.GemmaBackbone.from_preset(str(Path(checkpoint).resolve()), dtype=dtype)
    if fix_query_scale:
        for block in backbone.transformer_layers:
            block.attention.query_head_dim_normalize = backbone.query_head_dim_normalize
    return backbone


def _undo_interleave(x):
    """KerasHub's _apply_rope ends by interleaving the two halves of Dh ([a0..a31, b0..b31] -> [a0, b0, a1, b1,
    ...], gemma_attention.py:115-117); the inverse gives the half-split layout Hugging Face and we use."""
    *lead, dh = x.shape
    return x.reshape(*lead, dh // 2, 2).swapaxes(-1, -2).reshape(*lead, dh)


@contextlib.contextmanager
def _recording(backbone, keep, flash_attention: bool):
    """Stand recorders in for the `call` of the layers the taps come from (and _apply_rope); `keep(name, value)`
    receives their inputs and outputs. flash_attention: force CachedGemmaAttention's fused branch."""
    patched = []

    def patch(obj, attr, make):
        original = getattr(obj, attr)
        object.__setattr__(obj, attr, make(original))  # an instance attribute over the class method
        patched.append((obj, attr))

    def on_output(name):
        def make(call):
            def recorder(*args, **kwargs):
                out = call(*args, **kwargs)
                keep(name, out)
                return out

            return recorder

        return make

    def on_both(in_name, out_name):
        def make(call):
            def recorder(x, *args, **kwargs):
                out = call(x, *args, **kwargs)
                keep(in_name, x)
                keep(out_name, out)
                return out

            return recorder

        return make

    def rope_calls(p):
        def make(call):
            order = [p + "attn.q_rope", p + "attn.k_rope"]  # CachedGemmaAttention.call: queries, then keys

            def recorder(*args, **kwargs):
                out = call(*args, **kwargs)
                if order:
                    keep(order.pop(0), _undo_interleave(out))
                return out

            return recorder

        return make

    try:
        for i, block in enumerate(backbone.transformer_layers):
            p, att = f"layers.{i}.", block.attention
            patch(block, "call", on_both(p + "input", p + "output"))
            patch(block.pre_attention_norm, "call", on_output(p + "pre_attn_norm"))
            patch(att.query_dense, "call", on_output(p + "attn.q_proj"))
            patch(att.key_dense, "call", on_output(p + "attn.k_proj"))
            patch(att.value_dense, "call", on_output(p + "attn.v_proj"))
            patch(att, "_apply_rope", rope_calls(p))
            patch(att.softmax, "call", on_both(p + "attn.scores", p + "attn.probs"))
            patch(att.output_dense, "call", on_both(p + "attn.context", p + "attn.out"))
            patch(block.post_attention_norm, "call", on_output(p + "post_attn_norm"))
            patch(block.pre_ffw_norm, "call", on_both(p + "resid_mid", p + "pre_ffw_norm"))
            patch(block.gating_ffw, "call", on_output(p + "mlp.gate"))
            patch(block.gating_ffw_2, "call", on_output(p + "mlp.up"))
            patch(block.ffw_linear, "call", on_both(p + "mlp.hidden", p + "mlp.out"))
            patch(block.post_ffw_norm, "call", on_output(p + "post_ffw_norm"))
            if flash_attention:
                patch(att, "_use_fused_attention_op", lambda _: lambda: True)
        yield
    finally:
        for obj, attr in reversed(patched):
            object.__delattr__(obj, attr)


def capture(
    backbone, ids, cfg, taps="default", attention_mask=None, flash_attention: bool = False
) -> dict[str, np.ndarray]:
    """Run KerasHub's backbone on ids (S,) or (B, S) (its padding_mask: `attention_mask`, default all ones),
    then the tied head; the requested canonical taps as float32 NumPy arrays (bfloat16 values are exact in
    float32). No batch axis for 1-D ids."""
    wanted = wanted_taps(cfg, taps)
    if flash_attention and any(n.endswith(FUSED_UNREACHABLE) for n in wanted):
        wanted -= {n for n in wanted if n.endswith(FUSED_UNREACHABLE)}
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    got = {}

    def keep(name, value):
        if name in wanted or (name == "layers.0.input" and "embed" in wanted):
            got[name] = value

    batched = np.ndim(ids) == 2
    ids2 = np.atleast_2d(np.asarray(ids)).astype(np.int32)
    mask = np.ones_like(ids2) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask)).astype(np.int32)
    try:
        with _recording(backbone, keep, flash_attention):
            final = backbone({"token_ids": ids2, "padding_mask": mask})
    except ValueError as e:
        if flash_attention and "attn_logits_soft_cap is only supported for JAX on TPU" in str(e):
            raise ValueError(
                "flash_attention=True: KerasHub's fused branch hands the attention soft-cap to "
                "keras.ops.dot_product_attention, and Keras answers: attn_logits_soft_cap is only "
                "supported for JAX on TPU (keras/src/ops/nn.py:2925-2932). KerasHub itself never takes "
                "this branch on CPU (gemma_attention.py:120-135); run without flash attention"
            ) from None
        raise
    head = backbone.token_embedding
    got["final_norm"] = final
    got["logits"] = head(final, reverse=True)
    if "logits_raw" in wanted:
        cap = head.logit_soft_cap
        try:
            head.logit_soft_cap = None
            got["logits_raw"] = head(final, reverse=True)
        finally:
            head.logit_soft_cap = cap
    if "embed" in wanted:
        got["embed"] = got["layers.0.input"]
    B, S = ids2.shape
    out = {}
    for name, value in got.items():
        if name not in wanted:
            continue
        a = np.asarray(value.astype("float32") if hasattr(value, "astype") else value, dtype=np.float32)
        if name.endswith(("attn.scores", "attn.probs")):  # (B, K, G, T, S) -> (B, H, T, S): head h = k*G + g
            a = a.reshape(B, H, a.shape[-2], a.shape[-1])
        elif name.endswith("attn.context"):  # (B, S, H, Dh) -> (B, S, H*Dh)
            a = a.reshape(B, S, H * Dh)
        out[name] = a
    return out if batched else {n: a[0] for n, a in out.items()}


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend keras-hub [--flash-attention]`: load the backbone once for every case."""
    return {
        "keras_model": load(checkpoint, args.dtype, getattr(args, "fix_query_scale", False)),
        "flash_attention": bool(getattr(args, "flash_attention", False)),
    }


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
    keras_model=None,
    attention_mask=None,
    flash_attention: bool = False,
    fix_query_scale: bool = False,
) -> Path:
    """Run KerasHub on a checkpoint directory and write a golden case (producer: keras-hub).

    keras_model: a GemmaBackbone from `load` (same checkpoint and dtype) to reuse; attention_mask: (B, S), 1 for
    a token, 0 for padding (KerasHub's padding_mask); flash_attention: force the fused attention branch (see the
    module docstring: KerasHub never takes it on CPU); fix_query_scale: see `load`."""
    keras, keras_hub = _import_keras()
    import jax

    from ..model.config import load_config

    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint)
    backbone = keras_model or load(checkpoint, dtype, fix_query_scale)
    acts = capture(backbone, ids, cfg, taps, attention_mask, flash_attention)
    computed = backbone.dtype_policy.compute_dtype
    producer = {
        "name": "keras-hub",
        "version": keras_hub.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "dtype": computed,
        "flash_attention": bool(flash_attention),
        "query_head_dim_normalize": bool(backbone.transformer_layers[0].attention.query_head_dim_normalize),
    }
    return write_candidate(
        out_dir,
        acts,
        ids,
        checkpoint=checkpoint,
        cfg=cfg,
        producer=producer,
        adapter=__name__,
        compute_dtype=computed,
        text=text,
        description=description,
        positions=positions,
        attention_mask=attention_mask,
    )

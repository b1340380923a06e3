"""mlx-lm's Gemma 2 (`mlx_lm/models/gemma2.py`, on MLX's CPU backend) -> a golden case under the canonical
tap names.

MLX modules have no hooks, so the adapter stands a `Recorder` in for each submodule it wants to watch: the
recorder calls the real module, keeps its input or output, and returns the output untouched. The model runs
its own code; the recorders are taken out again afterwards. What they reach, per layer (B = batch):

    layers.{i}.input          TransformerBlock input;  layers.{i}.output: its output
    embed                     layer 0's input (mlx-lm multiplies by sqrt(D) inline in GemmaModel.__call__)
    layers.{i}.pre_attn_norm  input_layernorm output
    attn.q_proj / k_proj / v_proj   q/k/v_proj outputs (B, S, H*Dh) -> (B, S, H or K, Dh)
    attn.q_rope / k_rope      self_attn.rope's two calls, queries first: (B, H, S, Dh) -> (B, S, H, Dh)
    attn.context              o_proj input (B, S, H*Dh);  attn.out: o_proj output
    post_attn_norm / resid_mid / pre_ffw_norm / post_ffw_norm   the norms' outputs (resid_mid: an input)
    mlp.gate / mlp.up / mlp.out    gate/up/down_proj outputs;  mlp.hidden: down_proj input
    final_norm                model.norm output
    logits_raw                embed_tokens.as_linear output (the tied head, before the final soft-cap)
    logits                    what Model.__call__ returns

Not reachable: `attn.scores` and `attn.probs` (plain array expressions inside Attention.__call__).

mlx-lm 0.32.2 has no sliding window: ModelArgs (models/gemma2.py:12-27) has no `sliding_window` field, and
GemmaModel.__call__ builds one causal mask, `create_attention_mask(h, cache[0], return_array=True)`
(gemma2.py:176, no `window_size`), for every layer (gemma2.py:178-179). Past the window `compare` fails at the
first sliding layer's attention and `--diagnose` names `no_sliding_window` (README, "Backends we checked").

mlx and mlx_lm are imported here only, when a function below is called (`pip install 'gemma2-ref[mlx]'`).
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
    "attn.q_rope",
    "attn.k_rope",
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
MLX_DTYPES = ("float32", "bfloat16", "float16")


CAPABILITIES = Capabilities(padded_batch=True)  # right padding only (check_padding); no cache path here


def reachable_taps(cfg) -> list[str]:
    """The canonical taps this adapter can capture, in execution order."""
    return taps_of_kinds(cfg, REACHABLE)


def load(path, dtype: str | None = "float32"):
    """mlx-lm's Model for a Hugging Face checkpoint directory, its weights cast to `dtype` (None: as stored,
    which is what `mlx_lm.load` runs: bfloat16 for the released checkpoints)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    if dtype is not None and dtype not in MLX_DTYPES:
        raise ValueError(f"mlx dtype must be one of {MLX_DTYPES}, not {dtype!r}")
    mx.set_default_device(mx.cpu)
    model, _ = load_model(Path(path))
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))  # floating-point parameters only
    return model


def stored_dtype(model) -> str:
    """The dtype mlx-lm computes in: that of its parameters (the embedding's, they all agree)."""
    return str(model.model.embed_tokens.weight.dtype).removeprefix("mlx.core.")


def _recorder(inner, keep):
    """An nn.Module that calls `inner` and hands (first input, output) to `keep`; mlx-lm's code sees the
    same call signature and the same output."""
    import mlx.nn as nn

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def __call__(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            keep(args[0] if args else None, out)
            return out

        def as_linear(self, x):  # Model.__call__ uses the embedding as the tied output head
            out = self.inner.as_linear(x)
            keep("as_linear", out)
            return out

    return Recorder()


def capture(model, ids, cfg, taps="default") -> dict[str, np.ndarray]:
    """Run mlx-lm's `model` on ids (S,) or (B, S); the requested canonical taps it can reach (`cfg`: our
    Gemma2Config of the same checkpoint) as float32 NumPy arrays (bfloat16 values are exact in float32).
    No batch axis for 1-D ids."""
    import mlx.core as mx

    wanted = wanted_taps(cfg, taps)
    kept = wanted | ({"layers.0.input"} if "embed" in wanted else set())  # embed is layer 0's input
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    got: dict[str, mx.array] = {}
    swapped: list[tuple[object, object, object]] = []  # (parent, attribute or index, original module)

    def swap(parent, key, keep):
        original = parent[key] if isinstance(parent, list) else getattr(parent, key)
        recorder = _recorder(original, keep)
        if isinstance(parent, list):
            parent[key] = recorder
        else:
            setattr(parent, key, recorder)
        swapped.append((parent, key, original))

    def put(name, value, heads=None, heads_first=False):
        if name in kept:
            if heads_first:  # (B, H, S, Dh) as mlx-lm keeps heads for attention -> (B, S, H, Dh)
                value = value.transpose(0, 2, 1, 3)
            elif heads is not None:  # (B, S, heads*Dh) -> (B, S, heads, Dh)
                value = value.reshape(*value.shape[:-1], heads, Dh)
            got[name] = value

    def output(name, heads=None):
        return lambda x, out: put(name, out, heads)

    def both(in_name, out_name):
        return lambda x, out: (put(in_name, x), put(out_name, out))

    def rope_calls(p):
        order = [p + "attn.q_rope", p + "attn.k_rope"]  # Attention.__call__ ropes queries, then keys
        return lambda x, out: put(order.pop(0), out, heads_first=True) if order else None

    base = model.model
    swap(base, "embed_tokens", lambda x, out: put("logits_raw", out) if isinstance(x, str) else None)
    for i, layer in enumerate(base.layers):
        p = f"layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        swap(layer, "input_layernorm", output(p + "pre_attn_norm"))
        swap(att, "q_proj", output(p + "attn.q_proj", H))
        swap(att, "k_proj", output(p + "attn.k_proj", K))
        swap(att, "v_proj", output(p + "attn.v_proj", K))
        swap(att, "rope", rope_calls(p))
        swap(att, "o_proj", both(p + "attn.context", p + "attn.out"))
        swap(layer, "post_attention_layernorm", output(p + "post_attn_norm"))
        swap(layer, "pre_feedforward_layernorm", both(p + "resid_mid", p + "pre_ffw_norm"))
        swap(mlp, "gate_proj", output(p + "mlp.gate"))
        swap(mlp, "up_proj", output(p + "mlp.up"))
        swap(mlp, "down_proj", both(p + "mlp.hidden", p + "mlp.out"))
        swap(layer, "post_feedforward_layernorm", output(p + "post_ffw_norm"))
        swap(base.layers, i, both(p + "input", p + "output"))  # last: it wraps the layer swapped above
    swap(base, "norm", output("final_norm"))
    batched = np.ndim(ids) == 2
    try:
        got["logits"] = model(mx.array(np.atleast_2d(np.asarray(ids)).astype(np.int32)))
    finally:
        for parent, key, original in reversed(swapped):
            if isinstance(parent, list):
                parent[key] = original
            else:
                setattr(parent, key, original)
    if "embed" in wanted:
        got["embed"] = got["layers.0.input"]  # mlx-lm scales the embedding inline, before layer 0
    got = {n: a for n, a in got.items() if n in wanted}
    mx.eval(list(got.values()))
    out = {name: np.array(a.astype(mx.float32)) for name, a in got.items()}
    return out if batched else {name: a[0] for name, a in out.items()}


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend mlx`: load the model once for every case of a suite."""
    return {"mlx_model": load(checkpoint, args.dtype)}


def check_padding(attention_mask) -> None:
    """mlx-lm's Model.__call__(inputs, cache) takes no attention mask (models/gemma2.py:192-196). A right-padded
    batch needs none for its token rows (causal attention never looks ahead, positions start at 0); a
    left-padded one would let tokens attend to the padding before them."""
    if attention_mask is None:
        return
    mask = np.atleast_2d(np.asarray(attention_mask)).astype(bool)
    if (np.diff(mask.astype(np.int8), axis=-1) > 0).any():  # a token after padding: left (or inner) padding
        raise NotImplementedError(
            "mlx-lm's Gemma 2 takes no attention mask: it cannot run a left-padded batch (right padding needs none)"
        )


def write_golden(
    checkpoint,
    ids,
    out_dir,
    *,
    dtype: str | None = "float32",
    taps="default",
    text: str | None = None,
    description: str | None = None,
    positions=None,
    mlx_model=None,
    attention_mask=None,
) -> Path:
    """Run mlx-lm on a checkpoint directory and write a golden case (producer: mlx-lm).

    dtype: "float32" (check subtle mistakes), "bfloat16" / "float16", or None for the stored dtype;
    attention_mask: (B, S), 1 for a token, for a right-padded batch (left padding: NotImplementedError)."""
    import mlx.core as mx
    import mlx_lm

    from ..model.config import load_config

    check_padding(attention_mask)
    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint)
    model = mlx_model or load(checkpoint, dtype)
    acts = capture(model, ids, cfg, taps)
    computed = stored_dtype(model)
    producer = {
        "name": "mlx-lm",
        "version": mlx_lm.__version__,
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "dtype": computed,
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

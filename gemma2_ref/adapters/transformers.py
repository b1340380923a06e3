"""Hugging Face transformers' Gemma2ForCausalLM -> a golden case under the canonical tap names.

Activations are captured with forward hooks on transformers' own modules, so the model runs unmodified, in
the dtype and attention implementation you choose. What the hooks can reach faithfully:

    embed                     output of model.embed_tokens (it multiplies by the normalizer itself)
    layers.{i}.input          the decoder layer's input (forward pre-hook)
    layers.{i}.pre_attn_norm  input_layernorm output
    layers.{i}.attn.q_proj / k_proj / v_proj   q/k/v_proj outputs, heads split: (S, H or K, Dh)
    layers.{i}.attn.probs     the attention weights self_attn returns: eager attention only (sdpa and
                              flash kernels return none), and only when asked for ("all" or by name)
    layers.{i}.attn.context   o_proj input;  layers.{i}.attn.out: o_proj output
    layers.{i}.post_attn_norm post_attention_layernorm output
    layers.{i}.resid_mid      pre_feedforward_layernorm input
    layers.{i}.pre_ffw_norm   pre_feedforward_layernorm output
    layers.{i}.mlp.gate / mlp.up   gate_proj / up_proj outputs;  mlp.hidden: down_proj input;  mlp.out: its output
    layers.{i}.post_ffw_norm  post_feedforward_layernorm output
    layers.{i}.output         the decoder layer's output
    final_norm                model.norm output
    logits_raw                lm_head output (before the final soft-cap)
    logits                    the model's returned logits (after the final soft-cap)

Not reachable with hooks: `attn.q_rope` / `attn.k_rope` (RoPE is a function call inside the attention
module) and `attn.scores` (inside the attention function). A candidate simply lacks them; `compare` says so.

torch and transformers are imported here only, when a function below is called.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model.taps import taps_of_kinds
from ..storage.loader import resolve_checkpoint
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
TORCH_DTYPES = ("float32", "bfloat16", "float16")
CAPABILITIES = Capabilities(padded_batch=True, decode=True, chunked_prefill=True)  # attention_mask; past_key_values


def reachable_taps(cfg) -> list[str]:
    """The canonical taps this adapter can capture, in execution order."""
    return taps_of_kinds(cfg, REACHABLE)


def load(path, dtype: str = "float32", attn_implementation: str = "eager"):
    """Gemma2ForCausalLM.from_pretrained(path) in `dtype` with the chosen attention implementation. `path`: a
    checkpoint directory or a bundled model's name ("tiny"), never a download."""
    import torch
    from transformers import Gemma2ForCausalLM

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"transformers dtype must be one of {TORCH_DTYPES}, not {dtype!r}")
    return Gemma2ForCausalLM.from_pretrained(
        resolve_checkpoint(path), dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    ).eval()


def capture(
    hf_model,
    ids,
    taps="default",
    gemma_config=None,
    attention_mask=None,
    position_ids="from_mask",
    prefill: int | None = None,
    cache=None,
    chunks=None,
) -> dict[str, np.ndarray]:
    """Run `hf_model` on ids (S,) or (B, S) and return the requested canonical taps it can reach, as
    float32 NumPy arrays (bfloat16 and float16 values are exact in float32). No batch axis for 1-D ids.

    `prefill`: transformers' own KV-cache path instead: ids[:prefill] in one call, then one token per call
    with the returned `past_key_values` (teacher-forced, as gemma2_ref.generate.decode_taps), each step's
    taps stacked after the prefill's; `position_ids` then, if given, are each step's (B, 1) positions as
    a list (to reproduce a decode-loop mistake), else transformers advances them itself. `cache`: the
    transformers Cache to decode through (e.g. a StaticCache), instead of the DynamicCache the model makes."""
    import torch

    from ..model.config import config_from_hf_dict

    cfg = gemma_config or config_from_hf_dict(hf_model.config.to_dict(), "transformers config")
    wanted = wanted_taps(cfg, taps, decode=prefill is not None)
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    got: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name, value, heads=None):
        if name in wanted and value is not None:
            got[name] = value if heads is None else value.reshape(*value.shape[:-1], heads, Dh)

    def out_hook(name, heads=None):
        return lambda m, i, o: keep(name, o[0] if isinstance(o, tuple) else o, heads)

    def in_hook(name):
        return lambda m, args, kwargs: keep(name, args[0] if args else kwargs.get("hidden_states"))

    def add_out(module, name, heads=None):
        if name in wanted:
            hooks.append(module.register_forward_hook(out_hook(name, heads)))

    def add_in(module, name):
        if name in wanted:
            hooks.append(module.register_forward_pre_hook(in_hook(name), with_kwargs=True))

    base = hf_model.model
    add_out(base.embed_tokens, "embed")
    for i, layer in enumerate(base.layers):
        p = f"layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        add_in(layer, p + "input")
        add_out(layer, p + "output")
        add_out(layer.input_layernorm, p + "pre_attn_norm")
        add_out(att.q_proj, p + "attn.q_proj", H)
        add_out(att.k_proj, p + "attn.k_proj", K)
        add_out(att.v_proj, p + "attn.v_proj", K)
        if p + "attn.probs" in wanted:
            hooks.append(
                att.register_forward_hook(
                    lambda m, i, o, n=p + "attn.probs": keep(n, o[1] if isinstance(o, tuple) and len(o) > 1 else None)
                )
            )
        add_in(att.o_proj, p + "attn.context")
        add_out(att.o_proj, p + "attn.out")
        add_out(layer.post_attention_layernorm, p + "post_attn_norm")
        add_in(layer.pre_feedforward_layernorm, p + "resid_mid")
        add_out(layer.pre_feedforward_layernorm, p + "pre_ffw_norm")
        add_out(mlp.gate_proj, p + "mlp.gate")
        add_out(mlp.up_proj, p + "mlp.up")
        add_in(mlp.down_proj, p + "mlp.hidden")
        add_out(mlp.down_proj, p + "mlp.out")
        add_out(layer.post_feedforward_layernorm, p + "post_ffw_norm")
    add_out(base.norm, "final_norm")
    add_out(hf_model.lm_head, "logits_raw")
    batched = np.ndim(ids) == 2
    try:
        with torch.no_grad():
            ids_t = torch.tensor(np.atleast_2d(np.asarray(ids)), dtype=torch.long)
            extra = {}
            if attention_mask is not None:  # a padded batch: the mask, and (unless asked not to) each row's
                mask = np.asarray(attention_mask)  # positions counted from its first token, as generate() does
                extra["attention_mask"] = torch.tensor(mask, dtype=torch.long)
                if isinstance(position_ids, str) and position_ids == "from_mask":
                    position_ids = np.maximum(np.cumsum(mask, -1) - 1, 0)
                if position_ids is not None:
                    extra["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
            if prefill is None:
                got["logits"] = hf_model(input_ids=ids_t, use_cache=False, **extra).logits
                steps = [dict(got)]
            else:
                steps, past = [], cache
                sizes = list(chunks) if chunks is not None else [prefill] + [1] * (ids_t.shape[1] - prefill)
                ends = np.cumsum(sizes)
                for s0, s1 in zip([0, *ends[:-1]], ends):
                    got.clear()
                    step_kw = (
                        {}
                        if isinstance(position_ids, str) or position_ids is None
                        else {"position_ids": torch.tensor(np.asarray(position_ids[len(steps)]), dtype=torch.long)}
                    )
                    result = hf_model(input_ids=ids_t[:, s0:s1], past_key_values=past, use_cache=True, **step_kw)
                    got["logits"], past = result.logits, result.past_key_values
                    steps.append(dict(got))
    finally:
        for h in hooks:
            h.remove()
    out = {name: torch.cat([s[name] for s in steps], dim=1).detach().float().cpu().numpy() for name in steps[0]}
    return out if batched else {name: a[0] for name, a in out.items()}


def backend_options(checkpoint, args) -> dict:
    """`gemma2-ref golden --backend transformers`: load the model once for every case of a suite."""
    return {
        "attn_implementation": args.attn_implementation,
        "hf_model": load(checkpoint, args.dtype, args.attn_implementation),
    }


def write_golden(
    checkpoint,
    ids,
    out_dir,
    *,
    dtype: str = "float32",
    attn_implementation: str = "eager",
    taps="default",
    text: str | None = None,
    description: str | None = None,
    hf_model=None,
    positions=None,
    attention_mask=None,
    position_ids="from_mask",
    prefill: int | None = None,
    cache=None,
    chunks=None,
) -> Path:
    """Run transformers on a checkpoint directory (or a bundled model's name) and write a golden case
    (producer: transformers). A padded batch gives its `attention_mask`; `position_ids` default to each
    row's positions counted from its first token (as transformers' generate() makes them). `chunks`: with
    `prefill`, the length of every forward through the cache (a chunked prefill; see `capture`)."""
    import torch
    import transformers

    from ..model.config import load_config

    checkpoint = resolve_checkpoint(checkpoint)
    hf_model = hf_model or load(checkpoint, dtype, attn_implementation)
    cfg = load_config(checkpoint)
    acts = capture(hf_model, ids, taps, cfg, attention_mask, position_ids, prefill, cache, chunks)
    producer = {
        "name": "transformers",
        "version": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": hf_model.config._attn_implementation,
        "dtype": dtype,
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
        prefill=prefill,
        chunks=chunks,
    )


# -- corpus goldens (verify/corpus.py): the candidate's logits of a chunk's scored rows, nothing written -------


def corpus_backend(checkpoint, dtype: str | None, gguf=None) -> dict:
    """The candidate record of `gemma2-ref corpus --backend transformers`: dtype and versions."""
    import torch
    import transformers

    dtype = dtype or "float32"
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"--dtype {dtype}: transformers computes in one of {', '.join(TORCH_DTYPES)}")
    return {
        "dtype": dtype,
        "attn_implementation": "eager",
        "producer": {
            "name": "transformers",
            "version": transformers.__version__,
            "torch": torch.__version__,
            "adapter": "gemma2_ref.adapters.transformers",
        },
    }


def corpus_model(checkpoint, dtype: str, gguf=None, ctx: int | None = None):
    """Gemma2ForCausalLM in `dtype`, eager attention (the soft-capped one), loaded once per worker."""
    return load(checkpoint, dtype, "eager")


def corpus_logits(hf_model, ids, start: int, stop: int) -> np.ndarray:
    """(stop - start, V) float32 logits (after the final soft-cap) of rows [start, stop) of one chunk."""
    import torch

    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(np.asarray(ids)[None], dtype=torch.long),
            use_cache=False,
            logits_to_keep=slice(start, stop),
        )
    return out.logits[0].float().numpy()

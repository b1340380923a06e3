"""Independent reference: Hugging Face transformers' Gemma2ForCausalLM (eager attention, float32).

Tests build a random model here with torch, save it with `save_pretrained` (the real HF layout), load the
same files through gemma2_ref's own loader, and compare. Every weight is randomised, the RMSNorm weights
included: transformers initialises them to zero, which would hide a missing or doubled `1 +`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import Gemma2Config as HFGemma2Config
from transformers import Gemma2ForCausalLM

torch.set_num_threads(2)


def hf_config(**overrides) -> HFGemma2Config:
    kw = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        max_position_embeddings=512,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return HFGemma2Config(**kw)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int, scale: float = 1.0, norm_std: float = 0.3) -> None:
    """Every parameter random: Linear ~ N(0, scale^2/fan_in), norms ~ N(0, norm_std^2), embedding ~ N(0, 1/D)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            std = norm_std
        elif "embed_tokens" in name:
            std = 1.0 / math.sqrt(p.shape[1])
        else:
            std = scale / math.sqrt(p.shape[1])
        p.copy_(torch.randn(p.shape, generator=g) * std)


def make_checkpoint(
    directory: Path,
    config: HFGemma2Config,
    seed: int = 0,
    dtype=torch.float32,
    scale: float = 1.0,
    max_shard_size: str | None = None,
) -> Path:
    """A random Gemma 2 saved by transformers itself, in `dtype` (float32 / bfloat16 / float16)."""
    model = Gemma2ForCausalLM(config).eval()
    randomise(model, seed, scale)
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    return Path(directory)


# The model the diagnosis tests run transformers' mistakes on, where each known mistake shows:
# query_pre_attn_scalar (24) != head_dim (16) != D/H (18), sqrt(72) = 8.485 is 8.5 in bfloat16, a window of 8
DIAGNOSABLE_WINDOW = 8
DIAGNOSABLE = dict(
    vocab_size=300,
    hidden_size=72,
    intermediate_size=144,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=DIAGNOSABLE_WINDOW,
    num_hidden_layers=4,
)


# A 27B-like engine test model: the query scale 1/sqrt(query_pre_attn_scalar) differs from 1/sqrt(head_dim)
LIKE_27B = dict(
    hidden_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    intermediate_size=192,
    num_hidden_layers=4,
    sliding_window=8,
)  # D/H = 24 != head_dim 16


def diagnosable_checkpoint(directory: Path) -> Path:
    """The DIAGNOSABLE model, random (seed 11, scale 2: activations large enough for every mistake to show)."""
    return make_checkpoint(directory, hf_config(**DIAGNOSABLE), seed=11, scale=2.0)


def load_reference(directory: Path, attn_implementation: str = "eager", dtype=torch.float32):
    """The saved checkpoint loaded back by transformers, for computing in `dtype`."""
    return Gemma2ForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation).eval()


@torch.no_grad()
def reference_run(model, ids) -> dict[str, np.ndarray]:
    """transformers' embed / per-layer outputs / final norm / logits, captured with forward hooks."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: captured.__setitem__("embed", o))]
    for n, layer in enumerate(model.model.layers):
        hooks.append(
            layer.register_forward_hook(
                lambda m, i, o, n=n: captured.__setitem__(f"layers.{n}.output", o[0] if isinstance(o, tuple) else o)
            )
        )
    hooks.append(model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("final_norm", o)))
    try:
        ids_t = torch.tensor(np.atleast_2d(ids), dtype=torch.long)
        logits = model(input_ids=ids_t).logits
    finally:
        for h in hooks:
            h.remove()
    out = {k: v.float().numpy() for k, v in captured.items()}
    out["logits"] = logits.float().numpy()
    if np.ndim(ids) == 1:
        out = {k: v[0] for k, v in out.items()}
    return out

"""gemma2-ref: Google's Gemma 2 (2B, 9B, 27B) in plain NumPy, for reading, running and checking.

    import gemma2_ref as g2
    model = g2.load_model("tiny")                 # or a Hugging Face checkpoint directory
    tok = g2.load_tokenizer("tiny")
    ids = tok.encode("The cat sat on the", bos=True)
    logits = model.logits(ids)                    # (seq, vocab), after the final soft-cap
    trace = model.forward(ids, taps="all")        # logits + every intermediate, canonical names
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import PRESETS, ConfigError, Gemma2Config, load_config
from .data import bundled_names, bundled_path
from .model import CORRECT, Mistakes, Model, forward, select_taps, tap_names
from .tokenizer import Tokenizer, load_tokenizer
from .weights import Weights, WeightsError, index_checkpoint

__version__ = "0.1.0"

COMPUTE_DTYPES = ("float32", "float64")


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A checkpoint directory, or the name of a bundled model ("tiny"), as a directory path."""
    name = str(path_or_name)
    path = Path(path_or_name)
    if path.is_dir():
        return path
    bundled = bundled_path(name)
    if bundled is not None:
        return bundled
    if name in PRESETS:
        raise ValueError(f"{name!r} is a config preset without weights: pass a checkpoint directory "
                         f"(config.json + *.safetensors), e.g. a download of google/gemma-2-{name}. "
                         f"Bundled models: {', '.join(bundled_names())}")
    raise FileNotFoundError(f"{name}: not a directory, nor a bundled model ({', '.join(bundled_names())})")


def load_model(path_or_preset: str | Path, dtype: str = "float32", keep_converted: bool = False) -> Model:
    """Load a Gemma 2 checkpoint (Hugging Face layout) or a bundled model by name.

    Every tensor's presence, shape and dtype is checked against config.json before anything is returned;
    the weights stay memory-mapped in their stored dtype and are converted to `dtype` ("float32" or
    "float64") one layer at a time. `keep_converted=True` keeps converted layers (faster repeated runs)."""
    if str(dtype) not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, not {dtype!r}")
    path = resolve_checkpoint(path_or_preset)
    cfg = load_config(path)
    refs = index_checkpoint(path, cfg)
    return Model(cfg, Weights(refs, cfg, np.dtype(dtype), keep_converted), dtype, path)


__all__ = [
    "CORRECT", "ConfigError", "Gemma2Config", "Mistakes", "Model", "PRESETS", "Tokenizer", "Weights",
    "WeightsError", "forward", "load_config", "load_model", "load_tokenizer", "resolve_checkpoint",
    "select_taps", "tap_names",
]

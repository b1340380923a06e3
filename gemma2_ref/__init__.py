"""gemma2-ref: Google's Gemma 2 (2B, 9B, 27B) in plain NumPy, for reading, running and checking.

    import gemma2_ref as g2
    model = g2.load_model("tiny")                 # or a Hugging Face checkpoint directory
    tok = g2.load_tokenizer("tiny")
    ids = tok.encode("The cat sat on the", bos=True)
    logits = model.logits(ids)                    # (seq, vocab), after the final soft-cap
    trace = model.forward(ids, taps="all")        # logits + every intermediate, canonical names

docs/architecture.md maps the modules and the contracts (API, tap names, golden format, exit codes).
"""

from __future__ import annotations

from . import _moved
from ._version import __version__  # noqa: F401 (g2.__version__)

_moved.install()  # the flat module names of before the layers: gemma2_ref.golden, gemma2_ref.loader, ...

from .data import bundled_names, bundled_path
from .model.config import PRESETS, ConfigError, Gemma2Config, load_config
from .model.gemma2 import forward
from .model.taps import select_taps, tap_names
from .model.tokenizer import Tokenizer, load_tokenizer
from .storage.loader import COMPUTE_DTYPES, Model, load_model, resolve_checkpoint
from .storage.weights import Weights, WeightsError, index_checkpoint

__all__ = [
    "COMPUTE_DTYPES",
    "ConfigError",
    "Gemma2Config",
    "Model",
    "PRESETS",
    "Tokenizer",
    "Weights",
    "WeightsError",
    "bundled_names",
    "bundled_path",
    "forward",
    "index_checkpoint",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_checkpoint",
    "select_taps",
    "tap_names",
]

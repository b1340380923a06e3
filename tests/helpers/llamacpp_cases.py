"""Checkpoints and GGUFs shared by tests/test_adapter_llamacpp.py and tests/test_check_config.py.

Conversions go through llama.cpp's own convert_hf_to_gguf.py (about 8 s each, mostly importing torch) and
are cached by checkpoint content under $TMPDIR/gemma2-ref-gguf/, so the second test module and later runs
reuse them."""

from __future__ import annotations

from .backends import require
from .scripts import load_script

# the random checkpoint past its window (released tokenizer files), its 21 ids: one definition for the tests
# and the commands of docs/backends/llamacpp.md
_random = load_script("llamacpp_random_checkpoint")
RANDOM_CFG, RANDOM_IDS, random_checkpoint = _random.RANDOM_CFG, _random.RANDOM_IDS, _random.random_checkpoint

INSTALL_LLAMA = (
    "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e '.[llamacpp]' (builds llama-cpp-python 0.3.36 from source, ~7 min)"
)
INSTALL_GGUF = "pip install -e '.[llamacpp]' (gguf==0.19.0)"


def backends():
    """Skip (locally) or fail (CI) without llama-cpp-python and gguf; returns the two modules."""
    return require("llama_cpp", INSTALL_LLAMA), require("gguf", INSTALL_GGUF)

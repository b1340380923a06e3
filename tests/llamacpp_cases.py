"""Checkpoints and GGUFs shared by tests/test_adapter_llamacpp.py and tests/test_check_config.py.

Conversions go through llama.cpp's own convert_hf_to_gguf.py (about 8 s each, mostly importing torch) and
are cached by checkpoint content under $TMPDIR/gemma2-ref-gguf/, so the second test module and later runs
reuse them."""

from __future__ import annotations

import sys
from pathlib import Path

from backends import require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
# the random checkpoint past its window (released tokenizer files), its 21 ids: one definition for the tests
# and the README's commands
from llamacpp_random_checkpoint import RANDOM_CFG, RANDOM_IDS, random_checkpoint  # noqa: E402,F401

INSTALL_LLAMA = ("CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e '.[llamacpp]' (builds llama-cpp-python 0.3.36 "
                 "from source, ~7 min)")
INSTALL_GGUF = "pip install -e '.[llamacpp]' (gguf==0.19.0)"


def backends():
    """Skip (locally) or fail (CI) without llama-cpp-python and gguf; returns the two modules."""
    return require("llama_cpp", INSTALL_LLAMA), require("gguf", INSTALL_GGUF)

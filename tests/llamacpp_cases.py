"""Checkpoints and GGUFs shared by tests/test_adapter_llamacpp.py and tests/test_check_config.py.

Conversions go through llama.cpp's own convert_hf_to_gguf.py (about 8 s each, mostly importing torch) and
are cached by checkpoint content under $TMPDIR/gemma2-ref-gguf/, so the second test module and later runs
reuse them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from backends import require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
# the random checkpoint past its window, and its 21 ids: one definition for the tests and the README's commands
from llamacpp_random_checkpoint import RANDOM_CFG, RANDOM_IDS, random_checkpoint  # noqa: E402,F401

INSTALL_LLAMA = ("CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e '.[llamacpp]' (builds llama-cpp-python 0.3.36 "
                 "from source, ~7 min)")
INSTALL_GGUF = "pip install -e '.[llamacpp]' (gguf==0.19.0)"

# Released Gemma 2 tokenizer_config.json entries for the tokens that must never be split
SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 106: "<start_of_turn>", 107: "<end_of_turn>"}


def backends():
    """Skip (locally) or fail (CI) without llama-cpp-python and gguf; returns the two modules."""
    return require("llama_cpp", INSTALL_LLAMA), require("gguf", INSTALL_GGUF)


def released_layout(directory: Path) -> Path:
    """A random checkpoint with the tokenizer files a released one has, so that llama.cpp's converter can
    write every tokenizer key: tokenizer_config.json marking the special tokens, and an integer
    eos_token_id in config.json (gguf-py's SpecialVocab ignores a list)."""
    random_checkpoint(directory)
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = 1
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>",
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for i, t in SPECIAL.items()},
    }, indent=2) + "\n")
    return directory

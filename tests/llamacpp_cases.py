"""Checkpoints and GGUFs shared by tests/test_adapter_llamacpp.py and tests/test_check_config.py.

Conversions go through llama.cpp's own convert_hf_to_gguf.py (about 8 s each, mostly importing torch) and
are cached by checkpoint content under $TMPDIR/gemma2-ref-gguf/, so the second test module and later runs
reuse them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import gemma2_ref as g2
from backends import require
from gemma2_ref.data import bundled_path
from gemma2_ref.weights import random_weights, save_checkpoint

INSTALL_LLAMA = ("CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e '.[llamacpp]' (builds llama-cpp-python 0.3.36 "
                 "from source, ~7 min)")
INSTALL_GGUF = "pip install -e '.[llamacpp]' (gguf==0.19.0)"

# The tiny preset's shapes (4 layers, D=128, H=4, K=2, Dh=64, V=2048: the bundled tokenizer fits) with
# query_pre_attn_scalar = head_dim, which llama.cpp can express, and a window of 8 that a 21-token prompt
# passes: positions 8..20 of the sliding layers 0 and 2 no longer see the first keys.
RANDOM_CFG = g2.PRESETS["tiny"].replace(query_pre_attn_scalar=64.0, sliding_window=8)
RANDOM_IDS = np.concatenate([[2], np.random.default_rng(1).integers(3, 2048, 20)])  # (21,)

# Released Gemma 2 tokenizer_config.json entries for the tokens that must never be split
SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 106: "<start_of_turn>", 107: "<end_of_turn>"}


def backends():
    """Skip (locally) or fail (CI) without llama-cpp-python and gguf; returns the two modules."""
    return require("llama_cpp", INSTALL_LLAMA), require("gguf", INSTALL_GGUF)


def random_checkpoint(directory: Path) -> Path:
    """Every weight random (norms included), bf16 on disk as released, the bundled tokenizer."""
    return save_checkpoint(directory, RANDOM_CFG, random_weights(RANDOM_CFG, seed=7, scale=2.0), "BF16",
                           tokenizer=bundled_path("tiny") / "tokenizer.model")


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

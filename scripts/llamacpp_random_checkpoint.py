"""Write the random Gemma 2 checkpoint the llama.cpp checks use, and print the token ids they run.

    T=$(python scripts/llamacpp_random_checkpoint.py /tmp/random)     # the checkpoint, and "2 ..." on stdout
    gemma2-ref golden /tmp/random --tokens "$T" --taps all --out /tmp/random-ref

The tiny preset's shapes (4 layers, D=128, H=4, K=2, Dh=64, F=512, V=2048, so the bundled tokenizer fits) with
query_pre_attn_scalar = head_dim = 64 (which llama.cpp can express: it has no key for the scalar) and a
sliding window of 8, which the 21 ids pass: on layers 0 and 2 positions 8..20 no longer see the first keys.
Every weight is random, the RMSNorm weights included; stored in bf16 as the released checkpoints are, with the
tokenizer files a released checkpoint has, so that llama.cpp's converter writes every tokenizer key:
tokenizer_config.json marking the special tokens, and an integer eos_token_id (gguf-py ignores a list).
tests/test_adapter_llamacpp.py and tests/test_check_config.py use the same checkpoint and ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import gemma2_ref as g2
from gemma2_ref.checkpoints import random_weights, save_checkpoint
from gemma2_ref.data import bundled_path

RANDOM_CFG = g2.PRESETS["tiny"].replace(query_pre_attn_scalar=64.0, sliding_window=8)
RANDOM_IDS = np.concatenate([[2], np.random.default_rng(1).integers(3, 2048, 20)])  # (21,): <bos> + 20
# released Gemma 2 tokenizer_config.json: the tokens that must never be split
SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 106: "<start_of_turn>", 107: "<end_of_turn>"}


def random_checkpoint(directory: Path) -> Path:
    directory = Path(directory)
    save_checkpoint(
        directory,
        RANDOM_CFG,
        random_weights(RANDOM_CFG, seed=7, scale=2.0),
        "BF16",
        tokenizer=bundled_path("tiny") / "tokenizer.model",
    )
    return released_token_files(directory)


def released_token_files(directory: Path) -> Path:
    """eos 1 in config.json and the released tokenizer_config.json's special tokens, as the HF checkpoints have."""
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = 1
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    entry = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "added_tokens_decoder": {str(i): {"content": t, **entry} for i, t in SPECIAL.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write (config.json, model.safetensors, tokenizer.model)")
    args = ap.parse_args()
    random_checkpoint(args.out)
    print(" ".join(map(str, RANDOM_IDS.tolist())))


if __name__ == "__main__":
    main()

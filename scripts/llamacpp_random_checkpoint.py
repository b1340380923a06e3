"""Write the random Gemma 2 checkpoint the llama.cpp checks use, and print the token ids they run.

    T=$(python scripts/llamacpp_random_checkpoint.py /tmp/random)     # the checkpoint, and "2 ..." on stdout
    gemma2-ref golden /tmp/random --tokens "$T" --taps all --out /tmp/random-ref

The tiny preset's shapes (4 layers, D=128, H=4, K=2, Dh=64, F=512, V=2048, so the bundled tokenizer fits) with
query_pre_attn_scalar = head_dim = 64 (which llama.cpp can express: it has no key for the scalar) and a
sliding window of 8, which the 21 ids pass: on layers 0 and 2 positions 8..20 no longer see the first keys.
Every weight is random, the RMSNorm weights included; stored in bf16 as the released checkpoints are.
tests/test_adapter_llamacpp.py and tests/test_check_config.py use the same checkpoint and ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import gemma2_ref as g2
from gemma2_ref.data import bundled_path
from gemma2_ref.weights import random_weights, save_checkpoint

RANDOM_CFG = g2.PRESETS["tiny"].replace(query_pre_attn_scalar=64.0, sliding_window=8)
RANDOM_IDS = np.concatenate([[2], np.random.default_rng(1).integers(3, 2048, 20)])  # (21,): <bos> + 20


def random_checkpoint(directory: Path) -> Path:
    return save_checkpoint(directory, RANDOM_CFG, random_weights(RANDOM_CFG, seed=7, scale=2.0), "BF16",
                           tokenizer=bundled_path("tiny") / "tokenizer.model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write (config.json, model.safetensors, tokenizer.model)")
    args = ap.parse_args()
    random_checkpoint(args.out)
    print(" ".join(map(str, RANDOM_IDS.tolist())))


if __name__ == "__main__":
    main()

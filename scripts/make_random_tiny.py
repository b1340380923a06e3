"""Write the bundled tiny model with *random* weights (seed 0): the stand-in until scripts/train_tiny.py runs.

    python scripts/make_random_tiny.py     # gemma2_ref/data/tiny/{config.json, model.safetensors}
"""

from pathlib import Path

import gemma2_ref as g2
from gemma2_ref.weights import random_weights, save_checkpoint

OUT = Path(__file__).resolve().parent.parent / "gemma2_ref" / "data" / "tiny"

if __name__ == "__main__":
    cfg = g2.PRESETS["tiny"]
    save_checkpoint(OUT, cfg, random_weights(cfg, seed=0, scale=1.5), "BF16")
    print(f"wrote {OUT}")

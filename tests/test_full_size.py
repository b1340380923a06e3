"""benchmarks/full_size.py's --copy-layers build: a checkpoint the loader accepts, with the real layout, whose
layers from 4 on hold layers 0-3's bytes under their own names (it fails if a shard is missing from the index,
a tensor is copied from the wrong layer, or the header's offsets do not match the bytes written)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

import gemma2_ref as g2
from gemma2_ref.storage.checkpoints import build_random_checkpoint, preset_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("full_size", ROOT / "benchmarks" / "full_size.py")
full_size = importlib.util.module_from_spec(spec)
sys.modules.setdefault("full_size", full_size)
spec.loader.exec_module(full_size)


def test_copied_layers_checkpoint_repeats_layers_0_to_3_and_loads(tmp_path):
    cfg = preset_config("tiny", 10)
    copied = full_size.build_copied_checkpoint(tmp_path / "copied", cfg, log=lambda *a: None)
    random = build_random_checkpoint(tmp_path / "random", preset_config("tiny", 4), log=lambda *a: None)
    a, b = g2.load_model(copied).weights, g2.load_model(random).weights
    np.testing.assert_array_equal(a.embedding(), b.embedding())  # the random shards are the recipe's
    for i in range(cfg.num_hidden_layers):
        for name in ("q_proj", "down_proj", "post_ffw_norm"):
            np.testing.assert_array_equal(
                np.asarray(getattr(a.layer(i), name)), np.asarray(getattr(b.layer(i % 4), name))
            )
    assert g2.load_model(copied).forward(np.arange(2, 8), logits_at="last")["logits"].shape == (1, cfg.vocab_size)

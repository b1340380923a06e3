import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (hf_reference)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory):
    """A random checkpoint with the tiny preset's shapes, f32 on disk."""
    import gemma2_ref as g2
    from gemma2_ref.data import bundled_path
    from gemma2_ref.checkpoints import random_weights, save_checkpoint

    cfg = g2.PRESETS["tiny"]
    d = tmp_path_factory.mktemp("tiny_random")
    return save_checkpoint(d, cfg, random_weights(cfg, seed=7, scale=2.0), "F32",
                           tokenizer=bundled_path("tiny") / "tokenizer.model")

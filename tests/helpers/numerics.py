"""Error measures the tests state their limits in."""

import numpy as np


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

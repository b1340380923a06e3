"""One 9B gate_proj (14336 x 3584 bf16, 103 MB) from the page cache: a decode step's product, blocked (now),
converted whole first (before), against scanning its bytes through the memory map (the floor).

    OPENBLAS_NUM_THREADS=1 python benchmarks/floor_matrix.py /work/scratch/perf    # best of 5, interleaved

The file is written under the given directory and deleted at the end; each product releases the file pages
(madvise), as a streamed layer does, so every run reads them from the page cache again.
"""

import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma2_ref.model import fast  # noqa: E402

ROWS, COLS = 14336, 3584


def main(scratch: Path) -> None:
    path = scratch / "gate_proj.bf16"
    bits = np.random.default_rng(0).standard_normal((ROWS, COLS), dtype=np.float32).view(np.uint32) >> 16
    bits.astype(np.uint16).tofile(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            w = np.frombuffer(m, np.uint16).reshape(ROWS, COLS)
            x = np.random.default_rng(1).standard_normal((1, 1, COLS), dtype=np.float32)
            release = lambda: m.madvise(mmap.MADV_DONTNEED, 0, len(m))  # noqa: E731
            runs = {
                "scan (floor)": lambda: (release(), w.view(np.uint64).sum()),
                "blocked (now)": lambda: fast.linear(x, fast.StoredWeight(w, np.float32, release)),
                "converted whole (before)": lambda: (
                    release(),
                    fast.linear(x, (w.astype(np.uint32) << 16).view(np.float32)),
                ),
            }
            best = {k: float("inf") for k in runs}
            for _ in range(5):
                for k, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    best[k] = min(best[k], time.perf_counter() - t0)
            w = None  # the mmap closes only once no array views it
        print(f"load average {os.getloadavg()}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
        for k, t in best.items():
            print(f"  {k:26s} {t * 1000:7.1f} ms  {ROWS * COLS * 2 / t / 1e9:6.2f} GB/s of bf16")
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

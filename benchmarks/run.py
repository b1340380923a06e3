"""Speed and memory of the NumPy forward against transformers eager float32: `gemma2-ref bench`, with the
results written beside this script (results.json, results.md).

    python benchmarks/run.py                  # 2B shapes: prefill 128/512/2048, decode, load, peak RSS
    python benchmarks/run.py --full-memory    # also the 26-layer model fully converted, and in torch
    python benchmarks/run.py --small          # tiny shapes, seconds (what CI runs via tests/test_bench.py)

The code lives in gemma2_ref/bench.py (so the CLI works from an installed package); see README.md here.
"""

import sys
from pathlib import Path

from gemma2_ref.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(Path(__file__).resolve().parent / "results.json")]
    sys.exit(main(argv))

"""Where a streamed decode step's time goes, one 9B matrix at a time, from the page cache (issue 31).

    OPENBLAS_NUM_THREADS=1 python benchmarks/floor_matrix.py /work/scratch/perf --repeats 9   # writes floor_matrix.md

A 9B gate_proj (14336 x 3584 bf16, 103 MB) and the 9B output head (the tied embedding, 256000 x 3584, 1.8 GB)
are written under the given directory (deleted at the end). Every case runs in turn, `--repeats` times
(interleaved: a shared machine slows them alike), and its best and median **CPU time of this thread** are
reported (the wall time too: on a busy machine it mostly measures the scheduler). Each product releases the file
pages (madvise), as a streamed layer does, so every run reads them from the page cache again:

- scan: the bf16 bytes summed through the memory map: the floor;
- widen only: the bf16 -> float32 conversion of every block, no product (each way of converting, each block size);
- blocked: what `fast.linear` does with a StoredWeight (convert a block, multiply it, next block);
- converted: the matrix-vector product on a float32 copy already in memory (the resident output head);
- whole first: converting the whole matrix to a float32 copy, then multiplying (before issue 31).

All products are checked bit-identical to x @ w.T of the converted matrix first.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gemma2_ref.model import fast  # noqa: E402

COLS = 3584
GATE_ROWS, HEAD_ROWS = 14336, 256000


def shift_casting(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The conversion before: one left_shift whose uint16 -> uint32 cast goes through NumPy's ufunc buffers."""
    return np.left_shift(block, 16, out=out.view(np.uint32), dtype=np.uint32).view(np.float32)


def high_halves(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The bits written into the high uint16 of each float32 (low halves zero from the allocation)."""
    out.view(np.uint16).reshape(len(block), -1, 2)[:, :, 1] = block
    return out


def cast_then_shift(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """What StoredWeight.convert does: a contiguous cast into the block, then a shift in place."""
    return fast.widen_bf16(block, out)


WIDEN = {"cast then shift (now)": cast_then_shift, "casting left_shift": shift_casting, "high halves": high_halves}


def write_bf16(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for r0 in range(0, rows, 16384):
            block = rng.standard_normal((min(16384, rows - r0), COLS), dtype=np.float32)
            (block.view(np.uint32) >> 16).astype(np.uint16).tofile(f)


def blocked(w: np.ndarray, x: np.ndarray, widen, block_bytes: int, release, multiply: bool = True) -> np.ndarray:
    """fast._linear_stored's loop, with the conversion and the block size as parameters."""
    step = max(fast.STORED_BLOCK_ALIGN, block_bytes // (COLS * 4) // fast.STORED_BLOCK_ALIGN * fast.STORED_BLOCK_ALIGN)
    buffer = np.zeros((step, COLS), np.float32)
    y = np.empty((len(w), 1), np.float32)
    for r0 in range(0, len(w), step):
        r1 = min(len(w), r0 + step)
        block = widen(w[r0:r1], buffer[: r1 - r0])
        if multiply:
            np.matmul(block, x.T, out=y[r0:r1])
    release()
    return y


def in_cache(widen, bits: np.ndarray, out: np.ndarray, times: int) -> None:
    """The same small block converted `times` times: the conversion's own cost, its memory in L2."""
    for _ in range(times):
        widen(bits, out)


def cases_for(name: str, w: np.ndarray, x: np.ndarray, release, sizes: list[int]) -> dict:
    cases = {f"{name}: scan (floor)": lambda: (w.view(np.uint64).sum(), release())}
    if name == "gate_proj":  # 16 rows: 112 KiB of bits and 224 KiB of float32, in a 512 KiB L2, as often as
        small, out = np.array(w[:16]), np.zeros((16, COLS), np.float32)  # the matrix has blocks of 16 rows
        for label, widen in WIDEN.items():
            cases[f"{name}: widen only, in L2 (16 rows, {len(w) // 16} times), {label}"] = lambda wd=widen: in_cache(
                wd, small, out, len(w) // 16
            )
    for kib in sizes:
        for label, widen in WIDEN.items():
            if name == "gate_proj" or (kib == 1024 and label.endswith("(now)")):
                cases[f"{name}: widen only, {label}, {kib} KiB"] = lambda wd=widen, k=kib: blocked(
                    w, x, wd, k << 10, release, multiply=False
                )
                cases[f"{name}: blocked, {label}, {kib} KiB"] = lambda wd=widen, k=kib: blocked(
                    w, x, wd, k << 10, release
                )
    return cases


def measure(cases: dict, repeats: int) -> dict:
    cpu, wall = {k: [] for k in cases}, {k: [] for k in cases}
    for _ in range(repeats):
        for k, run in cases.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            run()
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    return {k: (min(cpu[k]), sorted(cpu[k])[len(cpu[k]) // 2], min(wall[k])) for k in cases}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scratch", type=Path)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--sizes", default="256,512,1024,2048,4096", help="block sizes in KiB of float32")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "floor_matrix.md")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    files = {"gate_proj": (args.scratch / "gate_proj.bf16", GATE_ROWS), "head": (args.scratch / "head.bf16", HEAD_ROWS)}
    rows_out, load_before = [], os.getloadavg()
    x = np.random.default_rng(1).standard_normal((1, COLS), dtype=np.float32)
    try:
        for name, (path, rows) in files.items():
            write_bf16(path, rows)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                w = np.frombuffer(m, np.uint16).reshape(rows, COLS)
                release = lambda m=m: m.madvise(mmap.MADV_DONTNEED, 0, len(m))  # noqa: E731
                whole = fast.StoredWeight(w, np.float32).__array__()  # (rows, COLS) float32
                release()
                expect = whole @ x.T
                for widen in WIDEN.values():
                    assert np.array_equal(blocked(w, x, widen, 1 << 20, release), expect), widen.__name__
                cases = cases_for(name, w, x, release, sizes)
                cases[f"{name}: converted (float32 in memory)"] = lambda whole=whole: whole @ x.T
                if name == "gate_proj":
                    cases[f"{name}: whole first (before issue 31)"] = lambda w=w, release=release: (
                        (w.astype(np.uint32) << 16).view(np.float32) @ x.T,
                        release(),
                    )
                for k, (best, median, wall) in measure(cases, args.repeats).items():
                    rows_out.append((k, best, median, wall, w.nbytes))
                del whole, w, cases
            path.unlink()
    finally:
        for path, _ in files.values():
            path.unlink(missing_ok=True)
    args.out.write_text(table(rows_out, args, load_before, os.getloadavg()))
    print(args.out.read_text())
    return 0


def table(rows, args, load_before, load_after) -> str:
    scans = {k.split(":")[0]: best for k, best, *_ in rows if k.endswith("scan (floor)")}
    lines = [
        "# One matrix of a streamed decode step, from the page cache",
        "",
        f"Command: `OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '?')} python "
        f"benchmarks/floor_matrix.py DIR --repeats {args.repeats} --sizes {args.sizes}`; "
        f"{os.cpu_count()} CPUs, load average {[round(v, 2) for v in load_before]} before, "
        f"{[round(v, 2) for v in load_after]} after. CPU time of the measuring thread (best and median of "
        f"{args.repeats}, interleaved), the wall time's best beside it; bf16 GB/s is the stored bytes over "
        "the best CPU time. What each case is: the script's docstring.",
        "",
        "| case | CPU best | CPU median | wall best | bf16 GB/s | / scan |",
        "|---|---|---|---|---|---|",
    ]
    for k, best, median, wall, nbytes in rows:
        lines.append(
            f"| {k} | {best * 1e3:.1f} ms | {median * 1e3:.1f} ms | {wall * 1e3:.1f} ms | "
            f"{nbytes / best / 1e9:.2f} | {best / scans[k.split(':')[0]]:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

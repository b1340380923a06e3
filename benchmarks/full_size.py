"""Full-size runs: a random bf16 checkpoint with the real 9B or 27B shapes, then the commands a verifier runs,
each in a fresh process, with its wall time and peak resident memory (VmHWM).

    python benchmarks/full_size.py --model 9b              # build (~18.5 GB), measure, delete the checkpoint
    python benchmarks/full_size.py --model 9b --keep DIR   # build into DIR and keep it
    python benchmarks/full_size.py --model 27b --checkpoint DIR --runs generate   # reuse a built one

Measured: `gemma2-ref golden` of a 64-token prompt with the default taps (twice: the two sha256s must agree),
the 4098-token window case (the default taps: refused up front when the disk cannot hold them; `--taps
residual`: streamed to disk), and `gemma2-ref generate` of 16 greedy tokens after a 128-token prompt, with
layers kept in memory as `keep_converted="auto"` allows and with every layer streamed (`--stream-weights`).
`--runs golden-hash-cache`: the golden with the weight-hash cache absent and present, interleaved (`--repeats`),
and hashing alone. `--copy-layers`: only the embedding and layers 0-3 are random, the other layers copies of
their bytes (a build at the disk's speed, for timings that do not depend on the values).
Results go to benchmarks/full_size-<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma2_ref.checkpoints import build_random_checkpoint, preset_config  # noqa: E402
from gemma2_ref.storage.checkpoints import BLOCK_BYTES, random_rows, tensor_std  # noqa: E402
from gemma2_ref.storage.weights import (  # noqa: E402
    EMBEDDING,
    FINAL_NORM,
    expected_tensors,
    read_safetensors_header,
    safetensors_header,
    write_safetensors_blocks,
)

GiB = 1 << 30
RUNS = ("golden", "window", "generate", "generate-streamed", "golden-hash-cache")
# Runs the CLI, then reports this process's peak resident memory: what one fresh `gemma2-ref` process needed.
MEASURED = (
    "import sys, runpy; sys.argv = ['gemma2-ref'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('gemma2_ref.cli', run_name='__main__')\n"
    "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "    print(f'VmHWM_KiB {hwm}', file=sys.stderr)\n"
)


def layer_rate(lines: list[str]) -> dict | None:
    """From the last "layers: k/N  (t s)" progress line: layers done, seconds per layer, the whole forward's."""
    for line in reversed(lines):
        m = re.search(r"layers: (\d+)/(\d+)\s+\(([\d.]+) s\)", line)
        if m:
            done, total, seconds = int(m.group(1)), int(m.group(2)), float(m.group(3))
            return {
                "layers_done": done,
                "layers": total,
                "seconds_per_layer": round(seconds / done, 1),
                "forward_seconds_extrapolated": round(seconds / done * total, 1),
            }
    return None


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(args: list[str], limit: float | None = None) -> dict:
    """Run `gemma2-ref ARGS` in a fresh process; its progress lines are shown as they come (one line, redrawn).
    Past `limit` seconds the run is stopped and its rate per layer extrapolated to the whole forward."""
    command = "gemma2-ref " + " ".join(a if len(a) < 80 else a[:40] + "..." for a in args)
    print(f"running {command}", file=sys.stderr, flush=True)
    t0, c0 = time.perf_counter(), children_cpu()
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a full stdout pipe would block the child
        proc = subprocess.Popen(
            [sys.executable, "-c", MEASURED, *args], cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True
        )
        lines = []
        timer = threading.Timer(limit, proc.kill) if limit else None
        if timer:
            timer.start()
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            print(
                f"\r  {time.perf_counter() - t0:7.1f} s  {lines[-1].strip()[:100]:100s}",
                end="",
                file=sys.stderr,
                flush=True,
            )
        proc.wait()
        if timer:
            timer.cancel()
        out.seek(0)
        stdout = out.read()
    seconds = time.perf_counter() - t0
    print(file=sys.stderr)
    hwm = next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM_KiB")), None)
    last = [line for line in lines if line.strip() and not line.startswith("VmHWM")][-3:]
    result = {
        "command": command,
        "exit": proc.returncode,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(children_cpu() - c0, 1),  # the child's user + system time
        "peak_rss_GiB": round(hwm / GiB, 2) if hwm else None,
        "stdout_tail": stdout.strip().splitlines()[-2:],
        "stderr_tail": last,
    }
    if limit and proc.returncode == -9:
        result.update(stopped_after_seconds=limit, rate=layer_rate(lines))
    return result


def golden_hash_cache(checkpoint: Path, ids: str, out: Path, repeats: int) -> dict:
    """The same golden with the weight-hash cache absent (cold: every shard hashed) and present (warm),
    interleaved `repeats` times, and the hashing alone (every weight file's sha256 in a fresh process)."""
    from gemma2_ref.verify.hashes import CACHE_FILE

    cache = checkpoint / CACHE_FILE  # written by the cold run: ours to delete
    files = sorted(checkpoint.glob("*.safetensors"))
    hashing = (
        "import sys, time; from pathlib import Path; from gemma2_ref.verify.hashes import sha256_file\n"
        "t, c = time.perf_counter(), time.process_time()\n"
        "[sha256_file(f) for f in sorted(Path(sys.argv[1]).glob('*.safetensors'))]\n"
        "print(f'{time.perf_counter() - t:.1f} {time.process_time() - c:.1f}')"
    )
    runs = {}
    for r in range(1, repeats + 1):
        for state in ("cold", "warm"):
            if state == "cold":
                cache.unlink(missing_ok=True)
            run = measure(["golden", str(checkpoint), "--tokens", ids, "--out", str(out / f"h{state}{r}")])
            run["load_average_after"] = os.getloadavg()
            runs[f"golden_64_{state}_cache_run{r}"] = run
        done = subprocess.run(
            [sys.executable, "-c", hashing, str(checkpoint)], capture_output=True, text=True, cwd=ROOT
        )
        wall, cpu = (done.stdout.split() + ["nan", "nan"])[:2]
        runs[f"sha256_all_weight_files_run{r}"] = {
            "seconds": float(wall),
            "cpu_seconds": float(cpu),
            "bytes": sum(f.stat().st_size for f in files),
            "load_average_after": os.getloadavg(),
        }
    cache.unlink(missing_ok=True)
    return runs


def build_copied_checkpoint(directory: Path, cfg, log, layers_per_shard: int = 4) -> Path:
    """build_random_checkpoint's layout and first shards (the embedding; layers 0-3, random as there), the
    other layers' shards copies of layers 0-3's bytes under their own names: the real shapes and bytes per
    layer, written at the disk's speed instead of the random generator's (which a shared machine starves).
    For timing hashing and a golden's forward, whose cost does not depend on the values."""
    shapes = expected_tensors(cfg)
    firsts = list(range(0, cfg.num_hidden_layers, layers_per_shard))
    names = [f"model-{k:05d}-of-{len(firsts) + 1:05d}.safetensors" for k in range(1, len(firsts) + 2)]
    groups = [[EMBEDDING, FINAL_NORM]] + [
        [n for n in shapes if any(n.startswith(f"model.layers.{i}.") for i in range(f, f + layers_per_shard))]
        for f in firsts
    ]
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for file, group in zip(names[:2], groups[:2]):
        if not (directory / file).is_file():  # random, as build_random_checkpoint writes them
            specs = {}
            for n in group:
                rows = max(1, BLOCK_BYTES // max(1, int(np.prod(shapes[n][1:], dtype=np.int64)) * 4))
                std = tensor_std(n, shapes[n])
                specs[n] = ("BF16", shapes[n], lambda n=n, std=std, rows=rows: random_rows(n, shapes[n], 0, std, rows))
            write_safetensors_blocks(directory / file, specs, metadata={"format": "pt"})
        log(f"  {file}: random ({time.perf_counter() - t0:.0f} s)")
    source = directory / names[1]
    refs, _ = read_safetensors_header(source)
    for file, first, group in zip(names[2:], firsts[1:], groups[2:]):
        origin = {
            n: n.replace(f"layers.{int(n.split('.')[2])}.", f"layers.{int(n.split('.')[2]) - first}.") for n in group
        }
        head, _ = safetensors_header({n: ("BF16", shapes[n]) for n in group}, metadata={"format": "pt"})
        tmp = directory / (file + ".tmp")
        with open(source, "rb") as src, open(tmp, "wb") as out:
            out.write(head)
            for n in sorted(group):  # the order safetensors_header laid them out in
                src.seek(refs[origin[n]].offset)
                out.write(src.read(refs[origin[n]].nbytes))
        os.replace(tmp, directory / file)
        log(f"  {file}: layers {first}-{first + len(group) // 9 - 1} copied ({time.perf_counter() - t0:.0f} s)")
    weight_map = {n: file for file, group in zip(names, groups) for n in group}
    total = sum(int(np.prod(shapes[n], dtype=np.int64)) * 2 for n in weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict("new"), indent=2) + "\n")
    return directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["9b", "27b"], default="9b")
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="build the checkpoint here and keep it (default: a temporary directory, deleted afterwards)",
    )
    p.add_argument("--checkpoint", metavar="DIR", help="use this already built checkpoint (not deleted)")
    p.add_argument(
        "--copy-layers",
        action="store_true",
        help="build only the embedding and layers 0-3 at random, the other layers copies of their bytes (fast)",
    )
    p.add_argument("--out", type=Path, help="the results file (default benchmarks/full_size-<model>.json)")
    p.add_argument("--repeats", type=int, default=2, help="golden-hash-cache: cold and warm runs, interleaved")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated after the 128-token prompt")
    p.add_argument(
        "--window-minutes",
        type=float,
        default=40,
        help="stop the window case after this long and extrapolate its time per layer (default 40)",
    )
    p.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"which runs, comma-separated (default: all of {','.join(RUNS)}); results merge into the JSON file",
    )
    args = p.parse_args(argv)
    wanted = args.runs.split(",")
    if set(wanted) - set(RUNS):
        p.error(f"--runs takes {','.join(RUNS)}")
    cfg = preset_config(args.model)
    need = cfg.parameter_counts()["total"] * 2
    given = args.checkpoint or args.keep
    target = Path(given) if given else Path(tempfile.mkdtemp(prefix=f"gemma2-ref-{args.model}-"))
    target.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target).free
    if not args.checkpoint and free < need * 1.05:
        print(
            f"{target}: {free / GiB:.1f} GiB free, the {args.model} checkpoint needs {need / GiB:.1f} GiB: "
            f"free some space or pass --keep DIR on another disk",
            file=sys.stderr,
        )
        return 2
    path = args.out or Path(__file__).resolve().parent / f"full_size-{args.model}.json"
    results = json.loads(path.read_text()) if path.is_file() and args.runs != ",".join(RUNS) else {}
    results.update(model=args.model, load_average_before=os.getloadavg(), checkpoint_GiB=round(need / GiB, 1))
    runs = results.setdefault("runs", {})
    try:
        if not args.checkpoint:
            t0 = time.perf_counter()
            log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
            (build_copied_checkpoint if args.copy_layers else build_random_checkpoint)(target, cfg, log=log)
            results["build_seconds_copied_layers" if args.copy_layers else "build_seconds"] = round(
                time.perf_counter() - t0, 1
            )
        ids64 = " ".join(["2"] + [str(651 + i) for i in range(63)])
        ids128 = " ".join(["2"] + [str(651 + i) for i in range(127)])
        ids4098 = " ".join(["2"] + [str(651 + i % 5000) for i in range(4097)])
        out = Path(tempfile.mkdtemp(prefix="gemma2-ref-golden-"))
        for n in (1, 2) if "golden" in wanted else ():
            runs[f"golden_64_run{n}"] = measure(["golden", str(target), "--tokens", ids64, "--out", str(out / f"g{n}")])
        hashes = [
            json.loads((out / f"g{n}" / "manifest.json").read_text())["activations"]["sha256"]
            for n in (1, 2)
            if (out / f"g{n}" / "manifest.json").is_file()
        ]
        if "golden" in wanted:
            results["golden_64_identical"] = len(hashes) == 2 and hashes[0] == hashes[1]
        if "golden-hash-cache" in wanted:
            runs.update(golden_hash_cache(target, ids64, out, args.repeats))
        for run, extra in (("generate", []), ("generate-streamed", ["--stream-weights"])):
            if run in wanted:
                runs[f"{run.replace('-', '_')}_{args.new_tokens}_after_128"] = measure(
                    ["generate", str(target), "--tokens", ids128, "--max-new-tokens", str(args.new_tokens), *extra]
                )
        if "window" in wanted:
            runs["golden_window_4098"] = measure(["golden", str(target), "--tokens", ids4098, "--out", str(out / "w")])
            runs["golden_window_4098_residual"] = measure(
                ["golden", str(target), "--tokens", ids4098, "--taps", "residual", "--out", str(out / "wr")],
                limit=args.window_minutes * 60,
            )
            written = [f.stat().st_size for f in (out / "wr").glob("*")]
            runs["golden_window_4098_residual"]["bytes_on_disk"] = sum(written) if written else None
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and not args.checkpoint:
            shutil.rmtree(target, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

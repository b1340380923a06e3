"""The decode floor: a streamed decode step against the time to read the checkpoint's bytes once (issue 31).

    python benchmarks/floor.py --scratch /work/scratch/perf --out benchmarks/floor.json   # 2B, 9B, 27B shapes

For each model a random bf16 checkpoint with the real shapes but few layers (`--layers`, default 4 / 4 / 2:
every matrix has its real size, there are fewer of them) is built under --scratch, converted to bf16 and f32
GGUFs by llama.cpp's own converter (`--gguf bf16` only the bf16 one, `--gguf ''` none), and then, each in a
fresh process, one after the other and repeated `--repeats` times in turn (the machine may be shared:
interleaved, the best counts):

- **read**: the checkpoint's files read once from the page cache into one 64 MiB buffer (`readinto`), and
  **scan**: read through a memory map (NumPy sums the mapped uint16s): the floor, the faster of the two;
- **numpy**: gemma2_ref streamed (`keep_converted=False`) decode steps after a 16-token prompt, each layer's
  time taken from the forward's per-layer progress calls, the rest (embedding, final norm, output head) apart;
- **numpy-before**: the same with each layer converted to a float32 copy first, as before this change;
- **llama-bf16** / **llama-f32**: llama-cpp-python decode steps (`Llama.eval` of one token) on the GGUFs.

Every number is a time per decode step. The full depth (26 / 42 / 46 layers) is arithmetic, labelled so:
(rest) + layers x (per layer), and for the floor: full-size bytes / the measured read rate.
The page cache must hold the files for "from the page cache" to mean it: the first pass of each worker warms it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

GiB = 1 << 30
MODELS = {"2b": 4, "9b": 4, "27b": 2}  # preset -> default layers built
KINDS = ("read", "scan", "numpy", "numpy-before", "llama-bf16", "llama-f32")
PROMPT = 16


# -- the workers (each in its own process) ----------------------------------------------------------------


def peak_rss() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) * 1024


def weight_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def worker_read(ckpt: Path, steps: int) -> dict:
    buf = bytearray(64 << 20)
    times, cpu, total = [], [], 0
    for _ in range(steps):
        t0, c0, total = time.perf_counter(), time.process_time(), 0
        for f in weight_files(ckpt):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": times, "cpu_seconds": cpu, "bytes": total}


def worker_scan(ckpt: Path, steps: int) -> dict:
    import mmap

    import numpy as np

    times, cpu, total = [], [], 0
    for _ in range(steps):
        t0, c0, total = time.perf_counter(), time.process_time(), 0
        for f in weight_files(ckpt):
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                a = np.frombuffer(m, np.uint64, count=len(m) // 8)
                for start in range(0, len(a), 1 << 22):  # 32 MiB at a time, then let the pages go
                    a[start : start + (1 << 22)].sum()
                total += len(m)
                del a
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": times, "cpu_seconds": cpu, "bytes": total}


def worker_numpy(ckpt: Path, steps: int, before: bool) -> dict:
    import numpy as np

    import gemma2_ref as g2
    from gemma2_ref.model.generate import KVCache
    from gemma2_ref.storage import weights as W

    if before:  # the path before issue 31: every streamed layer converted to a float32 copy, then multiplied
        W.Weights.streamed = lambda self, name: self.tensor(name)
    model = g2.load_model(ckpt)
    cfg = model.config
    cache = KVCache(cfg, capacity=PROMPT + steps + 1)
    marks = []
    progress = lambda done, total: marks.append((time.perf_counter(), time.process_time()))  # noqa: E731
    logits = model.forward(np.arange(2, 2 + PROMPT), kv_cache=cache, logits_at="last")["logits"]
    steps_out = []
    for _ in range(steps):
        token = int(np.argmax(logits[-1]))
        marks.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model.forward([token], kv_cache=cache, logits_at="last", progress=progress)["logits"]
        t1, c1 = time.perf_counter(), time.process_time()
        starts = [(t0, c0)] + marks[:-1]  # the first layer's time includes the embedding lookup
        layers = [b[0] - a[0] for a, b in zip(starts, marks)]
        layers_cpu = [b[1] - a[1] for a, b in zip(starts, marks)]
        steps_out.append(
            {
                "seconds": t1 - t0,
                "layers": layers,
                "rest": (t1 - t0) - sum(layers),
                "cpu_seconds": c1 - c0,
                "layers_cpu": layers_cpu,
                "rest_cpu": (c1 - c0) - sum(layers_cpu),
            }
        )
    return {"steps": steps_out, "layers": cfg.num_hidden_layers}


def worker_llama(gguf: Path, steps: int, threads: int) -> dict:
    import llama_cpp

    from gemma2_ref.adapters.llamacpp import quiet_llama_logs

    quiet_llama_logs()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=PROMPT + steps + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=PROMPT,
        verbose=False,
        use_mmap=True,
    )
    llm.eval(list(range(2, 2 + PROMPT)))
    times, cpu = [], []
    for k in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval([100 + k])
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": times, "cpu_seconds": cpu}


def worker_main(kind: str, path: str, steps: int, threads: int) -> None:
    p = Path(path)
    result = {
        "read": lambda: worker_read(p, steps),
        "scan": lambda: worker_scan(p, steps),
        "numpy": lambda: worker_numpy(p, steps, False),
        "numpy-before": lambda: worker_numpy(p, steps, True),
        "llama": lambda: worker_llama(p, steps, threads),
    }[kind]()
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build(preset: str, layers: int, scratch: Path, ggufs: list[str], log) -> dict:
    from llamacpp_random_checkpoint import SPECIAL

    from gemma2_ref.data import bundled_path
    from gemma2_ref.storage.checkpoints import build_random_checkpoint, preset_config

    cfg = preset_config(preset, layers)
    ckpt = scratch / f"{preset}-{layers}l"
    t0 = time.perf_counter()
    build_random_checkpoint(ckpt, cfg, log=log)
    # what llama.cpp's converter needs of a released checkpoint: a tokenizer (the bundled one, padded by the
    # converter to the 256000 rows), the special tokens marked, an integer eos
    shutil.copyfile(bundled_path("tiny") / "tokenizer.model", ckpt / "tokenizer.model")
    config = json.loads((ckpt / "config.json").read_text())
    config["eos_token_id"] = 1
    (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    entry = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (ckpt / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "added_tokens_decoder": {str(i): {"content": t, **entry} for i, t in SPECIAL.items()},
            }
        )
    )
    out = {"checkpoint": ckpt, "build_seconds": round(time.perf_counter() - t0, 1), "config": cfg}
    if ggufs:
        from gemma2_ref.adapters.llamacpp import convert
        from gemma2_ref.verify.golden import model_info_from_files

        info = model_info_from_files(ckpt, cfg)
        for outtype in ggufs:
            t0 = time.perf_counter()
            out[f"gguf-{outtype}"] = convert(ckpt, outtype, info, out_dir=scratch)
            log(f"  {preset}: {outtype} GGUF in {time.perf_counter() - t0:.0f} s")
    return out


def run_worker(kind: str, path: Path, steps: int, threads: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    worker = "llama" if kind.startswith("llama") else kind
    done = subprocess.run(
        [sys.executable, __file__, "--worker", worker, str(path), str(steps), str(threads)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} on {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_step(kind: str, runs: list[dict]) -> dict:
    """The best time per step over every run (and for numpy the per-layer and rest parts of that step)."""
    if kind.startswith("numpy"):
        steps = [s for r in runs for s in r["steps"]]
        best = min(steps, key=lambda s: s["seconds"])
        per_layer = min(min(s["layers"][1:] or s["layers"]) for s in steps)  # layer 0 includes the lookup
        rest = min(s["rest"] for s in steps)
        return {
            "step": best["seconds"],
            "per_layer": per_layer,
            "rest": rest,
            "step_cpu": min(s["cpu_seconds"] for s in steps),
            "per_layer_cpu": min(min(s["layers_cpu"][1:] or s["layers_cpu"]) for s in steps),
            "rest_cpu": min(s["rest_cpu"] for s in steps),
            "peak_rss": max(r["peak_rss"] for r in runs),
        }
    return {
        "step": min(t for r in runs for t in r["seconds"]),
        "step_cpu": min(t for r in runs for t in r["cpu_seconds"]),
        "peak_rss": max(r["peak_rss"] for r in runs),
        **({"bytes": runs[0]["bytes"]} if "bytes" in runs[0] else {}),
    }


def full_depth(preset: str, cfg, measured: dict) -> dict:
    """Arithmetic, not a measurement: the few-layer numbers carried to the released depth."""
    from gemma2_ref.model.config import PRESETS

    full = PRESETS[preset]
    counts, full_counts = cfg.parameter_counts(), full.parameter_counts()
    bytes_few, bytes_full = 2 * counts["total"], 2 * full_counts["total"]  # bf16
    out = {"layers": full.num_hidden_layers, "bf16_bytes": bytes_full, "bf16_bytes_built": bytes_few}
    for clock in ("", "_cpu"):  # wall time, and this process's CPU time (less sensitive to a shared machine)
        floor = min(measured[k][f"step{clock}"] for k in ("read", "scan") if k in measured)
        rate = measured["read"]["bytes"] / floor
        out[f"floor{clock}_seconds"] = bytes_full / rate
        out[f"read_rate{clock}_GBps"] = rate / 1e9
        for kind in ("numpy", "numpy-before"):
            if kind in measured:
                m = measured[kind]
                out[f"{kind}{clock}_seconds"] = m[f"rest{clock}"] + full.num_hidden_layers * m[f"per_layer{clock}"]
        for kind in ("llama-bf16", "llama-f32"):  # llama.cpp's step scaled by bytes: its rest and layers together
            if kind in measured:
                layer_share = cfg.num_hidden_layers * counts["per_layer"] / counts["total"]
                step = measured[kind][f"step{clock}"]
                out[f"{kind}{clock}_seconds"] = step * (1 - layer_share) + step * layer_share * (
                    full.num_hidden_layers / cfg.num_hidden_layers
                )
        out[f"numpy_over_floor{clock}"] = out.get(f"numpy{clock}_seconds", float("nan")) / out[f"floor{clock}_seconds"]
    return out


def run(args) -> dict:
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = {
        "command": " ".join(["python", "benchmarks/floor.py", *sys.argv[1:]]),
        "models": {},
        "threads": args.threads,
        "repeats": args.repeats,
        "steps": args.steps,
        "load_average_before": load_average(),
        "machine": os.uname().machine,
        "cpus": os.cpu_count(),
    }
    for preset in args.models:
        layers = args.layers.get(preset, MODELS[preset])
        log(f"{preset}: building {layers} layers under {args.scratch}")
        built = build(preset, layers, args.scratch, args.gguf, log)
        targets = {
            "read": built["checkpoint"],
            "scan": built["checkpoint"],
            "numpy": built["checkpoint"],
            "numpy-before": built["checkpoint"],
        }
        targets.update({f"llama-{t}": built[f"gguf-{t}"] for t in args.gguf})
        runs = {k: [] for k in targets}
        loads = [load_average()]
        for r in range(args.repeats):
            for kind, path in targets.items():
                runs[kind].append(run_worker(kind, path, args.steps, args.threads))
                log(
                    f"  {preset} repeat {r + 1}/{args.repeats} {kind}: "
                    f"{best_step(kind, runs[kind][-1:])['step']:.3f} s/step (load {load_average()[0]})"
                )
            loads.append(load_average())
        measured = {k: best_step(k, v) for k, v in runs.items()}
        cfg = built["config"]
        results["models"][preset] = {
            "layers_built": layers,
            "bf16_bytes_built": 2 * cfg.parameter_counts()["total"],
            "build_seconds": built["build_seconds"],
            "measured": measured,
            "load_averages": loads,
            "full_depth_arithmetic": full_depth(preset, cfg, measured),
        }
        if not args.keep:
            for key in ("gguf-bf16", "gguf-f32"):
                if key in built:
                    Path(built[key]).unlink(missing_ok=True)
            shutil.rmtree(built["checkpoint"], ignore_errors=True)
    results["load_average_after"] = load_average()
    return results


def merge(parts: list[dict]) -> dict:
    """Several runs' results as one: their models side by side, each run's command and loads kept."""
    out = {**parts[0], "models": {}, "runs": []}
    for part in parts:
        out["models"].update(part["models"])
        out["runs"].append({k: part[k] for k in ("command", "load_average_before", "load_average_after")})
    out["command"] = "; ".join(r["command"] for r in out["runs"])
    out["load_average_before"] = [r["load_average_before"] for r in out["runs"]]
    out["load_average_after"] = [r["load_average_after"] for r in out["runs"]]
    return out


CLOCKS = {"": "wall time", "_cpu": "CPU time of the process (what a busy machine inflates least)"}


def report(results: dict) -> str:
    loads = " ".join(f"{m}: {m_['load_averages']}" for m, m_ in results["models"].items())
    lines = [
        f"Command: `{results['command']}`; {results['cpus']} CPUs, {results['threads']} threads, best of "
        f"{results['repeats']} runs x {results['steps']} steps, interleaved; load average "
        f"{results['load_average_before']} before, {results['load_average_after']} after "
        f"(per model, before and after each round of workers: {loads}).",
    ]
    for clock, what in CLOCKS.items():
        lines += [""] + measured_table(results, clock, what) + [""] + full_depth_table(results, clock, what)
    lines += [
        "",
        "Per layer and rest (embedding lookup, final norm, the float32 output head) of the numpy step, wall (CPU):",
        "",
        "| model | numpy per layer | numpy rest | before: per layer | before: rest | peak RSS numpy |",
        "|---|---|---|---|---|---|",
    ]
    for preset, m in results["models"].items():
        a, b = m["measured"]["numpy"], m["measured"].get("numpy-before") or {}
        cell = lambda d, k: f"{d[k]:.3f} s ({d[k + '_cpu']:.3f})" if k in d else "-"  # noqa: E731
        lines.append(
            f"| {preset} | {cell(a, 'per_layer')} | {cell(a, 'rest')} | {cell(b, 'per_layer')} | "
            f"{cell(b, 'rest')} | {a['peak_rss'] / GiB:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


def measured_table(results: dict, clock: str, what: str) -> list[str]:
    lines = [
        f"Measured, {what}, per decode step:",
        "",
        "| model | layers built | bf16 GB built | read once (floor) | numpy step | numpy before | llama.cpp bf16 "
        "| llama.cpp f32 | numpy / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, m in results["models"].items():
        meas = m["measured"]
        floor = min(meas[k][f"step{clock}"] for k in ("read", "scan"))
        cell = lambda k: f"{meas[k][f'step{clock}']:.3f} s" if k in meas else "-"  # noqa: E731, B023
        lines.append(
            f"| {preset} | {m['layers_built']} | {m['bf16_bytes_built'] / 1e9:.2f} | {floor:.3f} s | "
            f"{cell('numpy')} | {cell('numpy-before')} | {cell('llama-bf16')} | {cell('llama-f32')} | "
            f"{meas['numpy'][f'step{clock}'] / floor:.2f} |"
        )
    return lines


def full_depth_table(results: dict, clock: str, what: str) -> list[str]:
    lines = [
        f"Full depth, {what}, **arithmetic** (rest + layers x per layer; floor = full bf16 bytes / the read "
        "rate measured; llama.cpp scaled by its bytes):",
        "",
        "| model | layers | bf16 GB | floor | numpy step | numpy before | llama.cpp bf16 | llama.cpp f32 "
        "| numpy / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, m in results["models"].items():
        f = m["full_depth_arithmetic"]
        cell = lambda k: f"{f[f'{k}{clock}_seconds']:.2f} s" if f"{k}{clock}_seconds" in f else "-"  # noqa: E731, B023
        lines.append(
            f"| {preset} | {f['layers']} | {f['bf16_bytes'] / 1e9:.1f} | {cell('floor')} | {cell('numpy')} | "
            f"{cell('numpy-before')} | {cell('llama-bf16')} | {cell('llama-f32')} | "
            f"{f[f'numpy_over_floor{clock}']:.2f} |"
        )
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="2b,9b,27b", type=lambda s: [m for m in s.split(",") if m])
    ap.add_argument(
        "--layers",
        default="",
        help="e.g. 2b=4,9b=4,27b=2",
        type=lambda s: {k: int(v) for k, v in (p.split("=") for p in s.split(",") if p)},
    )
    ap.add_argument("--scratch", type=Path, help="where the checkpoints and GGUFs are built")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "floor.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--gguf",
        default="bf16,f32",
        type=lambda s: [t for t in s.split(",") if t],
        help="the GGUFs llama.cpp decodes ('' for none)",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="no run: merge earlier results (one model each, e.g. run side by side) into --out",
    )
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and GGUFs")
    args = ap.parse_args(argv)
    if not args.merge and args.scratch is None:
        ap.error("--scratch DIR is needed to build the checkpoints")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.merge:
        results = merge([json.loads(p.read_text()) for p in args.merge])
    else:
        args.scratch.mkdir(parents=True, exist_ok=True)
        results = run(args)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

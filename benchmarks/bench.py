"""Benchmark: the NumPy forward against transformers' eager float32 forward, same weights, same inputs.

`python benchmarks/bench.py` (or `gemma2-ref bench` from a source checkout) does, in one run:

1. builds (once, then reuses from `--cache-dir`) random checkpoints with the real 2B shapes in the real
   Hugging Face layout: bf16 safetensors shards + index + config.json. One with all 26 layers (memory), one
   with `--layers` layers (the side-by-side timing: every matmul has the real 2B shape, there are just
   fewer of them). Tensors are generated and written a block of rows at a time, so building a 5 GB
   checkpoint never holds more than a few hundred MB;
2. starts one worker process per implementation (NumPy keeping converted layers, NumPy streaming layers,
   transformers eager float32), each pinned to the same number of BLAS threads, and sends them the same
   commands *interleaved* (numpy, torch, numpy, torch, ...) so both see the same machine load; the best
   of N runs counts;
3. measures peak resident memory of the 26-layer model in a fresh process per configuration.

Timing assertions never enter the test suite: the CI test runs `--small` and checks only that the report
is complete and that the two implementations agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a source checkout: import the package beside it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma2_ref.checkpoints import build_random_checkpoint, preset_config  # noqa: E402
from gemma2_ref.config import PRESETS  # noqa: E402
from gemma2_ref.options import COUNT, SEED, number  # noqa: E402
from gemma2_ref.suites import forward_memory  # noqa: E402

GiB = 1 << 30
DEFAULT_CACHE = Path(os.environ.get("GEMMA2_REF_BENCH_CACHE", Path.home() / ".cache" / "gemma2-ref" / "bench"))


# -- the machine --------------------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """CPU model and cores, memory, and the BLAS NumPy ships with: what the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) * 1024 / GiB, 1)
    except OSError:
        pass
    blas = "unknown"
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{deps.get('name')} {deps.get('version')}"
    except Exception:  # older NumPy: no dict mode
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_GiB": mem,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas,
        "platform": platform.platform(),
    }


def memory_now() -> dict:
    """This process's resident memory now and at its peak (bytes): VmRSS / VmHWM, or ru_maxrss."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"rss": int(status["VmRSS"].split()[0]) * 1024, "peak_rss": int(status["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return {"rss": None, "peak_rss": peak}


# -- workers: one process per implementation, driven line by line over stdin/stdout -------------------------


class NumpyRunner:
    """gemma2_ref: streaming layers (the default) or keeping converted layers (`keep_converted=True`)."""

    def __init__(self, directory: Path, keep_converted: bool):
        import gemma2_ref as g2

        self.model = g2.load_model(directory, keep_converted=keep_converted)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.model.forward(ids, logits_at="last")["logits"][-1]

    def start_decode(self, prompt: np.ndarray, steps: int):
        """Prefill the prompt into a fresh KV cache; returns (cache, first greedy token)."""
        from gemma2_ref.generate import KVCache

        cache = KVCache(self.model.config, capacity=len(prompt) + steps + 1)
        return cache, int(np.argmax(self.model.forward(prompt, kv_cache=cache, logits_at="last")["logits"][-1]))

    def decode_steps(self, cache, token: int, steps: int) -> list[int]:
        tokens = []
        for _ in range(steps):
            token = int(np.argmax(self.model.forward([token], kv_cache=cache, logits_at="last")["logits"][-1]))
            tokens.append(token)
        return tokens

    def decode(self, prompt: np.ndarray, steps: int) -> tuple[float, list[int]]:
        """Greedy: prefill the prompt into a KV cache (not timed), then `steps` one-token forwards (timed)."""
        cache, token = self.start_decode(prompt, steps)
        t0 = time.perf_counter()
        tokens = self.decode_steps(cache, token, steps)
        return time.perf_counter() - t0, tokens

    def profile(self, ids: np.ndarray, steps: int) -> dict:
        """Where the time goes: cProfile of one prefill and of `steps` decode steps, by function."""
        import cProfile
        import pstats

        out = {}
        cache, token = self.start_decode(ids[: max(1, len(ids) // 4)], steps)
        for what, run in (
            ("prefill", lambda: self.prefill(ids)),
            ("decode", lambda: self.decode_steps(cache, token, steps)),
        ):
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.runcall(run)
            total = time.perf_counter() - t0
            stats = pstats.Stats(prof).stats
            rows = sorted(
                (
                    (f"{Path(file).stem}.{func}" if file != "~" else func, tt, nc)
                    for (file, _, func), (_, nc, tt, _, _) in stats.items()
                ),
                key=lambda r: -r[1],
            )
            out[what] = {
                "seconds": total,
                "tokens": len(ids) if what == "prefill" else steps,
                "context": len(ids) if what == "prefill" else max(1, len(ids) // 4),
                "functions": [{"function": f, "seconds": round(tt, 4), "calls": nc} for f, tt, nc in rows[:12]],
            }
        return out


class TorchRunner:
    """transformers' Gemma2ForCausalLM, eager attention, float32, under torch.inference_mode()."""

    def __init__(self, directory: Path, threads: int):
        import torch
        from transformers import Gemma2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = Gemma2ForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(ids, np.int64))[None]
            return self.model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].numpy()

    def decode(self, prompt: np.ndarray, steps: int) -> tuple[float, list[int]]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(prompt, np.int64))[None]
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            tokens, t0 = [], time.perf_counter()
            for _ in range(steps):
                out = self.model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax()
                tokens.append(int(token))
            return time.perf_counter() - t0, tokens


def make_runner(kind: str, directory: Path, threads: int):
    if kind == "torch":
        return TorchRunner(directory, threads)
    return NumpyRunner(directory, keep_converted=(kind == "numpy"))


def worker_main(kind: str, directory: str, threads: int) -> int:
    """Serve one implementation: a JSON command per stdin line, a JSON reply per line on stdout."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed (library warnings) goes to stderr, not into the replies

    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    t0 = time.perf_counter()
    runner = make_runner(kind, Path(directory), threads)
    reply({"load_s": time.perf_counter() - t0, **memory_now()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "prefill":
            ids = np.asarray(cmd["ids"], np.int64)
            t0 = time.perf_counter()
            logits = runner.prefill(ids)
            seconds = time.perf_counter() - t0
            if cmd.get("save"):
                np.save(cmd["save"], np.asarray(logits, np.float32))
            reply({"seconds": seconds, "argmax": int(np.argmax(logits)), **memory_now()})
        elif op == "decode":
            seconds, tokens = runner.decode(np.asarray(cmd["ids"], np.int64), cmd["steps"])
            reply({"seconds": seconds, "tokens": tokens, **memory_now()})
        elif op == "profile":
            reply(runner.profile(np.asarray(cmd["ids"], np.int64), cmd["steps"]))
        elif op == "quit":
            break
    return 0


def memory_main(kind: str, directory: str, threads: int, seq: int, logits_at: str) -> int:
    """A fresh process: load, one prefill of `seq` tokens, report load time, forward time and peak RSS."""
    t0 = time.perf_counter()
    runner = make_runner(kind, Path(directory), threads)
    load_s = time.perf_counter() - t0
    after_load = memory_now()
    ids = prompt_ids(seq, runner.model.config.vocab_size)
    t0 = time.perf_counter()
    if kind == "torch":
        torch = runner.torch
        with torch.inference_mode():
            runner.model(
                input_ids=torch.as_tensor(ids)[None], use_cache=False, logits_to_keep=1 if logits_at == "last" else 0
            )
    else:
        runner.model.forward(ids, logits_at=logits_at)
    forward_s = time.perf_counter() - t0
    print(json.dumps({"load_s": load_s, "forward_s": forward_s, "rss_after_load": after_load["rss"], **memory_now()}))
    return 0


class Worker:
    """The driver's handle on one worker process."""

    def __init__(self, kind: str, directory: Path, threads: int, log_dir: Path):
        self.kind = kind
        self.stderr = open(log_dir / f"worker-{kind}.log", "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                kind,
                str(directory),
                "--threads",
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=thread_env(threads),
        )
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.flush()
            tail = Path(self.stderr.name).read_text()[-2000:]
            raise RuntimeError(f"benchmark worker {self.kind!r} died (exit {self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def prompt_ids(n: int, vocab_size: int, seed: int = 1) -> np.ndarray:
    """<bos> then n - 1 random ids: the same input for every implementation."""
    ids = np.random.default_rng([seed, n]).integers(3, vocab_size, n)
    ids[0] = 2
    return ids


# -- memory arithmetic -----------------------------------------------------------------------------------------

memory_estimate = forward_memory  # the arithmetic lives in gemma2_ref/verify/suites.py: golden refuses by it too


# -- the driver ----------------------------------------------------------------------------------------------


def run_memory(kind: str, directory: Path, threads: int, seq: int, logits_at: str) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-worker",
            kind,
            str(directory),
            "--threads",
            str(threads),
            "--seq",
            str(seq),
            "--logits-at",
            logits_at,
        ],
        capture_output=True,
        text=True,
        env=thread_env(threads),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {kind} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"kind": kind, "seq": seq, "logits_at": logits_at, **json.loads(proc.stdout.strip().splitlines()[-1])}


def torch_available() -> str | None:
    """None if torch and transformers import, else the reason they do not."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def run_benchmark(args, log=print) -> dict:
    preset = "tiny" if args.small else "2b"
    seqs = [int(s) for s in str(args.seq).split(",") if s]
    full_cfg = preset_config(preset)
    time_cfg = preset_config(preset, args.layers or full_cfg.num_hidden_layers)
    cache = Path(args.cache_dir)
    log(f"checkpoints in {cache} (built once, then reused)")
    time_dir = build_random_checkpoint(
        cache / f"{preset}-{time_cfg.num_hidden_layers}L-seed{args.seed}", time_cfg, args.seed, log=log
    )
    full_dir = build_random_checkpoint(
        cache / f"{preset}-{full_cfg.num_hidden_layers}L-seed{args.seed}", full_cfg, args.seed, log=log
    )

    no_torch = args.no_torch or torch_available()
    if no_torch and not args.no_torch:
        log(f"NOTE: torch/transformers not importable ({no_torch}): NumPy-only results, no comparison")
    results: dict = {
        "machine": machine_info(),
        "threads": args.threads,
        "load_average_before": load_average(),
        "config": {
            "preset": preset,
            "timing_layers": time_cfg.num_hidden_layers,
            "full_layers": full_cfg.num_hidden_layers,
            **{
                k: getattr(full_cfg, k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                )
            },
        },
        "torch": None if no_torch else _torch_versions(),
        "prefill": {},
        "decode": {},
        "load": {},
        "memory": {},
        "agreement": {},
    }
    kinds = ["numpy", "numpy-stream"] + ([] if no_torch else ["torch"])
    started = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        workers = {}
        try:
            for kind in kinds:
                log(f"starting {kind} worker on {time_dir.name} ...")
                workers[kind] = Worker(kind, time_dir, args.threads, tmp)
                results["load"][kind] = {"load_s": workers[kind].hello["load_s"]}
            V = time_cfg.vocab_size
            # first forward: includes converting the weights for NumPy (loading is lazy there)
            for kind, w in workers.items():
                r = w.ask(op="prefill", ids=prompt_ids(seqs[0], V).tolist())
                results["load"][kind]["first_prefill_s"] = r["seconds"]
            for n in seqs:
                ids = prompt_ids(n, V).tolist()
                times = {k: [] for k in workers}
                repeats = args.repeats if n <= 1024 else max(1, min(args.repeats, 2))
                for rep in range(repeats):  # interleaved, so every implementation sees the same load
                    for kind, w in workers.items():
                        if kind == "numpy-stream" and rep > 0:
                            continue
                        save = str(tmp / f"{kind}-{n}.npy") if rep == 0 else None
                        times[kind].append(w.ask(op="prefill", ids=ids, save=save)["seconds"])
                results["prefill"][n] = {
                    k: {"best_s": min(t), "runs_s": t, "tokens_per_s": n / min(t)} for k, t in times.items()
                }
                if "torch" in workers:
                    ref = np.load(tmp / f"torch-{n}.npy")
                    results["agreement"][n] = {
                        k: float(np.abs(np.load(tmp / f"{k}-{n}.npy") - ref).max()) for k in workers if k != "torch"
                    }
                log("  prefill " + _prefill_line(n, results["prefill"][n]))
            if args.decode_tokens > 0:
                prompt = prompt_ids(args.decode_prompt, V).tolist()
                times = {k: [] for k in workers}
                tokens = {}
                for rep in range(args.repeats):
                    for kind, w in workers.items():
                        if kind == "numpy-stream" and rep > 0:
                            continue
                        steps = args.decode_tokens if kind != "numpy-stream" else max(1, args.decode_tokens // 4)
                        r = w.ask(op="decode", ids=prompt, steps=steps)
                        times[kind].append(r["seconds"] / steps)
                        tokens[kind] = r["tokens"]
                results["decode"] = {
                    "prompt": args.decode_prompt,
                    **{
                        k: {
                            "tokens": args.decode_tokens if k != "numpy-stream" else max(1, args.decode_tokens // 4),
                            "best_s_per_token": min(t),
                            "tokens_per_s": 1 / min(t),
                        }
                        for k, t in times.items()
                    },
                }
                if "torch" in tokens:
                    results["agreement"]["decode_same_tokens"] = {
                        k: tokens[k] == tokens["torch"][: len(tokens[k])] for k in tokens if k != "torch"
                    }
                rates = [
                    f"{k} {v['tokens_per_s']:.2f} tok/s" for k, v in results["decode"].items() if isinstance(v, dict)
                ]
                log("  decode  " + ", ".join(rates))
            if args.profile:
                results["profile"] = workers["numpy"].ask(
                    op="profile",
                    ids=prompt_ids(args.profile, V).tolist(),
                    steps=max(1, min(8, args.decode_tokens or 4)),
                )
            for kind, w in workers.items():
                results["load"][kind]["timing_worker_peak_rss"] = w.ask(op="prefill", ids=[2])["peak_rss"]
        finally:
            for w in workers.values():
                w.close()

    mem_seq = args.memory_seq
    log(f"memory: {full_cfg.num_hidden_layers}-layer model, {mem_seq}-token prefill, a fresh process each")
    mem_kinds = [("numpy-stream", "last"), ("numpy-stream", "all")]
    if args.full_memory:
        mem_kinds += [("numpy", "last")] + ([] if no_torch else [("torch", "last")])
    for kind, logits_at in mem_kinds:
        r = run_memory(kind, full_dir, args.threads, mem_seq, logits_at)
        results["memory"][f"{kind}/logits_{logits_at}"] = r
        log(
            f"  {kind:13s} logits {logits_at:4s}: peak RSS {r['peak_rss'] / GiB:.2f} GiB "
            f"(load {r['load_s']:.1f} s, forward {r['forward_s']:.1f} s)"
        )
    results["memory_estimate"] = {
        "measured_model": memory_estimate(full_cfg, mem_seq, "last"),
        "27b_at_8192": memory_estimate(PRESETS["27b"], 8192, "last"),
        "9b_at_8192": memory_estimate(PRESETS["9b"], 8192, "last"),
    }
    results["load_average_after"] = load_average()
    results["seconds"] = time.perf_counter() - started
    return results


def _torch_versions() -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": "eager",
        "dtype": "float32",
    }


def _prefill_line(n: int, row: dict) -> str:
    parts = [f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in row.items()]
    return f"{n:5d} tokens: " + ", ".join(parts)


# -- the report ------------------------------------------------------------------------------------------------

LABELS = {
    "numpy": "NumPy, layers kept converted",
    "numpy-stream": "NumPy, layers streamed",
    "torch": "transformers eager fp32",
}
TARGETS = {"prefill_512": 1.5, "decode": 2.0}  # NumPy time / torch time


def ratios(results: dict) -> dict:
    """NumPy (kept layers) time / torch time, where both were measured."""
    out = {}
    for n, row in results["prefill"].items():
        if "torch" in row:
            out[f"prefill_{n}"] = row["numpy"]["best_s"] / row["torch"]["best_s"]
    dec = results.get("decode") or {}
    if "torch" in dec and "numpy" in dec:
        out["decode"] = dec["numpy"]["best_s_per_token"] / dec["torch"]["best_s_per_token"]
    return out


def format_report(results: dict) -> str:
    """The results as Markdown: readable on a terminal, pasted as is into the README."""
    c, m = results["config"], results["machine"]
    kinds = [k for k in LABELS if k in results["load"]]
    lines = [
        f"Gemma 2 {c['preset']} shapes (V={c['vocab_size']}, D={c['hidden_size']}, F={c['intermediate_size']}, "
        f"H={c['num_attention_heads']}/K={c['num_key_value_heads']}, Dh={c['head_dim']}), random bf16 weights; "
        f"timing on {c['timing_layers']} of {c['full_layers']} layers, {results['threads']} threads each.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_GiB']} GiB; Python {m['python']}, "
        f"NumPy {m['numpy']} ({m['numpy_blas']})"
        + (
            f"; torch {results['torch']['torch']}, transformers {results['torch']['transformers']}"
            if results["torch"]
            else "; torch not run"
        )
        + ".",
        f"Load average (1, 5, 15 min) before: {results['load_average_before']}, after: "
        f"{results.get('load_average_after')}. Runs interleaved, best of N.",
        "",
        "| | " + " | ".join(LABELS[k] for k in kinds) + (" | NumPy / torch time |" if "torch" in kinds else " |"),
        "|---" * (len(kinds) + 1 + ("torch" in kinds)) + "|",
    ]
    r = ratios(results)

    def row(label, values, ratio=None):
        cells = [label] + values + ([f"**{ratio:.2f}**" if ratio is not None else ""] if "torch" in kinds else [])
        lines.append("| " + " | ".join(cells) + " |")

    for n, pre in results["prefill"].items():
        row(f"prefill {n} tokens (tokens/s)", [f"{pre[k]['tokens_per_s']:.1f}" for k in kinds], r.get(f"prefill_{n}"))
    dec = results.get("decode") or {}
    if dec:
        row(
            f"decode after a {dec['prompt']}-token prompt (tokens/s)",
            [f"{dec[k]['tokens_per_s']:.2f}" for k in kinds],
            r.get("decode"),
        )
    load = results["load"]
    row("load (s)", [f"{load[k]['load_s']:.2f}" for k in kinds])
    first = list(results["prefill"])[0] if results["prefill"] else "?"
    row(f"first {first}-token prefill after load (s)", [f"{load[k]['first_prefill_s']:.2f}" for k in kinds])
    row("peak RSS of the timing process (GiB)", [f"{load[k]['timing_worker_peak_rss'] / GiB:.2f}" for k in kinds])
    if results["agreement"]:
        agree = {n: a for n, a in results["agreement"].items() if n != "decode_same_tokens"}
        worst = max((v for a in agree.values() for v in a.values()), default=float("nan"))
        same = results["agreement"].get("decode_same_tokens", {})
        lines += [
            "",
            f"Same inputs, same weights: last-position logits differ from torch by at most {worst:.2g} "
            f"(max abs); greedy decode tokens identical: "
            f"{', '.join(f'{k} {v}' for k, v in same.items()) or 'n/a'}.",
        ]
    if r:
        verdicts = []
        for key, limit in TARGETS.items():
            if key in r:
                verdicts.append(
                    f"{key.replace('_', ' ')} {r[key]:.2f} (target <= {limit}: "
                    f"{'met' if r[key] <= limit else 'MISSED'})"
                )
        lines += ["", "NumPy / torch time: " + "; ".join(verdicts) + "."]

    mem = results["memory"]
    if mem:
        est = results["memory_estimate"]["measured_model"]
        lines += [
            "",
            f"Peak resident memory, {c['full_layers']}-layer model, one {est['seq']}-token prefill, a fresh "
            f"process each (budget: fp32 embedding + 3 fp32 layers + 1 GiB = {est['bound'] / GiB:.2f} GiB):",
            "",
            "| configuration | peak RSS (GiB) | within budget | load (s) | forward (s) |",
            "|---|---|---|---|---|",
        ]
        for name, v in mem.items():
            kind, logits = name.split("/")
            lines.append(
                f"| {LABELS[kind]}, {logits.replace('_', ' at ')} | {v['peak_rss'] / GiB:.2f} | "
                f"{'yes' if v['peak_rss'] <= est['bound'] else 'no'} | {v['load_s']:.1f} | "
                f"{v['forward_s']:.1f} |"
            )
        lines += [
            "",
            f"Arithmetic for the same run: fp32 embedding {est['embedding'] / GiB:.2f} GiB + one fp32 layer "
            f"{est['layer'] / GiB:.2f} GiB + activations {est['activations'] / GiB:.2f} GiB = "
            f"{est['streaming_peak'] / GiB:.2f} GiB.",
        ]
    prof = results.get("profile")
    if prof:
        for what, p in prof.items():
            desc = (
                f"a {p['tokens']}-token prefill"
                if what == "prefill"
                else f"{p['tokens']} decode steps after a {p.get('context', '?')}-token prompt"
            )
            lines += [
                "",
                f"Where the time goes, NumPy with layers kept converted ({desc}, {p['seconds']:.2f} s; "
                "cProfile self time):",
                "",
                "| function | seconds | share | calls |",
                "|---|---|---|---|",
            ]
            for f in p["functions"][:10]:
                lines.append(
                    f"| `{f['function']}` | {f['seconds']:.3f} | {100 * f['seconds'] / p['seconds']:.0f}% | "
                    f"{f['calls']} |"
                )
    return "\n".join(lines)


def large_model_table(results: dict) -> str:
    """The 2B measurement's arithmetic applied to 9B and 27B: does a streaming forward fit in 24 GiB?"""
    lines = [
        "| model, 8192-token prefill | bf16 on disk (mmap) | fp32 embedding | one fp32 layer | activations "
        "| streaming peak | KV cache (generation) | total vs 24 GiB |",
        "|---" * 8 + "|",
    ]
    for name in ("9b_at_8192", "27b_at_8192"):
        e = results["memory_estimate"][name]
        total = e["streaming_peak"] + e["kv_cache"]
        lines.append(
            f"| {name.split('_')[0].upper()} | {e['bf16_on_disk'] / GiB:.1f} GiB | {e['embedding'] / GiB:.2f} GiB | "
            f"{e['layer'] / GiB:.2f} GiB | {e['activations'] / GiB:.2f} GiB | {e['streaming_peak'] / GiB:.2f} GiB | "
            f"{e['kv_cache'] / GiB:.2f} GiB | {total / GiB:.1f} GiB {'<=' if total <= 24 * GiB else '>'} 24 |"
        )
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------------------

COUNT_OR_ZERO = number(int, 0, what="an integer >= 0 (0 skips)")


def lengths(text: str) -> str:
    """--seq: comma-separated token counts, each >= 1."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or not all(COUNT(s) for s in items):  # COUNT raises the usage error
        raise argparse.ArgumentTypeError(f"expected token counts such as 128,512,2048, got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--small", action="store_true", help="the bundled tiny model's shapes: runs in seconds (what CI runs)"
    )
    p.add_argument(
        "--layers",
        type=COUNT,
        default=None,
        help="decoder layers in the timing checkpoint (default 4 for 2B; memory always uses all)",
    )
    p.add_argument("--seq", type=lengths, default=None, help="prefill lengths, comma-separated (default 128,512,2048)")
    p.add_argument("--decode-tokens", type=COUNT_OR_ZERO, default=None, help="tokens to decode (default 16; 0 skips)")
    p.add_argument("--decode-prompt", type=COUNT, default=None, help="prompt length before decoding (default 128)")
    p.add_argument("--memory-seq", type=COUNT, default=None, help="prefill length of the memory runs (default 512)")
    p.add_argument(
        "--full-memory",
        action="store_true",
        help="also measure the full model with every layer converted, and in torch (2B: ~10 GiB each)",
    )
    p.add_argument("--repeats", type=COUNT, default=3, help="timed runs per measurement; the best counts")
    p.add_argument("--threads", type=COUNT, default=2, help="BLAS / torch threads for every implementation")
    p.add_argument(
        "--profile",
        type=COUNT_OR_ZERO,
        default=None,
        help="cProfile a NumPy prefill of this many tokens and decode steps (default 512; 0 skips)",
    )
    p.add_argument("--no-torch", action="store_true", help="NumPy only (no transformers comparison)")
    p.add_argument(
        "--cache-dir",
        default=str(DEFAULT_CACHE),
        help=f"where the random checkpoints are built and reused (default {DEFAULT_CACHE})",
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random weights")
    p.add_argument("--out", default="bench-results.json", help="write the results here (JSON; and .md beside it)")
    p.add_argument(
        "--full-size",
        choices=["9b", "27b"],
        default=None,
        help="instead: build a random checkpoint with the real 9B or 27B shapes and measure golden, the "
        "window case and generate in fresh processes (benchmarks/full_size.py; 18 / 54 GB of disk)",
    )


def apply_defaults(args) -> None:
    small = {"layers": 4, "seq": "16,64", "decode_tokens": 4, "decode_prompt": 16, "memory_seq": 64, "profile": 32}
    full = {
        "layers": 4,
        "seq": "128,512,2048",
        "decode_tokens": 16,
        "decode_prompt": 128,
        "memory_seq": 512,
        "profile": 512,
    }
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.small:
        args.repeats = min(args.repeats, 2)


def run(args) -> int:
    if getattr(args, "full_size", None):
        import importlib.util  # benchmarks/full_size.py, beside this file

        spec = importlib.util.spec_from_file_location("full_size", Path(__file__).with_name("full_size.py"))
        full_size = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(full_size)
        return full_size.main(["--model", args.full_size])
    apply_defaults(args)
    results = run_benchmark(args, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    report = format_report(results)
    if results.get("memory_estimate"):
        report += "\n\nThe same arithmetic for the larger models (weights stay on disk, memory-mapped):\n\n"
        report += large_model_table(results)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(report + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--logits-at", default="last", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker[0], args.worker[1], args.threads)
    if args.memory_worker:
        return memory_main(args.memory_worker[0], args.memory_worker[1], args.threads, int(args.seq), args.logits_at)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

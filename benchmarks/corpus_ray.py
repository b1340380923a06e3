"""Benchmark: corpus goldens on Ray workers against one process, on a 2B-shaped random checkpoint (few layers).

`python benchmarks/corpus_ray.py` does, in one run, one configuration after another on the same corpus (random
ids), each in a fresh process so its BLAS thread count holds (the environment is read when NumPy loads):

    serial-2t    one process, 2 BLAS threads (corpus.serial_executor's loop: load once, shards in turn)
    ray-1x1t     a local Ray cluster, 1 worker of 1 BLAS thread
    ray-2x1t     a local Ray cluster, 2 workers of 1 BLAS thread each

and reports, with the load average before and after each: tokens/s of the shards once the model is loaded, the
wall time including the cluster's start and the model loads, each process's peak resident memory, Ray's overhead
per shard (ray-1x1t: the driver's time per shard minus the worker's own), and the round trip of a no-op call to
an actor. From the measured cost per token it then writes the ARITHMETIC table (labelled as such) of the time a
~300k-token corpus takes on 9B and 27B with 1, 8 and 64 workers, with the memory each worker needs.

    python benchmarks/corpus_ray.py --layers 2 --ctx 256 --chunks 8 --json benchmarks/corpus-ray.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from gemma2_ref.model.config import PRESETS  # noqa: E402
from gemma2_ref.storage.checkpoints import build_random_checkpoint, preset_config  # noqa: E402

CONFIGS = {"serial-2t": (None, 2), "ray-1x1t": (1, 1), "ray-2x1t": (2, 1)}  # name: (Ray workers, BLAS threads)
CORPUS_TOKENS = 300_000  # wikitext-2's test split is ~300k Gemma tokens
GiB = 1 << 30
DEFAULT_CACHE = Path(os.environ.get("GEMMA2_REF_BENCH_CACHE", Path.home() / ".cache" / "gemma2-ref" / "bench"))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- what each configuration's process runs --------------------------------------------------------------


def timed_serial(timings: dict):
    """corpus.serial_executor with the moments the model is loaded and the last shard written."""
    from gemma2_ref.verify.corpus import load_worker_model, run_shard

    def executor(tasks, out_dir):
        timings["start"] = time.perf_counter()
        model = load_worker_model(tasks[0])
        timings["ready"] = time.perf_counter()
        for task in tasks:
            yield run_shard(task, out_dir, model)
        timings["done"] = time.perf_counter()

    return executor


def run_config(name: str, checkpoint: str, tokens: str, ctx: int, chunks: int, out: str) -> dict:
    import contextlib
    import resource

    from gemma2_ref.verify.corpus import write_corpus
    from gemma2_ref.verify.corpus_ray import RayExecutor, local_cluster

    workers, _ = CONFIGS[name]
    results, timings = [], {}
    t0 = time.perf_counter()
    with contextlib.nullcontext() if workers is None else local_cluster(workers):
        executor = (
            timed_serial(timings)
            if workers is None
            else RayExecutor(workers=workers, start_timeout=900, log=lambda m: None)
        )

        def collect(tasks, out_dir):
            for r in executor(tasks, out_dir):
                results.append(r)
                yield r

        write_corpus(
            checkpoint,
            out,
            tokens=tokens,
            ctx=ctx,
            chunks=chunks,
            shard_chunks=1,
            top_k=32,
            executor=collect,
            log=lambda m: None,
        )
        timings = timings if workers is None else executor.timings
        noop = noop_round_trip() if workers == 1 else None
    compute = timings["done"] - timings["ready"]
    n_tokens = sum(r["tokens"] for r in results)
    rss = [r["max_rss_bytes"] for r in results if "max_rss_bytes" in r]
    report = {
        "config": name,
        "shards": len(results),
        "tokens": n_tokens,
        "wall_s": time.perf_counter() - t0,
        "startup_s": timings["ready"] - t0,
        "compute_s": compute,
        "tokens_per_s": n_tokens / compute,
        "worker_seconds": sum(r["seconds"] for r in results),
        "max_rss_gib": (max(rss) if rss else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / GiB,
    }
    if workers == 1:  # shards one after another on one worker: what the driver saw beyond the worker's work
        report["ray_overhead_per_shard_ms"] = 1e3 * (compute - report["worker_seconds"]) / len(results)
        report["noop_round_trip_ms"] = noop
    return report


def noop_round_trip(calls: int = 200) -> float:
    """ms per call of a method that does nothing, on an actor of the running cluster (Ray's own cost)."""
    from gemma2_ref.verify.corpus_ray import import_ray

    ray = import_ray()

    class Noop:
        def call(self, x):
            return x

    actor = ray.remote(Noop).options(num_cpus=0).remote()
    ray.get(actor.call.remote(0))
    t0 = time.perf_counter()
    for i in range(calls):
        ray.get(actor.call.remote(i))
    return 1e3 * (time.perf_counter() - t0) / calls


# -- the arithmetic ---------------------------------------------------------------------------------------


def flops_per_token(cfg, ctx: int) -> float:
    """Multiply-adds x 2 per corpus token of a chunk of `ctx`: the projections and MLP of every layer, attention
    over the ctx/2 keys a position sees on average (a sliding layer's window is past any --ctx up to 4096), and
    the output head on the scored half of the positions only (forward(logits_at=...))."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    proj = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F
    attn = 2 * H * Dh * (ctx / 2)  # q.k and probs.v
    head = D * V * (ctx - 1 - ctx // 2) / ctx
    return 2.0 * (L * (proj + attn) + head)


def worker_bytes(cfg, ctx: int) -> dict:
    """A worker's own memory (converted float32, one layer at a time as load_model(keep_converted="auto") does
    when layers do not fit) and the checkpoint's bf16 bytes, memory-mapped: page cache, shared by a node's
    workers."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F + 4 * D
    rows = ctx - 1 - ctx // 2
    own = 4 * (V * D + layer) + 4 * rows * V + 8 * 64 * V + 4 * ctx * (6 * D + 2 * F)
    return {"own_gib": own / GiB, "mapped_bf16_gib": 2 * (V * D + L * layer + D) / GiB}


def arithmetic_table(per_worker_flops: float, ctx: int, overhead_s: float, shard_tokens: int) -> list[dict]:
    """ARITHMETIC, not measured: CORPUS_TOKENS on 9B and 27B with 1, 8, 64 workers of one BLAS thread each,
    at the measured per-worker rate (perfect scaling; Ray's measured per-shard overhead added)."""
    rows = []
    for preset in ("9b", "27b"):
        cfg = PRESETS[preset]
        mem = worker_bytes(cfg, ctx)
        for workers in (1, 8, 64):
            seconds = CORPUS_TOKENS * flops_per_token(cfg, ctx) / (per_worker_flops * workers)
            seconds += overhead_s * CORPUS_TOKENS / shard_tokens / workers
            rows.append({"model": preset, "workers": workers, "hours": seconds / 3600, **mem})
    return rows


# -- the run ------------------------------------------------------------------------------------------------


def shard_hashes(out: Path) -> dict[str, str]:
    """sha256 of each shard's tensor bytes (after the safetensors header, whose metadata holds the plan's hash,
    and the plan holds the git commit of the source: a commit made between two runs changes every header)."""
    hashes = {}
    for path in sorted(out.glob("shard-*.safetensors")):
        raw = path.read_bytes()
        start = 8 + int.from_bytes(raw[:8], "little")
        hashes[path.name] = hashlib.sha256(raw[start:]).hexdigest()
    return hashes


def run_all(args) -> dict:
    cfg = preset_config("2b", args.layers)
    ckpt = build_random_checkpoint(Path(args.cache_dir) / f"2b-{args.layers}L-seed0", cfg, log=print)
    scratch = Path(tempfile.mkdtemp(prefix="corpus-ray-bench-"))
    tokens = scratch / "ids.npy"
    np.save(tokens, np.random.default_rng(0).integers(3, cfg.vocab_size, args.ctx * args.chunks, dtype=np.int64))
    report = {
        "checkpoint": f"2B shapes, {args.layers} layers, random bf16",
        "ctx": args.ctx,
        "chunks": args.chunks,
        "shard_chunks": 1,
        "top_k": 32,
        "cpus": os.cpu_count(),
        "runs": [],
    }
    for name, (_, threads) in CONFIGS.items():
        env = dict(
            os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
        )
        before = load_average()
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--run",
                name,
                "--checkpoint",
                str(ckpt),
                "--tokens",
                str(tokens),
                "--ctx",
                str(args.ctx),
                "--chunks",
                str(args.chunks),
                "--out",
                str(scratch / name),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run.update(load_before=before, load_after=load_average(), shard_sha256=shard_hashes(scratch / name))
        report["runs"].append(run)
        print(f"{name}: {run['tokens_per_s']:.1f} tokens/s (load {before} -> {run['load_after']})", flush=True)
    runs = {r["config"]: r for r in report["runs"]}
    same = {name: r["shard_sha256"] for name, r in runs.items()}
    report["bytes_equal"] = {
        "ray-1x1t vs ray-2x1t": same["ray-1x1t"] == same["ray-2x1t"],
        "serial-2t vs ray-1x1t": same["serial-2t"] == same["ray-1x1t"],
    }
    per_worker = runs["ray-1x1t"]["tokens_per_s"] * flops_per_token(cfg, args.ctx)
    report["per_worker_gflops"] = per_worker / 1e9
    report["arithmetic_300k"] = arithmetic_table(
        per_worker, args.ctx, runs["ray-1x1t"]["ray_overhead_per_shard_ms"] / 1e3, args.ctx
    )
    report["measured_vs_formula_rss_gib"] = {
        "measured": runs["ray-1x1t"]["max_rss_gib"],
        "formula_own": worker_bytes(cfg, args.ctx)["own_gib"],
    }
    for r in report["runs"]:
        r.pop("shard_sha256")
    subprocess.run(["rm", "-rf", str(scratch)], check=False)
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Corpus on Ray: {report['checkpoint']}, {report['chunks']} chunks of {report['ctx']} tokens, one "
        f"chunk per shard, top-k {report['top_k']}, {report['cpus']} CPUs.",
        "",
        "| configuration | tokens/s (loaded model) | wall s (with start) | start s | peak RSS per process GiB "
        "| load average before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | "
            f"{r['max_rss_gib']:.2f} | {r['load_before']} -> {r['load_after']} |"
        )
    one = next(r for r in report["runs"] if r["config"] == "ray-1x1t")
    lines += [
        "",
        f"Ray's overhead per shard (ray-1x1t: driver time per shard minus the worker's): "
        f"{one['ray_overhead_per_shard_ms']:.1f} ms; a no-op actor call: {one['noop_round_trip_ms']:.2f} ms.",
        f"Shard bytes equal: {report['bytes_equal']}.",
        "",
        f"ARITHMETIC (not measured): {CORPUS_TOKENS:,} tokens at the measured {report['per_worker_gflops']:.1f} "
        f"GFLOP/s per 1-thread worker, perfect scaling, chunks of {report['ctx']}:",
        "",
        "| model | workers | hours | worker's own memory GiB | bf16 checkpoint mapped per node GiB |",
        "|---|---|---|---|---|",
    ]
    for r in report["arithmetic_300k"]:
        lines.append(
            f"| {r['model']} | {r['workers']} | {r['hours']:.2f} | {r['own_gib']:.1f} | {r['mapped_bf16_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--json", help="write the report here (and the table beside it, .md)")
    p.add_argument("--run", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # one configuration's process
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(run_config(args.run, args.checkpoint, args.tokens, args.ctx, args.chunks, args.out)))
        return 0
    report = run_all(args)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        Path(args.json).with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

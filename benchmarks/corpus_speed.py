"""Corpus tokens/s, side by side in one run: gemma2-ref's reference (`gemma2-ref corpus`), transformers eager
fp32 and llama.cpp on an f32 GGUF through our adapters (candidates of that reference), and llama.cpp's own
`llama-perplexity --kl-divergence-base` on the same f32 GGUF and the same text (when it is built:
scripts/build_llama_perplexity.sh). The load average is recorded before and after.

    python benchmarks/corpus_speed.py OUT_DIR [--models tiny,random-2b] [--ctx 128] [--chunks 8]

Each row: wall seconds of the whole command (load included) and of the scoring alone where the tool reports it,
and corpus tokens (chunks x ctx) per second. Writes OUT_DIR/corpus_speed.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from measure_corpus_kld import backend_record, corpus_arguments, random_2b  # noqa: E402

from gemma2_ref.verify import corpus as C  # noqa: E402


def llama_perplexity() -> Path | None:
    env = os.environ.get("GEMMA2_REF_LLAMA_PERPLEXITY")
    path = (
        Path(env)
        if env
        else Path.home() / ".cache" / "gemma2-ref" / "llama-perplexity-0.3.36" / "bin" / "llama-perplexity"
    )
    return path if path.is_file() else None


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(model: str, out: Path, ctx: int, chunks: int) -> list[dict]:
    name = Path(model).name
    tokens = ctx * chunks
    text = out / "corpus.txt"
    text.write_text(C.BUNDLED_CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    rows = []
    ref = out / f"{name}-ref"
    rows.append(
        {
            "model": name,
            "engine": f"gemma2-ref reference (float32, top-{C.DEFAULT_TOP_K})",
            "seconds": timed(lambda: C.write_corpus(model, ref, text=text, ctx=ctx, chunks=chunks, log=lambda m: None)),
        }
    )
    for backend, dtype in (("transformers", "float32"), ("llama.cpp", "f32")):
        record = backend_record(backend, dtype, model)  # conversion outside the timing
        rows.append(
            {
                "model": name,
                "engine": f"{backend} {dtype} (our adapter)",
                "seconds": timed(
                    lambda: C.write_corpus(
                        model,
                        out / f"{name}-{backend}",  # noqa: B023 (timed calls it at once)
                        backend=record,  # noqa: B023
                        reference=ref,
                        log=lambda m: None,
                    )
                ),
            }
        )
        if backend == "llama.cpp":
            gguf = record["gguf"]
    binary = llama_perplexity()
    if binary is not None:
        t0 = time.perf_counter()
        done = subprocess.run(
            [
                str(binary),
                "-m",
                gguf,
                "-f",
                str(text),
                "-c",
                str(ctx),
                "--chunks",
                str(chunks),
                "--kl-divergence-base",
                str(out / f"{name}-llama.kld"),
                "-t",
                "2",
                "-b",
                str(ctx),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        per_pass = re.search(r"([\d.]+) seconds per pass", done.stderr + done.stdout)
        rows.append(
            {
                "model": name,
                "engine": "llama-perplexity f32 (llama.cpp's tool)",
                "seconds": seconds,
                "scoring_seconds": float(per_pass.group(1)) * chunks if per_pass else None,
                "returncode": done.returncode,
            }
        )
    for r in rows:
        r["tokens"], r["tokens_per_s"] = tokens, tokens / r["seconds"]
    return rows


def main() -> None:
    ap = corpus_arguments(__doc__, "tiny,random-2b", 8)
    args = ap.parse_args()
    if args.out is None:
        ap.error("give OUT_DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    for m in args.models.split(","):
        model = str(random_2b(args.out / "random-2b")) if m == "random-2b" else m
        rows += bench(model, args.out, args.ctx, args.chunks)
    result = {
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "ctx": args.ctx,
        "chunks": args.chunks,
        "rows": rows,
    }
    (args.out / "corpus_speed.json").write_text(json.dumps(result, indent=1))
    print(
        f"load average {load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after, "
        f"{os.cpu_count()} cores; {args.chunks} chunks of {args.ctx} tokens\n"
    )
    print("| model | engine | wall s (load included) | corpus tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()

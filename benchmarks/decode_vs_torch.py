"""Prefill and decode speed: gemma2_ref.generate (NumPy, KV cache) vs transformers eager float32 (its cache).

Same random checkpoint with the real 2B shapes (vocab 256000, D 2304, F 9216, H 8 / K 4, head_dim 256,
window 4096) but only `--layers` decoder layers, same prompt, greedy decoding, both in one process and
interleaved (numpy, torch, numpy, torch, ...) so both see the same machine load; the best of `--repeats`
counts. Both compute the output head for the last position only (our `logits_at="last"`, transformers'
`logits_to_keep=1`, as its `generate` does). The two greedy continuations are checked to agree.

    python benchmarks/decode_vs_torch.py                      # 4 layers, 128-token prompt, 32 new tokens
    python benchmarks/decode_vs_torch.py --checkpoint DIR     # any Gemma 2 checkpoint instead

Prints a table and, with --json, the numbers as JSON. No timing ever enters the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def build_checkpoint(cache_dir: Path, layers: int, seed: int = 0) -> Path:
    """The random 2B-shaped bf16 checkpoint `gemma2-ref bench` uses (built block by block, then reused)."""
    from gemma2_ref.bench import bench_config, build_random_checkpoint

    return build_random_checkpoint(cache_dir / f"2b-{layers}L-seed{seed}", bench_config("2b", layers), seed,
                                   log=lambda msg: print(msg, file=sys.stderr))


def time_numpy(model, ids, new_tokens):
    from gemma2_ref.generate import generate

    out = generate(model, ids, new_tokens, stop_ids=())
    return out.prefill_seconds, out.decode_seconds, out.decode_tokens, out.tokens


def time_torch(model, ids, new_tokens):
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        logits = model(input_ids=torch.tensor(ids[None]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
        prefill = time.perf_counter() - t0
        tokens = [int(torch.argmax(logits[0, -1]))]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits
            tokens.append(int(torch.argmax(logits[0, -1])))
        decode = time.perf_counter() - t0
    return prefill, decode, new_tokens - 1, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a Gemma 2 checkpoint directory (default: build one)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random 2B-shaped model (default 4)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where random checkpoints are built and reused (default: gemma2-ref bench's)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (NumPy's BLAS uses "
                        "its own default; set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS to pin it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import Gemma2ForCausalLM

    import gemma2_ref as g2

    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        from gemma2_ref.bench import DEFAULT_CACHE
        path = build_checkpoint(args.cache_dir or DEFAULT_CACHE, args.layers)
    else:
        path = args.checkpoint
    ours = g2.load_model(path, keep_converted=True)
    cfg = ours.config
    theirs = Gemma2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.concatenate([[2], np.random.default_rng(0).integers(3, cfg.vocab_size, args.prompt_tokens - 1)])

    load_before = os.getloadavg()  # other processes on the machine: the numbers only mean something when low
    best = {"numpy": [np.inf, np.inf], "torch": [np.inf, np.inf]}
    tokens = {}
    for r in range(args.repeats):  # the first round also converts / warms up; best of all rounds counts
        for name, run, model in (("numpy", time_numpy, ours), ("torch", time_torch, theirs)):
            prefill, decode, n_decode, tokens[name] = run(model, ids, args.new_tokens)
            best[name] = [min(best[name][0], prefill), min(best[name][1], decode)]
            print(f"  round {r + 1} {name}: prefill {prefill:.3f} s, decode {n_decode} in {decode:.3f} s",
                  file=sys.stderr)
    agree = tokens["numpy"] == tokens["torch"]
    n_decode = args.new_tokens - 1
    result = {
        "model": str(path), "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
        "prompt_tokens": len(ids), "decode_tokens": n_decode, "repeats": args.repeats,
        "greedy_tokens_agree": agree,
        "numpy": {"prefill_tok_s": len(ids) / best["numpy"][0], "decode_tok_s": n_decode / best["numpy"][1]},
        "torch_eager_fp32": {"prefill_tok_s": len(ids) / best["torch"][0],
                             "decode_tok_s": n_decode / best["torch"][1]},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "gemma2_ref": g2.__version__},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join(["python", "benchmarks/decode_vs_torch.py"] + (argv if argv is not None else sys.argv[1:])),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        n, t = result["numpy"], result["torch_eager_fp32"]
        print(f"{cfg.num_hidden_layers}-layer 2B-shaped model, prompt {len(ids)} tokens, {n_decode} decode steps, "
              f"best of {args.repeats}; greedy tokens agree: {agree}")
        print(f"  {'':24s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
        print(f"  {'numpy (gemma2_ref)':24s} {n['prefill_tok_s']:14.1f} {n['decode_tok_s']:13.2f}")
        print(f"  {'transformers eager fp32':24s} {t['prefill_tok_s']:14.1f} {t['decode_tok_s']:13.2f}")
        print(f"  numpy / torch: prefill {n['prefill_tok_s'] / t['prefill_tok_s']:.2f}x, "
              f"decode {n['decode_tok_s'] / t['decode_tok_s']:.2f}x")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

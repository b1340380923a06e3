"""`gemma2-ref`: command-line access to the functions of gemma2_ref, and nothing else.

Each subcommand is one `add_<name>(subparsers)` function that registers its arguments and a handler.
MODEL is a checkpoint directory (Hugging Face layout) or the name of a bundled model ("tiny").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

import gemma2_ref as g2

from .config import GLOBAL, ConfigError
from .tokenizer import TokenizerError
from .weights import WeightsError


def eprint(*args, **kw):
    print(*args, file=sys.stderr, **kw)


def layer_progress(label: str = "layers"):
    """A progress callback for forward(): a one-line counter on stderr, for models worth waiting for."""
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        end = "\n" if done == total else "\r"
        eprint(f"  {label}: {done}/{total}  ({time.perf_counter() - start:.1f} s)", end=end, flush=True)

    return report


def load_model_verbose(name: str, dtype: str = "float32", keep_converted: bool = False, quiet: bool = False):
    t0 = time.perf_counter()
    model = g2.load_model(name, dtype=dtype, keep_converted=keep_converted)
    if not quiet:
        files = model.weights.files
        size = sum(f.stat().st_size for f in files)
        eprint(f"loaded {model.path} ({len(files)} file(s), {size / 2**20:.1f} MiB, "
               f"{'/'.join(model.weights.stored_dtypes)} -> {model.dtype}) in {time.perf_counter() - t0:.2f} s")
    return model


def is_large(model) -> bool:
    return model.config.parameter_counts()["total"] > 50_000_000


def prompt_ids(args, model_dir) -> tuple[list[int], object]:
    """Token ids from --tokens, or from --prompt (with --chat / --no-bos) and the model's tokenizer."""
    if getattr(args, "tokens", None):
        return [int(t) for t in args.tokens.replace(",", " ").split()], None
    tok = g2.load_tokenizer(model_dir)
    if getattr(args, "chat", False):
        return tok.encode_chat(args.prompt), tok
    return tok.encode(args.prompt, bos=not getattr(args, "no_bos", False)), tok


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            done += len(chunk)
            if progress and size > 1 << 28:
                eprint(f"  hashing {path.name}: {100 * done / size:5.1f}%", end="\r", flush=True)
    if progress and size > 1 << 28:
        eprint()
    return h.hexdigest()


# -- info -------------------------------------------------------------------------------------------------

def add_info(sub):
    p = sub.add_parser("info", help="config, parameter counts, layer kinds, files and their sha256",
                       description="Describe a checkpoint: its config, parameter counts, the kind of each "
                                   "layer, its files and their sha256 (hashing large files takes a while).")
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of the files")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run_info)


def run_info(args) -> int:
    model = g2.load_model(args.model)
    cfg, path = model.config, model.path
    counts = cfg.parameter_counts()
    files = model.weights.files + [p for p in (path / "tokenizer.model",) if p.is_file()]
    hashes = {} if args.no_hash else {f.name: sha256_file(f, progress=True) for f in files}
    info = {"path": str(path), "config": cfg.to_hf_dict(), "parameters": counts,
            "stored_dtypes": model.weights.stored_dtypes,
            "files": {f.name: {"bytes": f.stat().st_size, **({"sha256": hashes[f.name]} if hashes else {})}
                      for f in files}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kinds = "".join("G" if t == GLOBAL else "S" for t in cfg.layer_types)
    print(f"{path}")
    print(f"  layers {cfg.num_hidden_layers}  hidden D={cfg.hidden_size}  ffw F={cfg.intermediate_size} "
          f"(paper's feed-forward dim 2F={2 * cfg.intermediate_size})  vocab V={cfg.vocab_size}")
    print(f"  heads H={cfg.num_attention_heads} query / K={cfg.num_key_value_heads} kv "
          f"(each kv head serves {cfg.num_queries_per_kv})  head_dim {cfg.head_dim}  "
          f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g}")
    print(f"  layer kinds (S = sliding window {cfg.sliding_window}, G = global): {kinds}")
    print(f"  soft-caps: attention {cfg.attn_logit_softcapping}, final {cfg.final_logit_softcapping};  "
          f"rope theta {cfg.rope_theta:g};  rms eps {cfg.rms_norm_eps:g};  context {cfg.max_position_embeddings}")
    print(f"  parameters: {counts['total']:,} = embedding {counts['embedding']:,} (tied) + "
          f"non-embedding {counts['non_embedding']:,}")
    print(f"  stored as {', '.join(model.weights.stored_dtypes)}")
    for name, meta in info["files"].items():
        print(f"  {name:40s} {meta['bytes']:>14,} bytes  {meta.get('sha256', '')}")
    return 0


# -- tokenize ---------------------------------------------------------------------------------------------

def add_tokenize(sub):
    p = sub.add_parser("tokenize", help="show the token ids and pieces of a text",
                       description="Encode TEXT with the model's tokenizer.model and show ids and pieces.")
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    p.add_argument("text")
    p.add_argument("--no-bos", action="store_true", help="do not start with <bos> (Gemma expects one)")
    p.add_argument("--chat", action="store_true", help="wrap TEXT in the Gemma chat template as a user turn")
    p.add_argument("--json", action="store_true", help="print the ids as a JSON list only")
    p.set_defaults(handler=run_tokenize)


def run_tokenize(args) -> int:
    tok = g2.load_tokenizer(g2.resolve_checkpoint(args.model))
    ids = tok.encode_chat(args.text) if args.chat else tok.encode(args.text, bos=not args.no_bos)
    if args.json:
        print(json.dumps(ids))
        return 0
    print(f"{len(ids)} tokens")
    for i, (t, piece) in enumerate(zip(ids, tok.pieces(ids))):
        print(f"  {i:4d}  {t:6d}  {piece!r}")
    return 0


# -- run --------------------------------------------------------------------------------------------------

def add_run(sub):
    p = sub.add_parser("run", help="one forward pass: the next-token distribution's top-k",
                       description="Run the forward pass on a prompt and print the most likely next tokens "
                                   "with their probabilities (softmax of the soft-capped logits).")
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to encode with the model's tokenizer")
    src.add_argument("--tokens", help="token ids instead of text, e.g. '2 651 1234'")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat template")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> (Gemma expects one)")
    p.add_argument("--top-k", type=int, default=10, help="how many candidates to show (default 10)")
    p.add_argument("--dtype", choices=g2.COMPUTE_DTYPES, default="float32", help="compute dtype")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run_run)


def run_run(args) -> int:
    model = load_model_verbose(args.model, args.dtype, quiet=args.json)
    ids, tok = prompt_ids(args, model.path)
    if tok is None and (model.path / "tokenizer.model").is_file():
        tok = g2.load_tokenizer(model.path)
    t0 = time.perf_counter()
    progress = layer_progress() if is_large(model) and not args.json else None
    logits = model.forward(ids, logits_at="last", progress=progress)["logits"][-1].astype(np.float64)
    seconds = time.perf_counter() - t0
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[: args.top_k]
    rows = [{"id": int(t), "piece": tok.pieces([t])[0] if tok else None, "prob": float(probs[t]),
             "logit": float(logits[t])} for t in top]
    if args.json:
        print(json.dumps({"ids": ids, "top": rows, "seconds": seconds}, indent=2))
        return 0
    text = tok.decode(ids, skip_special=False) if tok else " ".join(map(str, ids))
    print(f"prompt ({len(ids)} tokens): {text!r}")
    print(f"next token, top {len(rows)} (forward {seconds * 1000:.0f} ms, {len(ids) / seconds:.0f} tokens/s):")
    for r in rows:
        print(f"  {r['prob']:8.4f}  {r['id']:6d}  {r['piece']!r:20}  logit {r['logit']:+.3f}")
    return 0


# -- generate ---------------------------------------------------------------------------------------------

def add_generate(sub):
    p = sub.add_parser("generate", help="generate text: prefill, then token-by-token decode with a KV cache",
                       description="Continue a prompt token by token (greedy unless --temperature > 0), "
                                   "printing text as it is produced. Stops on <eos> or <end_of_turn>. "
                                   "Prefill and decode speed and the KV cache size are reported on stderr. "
                                   "Converted weights are kept in memory when the model fits in about half "
                                   "of the available RAM (fast decode); --stream-weights converts each "
                                   "layer on every step instead (slow, but runs a big model in little RAM).")
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to encode with the model's tokenizer")
    src.add_argument("--tokens", help="token ids instead of text, e.g. '2 651 1234'")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the Gemma chat template as a user turn, then generate the model turn")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> (Gemma expects one)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default) is greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--dtype", choices=g2.COMPUTE_DTYPES, default="float32", help="compute dtype")
    p.add_argument("--show-ids", action="store_true", help="also print the generated token ids")
    p.add_argument("--stream-weights", action="store_true",
                   help="convert each layer's weights on every forward instead of keeping them converted")
    p.set_defaults(handler=run_generate)


def fits_in_memory(model, fraction: float = 0.5) -> bool:
    """Whether the whole model, converted to the compute dtype, takes less than `fraction` of available RAM."""
    need = model.config.parameter_counts()["total"] * model.dtype.itemsize
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return need < 2 << 30
    return need < fraction * available


def run_generate(args) -> int:
    from .generate import TextStream, generate

    model = load_model_verbose(args.model, args.dtype)
    if not args.stream_weights and fits_in_memory(model):
        model.weights.keep_converted = True
    elif not args.stream_weights:
        eprint("the converted model would not fit comfortably in memory: converting layers on every step "
               "(slow; pass --stream-weights to choose this explicitly)")
    ids, tok = prompt_ids(args, model.path)
    if tok is None and (model.path / "tokenizer.model").is_file():
        tok = g2.load_tokenizer(model.path)
    stop_ids = tok.stop_ids if tok is not None else model.config.eos_token_ids
    stream = TextStream(tok, prefix=ids) if tok is not None else None

    def on_token(token: int) -> None:
        if token in stop_ids:
            return
        text = stream.push(token) if stream is not None else f"{token} "
        print(text, end="", flush=True)

    if tok is not None:
        print(tok.decode(ids) if not args.chat else "", end="", flush=True)
    progress = layer_progress("prefill layers") if is_large(model) else None
    result = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, stop_ids=stop_ids, on_token=on_token,
                      progress=progress)
    print(stream.flush() if stream is not None else "", flush=True)
    if args.show_ids:
        print("prompt ids:", " ".join(map(str, ids)))
        print("new ids:   ", " ".join(map(str, result.tokens)))
    reason = {"stop": "stop token", "max_new_tokens": "--max-new-tokens reached",
              "context": "context length reached"}[result.stop_reason]
    eprint(f"{result.summary()}; stopped: {reason}")
    return 0


# -- bench ------------------------------------------------------------------------------------------------

def add_bench(sub):
    from . import bench
    p = sub.add_parser("bench", help="speed and memory: NumPy vs transformers eager fp32 on 2B-shaped weights",
                       description="Build (once, cached) random bf16 checkpoints with the real 2B shapes, then "
                                   "measure NumPy against transformers eager float32 on the same weights and "
                                   "inputs, interleaved: prefill and decode tokens/s, load time, and the peak "
                                   "resident memory of the full 26-layer model. Writes JSON and Markdown.")
    bench.add_arguments(p)
    p.set_defaults(handler=run_bench)


def run_bench(args) -> int:
    from . import bench
    return bench.run(args)


# -- main -------------------------------------------------------------------------------------------------

SUBCOMMANDS = [add_info, add_tokenize, add_run, add_generate, add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma2-ref",
        description="Gemma 2 in plain NumPy: run real checkpoints exactly, write golden activations, and "
                    "check other backends against them. MODEL is a Hugging Face checkpoint directory "
                    "(config.json, *.safetensors, tokenizer.model) or a bundled model: "
                    + ", ".join(g2.bundled_names()) + ".")
    parser.add_argument("--version", action="version", version=f"gemma2-ref {g2.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (ConfigError, WeightsError, TokenizerError, FileNotFoundError, ValueError) as e:
        eprint(f"gemma2-ref {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        eprint("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`gemma2-ref`: command-line access to the functions of gemma2_ref, and nothing else.

Each subcommand is one `add_<name>(subparsers)` function that registers its arguments and a handler.
MODEL is a checkpoint directory (Hugging Face layout) or the name of a bundled model ("tiny").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import gemma2_ref as g2

from .adapters import BACKENDS
from .config import GLOBAL, ConfigError
from .golden import sha256_file
from .model import softmax
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


def load_model_verbose(name: str, dtype: str = "float32", keep_converted=False, quiet: bool = False):
    t0 = time.perf_counter()
    model = g2.load_model(name, dtype=dtype, keep_converted=keep_converted)
    if not quiet:
        files = model.weights.files
        size = sum(f.stat().st_size for f in files)
        eprint(f"loaded {model.path} ({len(files)} file(s), {size / 2**20:.1f} MiB, "
               f"{'/'.join(model.weights.stored_dtypes)} -> {model.dtype}) in {time.perf_counter() - t0:.2f} s")
    return model


def add_model_and_prompt(p, chat_help: str = "wrap the prompt in the Gemma chat template as a user turn"):
    """MODEL, then the input: --prompt TEXT or --tokens IDS, with --chat / --no-bos. Returns the
    --prompt/--tokens group, for a subcommand that offers one more source of input."""
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to encode with the model's tokenizer")
    src.add_argument("--tokens", help="token ids instead of text, e.g. '2 651 1234'")
    p.add_argument("--chat", action="store_true", help=chat_help)
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> to --prompt (Gemma expects one)")
    return src


def prompt_ids(args, model_dir) -> tuple[list[int], object]:
    """Token ids from --tokens, or from --prompt (with --chat / --no-bos) and the model's tokenizer."""
    if getattr(args, "tokens", None):
        return [int(t) for t in args.tokens.replace(",", " ").split()], None
    tok = g2.load_tokenizer(model_dir)
    if getattr(args, "chat", False):
        return tok.encode_chat(args.prompt), tok
    return tok.encode(args.prompt, bos=not getattr(args, "no_bos", False)), tok


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
    add_model_and_prompt(p)
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
    progress = layer_progress() if model.is_large and not args.json else None
    logits = model.forward(ids, logits_at="last", progress=progress)["logits"][-1].astype(np.float64)
    seconds = time.perf_counter() - t0
    probs = softmax(logits)
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
    add_model_and_prompt(p, chat_help="wrap the prompt in the Gemma chat template as a user turn, then "
                                      "generate the model turn")
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


def run_generate(args) -> int:
    from .generate import TextStream, generate

    model = load_model_verbose(args.model, args.dtype, keep_converted=False if args.stream_weights else "auto")
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
    progress = layer_progress("prefill layers") if model.is_large else None
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
    kept, layers = model.weights.kept_layers, model.config.num_hidden_layers
    if not args.stream_weights and kept < layers:
        eprint(f"kept {kept} of {layers} layers converted (half the available RAM); the other {layers - kept} "
               f"were converted again at every step")
    return 0


# -- bench ------------------------------------------------------------------------------------------------

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _bench_module():
    """benchmarks/bench.py of a source checkout (it needs torch: it lives outside the package)."""
    import importlib.util
    if not BENCH_SCRIPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("gemma2_ref_bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_bench(sub):
    p = sub.add_parser("bench", help="speed and memory: NumPy vs transformers eager fp32 on 2B-shaped weights",
                       description="Build (once, cached) random bf16 checkpoints with the real 2B shapes, then "
                                   "measure NumPy against transformers eager float32 on the same weights and "
                                   "inputs, interleaved: prefill and decode tokens/s, load time, and the peak "
                                   "resident memory of the full 26-layer model. Writes JSON and Markdown. "
                                   f"Runs {BENCH_SCRIPT.relative_to(BENCH_SCRIPT.parents[1])} of a source "
                                   "checkout (it needs torch and transformers).")
    bench = _bench_module()
    if bench is not None:
        bench.add_arguments(p)
    p.set_defaults(handler=lambda args: run_bench(args, bench))


def run_bench(args, bench) -> int:
    if bench is None:
        raise FileNotFoundError(f"{BENCH_SCRIPT} is not here: the benchmark lives in the source repository "
                                f"(benchmarks/bench.py); run it from a clone")
    return bench.run(args)


# -- golden / compare / diagnose ----------------------------------------------------------------------------

def add_golden(sub):
    p = sub.add_parser("golden", help="write golden activations (a case, or the coverage suite)",
                       description="Run MODEL on a prompt, token ids or a whole suite and write golden cases: "
                                   "activations.safetensors (canonical tap names) + manifest.json (sha256 of the "
                                   "weights, tokenizer and every tensor, stats, producer version and commit). "
                                   "The same inputs give bit-identical tensors. Regenerate the repository's "
                                   "suite with: gemma2-ref golden tiny --suite coverage --out golden/")
    src = add_model_and_prompt(p)
    src.add_argument("--suite", choices=["coverage"],
                     help="coverage: short, window (positions W-1, W, W+1 of the sliding window W), no_bos, "
                          "double_bos, chat, batch")
    p.add_argument("--out", required=True, help="output directory (a case, or a suite of case directories)")
    p.add_argument("--taps", default="default",
                   help="tap set: default (all but attention scores/probs), all, residual, or comma-separated "
                        "names / globs such as 'embed,layers.*.output,logits' (default: default)")
    p.add_argument("--positions", metavar="START:STOP",
                   help="store only these query positions of every tap (long prompts of big models), e.g. "
                        "4094:4098; the suite does this by itself for cases over 256 MiB")
    p.add_argument("--backend", choices=["gemma2_ref", *BACKENDS], default="gemma2_ref",
                   help="who computes the activations: gemma2_ref (the reference, default) or another backend "
                        "through its adapter in gemma2_ref/adapters/ (a candidate)")
    p.add_argument("--dtype", default="float32",
                   help="compute dtype: float32 or float64 for gemma2_ref; float32, bfloat16 or float16 for "
                        "transformers (default float32)")
    p.add_argument("--attn-implementation", default="eager",
                   help="transformers attention implementation (eager, sdpa, ...; default eager)")
    p.set_defaults(handler=run_golden)


def _taps_arg(taps: str):
    return taps if taps in ("default", "all", "residual") else [t.strip() for t in taps.split(",") if t.strip()]


def run_golden(args) -> int:
    from . import golden, suites
    from .adapters import load_adapter

    taps = _taps_arg(args.taps)
    ours = args.backend == "gemma2_ref"
    model = load_model_verbose(args.model, args.dtype if ours else "float32")
    write = None
    if not ours:
        adapter = load_adapter(args.backend)
        options = adapter.backend_options(model.path, args) if hasattr(adapter, "backend_options") else {}

        def write(ids, case_dir, text, description, case_taps=taps, positions=None):
            adapter.write_golden(model.path, ids, case_dir, dtype=args.dtype, taps=case_taps, text=text,
                                 description=description, positions=positions, **options)
    if args.suite:
        tok = g2.load_tokenizer(model.path)
        eprint(f"writing suite {args.suite} to {args.out}")
        suites.generate_suite(model, tok, args.out, args.suite, taps, model_name=args.model, log=eprint,
                              write=write)
        print(args.out)
        return 0
    ids, tok = prompt_ids(args, model.path)
    text = None if args.tokens else (tok.chat_prompt(args.prompt) if args.chat else args.prompt)
    positions = None
    if args.positions:
        start, _, stop = args.positions.partition(":")
        positions = (int(start or 0), int(stop or len(ids)))
    if write is not None:
        write(np.asarray(ids), Path(args.out), text, None, taps, positions)
    else:
        progress = layer_progress() if model.is_large else None
        info = golden.model_info(model, args.model, progress=True)
        acts = suites.run_case(model, np.asarray(ids), taps, progress=progress)
        golden.write_case(args.out, acts, np.asarray(ids), model=info, text=text, compute_dtype=str(model.dtype),
                          positions=positions)
    print(args.out)
    return 0


def _add_profile_args(p):
    from .compare import PROFILES
    p.add_argument("--profile", default="auto", choices=["auto", *PROFILES],
                   help="tolerance profile (default auto: from the candidate's compute dtype, bfloat16 -> bf16, "
                        "float16 -> fp16, else fp32)")
    p.add_argument("--rtol", type=float, help="override: max relative L2 error per tap")
    p.add_argument("--atol", type=float, help="override: max abs error per tap, as a fraction of the tap's absmax")
    p.add_argument("--kl", type=float, help="override: max per-token KL divergence of the logits (nats)")
    p.add_argument("--top1", type=float, help="override: min top-1 agreement of the logits (fraction)")
    p.add_argument("--top5", type=float, help="override: min top-5 overlap of the logits (fraction)")
    p.add_argument("--name-map", action="append", metavar="RULE_OR_JSON",
                   help="rename the candidate's tensors: THEIR=CANONICAL ({i} = layer number, trailing * = "
                        "prefix), repeatable, or a JSON file {their: canonical}; e.g. 'blk.{i}.attn_norm="
                        "layers.{i}.pre_attn_norm' or 'model.*=*'")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _profile_for(args, candidate):
    from .compare import auto_profile, get_profile
    name = auto_profile(candidate) if args.profile == "auto" else args.profile
    return get_profile(name, rel_l2=args.rtol, max_rel=args.atol, kl=args.kl, top1=args.top1, top5=args.top5)


def _name_map(rules):
    if not rules:
        return None
    if len(rules) == 1 and rules[0].endswith(".json") and Path(rules[0]).is_file():
        return json.loads(Path(rules[0]).read_text())
    return rules


def _first_case(golden_obj):
    from .golden import Suite
    return golden_obj.cases[0] if isinstance(golden_obj, Suite) else golden_obj


def add_compare(sub):
    from .compare import profile_help
    p = sub.add_parser("compare", help="compare a candidate's activations with a golden: first divergence",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compare CANDIDATE with REFERENCE tap by tap in execution order: relative L2 "
                                   "error, max abs error (relative to the tap's absmax) and its index, cosine; "
                                   "for logits per-token KL, top-1 and top-5 agreement. Reports the first "
                                   "diverging tap and a per-layer table; exit code 1 on failure. A candidate "
                                   "may hold only some taps. Suites are compared case by case. On failure, a "
                                   "diagnosis re-runs the reference model with each known mistake (automatic "
                                   "for small models; --diagnose to force, or use `gemma2-ref diagnose`).",
                       epilog="profiles (thresholds and the measurements behind them):\n" + profile_help())
    p.add_argument("reference", help="golden case or suite directory (written by `gemma2-ref golden`)")
    p.add_argument("candidate", help="candidate case or suite directory, or a bare .safetensors of activations")
    _add_profile_args(p)
    p.add_argument("--all-taps", action="store_true", help="print every tap's metrics, not just the layer table")
    p.add_argument("--diagnose", dest="diagnose", action="store_true", default=None,
                   help="on failure, always run the diagnosis (re-runs the model ~15 times)")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false", help="never run the diagnosis")
    p.add_argument("--model", help="checkpoint for the diagnosis (default: the one the reference manifest names)")
    p.set_defaults(handler=run_compare)


def run_compare(args) -> int:
    from . import compare as C
    from . import diagnose as D
    from .golden import load_golden

    ref = load_golden(args.reference)
    cand = load_golden(args.candidate, name_map=_name_map(args.name_map))
    profile = _profile_for(args, _first_case(cand))
    results, diagnoses, skipped = D.compare_and_diagnose(ref, cand, profile, args.diagnose, args.model, log=eprint)
    if skipped:
        eprint(f"({skipped}: run `gemma2-ref diagnose {args.reference} {args.candidate}` or pass --diagnose)"
               if "large" in skipped else f"({skipped})")
    if args.json:
        out = json.loads(C.to_json(results))
        for case in out["cases"]:
            if case["reference"] in diagnoses:
                case["diagnosis"] = diagnoses[case["reference"]].to_dict()
        print(json.dumps(C.json_safe(out), indent=1))
    else:
        for n, r in enumerate(results):
            if n:
                print("\n" + "=" * 100 + "\n")
            print(C.format_report(r, all_taps=args.all_taps))
            if r.reference in diagnoses:
                print()
                print(D.format_diagnosis(diagnoses[r.reference]))
        if len(results) > 1:
            ok = sum(r.passed for r in results)
            print(f"\nsuite: {ok} of {len(results)} cases pass" + (
                "; failing: " + ", ".join(Path(r.reference).name for r in results if not r.passed)
                if ok < len(results) else ""))
    return 0 if all(r.passed for r in results) else 1


def add_diagnose(sub):
    p = sub.add_parser("diagnose", help="which known Gemma 2 mistake does a failing candidate look like?",
                       description="Re-run the reference golden's model (verified against the manifest's weight "
                                   "sha256s; or --model) with each known mistake injected (attention / final "
                                   "soft-cap dropped, sliding window missing or off by one, wrong query scale, "
                                   "normalizer rounding, RMSNorm (1 + w) offset, exact GELU, missing or doubled "
                                   "<bos>) and name the variants that match the candidate far better than the "
                                   "correct model does, with the evidence. Exit code 0 when the candidate passes "
                                   "or a mistake is named, 1 when it fails unexplained.")
    p.add_argument("reference", help="golden case or suite directory")
    p.add_argument("candidate", help="candidate case or suite directory, or a bare .safetensors of activations")
    p.add_argument("--model", help="checkpoint directory (default: the one the reference manifest names)")
    _add_profile_args(p)
    p.set_defaults(handler=run_diagnose)


def run_diagnose(args) -> int:
    from . import compare as C
    from . import diagnose as D
    from .golden import Suite, load_golden

    ref = load_golden(args.reference)
    cand = load_golden(args.candidate, name_map=_name_map(args.name_map))
    profile = _profile_for(args, _first_case(cand))
    pairs = list(zip(ref.cases, [{c.name: c for c in cand.cases}.get(r.name) for r in ref.cases])) \
        if isinstance(ref, Suite) else [(ref, cand)]
    model = D.load_reference_model(pairs[0][0], args.model, log=eprint)
    out, explained = [], True
    for r, c in pairs:
        if c is None:
            eprint(f"case {r.name}: missing from the candidate suite")
            explained = False
            continue
        eprint(f"case {r.name}: re-running {len(D.known_variants(model.config))} variants")
        diag = D.diagnose(model, r, c, profile, log=eprint if model.is_large else None)
        explained &= diag.base.passed or bool(diag.named)
        out.append((r, diag))
    if args.json:
        print(json.dumps(C.json_safe({"cases": [{"reference": str(r.path), **d.to_dict()} for r, d in out]}),
                         indent=1))
    else:
        for r, diag in out:
            first = diag.base.first_divergence
            print(f"{r.path}: {'PASS' if diag.base.passed else 'FAIL'}"
                  + (f", first diverging tap {first.name}" if first else ""))
            print(D.format_diagnosis(diag))
    return 0 if explained else 1


# -- main -------------------------------------------------------------------------------------------------

SUBCOMMANDS = [add_info, add_tokenize, add_run, add_generate, add_bench, add_golden, add_compare, add_diagnose]


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

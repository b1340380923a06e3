"""What each `gemma2-ref` subcommand does once its arguments are parsed (cli.py parses them): load, call the
library's functions, print. No numerics and no policy here: those live in the modules the handlers call.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import gemma2_ref as g2

from .config import GLOBAL
from .golden import sha256_file
from .model import softmax

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


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


def prompt_ids(args, model_dir) -> tuple[list[int], object]:
    """Token ids from --tokens, or from --prompt (with --chat / --no-bos) and the model's tokenizer."""
    if getattr(args, "tokens", None):
        return [int(t) for t in args.tokens.replace(",", " ").split()], None
    tok = g2.load_tokenizer(model_dir)
    if getattr(args, "chat", False):
        return tok.encode_chat(args.prompt), tok
    return tok.encode(args.prompt, bos=not getattr(args, "no_bos", False)), tok


def info(args) -> int:
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


def tokenize(args) -> int:
    tok = g2.load_tokenizer(g2.resolve_checkpoint(args.model))
    ids = tok.encode_chat(args.text) if args.chat else tok.encode(args.text, bos=not args.no_bos)
    if args.json:
        print(json.dumps(ids))
        return 0
    print(f"{len(ids)} tokens")
    for i, (t, piece) in enumerate(zip(ids, tok.pieces(ids))):
        print(f"  {i:4d}  {t:6d}  {piece!r}")
    return 0


def run(args) -> int:
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


def generate(args) -> int:
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


def bench_module():
    """benchmarks/bench.py of a source checkout (it needs torch: it lives outside the package)."""
    import importlib.util
    if not BENCH_SCRIPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("gemma2_ref_bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(args, bench) -> int:
    if bench is None:
        raise FileNotFoundError(f"{BENCH_SCRIPT} is not here: the benchmark lives in the source repository "
                                f"(benchmarks/bench.py); run it from a clone")
    return bench.run(args)


def taps_arg(taps: str):
    return taps if taps in ("default", "all", "residual") else [t.strip() for t in taps.split(",") if t.strip()]


def golden(args) -> int:
    from . import golden, suites
    from .adapters import load_adapter

    taps = taps_arg(args.taps)
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


def profile_for(args, candidate):
    from .compare import auto_profile, get_profile
    name = auto_profile(candidate) if args.profile == "auto" else args.profile
    return get_profile(name, rel_l2=args.rtol, max_rel=args.atol, kl=args.kl, top1=args.top1, top5=args.top5)


def name_map(rules):
    if not rules:
        return None
    if len(rules) == 1 and rules[0].endswith(".json") and Path(rules[0]).is_file():
        return json.loads(Path(rules[0]).read_text())
    return rules


def first_case(golden_obj):
    from .golden import Suite
    return golden_obj.cases[0] if isinstance(golden_obj, Suite) else golden_obj


def compare(args) -> int:
    from . import compare as C
    from . import diagnose as D
    from .golden import load_golden

    ref = load_golden(args.reference)
    cand = load_golden(args.candidate, name_map=name_map(args.name_map))
    profile = profile_for(args, first_case(cand))
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


def diagnose(args) -> int:
    from . import compare as C
    from . import diagnose as D
    from .golden import Suite, load_golden

    ref = load_golden(args.reference)
    cand = load_golden(args.candidate, name_map=name_map(args.name_map))
    profile = profile_for(args, first_case(cand))
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

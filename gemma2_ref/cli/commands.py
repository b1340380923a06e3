"""What each `gemma2-ref` subcommand does once its arguments are parsed (cli.py parses them): load, call the
library's functions, print. No numerics and no policy here: those live in the modules the handlers call.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import gemma2_ref as g2

from ..model.config import GLOBAL
from ..model.gemma2 import softmax
from ..model.inputs import InputError, check_position_range, check_prompt, parse_token_ids
from ..model.jsonfile import JSONFileError, read_json
from ..verify.golden import sha256_file

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


def eprint(*args, **kw):
    print(*args, file=sys.stderr, **kw)


def os_error_message(e: OSError) -> str:
    """An OSError as one sentence: the path, what the system said, and what to do."""
    if not e.strerror:  # raised by gemma2_ref with its own message
        return str(e)
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    advice = {
        errno.ENOSPC: "free some space or write somewhere else",
        errno.EDQUOT: "free some space or write somewhere else",
        errno.EFBIG: "the file is larger than this file system or process allows; write somewhere else",
        errno.EACCES: "choose a location you may write to",
        errno.EPERM: "choose a location you may write to",
        errno.EROFS: "choose a writable location",
        errno.ENOTDIR: "a part of the path is a file",
    }
    return f"{paths + ': ' if paths else ''}{e.strerror}" + (f" ({advice[e.errno]})" if e.errno in advice else "")


@contextlib.contextmanager
def one_line_warnings(prefix: str):
    """Warnings as one line each on stderr (e.g. a config.json without a soft-cap), as they happen; NumPy's
    overflow warnings once each, and only when the caller reports success (an error names the NaN / Inf)."""
    numeric = []

    def show(message, category, *_, **__):
        if not issubclass(category, RuntimeWarning):
            eprint(prefix + str(message))
        elif str(message) not in numeric:
            numeric.append(str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield lambda: [eprint(f"{prefix}NumPy: {m}") for m in numeric]


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
        eprint(
            f"loaded {model.path} ({len(files)} file(s), {size / 2**20:.1f} MiB, "
            f"{'/'.join(model.weights.stored_dtypes)} -> {model.dtype}) in {time.perf_counter() - t0:.2f} s"
        )
    return model


def prompt_ids(args, model) -> tuple[list[int], object]:
    """Token ids from --tokens, or from --prompt (with --chat / --no-bos) and the model's tokenizer, checked
    against the model (inside its vocabulary, at most its context) before any work."""
    if getattr(args, "tokens", None) is not None:
        return check_prompt(parse_token_ids(args.tokens), model.config, "--tokens"), None
    tok = g2.load_tokenizer(model.path)
    if getattr(args, "chat", False):
        ids = tok.encode_chat(args.prompt)
    else:
        ids = tok.encode(args.prompt, bos=not getattr(args, "no_bos", False))
    return check_prompt(ids, model.config, "--prompt"), tok


def info(args) -> int:
    model = g2.load_model(args.model)
    cfg, path = model.config, model.path
    counts = cfg.parameter_counts()
    files = model.weights.files + [p for p in (path / "tokenizer.model",) if p.is_file()]
    hashes = {} if args.no_hash else {f.name: sha256_file(f, progress=True) for f in files}
    info = {
        "path": str(path),
        "config": cfg.to_hf_dict(),
        "parameters": counts,
        "stored_dtypes": model.weights.stored_dtypes,
        "files": {f.name: {"bytes": f.stat().st_size, **({"sha256": hashes[f.name]} if hashes else {})} for f in files},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kinds = "".join("G" if t == GLOBAL else "S" for t in cfg.layer_types)
    print(f"{path}")
    print(
        f"  layers {cfg.num_hidden_layers}  hidden D={cfg.hidden_size}  ffw F={cfg.intermediate_size} "
        f"(paper's feed-forward dim 2F={2 * cfg.intermediate_size})  vocab V={cfg.vocab_size}"
    )
    print(
        f"  heads H={cfg.num_attention_heads} query / K={cfg.num_key_value_heads} kv "
        f"(each kv head serves {cfg.num_queries_per_kv})  head_dim {cfg.head_dim}  "
        f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g}"
    )
    print(f"  layer kinds (S = sliding window {cfg.sliding_window}, G = global): {kinds}")
    print(
        f"  soft-caps: attention {cfg.attn_logit_softcapping}, final {cfg.final_logit_softcapping};  "
        f"rope theta {cfg.rope_theta:g};  rms eps {cfg.rms_norm_eps:g};  context {cfg.max_position_embeddings}"
    )
    print(
        f"  parameters: {counts['total']:,} = embedding {counts['embedding']:,} (tied) + "
        f"non-embedding {counts['non_embedding']:,}"
    )
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
    ids, tok = prompt_ids(args, model)
    if tok is None and (model.path / "tokenizer.model").is_file():
        tok = g2.load_tokenizer(model.path)
    t0 = time.perf_counter()
    progress = layer_progress() if model.is_large and not args.json else None
    logits = model.forward(ids, logits_at="last", progress=progress)["logits"][-1].astype(np.float64)
    seconds = time.perf_counter() - t0
    probs = softmax(logits)
    top = np.argsort(-probs, kind="stable")[: args.top_k]
    rows = [
        {"id": int(t), "piece": tok.pieces([t])[0] if tok else None, "prob": float(probs[t]), "logit": float(logits[t])}
        for t in top
    ]
    if args.json:
        print(json.dumps({"ids": ids, "top": rows, "seconds": seconds}, indent=2))
        return 0
    text = tok.decode(ids, skip_special=False) if tok else " ".join(map(str, ids))
    print(f"prompt ({len(ids)} tokens): {text!r}")
    print(f"next token, top {len(rows)} (forward {seconds * 1000:.0f} ms, {len(ids) / seconds:.0f} tokens/s):")
    for r in rows:
        print(f"  {r['prob']:8.4f}  {r['id']:6d}  {r['piece']!r:20}  logit {r['logit']:+.3f}")
    return 0


def warn_if_not_instruction_tuned(name: str) -> None:
    """--chat on a bundled base model (tiny, tiny-teacher): it never saw a chat turn, so it will not end one."""
    if g2.bundled_path(name) is None or name.endswith("-it"):
        return
    chat_model = f" Use {name}-it, its instruction-tuned version." if g2.bundled_path(f"{name}-it") else ""
    eprint(
        f"warning: {name} is not instruction-tuned: it was trained on plain text and does not end a chat "
        f"turn (it runs until --max-new-tokens).{chat_model}"
    )


def generate(args) -> int:
    from ..model.generate import TextStream, generate

    model = load_model_verbose(args.model, args.dtype, keep_converted=False if args.stream_weights else "auto")
    ids, tok = prompt_ids(args, model)
    if args.chat:
        warn_if_not_instruction_tuned(args.model)
    if tok is None and (model.path / "tokenizer.model").is_file():
        tok = g2.load_tokenizer(model.path)
    stop_ids = tok.stop_ids if tok is not None else model.config.eos_token_ids
    stream = TextStream(tok, prefix=ids) if tok is not None else None
    prompt = [tok.decode(ids) if tok is not None and not args.chat else ""]  # printed with the first token

    def on_token(token: int) -> None:
        text = prompt.pop() if prompt else ""
        if token not in stop_ids:
            text += stream.push(token) if stream is not None else f"{token} "
        print(text, end="", flush=True)

    progress = layer_progress("prefill layers") if model.is_large else None
    result = generate(
        model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_ids=stop_ids,
        on_token=on_token,
        progress=progress,
    )
    print((prompt.pop() if prompt else "") + (stream.flush() if stream is not None else ""), flush=True)
    if args.show_ids:
        print("prompt ids:", " ".join(map(str, ids)))
        print("new ids:   ", " ".join(map(str, result.tokens)))
    reason = {"stop": "stop token", "max_new_tokens": "--max-new-tokens reached", "context": "context length reached"}[
        result.stop_reason
    ]
    eprint(f"{result.summary()}; stopped: {reason}")
    kept, layers = model.weights.kept_layers, model.config.num_hidden_layers
    if not args.stream_weights and kept < layers:
        resident = getattr(model.weights, "resident_layers", 0)
        if kept == resident == 0:
            eprint(
                f"every layer streamed from the checkpoint's files at every step: its {layers} layers do not "
                f"all fit in 3/4 of the available RAM (--stream-weights would do the same)"
            )
        else:
            eprint(
                f"kept {kept} of {layers} layers converted and {resident} as stored bytes in memory (3/4 of "
                f"the available RAM); {layers - kept} were converted again at every step, "
                f"{layers - kept - resident} of them read from the checkpoint's files"
            )
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
        raise FileNotFoundError(
            f"{BENCH_SCRIPT} is not here: the benchmark lives in the source repository "
            f"(benchmarks/bench.py); run it from a clone"
        )
    return bench.run(args)


def taps_arg(taps: str):
    return taps if taps in ("default", "all", "residual") else [t.strip() for t in taps.split(",") if t.strip()]


def golden(args) -> int:
    from ..verify import golden

    out = golden.check_output(args.out, args.force)  # before any work: new, empty, or --force over our golden
    with golden.output_lock(out):  # one writer per --out: a second is refused while this one lives
        golden.check_output(out, args.force)  # again, now that no other writer can change it
        return write_golden(args, out)


def write_golden(args, out) -> int:
    from ..adapters import load_adapter
    from ..model.taps import select_taps
    from ..verify import golden, suites

    for left in golden.interrupted_writes(out):
        size = sum(f.stat().st_size for f in left.rglob("*") if f.is_file())
        eprint(
            f"note: {left} ({size / 2**20:.1f} MiB) was left by an interrupted run (never a golden); delete it "
            f"to take the space back"
        )
    taps = taps_arg(args.taps)
    ours = args.backend == "gemma2_ref"
    if ours and args.dtype not in g2.COMPUTE_DTYPES:
        raise InputError(
            f"--dtype {args.dtype}: gemma2_ref computes in {' or '.join(g2.COMPUTE_DTYPES)}; "
            f"bfloat16 and float16 are for another backend (--backend transformers)"
        )
    if getattr(args, "gguf", None) and args.backend != "llama.cpp":
        raise InputError(f"--gguf is for --backend llama.cpp (the backend here is {args.backend})")
    for flag in ("flash_attention", "fix_query_scale"):
        if getattr(args, flag, False) and args.backend != "keras-hub":
            raise InputError(
                f"--{flag.replace('_', '-')} is for --backend keras-hub (the backend here is {args.backend})"
            )
    if getattr(args, "recipe", None) and args.backend != "executorch":
        raise InputError(f"--recipe is for --backend executorch (the backend here is {args.backend})")
    model = load_model_verbose(args.model, args.dtype if ours else "float32")
    try:
        select_taps(model.config, taps)
    except ValueError as e:
        raise InputError(f"--taps: {e}") from None
    write = None
    if not ours:
        adapter = load_adapter(args.backend)
        options = adapter.backend_options(model.path, args)

        def write(ids, case_dir, text, description, case_taps=taps, positions=None, **padding):
            refusal = adapter.CAPABILITIES.refusal(args.backend, padding)
            if refusal:
                raise NotImplementedError(refusal)
            adapter.write_golden(
                model.path,
                ids,
                case_dir,
                dtype=args.dtype,
                taps=case_taps,
                text=text,
                description=description,
                positions=positions,
                **padding,
                **options,
            )

    if args.suite:
        tok = g2.load_tokenizer(model.path)
        eprint(f"writing suite {args.suite} to {out}")
        with golden.atomic_directory(out) as tmp:  # cases, then suite.json, then the rename: all or nothing
            suites.generate_suite(model, tok, tmp, args.suite, taps, model_name=args.model, log=eprint, write=write)
        print(args.out)
        return 0
    ids, tok = prompt_ids(args, model)
    text = None if args.tokens is not None else (tok.chat_prompt(args.prompt) if args.chat else args.prompt)
    positions = check_position_range(args.positions, len(ids)) if args.positions else None
    if write is None:
        check_budget(model, taps, ids, positions, out)
    with golden.atomic_directory(out) as tmp:
        if write is not None:
            write(np.asarray(ids), tmp, text, None, taps, positions)
        else:
            progress = layer_progress() if model.is_large else None
            info = golden.model_info(model, args.model, progress=True)
            suites.generate_case(
                model, np.asarray(ids), tmp, taps=taps, text=text, info=info, progress=progress, positions=positions
            )
    print(args.out)
    return 0


def check_budget(model, taps, ids, positions, out) -> None:
    """Refuse, before any work, a case that cannot fit in the RAM available now or on the disk, with the
    numbers and the options that would fit (suites.budget_refusal); for a large model, say the estimate."""
    import shutil

    from ..storage.loader import available_memory
    from ..verify.suites import budget_refusal, case_budget, size_text

    cfg, itemsize = model.config, model.dtype.itemsize
    rows = None if positions is None else positions[1] - positions[0]
    memory = available_memory()
    parent = next(p for p in [Path(out).resolve(), *Path(out).resolve().parents] if p.exists())
    usage = shutil.disk_usage(parent)
    free = usage.free if usage.total else float("inf")  # a pseudo file system (/proc): its own error will say
    if model.is_large:
        need = case_budget(cfg, taps, ids, rows, itemsize)
        eprint(
            f"estimate: {size_text(need['memory'])} of memory (taps streamed to disk), {size_text(need['disk'])} "
            f"on disk; available {size_text(memory) if memory else 'unknown'}, {size_text(free)} free"
        )
    refusal = budget_refusal(cfg, taps, ids, rows, itemsize, memory, free)
    if refusal:
        raise InputError(refusal)


def profile_for(args, candidate, reference=None):
    """The tolerance profile the options ask for; "measured" is a function of each reference case."""
    from ..verify.compare import auto_profile, get_profile

    if args.profile == "measured":
        from ..verify.diagnose import load_reference_model
        from ..verify.measured import DTYPE_OF_PROFILE, measured_profile

        dtype = DTYPE_OF_PROFILE.get(auto_profile(candidate))
        if dtype is None:
            raise ValueError(
                f"--profile measured needs a bfloat16 or float16 candidate; {candidate.path} says its "
                f"compute dtype is {candidate.compute_dtype!r}"
            )
        model = load_reference_model(first_case(reference), getattr(args, "model", None), log=eprint)
        return lambda case: measured_profile(model, case, dtype)
    name = auto_profile(candidate) if args.profile == "auto" else args.profile
    return get_profile(name, rel_l2=args.rtol, max_rel=args.atol, kl=args.kl, top1=args.top1, top5=args.top5)


def name_map(rules):
    """--name-map: rules THEIR=CANONICAL (repeatable), or one JSON file {their: canonical}."""
    files = [r for r in rules or [] if "=" not in r]
    if not files:
        return rules or None
    path = Path(files[0])
    if len(rules) > 1 or not path.is_file():
        raise InputError(
            f"--name-map {files[0]!r}: "
            + ("no such file" if not path.is_file() else "a file cannot be combined with rules")
            + "; give rules THEIR=CANONICAL (repeatable) or one JSON file "
            "{their: canonical}"
        )
    try:
        mapping = read_json(path)
    except JSONFileError as e:
        raise InputError(f"--name-map {e}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise InputError(f"--name-map {path}: expected a JSON object {{their name: canonical name}}")
    return mapping


def model_option(args):
    """--model for the diagnosis, resolved now: a wrong path is the user's, not the reference's."""
    if args.model is None:
        return None
    try:
        return g2.resolve_checkpoint(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--model: {e}") from None


def first_case(golden_obj):
    from ..verify.golden import Suite

    return golden_obj.cases[0] if isinstance(golden_obj, Suite) else golden_obj


def compare(args) -> int:
    from ..verify import compare as C
    from ..verify import diagnose as D
    from ..verify.corpus import is_corpus_golden
    from ..verify.golden import load_golden

    if args.plot:  # before any work: the figure is drawn last
        from ..verify.optional import require

        require("matplotlib", "--plot")
    if args.explain_out is not None and args.explain is None:
        raise InputError("--explain-out goes with --explain N")
    if is_corpus_golden(args.reference):
        return compare_corpus(args)
    if args.explain is not None:
        raise InputError(f"--explain is for corpus goldens; {args.reference} is a golden case or suite")
    model = model_option(args)
    ref = load_golden(args.reference, reference=True)
    cand = load_golden(args.candidate, name_map=name_map(args.name_map))
    profile = profile_for(args, first_case(cand), ref)
    results, diagnoses, skipped = D.compare_and_diagnose(ref, cand, profile, args.diagnose, model, log=eprint)
    if skipped:
        eprint(
            f"({skipped}: run `gemma2-ref diagnose {args.reference} {args.candidate}` or pass --diagnose)"
            if "large" in skipped
            else f"({skipped})"
        )
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
            print("\n" + suite_verdict(results))
    if args.plot:
        from ..verify.plot import plot_comparisons

        for path in plot_comparisons(results, args.plot):
            eprint(f"plot: {path}")
    return 0 if all(r.passed or r.not_checked for r in results) else 1


def suite_verdict(results) -> str:
    """suite: N of M checked cases pass; failing: ...; not checked (the candidate's backend cannot run them): ..."""
    checked = [r for r in results if not r.not_checked]
    failing = [Path(r.reference).name for r in checked if not r.passed]
    unchecked = [Path(r.reference).name for r in results if r.not_checked]
    return (
        f"suite: {len(checked) - len(failing)} of {len(checked)} {'checked ' if unchecked else ''}cases pass"
        + (f"; failing: {', '.join(failing)}" if failing else "")
        + (
            f"; not checked ({len(unchecked)}, the candidate's backend cannot run them): {', '.join(unchecked)}"
            if unchecked
            else ""
        )
    )


def corpus(args) -> int:
    """`gemma2-ref corpus`: a reference corpus golden, or a candidate backend's against --reference."""
    from ..verify.corpus import write_corpus

    executor = corpus_executor(args)
    candidate = args.backend is not None or args.reference is not None
    if candidate and (args.backend is None or args.reference is None):
        raise InputError("a candidate needs both --backend NAME and --reference REF (the reference corpus golden)")
    if args.mistake is not None and args.backend != "gemma2-ref":
        raise InputError("--mistake goes with --backend gemma2-ref (a known mistake injected into the reference)")
    if args.gguf is not None and args.backend != "llama.cpp":
        raise InputError("--gguf goes with --backend llama.cpp")
    if candidate:
        if args.top_k is not None:
            raise InputError("--top-k cannot go with --reference: the ids scored are the reference's")
        write_corpus(
            args.model,
            args.out,
            backend=candidate_backend(args),
            reference=args.reference,
            shard_chunks=args.shard_chunks,
            text=args.text,
            tokens=args.tokens,
            ctx=args.ctx,
            chunks=args.chunks,
            kld_out=args.kld_out,
            executor=executor,
        )
    else:
        write_corpus(
            args.model,
            args.out,
            text=args.text,
            tokens=args.tokens,
            ctx=args.ctx,
            chunks=args.chunks,
            top_k=args.top_k,
            dtype=args.dtype or "float32",
            kld_out=args.kld_out,
            shard_chunks=args.shard_chunks,
            executor=executor,
        )
    print(args.out)  # as `golden` does: the directory written, on stdout
    return 0


def corpus_executor(args):
    """None (the shards here, one after another) for --workers 1; else the Ray executor (verify/corpus_ray.py),
    Ray's presence checked before any work."""
    if (args.workers or 1) == 1 and args.ray_address is None:
        if args.blas_threads is not None:
            raise InputError(
                "--blas-threads is for Ray workers (--workers 2 or more, or --ray-address); this process "
                "uses NumPy's BLAS as configured: set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS instead"
            )
        return None
    from ..verify.corpus_ray import RayExecutor, check_reachable, import_ray

    import_ray("--ray-address" if args.ray_address else f"--workers {args.workers}")
    if args.ray_address is not None:
        check_reachable(args.ray_address)
    return RayExecutor(workers=args.workers, address=args.ray_address, blas_threads=args.blas_threads or 1)


def candidate_backend(args) -> dict:
    """The candidate's backend record: the adapter module that runs it, its dtype, its GGUF, its versions."""
    from ..adapters import BACKENDS, load_adapter

    if args.backend == "gemma2-ref":
        from ..verify.corpus import REFERENCE_BACKEND

        return {"name": REFERENCE_BACKEND, "dtype": args.dtype or "float32", "mistake": args.mistake}
    record = load_adapter(args.backend).corpus_backend(args.model, args.dtype, gguf=args.gguf)
    return {"name": args.backend, "adapter": BACKENDS[args.backend], **record}


def compare_corpus(args) -> int:
    """`gemma2-ref compare REF CAND` on corpus goldens (CAND may be a llama.cpp base file)."""
    from ..verify.corpus import load_corpus
    from ..verify.kld import compare_corpus as run_compare
    from ..verify.kld import format_report, to_json

    ref = load_corpus(args.reference)
    limits = {
        k: v for k, v in (("kld_mean", args.kl), ("kld_p99", args.kld_p99), ("same_top1", args.top1)) if v is not None
    }
    tok = None
    with contextlib.suppress(Exception):  # the worst positions' text, when the reference's tokenizer is here
        from ..storage.loader import resolve_checkpoint

        m = ref.manifest["model"]
        tok = g2.load_tokenizer(resolve_checkpoint(m["name"] if m.get("bundled") else m["path"]))
    result = run_compare(ref, args.candidate, limits, tokenizer=tok)
    explained = explain_chunks(args, ref, result) if args.explain else None
    if args.json:
        body = json.loads(to_json(result))
        if explained is not None:
            from ..verify.corpus_explain import public

            body["explain"] = public(explained)
        from ..verify.compare import json_safe

        print(json.dumps(json_safe(body), indent=1))
    else:
        print(format_report(result))
        for e in explained or []:
            from ..verify.corpus_explain import format_explanation

            print("\n" + format_explanation(e, result.chunks[e["chunk"]]["kld_mean"]))
    if args.plot:
        from ..verify.plot import plot_corpus

        eprint(f"plot: {plot_corpus(result, args.plot)}")
    return 0 if result.passed else 1


def explain_chunks(args, ref, result) -> list[dict]:
    """`compare REF CAND --explain N`: the N worst chunks re-run tap by tap (verify/corpus_explain.py)."""
    from ..verify.compare import get_profile
    from ..verify.corpus_explain import explain_corpus

    if args.profile == "measured":
        raise InputError("--explain takes a fixed --profile (auto: from the candidate's dtype), not measured")
    profile = None if args.profile == "auto" else get_profile(args.profile, rel_l2=args.rtol, max_rel=args.atol)
    eprint(f"explain: re-running the {args.explain} chunk(s) of largest mean KLD tap by tap")
    return explain_corpus(
        ref,
        args.candidate,
        result.chunks,
        args.explain,
        model=model_option(args),
        out=args.explain_out,
        profile=profile,
        diagnose=args.diagnose,
        log=eprint,
    )


def check_config(args) -> int:
    from ..verify.check_config import check

    report = check(args.reference, args.candidate)
    if report.error:  # an unreadable input is an error: on stderr, one line (--json still gets its document)
        eprint(f"gemma2-ref check-config: error: {report.error}")
    if args.json or not report.error:
        print(report.to_json() if args.json else report.format())
    return report.exit_code


def exercise_check(args) -> int:
    from ..verify.exercise import main_check

    return main_check(args.file, args.only)


def check_tokenizer(args) -> int:
    from ..verify import tokenizer_check as T

    if args.texts:
        print(json.dumps(list(T.TEXTS), ensure_ascii=False, indent=1))
        return 0
    if not args.candidate:
        raise InputError("check-tokenizer needs CANDIDATE.json (or --texts to print the texts to tokenize)")
    report = T.check_tokenizer(g2.load_tokenizer(args.model), T.read_candidate(args.candidate))
    print(json.dumps(report.to_dict(), ensure_ascii=False) if args.json else report.format())
    return 0 if report.passed else 1


def diagnose(args) -> int:
    from ..verify import compare as C
    from ..verify import diagnose as D
    from ..verify.golden import case_pairs, load_golden
    from ..verify.mistakes import known_mistakes

    model_path = model_option(args)
    ref = load_golden(args.reference, reference=True)
    cand = load_golden(args.candidate, name_map=name_map(args.name_map))
    pairs = case_pairs(ref, cand)
    profile = profile_for(args, first_case(cand), ref)
    model = D.load_reference_model(pairs[0][0], model_path, log=eprint)
    out, explained = [], True
    for r, c, skipped in pairs:
        if c is None and skipped is not None:
            eprint(f"case {r.name}: not checked: the candidate has no `{r.name}` case ({skipped})")
            continue
        if c is None:
            eprint(f"case {r.name}: missing from the candidate suite")
            explained = False
            continue
        eprint(f"case {r.name}: re-running {len(known_mistakes(model.config))} variants")
        case_profile = profile if isinstance(profile, C.Profile) else profile(r)
        diag = D.diagnose(model, r, c, case_profile, log=eprint if model.is_large else None)
        explained &= diag.base.passed or bool(diag.named)
        out.append((r, diag))
    if args.json:
        print(json.dumps(C.json_safe({"cases": [{"reference": str(r.path), **d.to_dict()} for r, d in out]}), indent=1))
    else:
        for r, diag in out:
            first = diag.base.first_divergence
            print(
                f"{r.path}: {'PASS' if diag.base.passed else 'FAIL'}"
                + (f", first diverging tap {first.name}" if first else "")
            )
            print(D.format_diagnosis(diag))
    return 0 if explained else 1

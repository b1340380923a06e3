"""`gemma2-ref`: command-line access to the functions of gemma2_ref, and nothing else.

Each subcommand is one `add_<name>(subparsers)` function that registers its arguments and a handler.
MODEL is a checkpoint directory (Hugging Face layout) or the name of a bundled model ("tiny").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import gemma2_ref as g2

from ..adapters import BACKENDS
from ..model.config import ConfigError
from ..model.tokenizer import TokenizerError
from ..storage.weights import WeightsError
from ..verify.optional import MissingDependency, missing
from . import commands
from .commands import BENCH_SCRIPT, eprint
from .options import (
    COUNT,
    FRACTION,
    NONNEGATIVE,
    PROBABILITY,
    SEED,
    Parser,
    UsageError,
    conflict,
    position_range,
    tap_set,
    utf8_text,
)


def add_model_and_prompt(p, chat_help: str = "wrap the prompt in the Gemma chat template as a user turn"):
    """MODEL, then the input: --prompt TEXT or --tokens IDS, with --chat / --no-bos. Returns the
    --prompt/--tokens group, for a subcommand that offers one more source of input."""
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", type=utf8_text, help="text to encode with the model's tokenizer")
    src.add_argument("--tokens", help="token ids instead of text, e.g. '2 651 1234'")
    p.add_argument("--chat", action="store_true", help=chat_help)
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> to --prompt (Gemma expects one)")
    return src


# -- info -------------------------------------------------------------------------------------------------


def add_info(sub):
    p = sub.add_parser(
        "info",
        help="config, parameter counts, layer kinds, files and their sha256",
        description="Describe a checkpoint: its config, parameter counts, the kind of each "
        "layer, its files and their sha256 (hashing large files takes a while).",
    )
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of the files")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=commands.info)


# -- tokenize ---------------------------------------------------------------------------------------------


def add_tokenize(sub):
    p = sub.add_parser(
        "tokenize",
        help="show the token ids and pieces of a text",
        description="Encode TEXT with the model's tokenizer.model and show ids and pieces.",
    )
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    p.add_argument("text", type=utf8_text)
    p.add_argument("--no-bos", action="store_true", help="do not start with <bos> (Gemma expects one)")
    p.add_argument("--chat", action="store_true", help="wrap TEXT in the Gemma chat template as a user turn")
    p.add_argument("--json", action="store_true", help="print the ids as a JSON list only")
    p.set_defaults(handler=commands.tokenize)


# -- run --------------------------------------------------------------------------------------------------


def add_run(sub):
    p = sub.add_parser(
        "run",
        help="one forward pass: the next-token distribution's top-k",
        description="Run the forward pass on a prompt and print the most likely next tokens "
        "with their probabilities (softmax of the soft-capped logits).",
    )
    add_model_and_prompt(p)
    p.add_argument("--top-k", type=COUNT, default=10, help="how many candidates to show (default 10)")
    p.add_argument("--dtype", choices=g2.COMPUTE_DTYPES, default="float32", help="compute dtype")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=commands.run)


# -- generate ---------------------------------------------------------------------------------------------


def add_generate(sub):
    p = sub.add_parser(
        "generate",
        help="generate text: prefill, then token-by-token decode with a KV cache",
        description="Continue a prompt token by token (greedy unless --temperature > 0), "
        "printing text as it is produced. Stops on <eos> or <end_of_turn>. "
        "Prefill and decode speed and the KV cache size are reported on stderr. "
        "Layers are kept in memory within 3/4 of the available RAM (their bf16 "
        "bytes first, then converted ones), so a decode step need not read the "
        "checkpoint again; a checkpoint whose layers do not all fit (9B, 27B in "
        "24 GiB) is streamed, its layers converted from the files (and the OS "
        "page cache) at every step. --stream-weights always streams (least "
        "memory).",
    )
    add_model_and_prompt(
        p, chat_help="wrap the prompt in the Gemma chat template as a user turn, then generate the model turn"
    )
    p.add_argument("--max-new-tokens", type=COUNT, default=64, help="at most this many new tokens (default 64)")
    p.add_argument(
        "--temperature", type=NONNEGATIVE, default=0.0, help="sampling temperature; 0 (default) is greedy decoding"
    )
    p.add_argument("--top-k", type=COUNT, default=None, help="sample only among the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=PROBABILITY,
        default=None,
        help="nucleus sampling: the smallest set of tokens whose probability reaches p",
    )
    p.add_argument("--seed", type=SEED, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--dtype", choices=g2.COMPUTE_DTYPES, default="float32", help="compute dtype")
    p.add_argument("--show-ids", action="store_true", help="also print the generated token ids")
    p.add_argument(
        "--stream-weights",
        action="store_true",
        help="convert each layer's weights on every forward instead of keeping them converted",
    )
    p.set_defaults(handler=commands.generate)


# -- bench ------------------------------------------------------------------------------------------------


def add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="speed and memory: NumPy vs transformers eager fp32 on 2B-shaped weights",
        description="Build (once, cached) random bf16 checkpoints with the real 2B shapes, then "
        "measure NumPy against transformers eager float32 on the same weights and "
        "inputs, interleaved: prefill and decode tokens/s, load time, and the peak "
        "resident memory of the full 26-layer model. Writes JSON and Markdown. "
        f"Runs {BENCH_SCRIPT.relative_to(BENCH_SCRIPT.parents[1])} of a source "
        "checkout (it needs torch and transformers).",
    )
    bench = commands.bench_module()
    if bench is not None:
        bench.add_arguments(p)
    p.set_defaults(handler=lambda args: commands.bench(args, bench))


# -- golden / compare / diagnose ----------------------------------------------------------------------------


def add_golden(sub):
    p = sub.add_parser(
        "golden",
        help="write golden activations (a case, or the coverage suite)",
        description="Run MODEL on a prompt, token ids or a whole suite and write golden cases: "
        "activations.safetensors (canonical tap names) + manifest.json (sha256 of the "
        "weights, tokenizer and every tensor, stats, producer version and commit). "
        "The same inputs give bit-identical tensors. Regenerate the repository's "
        "suite with: gemma2-ref golden tiny --suite coverage --taps all --out golden/ "
        "--force",
    )
    src = add_model_and_prompt(p)
    from ..verify.suites import SUITES, suite_case_names

    src.add_argument(
        "--suite",
        choices=list(SUITES),
        help="coverage: the cases " + ", ".join(suite_case_names("coverage")) + " (window: positions "
        "W-1, W, W+1 of the sliding window W; see gemma2_ref/verify/suites.py)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory (a case, or a suite of case directories); it must not exist or be empty, unless --force",
    )
    p.add_argument("--force", action="store_true", help="replace a golden case or suite already at --out")
    p.add_argument(
        "--taps",
        default="default",
        type=tap_set,
        help="tap set: default (all but attention scores/probs), all, residual, or comma-separated "
        "names / globs such as 'embed,layers.*.output,logits' (default: default)",
    )
    p.add_argument(
        "--positions",
        metavar="START:STOP",
        type=position_range,
        help="store only these query positions of every tap (long prompts of big models), e.g. "
        "4094:4098; the suite does this by itself for cases over 256 MiB",
    )
    p.add_argument(
        "--backend",
        choices=["gemma2_ref", *BACKENDS],
        default="gemma2_ref",
        help="who computes the activations: gemma2_ref (the reference, default) or another backend "
        "through its adapter in gemma2_ref/adapters/ (a candidate)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="compute dtype: float32 or float64 for gemma2_ref; float32, bfloat16 or float16 for "
        "transformers, mlx, jax-gemma and keras-hub; float32 or bfloat16 for vllm; for llama.cpp "
        "the GGUF type f32, bf16, f16 or q8_0 (default float32 = f32); for onnxruntime-genai the "
        "builder's CPU precision float32, int8 or int4; for executorch the export's float32, float16 or "
        "bfloat16",
    )
    p.add_argument(
        "--gguf",
        metavar="FILE",
        help="llama.cpp: run this GGUF (its file type decides the compute dtype) instead of converting "
        "MODEL with llama.cpp's convert_hf_to_gguf.py",
    )
    p.add_argument(
        "--attn-implementation",
        default="eager",
        help="transformers attention implementation (eager, sdpa, ...; default eager)",
    )
    p.add_argument(
        "--flash-attention",
        action="store_true",
        help="keras-hub: force its fused attention branch (keras.ops.dot_product_attention), which it "
        "takes on TPU / GPU only; on CPU Keras refuses it for a model with attention soft-cap",
    )
    p.add_argument(
        "--fix-query-scale",
        action="store_true",
        help="keras-hub: hand each attention layer the query scale its decoder block drops "
        "(gemma_decoder_block.py:68), to check that line is the whole difference",
    )
    p.add_argument(
        "--recipe",
        choices=["xnnpack", "portable"],
        help="executorch: optimum-executorch's export recipe, xnnpack (default: the XNNPACK delegate) or "
        "portable (ExecuTorch's portable kernels, no delegate)",
    )
    p.set_defaults(handler=commands.golden)


def _add_profile_args(p):
    from ..verify.compare import PROFILES

    p.add_argument(
        "--profile",
        default="auto",
        choices=["auto", "measured", *PROFILES],
        help="tolerance profile (default auto: from the candidate's compute dtype, bfloat16 -> bf16, "
        "float16 -> fp16, else fp32). measured: each tap's limit a multiple of the error of the "
        "reference re-run with the candidate's bfloat16 / float16 rounding (needs the model)",
    )
    p.add_argument("--rtol", type=NONNEGATIVE, help="override: max relative L2 error per tap")
    p.add_argument(
        "--atol", type=NONNEGATIVE, help="override: max abs error per tap, as a fraction of the tap's absmax"
    )
    p.add_argument("--kl", type=NONNEGATIVE, help="override: max per-token KL divergence of the logits (nats)")
    p.add_argument("--top1", type=FRACTION, help="override: min top-1 agreement of the logits (fraction)")
    p.add_argument("--top5", type=FRACTION, help="override: min top-5 overlap of the logits (fraction)")
    p.add_argument(
        "--name-map",
        action="append",
        metavar="RULE_OR_JSON",
        help="rename the candidate's tensors: THEIR=CANONICAL ({i} = layer number, trailing * = "
        "prefix), repeatable, or a JSON file {their: canonical}; e.g. 'blk.{i}.attn_norm="
        "layers.{i}.pre_attn_norm' or 'model.*=*'",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def add_compare(sub):
    from ..verify.compare import profile_help

    p = sub.add_parser(
        "compare",
        help="compare a candidate's activations with a golden: first divergence",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare CANDIDATE with REFERENCE tap by tap in execution order: relative L2 "
        "error, max abs error (relative to the tap's absmax) and its index, cosine; "
        "for logits per-token KL, top-1 and top-5 agreement. Reports the first "
        "diverging tap and a per-layer table; exit code 1 on failure. A candidate "
        "may hold only some taps. Suites are compared case by case. On failure, a "
        "diagnosis re-runs the reference model with each known mistake (automatic "
        "for small models; --diagnose to force, or use `gemma2-ref diagnose`).",
        epilog="profiles (thresholds and the measurements behind them):\n" + profile_help(),
    )
    p.add_argument("reference", help="golden case or suite directory (written by `gemma2-ref golden`)")
    p.add_argument("candidate", help="candidate case or suite directory, or a bare .safetensors of activations")
    _add_profile_args(p)
    p.add_argument("--all-taps", action="store_true", help="print every tap's metrics, not just the layer table")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw each tap's error along the depth (log scale), the "
        "profile's limits and the first divergence; a suite: FILE-<case>.png per case (needs "
        "matplotlib: pip install 'gemma2-ref[plot]')",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--diagnose",
        dest="diagnose",
        action="store_true",
        default=None,
        help="on failure, always run the diagnosis (re-runs the model ~15 times)",
    )
    when.add_argument("--no-diagnose", dest="diagnose", action="store_false", help="never run the diagnosis")
    p.add_argument("--model", help="checkpoint for the diagnosis (default: the one the reference manifest names)")
    p.add_argument(
        "--explain",
        type=COUNT,
        metavar="N",
        help="corpus goldens: for the N chunks of largest mean KLD, a per-tap golden case of the chunk through "
        "the candidate's backend and the reference's, compared and diagnosed: in which layer and tap the error "
        "grows (CAND a candidate corpus golden; --model if the reference's checkpoint moved)",
    )
    p.add_argument("--explain-out", metavar="DIR", help="--explain: keep the chunks' golden cases in DIR")
    p.add_argument(
        "--kld-p99",
        type=NONNEGATIVE,
        help="corpus goldens: max 99th percentile of the KLD (nats); "
        "--kl is the max mean KLD, --top1 the min same-top-1 fraction",
    )
    p.set_defaults(handler=commands.compare)


def add_corpus(sub):
    from ..verify.corpus import DEFAULT_SHARD_CHUNKS, DEFAULT_TOP_K

    p = sub.add_parser(
        "corpus",
        help="reference (or a backend's) next-token distributions over a corpus, as "
        "llama-perplexity chunks and scores it",
        description="Write a corpus golden: the corpus in chunks of --ctx tokens, each chunk's first "
        "token replaced by <bos>, its second half scored (llama-perplexity's "
        "convention); per scored position the top-k ids and log-probs, the exact "
        "log-sum-exp and the next token's log-prob, in shards written atomically, a "
        "manifest last. The same command after an interruption resumes. With --backend "
        "and --reference: a candidate on the reference's corpus, for `gemma2-ref compare "
        "REF CAND`. See docs/corpus.md.",
    )
    p.add_argument("model", help="checkpoint directory or bundled model name (tiny)")
    p.add_argument(
        "--out",
        required=True,
        help="the corpus golden directory (created; resumed if it holds a partial one of the same command)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--text",
        help="a UTF-8 text file, tokenized with the model's tokenizer, <bos> first "
        "(default: the bundled held-out text of the tiny models' corpus)",
    )
    src.add_argument("--tokens", help="a file of token ids: whitespace-separated integers or a 1-D .npy")
    p.add_argument(
        "--ctx",
        type=COUNT,
        help="tokens per chunk (llama-perplexity's -c; even; default 512 or the model's context if smaller)",
    )
    p.add_argument("--chunks", type=COUNT, help="use only the first N chunks (llama-perplexity's --chunks)")
    p.add_argument(
        "--top-k",
        default=None,
        metavar="K|all",
        help=f"ids stored per scored position (default {DEFAULT_TOP_K}, or the vocabulary if smaller; 'all': "
        "the whole distribution)",
    )
    p.add_argument(
        "--kld-out",
        metavar="FILE",
        help="also write llama.cpp's KL-divergence base file (for "
        "`llama-perplexity --kl-divergence-base FILE --kl-divergence`)",
    )
    p.add_argument(
        "--dtype",
        help="compute dtype: float32 (default) / float64 for gemma2-ref; float32 / bfloat16 "
        "for transformers; f32 / bf16 / f16 / q8_0 / q4_0 for llama.cpp (a GGUF converted "
        "and quantized with llama.cpp's own tools)",
    )
    p.add_argument(
        "--backend",
        choices=["gemma2-ref", "transformers", "llama.cpp"],
        help="a candidate backend (needs --reference); gemma2-ref with --mistake shows a known mistake",
    )
    p.add_argument("--gguf", help="llama.cpp: this GGUF instead of converting MODEL")
    p.add_argument(
        "--reference",
        metavar="REF",
        help="the reference corpus golden: the corpus, chunking and ids to score come from it",
    )
    p.add_argument("--mistake", help="--backend gemma2-ref: inject this known mistake (gemma2-ref diagnose's names)")
    p.add_argument(
        "--shard-chunks",
        type=COUNT,
        default=DEFAULT_SHARD_CHUNKS,
        help=f"chunks per shard (default {DEFAULT_SHARD_CHUNKS})",
    )
    p.add_argument(
        "--workers",
        type=COUNT,
        help="Ray workers computing shards in parallel on a local cluster of this "
        "machine (bound to 127.0.0.1); with --ray-address, workers to start "
        "there (default: the cluster's CPUs / --blas-threads). Default 1: "
        "here, without Ray. Needs `pip install 'gemma2-ref[ray]'`",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (`ray start --head` printed it; every node sees MODEL and --out at the same paths)",
    )
    p.add_argument(
        "--blas-threads",
        type=COUNT,
        help="BLAS threads of each Ray worker (default 1); a shard's bytes depend on it, not on the number of workers",
    )
    p.set_defaults(handler=commands.corpus)


def add_diagnose(sub):
    p = sub.add_parser(
        "diagnose",
        help="which known Gemma 2 mistake does a failing candidate look like?",
        description="Re-run the reference golden's model (verified against the manifest's weight "
        "sha256s; or --model) with each known mistake injected (attention / final "
        "soft-cap dropped, sliding window missing or off by one, wrong query scale, "
        "normalizer rounding, RMSNorm (1 + w) offset, a post-norm skipped, exact GELU, "
        "missing or doubled <bos>, RoPE and GQA layouts; on a decode case the KV-cache "
        "loop's mistakes: see README) and name the variants that match the candidate far better than the "
        "correct model does, with the evidence. Exit code 0 when the candidate passes "
        "or a mistake is named, 1 when it fails unexplained.",
    )
    p.add_argument("reference", help="golden case or suite directory")
    p.add_argument("candidate", help="candidate case or suite directory, or a bare .safetensors of activations")
    p.add_argument("--model", help="checkpoint directory (default: the one the reference manifest names)")
    _add_profile_args(p)
    p.set_defaults(handler=commands.diagnose)


# -- main -------------------------------------------------------------------------------------------------


def add_check_config(sub):
    p = sub.add_parser(
        "check-config",
        help="a GGUF's or config.json's hyper-parameters against the reference",
        description="Compare CANDIDATE (a GGUF, read with gguf-py, or another framework's "
        "config.json) with REFERENCE (a checkpoint directory, its config.json, or a "
        "bundled model): soft-caps, sliding window and which layers slide, query "
        "scale, heads, head dim, RoPE base, eps, vocabulary, BOS/EOS/turn ids, "
        "special-token marking, add-BOS. Keys a GGUF lacks are resolved as llama.cpp "
        "resolves them. Exit code 0 all match, 1 a mismatch, 2 unreadable input.",
    )
    p.add_argument("reference", help="checkpoint directory, config.json, or bundled model name (tiny)")
    p.add_argument("candidate", help="a .gguf file or a config.json")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=commands.check_config)


def add_exercise(sub):
    p = sub.add_parser(
        "exercise",
        help="check your own Gemma 2 functions (walkthrough/exercises/my_gemma.py)",
        description="Exercises of the walkthrough: your functions run inside the reference forward.",
    )
    ex = p.add_subparsers(dest="exercise_command", metavar="ACTION", required=True)
    c = ex.add_parser(
        "check",
        help="run each function of FILE inside the tiny model's forward and diagnose it",
        description="Each function FILE has written (embed, rms_norm, rope, soft_cap, attention_mask, "
        "attention, gelu_tanh, mlp, decoder_layer) replaces the reference's in the "
        "forward of the bundled tiny model; every tap is compared with the reference's "
        "(fp32 profile); a failing function gets its first diverging tap and the known "
        "Gemma 2 mistake it matches, with the chapter to read. Exit code 0 when every "
        "written function passes, 1 when one fails (or none is written), 2 when FILE "
        "does not import or lacks a function.",
    )
    c.add_argument("file", help="your copy of walkthrough/exercises/my_gemma.py")
    c.add_argument("--only", nargs="+", metavar="FUNCTION", help="check only these functions")
    c.set_defaults(handler=commands.exercise_check)


def add_check_tokenizer(sub):
    p = sub.add_parser(
        "check-tokenizer",
        help="a candidate tokenizer's ids for the tokenizer suite against the reference tokenizer's",
        description='CANDIDATE.json holds {"ids": [[...], ...], "stop_ids": [...]}: the token ids '
        "the candidate gives each text of the suite (`--texts` prints them, as a JSON "
        "list; one <bos> added, special tokens parsed) and, optionally, the ids its "
        "generation stops on. Reports the first differing text and position and names "
        "the known tokenizer mistake. Exit code 0 all equal, 1 a difference, 2 "
        "unreadable input.",
    )
    p.add_argument("candidate", nargs="?", help="the candidate's ids, a JSON file")
    p.add_argument(
        "--model",
        default="tiny",
        help="the reference tokenizer: a checkpoint directory or a bundled model (default tiny)",
    )
    p.add_argument("--texts", action="store_true", help="print the suite's texts (a JSON list) and exit")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=commands.check_tokenizer)


SUBCOMMANDS = [
    add_info,
    add_tokenize,
    add_run,
    add_generate,
    add_bench,
    add_golden,
    add_compare,
    add_corpus,
    add_diagnose,
    add_check_config,
    add_check_tokenizer,
    add_exercise,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gemma2-ref",
        description="Gemma 2 in plain NumPy: run real checkpoints exactly, write golden activations, and "
        "check other backends against them. MODEL is a Hugging Face checkpoint directory "
        "(config.json, *.safetensors, tokenizer.model) or a bundled model: " + ", ".join(g2.bundled_names()) + ".",
    )
    parser.add_argument("--version", action="version", version=f"gemma2-ref {g2.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        eprint(e)
        return 2
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    clash = conflict(args)
    if clash:
        eprint(f"gemma2-ref {args.command}: error: {clash} (see gemma2-ref {args.command} --help)")
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        return run_handler(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run_handler(args) -> int:
    """The subcommand, with every error it may raise turned into one line and its exit code."""
    with commands.one_line_warnings(f"gemma2-ref {args.command}: warning: ") as after_success:
        try:
            code = args.handler(args)
            sys.stdout.flush()  # here, not at exit: a reader that closed the pipe is then seen (quietly)
            after_success()
            return code
        except (ConfigError, WeightsError, TokenizerError, ValueError) as e:
            eprint(one_line(f"gemma2-ref {args.command}: error: {e}"))
            return 2
        except ModuleNotFoundError as e:  # an optional dependency: the pip install line (verify/optional.py)
            found = e if isinstance(e, MissingDependency) else missing(e, f"gemma2-ref {args.command}")
            if found is None:
                raise
            eprint(f"gemma2-ref {args.command}: error: {found}")
            return 2
        except BrokenPipeError:  # `gemma2-ref tokenize ... | head`: the reader has all it wanted
            quiet_stdout()
            return 0
        except OSError as e:  # a missing path, permissions, a full disk: name the path and the reason
            eprint(one_line(f"gemma2-ref {args.command}: error: {commands.os_error_message(e)}"))
            return 2
        except KeyboardInterrupt:
            eprint("interrupted")
            return 130
        except Terminated:
            eprint("terminated")
            return 143


CONTROL = {c: f"\\x{c:02x}" if c < 256 else f"\\u{c:04x}" for c in (*range(32), *range(127, 160), 0x2028, 0x2029)}


def one_line(message: str) -> str:
    """An error message as one printable line: a control character a user typed (a path holding a carriage
    return, a newline) shown as its escape instead of breaking the line."""
    return message.translate(CONTROL)


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush into the closed pipe stays silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every cleanup runs as for Ctrl-C (temporaries removed)."""


def on_sigterm(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())

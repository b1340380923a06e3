"""Corpus goldens: the reference's next-token distributions over a whole corpus, chunked and scored exactly as
llama.cpp's `llama-perplexity` does, stored compactly in shards.

The convention (tools/perplexity/perplexity.cpp of the llama.cpp vendored by llama-cpp-python 0.3.36):

    the text is tokenized once, <bos> first (perplexity.cpp:473, common_tokenize(..., add_special=true), and
    parse_special false: a "<bos>" in the text is text; verify/corpus_text.py)
    chunk c is tokens[c*ctx : (c+1)*ctx]; n_chunk = len(tokens) // ctx, at least 2 (:479-487, :494-496)
    the chunk's first token is replaced by <bos> for the forward and restored afterwards (:569-576)
    rows first = ctx/2 .. ctx-2 are scored: row i predicts token i+1 (:540, :606-617): ctx - 1 - ctx/2 rows

A corpus golden is a directory:

    plan.json                 written first: everything the shards are computed from (the manifest without
                              the shard records); a second run of the same command resumes against it
    shard-NNNNN.safetensors   a run of consecutive chunks, each written atomically (a temporary, renamed):
        tokens          (n, ctx) I32     the corpus tokens of these chunks, as in the text (reference only)
        ids             (n, R, k) I32    the reference's top-k ids, by descending log-prob (reference, k < V)
        logprobs        (n, R, k) F32    this model's log-probabilities of those ids (k = V: of every id)
        logsumexp       (n, R) F64       the exact log-sum-exp of the row's logits (logits = logprob + it)
        target_logprob  (n, R) F64       the log-probability of the actual next token
        top1            (n, R) I32       this model's own argmax (the first of equal maxima, as llama.cpp)
        min_logprob     (n, R) F64       this model's smallest log-probability (bounds a top-k KLD's tail)
    manifest.json             written last: the plan plus each shard's sha256; its absence marks a partial
                              golden, which is never accepted as a reference or a candidate

A candidate (another backend on the reference's corpus) stores the same tensors except `tokens` and `ids`: its
log-probabilities are of the reference's ids, which is all the comparison (verify/kld.py) needs; its full
distribution is never written. The shard tasks are self-contained and picklable (ShardTask), so they can run
in other processes (the Ray executor of issue 26); `write_corpus` runs them serially by default.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..model.jsonfile import JSONFileError
from ..model.jsonfile import read_json as bounded_json
from ..model.tokenizer import BOS
from ..storage.weights import MappedFiles, WeightsError, read_safetensors_header, write_safetensors_blocks
from .golden import CORPUS_KIND, GoldenError, model_info_from_files, our_producer, output_lock, sha256_file

FORMAT_VERSION = 1
PLAN, MANIFEST = "plan.json", "manifest.json"
REFERENCE_BACKEND = "gemma2-ref"
DEFAULT_TOP_K = 256  # docs/corpus.md: on tiny, the top-256 KLD is 1.7 % (bf16) to 5.6 % (q4_0) below --top-k all
DEFAULT_SHARD_CHUNKS = 4
ROW_BLOCK = 64  # rows of logits converted to float64 at a time: (64, 256000) float64 is 131 MB
BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus" / "tiny-heldout.txt"


class CorpusError(GoldenError):
    """A corpus, a corpus golden or an option that cannot be used; the message names the file or option."""


# -- the tasks one worker runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to compute and write one shard (picklable, no open files)."""

    shard: int  # index: the file is shard-{shard:05d}.safetensors
    chunks: tuple[int, int]  # [start, stop) chunk indices
    tokens: bytes  # (stop - start, ctx) int32 little-endian: the chunks' tokens as in the corpus
    ctx: int
    top_k: int | None  # None: every id (--top-k all)
    vocab_size: int
    model: str  # checkpoint directory (resolved)
    dtype: str  # the backend's dtype: float32 / float64 (gemma2-ref), float32 / bfloat16, ...
    backend: str = REFERENCE_BACKEND
    adapter: str | None = None  # the adapter module running a candidate backend (adapters.BACKENDS)
    gguf: str | None = None
    ref_ids: bytes | None = None  # candidate: the reference's (n, R, k) int32 ids of these chunks
    llamacpp_rows: bool = False  # also write llama.cpp's base-file rows of these chunks (--kld-out)
    candidate: bool = False  # scored against a reference: its ids are the reference's, not stored
    mistake: str | None = None  # gemma2-ref as a candidate with a known mistake injected (verify/mistakes.py)
    plan: str = ""  # sha256 of the plan, stamped into the shard's metadata

    @property
    def n_chunks(self) -> int:
        return self.chunks[1] - self.chunks[0]

    def chunk_tokens(self) -> np.ndarray:
        return np.frombuffer(self.tokens, "<i4").reshape(self.n_chunks, self.ctx)


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def llamacpp_part(index: int) -> str:
    return f"llamacpp-{index:05d}.part"


def first_scored(ctx: int) -> int:
    """The first scored row of a chunk: ctx/2 (perplexity.cpp:540)."""
    return ctx // 2


def rows_per_chunk(ctx: int) -> int:
    """Scored rows per chunk: ctx - 1 - ctx/2 (perplexity.cpp:609, :1738)."""
    return ctx - 1 - ctx // 2


def plan_shards(
    tokens: np.ndarray, plan: dict, model: str, *, shard_chunks: int = DEFAULT_SHARD_CHUNKS, reference=None
) -> list[ShardTask]:
    """The shard tasks of a plan: `tokens` (n_chunks, ctx) int32; a candidate's shards are its reference's."""
    ctx, n = plan["ctx"], plan["n_chunks"]
    top_k = None if plan["top_k"] == "all" else int(plan["top_k"])
    backend = plan["backend"]
    common = dict(
        ctx=ctx,
        top_k=top_k,
        vocab_size=plan["vocab_size"],
        model=model,
        dtype=backend["dtype"],
        backend=backend["name"],
        adapter=backend.get("adapter"),
        gguf=backend.get("gguf"),
        llamacpp_rows=plan.get("llamacpp_base") is not None,
        plan=plan_sha256(plan),
        candidate=reference is not None,
        mistake=backend.get("mistake"),
    )
    if reference is not None:
        bounds = [tuple(s["chunks"]) for s in reference.shards]
    else:
        bounds = [(a, min(a + shard_chunks, n)) for a in range(0, n, shard_chunks)]
    tasks = []
    for index, (a, b) in enumerate(bounds):
        ids = None
        if reference is not None and top_k is not None:
            ids = np.ascontiguousarray(reference.shard(index)["ids"], "<i4").tobytes()
        tasks.append(
            ShardTask(
                shard=index,
                chunks=(a, b),
                tokens=np.ascontiguousarray(tokens[a:b], "<i4").tobytes(),
                ref_ids=ids,
                **common,
            )
        )
    return tasks


# -- one worker: load once, score chunks, write a shard ---------------------------------------------------


def load_worker_model(task: ShardTask):
    """What run_shard needs loaded, once per worker: our Model, or the candidate adapter's loaded engine."""
    if task.backend == REFERENCE_BACKEND:
        from ..storage.loader import load_model

        model = load_model(task.model, task.dtype, keep_converted="auto")
        if task.mistake is not None:
            from .mistakes import find, inject

            model = inject(model, find(model.config, task.mistake))
        return model
    adapter = importlib.import_module(task.adapter)
    return adapter.corpus_model(task.model, task.dtype, gguf=task.gguf, ctx=task.ctx)


def chunk_logits(task: ShardTask, model, ids: np.ndarray) -> np.ndarray:
    """(R, V) logits of one chunk's scored rows: the forward of the chunk with <bos> first."""
    start, stop = first_scored(task.ctx), task.ctx - 1
    run_ids = ids.astype(np.int64)
    run_ids[0] = BOS  # perplexity.cpp:569-576: the chunk starts with <bos> for the forward only
    if task.backend == REFERENCE_BACKEND:
        logits = model.forward(run_ids, None, logits_at=(start, stop))["logits"]
    else:
        logits = importlib.import_module(task.adapter).corpus_logits(model, run_ids, start, stop)
    logits = np.asarray(logits)
    if logits.shape != (stop - start, task.vocab_size):
        raise CorpusError(
            f"{task.backend}: logits of shape {logits.shape} for chunk {task.chunks[0]}, expected "
            f"({stop - start}, {task.vocab_size})"
        )
    return logits


def log_softmax_rows(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities, log-sum-exp) of each row, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x - lse[:, None], lse


def top_k_ids(logprobs: np.ndarray, k: int) -> np.ndarray:
    """(R, k) ids of each row's k largest log-probabilities, by descending value, equal values by id."""
    part = (
        np.argpartition(-logprobs, k - 1, axis=1)[:, :k]
        if k < logprobs.shape[1]
        else np.broadcast_to(np.arange(logprobs.shape[1]), logprobs.shape)
    )
    vals = np.take_along_axis(logprobs, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1).astype(np.int32)


def score_rows(logits: np.ndarray, targets: np.ndarray, top_k: int | None, ref_ids: np.ndarray | None) -> dict:
    """The stored values of one chunk's rows (see the module docstring), a block of rows at a time."""
    out: dict[str, list] = {
        "ids": [],
        "logprobs": [],
        "logsumexp": [],
        "target_logprob": [],
        "top1": [],
        "min_logprob": [],
    }
    for b in range(0, len(logits), ROW_BLOCK):
        lp, lse = log_softmax_rows(logits[b : b + ROW_BLOCK])
        rows = np.arange(len(lp))
        out["logsumexp"].append(lse)
        out["target_logprob"].append(lp[rows, targets[b : b + ROW_BLOCK]])
        out["top1"].append(np.argmax(lp, axis=1).astype(np.int32))
        out["min_logprob"].append(lp.min(axis=1))
        if top_k is None:
            out["logprobs"].append(lp.astype(np.float32))
            continue
        ids = top_k_ids(lp, top_k) if ref_ids is None else ref_ids[b : b + ROW_BLOCK]
        out["ids"].append(ids)
        out["logprobs"].append(np.take_along_axis(lp, ids, axis=1).astype(np.float32))
    return {name: np.concatenate(v) for name, v in out.items() if v}


def check_finite(task: ShardTask, chunk: int, logits: np.ndarray) -> None:
    bad = ~np.isfinite(logits)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise CorpusError(
            f"{task.backend} ({task.gguf or task.model}): non-finite logits in chunk {chunk}, scored "
            f"row {row} (position {first_scored(task.ctx) + row}), id {col}: {int(bad.sum())} NaN/Inf "
            f"values; nothing of this shard was written"
        )


def run_shard(task: ShardTask, out_dir, model=None) -> dict:
    """Compute shard `task.shard` and write it atomically under out_dir (deterministic bytes).
    Returns {"shard", "sha256", "tokens" (corpus tokens evaluated), "seconds"}; model=None loads it."""
    from .llamacpp_kld import base_rows  # the base file's rows (same layer)

    t0 = time.perf_counter()
    model = load_worker_model(task) if model is None else model
    toks = task.chunk_tokens()
    first, R = first_scored(task.ctx), rows_per_chunk(task.ctx)
    ref_ids = None if task.ref_ids is None else np.frombuffer(task.ref_ids, "<i4").reshape(task.n_chunks, R, task.top_k)
    per_chunk, parts = [], []
    for j, ids in enumerate(toks):
        logits = chunk_logits(task, model, ids)
        check_finite(task, task.chunks[0] + j, logits)
        per_chunk.append(score_rows(logits, ids[first + 1 :], task.top_k, None if ref_ids is None else ref_ids[j]))
        if task.llamacpp_rows:
            parts.append(base_rows(logits))
        del logits
    arrays = {name: np.stack([c[name] for c in per_chunk]) for name in per_chunk[0]}
    if not task.candidate:
        arrays["tokens"] = toks
    else:
        arrays.pop("ids", None)  # the reference's, not ours: the manifest binds them by sha256
    out_dir = Path(out_dir)
    if parts:
        write_atomically(out_dir / llamacpp_part(task.shard), b"".join(p.tobytes() for p in parts))
    path = out_dir / shard_file(task.shard)
    write_shard(path, arrays, task)
    return {
        "shard": task.shard,
        "sha256": sha256_file(path),
        "tokens": task.n_chunks * task.ctx,
        "seconds": time.perf_counter() - t0,
    }


SHARD_DTYPES = {
    "tokens": "I32",
    "ids": "I32",
    "logprobs": "F32",
    "logsumexp": "F64",
    "target_logprob": "F64",
    "top1": "I32",
    "min_logprob": "F64",
}


def write_shard(path: Path, arrays: dict, task: ShardTask) -> None:
    specs = {name: (SHARD_DTYPES[name], a.shape, lambda a=a: [a]) for name, a in arrays.items()}
    meta = {
        "kind": CORPUS_KIND,
        "shard": str(task.shard),
        "chunks": f"{task.chunks[0]}-{task.chunks[1]}",
        "plan_sha256": task.plan,
    }
    write_safetensors_blocks(path, specs, meta)


def write_atomically(path: Path, data: bytes) -> None:
    """A file written under a temporary name and renamed: never seen half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def serial_executor(tasks, out_dir):
    """The default executor: every task in this process, the model loaded once."""
    model = None
    for task in tasks:
        model = model if model is not None else load_worker_model(task)
        yield run_shard(task, out_dir, model)


# -- the plan -----------------------------------------------------------------------------------------------


def canonical_json(d) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def plan_sha256(plan: dict) -> str:
    return hashlib.sha256(canonical_json(plan)).hexdigest()


def check_top_k(top_k, vocab_size: int, option: str = "--top-k") -> int | str:
    if isinstance(top_k, str) and top_k.strip().lower() == "all":
        return "all"
    try:
        k = int(top_k)
    except (TypeError, ValueError):
        raise CorpusError(
            f"{option} {top_k!r}: give a number of ids from 1 to the vocabulary size ({vocab_size}), or 'all'"
        ) from None
    if not 1 <= k <= vocab_size:
        raise CorpusError(f"{option} {k} is out of range: give 1 to the vocabulary size ({vocab_size}), or 'all'")
    return "all" if k == vocab_size else k


def check_ctx(ctx: int, cfg, option: str = "--ctx") -> int:
    if not isinstance(ctx, (int, np.integer)) or ctx < 4 or ctx % 2:
        raise CorpusError(
            f"{option} {ctx}: give an even number of tokens, at least 4 (llama-perplexity scores rows ctx/2 .. ctx-2)"
        )
    if ctx > cfg.max_position_embeddings:
        raise CorpusError(
            f"{option} {ctx} is past the model's context ({cfg.max_position_embeddings} tokens, "
            f"config.json max_position_embeddings): give at most that"
        )
    return int(ctx)


def read_corpus_text(path) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"--text {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"--text {path}: not UTF-8 (byte {e.start} is {data[e.start]:#04x}): give a UTF-8 text file"
        ) from None
    if not text.strip():
        raise CorpusError(f"--text {path} is empty: give a text of at least two chunks")
    return text


def read_corpus_tokens(path, vocab_size: int) -> np.ndarray:
    """Token ids from a .npy (1-D integers) or a text file of whitespace-separated integers."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            ids = np.load(path, allow_pickle=False)
        else:
            words = path.read_text(encoding="utf-8").split()
            ids = np.array([int(w) for w in words], dtype=np.int64)
    except UnicodeDecodeError:
        raise CorpusError(f"--tokens {path}: not UTF-8 text nor a .npy file of ids") from None
    except ValueError as e:
        raise CorpusError(f"--tokens {path}: not a list of integer ids ({e})") from None
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise CorpusError(
            f"--tokens {path}: give a non-empty 1-D list of integer ids (found {ids.dtype} {list(ids.shape)})"
        )
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise CorpusError(
            f"--tokens {path}: id {int(ids[i])} at index {i} is outside the vocabulary (0 .. {vocab_size - 1})"
        )
    return ids.astype(np.int64)


def corpus_source(checkpoint: Path, text_file=None, tokens_file=None, vocab_size: int = 0):
    """(token ids, the manifest's corpus record) for --text, --tokens or the bundled corpus."""
    if tokens_file is not None:
        ids = read_corpus_tokens(tokens_file, vocab_size)
        return ids, {"kind": "tokens", "file": str(Path(tokens_file).resolve()), "sha256": sha256_file(tokens_file)}
    from .corpus_text import encode_corpus_text

    if text_file is None:
        name, text = f"bundled:{BUNDLED_CORPUS.name}", BUNDLED_CORPUS.read_text(encoding="utf-8")
        sha = sha256_file(BUNDLED_CORPUS)
    else:
        name, text = str(Path(text_file).resolve()), read_corpus_text(text_file)
        sha = sha256_file(text_file)
    ids = np.array(encode_corpus_text(checkpoint, text), dtype=np.int64)  # as llama-perplexity: "<bos>" is text
    return ids, {"kind": "text", "file": name, "sha256": sha, "tokenized": "llama-perplexity (parse_special false)"}


def chunk_corpus(ids: np.ndarray, ctx: int, chunks: int | None, where: str) -> np.ndarray:
    """(n_chunk, ctx) int32: perplexity.cpp:479-496; fewer than two chunks is refused."""
    n_max = len(ids) // ctx
    if n_max < 2:
        raise CorpusError(
            f"{where}: {len(ids)} tokens make {n_max} chunk(s) of --ctx {ctx}; at least two are "
            f"needed ({2 * ctx} tokens): give a longer corpus or a smaller --ctx"
        )
    if chunks is not None and chunks < 1:
        raise CorpusError(f"--chunks {chunks}: give at least 1")
    n = n_max if chunks is None else min(chunks, n_max)
    return ids[: n * ctx].reshape(n, ctx).astype(np.int32)


# -- writing a corpus golden ------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_corpus(
    model,
    out_dir,
    *,
    text=None,
    tokens=None,
    ctx: int | None = None,
    chunks: int | None = None,
    top_k=None,
    dtype: str = "float32",
    kld_out=None,
    backend: dict | None = None,
    reference=None,
    shard_chunks: int = DEFAULT_SHARD_CHUNKS,
    executor=None,
    log=say,
) -> Path:
    """Write a corpus golden of `model` (a checkpoint directory or a bundled name) into out_dir; the same call
    after an interruption resumes with the missing shards (byte-identical result).

    Reference: the corpus from `text` (a file), `tokens` (a file of ids) or the bundled one; `ctx` (default:
    512 or the model's context), `chunks`, `top_k` (an int or "all"), `dtype` float32 / float64, `kld_out`: also
    llama.cpp's base file there. Candidate: `reference` (a corpus golden directory) gives the corpus, the
    chunking and the ids; `backend` = {"name", "dtype", "adapter", "gguf", ...} (cli's candidate_backend).
    `top_k` None: DEFAULT_TOP_K (or the whole vocabulary if smaller).
    `executor(tasks, out_dir)` yields run_shard's dicts (default: serially, here)."""
    from ..model.config import load_config
    from ..storage.loader import resolve_checkpoint

    checkpoint = resolve_checkpoint(model)
    cfg = load_config(checkpoint)
    ref = None
    if reference is not None:
        ref = load_corpus(reference)
        for name, value in (
            ("--text", text),
            ("--tokens", tokens),
            ("--ctx", ctx),
            ("--chunks", chunks),
            ("--kld-out", kld_out),
        ):
            if value is not None:
                raise CorpusError(
                    f"{name} cannot go with --reference: the corpus, chunking and ids come from {reference}"
                )
        plan, toks = candidate_plan(ref, cfg, checkpoint, backend)
    else:
        plan, toks = reference_plan(checkpoint, cfg, text, tokens, ctx, chunks, top_k, dtype, kld_out, model)
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        state = prepare_output(out_dir, plan)
        if state == "complete":
            load_corpus(out_dir)
            log(f"corpus: {out_dir} is already complete (its plan is this command's); nothing to do")
            return out_dir
        tasks = plan_shards(toks, plan, str(checkpoint), shard_chunks=shard_chunks, reference=ref)
        run_missing(tasks, out_dir, executor or serial_executor, log)
        shards = verified_shards(tasks, out_dir)
        if plan.get("llamacpp_base") is not None:
            from .llamacpp_kld import assemble_base_file

            assemble_base_file(Path(plan["llamacpp_base"]), out_dir, toks, plan, [t.shard for t in tasks])
        manifest = dict(plan, shards=shards)
        manifest["manifest_sha256"] = hashlib.sha256(canonical_json(manifest)).hexdigest()
        write_atomically(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
        for t in tasks:
            (out_dir / llamacpp_part(t.shard)).unlink(missing_ok=True)
        for leftover in [*out_dir.glob("shard-*.safetensors.tmp"), *out_dir.glob(".*.tmp")]:
            leftover.unlink(missing_ok=True)  # a killed writer's temporaries (the lock says none is alive)
    return out_dir


def reference_plan(checkpoint, cfg, text, tokens, ctx, chunks, top_k, dtype, kld_out, given_name):
    from ..data import bundled_path

    if text is not None and tokens is not None:
        raise CorpusError("--text and --tokens cannot go together: give one corpus")
    ctx = check_ctx(min(512, cfg.max_position_embeddings) if ctx is None else ctx, cfg)
    top_k = check_top_k(min(DEFAULT_TOP_K, cfg.vocab_size) if top_k is None else top_k, cfg.vocab_size)
    if dtype not in ("float32", "float64"):
        raise CorpusError(f"--dtype {dtype}: the reference computes in float32 or float64")
    ids, source = corpus_source(checkpoint, text, tokens, cfg.vocab_size)
    toks = chunk_corpus(ids, ctx, chunks, tokens or text or source["file"])
    source.update(tokens=int(len(ids)), used_tokens_sha256=hashlib.sha256(toks.tobytes()).hexdigest())
    bundled = bundled_path(str(given_name)) is not None
    info = model_info_from_files(checkpoint, cfg, str(given_name) if bundled else None, bundled)
    if kld_out is not None:
        kld_out = Path(kld_out).resolve()
        if kld_out.exists():
            raise CorpusError(f"--kld-out {kld_out} exists: choose a new file (it is never overwritten)")
    plan = {
        "format_version": FORMAT_VERSION,
        "kind": CORPUS_KIND,
        "role": "reference",
        "producer": our_producer(None),
        "backend": {"name": REFERENCE_BACKEND, "dtype": dtype},
        "model": info,
        "corpus": source,
        "ctx": ctx,
        "first_scored": first_scored(ctx),
        "rows_per_chunk": rows_per_chunk(ctx),
        "n_chunks": int(len(toks)),
        "top_k": top_k,
        "vocab_size": cfg.vocab_size,
        "bos": BOS,
        "reference": None,
        "llamacpp_base": None if kld_out is None else str(kld_out),
    }
    return plan, toks


def candidate_plan(ref, cfg, checkpoint, backend: dict):
    m = ref.manifest
    if cfg.vocab_size != m["vocab_size"]:
        raise CorpusError(
            f"{checkpoint}: vocabulary of {cfg.vocab_size} ids, the reference {ref.path} has "
            f"{m['vocab_size']}: not the same model"
        )
    if backend is None or (backend.get("name") != REFERENCE_BACKEND and not backend.get("adapter")):
        raise CorpusError("a candidate needs --backend NAME (transformers, llama.cpp) with --reference")
    toks = ref.tokens()
    plan = {
        "format_version": FORMAT_VERSION,
        "kind": CORPUS_KIND,
        "role": "candidate",
        "producer": backend.get("producer") or our_producer(None),
        "backend": {k: v for k, v in backend.items() if k != "producer"},
        "model": model_info_from_files(checkpoint, cfg),
        "corpus": m["corpus"],
        "ctx": m["ctx"],
        "first_scored": m["first_scored"],
        "rows_per_chunk": m["rows_per_chunk"],
        "n_chunks": m["n_chunks"],
        "top_k": m["top_k"],
        "vocab_size": m["vocab_size"],
        "bos": m["bos"],
        "reference": {
            "path": str(ref.path.resolve()),
            "manifest_sha256": m["manifest_sha256"],
            "shards": [s["sha256"] for s in m["shards"]],
        },
        "llamacpp_base": None,
    }
    return plan, toks


def prepare_output(out_dir: Path, plan: dict) -> str:
    """ "new" (plan.json written), "resume" (the same plan found) or "complete"; refuses anything else."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise CorpusError(f"--out {out_dir}: not a directory; give a new or empty directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        found = read_json(out_dir / PLAN) if (out_dir / PLAN).is_file() else None
        if not isinstance(found, dict) or found.get("kind") != CORPUS_KIND:
            shown = ", ".join(sorted(p.name for p in out_dir.iterdir())[:4])
            raise CorpusError(
                f"--out {out_dir} holds files that are not a corpus golden ({shown}): choose a new or empty directory"
            )
        if found != json.loads(canonical_json(plan)):
            first = ["ctx", "n_chunks", "top_k", "backend", "corpus", "model", "reference", "llamacpp_base"]
            keys = first + sorted((set(found) | set(plan)) - set(first))
            key = next((k for k in keys if found.get(k) != json.loads(canonical_json(plan)).get(k)), "?")
            raise CorpusError(
                f"--out {out_dir} holds a corpus golden of another command (its plan.json differs in "
                f"{key!r}): choose another --out, or run the command that made it"
            )
        return "complete" if (out_dir / MANIFEST).is_file() else "resume"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / PLAN, json.dumps(plan, indent=1, sort_keys=True).encode() + b"\n")
    return "new"


def read_json(path: Path):
    """The file's JSON (the one bounded reader, model/jsonfile.py), or None when it is not JSON we can read."""
    try:
        return bounded_json(path)
    except (OSError, JSONFileError):
        return None


def shard_complete(path: Path, task: ShardTask) -> bool:
    """An existing shard of this plan (written atomically, so whole if present; its metadata says whose)."""
    if not path.is_file():
        return False
    try:
        _, meta = read_safetensors_header(path, dtypes=tuple(SHARD_DTYPES.values()))
    except (WeightsError, OSError):
        return False
    part_ok = not task.llamacpp_rows or (path.parent / llamacpp_part(task.shard)).is_file()
    return meta.get("plan_sha256") == task.plan and part_ok


def run_missing(tasks, out_dir: Path, executor, log) -> None:
    """Run the tasks whose shard is not there yet, with progress (tokens/s, ETA) on stderr."""
    missing = [t for t in tasks if not shard_complete(out_dir / shard_file(t.shard), t)]
    if len(missing) < len(tasks):
        log(f"corpus: resuming {out_dir}: {len(tasks) - len(missing)} of {len(tasks)} shards already written")
    total = sum(t.n_chunks * t.ctx for t in missing)
    done, t0 = 0, time.perf_counter()
    for result in executor(missing, out_dir):
        done += result["tokens"]
        rate = done / max(time.perf_counter() - t0, 1e-9)
        eta = (total - done) / rate if rate else 0
        log(
            f"corpus: shard {result['shard'] + 1}/{len(tasks)}  {done}/{total} tokens  {rate:,.0f} tokens/s  "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )


def verified_shards(tasks, out_dir: Path) -> list[dict]:
    records = []
    for t in tasks:
        path = out_dir / shard_file(t.shard)
        if not shard_complete(path, t):
            raise CorpusError(
                f"{path}: shard {t.shard} was not written by the executor; run the command again to compute it"
            )
        records.append(
            {
                "index": t.shard,
                "chunks": list(t.chunks),
                "file": path.name,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    return records


# -- reading ----------------------------------------------------------------------------------------------


@dataclass
class CorpusGolden:
    """A complete, verified corpus golden: its manifest and its shards, read a shard at a time."""

    path: Path
    manifest: dict

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def role(self) -> str:
        return self.manifest["role"]

    @property
    def top_k(self) -> int | None:
        return None if self.manifest["top_k"] == "all" else int(self.manifest["top_k"])

    def shard(self, index: int) -> dict[str, np.ndarray]:
        """{tensor name: array} of one shard (memory-mapped, read-only)."""
        path = self.path / self.shards[index]["file"]
        tensors, _ = read_safetensors_header(path, dtypes=tuple(SHARD_DTYPES.values()))
        files = MappedFiles()
        return {name: files.array(ref) for name, ref in tensors.items()}

    def tokens(self) -> np.ndarray:
        """(n_chunks, ctx) int32: the corpus tokens (a reference's)."""
        return np.concatenate([np.asarray(self.shard(i)["tokens"]) for i in range(len(self.shards))])


def is_corpus_golden(path) -> bool:
    path = Path(path)
    for name in (MANIFEST, PLAN):
        found = read_json(path / name) if (path / name).is_file() else None
        if isinstance(found, dict) and found.get("kind") == CORPUS_KIND:
            return True
    return False


def load_corpus(path, verify: bool = True) -> CorpusGolden:
    """A complete corpus golden, every hash checked; a partial one (no manifest.json yet) is refused."""
    path = Path(path)
    if not path.is_dir():
        raise CorpusError(f"{path}: no such corpus golden directory")
    if not (path / MANIFEST).is_file():
        if (path / PLAN).is_file():
            done = len(list(path.glob("shard-*.safetensors")))
            raise CorpusError(
                f"{path} is a partial corpus golden ({done} shards, no manifest.json): run the same "
                f"`gemma2-ref corpus` command again to finish it; it is never used half-written"
            )
        raise CorpusError(f"{path}: no manifest.json: not a corpus golden")
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("kind") != CORPUS_KIND:
        raise CorpusError(f"{path / MANIFEST}: not a corpus golden manifest (kind {CORPUS_KIND!r} expected)")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if hashlib.sha256(canonical_json(body)).hexdigest() != manifest.get("manifest_sha256"):
        raise CorpusError(f"{path / MANIFEST}: its manifest_sha256 does not match its content (edited?)")
    if verify:
        for s in manifest["shards"]:
            f = path / s["file"]
            if not f.is_file():
                raise CorpusError(f"{f}: shard {s['index']} listed in the manifest is missing")
            if f.stat().st_size != s["bytes"] or sha256_file(f) != s["sha256"]:
                raise CorpusError(f"{f}: sha256 differs from the manifest's (truncated or edited)")
    return CorpusGolden(path, manifest)


def task_summary(task: ShardTask) -> dict:
    """A task as plain data (for logs), without its token bytes."""
    d = asdict(task)
    d.pop("tokens"), d.pop("ref_ids")
    return d

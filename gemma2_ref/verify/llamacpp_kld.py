"""llama.cpp's KL-divergence base file (`llama-perplexity --kl-divergence-base F`), written and read.

The layout, from tools/perplexity/perplexity.cpp (llama-cpp-python 0.3.36's vendored llama.cpp):

    "_logits_"                       8 bytes (:462)
    n_ctx    uint32                  (:463)
    n_vocab  int32, n_chunk int32    (:519-520)
    tokens   int32 x n_ctx*n_chunk   the corpus tokens, the chunks' first tokens as in the text (:521)
    per chunk, per scored row (n_ctx - 1 - n_ctx/2 rows), nv = 2*((n_vocab+1)/2) + 4 uint16 (:522-523, :158):
        2 floats:  scale = (max - min)/65535, min_log_prob = min - max - log(sum exp(logit - max)),
                   where min = max(min logit, max logit - 16) (:79-94)
        n_vocab uint16:  nearest_int((logit - min)/scale) for logit > min, else 0 (:97-104); padded to nv

A reader recovers log p = scale*u + min_log_prob (:216, :227). We write the file from the reference's own
float32 logits with the same arithmetic, so `llama-perplexity --kl-divergence-base ours --kl-divergence` runs a
GGUF against gemma2-ref rather than against llama.cpp itself; and we read a file llama-perplexity wrote as a
candidate (its quantised log-probs at the reference's ids).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import CorpusError, first_scored, llamacpp_part, rows_per_chunk

MAGIC = b"_logits_"
HEADER = 8 + 4 + 4 + 4
LOG_PROB_FLOOR = 16.0  # log-probs more than 16 below the max are stored as 0 and skipped in the KLD (:87, :226)


def row_width(n_vocab: int) -> int:
    """uint16 per scored row: two floats (4 uint16) and the vocabulary, padded to even (perplexity.cpp:146)."""
    return 2 * ((n_vocab + 1) // 2) + 4


def base_rows(logits: np.ndarray) -> np.ndarray:
    """(R, nv) uint16: llama.cpp's log_softmax(n_vocab, logits, log_prob, tok) (perplexity.cpp:79-107) per row,
    in float32 as it computes (the log-sum-exp from a float64 sum, as its double sum_exp)."""
    x = np.asarray(logits, np.float32)
    R, V = x.shape
    mx = x.max(axis=1)
    mn = np.maximum(x.min(axis=1), mx - np.float32(LOG_PROB_FLOOR))
    lse = np.log(np.exp((x - mx[:, None]).astype(np.float64)).sum(axis=1)).astype(np.float32)
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    out = np.zeros((R, row_width(V)), np.uint16)
    out[:, 0:4] = np.stack([scale, min_log_prob], axis=1).view(np.uint16)
    safe = np.where(scale > 0, scale, np.float32(1))
    inv = (np.float32(1) / safe).astype(np.float32)
    q = np.rint((inv[:, None] * (x - mn[:, None])).astype(np.float32))
    q = np.where((x > mn[:, None]) & (scale[:, None] > 0), q, 0)
    out[:, 4 : 4 + V] = np.clip(q, 0, 65535).astype(np.uint16)
    return out


def assemble_base_file(path: Path, out_dir: Path, tokens: np.ndarray, plan: dict, shards: list[int]) -> None:
    """The header, the tokens, then each shard's rows (llamacpp-NNNNN.part, in order) into `path`, atomically."""
    n_chunk, n_ctx = tokens.shape
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Iii", n_ctx, plan["vocab_size"], n_chunk))
            f.write(np.ascontiguousarray(tokens, "<i4").tobytes())
            for index in shards:
                f.write((out_dir / llamacpp_part(index)).read_bytes())
        expected = base_file_size(n_ctx, plan["vocab_size"], n_chunk)
        if tmp.stat().st_size != expected:
            raise CorpusError(f"--kld-out {path}: assembled {tmp.stat().st_size} bytes, expected {expected}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def base_file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    return HEADER + 4 * n_ctx * n_chunk + 2 * n_chunk * rows_per_chunk(n_ctx) * row_width(n_vocab)


@dataclass
class LlamaBase:
    """A llama.cpp base file, memory-mapped: its header, tokens and rows."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def tokens(self) -> np.ndarray:
        """(n_chunk, n_ctx) int32."""
        return np.memmap(self.path, "<i4", "r", HEADER, (self.n_chunk, self.n_ctx))

    def rows(self, chunk: int) -> np.ndarray:
        """(R, nv) uint16 of one chunk."""
        R, nv = rows_per_chunk(self.n_ctx), row_width(self.n_vocab)
        start = HEADER + 4 * self.n_ctx * self.n_chunk + 2 * chunk * R * nv
        return np.memmap(self.path, "<u2", "r", start, (R, nv))

    def logprobs(self, chunk: int) -> np.ndarray:
        """(R, n_vocab) float32: scale*u + min_log_prob, as perplexity.cpp:216, :227 read them."""
        rows = np.asarray(self.rows(chunk))
        scale_min = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # (R, 2)
        u = rows[:, 4 : 4 + self.n_vocab].astype(np.float32)
        return (scale_min[:, :1] * u + scale_min[:, 1:2]).astype(np.float32)


def is_base_file(path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == MAGIC


def read_base_file(path) -> LlamaBase:
    """A base file with its size checked against its header (a truncated one is refused, naming both)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER)
    if len(head) < HEADER or head[:8] != MAGIC:
        raise CorpusError(f"{path}: not a llama.cpp KL-divergence base file (no '_logits_' header)")
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:])
    if n_ctx < 4 or n_ctx % 2 or n_vocab < 1 or n_chunk < 1:
        raise CorpusError(f"{path}: header n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk} is not a base file's")
    expected = base_file_size(n_ctx, n_vocab, n_chunk)
    if size != expected:
        raise CorpusError(
            f"{path}: {size} bytes, its header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}) "
            f"needs {expected}: {'truncated' if size < expected else 'trailing bytes'}"
        )
    return LlamaBase(path, n_ctx, n_vocab, n_chunk)


def check_against_reference(base: LlamaBase, ref) -> None:
    """Same vocabulary, context, chunks and tokens as the reference corpus golden (llama.cpp only warns)."""
    m = ref.manifest
    if base.n_vocab != m["vocab_size"]:
        raise CorpusError(
            f"{base.path}: vocabulary of {base.n_vocab} ids, the reference {ref.path} has "
            f"{m['vocab_size']}: not the same model"
        )
    if base.n_ctx != m["ctx"] or base.n_chunk < m["n_chunks"]:
        raise CorpusError(
            f"{base.path}: n_ctx {base.n_ctx} with {base.n_chunk} chunks; the reference has --ctx "
            f"{m['ctx']} with {m['n_chunks']} chunks: run llama-perplexity with -c {m['ctx']}"
        )
    ref_tokens = ref.tokens()
    theirs = np.asarray(base.tokens[: m["n_chunks"]])
    if not np.array_equal(theirs, ref_tokens):
        c, p = np.argwhere(theirs != ref_tokens)[0]
        raise CorpusError(
            f"{base.path}: other tokens than the reference {ref.path}: chunk {c} position {p} is "
            f"{int(theirs[c, p])}, the reference's {int(ref_tokens[c, p])} (another tokenizer or text)"
        )


def candidate_shard(
    base: LlamaBase, chunks: tuple[int, int], ref_ids: np.ndarray | None, tokens: np.ndarray
) -> dict[str, np.ndarray]:
    """The values a candidate shard holds (corpus.score_rows), from the base file's rows of these chunks."""
    first = first_scored(base.n_ctx)
    out = {"logprobs": [], "target_logprob": [], "top1": [], "min_logprob": []}
    for j, c in enumerate(range(*chunks)):
        lp = base.logprobs(c)
        rows = np.arange(len(lp))
        out["target_logprob"].append(lp[rows, tokens[j, first + 1 :]].astype(np.float64))
        out["top1"].append(np.argmax(lp, axis=1).astype(np.int32))  # the first maximum, as :219-224
        out["min_logprob"].append(lp.min(axis=1).astype(np.float64))
        out["logprobs"].append(lp if ref_ids is None else np.take_along_axis(lp, np.asarray(ref_ids[j]), axis=1))
    return {name: np.stack(v) for name, v in out.items()}

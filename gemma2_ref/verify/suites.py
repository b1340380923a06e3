"""Suites: the inputs that expose Gemma 2's known failure modes, run through our forward into golden cases.

    generate_suite(model, tokenizer, "golden/")     every case of the coverage suite, plus suite.json

`coverage_inputs` says which cases and why. Cases are streamed to disk (`generate_case`) and kept within the
disk budget (`case_plan`): a 4098-token window case of a 9B model keeps the taps of its last 4 positions.
The case format itself (write, read, verify) is golden.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model.fast import MAX_SCORES_BYTES
from ..model.generate import decode_taps
from ..model.inputs import pad_batch, padded_positions
from ..model.taps import LARGE_TAPS, first_non_finite, select_taps, tap_bytes, tap_shape
from ..model.tokenizer import BOS
from .golden import CaseWriter, model_info, write_case, write_suite


def run_case(
    model, ids, taps="default", progress=None, attention_mask=None, prefill: int | None = None, chunks=None
) -> dict[str, np.ndarray]:
    """Our forward with taps, the activations a golden stores (logits always included). `model` may be a
    mistaken one (mistakes.inject). A padded batch gives its attention mask: each row's own positions. A
    decode case gives its `prefill`: the KV-cache path, then one token at a time (generate.decode_taps), or
    its `chunks` (a chunked prefill)."""
    if prefill is not None:
        return decode_taps(model, ids, prefill, taps, chunks)
    positions = None if attention_mask is None else padded_positions(attention_mask)
    return model.forward(ids, taps=taps, progress=progress, positions=positions)


def generate_case(
    model,
    ids,
    out_dir,
    *,
    taps="default",
    text=None,
    description=None,
    info=None,
    progress=None,
    positions=None,
    attention_mask=None,
    prefill: int | None = None,
    chunks=None,
) -> Path:
    """Run `model` on `ids` and write the case. `info`: model_info(model) (computed once per suite).

    A prefill case is streamed: each tap goes to disk as the forward produces it (golden.CaseWriter), and the
    output head runs only for the stored positions, so memory holds one layer's activations and the logits
    kept, whatever the number of taps (case_budget). A decode case (`prefill`) is written whole."""
    ids = np.asarray(ids)
    fields = dict(
        model=info or model_info(model),
        text=text,
        compute_dtype=str(model.dtype),
        description=description,
        positions=positions,
        attention_mask=attention_mask,
    )
    if prefill is not None:
        return write_case(
            out_dir,
            decode_taps(model, ids, prefill, taps, chunks),
            ids,
            extra={"decode": decode_extra(len(ids), prefill, chunks)},
            **fields,
        )
    cfg, batch = model.config, () if ids.ndim == 1 else ids.shape[:1]
    seq, rows = ids.shape[-1], ids.shape[-1] if positions is None else positions[1] - positions[0]
    names = select_taps(cfg, taps) + ["logits"]
    specs = {n: (batch + stored_shape(cfg, n, seq, rows), model.dtype) for n in dict.fromkeys(names)}
    with CaseWriter(out_dir, ids, specs, **fields) as case:

        def sink(name, value):
            check_finite(model, name, value)
            case.add(name, value)

        out = model.forward(
            ids,
            taps=taps,
            progress=progress,
            sink=sink,
            logits_at=positions or "all",
            positions=None if attention_mask is None else padded_positions(attention_mask),
        )
        sink("logits", out["logits"])
    return Path(out_dir)


def decode_extra(n: int, prefill: int, chunks=None) -> dict:
    """A decode case's manifest `extra.decode`: the prefill, the steps after it, and for a chunked prefill the
    length of every forward."""
    if chunks is None:
        return {
            "prefill": prefill,
            "steps": n - prefill,
            "how": "a prefill, then one token per forward through the KV cache (teacher-forced): "
            "row prefill + k of every tap is decode step k",
        }
    return {
        "prefill": prefill,
        "steps": n - prefill,
        "chunks": [int(c) for c in chunks],
        "how": "the ids fed through the KV cache in forwards of `chunks` tokens each (teacher-forced), "
        "the first being the prefill; rows in the order of the ids",
    }


def stored_shape(cfg, name: str, seq: int, rows: int) -> tuple[int, ...]:
    """A tap's shape in a case of `seq` tokens that stores `rows` query positions (no batch axis)."""
    shape = tap_shape(cfg, name, seq)
    return (shape[0], rows, *shape[2:]) if name.endswith(LARGE_TAPS) else (rows, *shape[1:])


def check_finite(model, name: str, value) -> None:
    """A reference never writes a NaN or Inf: refuse at the first tap holding one, named (loader.Model)."""
    bad = first_non_finite({name: value})
    if bad is not None:
        raise model.non_finite_error(bad)


# -- memory and disk, before running ---------------------------------------------------------------------


def forward_memory(cfg, seq: int, logits_at="last", itemsize: int = 4, whole_scores: bool = False) -> dict:
    """What a streaming forward of `seq` tokens holds at its peak (bytes): the compute-dtype embedding (it is
    also the output head), one converted layer, and the largest activations (the MLP's three (S, F) arrays,
    a block of attention scores and the softmax's temporaries (every query's when the scores or probs taps are
    recorded: `whole_scores`), the logits of `logits_at`: "last", "all" or a number of positions).
    File pages are released after conversion and not counted."""
    V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = cfg.parameter_counts()["per_layer"] * itemsize
    mlp = 3 * seq * F * itemsize  # gate, up, hidden
    scores = H * seq * seq * itemsize if whole_scores else min(MAX_SCORES_BYTES, H * seq * seq * itemsize)
    attention = (seq * (H + 2 * K) * Dh + seq * H * Dh) * itemsize * 2 + 4 * scores  # capped, masked, exp, probs
    residual = 6 * seq * D * itemsize
    rows = {"last": 1, "all": seq}.get(logits_at, logits_at)
    logits = 2 * rows * V * itemsize  # logits and the soft-cap's result
    activations = max(mlp, attention) + residual + logits
    # KV cache for generation: every position for global layers, `window` slots for sliding ones
    per_position = 2 * K * Dh * itemsize
    kv = sum(
        per_position * (min(seq, cfg.sliding_window) if cfg.is_sliding(i) else seq)
        for i in range(cfg.num_hidden_layers)
    )
    embedding = V * D * itemsize
    return {
        "seq": seq,
        "embedding": embedding,
        "layer": layer,
        "activations": activations,
        "kv_cache": kv,
        "streaming_peak": embedding + layer + activations,
        "bound": embedding + 3 * layer + (1 << 30),  # the budget: embedding + 3 layers + 1 (1 << 30)
        "all_layers_converted": embedding + cfg.num_hidden_layers * layer + activations,
        "bf16_on_disk": (cfg.parameter_counts()["total"]) * 2,
    }


def case_budget(cfg, taps, ids, rows: int | None = None, itemsize: int = 4) -> dict:
    """What writing one case of our forward needs (bytes). The case is streamed (generate_case), so memory
    = the forward (one layer's activations, the output head for the stored positions only) plus the largest
    tap on its way to disk; disk = the stored taps (`rows` query positions; default all). Compared with what
    the machine has before anything runs (budget_refusal)."""
    ids = np.asarray(ids)
    batch, seq = ids.shape if ids.ndim == 2 else (1, ids.shape[-1])
    stored = seq if rows is None else rows
    names = select_taps(cfg, taps)
    whole_scores = any(n.endswith(LARGE_TAPS) for n in names)
    forward = forward_memory(cfg, batch * seq, batch * stored, itemsize, whole_scores)["streaming_peak"]
    largest = (
        batch
        * itemsize
        * max([int(np.prod(tap_shape(cfg, n, seq))) for n in names if n not in ("logits_raw", "logits")] + [0])
    )  # those: in `forward`
    return {
        "memory": forward + largest,
        "forward": forward,
        "largest_tap": largest,
        "disk": tap_bytes(cfg, taps, batch, seq, itemsize, rows),
    }


def largest_prompt_that_fits(cfg, taps, batch: int, available: int, itemsize: int = 4) -> int:
    """The most tokens whose case_budget memory fits in `available` bytes (0 if none)."""
    lo, hi = 0, cfg.max_position_embeddings
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if case_budget(cfg, taps, np.zeros((batch, mid), np.int64), itemsize=itemsize)["memory"] <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


def size_text(n: float) -> str:
    """Bytes for a person: "3.2 GiB", or "7.9 MiB" below a GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def budget_refusal(cfg, taps, ids, rows: int | None, itemsize: int, memory: int | None, free: float) -> str | None:
    """Why a case cannot run here, with the numbers and the options that would fit, or None when it fits:
    `memory` bytes of RAM available (None: unknown), `free` bytes of disk where it is written."""
    need = case_budget(cfg, taps, ids, rows, itemsize)
    ids = np.asarray(ids)
    batch, seq = ids.shape if ids.ndim == 2 else (1, ids.shape[-1])
    if memory is not None and need["memory"] > memory:
        options = []
        for label, t, r in (
            ("--taps residual", "residual", rows),
            ("--positions START:STOP of 64 positions (the logits only there)", taps, min(64, seq)),
            ("--taps residual and 64 positions", "residual", min(64, seq)),
        ):
            fit = case_budget(cfg, t, ids, r, itemsize)["memory"]
            if fit <= memory and (t, r) != (taps, rows):
                options.append(f"{label} ({size_text(fit)})")
                break
        options.append(f"at most {largest_prompt_that_fits(cfg, taps, batch, memory, itemsize)} tokens")
        return (
            f"this case needs about {size_text(need['memory'])} of memory (the forward, its logits at "
            f"{batch * (rows or seq)} positions, the largest tap on its way to disk) and {size_text(memory)} "
            f"is available: it would be killed. What fits: {', or '.join(options)}"
        )
    if need["disk"] > free:
        options = [
            f"{label} ({size_text(d)})"
            for label, d in (
                ("--taps residual", tap_bytes(cfg, "residual", batch, seq, itemsize, rows)),
                ("--positions START:STOP of 64 positions", tap_bytes(cfg, taps, batch, seq, itemsize, min(64, seq))),
            )
            if d <= free
        ]
        return (
            f"this case writes about {size_text(need['disk'])} and {size_text(free)} is free there. "
            f"Write elsewhere, free some space" + "".join(f", or {o}" for o in options)
        )
    return None


# -- the coverage suite: inputs that expose the known failure modes ------------------------------------------

PASSAGE = (
    "The quick brown fox jumps over the lazy dog. A sliding window lets each token see only the "
    "recent past, while global layers see everything before it. Numbers such as 3, 14 and 2048 "
    "appear in text, and so do names, code and questions: what comes next? "
)
QUESTION = "Why soft-cap scores?"
DECODE_FULL_WINDOW = 512  # up to this sliding window the decode case's steps wrap every ring buffer twice
SHORT_TEXT = "The cat sat on the mat."
PADDED_TEXT = "A sliding window lets each token see only the recent past."
SPECIAL_TEXT = "A turn ends with <end_of_turn> and the next begins with <start_of_turn>model"


@dataclass
class CaseInput:
    name: str
    description: str
    ids: list | np.ndarray
    text: str | None = None
    attention_mask: np.ndarray | None = None  # a padded batch: 1 for a token, 0 for padding
    prefill: int | None = None  # a decode case: this many tokens in one forward, then one at a time
    chunks: tuple[int, ...] | None = None  # a chunked prefill: the length of every forward (the first = prefill)


def coverage_inputs(cfg, tokenizer) -> list[CaseInput]:
    """The coverage suite for a model with sliding window W (4096 for the released models):

    short      a short prompt with one <bos>
    window     W + 2 tokens: positions W-1, W, W+1 exist, so the first key leaves the window (sliding layers
               differ from global ones, and an off-by-one window shows)
    no_bos     the short prompt without <bos> (lm-evaluation-harness #2049)
    double_bos the short prompt with <bos><bos> (a chat template plus an added BOS)
    chat       a user turn in the Gemma chat template
    batch      two different prompts of equal length, as one (2, S) batch (no padding)
    special_tokens  text that contains <start_of_turn> / <end_of_turn> itself: one id each (106, 107), which a
               tokenizer that does not mark them special splits into pieces (llama.cpp #8244)
    long       2W + 2 tokens: positions far past the window, every sliding layer's keys fully replaced twice
    padded_batch        two prompts of different lengths as one batch, left-padded with <pad>, and its
               attention mask: each row counts positions from its own first token, padding is never attended
               (transformers #32848: only the last row right)
    padded_batch_right  the same, right-padded
    decode     a prefill of P = W + W/4 tokens (past the window: the ring keeps only its last W keys, and a
               sliding layer's prefill differs from a global one's), then 2W one-token steps through the KV
               cache: every sliding layer's ring buffer wraps twice in decode; row P + k of each tap is decode
               step k. For a window over DECODE_FULL_WINDOW (the released 4096: 8000 one-token forwards of a
               9B on a CPU are days) the prefill is W + 2 tokens and 4 steps follow
    chunked    the KV cache fed in chunks: W tokens, then one chunk of 3W/2 (longer than the window), then W/4
               one-token steps: a ring that takes a chunk before its queries attend (executorch #20346: 2W
               slots) loses keys of the first chunk that the second one's first queries still see. Only when
               the 11W/4 tokens fit the context (not the released models: W 4096, context 8192, where a 2W
               ring cannot overflow)
    """
    cases = {c.name: c for c in [*prompt_cases(tokenizer), *position_cases(cfg, tokenizer), *padded_cases(tokenizer)]}
    return [cases[name] for name in COVERAGE_ORDER if name in cases]


COVERAGE_ORDER = (
    "short",
    "window",
    "no_bos",
    "double_bos",
    "chat",
    "batch",
    "special_tokens",
    "long",
    "decode",
    "chunked",
    "padded_batch",
    "padded_batch_right",
)


def prompt_cases(tokenizer) -> list[CaseInput]:
    """The coverage suite's cases about what the prompt holds: short, no_bos, double_bos, chat, batch,
    special_tokens (coverage_inputs)."""
    short = tokenizer.encode(SHORT_TEXT, bos=True)
    a = tokenizer.encode("Windows slide.", bos=True)
    b = tokenizer.encode("Caps bound logits.", bos=True)
    n = min(len(a), len(b))
    return [
        CaseInput("short", "a short prompt, one <bos>", short, SHORT_TEXT),
        CaseInput("no_bos", "the short prompt without <bos>", short[1:], SHORT_TEXT),
        CaseInput("double_bos", "the short prompt with a doubled <bos>", [BOS] + short, SHORT_TEXT),
        CaseInput(
            "chat",
            "one user turn in the Gemma chat template",
            tokenizer.encode_chat(QUESTION),
            tokenizer.chat_prompt(QUESTION),
        ),
        CaseInput("batch", f"two prompts of {n} tokens as one batch", np.array([a[:n], b[:n]]), None),
        CaseInput(
            "special_tokens",
            "text containing <start_of_turn> and <end_of_turn>: one id each",
            tokenizer.encode(SPECIAL_TEXT, bos=True),
            SPECIAL_TEXT,
        ),
    ]


def position_cases(cfg, tokenizer) -> list[CaseInput]:
    """The coverage suite's cases about positions and the sliding window W: window, long, decode, chunked
    (coverage_inputs)."""
    W = cfg.sliding_window
    if 2 * W + 2 > cfg.max_position_embeddings:
        raise ValueError(
            f"the long case needs {2 * W + 2} positions, the model's context is {cfg.max_position_embeddings}"
        )
    long_ids = tokenizer.encode(PASSAGE, bos=True)
    body = tokenizer.encode(PASSAGE, bos=False)
    prefill, steps = (W + max(1, W // 4), 2 * W) if W <= DECODE_FULL_WINDOW else (W + 2, 4)
    steps = max(1, min(steps, cfg.max_position_embeddings - prefill))
    while len(long_ids) < max(2 * W + 2, prefill + steps):
        long_ids += body
    window_ids, decode_ids, long_ids = long_ids[: W + 2], long_ids[: prefill + steps], long_ids[: 2 * W + 2]
    return [
        CaseInput(
            "window",
            f"{W + 2} tokens: positions {W - 1}, {W}, {W + 1} straddle the sliding window of {W}",
            window_ids,
            tokenizer.decode(window_ids, skip_special=False),
        ),
        CaseInput(
            "long",
            f"{2 * W + 2} tokens: positions up to {2 * W + 1}, twice the sliding window of {W}",
            long_ids,
            tokenizer.decode(long_ids, skip_special=False),
        ),
        CaseInput(
            "decode",
            f"a prefill of {prefill} tokens (past the sliding window of {W}), then {steps} "
            f"one-token steps through the KV cache"
            f"{' (every ring buffer wraps twice)' if steps >= 2 * W else ''}",
            decode_ids,
            tokenizer.decode(decode_ids, skip_special=False),
            prefill=prefill,
        ),
        *chunked_case(cfg, tokenizer, long_ids + body * 4),
    ]


def padded_cases(tokenizer) -> list[CaseInput]:
    """The coverage suite's padded batches: two prompts of different lengths, left- and right-padded
    (coverage_inputs)."""
    longer, short = tokenizer.encode(PADDED_TEXT, bos=True), tokenizer.encode(SHORT_TEXT, bos=True)
    left, left_mask = pad_batch([longer, short], side="left")
    right, right_mask = pad_batch([longer, short], side="right")
    return [
        CaseInput(
            "padded_batch",
            f"prompts of {len(longer)} and {len(short)} tokens as one batch, left-padded",
            left,
            None,
            left_mask,
        ),
        CaseInput(
            "padded_batch_right",
            f"prompts of {len(longer)} and {len(short)} tokens as one batch, right-padded",
            right,
            None,
            right_mask,
        ),
    ]


def chunked_case(cfg, tokenizer, ids) -> list[CaseInput]:
    """The coverage suite's chunked-prefill case (coverage_inputs), or none where it does not fit the context."""
    W = cfg.sliding_window
    chunks = (W, W + W // 2) + (1,) * max(1, W // 4)
    if sum(chunks) > cfg.max_position_embeddings or W < 4:
        return []
    while len(ids) < sum(chunks):
        ids = ids + ids
    ids = ids[: sum(chunks)]
    return [
        CaseInput(
            "chunked",
            f"{sum(chunks)} tokens through the KV cache in chunks of {W}, {W + W // 2} "
            f"(longer than the sliding window of {W}), then {len(chunks) - 2} one-token steps",
            ids,
            tokenizer.decode(ids, skip_special=False),
            prefill=W,
            chunks=chunks,
        )
    ]


SUITES = {"coverage": coverage_inputs}


def suite_case_names(name: str = "coverage") -> list[str]:
    """The cases a suite writes, in order, from its definition (run for the bundled tiny model: the names do
    not depend on the model). `gemma2-ref golden --help` lists them."""
    from ..data import bundled_path
    from ..model.config import PRESETS
    from ..model.tokenizer import load_tokenizer

    return [case.name for case in SUITES[name](PRESETS["tiny"], load_tokenizer(bundled_path("tiny")))]


MAX_CASE_BYTES = 256 << 20  # on disk: beyond this a case keeps only its last LAST_ROWS positions
LAST_ROWS = 4  # for the window case: positions W-2, W-1, W, W+1


def case_plan(cfg, taps, ids, itemsize: int = 4) -> tuple[object, tuple[int, int] | None, list[str]]:
    """The taps and stored positions that keep one case within the disk budget, and notes. Memory needs no
    plan: a case is streamed to disk (generate_case), its memory is the forward's (case_budget)."""
    ids = np.asarray(ids)
    batch, seq = ids.shape if ids.ndim == 2 else (1, ids.shape[0])
    notes = []
    positions = None
    if tap_bytes(cfg, taps, batch, seq, itemsize) > MAX_CASE_BYTES and seq > LAST_ROWS:
        positions = (seq - LAST_ROWS, seq)
        notes.append(
            f"only positions {seq - LAST_ROWS}..{seq - 1} stored (the full case would take "
            f"{tap_bytes(cfg, taps, batch, seq, itemsize) / 2**20:.0f} MiB)"
        )
    return taps, positions, notes


def our_writer(model, info: dict, log=None):
    """generate_suite's default `write`: our forward into each case (generate_case), with per-layer progress
    for a large model."""
    progress = None
    if log is not None and model.is_large:
        progress = lambda done, total: log(f"    layer {done}/{total}")  # noqa: E731

    def write(ids, case_dir, text, description, case_taps, positions, attention_mask=None, prefill=None, chunks=None):
        generate_case(
            model,
            ids,
            case_dir,
            taps=case_taps,
            text=text,
            description=description,
            info=info,
            progress=progress,
            positions=positions,
            attention_mask=attention_mask,
            prefill=prefill,
            chunks=chunks,
        )

    return write


def generate_suite(
    model, tokenizer, out_dir, name="coverage", taps="default", model_name=None, log=None, write=None
) -> Path:
    """Write every case of a suite under out_dir, plus suite.json.

    Cases of big models are kept within budgets (`case_plan`): a 4098-token window case of a 9B model keeps
    the taps of its last 4 positions. `write(ids, case_dir, text, description, taps, positions,
    [attention_mask=])`
    writes one case; default: our forward. Give another to produce the suite with another backend."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = model_info(model, model_name, progress=log is not None)
    write = write or our_writer(model, info, log)
    inputs = SUITES[name](model.config, tokenizer)
    entries, skipped = [], []
    for case in inputs:
        ids = np.asarray(case.ids)
        case_taps, positions, notes = case_plan(model.config, taps, ids, model.dtype.itemsize)
        if log:
            log(f"  case {case.name}: {ids.shape} tokens" + "".join(f"; {n}" for n in notes))
        description = case.description + "".join(f"; {n}" for n in notes)
        padding = {} if case.attention_mask is None else {"attention_mask": case.attention_mask}
        if case.prefill is not None:
            padding["prefill"] = case.prefill
        if case.chunks is not None:
            padding["chunks"] = case.chunks
        try:
            write(ids, out_dir / case.name, case.text, description, case_taps, positions, **padding)
        except NotImplementedError as e:  # a backend without padded batches
            if log:
                log(f"  case {case.name} skipped: {e}")
            skipped.append({"name": case.name, "reason": str(e)})  # compare says "not checked", and why
            continue
        entries.append({"name": case.name, "description": description})
    return write_suite(
        out_dir,
        name,
        entries,
        {
            "model": {k: info[k] for k in ("name", "path", "bundled", "weights", "tokenizer")},
            "sliding_window": model.config.sliding_window,
            "taps": taps,
            **({"skipped": skipped} if skipped else {}),
        },
    )

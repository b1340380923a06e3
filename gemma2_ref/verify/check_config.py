"""check-config: does a converted model's metadata describe the same Gemma 2 as the reference config.json?

Most Gemma 2 port bugs were never in the kernels but in the converted hyper-parameters: a GGUF without the
soft-cap keys, a loader that drops them, a window on the wrong layers, a query scale the format cannot
express, chat tokens not marked special. This module reads both sides and compares them field by field,
without running anything.

    reference   a checkpoint directory (config.json, and tokenizer.model / tokenizer_config.json if there)
                or a config.json path: gemma2_ref's own parser reads it (`gemma2_ref.config.load_config`)
    candidate   a GGUF file (read with `gguf`, llama.cpp's own Python reader) or another config.json

For a GGUF, what matters is what llama.cpp will *run*, so an absent key is resolved to the value llama.cpp
falls back to, with the line of its source that says so (llama-cpp-python 0.3.36's vendor/llama.cpp):

    soft-caps          src/llama-hparams.h:134,136     50.0 / 30.0 when the keys are absent; other GGUF
                                                         loaders (vLLM, transformers) then run without
    sliding window     src/models/gemma2.cpp:5           4096 when `gemma2.attention.sliding_window` is absent
    sliding layers     src/models/gemma2.cpp:6,          pattern 2 unless `...sliding_window_pattern`: layer
                       src/llama-hparams.cpp:15          il slides when il % 2 < 1, i.e. 0, 2, 4, ...
    query scale        src/models/gemma2.cpp:25-27       no key for query_pre_attn_scalar: 1/sqrt(n_embd /
                                                         n_head) if 46 layers (27B), else 1/sqrt(head_dim)
    RoPE base          src/llama-model.cpp:1414          10000 when `gemma2.rope.freq_base` is absent
    BOS / EOS / UNK    src/llama-vocab.cpp:1975-1977     SentencePiece ("llama") defaults 1 / 2 / 0
    add BOS / EOS      src/llama-vocab.cpp:2434-2435     true / false for SentencePiece
    end of turn        src/llama-vocab.cpp:2699,2711     a token whose text is "<end_of_turn>" becomes EOT,
                                                         and is forced to control type; <start_of_turn> is not

Each field is `match`, `default` (absent, but llama.cpp's fallback equals the reference: passes, with the
source line), `mismatch` or `missing` (absent, and what runs differs or other loaders read nothing: fails).
Every failing field names its public bug report. Exit code: 0 all pass, 1 a field fails, 2 unreadable input.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model.config import ConfigError, load_config
from ..model.jsonfile import JSONFileError, is_int, is_number, kind, read_json, shown, strict
from ..model.tokenizer import END_OF_TURN, START_OF_TURN
from .mistakes import REFS

# GGUF token types (gguf-py gguf/constants.py TokenType; llama.h llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKEN_TYPE_NAMES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
# Gemma's chat-turn tokens (model/tokenizer.py: the same ids in every Gemma 2 tokenizer)
TURN_TEXT = {START_OF_TURN: "<start_of_turn>", END_OF_TURN: "<end_of_turn>"}

# The public threads come from the one list, mistakes.REFS.
REPORTS = {
    "softcap_key": "GGUF converted before llama.cpp #8197 (llama.cpp #8156): re-convert with a current "
    f"convert_hf_to_gguf.py; loaders that copy the key into a config run with no soft-cap "
    f"({REFS['softcap_key']})",
    "softcap": f"soft-cap value differs ({REFS['attn_softcap']}; {REFS['softcap_key']})",
    "window": f"sliding window missing, too wide or on the wrong layers ({REFS['window']}; {REFS['sliding_layers']})",
    "query_scale": f"wrong query scale ({REFS['query_scale']})",
    "special": f"special tokens not marked: the chat tokens are split into pieces ({REFS['special_tokens']})",
    "bos": f"BOS missing or doubled ({REFS['no_bos']}; {REFS['double_bos']})",
    "window_key": f"GGUF without the sliding-window key (converted before llama.cpp #8227): re-convert with a current "
    f"convert_hf_to_gguf.py; a loader without a default runs every layer globally ({REFS['window_key']})",
    "head_dim": f"head_dim derived as hidden_size / num_attention_heads, which Gemma 2 does not use "
    f"({REFS['head_dim']}): set it from the released config.json",
    "eos": "generation does not stop where Gemma ends a turn (stop on <eos> 1 and <end_of_turn> 107)",
    "shape": "a different model shape: this is not the reference model, or a converter bug",
}


class ConfigCheckError(ValueError):
    """An input check-config cannot read: the message names the file and what to do (exit code 2)."""


@dataclass
class Field:
    name: str
    reference: object
    candidate: object
    status: str  # match | default | mismatch | missing
    key: str | None = None  # where the candidate keeps it (GGUF key, config.json key)
    note: str = ""  # how the candidate's value was found, or what the runtime does instead
    report: str = ""  # the public report a failing field points to

    @property
    def ok(self) -> bool:
        return self.status in ("match", "default")


@dataclass
class ConfigReport:
    reference: str
    candidate: str
    candidate_kind: str  # "gguf" | "config.json"
    fields: list[Field] = field(default_factory=list)
    error: str | None = None

    @property
    def failed(self) -> list[Field]:
        return [f for f in self.fields if not f.ok]

    @property
    def exit_code(self) -> int:
        return 2 if self.error else 1 if self.failed else 0

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def format(self) -> str:
        lines = [f"reference  {self.reference}", f"candidate  {self.candidate} ({self.candidate_kind})"]
        if self.error:
            return "\n".join(lines + [f"ERROR      {self.error}"])
        width = max(len(f.name) for f in self.fields)
        for f in self.fields:
            mark = {"match": "ok  ", "default": "ok* ", "mismatch": "FAIL", "missing": "FAIL"}[f.status]
            line = f"  {mark} {f.name:<{width}}  reference {show(f.reference)}, candidate {show(f.candidate)}"
            if f.key:
                line += f"  [{f.key}]"
            lines.append(line)
            for text in (f.note, f.report if not f.ok else ""):
                if text:
                    lines.append(" " * (width + 9) + text)
        n = len(self.failed)
        agree = f"{len(self.fields) - n} of {len(self.fields)} fields agree"
        lines.append(
            f"verdict    {'MATCH' if not n else 'MISMATCH'}: {agree}"
            + (f"; differing: {', '.join(f.name for f in self.failed)}" if n else "")
            + (
                "  (ok* = absent from the candidate, but the runtime's fallback is the reference value)"
                if any(f.status == "default" for f in self.fields)
                else ""
            )
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "reference": self.reference,
                "candidate": self.candidate,
                "candidate_kind": self.candidate_kind,
                "exit_code": self.exit_code,
                "error": self.error,
                "fields": strict([asdict(f) | {"ok": f.ok} for f in self.fields]),
            },
            indent=1,
            default=str,
            allow_nan=False,
        )


def show(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return f"[{', '.join(map(str, v[:12]))}, ... ({len(v)})]"
    return str(v) if v is not None else "absent"


# -- the reference ------------------------------------------------------------------------------------------


def reference_facts(path: Path) -> dict:
    """Everything the reference says, as plain values: config.json via gemma2_ref's parser, plus the tokenizer
    files next to it (which tokens are special, add_bos_token)."""
    cfg = load_config(path)
    directory = path if path.is_dir() else path.parent
    facts = {
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "sliding_window": cfg.sliding_window,
        "sliding_layers": [i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i)],
        "query_pre_attn_scalar": float(cfg.query_pre_attn_scalar),
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0],
        "eos_token_ids": list(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
        "add_bos_token": True,
        "add_eos_token": False,
        "special_tokens": {cfg.pad_token_id, cfg.bos_token_id, *cfg.eos_token_ids, START_OF_TURN, END_OF_TURN},
    }
    tok_config = directory / "tokenizer_config.json"
    if tok_config.is_file():
        tc = checked_tokenizer_config(read_json(tok_config), tok_config)
        facts["add_bos_token"] = bool(tc.get("add_bos_token", True))
        facts["add_eos_token"] = bool(tc.get("add_eos_token", False))
        for tid, entry in (tc.get("added_tokens_decoder") or {}).items():
            if entry.get("special") and int(tid) < cfg.vocab_size:
                facts["special_tokens"].add(int(tid))
    facts["special_tokens"] = sorted(facts["special_tokens"])
    return facts


def checked_tokenizer_config(tc, path: Path) -> dict:
    """tokenizer_config.json's keys that check-config reads: add_bos_token / add_eos_token booleans,
    added_tokens_decoder an object {token id: {"special": bool, ...}}."""

    def bad(key, value, expected):
        return JSONFileError(f"{path}: `{key}` is {shown(value)}; expected {expected}")

    if not isinstance(tc, dict):
        raise bad("(the whole file)", tc, "a JSON object")
    for key in ("add_bos_token", "add_eos_token"):
        if tc.get(key) is not None and not isinstance(tc[key], bool):
            raise bad(key, tc[key], "true or false")
    decoder = tc.get("added_tokens_decoder")
    if decoder is not None and not isinstance(decoder, dict):
        raise bad("added_tokens_decoder", decoder, "an object {token id: {content, special, ...}}")
    for tid, entry in (decoder or {}).items():
        if not tid.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("special", False), bool):
            raise bad(
                f"added_tokens_decoder.{tid}",
                entry,
                "a token id (digits) mapped to an object whose `special` is true or false",
            )
    return tc


# -- a GGUF candidate ---------------------------------------------------------------------------------------


class GGUFFacts:
    """A GGUF's metadata through gguf-py's reader; `get(key)` is None for an absent key."""

    def __init__(self, path: Path):
        from .optional import require

        gguf = require("gguf", "check-config on a GGUF file")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError... on a damaged file
            raise ConfigCheckError(f"{path}: gguf could not read it as GGUF ({type(e).__name__}: {e})") from None
        self.path = path
        self.arch = self.get("general.architecture") or "?"

    def get(self, key: str):
        """The key's value, None when absent; a value of the wrong type for its key is refused, naming both."""
        f = self.reader.fields.get(key)
        if f is None:
            return None
        try:
            value = f.contents()
        except Exception as e:  # gguf-py on a damaged field
            raise ConfigCheckError(f"{self.path}: GGUF key {key}: unreadable ({type(e).__name__}: {e})") from None
        arch = getattr(self, "arch", None)
        expected = GGUF_KINDS.get(key[len(arch) + 1 :] if arch and key.startswith(arch + ".") else key)
        if expected is not None and not gguf_value_is(value, expected):
            raise ConfigCheckError(
                f"{self.path}: GGUF key {key} is {shown(value)}; expected "
                f"{GGUF_KIND_TEXT[expected]}: "
                f"the file is damaged or was not written by a GGUF converter"
            )
        return value

    def arch_key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"


# The type each GGUF key gemma2-ref reads must have (keys under the architecture without its prefix)
GGUF_KINDS = {
    **dict.fromkeys(
        (
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "context_length",
            "attention.sliding_window",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.eot_token_id",
        ),
        "count",
    ),
    **dict.fromkeys(
        ("attn_logit_softcapping", "final_logit_softcapping", "rope.freq_base", "attention.layer_norm_rms_epsilon"),
        "number",
    ),
    **dict.fromkeys(("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"), "bool"),
    "general.architecture": "str",
    "tokenizer.ggml.tokens": "strings",
    "tokenizer.ggml.token_type": "counts",
    "attention.sliding_window_pattern": "pattern",
}
GGUF_KIND_TEXT = {
    "count": "an integer >= 0",
    "number": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "strings": "a list of strings",
    "counts": "a list of integers",
    "pattern": "an integer >= 0 or a list of booleans (one per layer)",
}


def gguf_value_is(value, kind: str) -> bool:
    if kind == "count":
        return is_int(value) and value >= 0
    if kind == "number":
        return is_number(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind in ("strings", "counts"):
        return isinstance(value, list) and all(isinstance(v, str) if kind == "strings" else is_int(v) for v in value)
    return (is_int(value) and value >= 0) or (isinstance(value, list) and all(isinstance(v, bool) for v in value))


def compare_gguf(ref: dict, g: GGUFFacts) -> list[Field]:
    """Gemma 2's facts against a GGUF's metadata, in the report's order: the architecture, the shapes, the
    attention (soft-caps, window, query scale, RoPE, norm epsilon), the tokenizer."""
    return [gguf_architecture_field(g), *gguf_shape_fields(ref, g), *gguf_attention_fields(ref, g)] + (
        gguf_tokenizer_fields(ref, g)
    )


def gguf_key_field(
    ref: dict, g: GGUFFacts, name, key, reports="", fallback=None, fallback_note="", tolerance=0.0, pass_fallback=True
) -> Field:
    """One scalar: the key's value, else llama.cpp's fallback (status default if it equals the reference)."""
    value = g.get(key)
    if value is None:
        status = "default" if pass_fallback and close(fallback, ref[name], tolerance) else "missing"
        return Field(name, ref[name], fallback, status, key, f"key absent; {fallback_note}".rstrip("; "), reports)
    status = "match" if close(value, ref[name], tolerance) else "mismatch"
    return Field(name, ref[name], value, status, key, "", reports)


def gguf_architecture_field(g: GGUFFacts) -> Field:
    arch = g.arch
    return Field(
        "architecture",
        "gemma2",
        arch,
        "match" if arch == "gemma2" else "mismatch",
        "general.architecture",
        "" if arch == "gemma2" else "llama.cpp runs it as another model",
        REPORTS["shape"],
    )


GGUF_SHAPE_KEYS = {
    "num_hidden_layers": "block_count",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "max_position_embeddings": "context_length",
}


def gguf_shape_fields(ref: dict, g: GGUFFacts) -> list[Field]:
    """The model's dimensions; a missing head_dim is llama.cpp's n_embd / n_head."""
    out = [
        gguf_key_field(ref, g, name, g.arch_key(suffix), REPORTS["shape"]) for name, suffix in GGUF_SHAPE_KEYS.items()
    ]
    n_embd, n_head = g.get(g.arch_key("embedding_length")), g.get(g.arch_key("attention.head_count"))
    head_dim_derived(
        out[[f.name for f in out].index("head_dim")], ref, n_embd, n_head, "llama.cpp then takes n_embd / n_head"
    )
    return out


def gguf_attention_fields(ref: dict, g: GGUFFacts) -> list[Field]:
    """Soft-caps, sliding window and layers, query scale, RoPE base, RMSNorm epsilon."""
    out = []
    # soft-caps: llama.cpp falls back to Gemma 2's values, but the GGUF is still wrong for every other loader
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        out.append(
            gguf_key_field(
                ref,
                g,
                name,
                g.arch_key(name),
                REPORTS["softcap_key"],
                50.0 if name.startswith("attn") else 30.0,
                "llama.cpp falls back to this (src/llama-hparams.h:134/136); vLLM's and transformers' GGUF "
                "loaders run without a soft-cap",
                1e-6,
                pass_fallback=False,
            )
        )
        if out[-1].status == "mismatch":
            out[-1].report = REPORTS["softcap"]
    window_note = "llama.cpp uses 4096 (src/models/gemma2.cpp:5); other GGUF loaders have no default"
    window_key = g.arch_key("attention.sliding_window")
    out.append(
        gguf_key_field(
            ref, g, "sliding_window", window_key, REPORTS["window_key"], 4096, window_note, pass_fallback=False
        )
    )
    out.append(sliding_layers_field(ref, g))
    out.append(query_scale_field(ref, g))
    rope_note = "llama.cpp uses 10000 (src/llama-model.cpp:1414)"
    out.append(gguf_key_field(ref, g, "rope_theta", g.arch_key("rope.freq_base"), "", 10000.0, rope_note, 1e-6))
    eps_key = g.arch_key("attention.layer_norm_rms_epsilon")
    out.append(gguf_key_field(ref, g, "rms_norm_eps", eps_key, "", tolerance=1e-6))
    return out


def gguf_tokenizer_fields(ref: dict, g: GGUFFacts) -> list[Field]:
    """The vocabulary, the special ids, the turn and special tokens, and llama.cpp's BOS / EOS policy."""
    tokens = g.get("tokenizer.ggml.tokens") or []
    vocab = "match" if len(tokens) == ref["vocab_size"] else "mismatch"
    return [
        Field("vocab_size", ref["vocab_size"], len(tokens), vocab, "tokenizer.ggml.tokens", "", REPORTS["shape"]),
        gguf_key_field(
            ref,
            g,
            "bos_token_id",
            "tokenizer.ggml.bos_token_id",
            REPORTS["bos"],
            1,
            "llama.cpp's SentencePiece default is 1 (src/llama-vocab.cpp:1975)",
        ),
        gguf_key_field(
            ref,
            g,
            "eos_token_id",
            "tokenizer.ggml.eos_token_id",
            REPORTS["eos"],
            2,
            "llama.cpp's SentencePiece default is 2, Gemma's <bos> (src/llama-vocab.cpp:1976)",
        ),
        gguf_key_field(ref, g, "pad_token_id", "tokenizer.ggml.padding_token_id", "", None, "no padding token"),
        *turn_token_fields(ref, g, tokens),
        special_tokens_field(ref, g, tokens),
        gguf_key_field(
            ref,
            g,
            "add_bos_token",
            "tokenizer.ggml.add_bos_token",
            REPORTS["bos"],
            True,
            "llama.cpp adds BOS for SentencePiece (src/llama-vocab.cpp:2434)",
        ),
        gguf_key_field(
            ref,
            g,
            "add_eos_token",
            "tokenizer.ggml.add_eos_token",
            "",
            False,
            "llama.cpp adds no EOS for SentencePiece (src/llama-vocab.cpp:2435)",
        ),
    ]


def head_dim_derived(field: Field, ref: dict, hidden, heads, absent_note: str) -> None:
    """Name a head_dim that is hidden_size / heads where the reference's is not (litgpt #1545): the value a
    converter derives when it does not read head_dim, or what a loader falls back to when the key is absent."""
    if not hidden or not heads or hidden % heads or hidden // heads == ref["head_dim"]:
        return
    derived = hidden // heads
    if field.status == "missing":
        field.note = f"key absent; {absent_note} = {hidden} / {heads} = {derived}, not {ref['head_dim']}"
        field.report = REPORTS["head_dim"]
    elif field.status == "mismatch" and field.candidate == derived:
        field.note = f"{derived} = hidden_size / num_attention_heads ({hidden} / {heads})"
        field.report = REPORTS["head_dim"]


def close(a, b, tolerance: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=0.0) if tolerance else a == b
    return a == b


def sliding_layers_field(ref: dict, g: GGUFFacts) -> Field:
    """Which layers slide: a per-layer bool array, an integer pattern, or llama.cpp's Gemma 2 default of 2."""
    key = g.arch_key("attention.sliding_window_pattern")
    pattern = g.get(key)
    n = g.get(g.arch_key("block_count")) or ref["num_hidden_layers"]
    if isinstance(pattern, list):
        layers, note = [i for i, s in enumerate(pattern) if s], ""
    else:
        p = 2 if pattern is None else int(pattern)
        layers = [i for i in range(n) if p == 0 or i % p < p - 1]  # src/llama-hparams.cpp:15
        note = (
            ""
            if pattern is not None
            else "key absent; llama.cpp's Gemma 2 pattern 2 slides layers 0, 2, 4, ... (src/models/gemma2.cpp:6, "
            "src/llama-hparams.cpp:15)"
        )
    same = layers == ref["sliding_layers"]
    status = ("match" if pattern is not None else "default") if same else "mismatch"
    return Field("sliding_layers", ref["sliding_layers"], layers, status, key, note, REPORTS["window"])


def llama_cpp_query_scalar(n_layers: int, n_embd: int, n_head: int, head_dim: int) -> float:
    """The x in llama.cpp's query scale x^-0.5 for Gemma 2 (src/models/gemma2.cpp:25-27): n_embd / n_head for
    a 46-layer model (what it takes for 27B), head_dim for any other."""
    return float(n_embd // n_head) if n_layers == 46 else float(head_dim)


def query_scale_field(ref: dict, g: GGUFFacts) -> Field:
    n_layers = g.get(g.arch_key("block_count")) or 0
    n_embd = g.get(g.arch_key("embedding_length")) or 0
    n_head = g.get(g.arch_key("attention.head_count")) or 1
    head_dim = g.get(g.arch_key("attention.key_length")) or (n_embd // n_head)
    implied = llama_cpp_query_scalar(n_layers, n_embd, n_head, head_dim)
    why = (
        "n_embd / n_head, as it does for any 46-layer model"
        if n_layers == 46
        else "head_dim: it uses n_embd / n_head only for 46 layers"
    )
    rule = (
        f"GGUF has no key for query_pre_attn_scalar; llama.cpp scales queries by 1/sqrt({implied:g}) "
        f"({why}, src/models/gemma2.cpp:25-27)"
    )
    ok = math.isclose(implied, ref["query_pre_attn_scalar"], rel_tol=1e-9)
    return Field(
        "query_pre_attn_scalar",
        ref["query_pre_attn_scalar"],
        implied,
        "default" if ok else "mismatch",
        None,
        rule,
        REPORTS["query_scale"],
    )


def turn_token_fields(ref: dict, g: GGUFFacts, tokens: list) -> list[Field]:
    """<start_of_turn> 106 and <end_of_turn> 107: present with their text, and 107 an end of generation."""
    out = []
    for tid, text in TURN_TEXT.items():
        found = tokens[tid] if tid < len(tokens) else None
        out.append(
            Field(
                f"token_{tid}",
                text,
                found,
                "match" if found == text else "mismatch",
                f"tokenizer.ggml.tokens[{tid}]",
                "",
                REPORTS["special"],
            )
        )
    eot = g.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        out.append(
            Field(
                "end_of_turn_id",
                END_OF_TURN,
                eot,
                "match" if eot == END_OF_TURN else "mismatch",
                "tokenizer.ggml.eot_token_id",
                "",
                REPORTS["eos"],
            )
        )
    else:
        detected = END_OF_TURN < len(tokens) and tokens[END_OF_TURN] == TURN_TEXT[END_OF_TURN]
        out.append(
            Field(
                "end_of_turn_id",
                END_OF_TURN,
                END_OF_TURN if detected else None,
                "default" if detected else "missing",
                "tokenizer.ggml.eot_token_id",
                "key absent; llama.cpp finds <end_of_turn> by its text (src/llama-vocab.cpp:2699)"
                if detected
                else "key absent and no <end_of_turn> token to find by text",
                REPORTS["eos"],
            )
        )
    return out


def special_tokens_field(ref: dict, g: GGUFFacts, tokens: list) -> Field:
    """Every token the reference treats as special must be CONTROL or USER_DEFINED in the GGUF, or llama.cpp's
    tokenizer splits its text into ordinary pieces. <end_of_turn> alone is repaired at load (by text)."""
    types = g.get("tokenizer.ggml.token_type") or []
    wrong = {}
    for tid in ref["special_tokens"]:
        t = types[tid] if tid < len(types) else None
        if t not in (CONTROL, USER_DEFINED):
            wrong[tid] = f"{tokens[tid] if tid < len(tokens) else '?'} {TOKEN_TYPE_NAMES.get(t, t)}"
    note = ""
    if wrong:
        note = (
            "not marked special: "
            + ", ".join(f"{tid} {w}" for tid, w in wrong.items())
            + "; llama.cpp tokenizes their text as ordinary pieces (it re-marks only <end_of_turn>, "
            "src/llama-vocab.cpp:2711). Convert from a checkpoint whose tokenizer_config.json lists them "
            "in added_tokens_decoder with special: true"
        )
    return Field(
        "special_tokens",
        ref["special_tokens"],
        sorted(set(ref["special_tokens"]) - set(wrong)),
        "mismatch" if wrong else "match",
        "tokenizer.ggml.token_type",
        note,
        REPORTS["special"],
    )


# -- a config.json candidate --------------------------------------------------------------------------------


def compare_config_json(ref: dict, d: dict, source: str = "config.json") -> list[Field]:
    """Another framework's config.json, read key by key (not through gemma2_ref's parser, which would refuse
    or default exactly the values we want to see)."""
    d = checked_candidate(d, source)

    def one(name, value, key, report="", tolerance=0.0, note=""):
        return json_key_field(ref, name, value, key, report, tolerance, note)

    out = [one(name, d.get(name), name, REPORTS["shape"]) for name in JSON_SHAPE_KEYS]
    head_dim_derived(
        out[[f.name for f in out].index("head_dim")],
        ref,
        d.get("hidden_size"),
        d.get("num_attention_heads"),
        "loaders then take hidden_size / num_attention_heads",
    )
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        note = "" if d.get(name) is not None else "absent or null: no soft-cap is applied"
        out.append(one(name, d.get(name), name, REPORTS["softcap"], 1e-6, note))
    out.append(one("sliding_window", d.get("sliding_window"), "sliding_window", REPORTS["window"]))
    out.append(json_sliding_layers_field(ref, d))
    q = d.get("query_pre_attn_scalar")
    q = None if q is None else float(q)
    out.append(one("query_pre_attn_scalar", q, "query_pre_attn_scalar", REPORTS["query_scale"], 1e-9))
    rope = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta"))  # both checked numbers
    out.append(
        one("rope_theta", None if rope is None else float(rope), "rope_theta / rope_parameters.rope_theta", "", 1e-6)
    )
    out.append(one("rms_norm_eps", d.get("rms_norm_eps"), "rms_norm_eps", "", 1e-6))
    out.append(one("bos_token_id", d.get("bos_token_id"), "bos_token_id", REPORTS["bos"]))
    out.append(json_eos_field(ref, d))
    out.append(one("pad_token_id", d.get("pad_token_id"), "pad_token_id"))
    return out


JSON_SHAPE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "vocab_size",
)


def json_key_field(ref: dict, name, value, key, report="", tolerance=0.0, note="") -> Field:
    """One config.json value against the reference's (missing when absent or null)."""
    if value is None:
        return Field(name, ref[name], None, "missing", key, note or "absent or null", report)
    return Field(
        name, ref[name], value, "match" if close(value, ref[name], tolerance) else "mismatch", key, note, report
    )


def json_sliding_layers_field(ref: dict, d: dict) -> Field:
    """Which layers slide: `layer_types`, or transformers' alternation when it is absent (status default)."""
    layer_types = d.get("layer_types")
    n = d.get("num_hidden_layers") or ref["num_hidden_layers"]
    if isinstance(layer_types, list):
        layers, note = [i for i, t in enumerate(layer_types) if t == "sliding_attention"], ""
    else:
        layers = [i for i in range(n) if i % 2 == 0]
        note = "no layer_types: transformers' Gemma2Config alternates, layers 0, 2, 4, ... slide"
    status = (
        ("match" if isinstance(layer_types, list) else "default") if layers == ref["sliding_layers"] else "mismatch"
    )
    return Field("sliding_layers", ref["sliding_layers"], layers, status, "layer_types", note, REPORTS["window"])


def json_eos_field(ref: dict, d: dict) -> Field:
    """`eos_token_id` (one id or a list) against the reference's stop ids, in any order."""
    eos = d.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else None if eos is None else [eos]
    status = (
        "missing" if eos_ids is None else "match" if sorted(eos_ids) == sorted(ref["eos_token_ids"]) else "mismatch"
    )
    return Field("eos_token_ids", ref["eos_token_ids"], eos_ids, status, "eos_token_id", "", REPORTS["eos"])


CANDIDATE_COUNTS = (
    *JSON_SHAPE_KEYS,
    "sliding_window",
    "bos_token_id",
    "pad_token_id",
)
CANDIDATE_NUMBERS = (
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "rope_theta",
    "rms_norm_eps",
)


def checked_candidate(d: dict, source: str) -> dict:
    """A candidate config.json's keys that check-config reads, each of its type or null (absent): one line
    naming the file, the key and the value otherwise (a list where a number belongs is not a mismatch)."""

    def bad(key, expected):
        value = d[key] if key in d else d["rope_parameters"]["rope_theta"]
        return ConfigCheckError(f"{source}: `{key}` is {shown(value)}; expected {expected} (or null)")

    for key in CANDIDATE_COUNTS:
        if d.get(key) is not None and not (is_int(d[key]) and d[key] >= 0):
            raise bad(key, "an integer >= 0")
    for key in CANDIDATE_NUMBERS:
        if d.get(key) is not None and not is_number(d[key]):
            raise bad(key, "a finite number")
    rope = d.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise bad("rope_parameters", "an object {rope_type, rope_theta}")
    if rope and rope.get("rope_theta") is not None and not is_number(rope["rope_theta"]):
        raise bad("rope_parameters.rope_theta", "a finite number")
    types = d.get("layer_types")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        raise bad("layer_types", 'a list of strings ("sliding_attention" or "full_attention")')
    eos = d.get("eos_token_id")
    if eos is not None and not (
        (is_int(eos) and eos >= 0) or (isinstance(eos, list) and eos and all(is_int(t) and t >= 0 for t in eos))
    ):
        raise bad("eos_token_id", "an integer or a non-empty list of integers")
    return d


# -- entry point --------------------------------------------------------------------------------------------


def candidate_kind(path: Path) -> str:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigCheckError(f"{path}: no such file (the candidate is a .gguf file or a config.json)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if magic.lstrip()[:1] == b"{":
        return "config.json"
    raise ConfigCheckError(f"{path}: neither a GGUF (no 'GGUF' magic) nor a JSON config.json")


def resolve_reference(reference) -> Path:
    """A checkpoint directory, a config.json, or a bundled model's name ("tiny")."""
    path = Path(reference)
    if path.exists():
        return path
    from ..data import bundled_path

    bundled = bundled_path(str(reference))
    if bundled is None:
        raise ConfigError(f"{reference}: no such checkpoint directory or config.json, nor a bundled model")
    return bundled


def check(reference, candidate) -> ConfigReport:
    """Compare a candidate's converted hyper-parameters with the reference config; never raises on bad input:
    the report carries the error (exit code 2)."""
    candidate = Path(candidate)
    report = ConfigReport(str(reference), str(candidate), "?")
    try:
        ref = reference_facts(resolve_reference(reference))
    except (ConfigError, OSError, JSONFileError) as e:
        report.error = f"reference: {e}"
        return report
    try:
        report.candidate_kind = candidate_kind(candidate)
        if report.candidate_kind == "gguf":
            report.fields = compare_gguf(ref, GGUFFacts(candidate))
        else:
            path = candidate / "config.json" if candidate.is_dir() else candidate
            try:
                d = read_json(path)
            except JSONFileError as e:
                raise ConfigCheckError(str(e)) from None
            if not isinstance(d, dict):
                raise ConfigCheckError(f"{path}: expected a JSON object, found {kind(d)}")
            report.fields = compare_config_json(ref, d, str(path))
    except (ConfigCheckError, OSError) as e:
        report.error = str(e)
    return report

"""The one JSON reader for every file gemma2-ref reads (config.json, safetensors headers, shard indexes,
manifests, suite.json, check-config's inputs, --name-map): bounded in size and nesting depth, strict about
what JSON is, and every error one line naming the file.

Python's `json` accepts what no tool wrote (NaN, Infinity, 1e999 read as inf, a key given twice: the last
wins silently) and recurses once per nesting level (a file nested 100,000 deep raises RecursionError). Here
each of those is a `JSONFileError` naming the file and what to do, and the shape of what was read is the
caller's to check (`expect` helps: "the key `x` of FILE must be a list of integers, found ...").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MAX_BYTES = 64 << 20  # no JSON file the tool reads is this large (a 27B's safetensors index is ~30 KiB)
MAX_DEPTH = 32  # the deepest file gemma2-ref writes or reads nests 5 levels


class JSONFileError(ValueError):
    """A file that is not the JSON the tool reads. The message names the file."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} overflows a float")
    return value


def _object(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key[:80]!r} is given twice in one object (which one is meant?)")
        out[key] = value
    return out


def depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((child, d + 1) for child in (v.values() if isinstance(v, dict) else v))
    return deepest


def loads(data: bytes | str, source: str, max_depth: int = MAX_DEPTH):
    """Parse JSON text read from `source` (named in every error): UTF-8, no NaN / Infinity / overflowing
    numbers, no key given twice in one object, nesting at most `max_depth` levels."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{source}: not UTF-8 text (byte {e.start}): not a JSON file") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_object)
    except RecursionError:
        raise JSONFileError(
            f"{source}: JSON nested too deeply to read (more than {max_depth} levels are "
            f"never written by a tool this reads)"
        ) from None
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # our hooks, or an integer of more digits than Python converts
        raise JSONFileError(f"{source}: {e}") from None
    if depth(value) > max_depth:
        raise JSONFileError(
            f"{source}: JSON nested {depth(value)} levels deep, more than the {max_depth} any file the tool reads has"
        )
    return value


def read_json(path: str | Path, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """Read and parse a JSON file (see `loads`), refusing one larger than `max_bytes`, a directory or a
    dangling link with a line naming it. OSError (missing, permissions) is left to the caller."""
    path = Path(path)
    if path.is_dir():
        raise JSONFileError(f"{path}: a directory, not a JSON file")
    size = path.stat().st_size
    if size > max_bytes:
        raise JSONFileError(f"{path}: {size:,} bytes, larger than the {max_bytes:,} a JSON file the tool reads may be")
    with open(path, "rb") as f:
        return loads(f.read(max_bytes + 1), str(path), max_depth)


def kind(value) -> str:
    """A JSON value's type as JSON names it, for messages: "a string", "null", "a list", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


def shown(value, limit: int = 60) -> str:
    """A value as it would be written in the file, cut to `limit` characters, for messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value) -> bool:
    """A JSON integer (true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite JSON number (true and false are not)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def strict(value):
    """`value` ready for strict JSON: every NaN or infinite float written as the string "nan" / "inf" / "-inf"
    (json.dumps would write the bare NaN no JSON reader accepts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value

"""The command line's option types and the options that cannot go together: usage errors, found before any
work starts, each one line naming the option (exit code 2). cli.py declares the options with these."""

from __future__ import annotations

import argparse
import math
import sys


class UsageError(Exception):
    """A command line that argparse refused, as one line; cli.main prints it and returns 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line, naming the option (and returned, not exited, by cli.main)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def number(kind, low=None, high=None, above=False, what=""):
    """An argparse type: an int or a finite float in [low, high] (in (low, high] with above=True)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (
            math.isfinite(value)
            and (low is None or value > low or (value == low and not above))
            and (high is None or value <= high)
        ):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if kind is float and value != 0 and abs(value) < sys.float_info.min:
            raise argparse.ArgumentTypeError(
                f"{text!r} underflows: a number this small is not one a computation "
                f"can use (the smallest is {sys.float_info.min:.3g}); give 0 or more"
            )
        return value

    return parse


COUNT = number(int, 1, what="an integer >= 1")
SEED = number(int, 0, what="an integer >= 0")
NONNEGATIVE = number(float, 0.0, what="a finite number >= 0")
FRACTION = number(float, 0.0, 1.0, what="a fraction in [0, 1]")
PROBABILITY = number(float, 0.0, 1.0, above=True, what="a probability in (0, 1]")


def utf8_text(text: str) -> str:
    """--prompt and TEXT: what the command line gave, which must be UTF-8 (the tokenizer reads nothing else;
    Python hands undecodable bytes over as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(
            f"not UTF-8 text (byte 0x{raw.hex()} at character {e.start}): give the "
            f"text in UTF-8, e.g. convert it with iconv -t UTF-8"
        ) from None
    return text


def position_range(text: str) -> tuple[int, int | None]:
    """--positions START:STOP -> (start, stop or None: to the end); checked against the prompt later."""
    start, colon, stop = text.partition(":")
    try:
        span = int(start or 0), (int(stop) if stop.strip() else None)
    except ValueError:
        span = None
    if not colon or span is None or span[0] < 0 or (span[1] is not None and span[1] <= span[0]):
        raise argparse.ArgumentTypeError(f"expected START:STOP with 0 <= START < STOP, e.g. 4094:4098, got {text!r}")
    return span


def tap_set(text: str) -> str:
    """--taps: a named set or comma-separated names / globs, not nothing (that would store only logits)."""
    if not text.replace(",", " ").split():
        raise argparse.ArgumentTypeError(
            "an empty list would store only the logits: give default, all, residual "
            "or tap names / globs, "
            "e.g. 'embed,layers.*.output,logits'"
        )
    return text


def conflict(args) -> str | None:
    """Two options given together where one would be silently ignored, as a sentence; None if all apply."""

    def given(name):
        return getattr(args, name, None)

    rules = [
        (
            given("chat") and given("tokens") is not None,
            "--chat cannot be combined with --tokens: the chat template wraps --prompt text; "
            "--tokens are used as given",
        ),
        (
            given("no_bos") and given("tokens") is not None,
            "--no-bos cannot be combined with --tokens: --no-bos applies to --prompt text; --tokens are used as given",
        ),
        (
            given("no_bos") and given("chat"),
            "--no-bos cannot be combined with --chat: the chat template starts with <bos> (Gemma's chat format)",
        ),
        (
            given("suite") and (given("chat") or given("no_bos") or given("positions")),
            "--suite chooses its own inputs and stored positions: drop --chat, --no-bos and --positions",
        ),
        (
            given("backend") == "gemma2_ref" and given("attn_implementation") not in (None, "eager"),
            "--attn-implementation applies to another backend's attention (e.g. --backend transformers)",
        ),
        (
            args.command == "generate" and not given("temperature") and (given("top_k") or given("top_p")),
            "--top-k and --top-p shape sampling, and --temperature 0 (the default) is greedy decoding: give "
            "--temperature > 0",
        ),
    ]
    return next((why for hit, why in rules if hit), None)

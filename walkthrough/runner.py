"""Run the walkthrough's chapters and check that the outputs printed in the text are what the code prints.

A chapter is Markdown. Every ```python block is code; the ```text block that follows it (with nothing but
blank lines in between) is the exact standard output that block prints. The blocks of one chapter run in
order in one namespace; each chapter starts with a fresh namespace, in the repository root.

    python -m walkthrough.runner --check            # every chapter; non-zero exit and a diff on any mismatch
    python -m walkthrough.runner --check 05         # chapters whose file name contains "05"
    python -m walkthrough.runner --update           # rewrite the ```text blocks from real output

The chapters run with one BLAS thread (set here before NumPy is imported, unless already set): the tiny
model's matrices are so small that a multi-threaded OpenBLAS spends its time waiting for threads, up to
100x slower on a busy machine, and the printed outputs are the same either way.

Comparison is exact, with one allowance: a number written with a decimal point or an exponent may differ by
one unit in its last printed digit (float32 sums are accumulated in a different order by different BLAS
builds, which can move a rounded last digit). Integers, words and everything else must match exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

WALKTHROUGH = Path(__file__).resolve().parent
ROOT = WALKTHROUGH.parent
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")


@dataclass
class Block:
    code: str
    line: int  # 1-based line of the ```python fence
    expected: str | None  # the ```text block's content, or None if the block has none
    text_span: tuple[int, int] | None = None  # (first, last) line index of the ```text fences, 0-based


@dataclass
class Chapter:
    path: Path
    lines: list[str]
    blocks: list[Block] = field(default_factory=list)


def chapters(pattern: str | None = None) -> list[Path]:
    """The chapter files in reading order (NN-name.md), optionally those whose name contains `pattern`."""
    found = sorted(p for p in WALKTHROUGH.glob("[0-9][0-9]-*.md"))
    return [p for p in found if pattern is None or pattern in p.name]


def parse(path: Path) -> Chapter:
    lines = path.read_text(encoding="utf-8").split("\n")
    chapter = Chapter(path, lines)
    fences = []  # (kind, start index, end index)
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            j = i + 1
            while j < len(lines) and lines[j].rstrip() != "```":
                j += 1
            if j == len(lines):
                raise SyntaxError(f"{path.name}:{i + 1}: code fence ``` not closed")
            fences.append((m.group(1), i, j))
            i = j + 1
        else:
            i += 1
    for n, (kind, start, end) in enumerate(fences):
        if kind != "python":
            continue
        code = "\n".join(lines[start + 1:end]) + "\n"
        expected, span = None, None
        if n + 1 < len(fences) and fences[n + 1][0] == "text":
            _, t0, t1 = fences[n + 1]
            if all(not line.strip() for line in lines[end + 1:t0]):
                expected = "\n".join(lines[t0 + 1:t1]) + "\n" if t1 > t0 + 1 else ""
                span = (t0, t1)
        chapter.blocks.append(Block(code, start + 1, expected, span))
    return chapter


def run(chapter: Chapter) -> list[str]:
    """Execute the chapter's blocks in order in one namespace; the stdout of each block."""
    namespace = {"__name__": "__walkthrough__"}
    outputs = []
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for n, block in enumerate(chapter.blocks, start=1):
            buffer = io.StringIO()
            try:
                code = compile(block.code, f"{chapter.path.name} block {n} (line {block.line})", "exec")
                with contextlib.redirect_stdout(buffer):
                    exec(code, namespace)
            except Exception as e:
                tb = traceback.format_exc()
                raise ChapterError(f"{chapter.path.name}: block {n} (line {block.line}) raised "
                                   f"{type(e).__name__}: {e}\n{tb}") from e
            outputs.append(buffer.getvalue())
    finally:
        os.chdir(cwd)
    return outputs


class ChapterError(RuntimeError):
    pass


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _tokens(text: str) -> list[str]:
    """Numbers and the runs of text between them."""
    out, pos = [], 0
    for m in _NUMBER.finditer(text):
        out.append(text[pos:m.start()])
        out.append(m.group())
        pos = m.end()
    out.append(text[pos:])
    return out


def _last_digit_unit(s: str) -> Decimal:
    mantissa, _, exponent = s.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return Decimal(1).scaleb(-decimals + (int(exponent) if exponent else 0))


def same_output(expected: str, actual: str) -> bool:
    """Exact, except that decimal numbers may differ by one unit in their last printed digit."""
    if expected == actual:
        return True
    a, b = _tokens(expected), _tokens(actual)
    if len(a) != len(b):
        return False
    for k, (x, y) in enumerate(zip(a, b)):
        if x == y:
            continue
        if k % 2 == 0:  # text between numbers
            return False
        if not any(c in x + y for c in ".eE"):  # integers must match exactly
            return False
        try:
            if abs(Decimal(x) - Decimal(y)) > max(_last_digit_unit(x), _last_digit_unit(y)):
                return False
        except InvalidOperation:
            return False
        if _last_digit_unit(x) != _last_digit_unit(y):
            return False
    return True


def check(chapter: Chapter, outputs: list[str]) -> list[str]:
    """A diff per block whose printed output differs from its ```text block."""
    problems = []
    for n, (block, actual) in enumerate(zip(chapter.blocks, outputs), start=1):
        expected = block.expected if block.expected is not None else ""
        if same_output(expected, actual):
            continue
        where = f"{chapter.path.name}: block {n} (```python at line {block.line})"
        if block.expected is None:
            where += " has no ```text block, but prints"
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            "text in chapter", "printed by the code"))
        problems.append(f"{where}\n{diff}")
    return problems


def update(chapter: Chapter, outputs: list[str]) -> bool:
    """Rewrite the chapter's ```text blocks from `outputs` (added, replaced, or removed). True if changed."""
    lines = list(chapter.lines)
    # Edit from the end so earlier line numbers stay valid.
    for block, actual in reversed(list(zip(chapter.blocks, outputs))):
        if block.expected is not None and same_output(block.expected, actual):
            continue
        body = actual[:-1].split("\n") if actual.endswith("\n") else actual.split("\n")
        new = ["```text", *body, "```"] if actual else []
        if block.text_span is not None:
            t0, t1 = block.text_span
            if not actual:  # drop the text block and the blank line before it
                t0 = t0 - 1 if t0 > 0 and not lines[t0 - 1].strip() else t0
            lines[t0:t1 + 1] = new
        elif actual:
            end = block.line  # the python block's closing fence follows its code
            while lines[end].rstrip() != "```":
                end += 1
            lines[end + 1:end + 1] = ["", *new]
    if lines == chapter.lines:
        return False
    chapter.path.write_text("\n".join(lines), encoding="utf-8")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="fail with a diff if a chapter's text and code disagree")
    mode.add_argument("--update", action="store_true", help="rewrite the ```text blocks from the real output")
    parser.add_argument("pattern", nargs="?", help="only chapters whose file name contains this")
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    paths = chapters(args.pattern)
    if not paths:
        print(f"no chapter matches {args.pattern!r} in {WALKTHROUGH}", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        chapter = parse(path)
        try:
            outputs = run(chapter)
        except ChapterError as e:
            print(f"FAIL {e}", file=sys.stderr)
            failed += 1
            continue
        if args.update:
            changed = update(chapter, outputs)
            print(f"{'updated' if changed else 'unchanged'} {path.name} ({len(chapter.blocks)} blocks)")
        else:
            problems = check(chapter, outputs)
            for p in problems:
                print(f"FAIL {p}", file=sys.stderr)
            failed += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {path.name} ({len(chapter.blocks)} blocks)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

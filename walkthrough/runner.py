"""Run the walkthrough's chapters and check that the outputs printed in the text are what the code prints.

A chapter is Markdown. Every ```python block is code; the ```text block that follows it (with nothing but
blank lines in between) is the exact standard output that block prints. The blocks of one chapter run in
order in one namespace; each chapter starts with a fresh namespace, in the repository root.

    python -m walkthrough.runner --check            # every chapter; non-zero exit and a diff on any mismatch
    python -m walkthrough.runner --check 05         # chapters whose file name contains "05"
    python -m walkthrough.runner --update           # rewrite the ```text blocks from real output
    python -m walkthrough.runner --explore 06       # run one chapter and show what each block prints, unchecked
    python -m walkthrough.runner --explore my-06.md # ... or your own edited copy of a chapter

A chapter can also show the source of a function of the package, the code it is teaching:

    <!-- source: gemma2_ref.model.rms_norm -->
    ```py
    def rms_norm(...): ...
    ```

The ```py block under the directive is *not* executed and *not* compared: it is a copy of
`inspect.getsource(gemma2_ref.model.rms_norm)` for readers of the Markdown, refreshed by `--update`. `--check`
fails only if the name no longer resolves; a copy that no longer matches the package is reported as a note,
so changing the package never fails the walkthrough (the notebooks and `--explore` render the source live).

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


SOURCE = re.compile(r"^<!--\s*source:\s*([A-Za-z_][\w.]*)\s*-->\s*$")


@dataclass
class Block:
    code: str
    line: int  # 1-based line of the ```python fence
    expected: str | None  # the ```text block's content, or None if the block has none
    text_span: tuple[int, int] | None = None  # (first, last) line index of the ```text fences, 0-based
    span: tuple[int, int] | None = None  # (first, last) line index of the ```python fences, 0-based


@dataclass
class Source:
    """A `<!-- source: module.name -->` directive and the ```py block under it (shown, never run)."""

    name: str
    line: int  # 1-based line of the directive
    shown: str  # the ```py block's content ("" if the directive has no block yet)
    span: tuple[int, int] | None  # (first, last) line index of the ```py fences, 0-based, or None


@dataclass
class Chapter:
    path: Path
    lines: list[str]
    blocks: list[Block] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)


def resolve(name: str):
    """The object a dotted name points to: the longest importable module prefix, then attributes."""
    import importlib

    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {name!r} can be imported")


def source_of(name: str) -> str:
    """The current source text of a package function or class, as `inspect.getsource` returns it."""
    import inspect

    return inspect.getsource(resolve(name))


def show_source(name: str) -> None:
    """Print the current source of `name` (what the notebooks run where a chapter shows package code)."""
    print(source_of(name), end="")


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
        code = "\n".join(lines[start + 1 : end]) + "\n"
        expected, span = None, None
        if n + 1 < len(fences) and fences[n + 1][0] == "text":
            _, t0, t1 = fences[n + 1]
            if all(not line.strip() for line in lines[end + 1 : t0]):
                expected = "\n".join(lines[t0 + 1 : t1]) + "\n" if t1 > t0 + 1 else ""
                span = (t0, t1)
        chapter.blocks.append(Block(code, start + 1, expected, span, (start, end)))
    py_fences = {start: end for kind, start, end in fences if kind == "py"}
    for i, line in enumerate(lines):
        m = SOURCE.match(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j in py_fences:
            end = py_fences[j]
            chapter.sources.append(Source(m.group(1), i + 1, "\n".join(lines[j + 1 : end]) + "\n", (j, end)))
        else:
            chapter.sources.append(Source(m.group(1), i + 1, "", None))
    return chapter


def run(chapter: Chapter, keep_going: bool = False) -> list[str]:
    """Execute the chapter's blocks in order in one namespace; the stdout of each block.

    With `keep_going` (explore mode) a block that raises does not stop the chapter: its output ends with the
    traceback and the next block runs in the same namespace."""
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
                if keep_going:
                    buffer.write(f"{type(e).__name__}: {e}\n{tb}")
                else:
                    raise ChapterError(
                        f"{chapter.path.name}: block {n} (line {block.line}) raised {type(e).__name__}: {e}\n{tb}"
                    ) from e
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
        out.append(text[pos : m.start()])
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
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), actual.splitlines(True), "text in chapter", "printed by the code"
            )
        )
        problems.append(f"{where}\n{diff}")
    for src in chapter.sources:
        try:
            source_of(src.name)
        except Exception as e:  # noqa: BLE001 - any failure to find the source is the chapter's problem
            problems.append(
                f"{chapter.path.name}: line {src.line}: <!-- source: {src.name} --> does not resolve "
                f"({type(e).__name__}: {e}); the chapter teaches a function the package no longer has"
            )
    return problems


def stale_sources(chapter: Chapter) -> list[str]:
    """Names whose ```py copy in the chapter differs from the package's current source (a note, not a failure)."""
    stale = []
    for src in chapter.sources:
        try:
            if src.span is None or src.shown != source_of(src.name):
                stale.append(src.name)
        except Exception:  # noqa: BLE001 - reported by check()
            pass
    return stale


def update(chapter: Chapter, outputs: list[str]) -> bool:
    """Rewrite the chapter's ```text blocks from `outputs` (added, replaced, or removed), and the ```py copies
    under `<!-- source: ... -->` from the package. True if changed."""
    lines = list(chapter.lines)
    edits = [("block", block.line, block, actual) for block, actual in zip(chapter.blocks, outputs)]
    edits += [("source", src.line, src, None) for src in chapter.sources]
    # Edit from the end so earlier line numbers stay valid.
    for kind, _, block, actual in sorted(edits, key=lambda e: e[1], reverse=True):
        if kind == "source":
            body = source_of(block.name).rstrip("\n").split("\n")
            if block.span is not None:
                lines[block.span[0] : block.span[1] + 1] = ["```py", *body, "```"]
            else:
                lines[block.line : block.line] = ["```py", *body, "```"]
            continue
        if block.expected is not None and same_output(block.expected, actual):
            continue
        body = actual[:-1].split("\n") if actual.endswith("\n") else actual.split("\n")
        new = ["```text", *body, "```"] if actual else []
        if block.text_span is not None:
            t0, t1 = block.text_span
            if not actual:  # drop the text block and the blank line before it
                t0 = t0 - 1 if t0 > 0 and not lines[t0 - 1].strip() else t0
            lines[t0 : t1 + 1] = new
        elif actual:
            end = block.line  # the python block's closing fence follows its code
            while lines[end].rstrip() != "```":
                end += 1
            lines[end + 1 : end + 1] = ["", *new]
    if lines == chapter.lines:
        return False
    chapter.path.write_text("\n".join(lines), encoding="utf-8")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="fail with a diff if a chapter's text and code disagree")
    mode.add_argument("--update", action="store_true", help="rewrite the ```text blocks from the real output")
    mode.add_argument(
        "--explore",
        action="store_true",
        help="run and show each block's code and output, without checking (edit a copy, run it)",
    )
    parser.add_argument(
        "pattern", nargs="?", help="only chapters whose file name contains this, or the path of a chapter file"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.pattern and args.pattern.endswith(".md") and Path(args.pattern).is_file():
        paths = [Path(args.pattern).resolve()]
    else:
        paths = chapters(args.pattern)
    if args.explore:
        if not paths:
            print(f"no chapter matches {args.pattern!r} in {WALKTHROUGH}", file=sys.stderr)
            return 2
        for path in paths:
            explore(parse(path))
        return 0
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
            for name in stale_sources(chapter):
                print(
                    f"note {path.name} shows an old copy of {name}: `--update {path.name[:2]}` refreshes it "
                    f"(not a failure)",
                    file=sys.stderr,
                )
    return 1 if failed else 0


def explore(chapter: Chapter) -> None:
    """Print the chapter as it runs now: each block's code, then what it prints (the text is not checked),
    and the package source the chapter shows, read live."""
    rule = "-" * 100
    sources = {src.line: src for src in chapter.sources}
    outputs = run(chapter, keep_going=True)
    items = sorted(
        [(b.line, "block", n, b) for n, b in enumerate(chapter.blocks, start=1)]
        + [(line, "source", 0, src) for line, src in sources.items()],
        key=lambda t: t[0],
    )
    print(f"{chapter.path.name}: {len(chapter.blocks)} blocks (explore mode: outputs are shown, not checked)")
    for line, kind, n, item in items:
        if kind == "source":
            print(f"{rule}\nsource of {item.name} (line {line}), as the package has it now:\n")
            print(source_of(item.name).rstrip("\n"))
            continue
        print(f"{rule}\nblock {n} (line {line}):\n")
        print(item.code.rstrip("\n"))
        out = outputs[n - 1]
        print(f"\n--> prints{' nothing' if not out else ':'}")
        if out:
            print(out.rstrip("\n"))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""Make the walkthrough's chapters into Jupyter notebooks, from the same Markdown the test suite runs.

    python walkthrough/make_notebooks.py            # writes walkthrough/notebooks/NN-name.ipynb
    python walkthrough/make_notebooks.py --check    # exit 1 if a committed notebook differs from its chapter

Every chapter file (`NN-name.md`, found by pattern, as the runner finds them) becomes one notebook: the prose
becomes Markdown cells, each ```python block a code cell, and each `<!-- source: module.name -->` a code cell
that prints the package's source *when it runs* (so the code shown is the code that runs, whatever the package
looks like today). The ```text blocks are left out: running the notebook prints them. The notebooks are
committed without outputs, and `tests/test_notebooks.py` executes them and compares what each cell prints with
the chapter's ```text block, with the runner's rules.

Only the standard library is needed to write them; Jupyter (or `nbclient`) to run them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

WALKTHROUGH = Path(__file__).resolve().parent
sys.path.insert(0, str(WALKTHROUGH.parent))

from walkthrough import runner  # noqa: E402

NOTEBOOKS = WALKTHROUGH / "notebooks"

SETUP = """\
# Setup (not part of the chapter): run from the repository root, one BLAS thread (as the runner does),
# and a helper that prints the package source a chapter shows.
import os, sys, pathlib
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
root = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "gemma2_ref").is_dir())
os.chdir(root)
sys.path.insert(0, str(root))
from walkthrough.runner import show_source"""


def _links(markdown: str) -> str:
    """Relative links as seen from walkthrough/notebooks/: figures one level up, chapters as notebooks."""
    markdown = re.sub(r"\]\(figures/", "](../figures/", markdown)
    markdown = re.sub(r"\]\(notebooks/", "](", markdown)
    markdown = re.sub(
        r"\]\((\d\d-[^)#]+)\.md(#[^)]*)?\)", lambda m: f"]({m.group(1)}.ipynb{m.group(2) or ''})", markdown
    )
    return re.sub(r"\]\(README\.md", "](../README.md", markdown)


def cells(chapter: runner.Chapter) -> list[dict]:
    """The notebook cells of a parsed chapter, in reading order."""
    lines = chapter.lines
    code_at = {}  # first line index -> (last line index, cell source)
    for n, block in enumerate(chapter.blocks, start=1):
        start, end = block.span
        code_at[start] = (block.text_span[1] if block.text_span else end, block.code.rstrip("\n"), n)
    for src in chapter.sources:
        first = src.line - 1
        last = src.span[1] if src.span else first
        code_at[first] = (last, f"show_source({src.name!r})", None)
    out = [_cell("code", SETUP)]
    prose: list[str] = []

    def flush():
        text = "\n".join(prose).strip("\n")
        if text:
            out.append(_cell("markdown", _links(text)))
        prose.clear()

    i = 0
    while i < len(lines):
        if i in code_at:
            flush()
            last, source, block = code_at[i]
            out.append(_cell("code", source))
            if block is not None:  # the test compares this cell's output with the chapter's block `block`
                out[-1]["metadata"]["walkthrough_block"] = block
            i = last + 1
        else:
            prose.append(lines[i])
            i += 1
    flush()
    for n, cell in enumerate(out):
        cell["id"] = f"cell-{n:03d}"  # stable ids: regenerating an unchanged chapter changes nothing
    return out


def _cell(kind: str, source: str) -> dict:
    cell = {"cell_type": kind, "id": "", "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def notebook(path: Path) -> str:
    """The .ipynb text (nbformat 4.5) for one chapter file."""
    nb = {
        "cells": cells(runner.parse(path)),
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "walkthrough": {"chapter": path.name, "generated_by": "walkthrough/make_notebooks.py"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def target(path: Path, out: Path = NOTEBOOKS) -> Path:
    return out / (path.stem + ".ipynb")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Make walkthrough/notebooks/*.ipynb from the chapters.")
    parser.add_argument("--out", type=Path, default=NOTEBOOKS, help=f"output directory (default {NOTEBOOKS})")
    parser.add_argument("--check", action="store_true", help="only report notebooks that differ from the chapters")
    args = parser.parse_args(argv)
    stale = []
    for path in runner.chapters():
        text, dest = notebook(path), target(path, args.out)
        if args.check:
            if not dest.is_file() or dest.read_text(encoding="utf-8") != text:
                stale.append(dest.name)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        print(dest)
    if stale:
        print(
            f"notebooks out of date with their chapters: {stale}; run `python walkthrough/make_notebooks.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

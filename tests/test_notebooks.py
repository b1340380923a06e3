"""The walkthrough as Jupyter notebooks: generated from the chapters by walkthrough/make_notebooks.py, committed
without outputs, and executed here in a real Jupyter kernel. Each code cell must print what the chapter's ```text
block says (the runner's comparison rules), so a notebook reader sees exactly the numbers the text discusses."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from tests.helpers.backends import require
from walkthrough import make_notebooks, runner

CHAPTERS = runner.chapters()


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_committed_notebook_is_generated_from_its_chapter(path):
    committed = make_notebooks.target(path)
    assert committed.is_file() and committed.read_text(encoding="utf-8") == make_notebooks.notebook(path), (
        f"{committed.name} is missing or out of date: run `python walkthrough/make_notebooks.py` and commit"
    )


def test_notebook_shows_package_source_live_and_links_other_notebooks():
    nb = json.loads(make_notebooks.notebook(runner.WALKTHROUGH / "04-rmsnorm.md"))
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    prose = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "show_source('gemma2_ref.model.rms_norm')" in code
    assert "```text" not in prose and "](05-rope.ipynb)" in prose and "](../figures/" in prose


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_notebook_runs_in_a_kernel_and_prints_what_its_chapter_says(path):
    nbformat = require("nbformat", "pip install -e '.[test]'")
    nbclient = require("nbclient", "pip install -e '.[test]'")
    require("ipykernel", "pip install -e '.[test]'")
    nb = nbformat.reads(make_notebooks.notebook(path), as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    chapter = runner.parse(path)
    checked = 0
    for cell in nb.cells:
        n = cell.metadata.get("walkthrough_block")
        if n is None:
            continue
        printed = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
        expected = chapter.blocks[n - 1].expected or ""
        assert runner.same_output(expected, printed), (
            f"{path.name} block {n}: the notebook cell printed\n{printed}\nbut the chapter says\n{expected}"
        )
        checked += 1
    assert checked == len(chapter.blocks)

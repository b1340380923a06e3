"""The walkthrough is executed: every ```python block of every chapter runs, in order, and prints exactly the
```text block written under it. A chapter whose text and code disagree fails here (and in CI)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from walkthrough import runner

CHAPTERS = runner.chapters()
WALKTHROUGH = ROOT / "walkthrough"


def test_walkthrough_chapters_are_numbered_in_reading_order_from_one():
    numbers = [int(p.name[:2]) for p in CHAPTERS]
    assert len(numbers) >= 13 and numbers == list(range(1, len(numbers) + 1)), [p.name for p in CHAPTERS]


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_prints_what_its_text_says(path):
    """Each chapter runs as a reader runs it, `python -m walkthrough.runner --check NN`, in a fresh process
    (a fresh namespace and one BLAS thread, which the runner sets before NumPy is imported)."""
    assert runner.parse(path).blocks, f"{path.name} has no ```python block"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    result = subprocess.run(
        [sys.executable, "-m", "walkthrough.runner", "--check", path.name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        result.stderr + "\nIf the code is right, run `python -m walkthrough.runner "
        f"--update {path.name[:2]}` and review the diff."
    )
    assert f"ok   {path.name}" in result.stdout


def test_table_of_contents_lists_every_chapter_in_order():
    toc = (WALKTHROUGH / "README.md").read_text()
    linked = re.findall(r"\]\((\d\d-[^)]+\.md)\)", toc)
    assert linked == [p.name for p in CHAPTERS]


def test_project_readme_links_the_walkthrough():
    assert "walkthrough/README.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", [WALKTHROUGH / "README.md", *CHAPTERS], ids=lambda p: p.stem)
def test_relative_links_and_images_resolve(path):
    text = path.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{path.name} links to missing files: {missing}"


# -- the runner itself: the check must be able to fail -------------------------------------------------


def write_chapter(tmp_path, body: str) -> Path:
    path = tmp_path / "01-test.md"
    path.write_text(body)
    return path


def test_runner_reports_a_block_whose_output_differs(tmp_path):
    path = write_chapter(tmp_path, "# t\n\n```python\nx = 6 * 7\nprint(x)\n```\n\n```text\n41\n```\n")
    chapter = runner.parse(path)
    problems = runner.check(chapter, runner.run(chapter))
    assert len(problems) == 1 and "01-test.md: block 1" in problems[0]
    assert "-41" in problems[0] and "+42" in problems[0]


def test_runner_blocks_share_one_namespace_and_a_block_without_text_must_print_nothing(tmp_path):
    path = write_chapter(tmp_path, "```python\nx = 2\n```\n\nprose\n\n```python\nprint(x + 1)\n```\n")
    chapter = runner.parse(path)
    outputs = runner.run(chapter)
    assert outputs == ["", "3\n"]
    assert "has no ```text block" in runner.check(chapter, outputs)[0]


def test_runner_update_writes_the_real_output_then_check_passes(tmp_path):
    path = write_chapter(tmp_path, "```python\nprint('a')\n```\n\n```text\nb\n```\n\n```python\nprint(1.5)\n```\n")
    runner.update(runner.parse(path), runner.run(runner.parse(path)))
    assert (
        path.read_text()
        == "```python\nprint('a')\n```\n\n```text\na\n```\n\n```python\nprint(1.5)\n```\n\n```text\n1.5\n```\n"
    )
    chapter = runner.parse(path)
    assert runner.check(chapter, runner.run(chapter)) == []


def test_runner_names_the_chapter_and_block_that_raises(tmp_path):
    path = write_chapter(tmp_path, "```python\nprint('ok')\n```\n\n```python\n1 / 0\n```\n")
    with pytest.raises(runner.ChapterError, match=r"01-test.md: block 2 \(line 5\) raised ZeroDivisionError"):
        runner.run(runner.parse(path))


@pytest.mark.parametrize(
    "expected, actual, same",
    [
        ("x 0.1234\n", "x 0.1234\n", True),
        ("x 0.1234\n", "x 0.1235\n", True),  # one unit in the last printed digit: BLAS summation order
        ("x 0.1234\n", "x 0.1236\n", False),
        ("x 1.5e-04\n", "x 1.6e-04\n", True),
        ("x 1.5e-04\n", "x 1.5e-05\n", False),
        ("id 441\n", "id 442\n", False),  # integers (token ids, counts) must match exactly
        ("x 0.1234\n", "y 0.1234\n", False),
        ("x 0.12\n", "x 0.121\n", False),
    ],
)
def test_numbers_may_differ_only_in_their_last_printed_decimal(expected, actual, same):
    assert runner.same_output(expected, actual) is same


# -- package source shown on the page: rendered, never compared -------------------------------------------


def test_source_directive_copy_is_refreshed_by_update_and_never_fails_check(tmp_path):
    path = write_chapter(
        tmp_path, "# t\n\n<!-- source: gemma2_ref.model.soft_cap -->\n```py\ndef soft_cap(): old\n```\n"
    )
    chapter = runner.parse(path)
    assert [s.name for s in chapter.sources] == ["gemma2_ref.model.soft_cap"]
    assert runner.check(chapter, runner.run(chapter)) == []  # an old copy is not a failure...
    assert runner.stale_sources(chapter) == ["gemma2_ref.model.soft_cap"]  # ...only a note
    runner.update(chapter, runner.run(chapter))
    chapter = runner.parse(path)
    assert chapter.sources[0].shown == runner.source_of("gemma2_ref.model.soft_cap")
    assert runner.stale_sources(chapter) == [] and chapter.blocks == []  # the ```py copy is never executed


def test_source_directive_naming_a_missing_function_fails_check(tmp_path):
    path = write_chapter(tmp_path, "<!-- source: gemma2_ref.model.no_such_function -->\n")
    chapter = runner.parse(path)
    problems = runner.check(chapter, runner.run(chapter))
    assert len(problems) == 1 and "no_such_function" in problems[0] and "does not resolve" in problems[0]


def test_explore_mode_shows_code_output_and_live_source_without_checking(tmp_path):
    path = write_chapter(
        tmp_path,
        "<!-- source: gemma2_ref.model.soft_cap -->\n\n"
        "```python\nprint(6 * 7)\n```\n\n```text\n41\n```\n\n```python\n1 / 0\n```\n"
        "\n```python\nprint('after the error')\n```\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "walkthrough.runner", "--explore", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr  # 41 != 42, yet explore does not fail
    out = result.stdout
    assert "def soft_cap(" in out and "print(6 * 7)" in out and "42" in out
    assert "ZeroDivisionError" in out and "after the error" in out  # a failing block does not stop the chapter

"""`golden --force` replaces only what gemma2-ref wrote; one writer per --out; SIGTERM cleans up (issue 27).

Every test here snapshots the files a user owns before the command and asserts they are all still there,
byte for byte, after it: the command may refuse or succeed, never delete.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma2_ref import golden as G
from tests.helpers.cli import cli

REPO = Path(__file__).resolve().parent.parent
SHORT = REPO / "golden" / "short"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (files with their bytes, directories and links as None)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*"))
    }


def a_case(at: Path) -> Path:
    shutil.copytree(SHORT, at)
    return at


def a_suite(at: Path) -> Path:
    at.mkdir()
    a_case(at / "short")
    G.write_suite(at, "coverage", [{"name": "short"}])
    return at


# Each layout: (how to build it under a directory, the entry the refusal must name).
FOREIGN = {
    "a note beside a case's files": (lambda d: (a_case(d), (d / "notes.txt").write_text("mine")), "notes.txt"),
    "a project with one case and src/": (
        lambda d: (
            d.mkdir(),
            a_case(d / "short"),
            (d / "src").mkdir(),
            (d / "src" / "main.c").write_text("x"),
            (d / "Makefile").write_text("all:"),
        ),
        "Makefile",
    ),
    "a file inside a suite's case": (
        lambda d: (a_suite(d), (d / "short" / "plot.png").write_bytes(b"\x89PNG")),
        "short/plot.png",
    ),
    "an empty directory in a suite": (lambda d: (a_suite(d), (d / "later").mkdir()), "later/"),
    "a hidden file in a suite": (lambda d: (a_suite(d), (d / ".env").write_text("KEY=1")), ".env"),
    "a symlink in a suite": (lambda d: (a_suite(d), (d / "link").symlink_to(REPO / "README.md")), "link"),
    "a manifest gemma2-ref did not write": (
        lambda d: (a_case(d), (d / G.MANIFEST).write_text('{"name": "my web app"}')),
        G.MANIFEST,
    ),
    "a suite.json gemma2-ref did not write": (
        lambda d: (a_suite(d), (d / G.SUITE).write_text('{"kind": "something else"}')),
        G.SUITE,
    ),
}


@pytest.mark.parametrize("layout", FOREIGN)
@pytest.mark.parametrize("what", ["case", "suite"])
def test_force_never_deletes_a_file_it_did_not_write(capsys, tmp_path, layout, what):
    build, foreign = FOREIGN[layout]
    out = tmp_path / "out"
    build(out)
    before = snapshot(tmp_path)
    argv = ["--suite", "coverage"] if what == "suite" else ["--tokens", "2 3"]
    code, _, err = cli(capsys, "golden", "tiny", *argv, "--out", out, "--force")
    assert code == 2 and f"holds {foreign}, which gemma2-ref did not write" in err and "even with --force" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["case", "suite"])
def test_force_replaces_a_golden_that_holds_only_its_own_files(capsys, tmp_path, what):
    out = a_suite(tmp_path / "out") if what == "suite" else a_case(tmp_path / "out")
    argv = ["--suite", "coverage"] if what == "suite" else ["--tokens", "2 3"]
    code, _, err = cli(capsys, "golden", "tiny", *argv, "--out", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no temporary left


def test_an_empty_out_is_refused_and_the_working_directory_kept(capsys, tmp_path, monkeypatch):
    a_suite(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "golden", "tiny", "--prompt", "x", "--force", "--out", "")
    assert code == 2 and "--out is empty: give the directory to write" in err
    code, _, err = cli(capsys, "golden", "tiny", "--suite", "coverage", "--force", "--out", ".")
    assert code == 2 and "--out . is the current directory or holds it" in err
    assert snapshot(tmp_path) == before


def test_a_symlinked_out_is_never_replaced(capsys, tmp_path):
    a_case(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "golden", "tiny", "--tokens", "2", "--force", "--out", tmp_path / "link")
    assert code == 2 and "is a symbolic link" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("parent", ["loop", "dangling", "file"])
def test_an_out_inside_what_is_not_a_directory_says_what_it_is(capsys, tmp_path, parent):
    p = tmp_path / "p"
    if parent == "file":
        p.write_text("mine")
    else:
        p.symlink_to(p.name if parent == "loop" else "gone")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "golden", "tiny", "--tokens", "2", "--out", p / "g")
    says = {
        "loop": "is a symbolic link loop",
        "dangling": "is a dangling symbolic link (to gone)",
        "file": "is a file",
    }[parent]
    assert code == 2 and f"--out {p / 'g'}: {p} {says}: no directory can be made inside it" in err
    assert snapshot(tmp_path) == before


def test_a_second_writer_is_refused_while_the_first_lives(capsys, tmp_path):
    out = tmp_path / "out"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".out.lock"
        lock.write_text(f"{os.uname().nodename} {alive.pid}\n")
        code, _, err = cli(capsys, "golden", "tiny", "--tokens", "2 3", "--out", out)
        assert code == 2 and f"is being written by another gemma2-ref (pid {alive.pid}" in err
        assert not out.exists() and lock.read_text() == f"{os.uname().nodename} {alive.pid}\n"
    finally:
        alive.kill()
        alive.wait()
    # the same lock, its writer now dead: taken over, and removed when done
    code, _, err = cli(capsys, "golden", "tiny", "--tokens", "2 3", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_writers_temporary_is_not_called_a_leftover(tmp_path):
    out = tmp_path / "out"
    (tmp_path / f".out.{os.getpid()}.ab12cd34.tmp").mkdir()  # ours: alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".out.{dead.stdout.strip()}.ab12cd34.tmp").mkdir()
    (tmp_path / ".out.ab12cd34.tmp").mkdir()  # an older run's name, without a pid
    left = [p.name for p in G.interrupted_writes(out)]
    assert left == sorted([f".out.{dead.stdout.strip()}.ab12cd34.tmp", ".out.ab12cd34.tmp"])


def test_sigterm_removes_the_temporary_like_ctrl_c(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gemma2_ref.cli",
            "golden",
            "tiny",
            "--suite",
            "coverage",
            "--taps",
            "all",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".suite.*.tmp/*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the suite finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []

"""Running `gemma2-ref` in the test's own process: its exit code and what it printed."""

from gemma2_ref.cli import main


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `gemma2-ref ARGV`, run in this process: an uncaught exception fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, progress: tuple[str, ...] = ("loaded ",), quiet_stdout: bool = False) -> str:
    """Run a command that must fail as a usage or input error (exit 2, no traceback); returns its one error line.
    Lines starting with `progress` are not errors; `quiet_stdout`: nothing may have been printed on stdout."""
    code, out, err = cli(capsys, *argv)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith(progress)]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert not quiet_stdout or out == "", out
    return lines[0]

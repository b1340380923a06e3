"""The package's layers (docs/architecture.md): imports go only downward, and the flat names of before still
import as the same module objects (issue 32)."""

import collections
import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gemma2_ref._moved import MOVED

PACKAGE = Path(__file__).resolve().parent.parent / "gemma2_ref"
# "root": `from .. import X` of the package itself, which imports every layer's public API (above them all);
# _version.py is the one module beside it that imports nothing, so any layer may read the version there
RANK = {"_version": 0, "data": 0, "model": 0, "storage": 1, "verify": 2, "adapters": 3, "cli": 4, "root": 5}


def imported_layers(path: Path):
    """(line number, line, layer imported) of every relative import in a module, those inside functions too."""
    pkg = list(path.relative_to(PACKAGE).parts[:-1])
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"\s*from (\.+)([\w.]*) import ", line)
        if m:
            up = len(m[1]) - 1
            target = (pkg[: len(pkg) - up] if up else pkg) + (m[2].split(".") if m[2] else [])
            yield n, line.strip(), target[0] if target else "root"


def test_every_module_lives_in_a_layer_and_imports_only_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            assert path.name in ("__init__.py", "_moved.py", "_version.py"), f"{path.name}: a module outside the layers"
            continue
        layer = parts[0]
        upward += [
            f"{path.relative_to(PACKAGE)}:{n}: {line}"
            for n, line, to in imported_layers(path)
            if RANK[to] > RANK[layer]
        ]
    assert upward == []


def test_the_version_is_pyprojects():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from gemma2_ref import __version__

    assert tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["version"] == __version__


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_imports_under_its_old_name_as_the_same_object(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])
    assert importlib.import_module(old).__spec__.name == MOVED[old]


def test_the_flat_names_of_the_model_and_cli_are_their_packages():
    from gemma2_ref.cli import main
    from gemma2_ref.model import forward, rms_norm  # noqa: F401

    assert main.__module__ == "gemma2_ref.cli.main" and forward.__module__ == "gemma2_ref.model.gemma2"


def test_importing_the_package_imports_no_framework():
    code = "import gemma2_ref, gemma2_ref.golden, sys; assert not {'torch', 'jax', 'mlx'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def module_of(code) -> str | None:
    """The layer a function's code lives in (model, storage, ...), or None outside the package's layers."""
    try:
        parts = Path(code.co_filename).resolve().relative_to(PACKAGE).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else None


def named_by(frame, code) -> bool:
    """The caller reached `code` by a name it imported (a function, or a module's attribute), not through a
    value it was handed (a callback, a sink, a weights provider, a logger): a dependency, not an inversion."""
    caller = frame.f_code
    handed = set(caller.co_varnames[: caller.co_argcount + caller.co_kwonlyargcount]) | set(caller.co_freevars)
    imported = [v for k, v in frame.f_locals.items() if k not in handed]  # `from .x import f` inside a function
    for value in [*frame.f_globals.values(), *imported]:
        if getattr(value, "__code__", None) is code:
            return True
        if isinstance(value, types.ModuleType):
            if getattr(getattr(value, code.co_name, None), "__code__", None) is code:
                return True
    return False


def upward_calls(run) -> collections.Counter:
    """Every call `run()` makes from a layer into a higher one by an imported name: (caller, callee) -> count."""
    found = collections.Counter()

    def trace(frame, event, arg):
        caller = frame.f_back
        if event == "call" and caller is not None:
            to, at = module_of(frame.f_code), module_of(caller.f_code)
            if to and at and RANK[to] > RANK[at] and named_by(caller, frame.f_code):
                found[(f"{at}:{caller.f_code.co_qualname}", f"{to}:{frame.f_code.co_qualname}")] += 1
        # no line events

    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(None)
    return found


def test_the_walk_from_golden_goes_down_the_layers_without_climbing_back(tmp_path, capsys):
    """`gemma2-ref golden` traced call by call: a lower layer calls a higher one only through what it was
    handed (the case writer's sink, the weights, a log function), never by a name it imports."""
    from gemma2_ref.cli import main

    def golden():
        assert main(["golden", "tiny", "--prompt", "The cat sat on the mat.", "--out", str(tmp_path / "g")]) == 0

    assert upward_calls(golden) == {}
    capsys.readouterr()


def test_the_call_check_sees_a_climb():
    """The check can fail: code of storage/weights.py calling verify by a name it imported is a climb; the same
    function handed to it (a callback) is not."""
    from gemma2_ref.verify.names import apply_name_map

    namespace = {"apply_name_map": apply_name_map}
    source = "def by_name():\n    apply_name_map({}, None)\ndef handed(f):\n    f({}, None)\n"
    exec(compile(source, str(PACKAGE / "storage" / "weights.py"), "exec"), namespace)
    assert upward_calls(namespace["by_name"]) == {("storage:by_name", "verify:apply_name_map"): 1}
    del namespace["apply_name_map"]
    assert upward_calls(lambda: namespace["handed"](apply_name_map)) == {}

"""The package's layers (docs/architecture.md): imports go only downward, and the flat names of before still
import as the same module objects (issue 32)."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gemma2_ref._moved import MOVED

PACKAGE = Path(__file__).resolve().parent.parent / "gemma2_ref"
RANK = {"data": 0, "model": 0, "storage": 1, "verify": 2, "adapters": 3, "cli": 4}  # the root offers the public API


def imported_layers(path: Path):
    """(line number, line, layer imported) of every relative import in a module, those inside functions too."""
    pkg = list(path.relative_to(PACKAGE).parts[:-1])
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"\s*from (\.+)([\w.]*) import ", line)
        if m:
            up = len(m[1]) - 1
            target = (pkg[: len(pkg) - up] if up else pkg) + (m[2].split(".") if m[2] else [])
            if target:
                yield n, line.strip(), target[0]


def test_every_module_lives_in_a_layer_and_imports_only_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            assert path.name in ("__init__.py", "_moved.py"), f"{path.name}: a module outside the layers"
            continue
        layer = parts[0]
        upward += [
            f"{path.relative_to(PACKAGE)}:{n}: {line}"
            for n, line, to in imported_layers(path)
            if RANK[to] > RANK[layer]
        ]
    assert upward == []


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

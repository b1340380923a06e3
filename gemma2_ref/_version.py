"""The package version: a leaf the layers may import (the package root imports every layer)."""

__version__ = "0.1.0"  # pyproject.toml says the same (tests/test_layers.py checks)

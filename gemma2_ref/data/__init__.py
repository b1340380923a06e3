"""Bundled checkpoints: `tiny` (the student the walkthrough runs) and `tiny-teacher` (its distillation teacher).

Each is a directory in the real Hugging Face layout: config.json, model.safetensors (bf16), tokenizer.model.
They are rebuilt by scripts/build_tiny_tokenizer.py and scripts/train_tiny.py.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def bundled_names() -> list[str]:
    return sorted(p.name for p in DATA_DIR.iterdir() if (p / "config.json").is_file())


def bundled_path(name: str) -> Path | None:
    """The directory of a bundled checkpoint, or None if `name` is not one."""
    if "/" in name or name.startswith("."):
        return None
    path = DATA_DIR / name
    return path if (path / "config.json").is_file() else None

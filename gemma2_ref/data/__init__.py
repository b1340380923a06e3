"""Bundled checkpoints: `tiny` (the student the walkthrough runs), `tiny-teacher` (its distillation teacher) and
`tiny-it` (`tiny` after SFT on chat turns: it ends its turn with <end_of_turn>).

Each is a directory in the real Hugging Face layout: config.json, model.safetensors (bf16), tokenizer.model.
They are rebuilt by scripts/build_tiny_tokenizer.py, scripts/train_tiny.py and scripts/experiments.py.
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

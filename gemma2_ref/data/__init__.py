"""Bundled checkpoints: `tiny` (the student the walkthrough runs), `tiny-teacher` (its distillation teacher) and
`tiny-it` (`tiny` after SFT on chat turns: it ends its turn with <end_of_turn>).

Each is a directory in the real Hugging Face layout: config.json, model.safetensors (bf16), tokenizer.model.
They are rebuilt by scripts/build_tiny_tokenizer.py, scripts/train_tiny.py and scripts/experiments.py.
"""

import warnings
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


class ShadowWarning(UserWarning):
    """A bare name that is both a directory here and a bundled model: the message says which was taken."""


def local_or_bundled(name: str) -> Path | None:
    """What a model argument names: a directory, or a bundled model (None: neither). A bare name such as
    "tiny" that is also a directory here takes the directory when it is a checkpoint (it has config.json),
    else the bundled model, and says which it took (ShadowWarning)."""
    path, bundled = Path(name), bundled_path(str(name))
    if bundled is None or not path.is_dir():
        return path if path.is_dir() else bundled
    if (path / "config.json").is_file():
        warnings.warn(
            ShadowWarning(
                f"{name!r}: using the checkpoint directory ./{name}, not the bundled model "
                f"{name} ({bundled}); give that path to use the bundled one"
            ),
            stacklevel=3,
        )
        return path
    warnings.warn(
        ShadowWarning(
            f"{name!r}: using the bundled model {name}; ./{name} is a directory here, but no "
            f"checkpoint (no config.json); give ./{name}/ to mean it"
        ),
        stacklevel=3,
    )
    return bundled

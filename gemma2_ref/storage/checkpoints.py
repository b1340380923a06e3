"""Writing checkpoints in the Hugging Face layout: the bundled models, the tests' random models, and the
benchmarks' full-size random models (the loader in weights.py reads them like any release).

    config.json, model.safetensors                       or
    config.json, model-0000k-of-0000n.safetensors + model.safetensors.index.json

One recipe for random weights, everywhere: every tensor is random, the norms included (a zero norm weight
would hide a missing or doubled `1 +`): norms ~ N(0, norm_std^2), the embedding ~ N(0, 1/D), Linear weights
~ N(0, scale^2 / fan_in). Each tensor's generator is seeded from (seed, its name), so layer i holds the same
numbers in a 4-layer and in a 26-layer checkpoint, and a tensor can be generated a block of rows at a time:
a full-size 27B checkpoint is built without ever holding more than a block.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np

from ..model.config import PRESETS, Gemma2Config, alternating_layer_types
from ..model.jsonfile import JSONFileError, read_json
from .weights import EMBEDDING, FINAL_NORM, STORAGE_DTYPES, WeightsError, expected_tensors, write_safetensors_blocks

GiB = 1 << 30
BLOCK_BYTES = 64 << 20  # float32 bytes generated per block when writing a large tensor
CHECKPOINT_FORMAT = 2  # bump when the recipe changes, so cached random checkpoints are rebuilt


def preset_config(preset: str, layers: int | None = None) -> Gemma2Config:
    """The preset's shapes with `layers` decoder layers (alternating sliding / global, as released)."""
    base = PRESETS[preset]
    n = layers or base.num_hidden_layers
    return base.replace(num_hidden_layers=n, layer_types=tuple(alternating_layer_types(n)))


def tensor_std(name: str, shape: tuple[int, ...], scale: float = 1.0, norm_std: float = 0.3) -> float:
    if len(shape) == 1:
        return norm_std
    if name == EMBEDDING:
        return 1.0 / np.sqrt(shape[1])
    return scale / np.sqrt(shape[1])


def random_rows(name: str, shape: tuple[int, ...], seed: int, std: float, block_rows: int | None = None):
    """The tensor's random values, float32, a block of rows at a time (default: all at once)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows, inner = shape[0], shape[1:]
    block_rows = block_rows or rows
    for r0 in range(0, rows, block_rows):
        block = rng.standard_normal((min(block_rows, rows - r0), *inner), dtype=np.float32)
        block *= np.float32(std)
        yield block


def random_weights(
    cfg: Gemma2Config, seed: int = 0, scale: float = 1.0, norm_std: float = 0.3, dtype=np.float32
) -> dict[str, np.ndarray]:
    """Every tensor of a Gemma 2 checkpoint, random (the recipe above), under its checkpoint name."""
    return {
        name: np.concatenate(list(random_rows(name, shape, seed, tensor_std(name, shape, scale, norm_std)))).astype(
            dtype
        )
        for name, shape in expected_tensors(cfg).items()
    }


def write_checkpoint(
    directory: str | Path, cfg: Gemma2Config, shards: list[dict], config_style: str = "new", log=None
) -> Path:
    """config.json and the safetensors files: one `model.safetensors` if `shards` has one entry, else
    shards + index. Each shard is {name: (safetensors dtype, shape, blocks)}: see write_safetensors_blocks."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        write_safetensors_blocks(directory / "model.safetensors", shards[0], metadata={"format": "pt"})
    else:
        weight_map, total, t0 = {}, 0, time.perf_counter()
        for k, specs in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors_blocks(directory / file, specs, metadata={"format": "pt"})
            weight_map.update({n: file for n in specs})
            if log:
                log(
                    f"  wrote {directory / file} ({k}/{len(shards)}, {total / GiB:.2f} GiB so far, "
                    f"{time.perf_counter() - t0:.0f} s)"
                )
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(config_style), indent=2) + "\n")
    return directory


def save_checkpoint(
    directory: str | Path,
    cfg: Gemma2Config,
    tensors: dict[str, np.ndarray],
    dtype: str = "BF16",
    shards: int = 1,
    config_style: str = "new",
    tokenizer: str | Path | None = None,
) -> Path:
    """Write in-memory tensors as a checkpoint (`shards` files), optionally with a tokenizer.model."""
    names = list(expected_tensors(cfg))
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise WeightsError(f"not Gemma 2 tensor names: {unknown[:5]}")
    if dtype not in STORAGE_DTYPES:
        raise WeightsError(f"dtype {dtype!r}: weights are stored as one of {', '.join(STORAGE_DTYPES)}")
    names = [n for n in names if n in tensors]
    groups = np.array_split(np.arange(len(names)), shards)
    specs = [
        {names[j]: (dtype, np.shape(tensors[names[j]]), lambda a=tensors[names[j]]: [a]) for j in group}
        for group in groups
    ]
    write_checkpoint(directory, cfg, specs, config_style)
    if tokenizer is not None:
        (Path(directory) / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return Path(directory)


def cached_recipe(marker: Path) -> dict | None:
    """What a random checkpoint's marker says it was built from; None when unreadable (it is rebuilt)."""
    try:
        return read_json(marker)
    except (OSError, JSONFileError):
        return None


def build_random_checkpoint(
    directory: str | Path, cfg: Gemma2Config, seed: int = 0, layers_per_shard: int = 4, log=print
) -> Path:
    """A random bf16 checkpoint of any size, generated and written a block of rows at a time (never more than
    BLOCK_BYTES of float32 held). Reused when `directory` already holds one built with the same config."""
    directory = Path(directory)
    marker = directory / "random-checkpoint.json"
    want = {"format": CHECKPOINT_FORMAT, "seed": seed, "config": cfg.to_hf_dict()}
    if marker.is_file() and cached_recipe(marker) == want:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    shapes = expected_tensors(cfg)

    def spec(name):
        shape = shapes[name]
        rows = max(1, BLOCK_BYTES // max(1, int(np.prod(shape[1:], dtype=np.int64)) * 4))
        return ("BF16", shape, lambda: random_rows(name, shape, seed, tensor_std(name, shape), rows))

    groups = [[EMBEDDING, FINAL_NORM]]
    for first in range(0, cfg.num_hidden_layers, layers_per_shard):
        prefixes = tuple(
            f"model.layers.{i}." for i in range(first, min(cfg.num_hidden_layers, first + layers_per_shard))
        )
        groups.append([n for n in shapes if n.startswith(prefixes)])
    write_checkpoint(directory, cfg, [{n: spec(n) for n in group} for group in groups], log=log)
    marker.write_text(json.dumps(want, indent=2) + "\n")
    return directory

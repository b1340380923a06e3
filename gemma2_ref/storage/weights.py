"""Checkpoint weights: safetensors files, memory-mapped, converted to the compute dtype one layer at a time.

The safetensors format is small enough to read directly, and reading it directly is what lets us keep the
weights memory-mapped in their stored dtype (NumPy has no bfloat16):

    [8 bytes: little-endian u64 N][N bytes: JSON header][raw tensor bytes, row-major, little-endian]
    header = {"model.norm.weight": {"dtype": "BF16", "shape": [2304], "data_offsets": [begin, end]}, ...}

bfloat16 is the top half of a float32, so `bf16 -> f32` is exact: shift the 16 bits left by 16.

A checkpoint (Hugging Face layout) is `model.safetensors`, or shards `model-0000k-of-0000n.safetensors`
listed by `model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}). Names and shapes
(Linear weights are stored (out, in)):

    model.embed_tokens.weight                          (V, D)       tied: also the output head
    model.layers.{i}.self_attn.q_proj.weight           (H*Dh, D)
    model.layers.{i}.self_attn.k_proj.weight           (K*Dh, D)
    model.layers.{i}.self_attn.v_proj.weight           (K*Dh, D)
    model.layers.{i}.self_attn.o_proj.weight           (D, H*Dh)
    model.layers.{i}.mlp.gate_proj.weight              (F, D)
    model.layers.{i}.mlp.up_proj.weight                (F, D)
    model.layers.{i}.mlp.down_proj.weight              (D, F)
    model.layers.{i}.input_layernorm.weight            (D,)         our name: pre_attn_norm
    model.layers.{i}.post_attention_layernorm.weight   (D,)         post_attn_norm
    model.layers.{i}.pre_feedforward_layernorm.weight  (D,)         pre_ffw_norm
    model.layers.{i}.post_feedforward_layernorm.weight (D,)         post_ffw_norm
    model.norm.weight                                  (D,)         final_norm
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model.bfloat16 import bf16_bits_to_f32, f32_to_bf16_bits, round_to_bf16  # noqa: F401 (re-exported)
from ..model.config import Gemma2Config
from ..model.fast import StoredWeight
from ..model.gemma2 import LayerWeights
from ..model.jsonfile import JSONFileError, is_int, kind, loads, read_json, shown


class WeightsError(ValueError):
    """A checkpoint that does not match its config. The message names the file and the tensor."""


# -- safetensors files -----------------------------------------------------------------------------------

# The one dtype table: safetensors dtype name -> the NumPy dtype its bytes are read as (BF16: the uint16 bits)
STORAGE_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
WEIGHT_DTYPES = ("BF16", "F16", "F32")
# what our writers may also store (token ids in a corpus golden); never accepted as a weight
TENSOR_DTYPES = {**STORAGE_DTYPES, "I32": np.dtype("<i4")}
# ... and back: a NumPy dtype -> the name it is stored under as itself (BF16 has no NumPy dtype: not here)
DTYPE_NAMES = {dtype.newbyteorder("="): name for name, dtype in TENSOR_DTYPES.items() if name != "BF16"}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: enough to map it without reading anything else."""

    file: Path
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(
    path: Path, dtypes=tuple(STORAGE_DTYPES), what: str = "supported"
) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse a safetensors header and check it before any tensor is touched: every field's JSON type, the
    dtype one of `dtypes` (`what` says for what: "supported", "weights must be"), the shape a list of
    non-negative integers, the byte range [begin, end) of exactly the shape's size, inside the file, and no
    two tensors sharing a byte. Each error is one line naming the file, the tensor and the field."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: a directory, not a safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise WeightsError(
                f"{path}: not a safetensors file, or truncated (header claims {n} bytes, file has {size})"
            )
        try:
            header = loads(f.read(n), f"{path}: its safetensors header")
        except JSONFileError as e:
            raise WeightsError(str(e)) from None
    if not isinstance(header, dict):
        raise WeightsError(
            f"{path}: the safetensors header is {kind(header)}; expected a JSON object "
            f"{{tensor name: {{dtype, shape, data_offsets}}}}"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: `__metadata__` must be an object of strings, found {shown(metadata)}")
    data_start = 8 + n
    tensors = {name: tensor_ref(path, name, info, dtypes, what, data_start, size) for name, info in header.items()}
    check_no_overlap(path, tensors.values())
    return tensors, metadata


def tensor_ref(path: Path, name: str, info, dtypes, what: str, data_start: int, size: int) -> TensorRef:
    """One header entry, checked field by field, as a TensorRef."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where}: its entry is {kind(info)}; expected an object with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise WeightsError(
            f"{where}: its entry has no `{missing[0]}` (a safetensors entry needs dtype, shape and data_offsets)"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise WeightsError(
            f"{where} has dtype {dtype if isinstance(dtype, str) else shown(dtype)}; {what}: {', '.join(dtypes)}"
        )
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise WeightsError(f"{where}: `shape` is {shown(shape)}; expected a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise WeightsError(
            f"{where}: `data_offsets` is {shown(offsets)}; expected [begin, end], integers with 0 <= begin <= end"
        )
    begin, end = offsets
    expected = math.prod(shape) * TENSOR_DTYPES[dtype].itemsize
    if end - begin != expected:
        raise WeightsError(f"{where} of shape {shape} {dtype} should take {expected} bytes, header says {end - begin}")
    if data_start + end > size:
        raise WeightsError(
            f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file "
            f"has {size} bytes. Re-download or re-convert this file."
        )
    return TensorRef(path, name, dtype, tuple(shape), data_start + begin, end - begin)


def check_no_overlap(path: Path, refs) -> None:
    """No two tensors of one file share a byte (a converter bug: editing one would change the other)."""
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in refs if r.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise WeightsError(
                f"{path}: tensors {first!r} and {second!r} overlap (the second starts at byte {begin} "
                f"of the file, the first ends at {end}): the header is corrupt; re-convert this file"
            )


def write_safetensors(
    path: str | Path, tensors: dict[str, np.ndarray], dtype: str | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file, deterministically (sorted names, fixed padding).

    `dtype` ("BF16", "F16", "F32", "F64") converts every tensor; None keeps each array's own dtype (DTYPE_NAMES).
    """
    specs = {}
    for name, a in tensors.items():
        a = np.asarray(a)
        st = dtype or DTYPE_NAMES.get(a.dtype)
        if st is None:
            raise ValueError(f"tensor {name!r}: cannot store dtype {a.dtype} (pass dtype=...)")
        specs[name] = (st, a.shape, lambda a=a: [a])
    write_safetensors_blocks(path, specs, metadata)


def write_safetensors_blocks(path: str | Path, specs: dict, metadata: dict[str, str] | None = None) -> int:
    """The writer behind write_safetensors, for tensors too large to hold at once.

    `specs`: {name: (safetensors dtype, shape, blocks)} where `blocks()` yields the tensor's values as
    consecutive blocks of rows (any float dtype; converted to the stored dtype block by block).
    The file is written under a temporary name and renamed, so a reader never sees half a file.
    Returns the number of tensor bytes."""
    names = sorted(specs)
    head, offsets = safetensors_header({name: spec[:2] for name, spec in specs.items()}, metadata)
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for name in names:
                st, shape, blocks = specs[name]
                for block in blocks():
                    raw = (
                        f32_to_bf16_bits(np.asarray(block, np.float32))
                        if st == "BF16"
                        else np.asarray(block).astype(TENSOR_DTYPES[st])
                    )
                    f.write(np.ascontiguousarray(raw).tobytes())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interruption: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    return sum(stop - start for start, stop in offsets.values())


def safetensors_header(specs: dict, metadata: dict[str, str] | None = None) -> tuple[bytes, dict]:
    """The bytes a safetensors file starts with (length + JSON header, padded to 8) for tensors
    {name: (safetensors dtype, shape)} laid out in sorted-name order, and {name: (start, stop)}: each tensor's
    absolute byte range in the file. Deterministic: the same specs give the same bytes."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in sorted(specs):
        st, shape = specs[name]
        n = int(np.prod(shape, dtype=np.int64)) * TENSOR_DTYPES[st].itemsize
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    start = 8 + len(head)
    offsets = {
        name: (start + h["data_offsets"][0], start + h["data_offsets"][1])
        for name, h in header.items()
        if name != "__metadata__"
    }
    return struct.pack("<Q", len(head)) + head, offsets


class MappedFiles:
    """Read-only memory maps of safetensors files (a checkpoint's, a golden's, a corpus shard's), each opened
    once, closed together: the one place their tensors' bytes are read."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def array(self, ref: TensorRef) -> np.ndarray:
        """The tensor as stored (uint16 bits for BF16), a read-only view on the memory map: no bytes are read yet
        (the view keeps its map open)."""
        storage = TENSOR_DTYPES[ref.dtype]
        m = self._maps.get(ref.file)
        if m is None:
            with open(ref.file, "rb") as f:
                m = self._maps[ref.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(m, dtype=storage, count=ref.nbytes // storage.itemsize, offset=ref.offset).reshape(
            ref.shape
        )

    def release(self, ref: TensorRef, begin: int = 0, end: int | None = None) -> None:
        """Drop bytes [begin, end) of the tensor from this process's resident memory (madvise DONTNEED).

        Pages of a file mapping that were read count in the process's RSS for as long as they stay
        mapped; once a tensor is converted we no longer need them. They remain in the OS page cache, and
        touching the array again simply maps them back in: this never changes what the array holds."""
        m = self._maps.get(ref.file)
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        end = ref.nbytes if end is None else end
        start = (ref.offset + begin) // mmap.PAGESIZE * mmap.PAGESIZE  # madvise wants a page-aligned start
        stop = min(len(m), ref.offset + end)
        if stop > start:
            m.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self):
        maps, self._maps = self._maps, {}
        for m in maps.values():
            try:
                m.close()
            except BufferError:  # an array still views it; the OS unmaps when that array dies
                pass


def to_compute_dtype(stored: np.ndarray, st_dtype: str, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Stored bytes -> a fresh array in the compute dtype (or into `out`). bf16 and f16 convert exactly."""
    dtype = np.dtype(dtype)
    if out is None:
        out = np.empty(stored.shape, dtype)
    if st_dtype == "BF16" and dtype == np.float32:
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)  # one pass: widen and shift
    elif st_dtype == "BF16":
        out[...] = bf16_bits_to_f32(stored)
    else:
        out[...] = stored
    return out


def non_finite_weight(ref: TensorRef, values: np.ndarray) -> WeightsError:
    """A reference never computes with a NaN or infinite weight: name the file, the tensor, where and how many."""
    bad = ~np.isfinite(values)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    nan = int(np.isnan(values).sum())
    return WeightsError(
        f"{ref.file}: tensor {ref.name!r} holds non-finite values ({nan} NaN, {int(bad.sum()) - nan} "
        f"Inf of {values.size}), the first at index {first}: the checkpoint is corrupt; "
        f"re-download or re-convert it"
    )


# -- the Gemma 2 tensors -----------------------------------------------------------------------------------

# Our field name -> the checkpoint's name under `model.layers.{i}.`
HF_LAYER_NAMES = {
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "pre_attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "pre_ffw_norm": "pre_feedforward_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the (out, in) ones
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"


def layer_shapes(cfg: Gemma2Config) -> dict[str, tuple[int, ...]]:
    D, F, H, K, Dh = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    return {
        "q_proj": (H * Dh, D),
        "k_proj": (K * Dh, D),
        "v_proj": (K * Dh, D),
        "o_proj": (D, H * Dh),
        "gate_proj": (F, D),
        "up_proj": (F, D),
        "down_proj": (D, F),
        "pre_attn_norm": (D,),
        "post_attn_norm": (D,),
        "pre_ffw_norm": (D,),
        "post_ffw_norm": (D,),
    }


def expected_tensors(cfg: Gemma2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma 2 checkpoint must hold, with its shape."""
    shapes = {EMBEDDING: (cfg.vocab_size, cfg.hidden_size), FINAL_NORM: (cfg.hidden_size,)}
    for i in range(cfg.num_hidden_layers):
        for ours, shape in layer_shapes(cfg).items():
            shapes[f"model.layers.{i}.{HF_LAYER_NAMES[ours]}"] = shape
    return shapes


def checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory, and the index's weight map if sharded."""
    index = directory / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        weight_map = read_weight_map(index)
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not (f.exists() or f.is_symlink())]
        if absent:
            raise WeightsError(f"{index} lists shard(s) that are not in {directory}: {', '.join(absent)}")
        for f in files:
            problem = not_a_file(f)
            if problem:
                raise WeightsError(f"{index} lists the shard {f.name}, but {f} {problem}")
        return files, weight_map
    single = directory / "model.safetensors"
    if single.exists() or single.is_symlink():
        problem = not_a_file(single)
        if problem:
            raise WeightsError(f"{single} {problem}: a checkpoint's weights are a safetensors file")
        return [single], None
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    hint = (
        f" Found {', '.join(found)} but no model.safetensors.index.json to say which tensor is where."
        if found
        else " Is this a Hugging Face checkpoint directory (config.json + *.safetensors)?"
    )
    raise WeightsError(f"{directory}: no model.safetensors or model.safetensors.index.json.{hint}")


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file ("is a directory", "is a dangling symbolic link", ...), or None."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "is a symbolic link loop"
        except OSError:
            return f"is a dangling symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return "is a directory"
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file"
    return None


def read_weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's `weight_map`: {tensor name: shard file name}, each shard a plain name
    inside the checkpoint directory (never an absolute path or one climbing out with ..)."""
    problem = not_a_file(index)
    if problem:
        raise WeightsError(f"{index} {problem}: a sharded checkpoint's index is a JSON file")
    try:
        body = read_json(index)
    except JSONFileError as e:
        raise WeightsError(str(e)) from None
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = kind(body) if not isinstance(body, dict) else f"`weight_map` {shown(weight_map)}"
        raise WeightsError(
            f"{index}: not a valid safetensors index: expected an object whose `weight_map` is a "
            f"non-empty object {{tensor name: shard file}}, found {found}"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise WeightsError(
                f"{index}: `weight_map` gives tensor {name!r} the shard {shown(shard)}; expected a file name"
            )
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts:
            raise WeightsError(
                f"{index}: `weight_map` puts tensor {name!r} in {shard!r}, outside the checkpoint "
                f"directory: a shard is a file name inside it"
            )
    return weight_map


def index_checkpoint(directory: Path, cfg: Gemma2Config) -> dict[str, TensorRef]:
    """Read every header and validate names, shapes and dtypes against the config, before loading anything."""
    files, weight_map = checkpoint_files(directory)
    refs: dict[str, TensorRef] = {}
    for path in files:
        tensors, _ = read_safetensors_header(path, WEIGHT_DTYPES, "weights must be")
        for name, ref in tensors.items():
            if name in refs:
                raise WeightsError(f"tensor {name!r} is stored twice: in {refs[name].file.name} and {path.name}")
            refs[name] = ref
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name in refs and refs[name].file.name != shard:
                raise WeightsError(
                    f"{directory / 'model.safetensors.index.json'} says {name!r} is in {shard}, "
                    f"but it is in {refs[name].file.name}"
                )
            if name not in refs:
                raise WeightsError(
                    f"{directory / 'model.safetensors.index.json'} lists {name!r} in {shard}, "
                    f"but that file does not contain it"
                )

    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in refs]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(
            f"{directory}: missing tensor(s) {', '.join(missing[:5])}{more}. "
            f"Does config.json (num_hidden_layers={cfg.num_hidden_layers}) match these weights?"
        )
    unexpected = sorted(n for n in refs if n not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise WeightsError(
            f"{directory}: unexpected tensor(s) {', '.join(unexpected[:5])}{more} "
            f"(in {refs[unexpected[0]].file.name}); a Gemma 2 checkpoint holds only the tied "
            f"embedding, the layers and model.norm.weight"
        )
    for name, shape in expected.items():
        ref = refs[name]
        if ref.shape != shape:
            raise WeightsError(
                f"{ref.file}: tensor {name!r} has shape {list(ref.shape)}, expected {list(shape)} from config.json"
            )
        if ref.dtype not in WEIGHT_DTYPES:
            raise WeightsError(
                f"{ref.file}: tensor {name!r} is {ref.dtype}; weights must be {', '.join(WEIGHT_DTYPES)}"
            )
    return refs


CONVERT_BLOCK_BYTES = 32 << 20  # stored bytes converted per step (bounds the file pages resident at once)


class Weights:
    """The checkpoint's tensors, memory-mapped in their stored dtype, converted on demand.

    `layer(i)` of a layer not kept converted hands its projections over as stored (fast.StoredWeight):
    `linear` converts them a cache-sized block of rows at a time inside the product, so a streamed forward
    reads each stored byte once and no float32 copy of a layer is ever made; the norms are converted (D,).
    `keep_bytes` converted layers are kept for the next forward (decoding runs the forward once per token):
    0 keeps none (streaming), None keeps all; a budget keeps layers 0, 1, ... while they fit in it and
    converts the rest on every forward. `resident_bytes`: of the layers not kept converted, the next ones
    keep their *stored* bytes in memory (bf16: half of float32) while they fit, so converting them again is
    a shift in memory, not a read from the files (loader.keep_budget gives both budgets; it gives none to a
    checkpoint whose stored layers do not all fit, where the OS page cache does as well). The values are the
    same either way: conversion is exact.
    """

    def __init__(
        self,
        refs: dict[str, TensorRef],
        cfg: Gemma2Config,
        dtype=np.float32,
        keep_bytes: int | None = 0,
        resident_bytes: int = 0,
    ):
        self.refs, self.cfg, self.dtype = refs, cfg, np.dtype(dtype)
        self.keep_bytes, self.resident_bytes = keep_bytes, resident_bytes
        self._maps = MappedFiles()
        self._embedding: np.ndarray | None = None
        self._final_norm: np.ndarray | None = None
        self._layers: dict[int, LayerWeights] = {}
        self._resident: dict[str, np.ndarray] = {}  # tensor name -> its stored bytes, copied out of the file
        self._finite: set[str] = set()  # tensors whose values were checked (once: the files are read-only)

    @property
    def kept_layers(self) -> int:
        return len(self._layers)

    @property
    def resident_layers(self) -> int:
        return len({name.split(".")[2] for name in self._resident})

    @property
    def files(self) -> list[Path]:
        return sorted({ref.file for ref in self.refs.values()})

    @property
    def stored_dtypes(self) -> list[str]:
        return sorted({ref.dtype for ref in self.refs.values()})

    def stored(self, name: str) -> np.ndarray:
        """A tensor exactly as stored (bf16 as uint16 bits), memory-mapped."""
        return self._maps.array(self.refs[name])

    def tensor(self, name: str) -> np.ndarray:
        """A tensor in the compute dtype, converted a block of rows at a time; each block's file pages are
        released once converted, so converting costs the compute-dtype bytes, not those plus the file's."""
        ref = self.refs[name]
        resident = self._resident.get(name)
        stored = self._maps.array(ref) if resident is None else resident
        out = np.empty(ref.shape, self.dtype)
        if stored.ndim == 0 or stored.size == 0:
            return to_compute_dtype(stored, ref.dtype, self.dtype, out)
        row_bytes = stored[0].nbytes
        rows = max(1, CONVERT_BLOCK_BYTES // max(1, row_bytes))
        for r0 in range(0, len(stored), rows):
            r1 = min(len(stored), r0 + rows)
            to_compute_dtype(stored[r0:r1], ref.dtype, self.dtype, out[r0:r1])
            if resident is None:
                self._maps.release(ref, r0 * row_bytes, r1 * row_bytes)
            if name not in self._finite and not np.isfinite(out[r0:r1]).all():
                raise non_finite_weight(ref, to_compute_dtype(stored, ref.dtype, self.dtype))  # all of it
        self._finite.add(name)
        return out

    def streamed(self, name: str) -> StoredWeight:
        """A linear weight as stored (its resident copy, or a view on the file), for `linear` to convert a
        block of rows at a time; checked finite the first time (a pass over the stored bytes, once)."""
        ref = self.refs[name]
        resident = self._resident.get(name)
        stored = self._maps.array(ref) if resident is None else resident
        if name not in self._finite:
            self._check_finite(ref, stored, release=resident is None)
        return StoredWeight(stored, self.dtype, None if resident is not None else lambda: self._maps.release(ref))

    def _check_finite(self, ref: TensorRef, stored: np.ndarray, release: bool) -> None:
        """Raise non_finite_weight if any stored value is NaN or infinite, without converting: a bfloat16 is
        not finite exactly when its 8 exponent bits are all ones."""
        rows = max(1, CONVERT_BLOCK_BYTES // max(1, stored[0].nbytes))
        for r0 in range(0, len(stored), rows):
            block = stored[r0 : r0 + rows]
            bad = (block & 0x7F80) == 0x7F80 if ref.dtype == "BF16" else ~np.isfinite(block)
            if release:
                self._maps.release(ref, r0 * stored[0].nbytes, (r0 + len(block)) * stored[0].nbytes)
            if bad.any():
                raise non_finite_weight(ref, to_compute_dtype(stored, ref.dtype, self.dtype))
        self._finite.add(ref.name)

    def embedding(self) -> np.ndarray:
        """(V, D) in the compute dtype; kept, since the output head needs it after the last layer."""
        if self._embedding is None:
            self._embedding = self.tensor(EMBEDDING)
        return self._embedding

    def final_norm(self) -> np.ndarray:
        if self._final_norm is None:
            self._final_norm = self.tensor(FINAL_NORM)
        return self._final_norm

    def layer(self, i: int) -> LayerWeights:
        if i in self._layers:
            return self._layers[i]
        refs = [self.refs[f"model.layers.{i}.{hf}"] for hf in HF_LAYER_NAMES.values()]
        converted = sum(int(np.prod(ref.shape)) for ref in refs) * self.dtype.itemsize
        kept = sum(layer.nbytes for layer in self._layers.values())
        keep = self.keep_bytes is None or kept + converted <= self.keep_bytes
        resident = sum(a.nbytes for a in self._resident.values())
        if (
            not keep
            and refs[0].name not in self._resident
            and resident + sum(ref.nbytes for ref in refs) <= self.resident_bytes
        ):
            for ref in refs:  # read from the file this once; converted from memory from now on
                self._resident[ref.name] = np.array(self._maps.array(ref))
                self._maps.release(ref)
        if keep:
            w = LayerWeights(**{ours: self.tensor(ref.name) for ours, ref in zip(HF_LAYER_NAMES, refs)})
        else:
            w = LayerWeights(
                **{
                    ours: self.streamed(ref.name) if ours in PROJECTIONS else self.tensor(ref.name)
                    for ours, ref in zip(HF_LAYER_NAMES, refs)
                }
            )
        if keep:
            self._layers[i] = w
            for ref in refs:
                self._resident.pop(ref.name, None)
        return w

    def close(self):
        self._layers.clear()
        self._resident.clear()
        self._embedding = self._final_norm = None
        self._maps.close()

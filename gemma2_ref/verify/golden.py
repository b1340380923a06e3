"""Golden cases: activations in a safetensors file, described and hash-checked by a manifest.

A golden *case* is a directory:

    activations.safetensors   one tensor per tap, canonical names (README.md's tap table), in the compute dtype
    manifest.json             who produced it (gemma2_ref version + git commit, or another backend), the model
                              (config, sha256 of every weight file and of tokenizer.model), the input (text,
                              token ids, BOS policy), the compute dtype, and per tap: shape, dtype, sha256 of
                              its bytes, min/max/mean/std/absmax; plus the sha256 of the activations file and
                              a checksum of the manifest itself (`manifest_sha256`).

A golden *suite* is a directory of cases plus `suite.json` listing them.

Nothing half-written is ever accepted: a case (and the CLI's suite) is written into a temporary directory
next to its destination and renamed into place when complete, so no reader ever sees half of one; an
interruption or a full disk removes the temporary directory and leaves the destination as it was. A
directory is a case or a suite, never both, and a reference suite must have its suite.json (written last)
and every case it lists.

`load_case` verifies every hash before it returns a single number: a golden that was edited, truncated or is
missing a tap is refused with a message that names the file, the tap, and what was expected. The checksums
detect accidents and careless edits; they are not a signature (anyone can recompute them).

`write_case` needs NumPy only: any backend can write a candidate for `gemma2-ref compare` with it.
Regenerating a case from the same model and input gives bit-identical tensors (and tensor sha256s): the
forward is a fixed sequence of NumPy operations and the writer sorts names and pads deterministically.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._version import __version__
from ..model.jsonfile import JSONFileError, is_int, read_json, shown
from ..model.taps import canonical_order, sequence_axis
from ..model.tokenizer import BOS
from ..storage.weights import (
    DTYPE_NAMES,
    MappedFiles,
    WeightsError,
    bf16_bits_to_f32,
    checkpoint_files,
    read_safetensors_header,
    safetensors_header,
)
from .hashes import sha256_file, weights_sha256
from .names import apply_name_map

FORMAT_VERSION = 1
ACTIVATIONS_FILE = "activations.safetensors"
MANIFEST = "manifest.json"
SUITE = "suite.json"
CASE_KIND = "gemma2-ref golden case"
CORPUS_KIND = "gemma2-ref corpus golden"  # verify/corpus.py's format: refused here, by name
SUITE_KIND = "gemma2-ref golden suite"


class GoldenError(ValueError):
    """A golden case or suite that cannot be trusted. The message names the file and what is wrong."""


# -- hashing ----------------------------------------------------------------------------------------------


def _manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), without the checksum field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def git_commit() -> str:
    """The commit of the gemma2_ref checkout this code runs from, or "unknown" (installed, no git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- storing one tensor -----------------------------------------------------------------------------------

CASE_DTYPES = ("F16", "F32", "F64")  # what a case stores its taps as (storage/weights.py: the dtype table)


def case_dtype(dtype) -> str | None:
    """The safetensors name a case stores an array of this NumPy dtype under, or None (not one a case stores)."""
    name = DTYPE_NAMES.get(np.dtype(dtype))
    return name if name in CASE_DTYPES else None


def storable(a) -> np.ndarray:
    """An activation as a C-ordered little-endian float16/32/64 array. Other floats (bfloat16 from
    ml_dtypes, torch tensors via __array__) become float32, which holds bfloat16 values exactly."""
    a = np.asarray(a)
    if case_dtype(a.dtype) is None:
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.kind in "fiu" or "bfloat16" in str(a.dtype)):
            raise GoldenError(f"cannot store an activation of dtype {a.dtype}: give floating-point arrays")
        a = a.astype(np.float32)
    return np.ascontiguousarray(a)


def tensor_sha256(a: np.ndarray) -> str:
    """sha256 of the tensor's bytes exactly as activations.safetensors stores them (little-endian, C order)."""
    little = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return hashlib.sha256(memoryview(little.reshape(-1)).cast("B")).hexdigest()  # no copy of the bytes


STATS_BLOCK = 1 << 22  # values per float64 block: a (4098, 256000) logits tap needs no float64 copy of itself


def tensor_stats(a: np.ndarray) -> dict:
    """min, max, mean, std (population) and absmax, in float64, a block of values at a time (one block:
    exactly np.mean / np.std)."""
    flat = np.asarray(a).reshape(-1)
    if flat.size == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "absmax": None}
    blocks = range(0, flat.size, STATS_BLOCK)
    lo = min(float(flat[i : i + STATS_BLOCK].min()) for i in blocks)
    hi = max(float(flat[i : i + STATS_BLOCK].max()) for i in blocks)
    mean = sum(flat[i : i + STATS_BLOCK].astype(np.float64).sum() for i in blocks) / flat.size
    var = sum(np.square(flat[i : i + STATS_BLOCK].astype(np.float64) - mean).sum() for i in blocks) / flat.size
    return {"min": lo, "max": hi, "mean": float(mean), "std": float(np.sqrt(var)), "absmax": max(-lo, hi)}


def tap_entry(name: str, a: np.ndarray) -> dict:
    """The manifest's record of one stored tap: shape, dtype, sha256 of its bytes, statistics. A candidate's
    tap holding NaN or Inf has null statistics and a note saying how many (manifest.json stays JSON)."""
    stats = tensor_stats(a)
    entry = {"name": name, "shape": list(a.shape), "dtype": str(a.dtype), "sha256": tensor_sha256(a)}
    if all(v is None or math.isfinite(v) for v in stats.values()):
        return {**entry, **stats}
    nan, finite = int(np.isnan(a).sum()), int(np.isfinite(a).sum())
    return {
        **entry,
        **{k: None for k in stats},
        "note": f"holds {nan} NaN and {a.size - finite - nan} Inf of its {a.size} values: no statistics",
    }


# -- where a golden is written: new or replaced whole, never half ------------------------------------------


def golden_kind(path: Path) -> str | None:
    """ "case", "suite", "mixed" (both: refused everywhere) or None (not a golden) for an existing directory."""
    case = (path / MANIFEST).is_file() or (path / ACTIVATIONS_FILE).is_file()
    suite = (path / SUITE).is_file() or any((p / MANIFEST).is_file() for p in path.iterdir() if p.is_dir())
    return "mixed" if case and suite else "case" if case else "suite" if suite else None


def _written_by_us(manifest: Path, kind: str) -> bool:
    """The JSON file is one gemma2-ref wrote: an object of our `kind` (read only up to 64 MiB)."""
    try:
        if not manifest.is_file() or manifest.is_symlink():
            return False
        body = read_json(manifest)
    except (OSError, JSONFileError):
        return False
    return isinstance(body, dict) and body.get("kind") == kind


def foreign_entry(path: Path) -> str | None:
    """The first entry of the directory that gemma2-ref did not write (sorted by name), or None when every
    entry is ours: a case's own two files (its manifest of our kind), or a suite's suite.json and case
    directories. Only a directory with no foreign entry may be replaced; a symlink never is."""
    entries = sorted(path.iterdir(), key=lambda p: p.name)
    names = {p.name for p in entries}
    if MANIFEST in names or ACTIVATIONS_FILE in names:  # a case: exactly its two files
        for p in entries:
            if p.name not in (MANIFEST, ACTIVATIONS_FILE) or p.is_symlink() or not p.is_file():
                return p.name
        return None if _written_by_us(path / MANIFEST, CASE_KIND) else MANIFEST
    for p in entries:  # a suite: suite.json and cases
        if p.name == SUITE:
            if not _written_by_us(p, SUITE_KIND):
                return p.name
        elif p.is_symlink() or not p.is_dir():
            return p.name
        else:
            inner = foreign_entry(p)
            if inner is not None or not (p / MANIFEST).exists():
                return f"{p.name}/{inner or ''}"
    return None


def is_only_a_case(path: Path) -> bool:
    """The directory holds a golden case's files and nothing else (what write_case may replace)."""
    return golden_kind(path) == "case" and foreign_entry(path) is None


def blocking_parent(out: Path) -> str | None:
    """The nearest existing parent of `out` when it is not a directory, and what it is instead (a file, a
    symbolic link loop, a dangling link), as "PATH is ..."; None when `out` can be made there."""
    for parent in out.parents:
        if parent.is_dir():
            return None
        if parent.is_symlink():
            try:
                parent.resolve(strict=True)
            except RuntimeError:
                return f"{parent} is a symbolic link loop"
            except OSError:
                return f"{parent} is a dangling symbolic link (to {os.readlink(parent)})"
        if parent.exists():
            return f"{parent} is a file"
    return None


def check_output(out, force: bool = False, option: str = "--out") -> Path:
    """Where `gemma2-ref golden` may write: a new path, an empty directory, or with `force` an existing golden
    case or suite that holds nothing gemma2-ref did not write (replaced whole once the new one is complete).
    Refuses anything else, naming `option` and the first entry that is not ours."""
    if str(out).strip() == "":
        raise GoldenError(f"{option} is empty: give the directory to write (it is created)")
    out = Path(out)
    if out.is_symlink():
        raise GoldenError(f"{option} {out} is a symbolic link: give the directory itself (a link is never replaced)")
    blocked = blocking_parent(out)
    if blocked:
        raise GoldenError(f"{option} {out}: {blocked}: no directory can be made inside it; choose another location")
    if out.exists() and not out.is_dir():
        raise GoldenError(f"{option} {out} is a file: give a directory path (it is created)")
    if out.is_dir() and any(out.iterdir()):
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise GoldenError(
                f"{option} {out} is the current directory or holds it: choose a new or empty "
                f"directory (it is never replaced)"
            )
        kind = golden_kind(out)
        foreign = foreign_entry(out) if kind in ("case", "suite") else None
        if kind is None or kind == "mixed" or foreign is not None:
            what = (
                "both a golden case and a suite"
                if kind == "mixed"
                else f"{foreign}, which gemma2-ref did not write"
                if foreign is not None
                else "files that are not a golden case or suite"
            )
            shown = ", ".join(sorted(p.name for p in out.iterdir())[:4])
            raise GoldenError(
                f"{option} {out} holds {what} ({shown}): choose a new or empty directory (this one "
                f"is not replaced, even with --force)"
            )
        if not force:
            raise GoldenError(
                f"{option} {out} already holds a golden {kind}: pass --force to replace it, or "
                f"choose a new or empty directory"
            )
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GoldenError(f"{option} {out}: {parent} is not writable; choose a location you may write to")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def output_lock(out, option: str = "--out"):
    """Hold `.NAME.lock` next to `out` (its writer's host and pid) for the whole write: a second writer to the
    same `out` is refused while the first is alive; a lock left by a dead process on this host is taken over."""
    out = Path(os.path.abspath(out))
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    lock = out.parent / f".{out.name}.lock"
    me = f"{platform.node()} {os.getpid()}\n"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield from _hold_lock(lock, me, out, option)
    except OSError as e:
        if e.filename is not None and str(e.filename) in (str(lock), str(out.parent)):
            raise OSError(e.errno, f"{e.strerror}; nothing was written", str(out)) from None
        raise
    finally:
        for p in created:  # the parents made for the lock, unless the golden is in them now
            with contextlib.suppress(OSError):
                p.rmdir()


def _hold_lock(lock: Path, me: str, out: Path, option: str):
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
                pid = int(pid)
            except (OSError, ValueError):
                host, pid = None, None  # being written this instant, or not ours: look again
            if host == platform.node() and pid is not None and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its writer died
                continue
            if host is not None:
                raise GoldenError(
                    f"{option} {out} is being written by another gemma2-ref (pid {pid} on {host}, "
                    f"lock {lock}): wait for it to finish, or choose another directory"
                ) from None
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise GoldenError(
            f"{option} {out}: the lock {lock} could not be taken; if no gemma2-ref is writing there, delete it"
        )
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == me:
                lock.unlink()


def interrupted_writes(out) -> list[Path]:
    """Temporary directories next to `out` that a killed run (SIGKILL, power loss: no cleanup could run)
    left behind. Never a golden (no reader looks there); reported so their space can be taken back. A
    temporary of a live writer on this host (its pid is in the name) is not one."""
    out = Path(os.path.abspath(out))
    if not out.parent.is_dir():
        return []
    left = []
    for ext in ("tmp", "old"):
        for p in out.parent.glob(f".{glob.escape(out.name)}.*.{ext}"):
            pid = p.name[len(out.name) + 2 :].split(".")[0]
            if not (pid.isdigit() and _pid_alive(int(pid))):
                left.append(p)
    return sorted(left)


@contextlib.contextmanager
def atomic_directory(out):
    """Yield a new temporary directory next to `out`; when the block completes it replaces `out` (two renames:
    the old content, if any, is moved aside only once the new one is complete, then removed). On any failure,
    an interruption included, the temporary directory and the parents it needed are removed: `out` stays as
    it was. The temporary's name holds this process's pid, so a concurrent run never mistakes it for a
    leftover."""
    out = Path(os.path.abspath(out))  # "." and ".." have a parent to write the temporary directory in
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
        yield tmp
        old = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old"
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.exists():
                os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OSError) and e.strerror and (e.filename is None or str(e.filename).startswith(str(tmp))):
            reason = e.strerror if e.strerror.endswith("nothing was written") else f"{e.strerror}; nothing was written"
            raise OSError(e.errno, reason, str(out)) from None  # name `out`, not the removed temporary
        raise


# -- writing ----------------------------------------------------------------------------------------------


def describe_bos(token_ids) -> str:
    """The BOS policy the ids follow: "one" (Gemma's), "none", or "doubled"."""
    rows = np.atleast_2d(np.asarray(token_ids))
    kinds = set()
    for row in rows:
        n = 0
        while n < len(row) and row[n] == BOS:
            n += 1
        kinds.add({0: "none", 1: "one"}.get(n, "doubled" if n == 2 else f"{n} x <bos>"))
    return kinds.pop() if len(kinds) == 1 else "mixed"


def slice_rows(name: str, a: np.ndarray, positions, batched: bool, seq: int) -> np.ndarray:
    """Only the rows of query positions [start, stop) of one tap (attention keys are kept whole). A tap
    that already holds just those rows (the output head computed only there) is returned as it is."""
    if positions is None:
        return a
    start, stop = positions
    axis = sequence_axis(name, a.ndim, batched)
    if a.shape[axis] == stop - start and a.shape[axis] != seq:
        return a
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def slice_positions(activations: dict, positions, batched: bool) -> dict:
    """slice_rows of every tap: the activations of a whole forward, as a case storing `positions` holds them."""
    if positions is None:
        return dict(activations)
    seq = max(a.shape[sequence_axis(n, a.ndim, batched)] for n, a in activations.items())
    return {name: slice_rows(name, a, positions, batched, seq) for name, a in activations.items()}


def write_case(
    out_dir: str | Path,
    activations: dict,
    token_ids,
    *,
    producer: dict | str | None = None,
    model: dict | None = None,
    text: str | None = None,
    compute_dtype: str | None = None,
    description: str | None = None,
    name_map=None,
    extra: dict | None = None,
    positions: tuple[int, int] | None = None,
    attention_mask=None,
) -> Path:
    """Write a golden case (activations.safetensors + manifest.json). NumPy only: usable from any backend.

    activations: {tap name: array}, canonical names (or give `name_map`, see `apply_name_map`);
                 shapes as in README.md's tap table, a leading batch axis if `token_ids` is (batch, seq).
    token_ids:   the ids the backend actually ran, (seq,) or (batch, seq).
    producer:    {"name": "my-backend", "version": "1.2", ...} or a name; default: gemma2_ref itself.
    model:       {"config": {...}, "weights": {file: sha256}, "tokenizer": {file: sha256}}, see `model_info`.
    compute_dtype: the dtype the backend computed in ("bfloat16", "float32", ...); default: the arrays' dtype.
    positions:   (start, stop): store only these query positions of every tap (long prompts of big models);
                 the activations are given whole, token_ids stay whole.
    attention_mask: for a padded batch, (batch, seq) with 1 for a token and 0 for padding; only the tokens'
                 rows are compared (inputs.padded_positions gives the positions the forward ran).

    The case is written into a temporary directory and renamed to `out_dir` when complete. An existing
    `out_dir` is replaced only if it is empty or holds a case and nothing else.
    """
    ids = check_token_ids(token_ids)
    positions = check_case_positions(positions, ids)
    acts = slice_positions(apply_name_map(activations, name_map), positions, ids.ndim == 2)
    acts = {name: storable(a) for name, a in acts.items()}
    if not acts:
        raise GoldenError(f"{out_dir}: no activations to write")
    specs = {name: (a.shape, a.dtype) for name, a in acts.items()}
    with CaseWriter(
        out_dir,
        ids,
        specs,
        producer=producer,
        model=model,
        text=text,
        compute_dtype=compute_dtype,
        description=description,
        extra=extra,
        positions=positions,
        attention_mask=attention_mask,
    ) as w:
        for name, a in acts.items():
            w.add(name, a)
    return Path(out_dir)


def check_token_ids(token_ids) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise GoldenError(f"token_ids must be integers shaped (seq,) or (batch, seq), got {ids.dtype} {ids.shape}")
    return ids


def check_case_positions(positions, ids: np.ndarray) -> list[int] | None:
    if positions is None:
        return None
    positions = [int(positions[0]), int(positions[1])]
    if not 0 <= positions[0] < positions[1] <= ids.shape[-1]:
        raise GoldenError(f"positions {positions} are not a range inside the {ids.shape[-1]} tokens")
    return positions


def our_producer(producer: dict | str | None) -> dict:
    """The manifest's producer: given, a backend's name, or (None) this gemma2_ref with its commit."""
    if isinstance(producer, dict):
        return producer
    if producer is not None:
        return {"name": producer}
    return {
        "name": "gemma2_ref",
        "version": __version__,
        "commit": git_commit(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }


PWRITE_BYTES = 1 << 30  # bytes per os.pwrite call (Linux writes at most ~2 GiB per call)


class CaseWriter:
    """A golden case written one tap at a time, as the forward produces them: pass `add` as the forward's
    `sink` (taps.Taps), and a case never holds its taps in memory, only each one's hash and statistics.

        with CaseWriter(out_dir, ids, specs, model=..., positions=...) as case:
            forward(..., sink=case.add)       # each tap goes to its place in activations.safetensors
            case.add("logits", logits)
        # here: every tap arrived, the file is hashed, manifest.json written, the case renamed into place

    `specs` {name: (stored shape, dtype)} fixes the file's layout before the first tap arrives: the same
    header, offsets and bytes write_case gives, so a streamed case is bit-identical to one written whole.
    A tap given with every position when the case stores `positions` keeps only those rows. Anything that
    goes wrong (an exception, an interruption, a missing tap) leaves no case: see atomic_directory."""

    def __init__(
        self,
        out_dir,
        token_ids,
        specs: dict,
        *,
        producer=None,
        model=None,
        text=None,
        compute_dtype=None,
        description=None,
        extra=None,
        positions=None,
        attention_mask=None,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not (
            self.out_dir.is_dir() and (not any(self.out_dir.iterdir()) or is_only_a_case(self.out_dir))
        ):
            found = (
                "is a file"
                if not self.out_dir.is_dir()
                else f"holds {'a golden suite' if golden_kind(self.out_dir) else 'files that are not a golden case'}"
            )
            raise GoldenError(
                f"{self.out_dir} {found}: a case is written into a new or empty directory, or over a case"
            )
        self.ids = check_token_ids(token_ids)
        self.positions = check_case_positions(positions, self.ids)
        self.specs = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in specs.items()}
        for name, (_, dtype) in self.specs.items():
            if case_dtype(dtype) is None:
                raise GoldenError(f"tap {name!r}: a case stores float16/32/64, not {dtype}")
        self.fields = dict(
            producer=our_producer(producer),
            model=model,
            text=text,
            compute_dtype=compute_dtype,
            description=description,
            extra=extra,
            attention_mask=attention_mask,
        )
        self.entries: dict[str, dict] = {}
        self._stack = contextlib.ExitStack()

    @property
    def nbytes(self) -> int:
        """The tap bytes the file holds (its size less the header)."""
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in self.specs.values())

    def __enter__(self) -> CaseWriter:
        self._tmp = self._stack.enter_context(atomic_directory(self.out_dir))
        head, self._offsets = safetensors_header({n: (case_dtype(d), shape) for n, (shape, d) in self.specs.items()})
        self._file = self._stack.enter_context(open(self._tmp / ACTIVATIONS_FILE, "wb"))
        self._file.write(head)
        self._file.truncate(len(head) + self.nbytes)  # every tap's place exists; each is written into it
        self._file.flush()
        return self

    def add(self, name: str, a) -> None:
        """Store one tap: its stored rows, at its offset; keep its manifest entry."""
        if name not in self.specs:
            raise GoldenError(f"tap {name!r} is not one this case stores ({len(self.specs)} taps)")
        if name in self.entries:
            raise GoldenError(f"tap {name!r} given twice")
        shape, dtype = self.specs[name]
        a = slice_rows(name, np.asarray(a), self.positions, self.ids.ndim == 2, self.ids.shape[-1])
        a = np.ascontiguousarray(storable(a), dtype=dtype.newbyteorder("<"))
        if a.shape != shape:
            raise GoldenError(f"tap {name!r} is {list(a.shape)}, the case stores it as {list(shape)}")
        raw, offset, done = memoryview(a.reshape(-1)).cast("B"), self._offsets[name][0], 0
        while done < len(raw):
            done += os.pwrite(self._file.fileno(), raw[done : done + PWRITE_BYTES], offset + done)
        self.entries[name] = tap_entry(name, a)

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None:
            try:
                self._finish()
            except BaseException:
                if not self._stack.__exit__(*sys.exc_info()):
                    raise
                return False
        return self._stack.__exit__(kind, error, tb)

    def _finish(self) -> None:
        missing = [n for n in canonical_order(self.specs) if n not in self.entries]
        if missing:
            raise GoldenError(f"{self.out_dir}: {len(missing)} tap(s) never arrived, the first {missing[0]!r}")
        self._file.close()
        entries = [self.entries[n] for n in canonical_order(self.entries)]
        manifest = case_manifest(
            entries, self.ids, positions=self.positions, activations_file=self._tmp / ACTIVATIONS_FILE, **self.fields
        )
        (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")


def case_manifest(
    entries: list[dict],
    ids,
    *,
    producer,
    model,
    text,
    compute_dtype,
    description,
    positions,
    extra,
    activations_file: Path,
    attention_mask=None,
) -> dict:
    """manifest.json of a case: `entries` (tap_entry of each tap, in execution order), the activations
    written to `activations_file`."""
    dtypes = sorted({e["dtype"] for e in entries})
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": CASE_KIND,
        "description": description,
        "producer": producer,
        "model": model,
        "input": {
            "text": text,
            "token_ids": ids.tolist(),
            "shape": list(ids.shape),
            "bos": describe_bos(ids),
            "positions": positions,
            **(
                {"attention_mask": np.asarray(attention_mask).astype(int).tolist()}
                if attention_mask is not None
                else {}
            ),
        },
        "compute_dtype": compute_dtype or (dtypes[0] if len(dtypes) == 1 else "mixed"),
        "activations": {
            "file": ACTIVATIONS_FILE,
            "bytes": activations_file.stat().st_size,
            "sha256": sha256_file(activations_file),
        },
        "taps": entries,
    }
    if extra:
        manifest["extra"] = extra
    manifest["manifest_sha256"] = _manifest_checksum(manifest)
    return manifest


def model_info_from_files(
    directory, cfg, name: str | None = None, bundled: bool = False, progress: bool = False
) -> dict:
    """What a manifest records about a checkpoint: where it came from, its config, sha256 of its files.

    A bundled model is recorded by name (its path differs between checkouts); a directory by its path."""
    directory = Path(directory)
    files, _ = checkpoint_files(directory)
    tok = directory / "tokenizer.model"
    return {
        "name": name or directory.name,
        "path": None if bundled else str(directory.resolve()),
        "bundled": bundled,
        "config": cfg.to_hf_dict(),
        "weights": weights_sha256(sorted(files), progress),  # remembered across runs: verify/hashes.py
        "tokenizer": {tok.name: sha256_file(tok)} if tok.is_file() else None,
    }


def model_info(model, given_name: str | None = None, progress: bool = False) -> dict:
    """model_info_from_files for a loaded gemma2_ref Model; `given_name` as the user named it ("tiny")."""
    from ..data import bundled_path

    where = bundled_path(str(given_name)) if given_name is not None else None
    bundled = where is not None and model.path is not None and Path(model.path).resolve() == where.resolve()
    return model_info_from_files(model.path, model.config, str(given_name) if bundled else None, bundled, progress)


# -- reading and verifying --------------------------------------------------------------------------------


@dataclass
class Case:
    """A verified golden case: manifest, activations by name, taps in execution order."""

    path: Path
    manifest: dict
    activations: Mapping[str, np.ndarray]  # MappedTensors when loaded: each tap read when asked for
    verified: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tap_names(self) -> list[str]:
        return canonical_order(self.activations)

    @property
    def token_ids(self) -> np.ndarray | None:
        ids = (self.manifest.get("input") or {}).get("token_ids")
        return None if ids is None else np.asarray(ids, dtype=np.int64)

    @property
    def attention_mask(self) -> np.ndarray | None:
        """A padded batch's (batch, seq) mask, 1 for a token and 0 for padding; None: no padding."""
        m = (self.manifest.get("input") or {}).get("attention_mask")
        return None if m is None else np.asarray(m, dtype=bool)

    @property
    def positions(self) -> tuple[int, int] | None:
        """The query positions [start, stop) the taps hold, or None: all of them."""
        p = (self.manifest.get("input") or {}).get("positions")
        return None if p is None else (int(p[0]), int(p[1]))

    @property
    def batched(self) -> bool:
        ids = self.token_ids
        return ids is not None and ids.ndim == 2

    @property
    def compute_dtype(self) -> str | None:
        return self.manifest.get("compute_dtype")

    @property
    def producer(self) -> str:
        p = self.manifest.get("producer") or {}
        return " ".join(str(p[k]) for k in ("name", "version") if p.get(k)) or "unknown producer"


class MappedTensors(Mapping):
    """The tensors of a safetensors file by name, read through a memory map when asked for, one at a time:
    a 60 GiB case is compared tap by tap without ever being in memory whole. F16/F32/F64 tensors are
    read-only views of the file (the OS pages them in and out); BF16 ones are converted to float32 (exactly)
    on each access. The header and the map are storage/weights.py's (the one safetensors reader); the map
    stays open as long as this object or an array from it lives."""

    def __init__(self, path: Path):
        try:
            self.refs, _ = read_safetensors_header(path)
        except WeightsError as e:
            raise GoldenError(str(e)) from None
        self._files = MappedFiles()

    def stored_dtype(self, name: str) -> str:
        return self.refs[name].dtype

    def __getitem__(self, name: str) -> np.ndarray:
        ref = self.refs[name]
        a = self._files.array(ref)
        if ref.dtype == "BF16":
            return bf16_bits_to_f32(a)
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))

    def __iter__(self):
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


def check_manifest(manifest, mpath: Path) -> dict:
    """A case's manifest.json, checked for the type and range of every field the tool reads, before any is
    used: one line naming the file, the key, what it holds and what was expected."""

    def bad(key: str, value, expected: str) -> GoldenError:
        return GoldenError(
            f"{mpath}: `{key}` is {shown(value)}; expected {expected}. Regenerate the case with "
            f"`gemma2-ref golden` (or write it with gemma2_ref.golden.write_case)"
        )

    if not isinstance(manifest, dict):
        raise bad("(the whole file)", manifest, "a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenError(
            f"{mpath}: format_version {manifest.get('format_version')!r}, this gemma2_ref reads {FORMAT_VERSION}"
        )
    for key in ("producer", "model", "extra"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise bad(key, manifest[key], "an object or null")
    if not isinstance(manifest.get("compute_dtype"), (str, type(None))):
        raise bad("compute_dtype", manifest["compute_dtype"], 'a dtype name such as "float32"')
    activations = manifest.get("activations")
    if not (
        isinstance(activations, dict)
        and is_int(activations.get("bytes"))
        and activations["bytes"] >= 0
        and isinstance(activations.get("sha256"), str)
    ):
        raise bad("activations", activations, "an object {file, bytes: an integer, sha256: a string}")
    taps = manifest.get("taps")
    if not isinstance(taps, list):
        raise bad("taps", taps, "a list of objects {name, shape, dtype, sha256, ...}")
    for n, tap in enumerate(taps):
        if not (
            isinstance(tap, dict)
            and isinstance(tap.get("name"), str)
            and isinstance(tap.get("dtype"), str)
            and isinstance(tap.get("sha256"), str)
            and isinstance(tap.get("shape"), list)
            and all(is_int(d) and d >= 0 for d in tap["shape"])
        ):
            raise bad(
                f"taps[{n}]",
                tap,
                "an object with a string `name`, `dtype` and `sha256` and a `shape` list of non-negative integers",
            )
    names = [t["name"] for t in taps]
    if len(set(names)) != len(names):
        raise bad("taps", next(n for n in names if names.count(n) > 1), "each tap listed once")
    check_manifest_input(manifest.get("input"), bad)
    return manifest


def check_manifest_input(given, bad) -> None:
    """The manifest's `input`: token ids (seq,) or (batch, seq) of integers, a mask of the same shape, and
    stored positions [start, stop) inside the sequence."""
    if not isinstance(given, dict):
        raise bad("input", given, "an object {text, token_ids, shape, bos, positions}")
    ids = given.get("token_ids")
    if ids is not None:
        batched = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        rows = ids if batched else [ids]
        if (
            not isinstance(ids, list)
            or not ids
            or any(not isinstance(r, list) or not r or len(r) != len(rows[0]) for r in rows)
            or not all(is_int(t) for r in rows for t in r)
        ):
            raise bad(
                "input.token_ids", ids, "a non-empty list of integer token ids, or a list of equal-length such lists"
            )
        shape = [len(rows), len(rows[0])] if batched else [len(ids)]
        if given.get("shape") is not None and given["shape"] != shape:
            raise bad("input.shape", given["shape"], f"{shape}, the shape of input.token_ids")
        mask = given.get("attention_mask")
        if mask is not None and (
            not isinstance(mask, list)
            or len(shape) != 2
            or len(mask) != shape[0]
            or not all(
                isinstance(r, list) and len(r) == shape[1] and all(v in (0, 1) and not isinstance(v, float) for v in r)
                for r in mask
            )
        ):
            raise bad(
                "input.attention_mask", mask, f"a {shape} list of 0 and 1 (the shape of input.token_ids, batched)"
            )
        positions = given.get("positions")
        if positions is not None and not (
            isinstance(positions, list)
            and len(positions) == 2
            and all(is_int(p) for p in positions)
            and 0 <= positions[0] < positions[1] <= shape[-1]
        ):
            raise bad("input.positions", positions, f"null or [start, stop] with 0 <= start < stop <= {shape[-1]}")
    elif given.get("positions") is not None or given.get("attention_mask") is not None:
        raise bad("input.token_ids", None, "the token ids the positions and mask refer to")


def load_case(path: str | Path, verify: bool = True) -> Case:
    """Load a golden case directory, verifying the manifest checksum, the file's sha256, the set of taps,
    and every tap's shape, dtype and sha256. Raises GoldenError naming what does not match."""
    path = Path(path)
    mpath, apath = path / MANIFEST, path / ACTIVATIONS_FILE
    if not path.is_dir():
        raise GoldenError(f"{path}: not a golden case directory (expected {MANIFEST} and {ACTIVATIONS_FILE} in it)")
    for p in (mpath, apath):
        if not p.is_file():
            raise GoldenError(
                f"{p}: missing. A golden case needs both {MANIFEST} and {ACTIVATIONS_FILE}; "
                f"regenerate it with `gemma2-ref golden`"
            )
    try:
        manifest = check_manifest(read_json(mpath), mpath)
    except JSONFileError as e:
        raise GoldenError(f"{e}; the manifest was edited or truncated") from None
    if verify:
        recorded, actual = manifest.get("manifest_sha256"), _manifest_checksum(manifest)
        if recorded != actual:
            raise GoldenError(
                f"{mpath}: manifest checksum mismatch (recorded {recorded}, content gives "
                f"{actual}): the manifest was edited after it was written. Regenerate the case"
            )
        expected = manifest["activations"]
        size = apath.stat().st_size
        if size != expected["bytes"]:
            raise GoldenError(
                f"{apath}: {size} bytes, the manifest says {expected['bytes']}: the file is "
                f"truncated or was replaced. Regenerate the case"
            )
        found = sha256_file(apath)
        if found != expected["sha256"]:
            raise GoldenError(
                f"{apath}: sha256 {found} does not match the manifest's {expected['sha256']}: "
                f"the activations were modified. Regenerate the case"
            )
    arrays = MappedTensors(apath)
    listed = {t["name"]: t for t in manifest.get("taps", [])}
    missing, extra = sorted(set(listed) - set(arrays)), sorted(set(arrays) - set(listed))
    if missing:
        raise GoldenError(f"{apath}: taps listed in the manifest are missing from the file: {missing[:5]}")
    if extra:
        raise GoldenError(f"{apath}: tensors not listed in the manifest: {extra[:5]}")
    if verify:
        for name, meta in listed.items():
            a = arrays[name]
            bf16 = arrays.stored_dtype(name) == "BF16"
            if list(a.shape) != meta["shape"] or (not bf16 and str(a.dtype) != meta["dtype"]):
                raise GoldenError(
                    f"{apath}: tap {name!r} is {a.dtype} {list(a.shape)}, the manifest says "
                    f"{meta['dtype']} {meta['shape']}"
                )
            if not bf16 and tensor_sha256(a) != meta["sha256"]:
                raise GoldenError(
                    f"{apath}: tap {name!r}: sha256 of its bytes does not match the manifest: the tensor was modified"
                )
    return Case(path, manifest, arrays, verified=verify)


def load_activations_file(path: str | Path, name_map=None) -> Case:
    """A bare safetensors file of activations (no manifest): loaded unverified, as a candidate only."""
    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"{path}: no such file")
    arrays = MappedTensors(path)
    arrays = apply_name_map(arrays, name_map) if name_map else arrays
    manifest = {"format_version": FORMAT_VERSION, "producer": {"name": path.name}, "input": {}}
    return Case(path, manifest, arrays, verified=False, notes=["no manifest: hashes not verified, token ids unknown"])


# -- suites -----------------------------------------------------------------------------------------------


@dataclass
class Suite:
    path: Path
    info: dict
    cases: list[Case]

    @property
    def name(self) -> str:
        return self.info.get("name") or self.path.name


def case_pairs(reference: Case | Suite, candidate: Case | Suite) -> list[tuple[Case, Case | None, str | None]]:
    """What compare and diagnose hold against what: a case against a case, or a suite's cases, each against
    the candidate suite's case of that name. Per reference case: (it, the candidate's or None when missing, the
    reason the candidate's suite.json gives for skipping it or None). A case against a suite is one error."""
    if isinstance(reference, Suite) != isinstance(candidate, Suite):
        raise GoldenError(
            f"a case goes with a case and a suite with a suite: {reference.path} is a "
            f"{'suite' if isinstance(reference, Suite) else 'case'}, {candidate.path} is a "
            f"{'suite' if isinstance(candidate, Suite) else 'case'}"
        )
    if isinstance(reference, Case):
        return [(reference, candidate, None)]
    by_name = {c.name: c for c in candidate.cases}
    skipped = {e["name"]: e["reason"] for e in candidate.info.get("skipped") or []}
    return [(case, by_name.get(case.name), skipped.get(case.name)) for case in reference.cases]


def write_suite(out_dir: str | Path, name: str, cases: list[dict], info: dict | None = None) -> Path:
    """suite.json listing the case directories under out_dir: [{"name", "description"}, ...]. Write it last,
    once every case is written: its presence says the suite is complete."""
    out_dir = Path(out_dir)
    body = {
        "format_version": FORMAT_VERSION,
        "kind": SUITE_KIND,
        "name": name,
        **(info or {}),
        "cases": [{"name": c["name"], "description": c.get("description")} for c in cases],
    }
    tmp = out_dir / (SUITE + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(out_dir / SUITE)
    return out_dir


def load_suite(path: str | Path, verify: bool = True) -> Suite:
    """A suite directory: suite.json and every case it lists (a listed case that is missing is refused)."""
    path = Path(path)
    try:
        info = read_json(path / SUITE)
    except JSONFileError as e:
        raise GoldenError(str(e)) from None
    entries = info.get("cases") if isinstance(info, dict) else None
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] for e in entries)
    ):
        raise GoldenError(
            f'{path / SUITE}: expected an object whose `cases` lists at least one {{"name": ...}}; '
            f"regenerate the suite with `gemma2-ref golden --suite`"
        )
    skipped = info.get("skipped")
    if skipped is not None and not (
        isinstance(skipped, list)
        and all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("reason"), str) for e in skipped
        )
    ):
        raise GoldenError(
            f'{path / SUITE}: `skipped` is {shown(skipped)}; expected a list of {{"name": case, '
            f'"reason": why its backend could not write it}}'
        )
    cases = []
    for entry in entries:
        if Path(entry["name"]).name != entry["name"] or entry["name"] in (".", ".."):
            raise GoldenError(
                f"{path / SUITE} lists the case {entry['name']!r}: a case is a directory inside the "
                f"suite, named without a path"
            )
        case_dir = path / entry["name"]
        if not case_dir.is_dir():
            raise GoldenError(
                f"{path / SUITE} lists case {entry['name']!r} but {case_dir} does not exist: the "
                f"suite is incomplete. Regenerate it with `gemma2-ref golden --suite`"
            )
        cases.append(load_case(case_dir, verify))
    return Suite(path, info, cases)


def load_golden(path: str | Path, verify: bool = True, name_map=None, *, reference: bool = False) -> Case | Suite:
    """A case directory, a suite directory (with suite.json, or just case directories: a candidate written
    case by case), or a bare .safetensors file (unverified: it has no manifest).

    `reference=True`: what the other side is held to, so a suite must have its suite.json (otherwise a
    missing case would go unnoticed). A directory holding both a case and a suite is always refused."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return load_activations_file(path, name_map)
    if not path.exists():
        raise GoldenError(f"{path}: no such directory (expected a golden case or suite written by `gemma2-ref golden`)")
    kind = golden_kind(path) if path.is_dir() else None
    if kind == "case" and _written_by_us(path / MANIFEST, CORPUS_KIND):
        raise GoldenError(
            f"{path} is a corpus golden, not a golden case or suite: `gemma2-ref compare REF CAND` holds a corpus "
            f"golden against another (docs/corpus.md); diagnose and the case API take cases and suites"
        )
    if kind == "mixed":
        raise GoldenError(
            f"{path} holds both a golden case ({MANIFEST}) and a suite (case directories or "
            f"{SUITE}): one of them would be ignored. Regenerate it into an empty directory"
        )
    if (path / SUITE).is_file():
        return load_suite(path, verify)
    subcases = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file()) if path.is_dir() else []
    if subcases and reference:
        raise GoldenError(
            f"{path}: a suite without {SUITE} (an interrupted `gemma2-ref golden --suite`?): as "
            f"the reference it cannot show which cases are missing. Regenerate it"
        )
    if not (path / MANIFEST).exists() and subcases:  # a candidate suite written case by case, no suite.json
        cases = [load_case(p, verify) for p in subcases]
        if name_map:
            for c in cases:
                c.activations = apply_name_map(c.activations, name_map)
        return Suite(path, {"name": path.name, "cases": [{"name": p.name} for p in subcases]}, cases)
    case = load_case(path, verify)
    if name_map:
        case.activations = apply_name_map(case.activations, name_map)
    return case

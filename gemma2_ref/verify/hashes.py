"""sha256 of files, and of a checkpoint's weight files hashed once: the digests remembered across runs.

A manifest records the sha256 of every weight file (golden.model_info); for a 27B that is 50 GiB read on every
golden. `weights_sha256` remembers each big file's digest in a small JSON cache, keyed on what changes when
the file does: its resolved path, size, mtime_ns, ctime_ns (which no user command can set back) and inode
(device too). A digest is used only when all of them are what they were when it was computed; otherwise the
file is hashed again and the entry replaced. The cache lives beside the checkpoint
(`<checkpoint>/.gemma2-ref-sha256.json`) when that directory is writable, else in the user cache
(`$XDG_CACHE_HOME/gemma2-ref/sha256.json`, default `~/.cache/gemma2-ref`); it is written whole under a
temporary name and renamed, never into a directory we may not write, and only ever our own file. A cache file
that cannot be read or is not ours is ignored with a warning and left as it is (the user cache is used).
Files under CACHE_MIN_BYTES (the bundled models, tokenizer.model) are simply hashed: that takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

CACHE_FILE = ".gemma2-ref-sha256.json"  # beside the checkpoint
USER_CACHE_FILE = "sha256.json"  # in user_cache_dir()
CACHE_KIND = "gemma2-ref sha256 cache"
CACHE_FORMAT = 1
CACHE_MIN_BYTES = 64 << 20
RACY_SECONDS = 2  # a file modified this recently may change again within its mtime's granularity: not cached


class HashCacheWarning(UserWarning):
    """A hash cache file that could not be used: the weights are hashed instead."""


def sha256_file(path: str | Path, progress: bool = False) -> str:
    path = Path(path)
    h = hashlib.sha256()
    size, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            done += len(chunk)
            if progress and size > 1 << 28:
                print(f"  hashing {path.name}: {100 * done / size:5.1f}%", end="\r", file=sys.stderr, flush=True)
    if progress and size > 1 << 28:
        print(file=sys.stderr)
    return h.hexdigest()


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma2-ref"


def file_key(path: Path) -> dict:
    """What must be unchanged for a remembered digest of `path` to be trusted."""
    st = path.stat()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def weights_sha256(files: list[Path], progress: bool = False) -> dict[str, str]:
    """{file name: sha256} for a checkpoint's files (all in one directory), big ones remembered across runs."""
    files = [Path(f).resolve() for f in files]
    big = [f for f in files if f.stat().st_size >= CACHE_MIN_BYTES]
    if not big:
        return {f.name: sha256_file(f, progress) for f in files}
    where = cache_location(big[0].parent)
    entries = read_cache(where) if where is not None else {}
    digests, changed = {}, False
    for f in files:
        if f not in big:
            digests[f.name] = sha256_file(f, progress)
            continue
        key = file_key(f)
        entry = entries.get(str(f))
        if isinstance(entry, dict) and {k: entry.get(k) for k in key} == key and isinstance(entry.get("sha256"), str):
            digests[f.name] = entry["sha256"]
            continue
        started = time.time_ns()
        digests[f.name] = sha256_file(f, progress)
        if file_key(f) == key and key["mtime_ns"] < started - RACY_SECONDS * 10**9:  # unchanged while read
            entries[str(f)] = {**key, "sha256": digests[f.name]}
            changed = True
    if changed and where is not None:
        write_cache(where, entries)
    return digests


def cache_location(checkpoint_dir: Path) -> Path | None:
    """The cache file to use: beside the checkpoint if we may write there, else the user cache; None if
    neither can be written (then nothing is remembered). A file of that name that is not a cache of ours
    (malformed, or someone else's) is never used nor overwritten: a warning says so."""
    for candidate in (checkpoint_dir / CACHE_FILE, user_cache_dir() / USER_CACHE_FILE):
        if candidate.exists() or candidate.is_symlink():
            problem = _not_ours(candidate)
            if problem:
                warnings.warn(
                    HashCacheWarning(
                        f"{candidate}: ignored and left as it is ({problem}): the weight "
                        f"files are hashed; delete it to let gemma2-ref remember their "
                        f"digests there"
                    ),
                    stacklevel=3,
                )
            elif os.access(candidate, os.W_OK) and os.access(candidate.parent, os.W_OK):
                return candidate
            continue
        try:
            if candidate.parent != checkpoint_dir:
                candidate.parent.mkdir(parents=True, exist_ok=True)  # the user cache: our own directory
        except OSError:
            continue
        if os.access(candidate.parent, os.W_OK):
            return candidate
    return None


def _not_ours(path: Path) -> str | None:
    """Why `path` is not a hash cache this version wrote, or None if it is one."""
    if path.is_symlink() or not path.is_file():
        return "not a regular file"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"not readable JSON: {e}"
    if (
        not isinstance(data, dict)
        or data.get("kind") != CACHE_KIND
        or data.get("format") != CACHE_FORMAT
        or not isinstance(data.get("files"), dict)
    ):
        return f"not a {CACHE_KIND} of format {CACHE_FORMAT}"
    return None


def read_cache(path: Path) -> dict[str, dict]:
    """The entries {resolved path: key + sha256} of a cache file cache_location chose; {} if it is not there."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):  # changed since cache_location looked
        return {}


def write_cache(path: Path, entries: dict[str, dict]) -> None:
    """Write the cache whole (temporary file, then rename); a failure only costs the next run a re-hash."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    body = {
        "kind": CACHE_KIND,
        "format": CACHE_FORMAT,
        "files": {p: e for p, e in sorted(entries.items()) if Path(p).is_file()},
    }  # forget deleted files
    try:
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(
            HashCacheWarning(
                f"{path}: could not be written ({e.strerror}); the digests will be computed again next time"
            ),
            stacklevel=3,
        )

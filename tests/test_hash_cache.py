"""Weights hashed once (issue 31): a manifest's weight sha256s are remembered beside the checkpoint (or in the
user cache) and trusted only while the file's path, size, mtime, ctime and inode are unchanged.

Each test can fail: drop mtime_ns and ctime_ns from the key and the touched-shard test fails (a touch moves
both); drop ctime_ns alone and the edited-shard test fails (its mtime is set back); skip the permission check
and the read-only test finds a file in the checkpoint.
"""

import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest

import gemma2_ref as g2
from gemma2_ref.storage.checkpoints import random_weights, save_checkpoint
from gemma2_ref.verify import golden as G
from gemma2_ref.verify import hashes as H

OLD = 1_600_000_000  # a time in the past: files "older" than the racy window


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """A checkpoint-like directory with two "big" files (CACHE_MIN_BYTES lowered), dated in the past; the
    user cache in tmp_path; every real hash counted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(H, "CACHE_MIN_BYTES", 1000)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    files = []
    for k, fill in enumerate((b"a", b"b"), start=1):
        f = ckpt / f"model-0000{k}-of-00002.safetensors"
        f.write_bytes(fill * 5000)
        os.utime(f, (OLD, OLD))
        files.append(f)
    hashed = []
    real = H.sha256_file
    monkeypatch.setattr(H, "sha256_file", lambda p, progress=False: hashed.append(Path(p).name) or real(p, progress))
    return files, hashed


def truth(files):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_a_second_run_hashes_nothing_and_gives_the_same_digests(shards):
    files, hashed = shards
    first = H.weights_sha256(files)
    assert first == truth(files) and sorted(hashed) == sorted(f.name for f in files)
    cache = files[0].parent / H.CACHE_FILE
    assert json.loads(cache.read_text())["kind"] == H.CACHE_KIND
    hashed.clear()
    assert H.weights_sha256(files) == first
    assert hashed == []


def test_a_touched_shard_is_hashed_again(shards):
    files, hashed = shards
    H.weights_sha256(files)
    hashed.clear()
    os.utime(files[1], (OLD + 10, OLD + 10))  # same bytes, new mtime
    assert H.weights_sha256(files) == truth(files)
    assert hashed == [files[1].name]


def test_an_edited_shard_is_hashed_again_even_with_its_size_and_mtime_put_back(shards):
    files, hashed = shards
    before = H.weights_sha256(files)
    hashed.clear()
    data = bytearray(files[0].read_bytes())
    data[100] ^= 1
    with open(files[0], "r+b") as f:  # edited in place: same inode, same size
        f.write(bytes(data))
    os.utime(files[0], (OLD, OLD))  # and the old mtime restored: only ctime tells
    after = H.weights_sha256(files)
    assert hashed == [files[0].name]
    assert after == truth(files) and after[files[0].name] != before[files[0].name]


def test_a_replaced_shard_is_hashed_again(shards):
    files, hashed = shards
    H.weights_sha256(files)
    hashed.clear()
    replacement = files[0].with_suffix(".new")
    replacement.write_bytes(b"c" * 5000)
    os.utime(replacement, (OLD, OLD))
    os.replace(replacement, files[0])  # another inode, same name, size and mtime
    assert H.weights_sha256(files) == truth(files)
    assert hashed == [files[0].name]


def test_a_file_modified_just_now_is_not_remembered(shards):
    """Within the racy window a file may change again without its mtime moving (coarse timestamps)."""
    files, hashed = shards
    os.utime(files[0])  # now
    H.weights_sha256(files)
    hashed.clear()
    H.weights_sha256(files)
    assert hashed == [files[0].name]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"kind": "something else", "files": {}}',
        b"\xff\xfe",
        b'{"kind": "gemma2-ref sha256 cache", "format": 1, "files": []}',
    ],
)
def test_a_malformed_cache_is_ignored_with_a_warning_and_left_as_it_is(shards, content):
    files, hashed = shards
    cache = files[0].parent / H.CACHE_FILE
    cache.write_bytes(content)
    with pytest.warns(H.HashCacheWarning, match="ignored and left as it is"):
        assert H.weights_sha256(files) == truth(files)
    assert cache.read_bytes() == content  # nothing a user wrote is overwritten
    user = H.user_cache_dir() / H.USER_CACHE_FILE
    assert json.loads(user.read_text())["kind"] == H.CACHE_KIND  # remembered there instead
    hashed.clear()
    with pytest.warns(H.HashCacheWarning):
        assert H.weights_sha256(files) == truth(files)
    assert hashed == []


def test_a_malformed_entry_is_hashed_again(shards):
    files, hashed = shards
    H.weights_sha256(files)
    cache = files[0].parent / H.CACHE_FILE
    data = json.loads(cache.read_text())
    data["files"][str(files[0].resolve())] = "garbage"
    data["files"][str(files[1].resolve())]["sha256"] = None
    cache.write_text(json.dumps(data))
    hashed.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert H.weights_sha256(files) == truth(files)
    assert sorted(hashed) == sorted(f.name for f in files)


def test_the_cache_never_writes_into_a_directory_without_permission(shards, monkeypatch):
    """A read-only checkpoint (a shared download): its directory is left untouched, the user cache is used;
    with neither writable, nothing is remembered and nothing fails."""
    files, hashed = shards
    ckpt = files[0].parent
    listing = sorted(os.listdir(ckpt))
    real_access = os.access
    denied = {ckpt.resolve()}
    monkeypatch.setattr(H.os, "access", lambda p, mode: Path(p).resolve() not in denied and real_access(p, mode))
    if os.geteuid() != 0:  # a real permission too, where the bits bind (root passes them)
        ckpt.chmod(0o555)
    try:
        assert H.weights_sha256(files) == truth(files)
        assert sorted(os.listdir(ckpt)) == listing
        assert (H.user_cache_dir() / H.USER_CACHE_FILE).is_file()
        denied.add(H.user_cache_dir().resolve())
        (H.user_cache_dir() / H.USER_CACHE_FILE).unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert H.weights_sha256(files) == truth(files)
        assert sorted(os.listdir(ckpt)) == listing and not (H.user_cache_dir() / H.USER_CACHE_FILE).exists()
    finally:
        ckpt.chmod(0o755)


def test_a_golden_manifest_records_the_same_digests_from_the_cache(tmp_path, monkeypatch):
    """model_info: hashed the first time, remembered the second, the manifest's digests the true ones."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(H, "CACHE_MIN_BYTES", 1000)
    cfg = g2.PRESETS["tiny"]
    path = save_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg), "BF16", shards=2)
    for f in path.glob("*.safetensors"):
        os.utime(f, (OLD, OLD))
    model = g2.load_model(path)
    first = G.model_info(model)["weights"]
    assert first == truth(sorted(path.glob("*.safetensors")))
    calls = []
    monkeypatch.setattr(H, "sha256_file", lambda *a, **k: calls.append(a) or pytest.fail("hashed again"))
    assert G.model_info(model)["weights"] == first
    assert calls == [] and (path / H.CACHE_FILE).is_file()

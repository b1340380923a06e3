"""Memory: weights stay memory-mapped in their stored dtype and are converted a layer at a time.

Streaming layers (the default) and keeping converted layers (`keep_converted=True`) must be the same
computation: the logits are bit-identical, for a prefill and for a KV-cache decode.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref.checkpoints import random_weights, save_checkpoint
from gemma2_ref.generate import KVCache
from gemma2_ref.weights import (
    EMBEDDING,
    MappedFiles,
    bf16_bits_to_f32,
    read_safetensors_header,
    to_compute_dtype,
    write_safetensors,
)


@pytest.fixture(scope="module")
def tiny_bf16_dir(tmp_path_factory):
    cfg = g2.PRESETS["tiny"]
    return save_checkpoint(
        tmp_path_factory.mktemp("tiny_bf16"), cfg, random_weights(cfg, seed=11, scale=2.0), "BF16", shards=3
    )


IDS = np.concatenate([[2], np.random.default_rng(3).integers(3, 2048, 70)])  # > 2 x the tiny window (32)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_streaming_and_keep_converted_give_bit_identical_logits(tiny_bf16_dir, dtype):
    streamed = g2.load_model(tiny_bf16_dir, dtype=dtype)
    kept = g2.load_model(tiny_bf16_dir, dtype=dtype, keep_converted=True)
    first = kept.logits(IDS)  # converts and keeps every layer
    again = kept.logits(IDS)  # uses the kept layers
    np.testing.assert_array_equal(streamed.logits(IDS), first)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.dtype(dtype)


def test_streaming_and_keep_converted_decode_bit_identically(tiny_bf16_dir):
    """Greedy decoding with a KV cache: every step's logits equal, token for token."""
    models = [g2.load_model(tiny_bf16_dir), g2.load_model(tiny_bf16_dir, keep_converted=True)]
    caches = [KVCache(m.config, capacity=64) for m in models]
    steps = [m.forward(IDS[:20], kv_cache=c, logits_at="last")["logits"][-1] for m, c in zip(models, caches)]
    for _ in range(6):
        np.testing.assert_array_equal(steps[0], steps[1])
        token = int(np.argmax(steps[0]))
        steps = [m.forward([token], kv_cache=c, logits_at="last")["logits"][-1] for m, c in zip(models, caches)]
    np.testing.assert_array_equal(steps[0], steps[1])


def test_streamed_decode_converting_64_rows_at_a_time_is_bit_identical_to_converted_layers(tiny_bf16_dir, monkeypatch):
    """A streamed layer's projections stay bf16 and linear() converts them a block of rows at a time: with
    blocks of 64 rows (every matrix cut in several), each decode step's logits still equal those of the
    layers converted whole, token for token (the prefill's blocks hold whole tiny matrices, as by default)."""
    from gemma2_ref import fast

    monkeypatch.setattr(fast, "STORED_BLOCK_BYTES", 1)  # the minimum: STORED_BLOCK_ALIGN rows per block
    models = [g2.load_model(tiny_bf16_dir), g2.load_model(tiny_bf16_dir, keep_converted=True)]
    assert isinstance(models[0].weights.layer(0).gate_proj, fast.StoredWeight)
    assert models[0].weights.layer(0).gate_proj.shape[0] > 4 * fast.STORED_BLOCK_ALIGN
    caches = [KVCache(m.config, capacity=64) for m in models]
    steps = [m.forward(IDS[:20], kv_cache=c, logits_at="last")["logits"][-1] for m, c in zip(models, caches)]
    for _ in range(4):
        np.testing.assert_array_equal(steps[0], steps[1])
        token = int(np.argmax(steps[0]))
        steps = [m.forward([token], kv_cache=c, logits_at="last")["logits"][-1] for m, c in zip(models, caches)]
    np.testing.assert_array_equal(steps[0], steps[1])


@pytest.mark.parametrize("tokens", [1, 6])
def test_a_streamed_forward_never_holds_a_float32_layer(tmp_path, tokens):
    """The old streamed step converted each layer to a float32 copy (here 13 MiB) before multiplying; now a
    decode step holds one cache-sized block of converted rows (fast.STORED_BLOCK_BYTES) and a prefill one
    block of at most one matrix (the 4 MiB gate_proj here), never the layer."""
    import tracemalloc

    cfg = g2.PRESETS["tiny"].replace(
        hidden_size=256,
        intermediate_size=4096,
        vocab_size=512,
        num_hidden_layers=2,
        layer_types=("sliding_attention", "full_attention"),
    )
    path = save_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg, seed=1), "BF16")
    model = g2.load_model(path)
    layer_f32 = cfg.parameter_counts()["per_layer"] * 4
    cache = KVCache(cfg, capacity=16)
    model.forward(np.arange(2, 8), kv_cache=cache, logits_at="last")  # the finite checks, once, before measuring
    ids = np.arange(10, 10 + tokens)
    tracemalloc.start()
    try:
        model.forward(ids, kv_cache=cache, logits_at="last")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    matrix_f32 = cfg.intermediate_size * cfg.hidden_size * 4
    assert peak < (2 << 20 if tokens == 1 else matrix_f32 + (1 << 20)) < layer_f32 / 2, (peak, layer_f32)


def test_layers_kept_converted_resident_as_bf16_or_streamed_decode_bit_identically(tiny_bf16_dir, monkeypatch):
    """keep_converted="auto" on a machine with little RAM: layer 0 kept converted, layers 1-2 keep their bf16
    bytes in memory, layer 3 is read from the file at every step; the same logits as streaming, step by step."""
    from gemma2_ref import loader

    cfg = g2.PRESETS["tiny"]
    per_layer = cfg.parameter_counts()["per_layer"]
    embedding = cfg.vocab_size * cfg.hidden_size * 4
    budget = 5 * per_layer * 2 + 100  # 4 bf16 layers resident, and the 2 more bytes one float32 layer takes
    monkeypatch.setattr(loader, "available_memory", lambda: (embedding + budget) / loader.AUTO_KEEP_FRACTION)
    assert loader.keep_budget(cfg, "float32", "auto") == (per_layer * 4, 3 * per_layer * 2)
    budget = 3 * per_layer * 2 + 100  # 3 of the 4 layers' bf16 bytes: the checkpoint does not fit, all stream
    monkeypatch.setattr(loader, "available_memory", lambda: (embedding + budget) / loader.AUTO_KEEP_FRACTION)
    assert loader.keep_budget(cfg, "float32", "auto") == (0, 0)
    mixed = g2.load_model(tiny_bf16_dir, keep_converted="auto")
    mixed.weights.keep_bytes, mixed.weights.resident_bytes = per_layer * 4, 2 * per_layer * 2
    streamed = g2.load_model(tiny_bf16_dir)
    caches = [KVCache(cfg, capacity=64) for _ in range(2)]
    steps = [m.forward(IDS[:20], kv_cache=c, logits_at="last")["logits"][-1] for m, c in zip((streamed, mixed), caches)]
    assert (mixed.weights.kept_layers, mixed.weights.resident_layers) == (1, 2)
    assert sorted(mixed.weights._resident) == sorted(
        f"model.layers.{i}.{n}" for i in (1, 2) for n in g2.weights.HF_LAYER_NAMES.values()
    )
    for _ in range(4):
        np.testing.assert_array_equal(steps[0], steps[1])
        token = int(np.argmax(steps[0]))
        steps = [
            m.forward([token], kv_cache=c, logits_at="last")["logits"][-1] for m, c in zip((streamed, mixed), caches)
        ]
    np.testing.assert_array_equal(steps[0], steps[1])


def test_streaming_keeps_no_layer_and_keep_converted_keeps_every_layer(tiny_bf16_dir):
    streamed = g2.load_model(tiny_bf16_dir)
    kept = g2.load_model(tiny_bf16_dir, keep_converted=True)
    streamed.logits(IDS[:8])
    kept.logits(IDS[:8])
    assert streamed.weights._layers == {}
    assert sorted(kept.weights._layers) == list(range(kept.config.num_hidden_layers))
    assert kept.weights.layer(0) is kept.weights.layer(0)


def test_conversion_in_blocks_equals_converting_the_whole_tensor(tiny_bf16_dir, monkeypatch):
    """Weights.tensor converts a block of rows at a time; a tiny block size must change nothing."""
    import gemma2_ref.weights as weights

    model = g2.load_model(tiny_bf16_dir)
    stored = model.weights.stored(EMBEDDING)
    whole = bf16_bits_to_f32(np.array(stored))
    monkeypatch.setattr(weights, "CONVERT_BLOCK_BYTES", 1000)  # 3 rows of 128 bf16 per block
    np.testing.assert_array_equal(model.weights.tensor(EMBEDDING), whole)
    np.testing.assert_array_equal(to_compute_dtype(stored, "BF16", np.float64), whole.astype(np.float64))


def _rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise KeyError("RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc/self/status")
def test_converted_tensor_does_not_keep_its_file_pages_resident(tmp_path):
    """Reading a mapped file puts its pages in our RSS; after conversion they are released (madvise), so a
    converted layer costs its float32 bytes only. The values are unaffected: the pages map back on use."""
    rows, cols = 8192, 2048  # 32 MiB stored as bf16, 64 MiB as float32
    values = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {"w": values}, "BF16")
    refs, _ = read_safetensors_header(path)
    maps = MappedFiles()
    stored = maps.array(refs["w"])
    before = _rss_file_bytes()
    touched = int(stored.sum(dtype=np.uint64))  # read every page: all 32 MiB now count in our RSS
    assert _rss_file_bytes() - before > 24 << 20
    maps.release(refs["w"])
    assert _rss_file_bytes() - before < 4 << 20
    assert int(stored.sum(dtype=np.uint64)) == touched  # the data is still there, read back from the cache
    maps.close()


def _cgroup_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_memory_budget_sees_the_cgroup_limit_of_the_process_and_its_parents(tmp_path, version):
    """A container's (or a systemd slice's) memory limit, not the host's MemAvailable, is what "auto" may
    spend: the tightest limit less usage of the process's own cgroup and every group above it, where usage
    leaves out the inactive page cache (reclaimed first: a previous run's cached checkpoint is not in use)."""
    from gemma2_ref.loader import cgroup_headroom

    GiB = 1 << 30
    if version == "v2":
        membership = "0::/jobs/job1\n"
        files = {
            "memory.max": "max\n",
            "memory.current": str(30 * GiB),
            "jobs/memory.max": str(20 * GiB),
            "jobs/memory.current": str(12 * GiB),  # the parent: 8 GiB left
            "jobs/job1/memory.max": str(16 * GiB),
            "jobs/job1/memory.current": str(8 * GiB),
            "jobs/job1/memory.stat": f"anon {5 * GiB}\nfile {3 * GiB}\ninactive_file {2 * GiB}\n",
        }  # 10 left
    else:
        membership = "12:cpu,cpuacct:/jobs/job1\n4:memory:/jobs/job1\n"
        files = {
            "memory/memory.limit_in_bytes": str((1 << 63) - 4096),
            "memory/memory.usage_in_bytes": str(30 * GiB),
            "memory/jobs/memory.limit_in_bytes": str(20 * GiB),
            "memory/jobs/memory.usage_in_bytes": str(12 * GiB),
            "memory/jobs/job1/memory.limit_in_bytes": str(16 * GiB),
            "memory/jobs/job1/memory.usage_in_bytes": str(8 * GiB),
            "memory/jobs/job1/memory.stat": f"cache {3 * GiB}\ninactive_file {GiB}\ntotal_inactive_file {2 * GiB}\n",
        }
    root = _cgroup_tree(tmp_path / "cgroup", files)
    (tmp_path / "self").write_text(membership)
    assert cgroup_headroom(root, tmp_path / "self") == 8 * GiB
    (root / ("jobs/memory.max" if version == "v2" else "memory/jobs/memory.limit_in_bytes")).write_text(
        "max\n" if version == "v2" else str((1 << 63) - 4096)
    )  # no limit above the process: its own counts
    assert cgroup_headroom(root, tmp_path / "self") == 10 * GiB
    assert cgroup_headroom(tmp_path / "none", tmp_path / "self") is None  # no cgroup files: no limit known


def test_generate_streams_a_checkpoint_whose_layers_do_not_all_fit_and_says_so(tiny_bf16_dir, monkeypatch, capsys):
    from gemma2_ref import loader
    from gemma2_ref.cli import main

    cfg = g2.load_model(tiny_bf16_dir).config
    embedding = cfg.vocab_size * cfg.hidden_size * 4
    per_layer_bf16 = cfg.parameter_counts()["per_layer"] * 2
    budget = (cfg.num_hidden_layers - 1) * per_layer_bf16  # every layer but one: nothing kept
    monkeypatch.setattr(loader, "available_memory", lambda: (embedding + budget) / loader.AUTO_KEEP_FRACTION)
    assert main(["generate", str(tiny_bf16_dir), "--tokens", "2 651 652", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "every layer streamed from the checkpoint's files at every step" in err, err
    budget = cfg.num_hidden_layers * per_layer_bf16 + 100  # every layer's stored bytes fit: all resident
    monkeypatch.setattr(loader, "available_memory", lambda: (embedding + budget) / loader.AUTO_KEEP_FRACTION)
    assert main(["generate", str(tiny_bf16_dir), "--tokens", "2 651 652", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert f"kept 0 of {cfg.num_hidden_layers} layers converted and {cfg.num_hidden_layers} as stored bytes" in err, err

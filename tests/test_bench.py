"""The benchmark runs end to end on a small configuration (what CI runs) and reports every measurement.

No timing is asserted here: speed depends on the machine and its load. What is asserted is that the report
is complete, that NumPy and transformers were given the same weights and inputs (their logits agree and
their greedy tokens are the same), and the memory arithmetic behind "27B runs in 24 GiB".
"""

import json

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import cli, commands
from gemma2_ref.checkpoints import build_random_checkpoint, preset_config

bench = commands.bench_module()  # benchmarks/bench.py: outside the package, it needs torch
from gemma2_ref.weights import index_checkpoint


def test_bench_small_reports_speed_memory_and_agreement(tmp_path):
    out = tmp_path / "results.json"
    code = cli.main(["bench", "--small", "--repeats", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    kinds = {"numpy", "numpy-stream", "torch"}
    assert set(results["prefill"]) == {"16", "64"}
    for row in results["prefill"].values():
        assert set(row) == kinds and all(v["tokens_per_s"] > 0 for v in row.values())
    assert all(results["decode"][k]["tokens_per_s"] > 0 for k in kinds)
    assert set(results["load"]) == kinds
    for n, errors in results["agreement"].items():
        if n == "decode_same_tokens":
            assert all(errors.values()), errors
        else:
            assert max(errors.values()) < 1e-4, (n, errors)
    assert {"numpy-stream/logits_last", "numpy-stream/logits_all"} <= set(results["memory"])
    assert all(v["peak_rss"] > 0 for v in results["memory"].values())
    assert results["machine"]["cores"] >= 1 and results["load_average_before"] is not None
    assert results["profile"]["prefill"]["functions"]
    report = out.with_suffix(".md").read_text()
    assert "NumPy / torch time" in report and "27B" in report


def test_random_checkpoint_is_hf_layout_reused_and_layer_weights_shared_across_depths(tmp_path):
    """Layer i holds the same numbers whatever the depth: the timing checkpoint is the full one, truncated."""
    short = build_random_checkpoint(tmp_path / "2L", preset_config("tiny", 2), log=lambda *a: None)
    full = build_random_checkpoint(tmp_path / "4L", preset_config("tiny"), log=lambda *a: None)
    assert (full / "model.safetensors.index.json").is_file()
    refs = index_checkpoint(full, g2.load_config(full))  # names, shapes, dtypes as the config says
    assert {r.dtype for r in refs.values()} == {"BF16"}
    a, b = g2.load_model(short).weights, g2.load_model(full).weights
    np.testing.assert_array_equal(a.layer(1).down_proj, b.layer(1).down_proj)
    np.testing.assert_array_equal(a.embedding(), b.embedding())
    stamp = (full / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    build_random_checkpoint(tmp_path / "4L", preset_config("tiny"), log=lambda *a: None)
    assert (full / "model-00001-of-00002.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("preset", ["2b", "9b", "27b"])
def test_memory_arithmetic_streaming_forward_at_full_context_fits_in_24_gib(preset):
    est = bench.memory_estimate(g2.PRESETS[preset], 8192, "last")
    assert est["streaming_peak"] + est["kv_cache"] <= 24 * bench.GiB
    assert est["streaming_peak"] < est["all_layers_converted"]


def test_memory_arithmetic_uses_the_released_2b_sizes():
    est = bench.memory_estimate(g2.PRESETS["2b"], 512)
    assert est["embedding"] == 256000 * 2304 * 4  # 2.36 GB of float32
    assert est["layer"] == g2.PRESETS["2b"].parameter_counts()["per_layer"] * 4
    assert est["bound"] == est["embedding"] + 3 * est["layer"] + bench.GiB

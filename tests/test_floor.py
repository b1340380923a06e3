"""benchmarks/floor.py (issue 31): its workers measure what they say on a small checkpoint, and the committed
floor.md is the report of the committed floor.json (one source of truth). No time is asserted.

Each test can fail: a worker that skips a file reports fewer bytes than the checkpoint holds; a hand edit of
floor.md (or a rerun that forgot to write it) makes it differ from report(floor.json)."""

import importlib.util
import json
from pathlib import Path

import pytest

import gemma2_ref as g2
from gemma2_ref.storage.checkpoints import build_random_checkpoint, preset_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("floor", ROOT / "benchmarks" / "floor.py")
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_random_checkpoint(
        tmp_path_factory.mktemp("floor") / "tiny", preset_config("tiny"), log=lambda *a: None
    )


def test_the_read_workers_read_every_byte_of_the_checkpoint(ckpt):
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    for worker in (floor.worker_read, floor.worker_scan):
        result = worker(ckpt, 2)
        assert result["bytes"] == size and len(result["seconds"]) == 2 and min(result["seconds"]) > 0
        assert len(result["cpu_seconds"]) == 2 and min(result["cpu_seconds"]) > 0


def test_the_numpy_worker_times_every_layer_of_every_step(ckpt):
    result = floor.worker_numpy(ckpt, 3, before=False)
    layers = g2.load_model(ckpt).config.num_hidden_layers
    assert result["layers"] == layers and len(result["steps"]) == 3
    for step in result["steps"]:
        assert len(step["layers"]) == layers and step["rest"] >= 0
        assert abs(sum(step["layers"]) + step["rest"] - step["seconds"]) < 1e-9
        assert len(step["layers_cpu"]) == layers and step["cpu_seconds"] > 0
        assert abs(sum(step["layers_cpu"]) + step["rest_cpu"] - step["cpu_seconds"]) < 1e-9
    best = floor.best_step("numpy", [{**result, "peak_rss": 1}])  # worker_main adds the peak RSS
    assert best["step"] == min(s["seconds"] for s in result["steps"])
    assert best["step_cpu"] == min(s["cpu_seconds"] for s in result["steps"])


@pytest.mark.skipif(not (ROOT / "benchmarks" / "floor.json").is_file(), reason="no committed floor run")
def test_the_committed_floor_report_is_the_report_of_the_committed_results():
    results = json.loads((ROOT / "benchmarks" / "floor.json").read_text())
    assert (ROOT / "benchmarks" / "floor.md").read_text() == floor.report(results)
    for preset, m in results["models"].items():
        assert {"read", "scan", "numpy", "numpy-before"} <= set(m["measured"]), preset
        assert m["full_depth_arithmetic"]["layers"] == g2.PRESETS[preset].num_hidden_layers

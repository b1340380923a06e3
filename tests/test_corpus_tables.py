"""docs/corpus.md's measured tables are their json's: `gemma2-ref compare`'s corpus thresholds are the
calibration's (scripts/measure_corpus_kld.py, benchmarks/corpus_kld-tiny.json), and the 9B / 27B timings are
benchmarks/corpus_full_shapes.py's (benchmarks/corpus_full_shapes.json)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from gemma2_ref.verify import kld as K
from tests.helpers.scripts import load_script

M = load_script("measure_corpus_kld")
REPO = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (it imports scripts/ and benchmarks/ modules by name)."""
    for folder in ("scripts", "benchmarks"):
        if str(REPO / folder) not in sys.path:
            sys.path.insert(0, str(REPO / folder))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measured() -> dict:
    return json.loads(M.JSON.read_text(encoding="utf-8"))


def test_default_thresholds_are_the_calibrated_ones():
    assert K.THRESHOLDS == M.calibrated_thresholds(measured()["rows"])


def test_docs_table_is_the_one_the_json_gives():
    docs = M.DOCS.read_text(encoding="utf-8")
    assert M.docs_block(measured()) in docs, "run `python scripts/measure_corpus_kld.py --docs-only`"


def test_the_candidates_that_must_pass_pass_and_a_model_level_error_fails():
    """bfloat16 transformers and llama.cpp's q8_0 of a model it computes exactly pass with the margin; llama.cpp on
    `tiny`, whose query scale it cannot express, fails in every GGUF type."""
    rows = measured()["rows"]
    t = K.THRESHOLDS
    for r in rows:
        key = (r["model"], r["backend"], r["dtype"])
        if key in M.MUST_PASS:
            assert M.verdict(r, t) == "pass", r
            assert r["kld_mean"] * M.MARGIN["kld_mean"] <= t["kld_mean"], r
        if r["model"] == "tiny" and r["backend"] == "llama.cpp":
            assert M.verdict(r, t) != "pass", r


def test_docs_full_shape_timings_are_the_ones_the_json_gives():
    """docs/corpus.md's 9B / 27B table and the wikitext-2 estimate: benchmarks/corpus_full_shapes.py's table of
    benchmarks/corpus_full_shapes.json."""
    S = load_benchmark("corpus_full_shapes")
    result = json.loads(S.JSON.read_text(encoding="utf-8"))
    docs = M.DOCS.read_text(encoding="utf-8")
    assert S.table(result) in docs, "paste `python benchmarks/corpus_full_shapes.py`'s table into docs/corpus.md"

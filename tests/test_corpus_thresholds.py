"""`gemma2-ref compare`'s corpus thresholds are the calibration's (scripts/measure_corpus_kld.py, from
benchmarks/corpus_kld-tiny.json), and docs/corpus.md's table is the one that json gives now."""

from __future__ import annotations

import json

from gemma2_ref.verify import kld as K
from tests.helpers.scripts import load_script

M = load_script("measure_corpus_kld")


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

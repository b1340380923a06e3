"""Corpus goldens against Hugging Face transformers (issue 25): eager float32 is the reference's distribution to
rounding (KLD ~0), bfloat16 shows its rounding and still passes the default thresholds."""

from __future__ import annotations

import pytest

from gemma2_ref.adapters import BACKENDS, load_adapter
from gemma2_ref.verify import corpus as C
from gemma2_ref.verify import kld as K
from tests.helpers.backends import require


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    require("transformers", "pip install -e '.[test]'")
    d = tmp_path_factory.mktemp("corpus-hf")
    C.write_corpus("tiny", d / "ref", ctx=64, chunks=4, top_k="all", log=lambda m: None)
    return d / "ref"


def candidate(reference, dtype):
    out = reference.parent / f"hf-{dtype}"
    backend = {
        "name": "transformers",
        "adapter": BACKENDS["transformers"],
        **load_adapter("transformers").corpus_backend("tiny", dtype),
    }
    C.write_corpus("tiny", out, backend=backend, reference=reference, log=lambda m: None)
    return out


def test_transformers_float32_gives_the_reference_distribution(reference):
    s = K.compare_corpus(reference, candidate(reference, "float32")).stats
    assert s["kld_mean"] < 1e-8 and s["kld_max"] < 1e-6 and s["same_top1"] == 1.0
    assert abs(s["ln_ppl_ratio"]) < 1e-5


def test_transformers_bfloat16_shows_its_rounding_within_the_thresholds(reference):
    r = K.compare_corpus(reference, candidate(reference, "bfloat16"))
    assert 1e-6 < r.stats["kld_mean"] < K.THRESHOLDS["kld_mean"] and r.passed, r.stats

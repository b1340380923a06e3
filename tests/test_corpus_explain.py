"""`gemma2-ref compare REF CAND --explain N` (issue 25 item 3): the worst chunks re-run tap by tap through the
candidate's own backend, and where the error is born and grows. A known mistake is found at its first tap;
llama.cpp's q4_0 of the tiny model is off from layer 0 on; a float64 run of the reference has nothing to explain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma2_ref.adapters import BACKENDS, load_adapter
from gemma2_ref.verify import corpus as C
from gemma2_ref.verify import corpus_explain as E
from gemma2_ref.verify import kld as K
from tests.helpers.cli import cli
from tests.helpers.cli import refused as refused_line
from tests.helpers.llamacpp_cases import backends

REPO = Path(__file__).resolve().parent.parent
CTX, CHUNKS = 64, 3


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    C.write_corpus("tiny", d / "ref", ctx=CTX, chunks=CHUNKS, top_k=64, log=quiet)
    return d / "ref"


def candidate(ref, name, backend):
    out = ref.parent / name
    if not out.exists():
        C.write_corpus("tiny", out, backend=backend, reference=ref, log=quiet)
    return out


def test_explain_finds_an_injected_mistake_at_its_first_tap_and_names_it(ref, capsys):
    """no_post_ffw_norm changes nothing before layers.0.post_ffw_norm: the error is born there, the first
    divergence is there, and the diagnosis of the chunk's case names the mistake."""
    cand = candidate(ref, "mistake", {"name": C.REFERENCE_BACKEND, "dtype": "float32", "mistake": "no_post_ffw_norm"})
    code, out, err = cli(capsys, "compare", ref, cand, "--explain", 1, "--json")
    assert code == 1, err
    body = json.loads(out)
    (e,) = body["explain"]
    worst = max(body["chunks"], key=lambda c: c["kld_mean"])["chunk"]
    assert e["chunk"] == worst
    assert e["born_at"] == e["first_divergence"] == "layers.0.post_ffw_norm"
    assert e["growth"][0]["tap"] == "layers.0.post_ffw_norm"
    assert e["diagnosis"]["named"][0]["variant"] == "no_post_ffw_norm"
    assert e["diagnosis"]["named"][0]["verdict"] == "matches"
    code, out, _ = cli(capsys, "compare", ref, cand, "--explain", 1)
    assert "error born at layers.0.post_ffw_norm" in out and "MATCHES: no_post_ffw_norm" in out


def test_a_float64_candidate_has_no_error_to_explain(ref, tmp_path):
    cand = candidate(ref, "f64", {"name": C.REFERENCE_BACKEND, "dtype": "float64"})
    result = K.compare_corpus(ref, cand)
    (e,) = E.explain_corpus(ref, cand, result.chunks, 1, out=tmp_path / "cases", log=quiet)
    assert e["born_at"] is None and e["growth"] == [] and e["passed"], e
    assert (tmp_path / "cases" / f"chunk-{e['chunk']}" / "candidate" / "manifest.json").is_file()
    assert "no error to explain" in E.format_explanation(e)


def test_q4_0_of_the_tiny_model_is_off_from_layer_0_on(ref):
    """llama.cpp's own quantizer (q4_0, the embedding included): the error is there from the embedding, every
    layer's residual stream carries it, and the worst chunk is explained with the GGUF's taps."""
    backends()
    backend = {
        "name": "llama.cpp",
        "adapter": BACKENDS["llama.cpp"],
        **load_adapter("llama.cpp").corpus_backend("tiny", "q4_0"),
    }
    cand = candidate(ref, "q4_0", backend)
    result = K.compare_corpus(ref, cand)
    (e,) = E.explain_corpus(ref, cand, result.chunks, 1, diagnose=False, log=quiet)
    assert e["born_at"] in ("embed", "layers.0.pre_attn_norm", "layers.0.attn.q_proj"), e["born_at"]
    residual = {row["layer"]: row["output_rel_l2"] for row in e["layers"]}
    assert all(residual[str(i)] > 1e-2 for i in range(4)), residual
    assert residual["0"] > 10 * residual["embed"], residual  # layer 0's quantized matmuls add most of it


def test_explain_refuses_a_base_file_and_a_reference(ref, tmp_path, capsys):
    base = tmp_path / "x.kld"
    C.write_corpus("tiny", tmp_path / "r2", ctx=CTX, chunks=CHUNKS, top_k="all", kld_out=base, log=quiet)
    line = refused_line(capsys, "compare", tmp_path / "r2", base, "--explain", 1, progress=("explain:",))
    assert "names no engine to re-run" in line
    line = refused_line(capsys, "compare", tmp_path / "r2", tmp_path / "r2", "--explain", 1, progress=("explain:",))
    assert "names no candidate backend" in line


def test_explain_is_for_corpus_goldens(capsys):
    line = refused_line(capsys, "compare", REPO / "golden" / "short", REPO / "golden" / "short", "--explain", 1)
    assert "--explain is for corpus goldens" in line

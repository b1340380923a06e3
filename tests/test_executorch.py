"""The ExecuTorch adapter: optimum-executorch's export of the checkpoint, run token by token by ExecuTorch's runtime
through the program's own static KV cache, in the venv $GEMMA2_REF_EXECUTORCH_PYTHON names
(scripts/make_executorch_venv.sh; .ci/run makes it). The verdicts of docs/backends/executorch.md as tests: the
exported Gemma 2 computes its attention without the soft-cap (transformers' sdpa_attention_forward never reads
`softcap`), and it cannot run past its sliding window (the traced cache update never wraps)."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.adapters import executorch as adapter
from gemma2_ref.verify.compare import PROFILES
from gemma2_ref.verify.diagnose import diagnose
from gemma2_ref.verify.mistakes import inject
from gemma2_ref.verify.optional import MissingDependency
from gemma2_ref.verify.suites import SUITES
from tests.helpers.numerics import rel_l2

ROOT = Path(__file__).resolve().parent.parent


def require_engine():
    """Skip (fail under CI, which makes the venv) without $GEMMA2_REF_EXECUTORCH_PYTHON."""
    try:
        adapter.engine_python()
    except MissingDependency as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI makes the ExecuTorch venv: a missing one is an error)", pytrace=False)
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its coverage cases, and {recipe: (model.pte, its metadata)}: cached by the checkpoint's
    hash, exported once per machine."""
    require_engine()
    model = g2.load_model("tiny")
    programs = {}
    for recipe in adapter.RECIPES:
        pte = adapter.export("tiny", "float32", recipe)
        programs[recipe] = pte, adapter.program_metadata(pte)
    cases = {c.name: c for c in SUITES["coverage"](model.config, g2.load_tokenizer("tiny"))}
    return model, cases, programs


def test_the_venv_script_installs_the_pins_of_the_executorch_extra():
    script = (ROOT / "scripts/make_executorch_venv.sh").read_text()
    installed = set(re.findall(r"\b([a-z][\w.-]*==[\w.]+)", script))
    extra = re.search(r"^executorch = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)[1]
    assert installed == set(re.findall(r'"([^"]+)"', extra))


def test_without_the_venv_the_backend_is_one_line_saying_how_to_make_it(monkeypatch):
    monkeypatch.delenv(adapter.ENV, raising=False)
    with pytest.raises(MissingDependency, match="scripts/make_executorch_venv.sh"):
        adapter.export("tiny")


def test_recipe_is_refused_for_another_backend(capsys, tmp_path):
    from tests.helpers.cli import refused

    line = refused(capsys, "golden", "tiny", "--tokens", "2 5 9", "--out", tmp_path / "c", "--recipe", "portable")
    assert "--recipe is for --backend executorch" in line and not (tmp_path / "c").exists()


@pytest.mark.parametrize("recipe, residual", [("portable", 2e-6), ("xnnpack", 4e-4)])
def test_float32_is_our_model_without_the_attention_soft_cap(tiny, recipe, residual):
    model, cases, programs = tiny
    ids = np.asarray(cases["short"].ids)
    theirs = adapter.run_logits(programs[recipe][0], ids[None])[0]  # (S, V)
    assert rel_l2(theirs, model.logits(ids)) > 5e-4  # fails the fp32 profile (5e-5)
    assert rel_l2(theirs, inject(model, "drop_attn_softcap").logits(ids)) < residual  # XNNPACK adds ~2e-4


def diagnosis(tiny, recipe, tmp_path):
    model, cases, programs = tiny
    ids = np.asarray(cases["short"].ids)
    pte, meta = programs[recipe]
    cand = G.load_case(adapter.write_golden("tiny", ids, tmp_path / recipe, pte=pte, meta=meta, recipe=recipe))
    ref = G.load_case(S.generate_case(model, ids, tmp_path / "ours"))
    return diagnose(model, ref, cand, PROFILES["fp32"])


def test_diagnose_names_the_dropped_attention_soft_cap_on_the_portable_program(tiny, tmp_path):
    diag = diagnosis(tiny, "portable", tmp_path)
    assert not diag.base.passed
    assert [(r.variant.name, r.verdict) for r in diag.named][:1] == [("drop_attn_softcap", "matches")]


def test_on_the_xnnpack_program_the_soft_cap_is_the_closest_mistake_but_a_residual_remains(tiny, tmp_path):
    diag = diagnosis(tiny, "xnnpack", tmp_path)
    best = max(diag.results, key=lambda r: r.ratio)
    assert best.variant.name == "drop_attn_softcap" and best.ratio > 3, [
        (r.variant.name, r.ratio) for r in diag.results
    ]
    assert not best.comparison.passed  # the XNNPACK delegate's own ~2e-4 is 4x the fp32 limit
    assert diag.named == [] and diag.passes_profile == "fp16"


def test_the_program_stops_at_its_window(tiny):
    model, cases, programs = tiny
    pte, meta = programs["xnnpack"]
    W = model.config.sliding_window
    assert adapter.longest_sequence(meta) == W
    ids = np.asarray(cases["long"].ids)
    assert adapter.run_logits(pte, ids[None, :W]).shape == (1, W, model.config.vocab_size)
    with pytest.raises(adapter.ExecuTorchError, match="0x12"):  # position W: index_copy_ past the window's slots
        adapter.run_logits(pte, ids[None, : W + 1])


def test_the_coverage_suite_runs_what_the_program_takes_and_skips_the_rest(tiny, tmp_path):
    from gemma2_ref.cli import main as cli

    out = tmp_path / "suite"
    argv = ["golden", "tiny", "--suite", "coverage", "--backend", "executorch", "--recipe", "portable", "--out", out]
    assert cli([str(a) for a in argv]) == 0
    suite = G.load_suite(out)
    skipped = {s["name"]: s["reason"] for s in suite.info["skipped"]}
    assert set(skipped) == {"window", "long", "decode", "chunked", "padded_batch", "padded_batch_right"}
    assert "at most 32 positions" in skipped["window"]
    ran = {c.path.name for c in suite.cases}
    assert ran == {"short", "no_bos", "double_bos", "chat", "batch", "special_tokens"}
    batch = next(c for c in suite.cases if c.path.name == "batch")
    assert batch.activations["logits"].shape[:2] == batch.token_ids.shape  # (2, S): row by row
    assert suite.cases[0].manifest["producer"]["adapter"] == "gemma2_ref.adapters.executorch"


def test_27b_like_query_scale_inside_the_window(tmp_path):
    require_engine()
    from tests.helpers.hf_reference import LIKE_27B, hf_config, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "27b", hf_config(**LIKE_27B), seed=3, scale=2.0)  # float32 weights
    model = g2.load_model(ckpt)
    ids = np.concatenate([[2], np.random.default_rng(1).integers(3, model.config.vocab_size, 7)])  # 8: the window
    theirs = adapter.run_logits(adapter.export(ckpt, "float32", "portable", out_dir=tmp_path / "pte"), ids[None])[0]
    assert rel_l2(theirs, model.logits(ids)) > 1e-3
    assert rel_l2(theirs, inject(model, "drop_attn_softcap").logits(ids)) < 2e-6  # the query scale is right

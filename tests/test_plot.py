"""`plot_divergence` draws a comparison to a file: each tap's error along the depth, the profile's limits, the
first divergence marked; matplotlib only when called."""

import subprocess
import sys

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import suites as S
from gemma2_ref.compare import PROFILES, compare_activations
from gemma2_ref.plot import _depth, plot_comparisons, plot_divergence
from tests.helpers.backends import require

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reference():
    require("matplotlib", "pip install 'gemma2-ref[plot]'")
    model = g2.load_model("tiny")
    ids = np.array([2, 651, 1012, 9, 40, 7, 300, 18])
    return model.config, S.run_case(model, ids, taps="all")


def disturbed(ref: dict, from_layer: int, size: float) -> dict:
    """The reference with relative noise `size` added to every tap of layer `from_layer` on (and after)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, a in ref.items():
        later = (
            name.startswith("layers.")
            and int(name.split(".")[1]) >= from_layer
            or not name.startswith(("layers.", "embed"))
        )
        out[name] = a + size * np.abs(a).max() * rng.standard_normal(a.shape).astype(a.dtype) if later else a
    return out


def test_a_failing_comparison_is_drawn_with_its_first_divergence(reference, tmp_path):
    cfg, ref = reference
    result = compare_activations(ref, disturbed(ref, 2, 1e-3), PROFILES["fp32"])
    assert result.first_divergence.name == "layers.2.input"
    path = plot_divergence(result, tmp_path / "fail.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 20_000


def test_taps_sit_along_the_depth_in_execution_order(reference):
    cfg, ref = reference
    result = compare_activations(ref, ref, PROFILES["fp32"])
    x, n_layers = _depth(result.compared)
    assert n_layers == cfg.num_hidden_layers
    xs = [x[t.name] for t in result.compared]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)  # execution order, no two taps on one spot
    assert x["embed"] < x["layers.0.input"] < x["layers.0.output"] < x["layers.1.input"] < x["logits"]


def test_a_failure_past_the_window_shows_those_rows_error(reference, tmp_path):
    cfg, ref = reference
    result = compare_activations(ref, disturbed(ref, 1, 1e-6), PROFILES["fp32"])
    tap = next(t for t in result.taps if t.name == "layers.0.attn.context")  # as compare_cases judges it
    tap.past_window = {"window": 6, "rows": 2, "rel_l2": 3e-3, "max_rel": 1e-2}
    tap.failed.append("past_window")
    tap.status = "fail"
    assert result.first_divergence is tap
    assert plot_divergence(result, tmp_path / "past.png").stat().st_size > 20_000


def test_exact_missing_and_non_finite_taps_are_drawn_too(reference, tmp_path):
    cfg, ref = reference
    cand = {n: a for n, a in ref.items() if not n.endswith("attn.scores")}  # some taps missing
    cand["layers.3.mlp.out"] = np.full_like(ref["layers.3.mlp.out"], np.nan)
    cand["layers.1.attn.q_rope"] = ref["layers.1.attn.q_rope"][:, :1]  # a shape mismatch
    result = compare_activations(ref, cand, PROFILES["bf16"])
    assert result.first_divergence.name == "layers.1.attn.q_rope"
    path = plot_divergence(result, tmp_path / "odd.svg", PROFILES["fp32"])
    assert path.read_text().lstrip().startswith("<?xml")


def test_nothing_compared_is_an_error_that_says_so(reference, tmp_path):
    cfg, ref = reference
    result = compare_activations({"logits": ref["logits"]}, {}, PROFILES["fp32"])
    with pytest.raises(ValueError, match="no tap was compared"):
        plot_divergence(result, tmp_path / "none.png")


def test_a_suite_is_drawn_one_file_per_case(reference, tmp_path):
    cfg, ref = reference
    cases = []
    for name, size in (("short", 0.0), ("window", 1e-3)):
        result = compare_activations(ref, disturbed(ref, 1, size), PROFILES["fp32"], candidate=f"mine/{name}")
        cases.append(result)
    cases.append(compare_activations(ref, {}, PROFILES["fp32"], candidate="mine/chat"))  # nothing to draw
    written = plot_comparisons(cases, tmp_path / "div.png")
    assert [p.name for p in written] == ["div-short.png", "div-window.png"]
    assert plot_comparisons(cases[:1], tmp_path / "one.png") == [tmp_path / "one.png"]


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, gemma2_ref.plot; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_cli_compare_writes_the_plot_it_is_asked_for(tmp_path, capsys):
    import gemma2_ref as g2
    from gemma2_ref import golden as G
    from gemma2_ref.cli import main as cli
    from gemma2_ref.mistakes import inject

    ref = G.load_case("golden/window")
    acts = inject(g2.load_model("tiny"), "drop_attn_softcap").forward(ref.token_ids, taps="default")
    cand = G.write_case(tmp_path / "cand", acts, ref.token_ids)
    out = tmp_path / "divergence.png"
    assert cli(["compare", "golden/window", str(cand), "--no-diagnose", "--plot", str(out)]) == 1
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {out}" in capsys.readouterr().err

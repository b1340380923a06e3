"""The MLX adapter: mlx-lm's Gemma 2 (mlx 0.32.4, mlx-lm 0.32.2, MLX's CPU backend) with a recorder standing in
for each submodule, checked against gemma2_ref.

Measured, worst over every reachable tap (rel L2 / max abs as a fraction of the tap's absmax):

    checkpoint, tokens                     float32                                 bfloat16 (bf16 profile)
    bundled tiny, 10 (short)               6.0e-7 / 9.2e-7: fp32 PASS              1.1e-2 / 1.2e-2: PASS
    bundled tiny, 34 (window 32 + 2)       FAIL at layers.0.attn.context, 8.7e-3   1.5e-2 / 9.3e-2: PASS
    bundled tiny, 66 (long)                FAIL at layers.0.attn.context, 0.12     FAIL there (rows past the window)
    random tiny-shaped, 10                 2.8e-6 / 7.3e-6: fp32 PASS              5.4e-2 / 0.13: PASS
    random tiny-shaped, 34                 FAIL at layers.0.attn.context, 6.2e-2   FAIL there (rows past the window)

float32 agrees with ours to float32 noise (100x under the fp32 profile's 5e-5) before the window and fails past
it: mlx-lm 0.32.2 has no sliding window (mlx_lm/models/gemma2.py:176 builds one causal mask with no
`window_size`, used by every layer), and the diagnosis names `no_sliding_window` (the candidate matches it
within fp32). In bfloat16 the trained tiny model's window case hides it in rounding (2 of 34 rows lie past the
window); the long case shows it.
"""

from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.adapters import load_adapter
from gemma2_ref.compare import PROFILES, compare_cases
from gemma2_ref.data import bundled_path
from gemma2_ref.diagnose import diagnose
from tests.helpers.backends import require

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
INSTALL = "pip install 'gemma2-ref[mlx]'  (mlx[cpu] and mlx-lm)"
W = g2.PRESETS["tiny"].sliding_window  # 32: the bundled model's and the random checkpoint's window


@pytest.fixture(scope="module")
def adapter():
    require("mlx_lm", INSTALL)
    return load_adapter("mlx")


def window_ids(seed: int = 11) -> np.ndarray:
    """<bos> and W + 1 random tokens: positions W-1, W and W+1 exist, where a window shows."""
    return np.concatenate([[2], np.random.default_rng(seed).integers(3, 2048, W + 1)])


def golden_pair(adapter, checkpoint, ids, tmp_path, dtype="float32", taps="all"):
    ours = G.load_case(S.generate_case(g2.load_model(checkpoint), ids, tmp_path / "ours", taps=taps))
    theirs = G.load_case(adapter.write_golden(checkpoint, ids, tmp_path / f"mlx-{dtype}", dtype=dtype, taps=taps))
    return ours, theirs


def test_float32_on_the_tiny_model_matches_before_the_window(adapter, tmp_path):
    ids = G.load_case(GOLDEN / "short").token_ids
    ours, theirs = golden_pair(adapter, bundled_path("tiny"), ids, tmp_path)
    result = compare_cases(ours, theirs, PROFILES["fp32"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)
    cfg = g2.load_config(bundled_path("tiny"))
    # every tap the recorders reach was compared, the RoPE outputs included; scores and probs cannot be
    assert [t.name for t in result.compared] == adapter.reachable_taps(cfg)
    assert sorted(result.missing) == sorted(n for n in g2.tap_names(cfg) if n.endswith(("attn.scores", "attn.probs")))
    assert max(t.rel_l2 for t in result.compared) < 5e-6  # measured 6.0e-7
    assert theirs.manifest["producer"]["name"] == "mlx-lm" and theirs.compute_dtype == "float32"


def test_past_the_window_mlx_lm_attends_globally_and_is_diagnosed_no_sliding_window(adapter, tiny_random_dir, tmp_path):
    taps = ["layers.0.*", "layers.3.output", "logits"]  # fewer taps: a faster diagnosis, same story
    ours, theirs = golden_pair(adapter, tiny_random_dir, window_ids(), tmp_path, taps=taps)
    result = compare_cases(ours, theirs, PROFILES["fp32"])
    assert not result.passed
    # everything up to the first sliding layer's attention agrees (its q/k after RoPE included) ...
    assert result.first_divergence.name == "layers.0.attn.context"
    # ... and the rows that cannot see past the window agree all the way to the logits
    for name in ("layers.0.attn.context", "layers.3.output", "logits"):
        rows = slice(0, W)
        err = np.linalg.norm(theirs.activations[name][rows] - ours.activations[name][rows])
        assert err / np.linalg.norm(ours.activations[name][rows]) < 5e-5, name
    diagnosis = diagnose(g2.load_model(tiny_random_dir), ours, theirs, PROFILES["fp32"])
    best = diagnosis.named[0]
    assert (best.variant.name, best.verdict) == ("no_sliding_window", "matches")


def test_bfloat16_on_the_tiny_model_passes_the_bf16_profile(adapter, tmp_path):
    ids = G.load_case(GOLDEN / "short").token_ids
    ours, theirs = golden_pair(adapter, bundled_path("tiny"), ids, tmp_path, dtype="bfloat16", taps="default")
    assert theirs.compute_dtype == "bfloat16"
    assert compare_cases(ours, theirs, PROFILES["bf16"]).passed
    # bfloat16 rounding shows from the first tap on: the embedding rows times sqrt(D) rounded to bf16
    assert compare_cases(ours, theirs, PROFILES["fp32"]).first_divergence.name == "embed"


def test_a_batch_keeps_its_batch_axis(adapter, tmp_path):
    ids = np.stack([window_ids(4)[:12], window_ids(5)[:12]])
    ours, theirs = golden_pair(adapter, bundled_path("tiny"), ids, tmp_path, taps="layers.1.attn.*")
    assert theirs.activations["layers.1.attn.k_rope"].shape == (2, 12, 2, 64)  # (B, S, K, Dh)
    assert compare_cases(ours, theirs, PROFILES["fp32"]).passed


def test_a_right_padded_batch_runs_and_a_left_padded_one_is_refused(adapter, tmp_path):
    from gemma2_ref.inputs import pad_batch

    rows = [list(window_ids(4)[:12]), list(window_ids(5)[:7])]
    ids, mask = pad_batch(rows, side="right")
    ours = G.load_case(S.generate_case(g2.load_model("tiny"), ids, tmp_path / "ours", attention_mask=mask))
    theirs = G.load_case(adapter.write_golden(bundled_path("tiny"), ids, tmp_path / "mlx", attention_mask=mask))
    assert compare_cases(ours, theirs, PROFILES["fp32"]).passed  # the token rows: padding comes after them
    ids, mask = pad_batch(rows, side="left")
    with pytest.raises(NotImplementedError, match="left-padded"):
        adapter.write_golden(bundled_path("tiny"), ids, tmp_path / "left", attention_mask=mask)


def test_the_residual_taps_alone_include_the_embedding(adapter, tmp_path):
    ids = G.load_case(GOLDEN / "short").token_ids
    ours, theirs = golden_pair(adapter, bundled_path("tiny"), ids, tmp_path, taps="residual")
    assert sorted(theirs.activations) == sorted(ours.activations)  # embed, layers.*.output, final_norm, logits
    assert compare_cases(ours, theirs, PROFILES["fp32"]).passed

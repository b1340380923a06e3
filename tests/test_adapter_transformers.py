"""The transformers adapter: Hugging Face's Gemma2ForCausalLM, captured with forward hooks under canonical tap
names, passes `compare` against ours at float32 (every weight random, prompts past the sliding window), and a
bfloat16 run passes the bf16 profile but not the fp32 one."""

import numpy as np
import pytest
import torch

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.adapters import transformers as adapter
from gemma2_ref.cli import main as cli
from gemma2_ref.compare import PROFILES, compare_cases
from tests.helpers.hf_reference import hf_config, make_checkpoint

CONFIGS = {
    # 2B ratios: head_dim = query_pre_attn_scalar, H*Dh != D
    "2b-like": dict(
        hidden_size=72,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        query_pre_attn_scalar=32,
        intermediate_size=288,
        num_hidden_layers=4,
        sliding_window=8,
    ),
    # 27B-like: query_pre_attn_scalar = D/H != head_dim
    "27b-like": dict(
        hidden_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        intermediate_size=192,
        num_hidden_layers=4,
        sliding_window=8,
    ),
}
SEQ = 8 + 5  # past the window: positions W-1, W, W+1 and more


def ids_for(vocab: int, n: int, seed: int = 1) -> np.ndarray:
    return np.concatenate([[2], np.random.default_rng(seed).integers(3, vocab, n - 1)])


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    cfg = hf_config(**CONFIGS[request.param])
    return make_checkpoint(tmp_path_factory.mktemp(request.param), cfg, seed=3, scale=2.0), cfg


def golden_pair(ckpt, cfg, tmp_path, dtype="float32", taps="all", ids=None):
    ids = ids_for(cfg.vocab_size, SEQ) if ids is None else ids
    ours = G.load_case(S.generate_case(g2.load_model(ckpt), ids, tmp_path / "ours", taps=taps))
    theirs = G.load_case(adapter.write_golden(ckpt, ids, tmp_path / f"hf-{dtype}", dtype=dtype, taps=taps))
    return ours, theirs


def test_eager_float32_golden_passes_the_fp32_profile(checkpoint, tmp_path):
    ckpt, cfg = checkpoint
    ours, theirs = golden_pair(ckpt, cfg, tmp_path)
    result = compare_cases(ours, theirs, PROFILES["fp32"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)
    # every tap the hooks reach was compared, attention probabilities included (eager returns them)
    ours_cfg = g2.load_model(ckpt).config
    assert [t.name for t in result.compared] == adapter.reachable_taps(ours_cfg)
    assert "layers.0.attn.probs" in theirs.activations
    assert sorted(result.missing) == sorted(
        n for n in g2.tap_names(ours_cfg) if n.endswith(("q_rope", "k_rope", "attn.scores"))
    )
    assert theirs.manifest["producer"]["name"] == "transformers"
    assert theirs.manifest["model"]["weights"] == ours.manifest["model"]["weights"]


def test_a_batch_of_two_passes_too(checkpoint, tmp_path):
    ckpt, cfg = checkpoint
    ids = np.stack([ids_for(cfg.vocab_size, SEQ, 4), ids_for(cfg.vocab_size, SEQ, 5)])
    ours, theirs = golden_pair(ckpt, cfg, tmp_path, taps="default", ids=ids)
    assert theirs.activations["layers.1.attn.q_proj"].shape == (2, SEQ, cfg.num_attention_heads, cfg.head_dim)
    assert compare_cases(ours, theirs, PROFILES["fp32"]).passed


def test_bfloat16_run_passes_bf16_and_fails_fp32(tmp_path):
    cfg = hf_config(**CONFIGS["27b-like"])
    ckpt = make_checkpoint(tmp_path / "bf16", cfg, seed=3, scale=2.0, dtype=torch.bfloat16)  # as released
    ours, theirs = golden_pair(ckpt, cfg, tmp_path, dtype="bfloat16", taps="default")
    assert theirs.compute_dtype == "bfloat16"
    assert compare_cases(ours, theirs, PROFILES["bf16"]).passed
    failed = compare_cases(ours, theirs, PROFILES["fp32"])
    assert not failed.passed
    # bfloat16 rounding shows from the first tap on: the embedding rows times sqrt(D) rounded to bf16
    assert failed.first_divergence.name == "embed"


def test_cli_writes_a_transformers_candidate_and_compares_it(tmp_path, capsys):
    cfg = hf_config(**CONFIGS["2b-like"])
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg, seed=4, scale=2.0)
    tokens = " ".join(map(str, ids_for(cfg.vocab_size, SEQ)))
    assert cli(["golden", str(ckpt), "--tokens", tokens, "--out", str(tmp_path / "ref")]) == 0
    assert (
        cli(["golden", str(ckpt), "--tokens", tokens, "--out", str(tmp_path / "hf"), "--backend", "transformers"]) == 0
    )
    assert cli(["compare", str(tmp_path / "ref"), str(tmp_path / "hf")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "PASS" in out and "missing from the candidate: layers.*.{attn.q_rope, attn.k_rope} (4 each)" in out

"""Our forward equals transformers' Gemma2ForCausalLM (eager, float32) on checkpoints saved by transformers.

Required in CI: torch and transformers are test dependencies, and an import failure fails this module.
"""

import numpy as np
import pytest
import torch

import gemma2_ref as g2
from tests.helpers.hf_reference import hf_config, load_reference, make_checkpoint, reference_run
from tests.helpers.numerics import rel_l2

LOGITS_MAX_ABS = 1e-4
LOGITS_REL_L2 = 1e-5

CONFIGS = {
    # 2B ratios: H/K = 2, head_dim = query_pre_attn_scalar, H*Dh != D
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
    # multi-query: one kv head for all query heads
    "multi-query": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=128,
        num_hidden_layers=3,
        sliding_window=6,
    ),
    # 27B-like: query_pre_attn_scalar = D/H != head_dim, and H*Dh != D
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
SEQ_LEN = 29  # > 3 x every sliding window above


def _ids(vocab, n, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([[2], rng.integers(3, vocab, n - 1)])


def _check(ours: dict, ref: dict, num_layers: int, report: dict):
    for i in range(num_layers):
        name = f"layers.{i}.output"
        scale = np.abs(ref[name]).max()
        assert np.abs(ours[name] - ref[name]).max() <= 1e-5 * max(1.0, scale), name
    err = float(np.abs(ours["logits"] - ref["logits"]).max())
    rel = rel_l2(ours["logits"], ref["logits"])
    report.update(max_abs=err, rel_l2=rel)
    assert err <= LOGITS_MAX_ABS, f"logits max abs error {err:.3g} > {LOGITS_MAX_ABS}"
    assert rel <= LOGITS_REL_L2, f"logits relative L2 error {rel:.3g} > {LOGITS_REL_L2}"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_forward_matches_transformers(tmp_path, name, dtype, record_property):
    cfg = hf_config(**CONFIGS[name])
    ckpt = make_checkpoint(tmp_path, cfg, seed=list(CONFIGS).index(name), dtype=dtype, scale=2.0)
    ref_model = load_reference(ckpt)  # bf16 files are read back as float32, exactly as we read them
    ids = _ids(cfg.vocab_size, SEQ_LEN, 1)
    model = g2.load_model(ckpt)
    assert model.weights.stored_dtypes == (["BF16"] if dtype == torch.bfloat16 else ["F32"])
    ours = model.forward(ids, taps="residual")
    report = {}
    _check(ours, reference_run(ref_model, ids), cfg.num_hidden_layers, report)
    record_property("errors", report)
    print(f"{name} {dtype}: logits max abs {report['max_abs']:.3g}, rel L2 {report['rel_l2']:.3g}")


def test_sharded_checkpoint_matches_transformers(tmp_path):
    cfg = hf_config(**CONFIGS["2b-like"])
    ckpt = make_checkpoint(tmp_path, cfg, seed=3, dtype=torch.bfloat16, scale=2.0, max_shard_size="60KB")
    assert (ckpt / "model.safetensors.index.json").is_file()
    model = g2.load_model(ckpt)
    assert len(model.weights.files) > 1
    ids = _ids(cfg.vocab_size, SEQ_LEN, 2)
    report = {}
    _check(model.forward(ids, taps="residual"), reference_run(load_reference(ckpt), ids), cfg.num_hidden_layers, report)
    print(
        f"sharded bf16 ({len(model.weights.files)} files): logits max abs {report['max_abs']:.3g}, "
        f"rel L2 {report['rel_l2']:.3g}"
    )


def test_batch_of_two_matches_transformers(tmp_path):
    cfg = hf_config(**CONFIGS["27b-like"])
    ckpt = make_checkpoint(tmp_path, cfg, seed=4, scale=2.0)
    ids = np.stack([_ids(cfg.vocab_size, SEQ_LEN, 5), _ids(cfg.vocab_size, SEQ_LEN, 6)])
    report = {}
    _check(
        g2.load_model(ckpt).forward(ids, taps="residual"),
        reference_run(load_reference(ckpt), ids),
        cfg.num_hidden_layers,
        report,
    )
    print(f"batch of two: logits max abs {report['max_abs']:.3g}, rel L2 {report['rel_l2']:.3g}")

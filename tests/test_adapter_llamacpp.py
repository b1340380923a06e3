"""The llama.cpp adapter: a GGUF made by llama.cpp's own converter, run by llama-cpp-python, every canonical tap
captured through ggml's eval callback, checked against gemma2_ref's golden.

What the measured numbers are (random 4-layer checkpoint, window 8, 21 tokens, llama-cpp-python 0.3.36, CPU):

    GGUF   worst over every tap: rel L2 / max abs (x absmax)   logits KL max   verdict
    f32    7.0e-4 / 1.3e-3                                     2.6e-7          fp16 PASS, fp32 FAIL: l0 mlp.hidden
    f16    3.8e-3 / 9.9e-3                                     2.2e-5          fp16 PASS
    bf16   1.9e-2 / 4.4e-2                                     2.1e-4          bf16 PASS, fp32 FAIL: l0 q_proj
    q8_0   9.8e-2 / 0.16                                       6.6e-3          q8 PASS,   fp32 FAIL: embed

An f32 GGUF is judged with the fp16 profile: llama.cpp's CPU GEGLU looks gelu up in a float16 table
(ggml/src/ggml-cpu/vec.h:46 `#define GGML_GELU_FP16`, vec.h:1447-1460), so from `mlp.hidden` of layer 0 on its
float32 run carries float16-sized rounding (2^-11 relative per value). That is precision, not a mistake:
`test_the_fp32_failure_is_ggml_float16_gelu_table` reproduces llama.cpp's mlp.hidden from its own gate and up
through that table. The measured worst, 7.0e-4, is 70x under the fp16 profile's 0.05; the tests also hold it
under 5e-3 so that a real regression cannot hide in that margin.
"""

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref.adapters import llamacpp as adapter
from gemma2_ref.adapters import load_adapter
from gemma2_ref.compare import PROFILES, compare_cases
from gemma2_ref.data import bundled_path
from gemma2_ref.suites import generate_case
from tests.helpers.llamacpp_cases import RANDOM_IDS, backends, random_checkpoint


@pytest.fixture(scope="module")
def llama():
    return backends()[0]


@pytest.fixture(scope="module")
def random_case(llama, tmp_path_factory):
    """(checkpoint, our golden with every tap) for the random checkpoint past its window."""
    d = tmp_path_factory.mktemp("llamacpp")
    ckpt = random_checkpoint(d / "random")
    ours = G.load_case(generate_case(g2.load_model(ckpt), RANDOM_IDS, d / "ours", taps="all"))
    return ckpt, ours


@pytest.fixture(scope="module")
def f32_candidate(random_case, tmp_path_factory):
    ckpt, _ = random_case
    out = tmp_path_factory.mktemp("llamacpp-f32")
    return G.load_case(adapter.write_golden(ckpt, RANDOM_IDS, out, dtype="f32", taps="all"))


def worst_rel_l2(result) -> float:
    return max(t.rel_l2 for t in result.compared)


def test_llamacpp_is_a_registered_backend():
    assert load_adapter("llama.cpp") is adapter


def test_llamacpp_exposes_every_canonical_tap():
    cfg = g2.load_config("tiny")
    assert adapter.reachable_taps(cfg) == g2.tap_names(cfg)
    assert adapter.unreachable_taps(cfg) == []


def test_f32_gguf_of_a_random_checkpoint_past_its_window_passes_the_fp16_profile(random_case, f32_candidate):
    ckpt, ours = random_case
    result = compare_cases(ours, f32_candidate, PROFILES["fp16"])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)
    # every canonical tap was captured and compared, attention scores and probabilities included
    assert result.missing == []
    assert [t.name for t in result.compared] == g2.tap_names(g2.load_config(ckpt))
    assert worst_rel_l2(result) < 5e-3  # measured 7.0e-4
    assert f32_candidate.manifest["producer"]["name"] == "llama.cpp"
    assert f32_candidate.manifest["producer"]["gguf_file_type"] == "ALL_F32"
    assert f32_candidate.manifest["model"]["weights"] == ours.manifest["model"]["weights"]
    # under fp32 the first failure is the float16 GELU table, not anything before it
    assert compare_cases(ours, f32_candidate, PROFILES["fp32"]).first_divergence.name == "layers.0.mlp.hidden"


def test_sliding_layers_hide_keys_a_window_back_and_global_layers_do_not(f32_candidate):
    W = 8
    acts = f32_candidate.activations  # attn.probs: (H, S, S) per layer, after mask and softmax
    last = len(RANDOM_IDS) - 1
    for sliding, global_ in ((0, 1), (2, 3)):
        probs = acts[f"layers.{sliding}.attn.probs"][:, last]
        assert np.all(probs[:, : last - W + 1] == 0)  # keys j <= i - W hidden
        assert np.all(probs[:, last - W + 1 :] > 0)
        assert np.all(acts[f"layers.{global_}.attn.probs"][:, last] > 0)  # every earlier key


def test_the_fp32_failure_is_ggml_float16_gelu_table(f32_candidate):
    """ggml_vec_geglu_f32 (vec.h:1447-1460): y = fp16(gelu(fp16(x))) * g for -10 < x < 10, from llama.cpp's own
    gate x and up g; the exact tanh GELU is ~100x further from what llama.cpp computed."""
    a = f32_candidate.activations
    gate, up, hidden = a["layers.0.mlp.gate"], a["layers.0.mlp.up"], a["layers.0.mlp.hidden"]

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608) * x * (1.0 + np.float32(0.044715) * x * x)))

    x16 = gate.astype(np.float16).astype(np.float32)
    table = gelu_tanh(x16).astype(np.float16).astype(np.float32)
    through_table = np.where(gate <= -10, 0.0, np.where(gate >= 10, gate, table)) * up
    exact = gelu_tanh(gate.astype(np.float64)) * up

    def rel(x):
        return np.linalg.norm(x - hidden) / np.linalg.norm(hidden)

    assert rel(through_table) < 1e-6
    assert rel(exact) > 100 * rel(through_table)


@pytest.mark.parametrize(
    "outtype, profile, first_fp32_failure",
    [
        ("bf16", "bf16", "layers.0.attn.q_proj"),  # activations rounded to bf16 at the first matmul
        ("q8_0", "q8", "embed"),  # the embedding table itself is quantised
    ],
)
def test_quantised_ggufs_pass_their_profile_and_fail_fp32(random_case, tmp_path, outtype, profile, first_fp32_failure):
    ckpt, ours = random_case
    cand = G.load_case(adapter.write_golden(ckpt, RANDOM_IDS, tmp_path / outtype, dtype=outtype, taps="all"))
    assert cand.manifest["producer"]["gguf_file_type"] == {"bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[outtype]
    assert cand.compute_dtype == adapter.OUTTYPES[outtype]
    result = compare_cases(ours, cand, PROFILES[profile])
    assert result.passed, "\n".join(t.summary() for t in result.taps if not t.ok)
    failed = compare_cases(ours, cand, PROFILES["fp32"])
    assert failed.first_divergence.name == first_fp32_failure


def test_a_given_gguf_decides_the_compute_dtype(random_case, tmp_path):
    ckpt, _ = random_case
    q8 = adapter.convert(ckpt, "q8_0")  # cached: the conversion above
    cand = G.load_case(adapter.write_golden(ckpt, RANDOM_IDS[:6], tmp_path / "given", gguf=q8, taps="residual"))
    assert cand.compute_dtype == "q8_0" and cand.manifest["producer"]["kv_cache_type"] == "f16"
    assert cand.manifest["producer"]["converted_here"] is False


def test_tiny_model_shows_llamacpp_scaling_queries_by_head_dim(llama, tmp_path):
    """The bundled tiny model has query_pre_attn_scalar 32 and head_dim 64. llama.cpp's GGUF has no key for the
    scalar: src/models/gemma2.cpp:25-27 (llama-cpp-python 0.3.36's vendor/llama.cpp) scales queries by
    1/sqrt(n_embd / n_head) for a 46-layer model and by 1/sqrt(head_dim) for any other. So its scores are
    q.k / 8, ours q.k / sqrt(32), and compare fails at the first tap that sees the scale."""
    tiny = bundled_path("tiny")
    tok = g2.load_tokenizer("tiny")
    ids = np.array(tok.encode("The object is a value, and the function returns", bos=True))
    ours = G.load_case(generate_case(g2.load_model(tiny), ids, tmp_path / "ours", taps="all"))
    cand = G.load_case(adapter.write_golden(tiny, ids, tmp_path / "llama", dtype="f32", taps="all"))
    for profile in ("fp32", "fp16", "bf16", "q8"):
        assert compare_cases(ours, cand, PROFILES[profile]).first_divergence.name == "layers.0.attn.scores"

    a = cand.activations
    q, k = a["layers.0.attn.q_rope"].astype(np.float64), a["layers.0.attn.k_rope"].astype(np.float64)
    G_ = q.shape[1] // k.shape[1]
    dots = np.einsum("ihd,jhd->hij", q, np.repeat(k, G_, axis=1))  # (H, S, S)

    def capped(scale):
        return 50.0 * np.tanh(dots * scale / 50.0)

    def rel(x):
        return np.linalg.norm(x - a["layers.0.attn.scores"]) / np.linalg.norm(x)

    assert rel(capped(64**-0.5)) < 1e-5  # head_dim: what llama.cpp does
    assert rel(capped(32**-0.5)) > 0.2  # query_pre_attn_scalar: what Gemma 2 specifies


@pytest.mark.parametrize(
    "table, change, first_failure",
    [
        ("LAYER_NAMES", {"ffn_gate": "mlp.up", "ffn_up": "mlp.gate"}, "layers.0.mlp.gate"),
        ("REPEATED", {"Qcur": ("attn.q_rope", "attn.q_proj")}, "layers.0.attn.q_proj"),
    ],
)
def test_a_wrong_mapping_is_caught(random_case, tmp_path, monkeypatch, table, change, first_failure):
    """The comparison can fail: swap two llama.cpp names in the adapter's table and compare says where."""
    ckpt, ours = random_case
    for name, tap in change.items():
        monkeypatch.setitem(getattr(adapter, table), name, tap)
    cand = G.load_case(adapter.write_golden(ckpt, RANDOM_IDS, tmp_path / "wrong", dtype="f32", taps="all"))
    result = compare_cases(ours, cand, PROFILES["fp16"])
    assert not result.passed and result.first_divergence.name == first_failure

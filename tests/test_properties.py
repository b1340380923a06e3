"""Properties of the components, stated as the paper states them, checked on random inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gemma2_ref as g2
from gemma2_ref.fast import attention_in_blocks
from gemma2_ref.model import (
    attention,
    attention_mask,
    gelu_exact,
    gelu_tanh,
    rms_norm,
    rope,
    rope_frequencies,
    soft_cap,
)
from gemma2_ref.taps import NO_TAPS
from tests.helpers.numerics import rel_l2

SETTINGS = settings(max_examples=40, deadline=None)


def _rng(seed):
    return np.random.default_rng(seed)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    half=st.integers(1, 64),
    theta=st.sampled_from([100.0, 10000.0, 1e6]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_rope_preserves_the_norm_of_every_head_vector(seed, half, theta, dtype):
    x = _rng(seed).normal(size=(1, 7, 3, 2 * half)).astype(dtype)
    positions = _rng(seed + 1).integers(0, 8192, 7)
    y = rope(x, positions, theta)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=tol)


@SETTINGS
@given(seed=st.integers(0, 2**16), m=st.integers(0, 2000), n=st.integers(0, 2000), shift=st.integers(0, 4000))
def test_rope_makes_q_dot_k_depend_only_on_relative_position(seed, m, n, shift):
    q = _rng(seed).normal(size=(1, 1, 1, 32))
    k = _rng(seed + 1).normal(size=(1, 1, 1, 32))

    def score(i, j):
        return float(np.sum(rope(q, np.array([i]), 10000.0) * rope(k, np.array([j]), 10000.0)))

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-9, abs=1e-9)


def test_rope_frequencies_go_from_one_down_to_almost_one_over_theta():
    f = rope_frequencies(256, 10000.0, np.float64)
    assert f.shape == (128,) and f[0] == 1.0 and np.all(np.diff(f) < 0)
    assert f[-1] == pytest.approx(10000.0 ** (-254 / 256))


def test_rope_pairs_dimension_j_with_j_plus_half_head_dim():
    # half-split ("rotate_half") layout: at position 1, (x_j, x_{j+Dh/2}) rotates by angle freq_j
    x = np.zeros((1, 1, 1, 8))
    x[..., 1] = 1.0
    y = rope(x, np.array([1]), 10000.0)[0, 0, 0]
    angle = rope_frequencies(8, 10000.0, np.float64)[1]
    expected = np.zeros(8)
    expected[1], expected[5] = np.cos(angle), np.sin(angle)
    np.testing.assert_allclose(y, expected, atol=1e-15)


@given(window=st.integers(1, 40), length=st.integers(1, 80))
def test_sliding_window_hides_keys_window_or_more_positions_back(window, length):
    pos = np.arange(length)
    mask = attention_mask(pos, pos, window)
    for i in range(length):
        visible = np.flatnonzero(mask[i])
        assert visible.min() == max(0, i - window + 1) and visible.max() == i  # sees exactly `window` keys
    assert np.array_equal(attention_mask(pos, pos, None), np.tril(np.ones((length, length), bool)))


@given(x=st.floats(-1e6, 1e6), cap=st.sampled_from([30.0, 50.0]))
def test_soft_cap_is_bounded_by_the_cap_and_odd(x, cap):
    y = soft_cap(np.array([x, -x]), cap)
    assert np.all(np.abs(y) <= cap) and y[0] == -y[1]


def test_soft_cap_is_nearly_identity_for_small_values_and_saturates_for_large():
    x = np.array([0.0, 1.0, 5.0, 100.0, 1000.0])
    y = soft_cap(x, 50.0)
    assert y[0] == 0 and abs(y[1] - 1.0) < 2e-4 and 45 < y[3] < 50 and y[4] == pytest.approx(50.0)
    assert np.all(np.diff(y[:4]) > 0)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    kv=st.sampled_from([1, 2, 4]),
    length=st.integers(1, 40),
    window=st.sampled_from([None, 3, 16]),
)
def test_grouped_query_attention_equals_multi_head_attention_with_repeated_kv_heads(seed, kv, length, window):
    H, Dh = 4, 8
    rng = _rng(seed)
    q = rng.normal(size=(2, length, H, Dh)) * 3
    k = rng.normal(size=(2, length, kv, Dh)) * 3
    v = rng.normal(size=(2, length, kv, Dh))
    pos = np.arange(length)
    grouped = attention(q, k, v, pos, pos, window, 0.25, 50.0)
    # query head h uses kv head h // (H / K)
    repeated = attention(q, np.repeat(k, H // kv, axis=2), np.repeat(v, H // kv, axis=2), pos, pos, window, 0.25, 50.0)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-12, atol=1e-12)


def _naive_attention(q, k, v, window, scale, cap):
    """One head at a time, one query at a time: the definition, for checking the vectorised version."""
    B, S, H, Dh = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, S, H, Dh))
    for b in range(B):
        for h in range(H):
            for i in range(S):
                s = [cap * np.tanh((q[b, i, h] @ k[b, j, h // G]) * scale / cap) for j in range(i + 1)]
                s = np.array([sj if (window is None or i - j < window) else -np.inf for j, sj in enumerate(s)])
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, : i + 1, h // G]
    return out.reshape(B, S, H * Dh)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block_bytes", [1, 256 << 20])
def test_attention_equals_the_definition_one_query_at_a_time(window, block_bytes):
    rng = _rng(3)
    q, k, v = rng.normal(size=(2, 13, 4, 8)) * 4, rng.normal(size=(2, 13, 2, 8)) * 4, rng.normal(size=(2, 13, 2, 8))
    pos = np.arange(13)
    naive = _naive_attention(q, k, v, window, 8**-0.5, 50.0)
    np.testing.assert_allclose(attention(q, k, v, pos, pos, window, 8**-0.5, 50.0), naive, rtol=1e-10, atol=1e-12)
    blocked = attention_in_blocks(attention, q, k, v, pos, pos, window, 8**-0.5, 50.0, NO_TAPS, block_bytes)
    np.testing.assert_allclose(blocked, naive, rtol=1e-10, atol=1e-12)


def test_attention_does_not_care_about_the_order_keys_are_stored_in():
    rng = _rng(4)
    q, k, v = rng.normal(size=(1, 1, 2, 8)), rng.normal(size=(1, 9, 1, 8)), rng.normal(size=(1, 9, 1, 8))
    pos, perm = np.arange(9), rng.permutation(9)
    a = attention(q, k, v, np.array([8]), pos, 4, 0.3, 50.0)
    b = attention(q, k[:, perm], v[:, perm], np.array([8]), pos[perm], 4, 0.3, 50.0)
    np.testing.assert_allclose(a, b, rtol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**16), c=st.floats(1e-3, 1e3))
def test_rms_norm_ignores_the_scale_of_its_input_and_zero_weight_gives_unit_rms(seed, c):
    x = _rng(seed).normal(size=(3, 64))
    w = _rng(seed + 1).normal(size=64)
    np.testing.assert_allclose(rms_norm(c * x, w, 1e-12), rms_norm(x, w, 1e-12), rtol=1e-6)
    y = rms_norm(x, np.zeros(64), 0.0)
    np.testing.assert_allclose(np.sqrt(np.mean(y * y, axis=-1)), 1.0, rtol=1e-12)


def test_rms_norm_computes_in_float32_even_for_float16_input():
    x = (np.arange(64, dtype=np.float16) - 30) * np.float16(300)  # x^2 overflows float16
    y = rms_norm(x, np.zeros(64, np.float16), 1e-6)
    assert y.dtype == np.float16 and np.all(np.isfinite(y))


def test_gelu_tanh_is_close_to_but_not_the_exact_gelu():
    x = np.linspace(-6, 6, 1001)
    diff = np.abs(gelu_tanh(x) - gelu_exact(x))
    assert 1e-5 < diff.max() < 1e-3
    import math

    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.abs(gelu_exact(x) - exact).max() < 1e-6


def test_causality_logits_at_t_do_not_change_when_later_tokens_change(tiny_random_dir):
    model = g2.load_model(tiny_random_dir)
    ids = _rng(5).integers(3, model.config.vocab_size, 70)
    ids[0] = 2
    changed = ids.copy()
    changed[40:] = _rng(6).integers(3, model.config.vocab_size, 30)
    a, b = model.logits(ids), model.logits(changed)
    np.testing.assert_array_equal(a[:40], b[:40])
    assert np.abs(a[40:] - b[40:]).max() > 1e-2


def test_float64_and_float32_agree(tiny_random_dir):
    ids = np.concatenate([[2], _rng(7).integers(3, 2048, 80)])
    t32 = g2.load_model(tiny_random_dir).forward(ids, taps="residual")
    t64 = g2.load_model(tiny_random_dir, dtype="float64").forward(ids, taps="residual")
    assert t64["logits"].dtype == np.float64 and t32["logits"].dtype == np.float32
    for name in t32:
        assert rel_l2(t32[name], t64[name]) < 1e-5, name


def test_a_batch_gives_the_same_result_as_its_rows(tiny_random_dir):
    model = g2.load_model(tiny_random_dir)
    ids = np.concatenate([[[2], [2]], _rng(8).integers(3, 2048, (2, 40))], axis=1)
    batch = model.forward(ids, taps=["layers.*.output"])
    for row in range(2):
        single = model.forward(ids[row], taps=["layers.*.output"])
        for name in single:  # a matmul of other shape rounds differently: the rows agree to float32 rounding
            assert rel_l2(batch[name][row], single[name]) < 1e-5, name


def test_every_tap_has_the_shape_design_md_gives(tiny_random_dir):
    model = g2.load_model(tiny_random_dir)
    c = model.config
    S, D, H, K, Dh, F, V = (
        9,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    )
    trace = model.forward(list(range(2, 2 + S)), taps="all")
    expected = {
        "embed": (S, D),
        "final_norm": (S, D),
        "logits_raw": (S, V),
        "logits": (S, V),
        "attn.q_proj": (S, H, Dh),
        "attn.k_proj": (S, K, Dh),
        "attn.v_proj": (S, K, Dh),
        "attn.q_rope": (S, H, Dh),
        "attn.k_rope": (S, K, Dh),
        "attn.scores": (H, S, S),
        "attn.probs": (H, S, S),
        "attn.context": (S, H * Dh),
        "mlp.gate": (S, F),
        "mlp.up": (S, F),
        "mlp.hidden": (S, F),
    }
    assert list(trace) == g2.tap_names(c)  # every tap, in execution order
    for name, value in trace.items():
        short = name.split(".", 2)[-1] if name.startswith("layers.") else name
        assert value.shape == expected.get(short, (S, D)), name


def test_taps_not_asked_for_are_not_returned_and_do_not_change_the_logits(tiny_random_dir):
    model = g2.load_model(tiny_random_dir)
    ids = list(range(2, 50))
    some = model.forward(ids, taps=["layers.1.attn.probs", "embed"])
    assert set(some) == {"layers.1.attn.probs", "embed", "logits"}
    np.testing.assert_array_equal(some["logits"], model.logits(ids))
    np.testing.assert_allclose(some["layers.1.attn.probs"].sum(-1), 1.0, rtol=1e-5)


def test_tap_sets_resolve_to_the_documented_names():
    cfg = g2.PRESETS["tiny"]
    assert g2.select_taps(cfg, "residual") == ["embed"] + [f"layers.{i}.output" for i in range(4)] + [
        "final_norm",
        "logits",
    ]
    default = g2.select_taps(cfg, "default")
    assert "layers.0.attn.scores" not in default and "layers.0.attn.context" in default
    assert g2.select_taps(cfg, ["layers.2.mlp.*"]) == [f"layers.2.mlp.{t}" for t in ("gate", "up", "hidden", "out")]
    with pytest.raises(ValueError, match="matches no tap"):
        g2.select_taps(cfg, ["layers.9.output"])

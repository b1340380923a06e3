"""`gemma2-ref exercise check`: a learner's functions run inside the reference forward, and the known mistake a
wrong one makes is named. Each mistake below is written as a learner would write it (one function of the solution
replaced), and must be named; a correct solution passes; an error of no known kind is located but not named; a file
that does not import or lacks a function gets one line and exit 2."""

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from gemma2_ref.cli.main import main
from gemma2_ref.verify import exercise as X

EXERCISES = ROOT / "walkthrough" / "exercises"
SOLUTION = (EXERCISES / "solution.py").read_text()

# (the catalogued mistake expected, the function it is in, that function as a learner gets it wrong)
LEARNER_MISTAKES = [
    (
        "rope_layout=interleaved",
        "rope",
        """
        def rope(x, positions, theta):
            Dh = x.shape[-1]
            freqs = 1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float32) / Dh)
            angles = (positions.astype(np.float32)[:, None] * freqs)[:, None, :]  # (S, 1, Dh/2)
            even, odd = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i+1)
            out = np.empty_like(x)
            out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
            out[..., 1::2] = odd * np.cos(angles) + even * np.sin(angles)
            return out
        """,
    ),
    (
        "rope_theta=5e5",
        "rope",
        """
        _rope = rope
        def rope(x, positions, theta):
            return _rope(x, positions, 500000.0)  # Llama 3's base
        """,
    ),
    (
        "norm_offset=0",
        "rms_norm",
        """
        def rms_norm(x, w, eps):
            x32 = x.astype(np.float32)
            return (x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w).astype(x.dtype)
        """,
    ),
    (
        "norm_offset=2",
        "rms_norm",
        """
        def rms_norm(x, w, eps):
            scale = 1.0 + w  # "the weights are offsets from 1"
            x32 = x.astype(np.float32)
            return (x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps) * (1.0 + scale)).astype(x.dtype)
        """,
    ),
    (
        "embed_unscaled",
        "embed",
        """
        def embed(ids, embedding):
            return embedding[ids]
        """,
    ),
    (
        "normalizer_dtype=bfloat16",
        "embed",
        """
        def embed(ids, embedding):
            bits = np.array(math.sqrt(embedding.shape[1]), np.float32).view(np.uint32)
            normalizer = ((bits + 0x8000) & 0xFFFF0000).astype(np.uint32).view(np.float32)  # "Gemma's bfloat16 sqrt(D)"
            return embedding[ids] * normalizer
        """,
    ),
    (
        "drop_attn_softcap",
        "attention",
        """
        _softcap_attention = attention
        def attention(q, k, v, q_pos, k_pos, window, scale, softcap):
            return _softcap_attention(q, k, v, q_pos, k_pos, window, scale, None)  # "FlashAttention has no cap"
        """,
    ),
    (
        "query_scale=head_dim",
        "attention",
        """
        _scaled_attention = attention
        def attention(q, k, v, q_pos, k_pos, window, scale, softcap):
            return _scaled_attention(q, k, v, q_pos, k_pos, window, q.shape[-1] ** -0.5, softcap)
        """,
    ),
    (
        "gqa_mapping=tiled",
        "attention",
        """
        def attention(q, k, v, q_pos, k_pos, window, scale, softcap):
            B, S, H, Dh = q.shape
            K = k.shape[2]
            k = np.tile(k, (1, 1, H // K, 1))  # query head h gets kv head h % K
            v = np.tile(v, (1, 1, H // K, 1))
            scores = soft_cap(np.einsum("bshd,bthd->bhst", q, k) * scale, softcap)
            scores = np.where(attention_mask(q_pos, k_pos, window), scores, -np.inf)
            return np.einsum("bhst,bthd->bshd", softmax(scores), v).reshape(B, S, H * Dh)
        """,
    ),
    (
        "no_sliding_window",
        "attention_mask",
        """
        def attention_mask(q_pos, k_pos, window):
            return q_pos[:, None] >= k_pos[None, :]
        """,
    ),
    (
        "window_offset=+1",
        "attention_mask",
        """
        def attention_mask(q_pos, k_pos, window):
            back = q_pos[:, None] - k_pos[None, :]
            return (back >= 0) & (back <= window) if window is not None else back >= 0
        """,
    ),
    (
        "window_offset=-1",
        "attention_mask",
        """
        def attention_mask(q_pos, k_pos, window):
            back = q_pos[:, None] - k_pos[None, :]
            return (back >= 0) & (back < window - 1) if window is not None else back >= 0
        """,
    ),
    (
        "exact_gelu",
        "gelu_tanh",
        """
        _erf = np.vectorize(math.erf, otypes=[np.float32])
        def gelu_tanh(x):
            return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
        """,
    ),
    (
        "no_post_attn_norm",
        "decoder_layer",
        """
        def decoder_layer(x, w, positions, cfg, layer):
            B, S, D = x.shape
            H, K, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
            h = rms_norm(x, w.pre_attn_norm, eps)
            q = rope((h @ w.q_proj.T).reshape(B, S, H, Dh), positions, cfg.rope_theta)
            k = rope((h @ w.k_proj.T).reshape(B, S, K, Dh), positions, cfg.rope_theta)
            v = (h @ w.v_proj.T).reshape(B, S, K, Dh)
            context = attention(q, k, v, positions, positions, cfg.window(layer), cfg.query_pre_attn_scalar ** -0.5,
                                cfg.attn_logit_softcapping)
            x = x + context @ w.o_proj.T  # the Llama layer
            return x + rms_norm(mlp(rms_norm(x, w.pre_ffw_norm, eps), w), w.post_ffw_norm, eps)
        """,
    ),
    (
        "no_post_ffw_norm",
        "decoder_layer",
        """
        def decoder_layer(x, w, positions, cfg, layer):
            B, S, D = x.shape
            H, K, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
            h = rms_norm(x, w.pre_attn_norm, eps)
            q = rope((h @ w.q_proj.T).reshape(B, S, H, Dh), positions, cfg.rope_theta)
            k = rope((h @ w.k_proj.T).reshape(B, S, K, Dh), positions, cfg.rope_theta)
            v = (h @ w.v_proj.T).reshape(B, S, K, Dh)
            context = attention(q, k, v, positions, positions, cfg.window(layer), cfg.query_pre_attn_scalar ** -0.5,
                                cfg.attn_logit_softcapping)
            x = x + rms_norm(context @ w.o_proj.T, w.post_attn_norm, eps)
            return x + mlp(rms_norm(x, w.pre_ffw_norm, eps), w)
        """,
    ),
    (
        "sliding_layers=odd",
        "decoder_layer",
        """
        _layer = decoder_layer
        class _OddWindows:
            def __init__(self, cfg):
                self.cfg = cfg
            def __getattr__(self, name):
                return getattr(self.cfg, name)
            def window(self, layer):  # "every odd layer", counted from 1
                return self.cfg.sliding_window if layer % 2 == 1 else None
        def decoder_layer(x, w, positions, cfg, layer):
            return _layer(x, w, positions, _OddWindows(cfg), layer)
        """,
    ),
]


def solution_with(tmp_path, function_source: str = "", name: str = "my_gemma.py") -> Path:
    """The reference solution with one function redefined after it (a later def replaces the earlier)."""
    path = tmp_path / name
    path.write_text(SOLUTION + "\n\n" + textwrap.dedent(function_source))
    return path


def report(path, only=None):
    results = X.check_file(path, only)
    return results, X.format_results(results, path, 46)


def test_the_reference_solution_passes_every_function_and_all_together(tmp_path, capsys):
    assert main(["exercise", "check", str(EXERCISES / "solution.py")]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok\n") == len(X.NAMES) + 1 and "9 of 9 written functions pass" in out, out


def test_the_package_functions_themselves_pass_as_a_solution(tmp_path):
    path = tmp_path / "package.py"
    path.write_text(
        "from gemma2_ref.model.gemma2 import (embed, rms_norm, rope, soft_cap, attention_mask, attention,"
        " gelu_tanh, mlp, decoder_layer)\n"
    )
    results = X.check_file(path)
    assert [r.status for r in results] == ["ok"] * (len(X.NAMES) + 1)


def test_the_template_has_every_function_and_none_is_written(capsys):
    assert main(["exercise", "check", str(EXERCISES / "my_gemma.py")]) == 1
    out = capsys.readouterr().out
    assert out.count("not written yet") == len(X.NAMES) and "all together" not in out


@pytest.mark.parametrize("mistake, function, source", LEARNER_MISTAKES, ids=[m[0] for m in LEARNER_MISTAKES])
def test_a_learners_mistake_is_named_with_its_chapter(tmp_path, mistake, function, source):
    path = solution_with(tmp_path, source)
    results, text = report(path, only=[function])
    (result,) = results
    assert result.status == "FAIL", text
    assert any(n.split(" ")[0] == mistake for n in result.named), text
    assert f"looks like the known mistake {mistake}" in text and "see walkthrough/" in text, text


def test_every_hint_for_a_function_a_learner_writes_has_a_learner_mistake_above():
    not_a_learners_function = {"drop_final_softcap", "normalizer_dtype=float64", "query_scale", "rope_theta"}
    covered = {m for m, _, _ in LEARNER_MISTAKES}
    assert set(X.HINTS) - not_a_learners_function <= covered


def test_the_whole_model_with_one_wrong_function_fails_where_it_is(tmp_path):
    path = solution_with(tmp_path, LEARNER_MISTAKES[0][2])
    results, text = report(path)
    status = {r.name: r for r in results}
    assert status["rope"].status == "FAIL" and status["all together"].status == "FAIL"
    assert all(status[n].status == "ok" for n in X.NAMES if n not in ("rope", "decoder_layer")), text
    assert status["rope"].first_divergence == "layers.0.attn.q_rope", text


@pytest.mark.parametrize(
    "function, source, first",
    [
        (
            "mlp",
            """
        _mlp = mlp
        def mlp(x, w):
            return _mlp(x, w) * 1.01
        """,
            "layers.0.mlp.out",
        ),
        (
            "rms_norm",
            """
        def rms_norm(x, w, eps):
            return x / (np.mean(np.abs(x), axis=-1, keepdims=True) + eps) * (1 + w)
        """,
            "layers.0.pre_attn_norm",
        ),
    ],
    ids=["mlp-times-1.01", "rms_norm-mean-abs"],
)
def test_an_error_of_no_known_kind_is_located_and_not_named(tmp_path, function, source, first):
    results, text = report(solution_with(tmp_path, source), only=[function])
    (result,) = results
    assert result.status == "FAIL" and result.named == [] and result.first_divergence == first, text
    assert "no known Gemma 2 mistake matches" in text and first in text, text


def test_a_function_that_raises_or_returns_the_wrong_shape_is_an_error_naming_the_line(tmp_path):
    path = solution_with(
        tmp_path,
        """
        def soft_cap(x, cap):
            return (cap * np.tanh(x / cap))[..., :1]
        def gelu_tanh(x):
            return x.reshape(-1, 7)
        """,
    )
    results, text = report(path, only=["soft_cap", "gelu_tanh"])
    assert [r.status for r in results[:2]] == ["error", "error"], text
    assert "soft_cap returned shape" in text
    assert "raised ValueError" in text and "my_gemma.py line" in text and "in gelu_tanh" in text, text


@pytest.mark.parametrize(
    "source, says",
    [
        ("import nump\n", "does not import: ModuleNotFoundError: No module named 'nump' (bad.py line 1"),
        ("def rope(x:\n", "does not import: SyntaxError at line 1"),
        ("def embed(ids, embedding):\n    return embedding[ids]\n", "no function rms_norm, rope"),
    ],
    ids=["import-error", "syntax-error", "functions-missing"],
)
def test_a_file_that_cannot_be_checked_gets_one_line_and_exit_2(tmp_path, capsys, source, says):
    path = tmp_path / "bad.py"
    path.write_text(source)
    assert main(["exercise", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and str(path) in err, err


def test_only_names_an_unknown_function_in_one_line(capsys):
    assert main(["exercise", "check", str(EXERCISES / "solution.py"), "--only", "banana"]) == 2
    assert "--only banana: not an exercise" in capsys.readouterr().err


def test_the_reference_forward_is_restored_after_a_check(tmp_path):
    from gemma2_ref.model import gemma2 as G

    before = {
        n: getattr(G, n) for n in ("rope", "attention", "attention_in_blocks", "ACTIVATION_FUNCTIONS", "soft_cap_")
    }
    report(solution_with(tmp_path, LEARNER_MISTAKES[0][2]))
    assert {n: getattr(G, n) for n in before} == before

"""Generation: the KV cache reproduces the full forward exactly, greedy decoding equals transformers'
`generate`, and sampling is reproducible and never leaves its top-k / top-p set.

The decisive checks run on random checkpoints with a small sliding window (5 or 8), so that prompts shorter
than, equal to and longer than the window, and decoding that wraps the ring buffer several times, all fit
in a few dozen tokens.
"""

import io
import re
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gemma2_ref as g2
from gemma2_ref.checkpoints import random_weights, save_checkpoint
from gemma2_ref.cli import main
from gemma2_ref.generate import EMPTY, KVCache, TextStream, generate, greedy, sample_next, top_k_filter, top_p_filter
from tests.helpers.hf_reference import hf_config, load_reference, make_checkpoint

WINDOW = 5
SMALL = g2.PRESETS["tiny"].replace(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=WINDOW,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """Random weights (every tensor, norms included), window 5, stored as float32."""
    return save_checkpoint(tmp_path_factory.mktemp("small"), SMALL, random_weights(SMALL, seed=3), "F32")


@pytest.fixture(scope="module")
def small(small_dir):
    return g2.load_model(small_dir, keep_converted=True)


def prompt(n, vocab=SMALL.vocab_size, seed=0):
    return np.concatenate([[2], np.random.default_rng(seed).integers(3, vocab, n - 1)]).astype(np.int64)


# -- the cache reproduces the full forward -----------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_len",
    [3, WINDOW, WINDOW + 3, 3 * WINDOW + 2],
    ids=["shorter-than-window", "equal-to-window", "longer-than-window", "three-windows"],
)
def test_cached_decode_equals_full_forward_at_every_step(small, prompt_len):
    ids = prompt(prompt_len, seed=prompt_len)
    steps = 4 * WINDOW + 3  # the ring buffer wraps four times
    out = generate(small, ids, steps, stop_ids=(), keep_logits=True)
    assert len(out.tokens) == steps and out.decode_tokens == steps - 1
    full = small.logits(np.concatenate([ids, out.tokens[:-1]]))  # (prompt + steps - 1, V)
    cached = np.stack(out.logits)  # row j: the logits the j-th new token was chosen from
    err = np.abs(cached - full[prompt_len - 1 :]).max()
    assert err <= 1e-5, f"cached decode differs from the full forward by {err:.3g} (fp32)"
    assert out.tokens == [greedy(row) for row in full[prompt_len - 1 :]]


def test_cached_decode_equals_full_forward_in_float64_to_rounding(small_dir):
    model = g2.load_model(small_dir, dtype="float64", keep_converted=True)
    ids = prompt(WINDOW + 2, seed=1)
    out = generate(model, ids, 3 * WINDOW, stop_ids=(), keep_logits=True)
    full = model.logits(np.concatenate([ids, out.tokens[:-1]]))
    assert np.abs(np.stack(out.logits) - full[len(ids) - 1 :]).max() <= 1e-11


@pytest.mark.parametrize("chunks", [[1] * 12, [4, 1, 7], [WINDOW, WINDOW, 2], [2, 9, 1], [12]])
def test_prompt_fed_in_any_chunks_equals_full_forward(small, chunks):
    """Chunks longer than the window, and chunks arriving when the ring is already partly full."""
    ids = prompt(sum(chunks), seed=7)
    full = small.logits(ids)
    cache = KVCache(small.config, capacity=2)  # a tiny capacity: global layers must grow on the way
    rows, start = [], 0
    for n in chunks:
        rows.append(small.forward(ids[start : start + n], kv_cache=cache)["logits"])
        start += n
    assert cache.length == len(ids)
    assert np.abs(np.concatenate(rows) - full).max() <= 1e-5


def test_sliding_layers_keep_exactly_window_slots_and_global_layers_keep_everything(small):
    cache = KVCache(small.config)
    ids = prompt(3 * WINDOW + 4, seed=2)
    small.forward(ids[:7], kv_cache=cache)
    for t in ids[7:]:
        small.forward([t], kv_cache=cache)
    n = len(ids)
    for layer in range(small.config.num_hidden_layers):
        positions = cache.key_positions(layer)
        if small.config.is_sliding(layer):
            assert cache.layers[layer].k.shape[1] == WINDOW
            assert sorted(positions) == list(range(n - WINDOW, n))  # the last W positions ...
            assert all(positions % WINDOW == np.arange(WINDOW))  # ... each in slot position % W
        else:
            assert list(positions) == list(range(n))
    K, Dh = small.config.num_key_value_heads, small.config.head_dim
    slots = sum(WINDOW if small.config.is_sliding(i) else cache.layers[i].k.shape[1] for i in range(4))
    assert cache.memory_bytes() == slots * (2 * K * Dh * 4 + 8)


def test_empty_ring_slots_are_hidden_by_causality():
    """A cache started at position 3 (explicit positions): slots 0-2 stay empty until the ring wraps."""
    cfg = SMALL.replace(num_hidden_layers=1, layer_types=("sliding_attention",))
    cache = KVCache(cfg)
    k = np.ones((1, 2, 2, 16), np.float32)
    k_all, v_all, pos = cache.update(0, k, k, np.array([3, 4]))
    assert list(pos) == [3, 4]  # nothing cached yet: this step's keys only
    k_all, v_all, pos = cache.update(0, k[:, :1], k[:, :1], np.array([5]))
    assert list(pos) == [5, EMPTY, EMPTY, 3, 4]  # slot order (5 % 5 = 0); empty slots lie "in the future"
    assert list(g2.model.attention_mask(np.array([5]), pos, WINDOW)[0]) == [True, False, False, True, True]
    assert cache.memory_bytes() == WINDOW * (2 * 2 * 16 * 4 + 8)  # the ring is allocated in full


def test_decode_taps_equal_the_full_forward_row_and_probs_follow_the_cache_order(small):
    ids = prompt(2 * WINDOW + 3, seed=4)
    full = small.forward(ids, taps="all")
    cache = KVCache(small.config)
    small.forward(ids[:4], kv_cache=cache)
    for p in range(4, len(ids)):
        step = small.forward([ids[p]], taps="all", kv_cache=cache)
        for name in ("embed", "layers.0.attn.q_rope", "layers.1.mlp.hidden", "layers.3.output", "final_norm"):
            assert step[name].shape == (1,) + full[name].shape[1:], name
            assert np.abs(step[name] - full[name][p : p + 1]).max() <= 1e-5, name
        for layer in range(small.config.num_hidden_layers):
            probs = step[f"layers.{layer}.attn.probs"]  # (H, 1, T): T = this layer's cache slots
            key_pos = cache.key_positions(layer)
            assert probs.shape == (small.config.num_attention_heads, 1, len(key_pos))
            filled = key_pos != EMPTY
            expected = full[f"layers.{layer}.attn.probs"][:, p, key_pos[filled]]
            assert np.abs(probs[:, 0, filled] - expected).max() <= 1e-6
            assert np.all(probs[:, 0, ~filled] == 0)


def test_generate_returns_taps_for_the_prefill_and_each_decode_step(small):
    ids = prompt(6)
    out = generate(small, ids, 4, stop_ids=(), taps=["layers.*.output"])
    assert len(out.taps) == 4
    assert out.taps[0]["layers.2.output"].shape == (6, SMALL.hidden_size)
    assert all(t["layers.2.output"].shape == (1, SMALL.hidden_size) for t in out.taps[1:])


# -- stopping ------------------------------------------------------------------------------------------------


def test_generation_stops_after_a_stop_token_and_includes_it(small):
    ids = prompt(6)
    free = generate(small, ids, 10, stop_ids=())
    stop_at = free.tokens[3]
    out = generate(small, ids, 10, stop_ids=(stop_at,))
    first = free.tokens.index(stop_at)
    assert out.tokens == free.tokens[: first + 1] and out.stop_reason == "stop"
    assert out.decode_tokens == first  # the stop token itself is never fed back


def test_generation_stops_at_the_context_length(small_dir):
    cfg = SMALL.replace(max_position_embeddings=20)
    model = g2.Model(cfg, g2.load_model(small_dir).weights, "float32")
    out = generate(model, prompt(15), 50, stop_ids=())
    assert out.stop_reason == "context"
    assert 15 + out.decode_tokens == 20 and len(out.tokens) == 6


# -- greedy equals transformers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    cfg = hf_config(sliding_window=8)
    # Random models like to repeat one token greedily; this seed and scale give varied continuations
    # (3 and 9 distinct tokens) with every top-2 margin above 0.017.
    ckpt = make_checkpoint(tmp_path_factory.mktemp("hf_gen"), cfg, seed=0, scale=4.0)
    return cfg, load_reference(ckpt), g2.load_model(ckpt, keep_converted=True)


@pytest.mark.parametrize("prompt_len", [5, 13], ids=["prompt-inside-window", "prompt-past-window"])
def test_greedy_generation_equals_transformers_generate(hf_pair, prompt_len):
    cfg, ref, ours = hf_pair
    ids = prompt(prompt_len, vocab=cfg.vocab_size, seed=prompt_len)
    steps = 40  # 5 windows of 8: transformers' sliding cache and our ring both wrap
    mine = generate(ours, ids, steps, stop_ids=(), keep_logits=True)
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor(ids[None]),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = np.stack(mine.logits)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    assert margin > 1e-3, f"near-tie (top-2 margin {margin:.2g}): token equality would be luck; change seed"
    assert len(set(mine.tokens)) >= 3, "a single repeated token would test little: change seed"
    assert theirs.sequences[0, prompt_len:].tolist() == mine.tokens
    their_logits = torch.stack(theirs.logits)[:, 0].float().numpy()
    # fp32 rounding grows with the weights' scale (up to ~8e-5 here); a cache or position bug is O(0.1-1)
    assert np.abs(their_logits - logits).max() <= 5e-4


# -- sampling ------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_the_seed_matters(small):
    ids = prompt(6)
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, stop_ids=())
    a = generate(small, ids, 20, seed=123, **kw)
    b = generate(small, ids, 20, seed=123, **kw)
    c = generate(small, ids, 20, seed=124, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_temperature_zero_is_greedy_and_ties_go_to_the_lowest_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0])
    assert greedy(logits) == 1
    assert sample_next(logits, temperature=0.0, top_k=1, top_p=0.1) == 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.1, 0.5, 0.3, 0.1])
    logits = np.log(probs)
    kept = lambda p: set(np.flatnonzero(np.isfinite(top_p_filter(logits, p))))  # noqa: E731
    assert kept(0.45) == {1}  # 0.5 >= 0.45 already
    assert kept(0.55) == {1, 2}
    assert kept(0.79) == {1, 2}
    assert kept(0.85) == {0, 1, 2}  # equal probabilities: the lower id first
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(1e-9) == {1}  # never empty


def test_invalid_sampling_settings_are_refused(small):
    for bad in (
        dict(temperature=-1.0),
        dict(temperature=1.0, top_k=0),
        dict(temperature=1.0, top_p=0.0),
        dict(temperature=1.0, top_p=1.5),
    ):
        with pytest.raises(ValueError):
            generate(small, prompt(3), 2, **bad)


logit_rows = st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=40).map(np.array)


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.integers(1, 45), st.floats(0.05, 3.0), st.integers(0, 2**32 - 1))
def test_top_k_never_samples_outside_the_k_most_likely(logits, k, temperature, seed):
    token = sample_next(logits, temperature, top_k=k, rng=np.random.default_rng(seed))
    allowed = np.argsort(-logits, kind="stable")[:k]
    assert token in allowed


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.floats(1e-6, 1.0), st.floats(0.05, 3.0), st.integers(0, 2**32 - 1))
def test_top_p_never_samples_outside_the_nucleus(logits, p, temperature, seed):
    token = sample_next(logits, temperature, top_p=p, rng=np.random.default_rng(seed))
    x = logits / temperature
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x.max())
    probs /= probs.sum()
    before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])  # mass of the tokens ranked above each one
    # a token belongs if the nucleus was not yet complete without it; at a tie with p (logits [0, 0, -20], p = 0.5)
    # the sampler's float32 sums may fall either side, so a mass within float32 rounding of p counts as short of it
    allowed = order[before < p + 1e-6]
    assert token in set(allowed.tolist()) | {int(order[0])}


@settings(max_examples=100, deadline=None)
@given(logit_rows, st.integers(1, 45), st.floats(1e-6, 1.0), st.integers(0, 2**32 - 1))
def test_top_k_then_top_p_samples_from_both_sets(logits, k, p, seed):
    token = sample_next(logits, 1.0, top_k=k, top_p=p, rng=np.random.default_rng(seed))
    assert np.isfinite(top_p_filter(top_k_filter(logits, k), p)[token])
    assert token in np.argsort(-logits, kind="stable")[:k]


# -- streaming text and the command line ---------------------------------------------------------------------


def test_streamed_text_concatenates_to_the_decoded_continuation():
    tok = g2.load_tokenizer("tiny")
    head = tok.encode("Price:", bos=True)
    new = tok.encode(" 5€ — café 日本 🙂 done", bos=False)  # byte-fallback pieces: one character, 3-4 tokens
    stream = TextStream(tok, prefix=head)
    parts = [stream.push(t) for t in new] + [stream.flush()]
    assert "".join(parts) == tok.decode(head + new)[len(tok.decode(head)) :]
    assert "\ufffd" not in "".join(parts)


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_generate_streams_text_and_reports_speeds():
    code, out, err = run_cli("generate", "tiny", "--prompt", "The object is", "--max-new-tokens", "6", "--show-ids")
    assert code == 0, err
    assert out.startswith("The object is")
    assert "new ids:" in out
    assert re.search(r"prefill \d+ tokens in .* tok/s\), decode \d+ tokens in .* tok/s\), cache .* MiB", err)


def test_cli_generate_chat_sampling_is_reproducible_with_a_seed():
    args = (
        "generate",
        "tiny",
        "--prompt",
        "Hello",
        "--chat",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--max-new-tokens",
        "8",
        "--show-ids",
    )
    first, second = run_cli(*args), run_cli(*args)
    assert first[0] == 0 and first[1] == second[1]
    assert "prompt ids: 2 106 " in first[1]  # one <bos>, then <start_of_turn>


def test_cli_generate_refuses_a_negative_temperature():
    code, _, err = run_cli("generate", "tiny", "--prompt", "x", "--temperature", "-1")
    assert code == 2 and "temperature" in err


@pytest.mark.parametrize(
    "name", ["decode_ring_off_by_one", "decode_unmasked_slots", "decode_positions_stuck", "decode_window_ignored"]
)
def test_a_model_with_a_decode_loop_mistake_generates_through_it(name):
    """A decode-loop mistake is a change of the cache and the loop, so `generate` makes it as `decode_taps`
    does (teacher-forced on the tokens generate chose), and the correct model's logits differ."""
    from gemma2_ref.generate import decode_taps
    from gemma2_ref.mistakes import inject

    model = g2.load_model("tiny")
    bad = inject(model, name)
    W = model.config.sliding_window
    prompt = np.arange(2, W + 10)
    out = generate(bad, prompt, max_new_tokens=8, stop_ids=(), keep_logits=True)
    ids = np.concatenate([prompt, out.tokens])  # all of them: the same cache capacity as generate's
    taps = decode_taps(bad, ids, len(prompt), taps=["logits"])
    np.testing.assert_allclose(np.stack(out.logits), taps["logits"][len(prompt) - 1 : -1], rtol=1e-5, atol=1e-5)
    assert np.abs(np.stack(out.logits) - model.logits(ids)[len(prompt) - 1 : -1]).max() > 1e-3

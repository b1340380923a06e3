"""The decode-loop mistakes, made in transformers' own KV-cache decode (its caches, its masks, its RoPE), captured
with the adapter (`prefill=`: a prefill, then one token per call through the cache), and named by `diagnose`
from those activations alone. Our side re-runs each mistake through generate.py's cache; transformers' side
never runs gemma2_ref code, only a patched cache layer, a patched mask function or other position ids.
Clean decodes (dynamic and static cache; float32, and bfloat16 / float16 under their fixed and measured
profiles) raise no alarm, and in bfloat16 each mistake is still found and named under the measured profile.

The case is the coverage suite's decode case for a window of W = 8: a prefill of W + W/4 = 10 tokens (past
the window), then 2W = 16 one-token steps (every sliding layer's ring wraps twice)."""

import copy

import numpy as np
import pytest
import torch
from transformers import Gemma2ForCausalLM
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer, StaticCache

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.adapters import transformers as adapter
from gemma2_ref.compare import PROFILES, compare_cases, format_report
from gemma2_ref.diagnose import diagnose, format_diagnosis
from gemma2_ref.measured import measured_profile
from tests.helpers.hf_reference import DIAGNOSABLE_WINDOW, diagnosable_checkpoint

W, PREFILL, STEPS = DIAGNOSABLE_WINDOW, 10, 16
FP32 = PROFILES["fp32"]
MODELING = "transformers.models.gemma2.modeling_gemma2"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return diagnosable_checkpoint(tmp_path_factory.mktemp("hf_decode"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return g2.load_model(checkpoint)


@pytest.fixture(scope="module")
def ids():
    return np.concatenate([[2], np.random.default_rng(3).integers(3, 300, PREFILL + STEPS - 1)])


@pytest.fixture(scope="module")
def reference(model, ids, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "decode"
    return G.load_case(S.generate_case(model, ids, out, taps="default", prefill=PREFILL))


@pytest.fixture(scope="module")
def hf(checkpoint):
    return Gemma2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()


def test_the_coverage_suites_decode_case_has_this_shape(model):
    case = next(c for c in S.coverage_inputs(model.config, g2.load_tokenizer("tiny")) if c.name == "decode")
    assert (case.prefill, len(case.ids) - case.prefill) == (W + W // 4, 2 * W)


# -- how transformers is made to commit each mistake -----------------------------------------------------------


def ring_one_slot_short(monkeypatch, hf, ids):
    """transformers' own cache built for a window one shorter than the mask's: its sliding layers keep W - 2
    keys, so each decode query loses the oldest key of its window, as a ring written one slot ahead does."""
    short = copy.deepcopy(hf.config)
    short.sliding_window = W - 1
    return {"cache": DynamicCache(config=short)}


def static_cache_unmasked(monkeypatch, hf, ids):
    """transformers' StaticCache (zero-filled, sized for the whole case) with masks that let every slot at or
    past the last written position through: its unfilled slots are attended (#31953 / #32188)."""
    import transformers.models.gemma2.modeling_gemma2 as modeling

    def unmasking(create):
        def patched(**kw):
            filled = int(kw["position_ids"].max()) + 1
            return create(**kw, or_mask_function=lambda b, h, q, kv: kv >= filled)

        return patched

    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        monkeypatch.setattr(modeling, name, unmasking(getattr(modeling, name)))
    return {"cache": StaticCache(config=hf.config, max_cache_len=len(ids))}


def positions_stuck(monkeypatch, hf, ids):
    """Every decode step's position_ids (RoPE) at the first decode step's; transformers masks by the cache."""
    return {"position_ids": [np.arange(PREFILL)[None]] + [np.array([[PREFILL]])] * STEPS}


def window_ignored(monkeypatch, hf, ids):
    """A cache built for every layer global (sliding layers keep every key) and, for one-token steps, the
    global causal mask on the sliding layers too: the window applies in the prefill only."""
    import transformers.models.gemma2.modeling_gemma2 as modeling

    everywhere_global = copy.deepcopy(hf.config)
    everywhere_global.layer_types = ["full_attention"] * len(hf.config.layer_types)
    sliding, causal = modeling.create_sliding_window_causal_mask, modeling.create_causal_mask
    monkeypatch.setattr(
        modeling,
        "create_sliding_window_causal_mask",
        lambda **kw: causal(**kw) if kw["inputs_embeds"].shape[1] == 1 else sliding(**kw),
    )
    return {"cache": DynamicCache(config=everywhere_global)}


def window_from_query(monkeypatch, hf, ids):
    """keras-hub #1738: a one-token step's sliding mask built from the query length (1): only its own key."""
    import transformers.models.gemma2.modeling_gemma2 as modeling

    sliding = modeling.create_sliding_window_causal_mask
    monkeypatch.setattr(
        modeling,
        "create_sliding_window_causal_mask",
        lambda **kw: (
            sliding(**kw, and_mask_function=lambda b, h, q, kv: kv >= q)
            if kw["inputs_embeds"].shape[1] == 1
            else sliding(**kw)
        ),
    )
    return {}


def positions_from_sliding_cache(monkeypatch, hf, ids):
    """transformers #38156: the position read from a sliding layer's cache length, which stops at W."""
    return {"position_ids": [np.arange(PREFILL)[None]] + [np.array([[min(PREFILL + k, W)]]) for k in range(STEPS)]}


# name -> (how transformers makes it, the first diverging tap, where in the case it first acts)
DECODE_MISTAKES = {
    "decode_window_from_query": (window_from_query, "layers.0.attn.context", "decode step 0"),
    "decode_positions_from_sliding_cache": (positions_from_sliding_cache, "layers.0.attn.context", "decode step 0"),
    "decode_ring_off_by_one": (ring_one_slot_short, "layers.0.attn.context", "decode step 0"),
    "decode_unmasked_slots": (static_cache_unmasked, "layers.1.attn.context", "the prefill"),
    "decode_positions_stuck": (positions_stuck, "layers.0.attn.context", "decode step 1"),
    "decode_window_ignored": (window_ignored, "layers.0.attn.context", "decode step 0"),
}


def transformers_decode(checkpoint, hf, ids, out, **kw):
    return G.load_case(adapter.write_golden(checkpoint, ids, out, hf_model=hf, taps="default", prefill=PREFILL, **kw))


@pytest.mark.parametrize("name", list(DECODE_MISTAKES))
def test_a_decode_loop_mistake_made_in_transformers_is_found_at_its_step_and_named(
    checkpoint, model, reference, hf, ids, tmp_path, monkeypatch, name
):
    make, tap, step = DECODE_MISTAKES[name]
    cand = transformers_decode(checkpoint, hf, ids, tmp_path / "cand", **make(monkeypatch, hf, ids))
    result = compare_cases(reference, cand, FP32)
    assert not result.passed
    assert result.first_divergence.name == tap, format_report(result)
    assert any(f"{tap} first fails at position" in n and f": {step} (" in n for n in result.notes), result.notes
    diag = diagnose(model, reference, cand, FP32, combine=False)
    assert diag.named and diag.named[0].variant.name == name, format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_transformers_own_decode_raises_no_alarm(checkpoint, reference, hf, ids, tmp_path, cache):
    kw = {} if cache == "dynamic" else {"cache": StaticCache(config=hf.config, max_cache_len=len(ids))}
    cand = transformers_decode(checkpoint, hf, ids, tmp_path / "cand", **kw)
    result = compare_cases(reference, cand, FP32)
    assert result.passed, format_report(result)


@pytest.mark.parametrize("dtype, fixed", [("bfloat16", "bf16"), ("float16", "fp16")])
def test_transformers_own_decode_in_half_precision_passes_its_fixed_and_measured_profiles(
    checkpoint, model, reference, ids, tmp_path, dtype, fixed
):
    cand = G.load_case(
        adapter.write_golden(
            checkpoint,
            ids,
            tmp_path / "cand",
            dtype=dtype,
            taps="default",
            hf_model=adapter.load(checkpoint, dtype),
            prefill=PREFILL,
        )
    )
    for profile in (PROFILES[fixed], measured_profile(model, reference, dtype)):
        result = compare_cases(reference, cand, profile)
        assert result.passed, format_report(result)


@pytest.mark.parametrize("name", list(DECODE_MISTAKES))
def test_a_decode_loop_mistake_in_a_bfloat16_transformers_run_is_named_under_the_measured_profile(
    checkpoint, model, reference, ids, tmp_path, monkeypatch, name
):
    make, tap, _ = DECODE_MISTAKES[name]
    hf16 = adapter.load(checkpoint, "bfloat16")
    cand = G.load_case(
        adapter.write_golden(
            checkpoint,
            ids,
            tmp_path / "cand",
            dtype="bfloat16",
            taps="default",
            hf_model=hf16,
            prefill=PREFILL,
            **make(monkeypatch, hf16, ids),
        )
    )
    measured = measured_profile(model, reference, "bfloat16")
    result = compare_cases(reference, cand, measured)
    assert not result.passed and result.first_divergence.name == tap, format_report(result)
    diag = diagnose(model, reference, cand, measured, combine=False)
    assert diag.named and diag.named[0].variant.name == name, format_diagnosis(diag)


def test_a_decode_loop_mistake_is_not_tried_on_a_prefill_case(model, ids, tmp_path):
    """Only a KV-cache decode can show a decode-loop mistake: on a plain prefill case it is not re-run."""
    ref = G.load_case(S.generate_case(model, ids, tmp_path / "ref", taps="default"))
    cand = G.load_case(
        G.write_case(
            tmp_path / "cand",
            g2.mistakes.inject(model, "window_offset=-1").forward(ids, taps="default"),
            ids,
            producer="some backend",
        )
    )
    diag = diagnose(model, ref, cand, FP32, combine=False)
    assert not any(r.variant.decode for r in diag.results)


# -- a chunked prefill: the coverage suite's chunked case, through transformers' cache with its own ring layer ------

CHUNKS = (W, W + W // 2) + (1,) * (W // 4)


class RingWrittenFirst(DynamicSlidingWindowLayer):
    """A sliding layer keeping its last 2W keys (executorch's ring), a chunk written in before its queries
    attend: what the chunk pushed out is gone for the chunk's own first queries (executorch #20346)."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)[:, :, -2 * self.sliding_window :]
        self.values = torch.cat([self.values, value_states], dim=-2)[:, :, -2 * self.sliding_window :]
        return self.keys, self.values

    def get_mask_sizes(self, query_length):
        kv_length = min(self.cumulative_length + query_length, 2 * self.sliding_window)
        return kv_length, self.cumulative_length + query_length - kv_length


def ring_written_first(hf):
    cache = DynamicCache(config=hf.config)
    cache.layers = [RingWrittenFirst(sliding_window=W) if layer.is_sliding else layer for layer in cache.layers]
    return cache


@pytest.fixture(scope="module")
def chunked_ids():
    return np.concatenate([[2], np.random.default_rng(4).integers(3, 300, sum(CHUNKS) - 1)])


@pytest.fixture(scope="module")
def chunked_reference(model, chunked_ids, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "chunked"
    return G.load_case(S.generate_case(model, chunked_ids, out, taps="default", prefill=W, chunks=CHUNKS))


def test_the_coverage_suites_chunked_case_has_these_chunks(model):
    case = next(c for c in S.coverage_inputs(model.config, g2.load_tokenizer("tiny")) if c.name == "chunked")
    assert case.chunks == CHUNKS and len(case.ids) == sum(CHUNKS)


def test_transformers_chunked_prefill_raises_no_alarm(checkpoint, hf, chunked_ids, chunked_reference, tmp_path):
    cand = G.load_case(
        adapter.write_golden(
            checkpoint, chunked_ids, tmp_path / "cand", hf_model=hf, taps="default", prefill=W, chunks=CHUNKS
        )
    )
    result = compare_cases(chunked_reference, cand, FP32)
    assert result.passed, format_report(result)


def test_a_chunk_written_into_the_ring_before_attending_in_transformers_is_found_in_that_chunk_and_named(
    checkpoint, model, hf, chunked_ids, chunked_reference, tmp_path
):
    cand = G.load_case(
        adapter.write_golden(
            checkpoint,
            chunked_ids,
            tmp_path / "cand",
            hf_model=hf,
            taps="default",
            prefill=W,
            chunks=CHUNKS,
            cache=ring_written_first(hf),
        )
    )
    result = compare_cases(chunked_reference, cand, FP32)
    assert not result.passed and result.first_divergence.name == "layers.0.attn.context", format_report(result)
    assert any(": chunk 1 (" in n for n in result.notes), result.notes
    diag = diagnose(model, chunked_reference, cand, FP32, combine=False)
    assert diag.named and diag.named[0].variant.name == "prefill_chunk_overflows_ring", format_diagnosis(diag)
    assert diag.named[0].verdict == "matches", format_diagnosis(diag)

"""The mistakes real Gemma 2 implementations shipped, each as a transform of a correct model.

The forward in model.py has no bug switches. A known mistake is expressed as what it changes *before* that
unmodified forward runs:

    a config change     a soft-cap dropped (`attn_logit_softcapping=None`), every layer global, the window
                        one too wide or narrow (`sliding_window` +-1), a wrong `query_pre_attn_scalar`, the
                        exact erf GELU (`hidden_activation="gelu"`, as Hugging Face's config names it), a
                        post-norm skipped (`post_attn_norm=False`: the Gemma 1 layer)
    a weight change     RMSNorm's scale (1 + w) with the +1 forgotten or applied twice: every norm weight
                        shifted by -1 or +1
    an input change     the leading <bos> dropped, or doubled
    the decode loop     the KV cache's ring indexed one slot off, its unfilled slots attended, positions that
                        stop advancing (or stop at the window: read from a sliding cache), a sliding layer
                        keeping every key or only the query's own, a prefill chunk written into the ring
                        before it attends (MistakenCache: the mistaken model's `kv_cache`; only a decode case,
                        `generate.decode_taps`, shows them)
    the recorder        one step of the computation rounded as a backend rounds it: RMSNorm's normalised x
                        cast before the scale, its (1 + w) or its mean of squares in bfloat16 (a
                        MistakenTaps recorder: rms_norm offers those steps), and the raw logits shifted
                        by a per-row constant before the final soft-cap
    the normalizer      sqrt(D) rounded to another dtype than the activations' (model.embed's number:
                        `normalizer_value` decides it)

    bad = inject(model, "drop_attn_softcap")        # a Model that makes the mistake
    bad.logits(ids)                                 # (and the ids through mistake.apply_ids for input ones)

Because a mistaken model is just another model, it runs everywhere the correct one does: taps, goldens, and a
KV-cache decode (a window mistake sizes its ring buffers from the changed config).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..model.bfloat16 import round_to_bf16
from ..model.config import GLOBAL, SLIDING
from ..model.generate import EMPTY, KVCache
from ..model.inputs import padded_positions
from ..model.taps import Taps, round_to_dtype, select_taps
from ..model.tokenizer import BOS
from ..storage.loader import Model

# The public threads where each mistake was reported: the one list. The catalogue below, check-config's reports
# (check_config.REPORTS), compare's leads and docs/compare-and-diagnose.md (scripts/make_docs.py) all read it.
REFS = {
    "attn_softcap": "vLLM #5908, llama.cpp #8156 / #8197, transformers #31887",
    "final_softcap": "llama.cpp #8156 / #8197 (GGUFs converted before the soft-cap keys existed)",
    "softcap_key": "vLLM #30427, transformers #42881, ollama #5341",
    "window": "llama.cpp #8227, transformers #32522 / #35681 / #39408, keras-hub #2186, SGLang #1056",
    "sliding_layers": "transformers #31775 / #31786 / #31848",
    "query_scale": (
        "9B 224 for 256: transformers #31891, llama.cpp #8444 (closed) / #8473 (the fix), gemma_pytorch #71; "
        "27B head_dim for 144: ferrox #40, llama.cpp #13951 (proposed)"
    ),
    "rope_theta": "config defaults of other families",
    "rope_layout": "Meta / GPT-J layout confusion in converters",
    "gqa_mapping": "repeat vs repeat_interleave in GQA ports",
    "normalizer": "transformers #29402, gemma_pytorch #67",
    "embed_unscaled": "porting from Llama",
    "norm_offset": "gemma2-facts: RMSNorm (1 + w) (no public bug number recorded)",
    "post_norm": "porting from Gemma 1",
    "gelu": "transformers #29402 (GeGLU with the tanh approximation)",
    "padding": "transformers #32848",
    "ring": "ring-buffer KV caches (no public bug number recorded)",
    "cache_window": "transformers #31775 / #31848",
    "static_cache": "transformers #31953 / #32188 (static cache)",
    "positions": "decode loops (no public bug number recorded)",
    "no_bos": "lm-evaluation-harness #2049 (add_bos_token)",
    "double_bos": "lm-evaluation-harness #3333, llama-cpp-python #1561",
    "special_tokens": "llama.cpp #8244, #8349",
    "fp16_overflow": "llama.cpp #9166, exllamav2 #539, llama.cpp #8240 (the 27B in float16)",
    "norm_swap": "TensorRT-LLM #1984 (sandwich norms not mapped)",
    "logits_shifted": "TransformerLens #650 / #693",
    "norm_cast_before_scale": (
        'gemma_pytorch #67; transformers #29402 ("Llama does x.to(float16) * w whilst Gemma is (x * w).to(float16)")'
    ),
    "norm_scale_in_bf16": (
        "vLLM #53203, vLLM #3653, vLLM #29810; onnxruntime-genai 0.18.0 builders/base.py:3163 "
        '(`layernorm.weight + self.layernorm_attrs["add_offset"]` on the checkpoint\'s bfloat16 weight)'
    ),
    "normalizer_decimals": (
        "onnxruntime-genai 0.18.0 builders/gemma.py:22 "
        '(`self.embed_attrs["scale"] = np.round(np.sqrt(self.hidden_size), decimals=2)`)'
    ),
    "norm_variance_in_bf16": "SGLang #27540, PyTorch #189581",
    "decode_window_from_query": "keras-hub #1738",
    "decode_positions_from_sliding_cache": "transformers #38156",
    "prefill_chunk_overflows_ring": "executorch #20346, litgpt #2215",
    "window_key": "llama.cpp #8227, ollama #5341",
    "head_dim": "litgpt #1545",
}

# Where each mistake first shows in a comparison with every tap stored (name without its "(value)"): the
# catalogue's third column (docs/compare-and-diagnose.md); tests/test_diagnose.py checks the prefill ones.
SHOWS_AT = {
    "drop_attn_softcap": "`layers.0.attn.scores` (else `.probs`, `.context`)",
    "drop_final_softcap": "`logits` (not `logits_raw`)",
    "no_sliding_window": "the first sliding layer's `attn.probs` / `attn.context`, only at positions >= W - 1",
    "window_offset=+1": "the first sliding layer's `attn.probs` / `attn.context`, only at positions >= W - 1",
    "window_offset=-1": "the first sliding layer's `attn.probs` / `attn.context`, only at positions >= W - 1",
    "query_scale": "`layers.0.attn.scores` (else `.probs`, `.context`)",
    "sliding_layers=odd": "`layers.0.attn.*` past the window",
    "rope_theta": "`layers.0.attn.q_rope`",
    "rope_layout=interleaved": "`layers.0.attn.q_rope`",
    "gqa_mapping=tiled": "`layers.0.attn.scores` (else `.context`)",
    "normalizer_dtype=bfloat16": "`embed`",
    "normalizer_dtype=float64": "`embed` (in a bfloat16 run only: float32 rounds sqrt(D) the same)",
    "embed_unscaled": "`embed`",
    "normalizer_decimals=2": "`embed`",
    "norm_offset=0": "`layers.0.pre_attn_norm`",
    "norm_offset=2": "`layers.0.pre_attn_norm`",
    "no_post_attn_norm": "`layers.0.post_attn_norm`",
    "no_post_ffw_norm": "`layers.0.post_ffw_norm`",
    "exact_gelu": "`layers.0.mlp.hidden`",
    "padding_not_masked": "the first layer's `attn.*` of the shorter rows (a padded batch)",
    "decode_ring_off_by_one": "`decode` case: the first sliding layer's `attn.context` at decode step 0",
    "decode_window_ignored": "`decode` case: the first sliding layer's `attn.context` at decode step 0",
    "decode_unmasked_slots": (
        "`decode` case: the first layer with unfilled slots (a global one once the ring is "
        "full), `attn.context`, from the prefill on"
    ),
    "decode_positions_stuck": "`decode` case: `layers.0.attn.q_rope` (else `.context`) at decode step 1",
    "no_bos": "`embed` (shape), and the manifests' token ids",
    "double_bos": "`embed` (shape), and the manifests' token ids",
    "fp16_overflow": "the first tap where the reference's absmax exceeds 65504",
    "norm_swap": "`layers.0.post_attn_norm`",
    "logits_shifted": "`logits_raw`",
    "norm_cast_before_scale": (
        "the first RMSNorm output, in a low-precision run only (within the measured profile: named bit for bit "
        "by the precision stage)"
    ),
    "norm_scale_in_bf16": (
        "the first RMSNorm output (in a float32 run of bfloat16 weights too; in a bfloat16 run within the "
        "measured profile: named bit for bit by the precision stage)"
    ),
    "norm_variance_in_bf16": "the first RMSNorm output, in a bfloat16 run only (bit for bit: the precision stage)",
    "decode_window_from_query": "`decode` case: the first sliding layer's `attn.context` at decode step 0",
    "decode_positions_from_sliding_cache": "`decode` case: `layers.0.attn.q_rope` at the first step past the window",
    "prefill_chunk_overflows_ring": "`chunked` case: the first sliding layer's `attn.context` in the second chunk",
}


def shows_at(name: str) -> str:
    """Where the mistake called `name` first shows ("" when not recorded): SHOWS_AT by name, else by the
    family before "=" (query_scale=..., rope_theta=...)."""
    stem = name.split(" (")[0]
    return SHOWS_AT.get(stem) or SHOWS_AT.get(stem.split("=")[0], "")


@dataclass(frozen=True)
class Mistake:
    """One known mistake: its contract name (reports and --json use it), what it is, where it was reported,
    and the transform that makes a correct model commit it."""

    name: str
    what: str
    refs: str
    config: tuple[tuple[str, object], ...] = ()  # (field, value) pairs replaced in the Gemma2Config
    norm_shift: float = 0.0  # added to every RMSNorm weight: -1 forgets the +1 of (1 + w), +1 doubles it
    ids: str = "same"  # "same", "no_bos" (leading <bos> dropped), "double_bos" (<bos> added)
    normalizer: str | None = (
        None  # model.embed's normalizer: "bfloat16", "float64", "unscaled", "decimals2" (normalizer_value)
    )
    layout: str | None = None  # "rope_interleaved" / "gqa_tiled": permuted weights (see tap_view)
    padding: str | None = None  # "unmasked": a padded batch run without its mask (padding attended)
    decode: str | None = None  # a decode-loop mistake (DECODE_MISTAKES): only a KV-cache decode shows it
    norm_swap: bool = False  # post_attn_norm and pre_ffw_norm weights exchanged (a Llama converter's mapping)
    step: str | None = None  # a recorder mistake (STEP_MISTAKES): one step computed or rounded otherwise

    def apply_positions(self, attention_mask):
        """The positions the mistaken backend runs a padded batch at (None: the default 0..S-1, for an input
        without padding); False: the mistake needs padding and there is none."""
        if attention_mask is None:
            return False if self.padding else None
        if self.ids != "same":
            return False  # another number of tokens: the padding mask does not fit them
        mask = np.asarray(attention_mask, dtype=bool)
        if self.padding == "unmasked":  # every token, padding included, at its index: padding is attended
            return np.broadcast_to(np.arange(mask.shape[-1]), mask.shape).copy()
        return padded_positions(mask)

    def apply_ids(self, ids):
        """The ids as the mistaken backend runs them (None: not applicable, e.g. no <bos> to drop)."""
        ids = np.asarray(ids)
        rows = np.atleast_2d(ids)
        if self.ids == "same":
            return ids
        if self.ids == "no_bos":
            if not (rows[:, 0] == BOS).all() or rows.shape[1] < 2:
                return None
            out = rows[:, 1:]
        else:
            out = np.concatenate([np.full((rows.shape[0], 1), BOS), rows], axis=1)
        return out if ids.ndim == 2 else out[0]

    def changes(self) -> set[str]:
        """What the mistake touches, to tell which two can be combined."""
        touched = {key for key, _ in self.config}
        if {"sliding_window", "layer_types"} & touched:
            touched.add("window")
        for what, value in (
            ("norms", self.norm_shift),
            ("ids", self.ids != "same"),
            ("normalizer", self.normalizer),
            ("layout", self.layout),
            ("padding", self.padding),
            ("decode", self.decode),
            ("norms", self.norm_swap),
            ("step", self.step),
        ):
            if value:
                touched.add(what)
        return touched


def combine(a: Mistake, b: Mistake) -> Mistake:
    """Both mistakes at once (they must touch different things: see Mistake.changes)."""
    return Mistake(
        f"{a.name} + {b.name}",
        f"{a.what}; and {b.what}",
        f"{a.refs}; {b.refs}",
        a.config + b.config,
        a.norm_shift + b.norm_shift,
        a.ids if a.ids != "same" else b.ids,
        a.normalizer or b.normalizer,
        a.layout or b.layout,
        a.padding or b.padding,
        a.decode or b.decode,
        a.norm_swap or b.norm_swap,
        a.step or b.step,
    )


# -- layout mistakes: the same arithmetic on permuted dimensions ------------------------------------------------
#
# RoPE on interleaved pairs (2i, 2i+1) is the half-split RoPE of model.rope on q and k with their head
# dimensions permuted (2i -> i, 2i+1 -> i + Dh/2), and a permutation changes no dot product: so the mistaken
# model is the correct forward on permuted q_proj / k_proj rows. Query head h using kv head h % K ("tiled",
# where h // G is right) is the correct forward with query heads reordered (h -> (h % K) * G + h // K) in
# q_proj's rows and o_proj's columns. The taps inside attention are then in the permuted order; `tap_view`
# puts them back in the order the mistaken backend itself records.


def rope_interleaved_order(head_dim: int) -> np.ndarray:
    """perm[j]: the interleaved dimension that half-split position j holds: (0, 2, 4, ..., 1, 3, 5, ...)."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def gqa_tiled_order(heads: int, kv_heads: int) -> np.ndarray:
    """order[g]: the tiled backend's query head that the correct grouping puts at position g."""
    group = heads // kv_heads
    sigma = np.array([(h % kv_heads) * group + h // kv_heads for h in range(heads)])  # tiled head h -> g
    return np.argsort(sigma)


def _permute_layer(cfg, w, layout: str):
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w = dataclasses.replace(
        w,
        q_proj=np.asarray(w.q_proj),
        k_proj=np.asarray(w.k_proj),  # a streamed layer's
        o_proj=np.asarray(w.o_proj),
    )  # projections are stored bf16 (fast.StoredWeight)
    if layout == "rope_interleaved":
        perm = rope_interleaved_order(Dh)
        rows = lambda m, heads: m.reshape(heads, Dh, -1)[:, perm].reshape(m.shape)  # noqa: E731
        return dataclasses.replace(w, q_proj=rows(w.q_proj, H), k_proj=rows(w.k_proj, K))
    order = gqa_tiled_order(H, K)
    q = w.q_proj.reshape(H, Dh, -1)[order].reshape(w.q_proj.shape)
    o = w.o_proj.reshape(-1, H, Dh)[:, order].reshape(w.o_proj.shape)
    return dataclasses.replace(w, q_proj=q, o_proj=o)


def tap_view(cfg, layout: str | None, name: str, value: np.ndarray) -> np.ndarray:
    """A tap of the permuted model as the mistaken backend records it (its own order of dimensions)."""
    kind = name.split(".", 2)[-1]
    if layout == "rope_interleaved" and kind in ("attn.q_proj", "attn.k_proj", "attn.q_rope", "attn.k_rope"):
        return value[..., np.argsort(rope_interleaved_order(cfg.head_dim))]
    if layout == "gqa_tiled":
        back = np.argsort(gqa_tiled_order(cfg.num_attention_heads, cfg.num_key_value_heads))
        if kind in ("attn.q_proj", "attn.q_rope"):
            return value[..., back, :]
        if kind in ("attn.scores", "attn.probs"):
            return value[..., back, :, :]
        if kind == "attn.context":
            heads = value.reshape(*value.shape[:-1], cfg.num_attention_heads, cfg.head_dim)
            return heads[..., back, :].reshape(value.shape)
    return value


class TransformedWeights:
    """A weights provider whose layers go through `layer_fn` and final norm through `norm_fn`."""

    def __init__(self, weights, layer_fn, norm_fn):
        self.weights, self.layer_fn, self.norm_fn = weights, layer_fn, norm_fn

    def embedding(self):
        return self.weights.embedding()

    def final_norm(self):
        return self.norm_fn(self.weights.final_norm())

    def layer(self, i: int):
        return self.layer_fn(self.weights.layer(i))

    def close(self):
        self.weights.close()


NORMS = ("pre_attn_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm")


def normalizer_value(label: str | None, dtype, hidden_size: int):
    """The number a mistaken backend multiplies the embedding by (model.embed), or None for sqrt(D) in the
    compute dtype: "bfloat16" sqrt(D) rounded to bfloat16, "float64" never rounded, "unscaled" 1, "decimals2"
    sqrt(D) rounded to two decimals (then to the compute dtype, as a graph constant is)."""
    dtype, sqrt_d = np.dtype(dtype), math.sqrt(hidden_size)
    return {
        None: None,
        "float64": np.float64(sqrt_d),
        "unscaled": dtype.type(1),
        "decimals2": dtype.type(round(sqrt_d, 2)),
        "bfloat16": round_to_bf16(np.float32(sqrt_d)).astype(dtype),
    }[label]


def swap_norms(w):
    """post_attn_norm <-> pre_ffw_norm: HF's post_attention_layernorm is Llama's pre-FFN norm by name."""
    return dataclasses.replace(w, post_attn_norm=w.pre_ffw_norm, pre_ffw_norm=w.post_attn_norm)


class MistakenModel(Model):
    """The correct forward on transformed config and weights, through a mistaken recorder or KV cache where the
    mistake is one; taps shown in the mistaken backend's layout."""

    def __init__(self, model: Model, mistake: Mistake):
        cfg = model.config.replace(**dict(mistake.config)) if mistake.config else model.config
        shift, layout, swap = mistake.norm_shift, mistake.layout, mistake.norm_swap

        def layer_fn(w):
            if shift:
                w = dataclasses.replace(w, **{n: getattr(w, n) + getattr(w, n).dtype.type(shift) for n in NORMS})
            w = swap_norms(w) if swap else w
            return _permute_layer(cfg, w, layout) if layout else w

        weights = model.weights
        if shift or layout or swap:
            weights = TransformedWeights(weights, layer_fn, lambda w: w + w.dtype.type(shift) if shift else w)
        normalizer = normalizer_value(mistake.normalizer, model.dtype, cfg.hidden_size)
        super().__init__(cfg, weights, model.dtype, model.path, model.normalizer if normalizer is None else normalizer)
        self.mistake = mistake

    def forward(self, ids, taps=None, **kw):
        cache = kw.get("kv_cache")
        if self.mistake.decode == "window_ignored" and cache is not None and cache.length > 0:
            # a decode step of a backend whose sliding layers kept every key: they attend as global ones
            everywhere_global = self.config.replace(layer_types=(GLOBAL,) * self.config.num_hidden_layers)
            return Model(everywhere_global, self.weights, self.dtype, self.path, self.normalizer).forward(
                ids, taps, **kw
            )
        if self.mistake.step:
            wanted = [] if taps in (None, "none") else select_taps(self.config, taps)
            taps = MistakenTaps(self.mistake.step, wanted, round_to=kw.pop("round_to", None), sink=kw.pop("sink", None))
        out = super().forward(ids, taps, **kw)
        return {n: tap_view(self.config, self.mistake.layout, n, v) for n, v in out.items()}

    def kv_cache(self, capacity=None):
        if self.mistake.decode is None:
            return super().kv_cache(capacity)
        return MistakenCache(self.config, capacity, self.mistake.decode)


# -- recorder mistakes: one step of the arithmetic done as the backend does it -------------------------------

STEP_MISTAKES = ("norm_cast_before_scale", "norm_scale_in_bf16", "norm_variance_in_bf16", "logits_shifted")


def bf16_running_sum(values: np.ndarray) -> np.ndarray:
    """The sum over the last axis accumulated in bfloat16: every partial sum rounded (a loop over that axis,
    vectorised over the rows). (..., D) -> (..., 1)."""
    total = np.zeros(values.shape[:-1] + (1,), np.float32)
    for j in range(values.shape[-1]):
        total = round_to_bf16(total + values[..., j : j + 1].astype(np.float32))
    return total


class MistakenTaps(Taps):
    """A recorder that computes one step as a mistaken backend does (`step`, one of STEP_MISTAKES), then
    records and rounds as any recorder; the forward continues on what it returns:

        norm_cast_before_scale   rms.normed (x / rms) cast to the activation dtype before the (1 + w) multiply
        norm_scale_in_bf16       rms.scale (1 + w) rounded to bfloat16
        norm_variance_in_bf16    rms.squares rounded to bfloat16, and their mean accumulated in bfloat16
        logits_shifted           logits_raw minus its mean over the vocabulary (per row) before the soft-cap
    """

    def __init__(self, step: str, wanted, round_to=None, sink=None):
        super().__init__(wanted, round_to=round_to, sink=sink)
        self.step = step

    def __call__(self, name, value):
        s = self.step
        if s == "norm_cast_before_scale" and name == "rms.normed":
            value = round_to_dtype(value, self.round_to)  # in a float32 run: nothing to cast to
        elif s == "norm_scale_in_bf16" and name == "rms.scale":
            value = round_to_bf16(value.astype(np.float32)).astype(value.dtype)
        elif s == "norm_variance_in_bf16" and name == "rms.squares":
            self.squares = round_to_bf16(value.astype(np.float32))
            value = self.squares.astype(value.dtype)
        elif s == "norm_variance_in_bf16" and name == "rms.variance":
            mean = bf16_running_sum(self.squares) / np.float32(self.squares.shape[-1])
            value = round_to_bf16(mean).astype(value.dtype)
        elif s == "logits_shifted" and name == "logits_raw":
            value = value - value.mean(axis=-1, keepdims=True, dtype=np.float64).astype(value.dtype)
        return super().__call__(name, value)


# -- decode-loop mistakes: the correct forward through a mistaken KV cache ------------------------------------

DECODE_MISTAKES = (
    "ring_off_by_one",
    "unmasked_slots",
    "positions_stuck",
    "window_ignored",
    "window_from_query",
    "positions_from_sliding_cache",
    "chunk_overflows_ring",
)


class MistakenCache(KVCache):
    """generate.KVCache as a mistaken backend keeps it (`decode`, one of DECODE_MISTAKES):

        ring_off_by_one      the sliding layers' ring W - 1 slots (a decode step overwrites a key still inside
                             the window)
        window_ignored       sliding layers keep every key (their decode steps attend globally: MistakenModel)
        unmasked_slots       a static cache hands over every slot, unfilled ones too (zero keys "at position 0")
        window_from_query    a sliding layer's decode step sees only the keys of its own query length (1)
        positions_stuck      the loop's position counter stops at the prefill's length
        positions_from_sliding_cache  the counter is a sliding layer's cache length, capped at the window W
        chunk_overflows_ring a chunk written into the sliding layers' ring of 2W slots before its queries attend

    A wrong counter moves the positions the forward gives RoPE; the keys are still stored at their true
    positions and handed back at the distances the mask must see (the mask was right in those backends)."""

    def __init__(self, cfg, capacity, decode: str):
        if decode not in DECODE_MISTAKES:
            raise ValueError(f"unknown decode-loop mistake {decode!r}; known: {', '.join(DECODE_MISTAKES)}")
        ring = cfg
        if decode == "ring_off_by_one":
            ring = cfg.replace(sliding_window=cfg.sliding_window - 1)
        elif decode == "window_ignored":
            ring = cfg.replace(layer_types=(GLOBAL,) * cfg.num_hidden_layers)
        elif decode == "chunk_overflows_ring":
            ring = cfg.replace(sliding_window=2 * cfg.sliding_window)
        super().__init__(ring, capacity)
        self.decode, self.true_length, self.prefill_length, self.window = decode, 0, None, cfg.sliding_window

    def advance(self, steps: int) -> None:
        self.true_length += steps
        self.prefill_length = self.prefill_length or steps
        if self.decode == "positions_stuck":
            self.length = self.prefill_length
        elif self.decode == "positions_from_sliding_cache":
            self.length = min(self.true_length, self.window)
        else:
            self.length = self.true_length

    def update(self, layer, k, v, positions):
        true = np.arange(self.true_length, self.true_length + len(positions))
        shift = int(positions[0]) - int(true[0])  # the counter's error: the mask must see true distances
        c = self.layers[layer]
        sliding = self.cfg.window(layer) is not None
        if self.decode == "chunk_overflows_ring" and sliding and len(true) > 1:
            super().update(layer, k, v, true)  # written first: what the chunk overwrote is gone
            c = self.layers[layer]
            return c.k[:, : c.filled], c.v[:, : c.filled], c.pos[: c.filled] + shift
        k_all, v_all, k_pos = super().update(layer, k, v, true)
        c = self.layers[layer]
        if self.decode == "window_from_query" and sliding and len(true) == 1:
            return k, v, positions  # only the query's own key
        if self.decode == "unmasked_slots" and c.filled < len(c.pos):
            return c.k, c.v, np.where(c.pos == EMPTY, 0, c.pos)  # every slot; an unfilled one "at position 0"
        return k_all, v_all, k_pos + shift


def inject(model: Model, mistake) -> Model:
    """A Model that makes `mistake` (a Mistake, or a name from known_mistakes(model.config)). The input
    mistakes change the ids, not the model: run them through `mistake.apply_ids`."""
    if isinstance(mistake, str):
        mistake = find(model.config, mistake)
    return MistakenModel(model, mistake)


def find(cfg, name: str) -> Mistake:
    """The known mistake called `name`; a query-scale name may omit its "(value)" suffix."""
    for m in known_mistakes(cfg):
        if name in (m.name, m.name.split(" (")[0]):
            return m
    raise ValueError(f"unknown mistake {name!r}; known: {', '.join(m.name for m in known_mistakes(cfg))}")


def known_mistakes(cfg) -> list[Mistake]:
    """Every known mistake that changes this model's output, in the order diagnose tries them."""
    W = cfg.sliding_window
    out = [
        Mistake(
            "drop_attn_softcap",
            "attention scores not soft-capped at 50*tanh(s/50) (fast attention kernels without soft-capping)",
            REFS["attn_softcap"],
            config=(("attn_logit_softcapping", None),),
        ),
        Mistake(
            "drop_final_softcap",
            "logits not soft-capped at 30*tanh(x/30)",
            REFS["final_softcap"],
            config=(("final_logit_softcapping", None),),
        ),
        Mistake(
            "no_sliding_window",
            f"sliding-window layers attend globally (only visible beyond the window of {W})",
            REFS["window"],
            config=(("layer_types", (GLOBAL,) * cfg.num_hidden_layers),),
        ),
        Mistake(
            "window_offset=+1",
            "sliding window off by one: a query also sees the key exactly `window` back",
            REFS["window"],
            config=(("sliding_window", W + 1),),
        ),
    ]
    if W > 1:
        out.append(
            Mistake(
                "window_offset=-1",
                "sliding window off by one: a query sees one key fewer",
                REFS["window"],
                config=(("sliding_window", W - 1),),
            )
        )
    scales = {
        "head_dim": cfg.head_dim,
        "224": 224,
        "256": 256,
        "hidden_size/heads": cfg.hidden_size / cfg.num_attention_heads,
    }
    seen = {float(cfg.query_pre_attn_scalar)}
    for label, value in scales.items():
        if float(value) not in seen:
            seen.add(float(value))
            out.append(
                Mistake(
                    f"query_scale={label}" + (f" ({value:g})" if not label.isdigit() else ""),
                    f"scores scaled by {value:g}^-0.5 instead of query_pre_attn_scalar "
                    f"{cfg.query_pre_attn_scalar:g}^-0.5",
                    REFS["query_scale"],
                    config=(("query_pre_attn_scalar", float(value)),),
                )
            )
    slides = [cfg.layer_types[i] for i in range(cfg.num_hidden_layers)]
    if len(set(slides)) > 1:
        swapped = tuple(GLOBAL if t != GLOBAL else SLIDING for t in slides)
        out.append(
            Mistake(
                "sliding_layers=odd",
                "the sliding window on the other layers (1, 3, 5, ... instead of 0, 2, 4, ...)",
                REFS["sliding_layers"],
                config=(("layer_types", swapped),),
            )
        )
    for theta in (1e4, 1e5, 5e5, 1e6):
        if theta != cfg.rope_theta:
            out.append(
                Mistake(
                    f"rope_theta={theta:.0e}".replace("e+0", "e"),
                    f"RoPE base {theta:g} instead of {cfg.rope_theta:g} (another family's config default)",
                    REFS["rope_theta"],
                    config=(("rope_theta", theta),),
                )
            )
    out.append(
        Mistake(
            "rope_layout=interleaved",
            "RoPE rotates pairs (2i, 2i+1) instead of (i, i + head_dim/2)",
            REFS["rope_layout"],
            layout="rope_interleaved",
        )
    )
    if 1 < cfg.num_key_value_heads < cfg.num_attention_heads:
        out.append(
            Mistake(
                "gqa_mapping=tiled",
                "query head h uses kv head h % K instead of h // (H/K) (repeat where repeat_interleave is right)",
                REFS["gqa_mapping"],
                layout="gqa_tiled",
            )
        )
    out += [
        Mistake(
            "normalizer_dtype=bfloat16",
            "embedding normalizer sqrt(D) rounded to bfloat16 while the rest "
            "computes in higher precision (correct for a bfloat16 backend, a mistake for a float32 one)",
            REFS["normalizer"],
            normalizer="bfloat16",
        ),
        Mistake(
            "normalizer_dtype=float64",
            "embedding normalizer sqrt(D) never rounded to the activation "
            "dtype (a bfloat16 run of the 9B multiplies by 59.75, not sqrt(3584) = 59.87)",
            REFS["normalizer"],
            normalizer="float64",
        ),
        Mistake(
            "embed_unscaled",
            "embedding not multiplied by sqrt(D) (a port from Llama)",
            REFS["embed_unscaled"],
            normalizer="unscaled",
        ),
    ]
    if np.float32(round(math.sqrt(cfg.hidden_size), 2)) != np.float32(math.sqrt(cfg.hidden_size)):
        out.append(
            Mistake(
                "normalizer_decimals=2",
                f"embedding normalizer sqrt(D) rounded to two decimals, a constant of the exported graph "
                f"({round(math.sqrt(cfg.hidden_size), 2):g} for sqrt({cfg.hidden_size}) = "
                f"{math.sqrt(cfg.hidden_size):.6g})",
                REFS["normalizer_decimals"],
                normalizer="decimals2",
            )
        )
    out += [
        Mistake(
            "norm_offset=0",
            "RMSNorm scale w instead of (1 + w): the +1 forgotten",
            REFS["norm_offset"],
            norm_shift=-1.0,
        ),
        Mistake(
            "norm_offset=2",
            "RMSNorm scale (2 + w): the +1 applied twice (at conversion and at run time)",
            REFS["norm_offset"],
            norm_shift=1.0,
        ),
        Mistake(
            "norm_swap",
            "the post-attention norm's weight used as the pre-feed-forward norm and the other way "
            "round (HF's post_attention_layernorm read as Llama's, where that name is the pre-FFN norm)",
            REFS["norm_swap"],
            norm_swap=True,
        ),
        Mistake(
            "no_post_attn_norm",
            "the attention output added to the residual stream without the "
            "post-attention RMSNorm (the Gemma 1 / Llama layer reused)",
            REFS["post_norm"],
            config=(("post_attn_norm", False),),
        ),
        Mistake(
            "no_post_ffw_norm",
            "the MLP output added to the residual stream without the post-feed-forward "
            "RMSNorm (the Gemma 1 / Llama layer reused)",
            REFS["post_norm"],
            config=(("post_ffw_norm", False),),
        ),
        Mistake(
            "exact_gelu",
            "exact erf GELU instead of the tanh approximation",
            REFS["gelu"],
            config=(("hidden_activation", "gelu"),),
        ),
        Mistake(
            "logits_shifted",
            "the logits before the final soft-cap shifted by a per-row constant (the "
            "unembedding centred, as TransformerLens's center_unembed does): the soft-cap is not "
            "shift-invariant, so the probabilities change",
            REFS["logits_shifted"],
            step="logits_shifted",
        ),
        Mistake(
            "norm_cast_before_scale",
            "RMSNorm's normalised x cast to the activation dtype before the (1 + w) "
            "multiply (Llama's order) instead of after (only a low-precision run shows it)",
            REFS["norm_cast_before_scale"],
            step="norm_cast_before_scale",
        ),
        Mistake(
            "norm_scale_in_bf16",
            "RMSNorm's scale (1 + w) computed and rounded in bfloat16 instead of float32",
            REFS["norm_scale_in_bf16"],
            step="norm_scale_in_bf16",
        ),
        Mistake(
            "norm_variance_in_bf16",
            "RMSNorm's mean of squares accumulated in bfloat16 (every square and "
            "running sum rounded) instead of float32",
            REFS["norm_variance_in_bf16"],
            step="norm_variance_in_bf16",
        ),
        Mistake(
            "padding_not_masked",
            "a padded batch run without its attention mask: padding tokens are attended and shift the positions",
            REFS["padding"],
            padding="unmasked",
        ),
    ]
    if SLIDING in cfg.layer_types and W > 1:
        out += [
            Mistake(
                "decode_ring_off_by_one",
                "the KV cache's ring one slot short (W - 1 slots): a decode step "
                "writes its key over the oldest key still inside the window, so each decode query sees W - 1 "
                "keys",
                REFS["ring"],
                decode="ring_off_by_one",
            ),
            Mistake(
                "decode_window_ignored",
                "after the prefill a sliding layer keeps every key and attends to "
                "all of them (the cache ignores the window)",
                REFS["cache_window"],
                decode="window_ignored",
            ),
        ]
        out += [
            Mistake(
                "decode_window_from_query",
                "in a decode step the sliding mask is built from the query length "
                "(1): a sliding layer's step sees only its own key",
                REFS["decode_window_from_query"],
                decode="window_from_query",
            ),
            Mistake(
                "decode_positions_from_sliding_cache",
                f"the decode position read from a sliding layer's cache "
                f"length, which stops at the window: every step past it rotated by RoPE at position {W}",
                REFS["decode_positions_from_sliding_cache"],
                decode="positions_from_sliding_cache",
            ),
            Mistake(
                "prefill_chunk_overflows_ring",
                "a prefill chunk longer than the window written into the "
                "sliding layers' ring (2W slots) before its queries attend: the first queries of the chunk "
                "lose the previous chunk's keys still inside their window (only a chunked prefill shows it)",
                REFS["prefill_chunk_overflows_ring"],
                decode="chunk_overflows_ring",
            ),
        ]
    out += [
        Mistake(
            "decode_unmasked_slots",
            "a static cache's unfilled slots not masked: their zero keys and values attended",
            REFS["static_cache"],
            decode="unmasked_slots",
        ),
        Mistake(
            "decode_positions_stuck",
            "positions not advancing in decode: every step rotated by RoPE at the first decode step's position",
            REFS["positions"],
            decode="positions_stuck",
        ),
        Mistake(
            "no_bos", "the input lacks the leading <bos> every Gemma sequence starts with", REFS["no_bos"], ids="no_bos"
        ),
        Mistake(
            "double_bos",
            "the input starts with <bos><bos> (a chat template's <bos> plus an added one)",
            REFS["double_bos"],
            ids="double_bos",
        ),
    ]
    return out


# Named by diagnose from the reference's range, never re-run: no transform of the model makes it.
FP16_OVERFLOW = Mistake(
    "fp16_overflow",
    "activations beyond float16's +-65504 become Inf (or are clipped) in a float16 run",
    REFS["fp16_overflow"],
)


def catalogue(cfg) -> list[Mistake]:
    """Every mistake diagnose can name for this model: those it re-runs (known_mistakes), then fp16_overflow."""
    return known_mistakes(cfg) + [FP16_OVERFLOW]

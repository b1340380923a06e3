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
                        stop advancing, a sliding layer keeping every key (generate.py makes each, through
                        the cache: only a decode case, `generate.decode_taps`, shows them)
    the normalizer      sqrt(D) rounded to another dtype than the activations' (model.embed's argument:
                        config and weights cannot express it)

    bad = inject(model, "drop_attn_softcap")        # a Model that makes the mistake
    bad.logits(ids)                                 # (and the ids through mistake.apply_ids for input ones)

Because a mistaken model is just another model, it runs everywhere the correct one does: taps, goldens, and a
KV-cache decode (a window mistake sizes its ring buffers from the changed config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..model.config import GLOBAL, SLIDING
from ..storage.loader import Model
from ..model.inputs import padded_positions
from ..model.tokenizer import BOS

WINDOW_REFS = "llama.cpp #8227, transformers #32522 / #35681 / #39408, keras-hub #2186"
SCALE_REFS = ("9B 224 for 256: transformers #31891, llama.cpp #8444, gemma_pytorch #71; "
              "27B head_dim for 144: ferrox #40")


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
    normalizer: str | None = None  # model.embed's normalizer: "bfloat16", "float64", "unscaled"
    layout: str | None = None  # "rope_interleaved" / "gqa_tiled": permuted weights (see tap_view)
    padding: str | None = None  # "unmasked": a padded batch run without its mask (padding attended)
    decode: str | None = None  # a decode-loop mistake (generate.DECODE_MISTAKES): only a KV-cache decode shows it

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
        for what, value in (("norms", self.norm_shift), ("ids", self.ids != "same"),
                            ("normalizer", self.normalizer), ("layout", self.layout), ("padding", self.padding),
                            ("decode", self.decode)):
            if value:
                touched.add(what)
        return touched


def combine(a: Mistake, b: Mistake) -> Mistake:
    """Both mistakes at once (they must touch different things: see Mistake.changes)."""
    return Mistake(f"{a.name} + {b.name}", f"{a.what}; and {b.what}", f"{a.refs}; {b.refs}",
                   a.config + b.config, a.norm_shift + b.norm_shift, a.ids if a.ids != "same" else b.ids,
                   a.normalizer or b.normalizer, a.layout or b.layout, a.padding or b.padding, a.decode or b.decode)


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
    w = dataclasses.replace(w, q_proj=np.asarray(w.q_proj), k_proj=np.asarray(w.k_proj),  # a streamed layer's
                            o_proj=np.asarray(w.o_proj))  # projections are stored bf16 (fast.StoredWeight)
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


class MistakenModel(Model):
    """The correct forward on transformed config and weights; taps shown in the mistaken backend's layout."""

    def __init__(self, model: Model, mistake: "Mistake"):
        cfg = model.config.replace(**dict(mistake.config)) if mistake.config else model.config
        shift, layout = mistake.norm_shift, mistake.layout

        def layer_fn(w):
            if shift:
                w = dataclasses.replace(w, **{n: getattr(w, n) + getattr(w, n).dtype.type(shift) for n in NORMS})
            return _permute_layer(cfg, w, layout) if layout else w

        weights = model.weights
        if shift or layout:
            weights = TransformedWeights(weights, layer_fn, lambda w: w + w.dtype.type(shift) if shift else w)
        super().__init__(cfg, weights, model.dtype, model.path, mistake.normalizer or model.normalizer)
        self.mistake = mistake

    def forward(self, ids, taps=None, **kw):
        out = super().forward(ids, taps, **kw)
        return {n: tap_view(self.config, self.mistake.layout, n, v) for n, v in out.items()}


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
        Mistake("drop_attn_softcap", "attention scores not soft-capped at 50*tanh(s/50) (fast attention "
                "kernels without soft-capping)", "vLLM #5908 / #7419, llama.cpp #8156 / #8197, transformers #31887",
                config=(("attn_logit_softcapping", None),)),
        Mistake("drop_final_softcap", "logits not soft-capped at 30*tanh(x/30)",
                "llama.cpp #8156 / #8197 (GGUFs converted before the soft-cap keys existed)",
                config=(("final_logit_softcapping", None),)),
        Mistake("no_sliding_window", f"sliding-window layers attend globally (only visible beyond the window "
                f"of {W})", WINDOW_REFS, config=(("layer_types", (GLOBAL,) * cfg.num_hidden_layers),)),
        Mistake("window_offset=+1", "sliding window off by one: a query also sees the key exactly `window` "
                "back", WINDOW_REFS, config=(("sliding_window", W + 1),)),
    ]
    if W > 1:
        out.append(Mistake("window_offset=-1", "sliding window off by one: a query sees one key fewer",
                           WINDOW_REFS, config=(("sliding_window", W - 1),)))
    scales = {"head_dim": cfg.head_dim, "224": 224, "256": 256,
              "hidden_size/heads": cfg.hidden_size / cfg.num_attention_heads}
    seen = {float(cfg.query_pre_attn_scalar)}
    for label, value in scales.items():
        if float(value) not in seen:
            seen.add(float(value))
            out.append(Mistake(f"query_scale={label}" + (f" ({value:g})" if not label.isdigit() else ""),
                               f"scores scaled by {value:g}^-0.5 instead of query_pre_attn_scalar "
                               f"{cfg.query_pre_attn_scalar:g}^-0.5", SCALE_REFS,
                               config=(("query_pre_attn_scalar", float(value)),)))
    slides = [cfg.layer_types[i] for i in range(cfg.num_hidden_layers)]
    if len(set(slides)) > 1:
        swapped = tuple(GLOBAL if t != GLOBAL else SLIDING for t in slides)
        out.append(Mistake("sliding_layers=odd", "the sliding window on the other layers (1, 3, 5, ... instead of "
                           "0, 2, 4, ...)", "transformers #31775 / #31786 / #31848",
                           config=(("layer_types", swapped),)))
    for theta in (1e4, 1e5, 5e5, 1e6):
        if theta != cfg.rope_theta:
            out.append(Mistake(f"rope_theta={theta:.0e}".replace("e+0", "e"), f"RoPE base {theta:g} instead of "
                               f"{cfg.rope_theta:g} (another "
                               "family's config default)", "config defaults of other families",
                               config=(("rope_theta", theta),)))
    out.append(Mistake("rope_layout=interleaved", "RoPE rotates pairs (2i, 2i+1) instead of (i, i + head_dim/2)",
                       "Meta / GPT-J layout confusion in converters", layout="rope_interleaved"))
    if 1 < cfg.num_key_value_heads < cfg.num_attention_heads:
        out.append(Mistake("gqa_mapping=tiled", "query head h uses kv head h % K instead of h // (H/K) (repeat "
                           "where repeat_interleave is right)", "repeat vs repeat_interleave in GQA ports",
                           layout="gqa_tiled"))
    out += [
        Mistake("normalizer_dtype=bfloat16", "embedding normalizer sqrt(D) rounded to bfloat16 while the rest "
                "computes in higher precision (correct for a bfloat16 backend, a mistake for a float32 one)",
                "transformers #29402", normalizer="bfloat16"),
        Mistake("normalizer_dtype=float64", "embedding normalizer sqrt(D) never rounded to the activation "
                "dtype (a bfloat16 run of the 9B multiplies by 59.75, not sqrt(3584) = 59.87)", "transformers #29402",
                normalizer="float64"),
        Mistake("embed_unscaled", "embedding not multiplied by sqrt(D) (a port from Llama)", "porting from Llama",
                normalizer="unscaled"),
        Mistake("norm_offset=0", "RMSNorm scale w instead of (1 + w): the +1 forgotten",
                "gemma2-facts: RMSNorm (1 + w)", norm_shift=-1.0),
        Mistake("norm_offset=2", "RMSNorm scale (2 + w): the +1 applied twice (at conversion and at run time)",
                "gemma2-facts: RMSNorm (1 + w)", norm_shift=1.0),
        Mistake("no_post_attn_norm", "the attention output added to the residual stream without the "
                "post-attention RMSNorm (the Gemma 1 / Llama layer reused)", "porting from Gemma 1",
                config=(("post_attn_norm", False),)),
        Mistake("no_post_ffw_norm", "the MLP output added to the residual stream without the post-feed-forward "
                "RMSNorm (the Gemma 1 / Llama layer reused)", "porting from Gemma 1",
                config=(("post_ffw_norm", False),)),
        Mistake("exact_gelu", "exact erf GELU instead of the tanh approximation",
                "transformers #29402 (GeGLU with the tanh approximation)", config=(("hidden_activation", "gelu"),)),
        Mistake("padding_not_masked", "a padded batch run without its attention mask: padding tokens are "
                "attended and shift the positions", "transformers #32848", padding="unmasked"),
    ]
    if SLIDING in cfg.layer_types and W > 1:
        out += [
            Mistake("decode_ring_off_by_one", "the KV cache's ring one slot short (W - 1 slots): a decode step "
                    "writes its key over the oldest key still inside the window, so each decode query sees W - 1 "
                    "keys", "ring-buffer KV caches (no public bug number recorded)", decode="ring_off_by_one"),
            Mistake("decode_window_ignored", "after the prefill a sliding layer keeps every key and attends to "
                    "all of them (the cache ignores the window)", "transformers #31775 / #31848",
                    decode="window_ignored"),
        ]
    out += [
        Mistake("decode_unmasked_slots", "a static cache's unfilled slots not masked: their zero keys and values "
                "attended", "transformers #31953 / #32188 (static cache)", decode="unmasked_slots"),
        Mistake("decode_positions_stuck", "positions not advancing in decode: every step rotated by RoPE at the "
                "first decode step's position", "decode loops (no public bug number recorded)",
                decode="positions_stuck"),
        Mistake("no_bos", "the input lacks the leading <bos> every Gemma sequence starts with",
                "lm-evaluation-harness #2049 (add_bos_token)", ids="no_bos"),
        Mistake("double_bos", "the input starts with <bos><bos> (a chat template's <bos> plus an added one)",
                "lm-evaluation-harness #3333, llama-cpp-python #1561", ids="double_bos"),
    ]
    return out

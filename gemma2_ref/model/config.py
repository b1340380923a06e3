"""Gemma 2 hyper-parameters: the released presets, and parsing of Hugging Face `config.json`.

Every number the forward pass uses comes from a `Gemma2Config`. Values are read from the checkpoint's
`config.json`, never assumed; the presets below copy the released `config.json` files of
google/gemma-2-2b, -9b and -27b.

`config.json` exists in two formats and both are accepted:
  * original (transformers 4.42): `rope_theta`, `hidden_act`/`hidden_activation`,
    `cache_implementation: "hybrid"`, `eos_token_id: [1, 107]`;
  * newer (transformers 5.x): `rope_parameters: {"rope_type": "default", "rope_theta": ...}`,
    `layer_types: ["sliding_attention", "full_attention", ...]`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from .jsonfile import JSONFileError, read_json, shown
from .tokenizer import BOS, END_OF_TURN, EOS, PAD

SLIDING = "sliding_attention"
GLOBAL = "full_attention"

HIDDEN_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # Gemma 2's, and the exact GELU a port may wrongly use

# The paper counts a 256128-row vocabulary; the released embeddings have 256000 rows.
PAPER_VOCAB_SIZE = 256128


class ConfigError(ValueError):
    """A config.json that gemma2_ref cannot run faithfully. The message names the key."""


class ConfigWarning(UserWarning):
    """A config.json that runs, but not as the released Gemma 2 does. The message names the key."""


@dataclass(frozen=True)
class Gemma2Config:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F: gate and up are each (F, D); the paper's "feedforward dim" is 2F
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # K: each kv head serves H/K query heads
    head_dim: int  # Dh
    query_pre_attn_scalar: float  # scores are scaled by query_pre_attn_scalar ** -0.5
    sliding_window: int  # a sliding layer's query at i sees keys j with i - window < j <= i
    layer_types: tuple[str, ...]  # SLIDING or GLOBAL per layer
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"  # GELU, tanh approximation; "gelu" is the exact erf GELU
    max_position_embeddings: int = 8192
    pad_token_id: int = PAD
    eos_token_ids: tuple[int, ...] = (EOS, END_OF_TURN)
    bos_token_id: int = BOS
    # Gemma 2's layer normalises each sub-block's output before the residual add; False is the Gemma 1 (and
    # Llama) layer without that norm: no config.json says so, a port that reused Gemma 1 code runs it
    post_attn_norm: bool = True
    post_ffw_norm: bool = True

    def __post_init__(self):
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"`{key}` must be a positive integer, found {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"`head_dim` must be even for RoPE's half-split layout, found {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}"
            )
        if not all(isinstance(t, str) for t in self.layer_types):
            raise ConfigError(
                f"`layer_types` must be strings ({SLIDING!r} or {GLOBAL!r}), found {shown(list(self.layer_types))}"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, GLOBAL})
        if bad:
            raise ConfigError(f"`layer_types` has unknown kinds {bad}; expected {SLIDING!r} or {GLOBAL!r}")
        if self.hidden_activation not in HIDDEN_ACTIVATIONS:
            raise ConfigError(
                f"`hidden_activation` must be one of {HIDDEN_ACTIVATIONS}, found {self.hidden_activation!r}"
            )
        for key in ("query_pre_attn_scalar", "rope_theta", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"`{key}` must be a positive finite number, found {value!r}")
        if not (
            isinstance(self.rms_norm_eps, (int, float)) and math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0
        ):
            raise ConfigError(f"`rms_norm_eps` must be a finite number >= 0, found {self.rms_norm_eps!r}")
        if not isinstance(self.max_position_embeddings, int) or self.max_position_embeddings <= 0:
            raise ConfigError(
                f"`max_position_embeddings` must be a positive integer, found {self.max_position_embeddings!r}"
            )

    # -- derived quantities -------------------------------------------------------------------
    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def window(self, layer: int) -> int | None:
        """The layer's attention window, or None for a global (full causal) layer."""
        return self.sliding_window if self.is_sliding(layer) else None

    def parameter_counts(self, vocab_size: int | None = None) -> dict[str, int]:
        """Embedding and non-embedding parameters (the embedding is tied: counted once)."""
        V, D, F = vocab_size or self.vocab_size, self.hidden_size, self.intermediate_size
        H, K, Dh = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attention = D * H * Dh + 2 * D * K * Dh + H * Dh * D  # q, k, v, o
        mlp = 3 * D * F  # gate, up, down
        norms = 4 * D  # pre/post attention, pre/post feed-forward
        per_layer = attention + mlp + norms
        non_embedding = self.num_hidden_layers * per_layer + D  # + final norm
        return {
            "embedding": V * D,
            "non_embedding": non_embedding,
            "total": V * D + non_embedding,
            "per_layer": per_layer,
        }

    # -- Hugging Face config.json -------------------------------------------------------------
    def to_hf_dict(self, style: str = "new") -> dict:
        """A `config.json` dict that transformers' Gemma2Config reads; `style` "new" (5.x) or "old" (4.42)."""
        d = {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": self.hidden_activation,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        if style == "new":
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
            d["layer_types"] = list(self.layer_types)
        elif style == "old":
            d["rope_theta"] = self.rope_theta
            d["hidden_act"] = self.hidden_activation
            d["cache_implementation"] = "hybrid"
            if list(self.layer_types) != alternating_layer_types(self.num_hidden_layers):
                raise ConfigError("the original config.json format cannot express non-alternating layer_types")
        else:
            raise ValueError(f"style must be 'new' or 'old', not {style!r}")
        return d

    def replace(self, **changes) -> Gemma2Config:
        return dataclasses.replace(self, **changes)


def alternating_layer_types(num_layers: int) -> list[str]:
    """Gemma 2's pattern: even layers (0, 2, ...) slide, odd layers (1, 3, ...) are global."""
    return [SLIDING if i % 2 == 0 else GLOBAL for i in range(num_layers)]


def _preset(**kw) -> Gemma2Config:
    kw.setdefault("layer_types", tuple(alternating_layer_types(kw["num_hidden_layers"])))
    return Gemma2Config(**kw)


PRESETS: dict[str, Gemma2Config] = {
    "2b": _preset(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
    ),
    "9b": _preset(
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
    ),
    "27b": _preset(
        vocab_size=256000,
        hidden_size=4608,
        intermediate_size=36864,
        num_hidden_layers=46,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
        sliding_window=4096,
    ),
    # The bundled tiny model (gemma2_ref/data/tiny): both layer kinds, GQA, a small window, and like 27B a
    # query_pre_attn_scalar (= D / H) different from head_dim and H x Dh different from D.
    "tiny": _preset(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        query_pre_attn_scalar=32,
        sliding_window=32,
        max_position_embeddings=512,
    ),
}


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "query_pre_attn_scalar",
)
_TANH_GELU = {"gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"}


def config_from_hf_dict(d: dict, source: str = "config.json") -> Gemma2Config:
    """Parse a Hugging Face Gemma 2 `config.json` (either format). Errors name `source` and the key."""
    try:
        check_is_gemma2(d)
        rope_theta = rope_theta_of(d)
        check_gemma2_choices(d)
        layer_types, eos = layer_types_of(d), eos_token_id_list(d)
        sliding_window = d.get("sliding_window", 4096)
        if sliding_window is None:
            raise ConfigError("`sliding_window` is null; Gemma 2's even layers need a window (4096 in the release)")
        cache_impl = d.get("cache_implementation")
        if cache_impl not in (None, "hybrid"):
            raise ConfigError(f"`cache_implementation` is {cache_impl!r}; Gemma 2's is 'hybrid' (sliding + global)")
        warn_null_softcaps(d, source)
        return Gemma2Config(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            head_dim=d["head_dim"],
            query_pre_attn_scalar=_number(d, "query_pre_attn_scalar", None, float),
            sliding_window=sliding_window,
            layer_types=layer_types,
            attn_logit_softcapping=_number(d, "attn_logit_softcapping", 50.0, float),
            final_logit_softcapping=_number(d, "final_logit_softcapping", 30.0, float),
            rope_theta=rope_theta,
            rms_norm_eps=_number(d, "rms_norm_eps", 1e-6, float),
            max_position_embeddings=_number(d, "max_position_embeddings", 8192, int),
            pad_token_id=_number(d, "pad_token_id", PAD, int) or PAD,
            eos_token_ids=tuple(_number({"eos_token_id": t}, "eos_token_id", None, int) for t in eos),
            bos_token_id=_number(d, "bos_token_id", BOS, int),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def check_is_gemma2(d) -> None:
    """A JSON object describing a Gemma 2 text model, with every key that has no default."""
    if not isinstance(d, dict):
        raise ConfigError("expected a JSON object")
    if "text_config" in d and "model_type" in d and d["model_type"] != "gemma2":
        raise ConfigError(f"`model_type` is {d['model_type']!r}: a multimodal wrapper, not a Gemma 2 text model")
    model_type = d.get("model_type")
    if model_type != "gemma2":
        raise ConfigError(f'`model_type` is {model_type!r}; gemma2_ref runs Gemma 2 (`model_type: "gemma2"`) only')
    missing = [k for k in _REQUIRED if k not in d or d[k] is None]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(f'`{k}`' for k in missing)}")


def rope_theta_of(d: dict) -> float:
    """The RoPE base: `rope_theta` (old) and/or `rope_parameters` (new), which must agree; plain RoPE, no
    scaling."""
    rope_parameters = d.get("rope_parameters")
    theta_new = None
    if rope_parameters is not None:
        if not isinstance(rope_parameters, dict):
            raise ConfigError(f"`rope_parameters` must be an object, found {rope_parameters!r}")
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"`rope_parameters.rope_type` is {rope_type!r}; Gemma 2 uses plain ('default') RoPE")
        theta_new = rope_parameters.get("rope_theta")
    rope_scaling = d.get("rope_scaling")
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise ConfigError(
            f"`rope_scaling` must be an object or null, found {shown(rope_scaling)}; Gemma 2 uses no RoPE "
            f"scaling (null)"
        )
    if rope_scaling not in (None, {}) and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise ConfigError(f"`rope_scaling` is {rope_scaling!r}; Gemma 2 uses no RoPE scaling")
    theta_old = _number(d, "rope_theta", None, float)
    theta_new = _number({"rope_parameters.rope_theta": theta_new}, "rope_parameters.rope_theta", None, float)
    if theta_old is not None and theta_new is not None and theta_old != theta_new:
        raise ConfigError(
            f"contradictory RoPE base: `rope_theta` is {theta_old} but `rope_parameters.rope_theta` is {theta_new}"
        )
    return theta_new if theta_new is not None else theta_old if theta_old is not None else 10000.0


def check_gemma2_choices(d: dict) -> None:
    """What every Gemma 2 fixes: the tanh GELU (`hidden_activation`, newer, and `hidden_act`, older), the
    output head tied to the embedding, no projection bias."""
    acts = {k: d[k] for k in ("hidden_activation", "hidden_act") if d.get(k) is not None}
    for key, act in acts.items():
        if not isinstance(act, str) or act not in _TANH_GELU:
            raise ConfigError(f"`{key}` is {act!r}; Gemma 2 uses the tanh approximation of GELU ('gelu_pytorch_tanh')")
    if d.get("tie_word_embeddings", True) is False:
        raise ConfigError("`tie_word_embeddings` is false; Gemma 2 ties the output head to the embedding")
    if d.get("attention_bias", False):
        raise ConfigError("`attention_bias` is true; Gemma 2's projections have no bias")


def layer_types_of(d: dict) -> tuple[str, ...]:
    """`layer_types` as given (checked by Gemma2Config), or Gemma 2's alternation (sliding first)."""
    num_layers, layer_types = d["num_hidden_layers"], d.get("layer_types")
    if layer_types is None:
        return tuple(alternating_layer_types(num_layers) if isinstance(num_layers, int) else [])
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ConfigError(
            f"`layer_types` must be a list of strings ({SLIDING!r} or {GLOBAL!r}), found {shown(layer_types)}"
        )
    return tuple(layer_types)


def eos_token_id_list(d: dict) -> list:
    """`eos_token_id` as a list: one id or a non-empty list of them (default <eos> and <end_of_turn>); each
    item is checked as an integer where the config is built."""
    eos = d.get("eos_token_id", [EOS, END_OF_TURN])
    if isinstance(eos, list) and (not eos or any(t is None for t in eos)):
        raise ConfigError(f"`eos_token_id` must be an integer or a non-empty list of integers, found {shown(eos)}")
    return eos if isinstance(eos, list) else [eos]


def warn_null_softcaps(d: dict, source: str) -> None:
    """A soft-cap given as null runs the model without it: allowed (a config study), but said."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key in d and d[key] is None:
            warnings.warn(
                ConfigWarning(
                    f"{source}: `{key}` is null: this model runs without Gemma 2's "
                    f"{'attention' if key.startswith('attn') else 'final'} soft-cap (the release uses "
                    f"{50.0 if key.startswith('attn') else 30.0}), so it is not Gemma 2 and its goldens will not match "
                    f"one"
                ),
                stacklevel=3,  # the caller of config_from_hf_dict
            )


def _number(d: dict, key: str, default, kind):
    """d[key] (or `default` when absent) as `kind` (int or float); null stays None. Errors name the key."""
    value = d.get(key, default)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not (math.isfinite(value) and value == int(value)))
    ):
        raise ConfigError(f"`{key}` must be {'an integer' if kind is int else 'a number'}, found {value!r}")
    return kind(value)


def load_config(path_or_preset: str | Path) -> Gemma2Config:
    """A preset name ("2b", "9b", "27b", "tiny"), a checkpoint directory, or a config.json path."""
    name = str(path_or_preset)
    if name in PRESETS and not Path(name).exists():
        return PRESETS[name]
    path = Path(path_or_preset)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json here, and {name!r} is not a preset (presets: {', '.join(PRESETS)})")
    try:
        data = read_json(path)
    except JSONFileError as e:
        raise ConfigError(str(e)) from None
    return config_from_hf_dict(data, source=str(path))

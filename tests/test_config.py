"""config.json parsing: both released formats, presets, and an error naming the key for anything else."""

import json

import pytest

import gemma2_ref as g2
from gemma2_ref.config import ConfigError, config_from_hf_dict, load_config

# google/gemma-2-9b's config.json as released (transformers 4.42 format)
ORIGINAL_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "sliding_window_size": 4096,
    "torch_dtype": "float32",
    "transformers_version": "4.42.0.dev0",
    "use_cache": True,
    "vocab_size": 256000,
}


def test_the_original_format_parses_to_the_9b_preset():
    assert config_from_hf_dict(ORIGINAL_9B) == g2.PRESETS["9b"].replace(eos_token_ids=(1,))


@pytest.mark.parametrize("name", ["2b", "9b", "27b", "tiny"])
@pytest.mark.parametrize("style", ["old", "new"])
def test_both_formats_round_trip_every_preset(name, style):
    cfg = g2.PRESETS[name]
    assert config_from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict(style)))) == cfg


@pytest.mark.parametrize("style", ["old", "new"])
def test_transformers_reads_our_config_json_as_the_same_model(style):
    from transformers import Gemma2Config as HF

    cfg = g2.PRESETS["27b"]
    hf = HF(**cfg.to_hf_dict(style))
    assert hf.layer_types == list(cfg.layer_types)
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert (hf.query_pre_attn_scalar, hf.head_dim, hf.sliding_window) == (144, 128, 4096)
    assert config_from_hf_dict(hf.to_dict()) == cfg  # and we read transformers' 5.x output


def test_presets_have_the_released_sizes():
    sizes = {
        n: (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
            c.query_pre_attn_scalar,
        )
        for n, c in g2.PRESETS.items()
        if n != "tiny"
    }
    assert sizes == {
        "2b": (2304, 26, 8, 4, 256, 9216, 256),
        "9b": (3584, 42, 16, 8, 256, 14336, 256),
        "27b": (4608, 46, 32, 16, 128, 36864, 144),
    }
    for c in g2.PRESETS.values():
        assert [c.is_sliding(i) for i in range(4)] == [True, False, True, False]


def _bad(**changes):
    d = dict(ORIGINAL_9B)
    for k, v in changes.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="gemma"), "`model_type` is 'gemma'"),
        (dict(model_type="llama"), "Gemma 2"),
        (dict(head_dim=...), "missing required key(s) `head_dim`"),
        (dict(query_pre_attn_scalar=...), "`query_pre_attn_scalar`"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "contradictory RoPE base"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type"),
        (dict(hidden_activation="gelu"), "`hidden_activation` is 'gelu'"),
        (dict(hidden_act="silu"), "`hidden_act` is 'silu'"),
        (dict(tie_word_embeddings=False), "`tie_word_embeddings`"),
        (dict(attention_bias=True), "`attention_bias`"),
        (dict(num_key_value_heads=5), "multiple of `num_key_value_heads`"),
        (dict(layer_types=["sliding_attention"] * 3), "`layer_types` has 3 entries"),
        (dict(layer_types=["local"] * 42), "unknown kinds ['local']"),
        (dict(hidden_size=-3), "`hidden_size` must be a positive integer"),
        (dict(sliding_window=None), "`sliding_window` is null"),
        (dict(cache_implementation="static"), "`cache_implementation`"),
    ],
)
def test_a_bad_config_is_refused_with_a_message_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as e:
        config_from_hf_dict(_bad(**changes), source="x/config.json")
    assert message in str(e.value) and str(e.value).startswith("x/config.json: ")


def test_load_config_names_the_file_for_missing_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json here"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(tmp_path)


def test_parameter_counts_of_the_2b_preset():
    counts = g2.PRESETS["2b"].parameter_counts()
    assert counts["embedding"] == 256000 * 2304
    assert 2.0e9 < counts["non_embedding"] < 2.1e9

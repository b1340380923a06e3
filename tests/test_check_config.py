"""check-config: a converted model's hyper-parameters against the reference config.json, on GGUFs made by
llama.cpp's own converter and on config.json files, every difference named with its public report."""

import json

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref.adapters import llamacpp as adapter
from gemma2_ref.check_config import check
from gemma2_ref.data import bundled_path
from tests.helpers.llamacpp_cases import RANDOM_IDS, backends, random_checkpoint

SOFTCAP_KEYS = ["gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping"]


@pytest.fixture(scope="module")
def modules():
    return backends()


@pytest.fixture(scope="module")
def released(modules, tmp_path_factory):
    """(the random checkpoint, laid out like a released one; its f32 GGUF from llama.cpp's converter)."""
    ckpt = random_checkpoint(tmp_path_factory.mktemp("released") / "random")
    return ckpt, adapter.convert(ckpt, "f32")


@pytest.fixture(scope="module")
def tiny_gguf(modules):
    return adapter.convert(bundled_path("tiny"), "f32")


def llama_tokenize(llama_cpp, gguf_path, text: str) -> list[int]:
    """llama.cpp's own tokenizer (special tokens parsed, BOS added as the GGUF says)."""
    adapter.quiet_llama_logs()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        buf = (llama_cpp.llama_token * 256)()
        n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, True, True)
        return list(buf[:n])
    finally:
        llama_cpp.llama_model_free(model)


def without_keys(gguf, src, dst, keys):
    """A copy of a GGUF without some metadata keys, written by gguf-py's own gguf-new-metadata code."""
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    copy_with_new_metadata(reader, gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess), {}, keys)
    return dst


def test_a_gguf_converted_from_a_released_layout_matches(released):
    ckpt, gguf_path = released
    report = check(ckpt, gguf_path)
    assert report.exit_code == 0, report.format()
    assert report.candidate_kind == "gguf"
    # what the format cannot say is resolved the way llama.cpp resolves it, and said so
    scalar = report.field("query_pre_attn_scalar")
    assert scalar.status == "default" and "gemma2.cpp:25-27" in scalar.note
    assert report.field("sliding_layers").candidate == [0, 2]
    as_json = json.loads(report.to_json())
    assert as_json["exit_code"] == 0 and all(f["ok"] for f in as_json["fields"])


def test_the_bundled_tiny_gguf_is_named_for_its_query_scale_eos_and_unmarked_chat_tokens(modules, tiny_gguf):
    """The tiny checkpoint ships tokenizer.model only and a query_pre_attn_scalar (32) != head_dim (64)."""
    report = check(bundled_path("tiny"), tiny_gguf)
    assert report.exit_code == 1
    assert [f.name for f in report.failed] == ["query_pre_attn_scalar", "eos_token_id", "special_tokens"]
    assert report.field("query_pre_attn_scalar").candidate == 64.0
    assert "llama.cpp #8444" in report.field("query_pre_attn_scalar").report
    assert report.field("eos_token_id").candidate == 2  # llama.cpp's SentencePiece default: Gemma's <bos>
    special = report.field("special_tokens")
    assert "106 <start_of_turn> NORMAL" in special.note and "llama.cpp #8244" in special.report
    text = report.format()
    assert "FAIL special_tokens" in text and "MISMATCH" in text


def test_unmarked_chat_tokens_really_are_split_by_llamacpp(modules, released, tiny_gguf):
    """What check-config's special_tokens line predicts, seen in llama.cpp's tokenizer."""
    llama_cpp, _ = modules
    text = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ours = g2.load_tokenizer("tiny").encode(text, bos=True)
    assert ours[:2] == [2, 106]
    assert llama_tokenize(llama_cpp, released[1], text) == ours
    split = llama_tokenize(llama_cpp, tiny_gguf, text)
    assert 106 not in split and split != ours


def test_a_gguf_without_softcap_keys_is_named_with_the_reports(modules, released, tmp_path):
    llama_cpp, gguf = modules
    ckpt, good = released
    old = without_keys(gguf, good, tmp_path / "old.gguf", SOFTCAP_KEYS)
    report = check(ckpt, old)
    assert report.exit_code == 1
    assert [f.name for f in report.failed] == ["attn_logit_softcapping", "final_logit_softcapping"]
    for f in report.failed:
        assert f.status == "missing" and f.key in SOFTCAP_KEYS
        assert all(r in f.report for r in ("llama.cpp #8197", "vLLM #30427", "transformers #42881"))
    # llama.cpp itself falls back to 50 / 30 (src/llama-hparams.h:134,136): its logits do not change
    ids = RANDOM_IDS[:10]
    cfg = g2.load_config(ckpt)
    a = adapter.run_gguf(good, ids, cfg, taps=["logits"])["logits"]
    b = adapter.run_gguf(old, ids, cfg, taps=["logits"])["logits"]
    np.testing.assert_array_equal(a, b)


def test_a_config_json_with_wrong_values_is_named(tmp_path):
    tiny = bundled_path("tiny")
    config = json.loads((tiny / "config.json").read_text())
    assert check(tiny, tiny / "config.json").exit_code == 0
    config["final_logit_softcapping"] = None  # a loader that dropped the cap (vLLM #30427, transformers #42881)
    config["query_pre_attn_scalar"] = 224  # the 9B value once used everywhere (transformers #31891)
    config["layer_types"] = ["full_attention"] * 4  # no sliding window
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = check(tiny, tmp_path / "config.json")
    assert report.exit_code == 1 and report.candidate_kind == "config.json"
    failed = {f.name: f for f in report.failed}
    assert set(failed) == {"final_logit_softcapping", "query_pre_attn_scalar", "sliding_layers"}
    assert failed["final_logit_softcapping"].status == "missing"
    assert "transformers #42881" in failed["final_logit_softcapping"].report
    assert failed["query_pre_attn_scalar"].candidate == 224.0
    assert failed["sliding_layers"].candidate == [] and "llama.cpp #8227" in failed["sliding_layers"].report


def test_unreadable_inputs_exit_2_and_name_the_file(modules, tmp_path):
    tiny = bundled_path("tiny")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 7)
    for candidate, words in (
        (junk, "junk.gguf"),
        (tmp_path / "absent.gguf", "no such file"),
        (tiny / "tokenizer.model", "neither a GGUF"),
    ):
        report = check(tiny, candidate)
        assert report.exit_code == 2 and words in report.error, report.error
    report = check(tmp_path / "nowhere", tiny / "config.json")
    assert report.exit_code == 2 and report.error.startswith("reference:")


def test_a_gguf_without_the_sliding_window_key_is_named_with_the_key(modules, released, tmp_path):
    """ollama #5341: GGUFs converted before the key existed; llama.cpp falls back to 4096, other loaders do not."""
    _, gguf = modules
    ckpt, good = released
    old = without_keys(gguf, good, tmp_path / "old.gguf", ["gemma2.attention.sliding_window"])
    report = check(ckpt, old)
    assert report.exit_code == 1
    failed = {f.name: f for f in report.failed}
    assert list(failed) == ["sliding_window"], report.format()
    assert failed["sliding_window"].key == "gemma2.attention.sliding_window"
    assert "ollama #5341" in failed["sliding_window"].report
    assert "gemma2.attention.sliding_window" in report.format()


@pytest.mark.parametrize("head_dim", ["derived", "absent"])
def test_a_head_dim_derived_as_hidden_size_over_heads_is_named(tmp_path, head_dim):
    """litgpt #1545: head_dim taken as hidden_size / heads (the tiny model: 128 / 4 = 32, its head_dim is 64)."""
    tiny = bundled_path("tiny")
    config = json.loads((tiny / "config.json").read_text())
    if head_dim == "derived":
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    else:
        del config["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = check(tiny, tmp_path / "config.json")
    failed = {f.name: f for f in report.failed}
    assert list(failed) == ["head_dim"] and "litgpt #1545" in failed["head_dim"].report, report.format()
    assert "128 / 4" in failed["head_dim"].note and failed["head_dim"].key == "head_dim"

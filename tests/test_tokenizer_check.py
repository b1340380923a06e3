"""The tokenizer check against independent tokenizers: Hugging Face's fast Gemma tokenizer (the `tokenizers`
library) converted from the same SentencePiece model, and llama.cpp's tokenizer through a GGUF. Each known
tokenizer mistake is made in one of them (its normalizer, pre-tokenizer or model edited, or llama.cpp's
special-token parsing off) and named from its ids alone; the clean ones name nothing."""

import json

import pytest

import gemma2_ref as g2
from gemma2_ref.cli import main as cli
from gemma2_ref.data import bundled_path
from gemma2_ref.verify import tokenizer_check as T


@pytest.fixture(scope="module")
def tok():
    return g2.load_tokenizer("tiny")


@pytest.fixture(scope="module")
def fast():
    """transformers' fast Gemma tokenizer, converted from the bundled tokenizer.model (GemmaConverter)."""
    return fast_tokenizer()


def fast_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_path("tiny"), add_bos_token=True, add_eos_token=False)


def fast_ids(fast, **kw):
    return [fast(text, **kw)["input_ids"] for text in T.TEXTS]


def test_the_reference_tokenizer_passes_against_itself(tok):
    report = T.check_tokenizer(tok, {"ids": [tok.encode(t) for t in T.TEXTS], "stop_ids": [1, 107]})
    assert report.passed and report.first_failure is None, report.format()


def test_the_fast_tokenizer_converted_from_the_same_model_gives_the_reference_ids(tok, fast):
    report = T.check_tokenizer(tok, {"ids": fast_ids(fast), "stop_ids": [1, 107]})
    assert report.passed, report.format()


def with_normalizer_prefix(fast):
    from tokenizers import normalizers

    fast.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(" ", "\u2581"), normalizers.Prepend("\u2581")]
    )
    return fast


def with_whitespace_split(fast):
    from tokenizers import Regex, pre_tokenizers

    fast.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581"), behavior="isolated")
    return fast


def edited(fast, edit):
    """The fast tokenizer with its `tokenizers` JSON edited by `edit(dict)`, as another converter writes it."""
    from tokenizers import Tokenizer

    model = json.loads(fast.backend_tokenizer.to_str())
    edit(model)
    fast._tokenizer = Tokenizer.from_str(json.dumps(model))
    return fast


def without_byte_fallback(fast):
    return edited(fast, lambda m: m["model"].update(byte_fallback=False))


def turn_tokens_unmarked(fast):
    """A converter that did not mark the turn tokens as added (special) tokens: BPE spells them."""

    def drop(m):
        m["added_tokens"] = [a for a in m["added_tokens"] if a["content"] not in ("<start_of_turn>", "<end_of_turn>")]

    return edited(fast, drop)


@pytest.mark.parametrize(
    "name, make, kw",
    [
        ("add_space_prefix", with_normalizer_prefix, {}),
        ("whitespace_runs_split", with_whitespace_split, {}),
        ("no_byte_fallback", without_byte_fallback, {}),
        ("special_tokens_not_parsed", turn_tokens_unmarked, {}),
    ],
)
def test_a_tokenizer_mistake_made_in_the_fast_tokenizer_is_named_at_its_first_text(name, make, kw):
    fresh = fast_tokenizer()
    report = T.check_tokenizer(g2.load_tokenizer("tiny"), {"ids": fast_ids(make(fresh), **kw)})
    assert not report.passed and report.mistakes and report.mistakes[0] == name, report.format()
    assert f"NAMED: {name}" in report.format() and "first difference: text" in report.format()


def test_stopping_on_the_fast_tokenizers_eos_only_is_named_and_transformers_generation_config_is_not(fast):
    """mlx-swift-examples #89: a chat loop that stops on the tokenizer's one eos id. Made with transformers'
    own objects: the fast tokenizer's eos_token_id alone is named; the stop ids transformers' GenerationConfig
    reads from the model's config.json ([1, 107]) pass."""
    from transformers import AutoConfig, GenerationConfig

    ids = fast_ids(fast)
    eos_only = T.check_tokenizer(g2.load_tokenizer("tiny"), {"ids": ids, "stop_ids": [fast.eos_token_id]})
    assert eos_only.mistakes == ["stop_without_end_of_turn"] and not eos_only.passed, eos_only.format()
    generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(bundled_path("tiny")))
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    clean = T.check_tokenizer(g2.load_tokenizer("tiny"), {"ids": ids, "stop_ids": stops})
    assert clean.passed and not clean.mistakes, clean.format()


def test_stopping_on_eos_only_is_named(tok):
    report = T.check_tokenizer(tok, {"ids": [tok.encode(t) for t in T.TEXTS], "stop_ids": [1]})
    assert report.mistakes == ["stop_without_end_of_turn"] and not report.passed


# -- llama.cpp's tokenizer, through the GGUF -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    from tests.helpers.backends import require
    from tests.helpers.llamacpp_cases import INSTALL_LLAMA

    return require("llama_cpp", INSTALL_LLAMA)


def llama_candidate(llama_cpp, gguf_path, special=True):
    from gemma2_ref.adapters import llamacpp as adapter

    adapter.quiet_llama_logs()
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    ids = [llm.tokenize(t.encode(), add_bos=True, special=special) for t in T.TEXTS]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    return {"ids": ids, "stop_ids": stops}


@pytest.fixture(scope="module")
def released_gguf(llama, tmp_path_factory):
    from gemma2_ref.adapters import llamacpp as adapter
    from tests.helpers.llamacpp_cases import random_checkpoint

    ckpt = random_checkpoint(tmp_path_factory.mktemp("released") / "random")
    return ckpt, adapter.convert(ckpt, "f32")


def test_llamacpp_on_a_released_layout_gguf_gives_the_reference_ids(llama, released_gguf):
    ckpt, gguf_path = released_gguf
    report = T.check_tokenizer(g2.load_tokenizer(ckpt), llama_candidate(llama, gguf_path))
    assert report.passed, report.format()


def test_llamacpp_without_special_token_parsing_is_named(llama, released_gguf):
    ckpt, gguf_path = released_gguf
    report = T.check_tokenizer(g2.load_tokenizer(ckpt), llama_candidate(llama, gguf_path, special=False))
    assert report.mistakes == ["special_tokens_not_parsed"], report.format()


def test_the_bundled_tiny_gguf_splits_start_of_turn(llama):
    """What check-config says of the tiny GGUF (chat tokens NORMAL), seen in llama.cpp's own ids: it spells
    <start_of_turn> in pieces (it parses <end_of_turn>, which it knows as an end-of-generation text, and stops
    on it: its stop ids are 1, 2 and 107, so no stop_without_end_of_turn)."""
    from gemma2_ref.adapters import llamacpp as adapter

    report = T.check_tokenizer(
        g2.load_tokenizer("tiny"), llama_candidate(llama, adapter.convert(bundled_path("tiny"), "f32"))
    )
    assert report.mistakes == ["special_tokens_not_parsed"] and 107 in report.stop_ids, report.format()


# -- the command and the bundled tokenizer's settings ----------------------------------------------------------


def test_the_command_prints_the_texts_and_exits_by_the_verdict(tok, tmp_path, capsys):
    assert cli(["check-tokenizer", "--texts"]) == 0
    assert json.loads(capsys.readouterr().out) == list(T.TEXTS)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"ids": [tok.encode(t) for t in T.TEXTS], "stop_ids": [1, 107]}))
    bad.write_text(json.dumps({"ids": [tok.encode(" " + t) for t in T.TEXTS]}))
    assert cli(["check-tokenizer", str(good)]) == 0
    assert cli(["check-tokenizer", str(bad)]) == 1 and "NAMED: add_space_prefix" in capsys.readouterr().out
    bad.write_text(json.dumps({"ids": [[2]]}))
    assert cli(["check-tokenizer", str(bad)]) == 2 and "key 'ids'" in capsys.readouterr().err


def test_the_bundled_tokenizer_differs_from_gemmas_settings_only_in_whitespace_runs():
    """Gemma's tokenizer: BPE, byte fallback, split digits, no dummy prefix, identity normalizer, whitespace
    runs as user-defined pieces, the control and turn tokens. The bundled one (scripts/build_tiny_tokenizer.py)
    has all but the whitespace runs: its space runs are ordinary BPE pieces (some lengths only), and it has no
    newline or tab runs at all."""
    differences = T.spec_differences(bundled_path("tiny") / "tokenizer.model")
    assert set(differences) == {"space_runs_user_defined", "newline_runs_user_defined", "tab_runs_user_defined"}

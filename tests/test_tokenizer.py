"""The tokenizer wrapper: Gemma's special ids, the one-BOS policy, round trips, and clear errors."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gemma2_ref as g2
from gemma2_ref.tokenizer import BOS, END_OF_TURN, EOS, PAD, START_OF_TURN, TokenizerError


@pytest.fixture(scope="module")
def tok():
    return g2.load_tokenizer("tiny")


def test_the_bundled_tokenizer_has_gemmas_special_ids(tok):
    assert (
        [tok.sp.PieceToId(p) for p in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")]
        == [PAD, EOS, BOS, START_OF_TURN, END_OF_TURN]
        == [0, 1, 2, 106, 107]
    )
    assert tok.vocab_size == g2.PRESETS["tiny"].vocab_size
    assert tok.stop_ids == (1, 107)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_encode_then_decode_gives_back_the_text(tok, text):
    assume(not any(s in text for s in ("<bos>", "<eos>", "<pad>", "<unk>", "<mask>")))
    ids = tok.encode(text, bos=True)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ["Hello", "<bos>Hello", "<bos><bos>Hello"])
def test_bos_true_gives_exactly_one_bos(tok, text):
    ids = tok.encode(text, bos=True)
    assert ids[0] == BOS and ids[1] != BOS and ids[1:] == tok.encode("Hello", bos=False)


def test_bos_false_adds_nothing_and_keeps_what_the_text_says(tok):
    assert BOS not in tok.encode("Hello", bos=False)
    assert tok.encode("<bos><bos>Hi", bos=False)[:2] == [BOS, BOS]  # a doubled BOS, on purpose


def test_turn_markers_in_text_become_their_ids(tok):
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n", bos=False)
    assert ids[0] == START_OF_TURN and END_OF_TURN in ids


def test_decode_can_show_or_hide_control_tokens(tok):
    ids = tok.encode("Hi", bos=True) + [EOS]
    assert tok.decode(ids) == "Hi"
    assert tok.decode(ids, skip_special=False) == "<bos>Hi<eos>"


def test_loading_by_directory_file_or_name(tmp_path):
    path = g2.resolve_checkpoint("tiny")
    assert g2.load_tokenizer(path).vocab_size == g2.load_tokenizer(path / "tokenizer.model").vocab_size
    with pytest.raises(TokenizerError, match="not a bundled model"):
        g2.load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        g2.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        g2.load_tokenizer(tmp_path)


def test_a_tokenizer_without_gemmas_special_ids_is_refused(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world"] * 50),
        model_writer=model,
        vocab_size=12,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(TokenizerError, match="Gemma expects"):
        g2.load_tokenizer(tmp_path)

"""Our chat formatting produces exactly the ids of Gemma 2's official chat template.

The template below is copied verbatim from `chat_template` in google/gemma-2-2b-it (and -9b-it, -27b-it)
`tokenizer_config.json`. It is rendered by transformers' own jinja renderer (the code behind
`apply_chat_template`), and the rendered text is tokenized the way a Hugging Face tokenizer does it:
special-token strings become their ids, the text between them goes through the SentencePiece model, and
no extra <bos> is added (the template writes one).
"""

import re

import jinja2
import pytest
import sentencepiece as spm
from transformers.utils.chat_template_utils import render_jinja_template

import gemma2_ref as g2
from gemma2_ref.tokenizer import BOS, END_OF_TURN, START_OF_TURN, TokenizerError

GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
SPECIAL = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")


def render(messages, add_generation_prompt=True) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=GEMMA2_CHAT_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        bos_token="<bos>",
        eos_token="<eos>",
    )
    return rendered[0]


@pytest.fixture(scope="module")
def tok():
    return g2.load_tokenizer("tiny")


@pytest.fixture(scope="module")
def hf_style_encode(tok):
    """Text -> ids as a Hugging Face tokenizer with Gemma's added special tokens does, add_special_tokens=False."""
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    splitter = re.compile("(" + "|".join(map(re.escape, SPECIAL)) + ")")

    def encode(text):
        ids = []
        for part in splitter.split(text):
            if part in SPECIAL:
                ids.append(sp.PieceToId(part))
            elif part:
                ids.extend(sp.EncodeAsIds(part))
        return ids

    return encode


CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is a sliding window?"}],
    "surrounding whitespace is trimmed": [{"role": "user", "content": "  \n Hello there!\n\n "}],
    "multi-turn with assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Explain RoPE in one line."},
    ],
    "multi-turn with model role": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "model", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "model", "content": "6"},
        {"role": "user", "content": "Thanks. Non-ASCII: café, 日本"},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_ids_equal_the_official_gemma2_template(tok, hf_style_encode, name):
    messages = CONVERSATIONS[name]
    rendered = render(messages)
    assert tok.chat_prompt(messages) == rendered
    ids = tok.encode_chat(messages)
    assert ids == hf_style_encode(rendered)
    assert ids.count(BOS) == 1 and ids[0] == BOS  # one <bos>: the template's, none added on top
    turns = len(messages) + 1  # + the generation prompt
    assert ids.count(START_OF_TURN) == turns and ids.count(END_OF_TURN) == len(messages)
    assert ids[1] == START_OF_TURN
    assert ids[-3:] == hf_style_encode("<start_of_turn>model\n")[-3:]


def test_chat_without_generation_prompt_ends_with_the_last_turn(tok, hf_style_encode):
    messages = CONVERSATIONS["multi-turn with assistant"][:2]
    rendered = render(messages, add_generation_prompt=False)
    assert tok.chat_prompt(messages, add_generation_prompt=False) == rendered
    assert tok.encode_chat(messages, add_generation_prompt=False) == hf_style_encode(rendered)
    assert rendered.endswith("<end_of_turn>\n")


def test_a_plain_string_is_one_user_turn(tok):
    assert tok.encode_chat("Hello") == tok.encode_chat([{"role": "user", "content": "Hello"}])


def test_system_role_is_refused_like_the_official_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        render(messages)
    with pytest.raises(TokenizerError, match="no system role"):
        tok.encode_chat(messages)


@pytest.mark.parametrize("roles", [("user", "user"), ("assistant",), ("user", "model", "model"), ("model", "user")])
def test_non_alternating_roles_are_refused_like_the_official_template(tok, roles):
    messages = [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        render(messages)
    with pytest.raises(TokenizerError, match="alternate"):
        tok.encode_chat(messages)


def test_we_are_stricter_than_the_template_about_roles_it_lets_through(tok):
    """The official template only checks user-or-not on each turn, so a "system" (or any other) role in a
    model position renders as a turn Gemma 2 never saw in training. We refuse it instead."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]
    assert "<start_of_turn>system\n" in render(messages)
    with pytest.raises(TokenizerError):
        tok.encode_chat(messages)

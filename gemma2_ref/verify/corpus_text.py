"""A corpus text tokenized as llama-perplexity tokenizes it: `common_tokenize(ctx, params.prompt, true)`
(tools/perplexity/perplexity.cpp:473), whose fourth argument parse_special defaults to false (common/common.h:1115):
<bos> first, and a special token's string in the text ("<bos>", "<start_of_turn>") is text, not the token.

Which pieces are then text follows llama.cpp's converter (convert_hf_to_gguf.py, _create_vocab_sentencepiece):
SentencePiece's control pieces become CONTROL tokens, which llama.cpp matches only with parse_special; its user-defined
pieces become NORMAL ones (unreachable by merges from text), or CONTROL where tokenizer_config.json marks them special
or they look special (<mask>, <unused..>, <|..|>); only an added token the config marks not special stays
USER_DEFINED, which llama.cpp matches in any text. Here: the SentencePiece model with every user-defined piece but
those turned into a control piece (a byte of its serialized proto changed; SentencePiece never produces a control
piece from text), and no control-token parsing (model/tokenizer.py's encode parses them: `gemma2-ref golden --prompt`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model.tokenizer import BOS

USER_DEFINED, CONTROL = 4, 3  # sentencepiece_model.proto: ModelProto.SentencePiece.Type


def looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special (the Gemma cases)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def matched_in_text(checkpoint: Path) -> set[int]:
    """Ids llama.cpp matches in any text (USER_DEFINED): tokenizer_config.json's added tokens marked not special."""
    path = Path(checkpoint) / "tokenizer_config.json"
    if not path.is_file():
        return set()
    decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    return {int(i) for i, d in decoder.items() if not d.get("special") and not looks_special(d.get("content", ""))}


def varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[i]
        value, shift, i = value | (b & 0x7F) << shift, shift + 7, i + 1
        if b < 0x80:
            return value, i


def skip_field(data: bytes, i: int, wire: int) -> int:
    if wire == 0:
        return varint(data, i)[1]
    if wire == 1:
        return i + 8
    if wire == 2:
        n, i = varint(data, i)
        return i + n
    if wire == 5:
        return i + 4
    raise ValueError(f"unexpected protobuf wire type {wire}")


def user_defined_to_control(proto: bytes, keep: set[int]) -> bytes:
    """The serialized ModelProto with each user-defined piece (field 1 `pieces`, its field 3 `type`) not in `keep`
    made a control piece: a one-byte varint 4 -> 3, so every length stays as it is."""
    out, i, index = bytearray(proto), 0, 0
    while i < len(proto):
        key, i = varint(proto, i)
        field, wire = key >> 3, key & 7
        if field != 1 or wire != 2:
            i = skip_field(proto, i, wire)
            continue
        n, i = varint(proto, i)
        j, end = i, i + n
        while j < end:
            k, j = varint(proto, j)
            if k == (3 << 3) and proto[j] == USER_DEFINED and index not in keep:
                out[j] = CONTROL
            j = skip_field(proto, j, k & 7)
        i, index = end, index + 1
    return bytes(out)


def text_tokenizer(checkpoint):
    """A SentencePieceProcessor that tokenizes as llama-perplexity does (module docstring)."""
    import sentencepiece as spm

    from ..storage.loader import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    sp = spm.SentencePieceProcessor()
    sp.Load(str(checkpoint / "tokenizer.model"))
    literal = spm.SentencePieceProcessor()
    literal.LoadFromSerializedProto(user_defined_to_control(sp.serialized_model_proto(), matched_in_text(checkpoint)))
    return literal


def encode_corpus_text(checkpoint, text: str) -> list[int]:
    """<bos>, then the text's ids with every special token's string as text (llama-perplexity's tokenization)."""
    return [BOS, *text_tokenizer(checkpoint).EncodeAsIds(text)]

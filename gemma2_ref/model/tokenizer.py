"""Gemma's SentencePiece tokenizer: encode/decode, the BOS policy, and the Gemma chat template.

Special ids (the same in every Gemma 2 checkpoint and in the bundled tiny model):
    <pad> 0   <eos> 1   <bos> 2   <start_of_turn> 106   <end_of_turn> 107

BOS policy: a sequence the model sees starts with exactly one <bos>. Without it, or with two (a chat
template that writes "<bos>" and a tokenizer that adds another: lm-evaluation-harness #2049), Gemma's
outputs change noticeably. `encode(text, bos=True)` guarantees one; `bos=False` adds nothing.

Chat format: <bos><start_of_turn>user\\n{message}<end_of_turn>\\n<start_of_turn>model\\n
"""

from __future__ import annotations

import re
from pathlib import Path

PAD, EOS, BOS, START_OF_TURN, END_OF_TURN = 0, 1, 2, 106, 107


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """A SentencePiece model with Gemma's conventions."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm  # imported here: the model code needs NumPy only

        self.path = Path(model_file)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such tokenizer file (expected a SentencePiece tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.special = {
            "<pad>": PAD,
            "<eos>": EOS,
            "<bos>": BOS,
            "<start_of_turn>": START_OF_TURN,
            "<end_of_turn>": END_OF_TURN,
        }
        for piece, expected in self.special.items():
            found = self.sp.PieceToId(piece)
            if found != expected:
                raise TokenizerError(f"{self.path}: {piece} has id {found}, Gemma expects {expected}")
        # Control pieces (<bos>, <eos>, <pad>, ...) are never produced by SentencePiece from text; we parse
        # them, like Hugging Face's tokenizer does. User-defined pieces (<start_of_turn>) SentencePiece matches.
        controls = [self.sp.IdToPiece(i) for i in range(min(self.vocab_size, 1024)) if self.sp.IsControl(i)]
        self._control_re = re.compile(
            "(" + "|".join(re.escape(p) for p in sorted(controls, key=len, reverse=True)) + ")"
        )

    bos_id, eos_id, end_of_turn_id = BOS, EOS, END_OF_TURN

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Generation ends on <eos> or <end_of_turn>."""
        return EOS, END_OF_TURN

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Text -> ids. bos=True: the result starts with exactly one <bos> (added if absent, duplicates at the
        start collapsed). bos=False: exactly what the text says. Special-token strings such as "<bos>" or
        "<start_of_turn>" in the text become their ids."""
        ids: list[int] = []
        for part in self._control_re.split(text):
            if not part:
                continue
            piece_id = self.sp.PieceToId(part)
            if self._control_re.fullmatch(part) and self.sp.IsControl(piece_id):
                ids.append(piece_id)
            else:
                ids.extend(self.sp.EncodeAsIds(part))
        if bos:
            while ids and ids[0] == BOS:
                ids.pop(0)
            ids.insert(0, BOS)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Ids -> text. skip_special=False shows control tokens such as <bos> as text."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self.sp.DecodeIds([i for i in ids if not self.sp.IsControl(i)])
        out, run = [], []
        for i in ids:
            if self.sp.IsControl(i):
                out.append(self.sp.DecodeIds(run))
                out.append(self.sp.IdToPiece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def pieces(self, ids) -> list[str]:
        return [self.sp.IdToPiece(int(i)) for i in ids]

    # -- chat ---------------------------------------------------------------------------------------------
    def chat_prompt(self, messages, add_generation_prompt: bool = True) -> str:
        """The Gemma chat template as text. `messages`: a string (one user turn) or a list of
        {"role": "user" | "model" | "assistant", "content": str}, alternating, starting with the user.
        Gemma 2 has no system role. Content is stripped of surrounding whitespace, as the template does."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, (list, tuple)):
            raise TokenizerError(
                f'chat_prompt takes a string or a list of messages {{"role", "content"}}, got {type(messages).__name__}'
            )
        text = "<bos>"
        for n, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise TokenizerError(
                    f'message {n} is {message!r:.80}; each message is {{"role": "user" or "model", "content": text}}'
                )
            role = {"assistant": "model"}.get(message["role"], message["role"])
            if role == "system":
                raise TokenizerError(
                    "Gemma 2's chat template has no system role: put the instructions in the first user message"
                )
            expected = "user" if n % 2 == 0 else "model"
            if role != expected:
                raise TokenizerError(
                    f"message {n} has role {message['role']!r}; turns must alternate "
                    f"user/model/user/... starting with user"
                )
            text += f"<start_of_turn>{role}\n{message['content'].strip()}<end_of_turn>\n"
        if add_generation_prompt:
            text += "<start_of_turn>model\n"
        return text

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """The chat template as ids: one <bos>, then the turns."""
        return self.encode(self.chat_prompt(messages, add_generation_prompt), bos=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.model file, a checkpoint directory holding one, or a bundled model's name ("tiny")."""
    from ..data import bundled_names, local_or_bundled

    p = Path(path)
    found = local_or_bundled(str(path)) if not isinstance(path, Path) else None
    if found is not None:
        p = found / "tokenizer.model"
    elif p.is_dir():
        p = p / "tokenizer.model"
    elif not p.exists():
        raise TokenizerError(
            f"{path}: no such file or directory, and not a bundled model ({', '.join(bundled_names())})"
        )
    return Tokenizer(p)

"""The tokenizer check: a candidate tokenizer's ids for a suite of texts against the reference tokenizer's.

    texts = TEXTS                                   the suite (each exposes one known tokenizer mistake)
    report = check_tokenizer(tok, candidate)         candidate: {"ids": [[...], ...], "stop_ids": [...]}
    print(report.format())

The candidate file (`gemma2-ref check-tokenizer CANDIDATE.json`) holds, for each text of the suite in order,
the ids the candidate's tokenizer gives it with one <bos> added and special tokens parsed (as for a prompt),
and optionally the ids its generation stops on. The report gives the first text whose ids differ, the first
differing position, and the known mistake the difference is (TOKENIZER_MISTAKES), judged from the candidate's
ids alone, read through the reference vocabulary:

    special_tokens_not_parsed   the candidate's pieces spell the same text, with a special token spelled in pieces
    add_space_prefix            they spell " " + the text (SentencePiece's add_dummy_prefix)
    whitespace_runs_split       the same text, without the reference's pieces made of whitespace only
    no_byte_fallback            <unk> where the reference has byte pieces
    stop_without_end_of_turn    the stop ids lack <end_of_turn> (107): a chat turn runs on
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..model.jsonfile import read_json
from ..model.tokenizer import BOS, END_OF_TURN

UNK = 3

TEXTS = (
    "The cat sat on the mat.",
    "<start_of_turn>user\nWhy soft-cap scores?<end_of_turn>\n<start_of_turn>model\n",
    "Hello world",
    "indented    code\tand  two   runs",
    "Digits 12345 and 2048 split.",
    "Bytes: 日本語 🙂 é",
)

TOKENIZER_MISTAKES = {
    "special_tokens_not_parsed": (
        "<start_of_turn> / <end_of_turn> in the text split into ordinary pieces",
        "llama.cpp #8244, #8349",
    ),
    "add_space_prefix": (
        "a space prepended to the text (SentencePiece's add_dummy_prefix), which Gemma's tokenizer does not do",
        "llama.cpp #8248",
    ),
    "whitespace_runs_split": (
        "runs of spaces, which Gemma's vocabulary holds as single pieces, split into shorter ones",
        "llama.cpp #8228",
    ),
    "no_byte_fallback": (
        "characters outside the vocabulary become <unk> instead of byte pieces",
        "SentencePiece byte_fallback (Gemma's tokenizer has it)",
    ),
    "stop_without_end_of_turn": (
        "generation of a chat turn does not stop at <end_of_turn> (107), only at <eos> (1)",
        "mlx-swift-examples #89",
    ),
}


class TokenizerCheckError(ValueError):
    """A candidate file that cannot be read: the message names it and what to do (exit code 2)."""


@dataclass
class TextResult:
    text: str
    reference: list[int]
    candidate: list[int]
    first_difference: int | None  # the first differing position, None when equal
    mistake: str | None = None  # a TOKENIZER_MISTAKES name, or None (equal, or unknown)


@dataclass
class TokenizerReport:
    results: list[TextResult]
    stop_ids: list[int] | None
    mistakes: list[str] = field(default_factory=list)  # every mistake named, in the order found

    @property
    def passed(self) -> bool:
        return not self.mistakes and all(r.first_difference is None for r in self.results)

    @property
    def first_failure(self) -> TextResult | None:
        return next((r for r in self.results if r.first_difference is not None), None)

    def format(self) -> str:
        ok = sum(r.first_difference is None for r in self.results)
        lines = [f"tokenizer check: {ok} of {len(self.results)} texts give the reference's ids"]
        first = self.first_failure
        if first is not None:
            i = first.first_difference
            lines.append(
                f"  first difference: text {self.results.index(first)} {first.text!r} at position {i}: "
                f"reference {first.reference[i : i + 4]}, candidate {first.candidate[i : i + 4]}"
            )
        for r in self.results:
            if r.first_difference is not None and r.mistake is None:
                lines.append(f"  text {self.results.index(r)} {r.text!r}: not a known tokenizer mistake")
        for name in self.mistakes:
            what, refs = TOKENIZER_MISTAKES[name]
            lines.append(f"  NAMED: {name}: {what} [{refs}]")
        lines.append("  PASS" if self.passed else "  FAIL")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "mistakes": self.mistakes,
            "stop_ids": self.stop_ids,
            "texts": [
                {
                    "text": r.text,
                    "first_difference": r.first_difference,
                    "mistake": r.mistake,
                    "reference": r.reference,
                    "candidate": r.candidate,
                }
                for r in self.results
            ],
        }


def spelled(sp, ids) -> str:
    """The text a sequence of ids spells in the reference vocabulary (byte pieces joined into characters,
    "▁" a space, control pieces such as <bos> left out): what a candidate's ids say, whatever pieces it cut."""
    out = bytearray()
    for i in ids:
        i = int(i)
        if not 0 <= i < sp.GetPieceSize():
            out += f"<id {i}>".encode()
        elif sp.IsByte(i):
            out.append(int(sp.IdToPiece(i)[1:-1], 16))
        elif not sp.IsControl(i):
            out += ("\ufffd" if sp.IsUnknown(i) else sp.IdToPiece(i)).replace("\u2581", " ").encode()
    return out.decode("utf-8", errors="replace")


def whitespace_pieces(sp, ids) -> set[int]:
    """The ids among `ids` whose piece is two or more whitespace characters."""
    return {
        int(i)
        for i in ids
        if 0 <= int(i) < sp.GetPieceSize() and len(p := sp.IdToPiece(int(i))) > 1 and set(p) <= set("\u2581\t\n")
    }


def name_difference(sp, text: str, reference: list[int], candidate: list[int], special: set[int]) -> str | None:
    """The known mistake a candidate's ids for `text` are, judged from what they spell (module docstring)."""
    said = spelled(sp, candidate)
    if UNK in candidate and UNK not in reference and any(sp.IsByte(int(i)) for i in reference):
        return "no_byte_fallback"
    if said == " " + text:
        return "add_space_prefix"
    if said == text and any(candidate.count(i) < reference.count(i) for i in special & set(reference)):
        return "special_tokens_not_parsed"  # the same text, a special token (or more) spelled in pieces
    if said == text and whitespace_pieces(sp, reference) - whitespace_pieces(sp, candidate):
        return "whitespace_runs_split"
    return None


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_tokenizer(tokenizer, candidate: dict, texts=TEXTS) -> TokenizerReport:
    """Compare `candidate` ({"ids": one list per text, "stop_ids": optional}) with `tokenizer` (the reference,
    model.tokenizer.Tokenizer) on `texts`; name each known mistake (module docstring)."""
    sp = tokenizer.sp
    special = {i for i in range(min(sp.GetPieceSize(), 1024)) if sp.IsControl(i) or sp.IsUnused(i)} - {BOS} | {
        tokenizer.special["<start_of_turn>"],
        tokenizer.special["<end_of_turn>"],
    }
    results = []
    for text, ids in zip(texts, candidate["ids"]):
        ref = tokenizer.encode(text, bos=True)
        ids = [int(i) for i in ids]
        at = first_difference(ref, ids)
        results.append(
            TextResult(
                text,
                ref,
                ids,
                at,
                None
                if at is None
                else name_difference(sp, text, ref[1:], ids[1:] if ids[:1] == [BOS] else ids, special),
            )
        )
    stop = candidate.get("stop_ids")
    report = TokenizerReport(results, None if stop is None else [int(i) for i in stop])
    for r in results:
        if r.mistake and r.mistake not in report.mistakes:
            report.mistakes.append(r.mistake)
    if stop is not None and END_OF_TURN not in report.stop_ids:
        report.mistakes.append("stop_without_end_of_turn")
    return report


def read_candidate(path, texts=TEXTS) -> dict:
    """A candidate file: JSON {"ids": [[int, ...], ...] one list per text, "stop_ids": [int, ...] (optional)}."""
    path = Path(path)
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise TokenizerCheckError(
            f'{path}: not a readable JSON file ({e}); write {{"ids": [[...], ...]}} with '
            f"one list of token ids per text of `gemma2-ref check-tokenizer --texts`"
        ) from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if (
        not isinstance(ids, list)
        or len(ids) != len(texts)
        or not all(isinstance(row, list) and all(isinstance(i, int) for i in row) for row in ids)
    ):
        raise TokenizerCheckError(
            f"{path}: key 'ids' must hold {len(texts)} lists of integer token ids, one per "
            f"text of `gemma2-ref check-tokenizer --texts`, in that order"
        )
    stop = data.get("stop_ids")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(i, int) for i in stop)):
        raise TokenizerCheckError(f"{path}: key 'stop_ids' must be a list of integer token ids (or absent)")
    return {"ids": ids, "stop_ids": stop}


# -- the bundled tokenizer's settings against Gemma's published ones -----------------------------------------

GEMMA_SPEC = {  # Gemma's tokenizer.model (normalizer and trainer spec), as the Gemma / Gemma 2 reports describe it
    "model_type": "BPE",
    "byte_fallback": True,
    "split_digits": True,
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "normalizer": "identity",
    "space_runs_user_defined": True,
    "newline_runs_user_defined": True,
    "tab_runs_user_defined": True,
    "control_tokens": ["<pad>", "<eos>", "<bos>"],
    "turn_tokens_user_defined": True,
}


def tokenizer_spec(model_file) -> dict:
    """The GEMMA_SPEC fields of a SentencePiece model file, read from its proto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(Path(model_file).read_bytes())
    user = {p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}

    def runs(ch: str) -> bool:
        return all(ch * n in user for n in range(2, 32))

    return {
        "model_type": pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type),
        "byte_fallback": m.trainer_spec.byte_fallback,
        "split_digits": m.trainer_spec.split_digits,
        "add_dummy_prefix": m.normalizer_spec.add_dummy_prefix,
        "remove_extra_whitespaces": m.normalizer_spec.remove_extra_whitespaces,
        "normalizer": m.normalizer_spec.name,
        "space_runs_user_defined": runs("\u2581"),
        "newline_runs_user_defined": runs("\n"),
        "tab_runs_user_defined": runs("\t"),
        "control_tokens": [p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.CONTROL],
        "turn_tokens_user_defined": {"<start_of_turn>", "<end_of_turn>"} <= user,
    }


def spec_differences(model_file) -> dict[str, tuple]:
    """{field: (Gemma's, this model's)} where a SentencePiece model's settings differ from GEMMA_SPEC."""
    found = tokenizer_spec(model_file)
    return {k: (v, found[k]) for k, v in GEMMA_SPEC.items() if found[k] != v}

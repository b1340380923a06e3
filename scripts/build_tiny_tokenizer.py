"""Train the bundled tiny model's SentencePiece tokenizer, with Gemma's conventions.

    python scripts/build_tiny_tokenizer.py            # writes gemma2_ref/data/tiny/tokenizer.model

Like Gemma's tokenizer: BPE, byte fallback, digits split, no dummy prefix, whitespace kept as is, and
Gemma's special ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, then 102 reserved pieces so that
<start_of_turn> is 106 and <end_of_turn> 107. Trained on scripts/corpus/python-reference-topics.txt
(the Python Language Reference topics, English prose, shipped with CPython as pydoc_data; PSF licence).
Deterministic: the same corpus gives a byte-identical tokenizer.model.
"""

import argparse
import io
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "corpus" / "python-reference-topics.txt"
RESERVED = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(100)]  # ids 4..105


def build(out: Path, vocab_size: int = 2048) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(p for p in CORPUS.read_text().split("\n\n") if p.strip()),  # paragraphs: keeps "\n"
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=RESERVED + ["<start_of_turn>", "<end_of_turn>"],
        num_threads=1,
        max_sentence_length=8192,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert sp.PieceToId("<start_of_turn>") == 106 and sp.PieceToId("<end_of_turn>") == 107, "special ids moved"
    print(f"wrote {out} ({out.stat().st_size} bytes, {sp.GetPieceSize()} pieces)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "gemma2_ref" / "data" / "tiny" / "tokenizer.model")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()
    build(args.out, args.vocab_size)

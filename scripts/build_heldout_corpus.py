"""Write gemma2_ref/data/corpus/tiny-heldout.txt: the default corpus of `gemma2-ref corpus`.

It is the held-out stream of the bundled tiny models' corpus (tiny_corpus.split_corpus: every 10th block of 2048
tokens, never trained on by tiny and tiny-teacher), each block decoded to text, blocks separated by a blank line.
tests/test_corpus.py checks the bundled file is what this script writes.

    python scripts/build_heldout_corpus.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_corpus import BLOCK, HELD_OUT_EVERY, ROOT, corpus_ids  # noqa: E402

OUT = ROOT / "gemma2_ref" / "data" / "corpus" / "tiny-heldout.txt"


def held_out_text(tok) -> str:
    ids = corpus_ids(tok)
    blocks = [ids[i : i + BLOCK] for i in range(0, len(ids), BLOCK)]
    held = [b for k, b in enumerate(blocks) if k % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    return "\n\n".join(tok.decode(b.tolist()).strip() for b in held) + "\n"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from gemma2_ref.model.tokenizer import load_tokenizer

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(held_out_text(load_tokenizer(ROOT / "gemma2_ref" / "data" / "tiny")), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

"""The corpus of the bundled tiny models and the data made from it: NumPy and SentencePiece only (no torch),
so that the walkthrough and the tests can rebuild exactly the held-out data the training scripts used.

    train stream / held-out stream   every 10th block of 2048 tokens is held out (scripts/train_tiny.py)
    chat pairs                       user/model turns made from the corpus's sections; every pair of every
                                     10th section is held out (scripts/experiments.py, tiny-it)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "corpus" / "python-reference-topics.txt"
BLOCK, HELD_OUT_EVERY = 2048, 10  # every 10th block of 2048 tokens is held out
END_OF_TURN, EOS = 107, 1
MAX_RESPONSE, MAX_SEQ = 48, 160  # tokens: responses fit well inside generate's 64-token default


# -- the text and its split ------------------------------------------------------------------------------


def reflow(text: str) -> str:
    """Join the hard-wrapped lines (~70 columns) of prose paragraphs into one line each; indented blocks
    (grammar, code, lists) and headings keep their lines. Without this a model this small, which cannot
    count columns, predicts a line break after almost any word."""

    def is_prose(paragraph):
        return all(
            line and not line[0].isspace() and not re.fullmatch(r"[*=~^-]+", line) for line in paragraph.split("\n")
        )

    return "\n\n".join(" ".join(p.split("\n")) if is_prose(p) else p for p in text.split("\n\n"))


def split_corpus(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train stream, held-out stream): block k of BLOCK tokens is held out when k % 10 == 5."""
    blocks = [ids[i : i + BLOCK] for i in range(0, len(ids), BLOCK)]
    held = [b for k, b in enumerate(blocks) if k % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    train = [b for k, b in enumerate(blocks) if k % HELD_OUT_EVERY != HELD_OUT_EVERY // 2]
    return np.concatenate(train), np.concatenate(held)


def corpus_ids(tok) -> np.ndarray:
    """The reflowed corpus as token ids, no <bos> (the training scripts add one per window)."""
    return np.array(tok.encode(reflow(CORPUS.read_text()), bos=False), dtype=np.int64)


# -- chat pairs --------------------------------------------------------------------------------------------


def corpus_sections(text: str) -> list[tuple[str, list[str]]]:
    """(title, prose paragraphs) for each titled section of the reflowed corpus. A title is a paragraph of
    two lines, the second an underline of *, = or -; prose paragraphs are one unindented line after reflow."""
    out: list[tuple[str, list[str]]] = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if len(lines) == 2 and re.fullmatch(r"[*=-]{3,}", lines[1].strip()):
            out.append((lines[0].strip(), []))
        elif out and len(lines) == 1 and para and not para[0].isspace() and len(para) > 40:
            out[-1][1].append(para.strip())
    return [(t, ps) for t, ps in out if ps]


def sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.?!])\s+(?=[A-Z\"“(])", paragraph) if len(s) > 15]


TITLE_PROMPTS = ("Tell me about {}.", "What does the reference say about {}?", "Explain {} briefly.")


def chat_pairs(text: str, tok) -> list[dict]:
    """User/model pairs from the corpus, three kinds, each tagged with its section's index:
    a section title -> its first sentences; a sentence -> the next one; a paragraph -> its first sentence."""
    pairs = []

    def add(k, kind, prompt, response):
        n = len(tok.encode(response, bos=False))
        if n <= MAX_RESPONSE:
            pairs.append({"section": k, "kind": kind, "prompt": prompt, "response": response})

    for k, (title, paras) in enumerate(corpus_sections(text)):
        first = sentences(paras[0])
        answer = ""
        for s in first:  # as many whole sentences as fit in MAX_RESPONSE tokens
            longer = (answer + " " + s).strip()
            if len(tok.encode(longer, bos=False)) > MAX_RESPONSE:
                break
            answer = longer
        if answer:
            add(k, "title", TITLE_PROMPTS[k % len(TITLE_PROMPTS)].format(title), answer)
        for para in paras:
            ss = sentences(para)
            for a, b in zip(ss, ss[1:]):
                add(k, "next", f"Continue the text: {a}", b)
            if len(ss) >= 2:
                add(k, "summary", f"Summarize in one sentence: {para}", ss[0])
    return pairs


def encode_pair(tok, pair) -> tuple[list[int], int] | None:
    """The chat-formatted ids of one pair and where the model's turn starts, or None if too long.
    `<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{response}<end_of_turn><eos>`
    The prompt is encoded as `generate --chat` encodes it and the turn on its own after it, so training sees
    the token boundary that generation sees (encoding the whole string can merge the newline with the turn's
    first character: the piece newline + double quote)."""
    prompt = tok.encode_chat(pair["prompt"])
    ids = prompt + tok.encode(pair["response"] + "<end_of_turn><eos>", bos=False)
    assert ids[-2:] == [END_OF_TURN, EOS], pair
    return (ids, len(prompt)) if len(ids) <= MAX_SEQ else None


def split_pairs(pairs):
    """Held out: every pair of every 10th section (k % 10 == 5), like train_tiny's every 10th block."""
    return ([p for p in pairs if p["section"] % 10 != 5], [p for p in pairs if p["section"] % 10 == 5])


def eval_prompts(held_pairs, n):
    """n held-out pairs, spread over the kinds and sections (a fixed, seeded choice)."""
    idx = np.random.default_rng(0).permutation(len(held_pairs))[:n]
    return [held_pairs[i] for i in sorted(idx)]


def unseen(held_pairs: list[dict], train_pairs: list[dict]) -> list[dict]:
    """The held-out pairs whose prompt is not also a training prompt. Held-out sections are disjoint from the
    training sections, but the reference repeats some sentences across topics (30 of the 153 held-out pairs
    are also training pairs, word for word): measure generalisation on these."""
    seen = {p["prompt"] for p in train_pairs}
    return [p for p in held_pairs if p["prompt"] not in seen]

"""Corpus goldens and llama.cpp (issue 25): GGUF candidates (f32, quantized with llama.cpp's own quantizer), and
llama.cpp's own `llama-perplexity` reading our base file and writing one we read, agreeing with our numbers.

llama-perplexity is built from the llama-cpp-python sdist's vendored llama.cpp by scripts/build_llama_perplexity.sh
(.ci/run calls it and exports $GEMMA2_REF_LLAMA_PERPLEXITY); without it these tests skip locally, fail under CI."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gemma2_ref.adapters import BACKENDS, load_adapter
from gemma2_ref.verify import corpus as C
from gemma2_ref.verify import kld as K
from gemma2_ref.verify import llamacpp_kld as L
from tests.helpers.backends import require
from tests.helpers.llamacpp_cases import backends, random_checkpoint

CTX, CHUNKS = 64, 4  # 4 x 31 = 124 scored rows: llama-perplexity prints its statistics from 100


def llama_perplexity() -> Path:
    env = os.environ.get("GEMMA2_REF_LLAMA_PERPLEXITY")
    default = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "gemma2-ref"
        / f"llama-perplexity-{require('llama_cpp', 'pip install -e .[llamacpp]').__version__}"
        / "bin"
        / "llama-perplexity"
    )
    path = Path(env) if env else default
    if not path.is_file():
        message = f"no llama-perplexity at {path}: run scripts/build_llama_perplexity.sh (about 15 min, once)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def random_ref(tmp_path_factory):
    """The random checkpoint llama.cpp describes exactly (query scale = head_dim), its reference and base file."""
    backends()
    d = tmp_path_factory.mktemp("corpus-llama")
    ckpt = random_checkpoint(d / "random")
    C.write_corpus(ckpt, d / "ref", ctx=CTX, chunks=CHUNKS, top_k="all", kld_out=d / "ref.kld", log=lambda m: None)
    return ckpt, d / "ref"


def gguf_candidate(ckpt, ref, dtype):
    out = Path(ref).parent / f"llama-{dtype}"
    if not out.exists():
        backend = {
            "name": "llama.cpp",
            "adapter": BACKENDS["llama.cpp"],
            **load_adapter("llama.cpp").corpus_backend(ckpt, dtype),
        }
        C.write_corpus(ckpt, out, backend=backend, reference=ref, log=lambda m: None)
    return out


def test_quantized_ggufs_lose_more_the_fewer_bits(random_ref):
    ckpt, ref = random_ref
    kld = {d: K.compare_corpus(ref, gguf_candidate(ckpt, ref, d)).stats["kld_mean"] for d in ("f32", "q8_0", "q4_0")}
    assert kld["f32"] < kld["q8_0"] < kld["q4_0"], kld
    assert kld["f32"] < 1e-3, kld


def statistic(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)", text)
    assert m, f"{label!r} not in llama-perplexity's output:\n{text[-3000:]}"
    return float(m.group(1))


def test_llama_perplexity_on_our_base_file_agrees_with_our_comparison(random_ref):
    """`llama-perplexity --kl-divergence-base ours.kld --kl-divergence` against the f32 GGUF: its PPL(base) is
    ours (to the base file's uint16 step), its KLD and PPL(Q) are what `compare` says of our llama.cpp candidate."""
    ckpt, ref = random_ref
    cand = gguf_candidate(ckpt, ref, "f32")
    gguf = C.load_corpus(cand).manifest["backend"]["gguf"]
    done = subprocess.run(
        [
            str(llama_perplexity()),
            "-m",
            gguf,
            "--kl-divergence-base",
            str(ref.parent / "ref.kld"),
            "--kl-divergence",
            "-c",
            str(CTX),
            "-t",
            "2",
            "-b",
            str(CTX),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    ours = K.compare_corpus(ref, cand).stats
    assert statistic(out, "Mean PPL(base)") == pytest.approx(ours["ppl_ref"], rel=1e-4)
    assert statistic(out, "Mean PPL(Q)") == pytest.approx(ours["ppl_cand"], rel=1e-3)
    assert statistic(out, "Mean    KLD") == pytest.approx(ours["kld_mean"], rel=0.05, abs=2e-5)
    assert statistic(out, "Same top p") == pytest.approx(100 * ours["same_top1"], abs=1.0)


def test_a_base_file_llama_perplexity_wrote_is_a_candidate(random_ref, tmp_path):
    """llama-perplexity's own base file of the f32 GGUF, read as a candidate, says what our llama.cpp candidate
    says (to its uint16 step)."""
    ckpt, ref = random_ref
    cand = gguf_candidate(ckpt, ref, "f32")
    gguf = C.load_corpus(cand).manifest["backend"]["gguf"]
    base = tmp_path / "llama.kld"
    done = subprocess.run(
        [
            str(llama_perplexity()),
            "-m",
            gguf,
            "-f",
            str(C.BUNDLED_CORPUS),
            "-c",
            str(CTX),
            "--chunks",
            str(CHUNKS),
            "--kl-divergence-base",
            str(base),
            "-t",
            "2",
            "-b",
            str(CTX),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = K.compare_corpus(ref, base).stats
    ours = K.compare_corpus(ref, cand).stats
    assert theirs["kld_mean"] == pytest.approx(ours["kld_mean"], rel=0.1, abs=5e-5)
    assert theirs["ppl_cand"] == pytest.approx(ours["ppl_cand"], rel=1e-3)


SPECIAL_TEXT = "Tokens as text: <bos> and <start_of_turn>user\nhello<end_of_turn> then <eos> and <pad>. "


def test_text_with_special_token_strings_is_tokenized_as_llama_perplexity_does(random_ref, tmp_path):
    """perplexity.cpp:473 tokenizes with parse_special false: "<bos>", "<start_of_turn>" in a corpus text are
    text. Its own base file's token ids (the checkpoint with the released tokenizer_config.json, which marks the
    turn tokens special) equal our reference's for a text full of them, and no control id appears but <bos> first."""
    ckpt, ref = random_ref
    gguf = C.load_corpus(gguf_candidate(ckpt, ref, "f32")).manifest["backend"]["gguf"]
    text = tmp_path / "special.txt"
    text.write_text(SPECIAL_TEXT * 12, encoding="utf-8")
    base = tmp_path / "special.kld"
    cmd = [str(llama_perplexity()), "-m", gguf, "-f", str(text), "-c", str(CTX), "--kl-divergence-base", str(base)]
    done = subprocess.run([*cmd, "-t", "2", "-b", str(CTX)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    C.write_corpus(ckpt, tmp_path / "ours", text=text, ctx=CTX, top_k=8, log=lambda m: None)
    theirs = L.read_base_file(base).tokens.reshape(-1, CTX)
    ours = C.load_corpus(tmp_path / "ours").tokens()
    assert ours.shape == theirs.shape and (ours == theirs).all()
    assert ours[0, 0] == 2 and not np.isin(ours.reshape(-1)[1:], [0, 1, 2, 106, 107]).any()

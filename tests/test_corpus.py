"""Corpus goldens (issue 25): llama-perplexity's chunking and scoring, shards, resume, the comparison, the
llama.cpp base file, and every bad input as one line with exit code 2. NumPy only (the bundled tiny model);
the backends are in test_corpus_transformers.py and test_corpus_llamacpp.py."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref.verify import corpus as C
from gemma2_ref.verify import kld as K
from gemma2_ref.verify import llamacpp_kld as L
from tests.helpers.cli import cli
from tests.helpers.cli import refused as refused_line
from tests.helpers.scripts import load_script

REPO = Path(__file__).resolve().parent.parent
CTX, CHUNKS = 64, 4  # tiny's window is 32: every chunk crosses it


def refused(capsys, *argv) -> str:
    return refused_line(capsys, *argv, progress=("corpus: shard",))


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def ref_all(tmp_path_factory):
    """The bundled corpus's first 4 chunks of 64 tokens, every id stored, and llama.cpp's base file of it."""
    d = tmp_path_factory.mktemp("corpus")
    C.write_corpus(
        "tiny", d / "ref", ctx=CTX, chunks=CHUNKS, top_k="all", kld_out=d / "ref.kld", shard_chunks=3, log=quiet
    )
    return d / "ref"


@pytest.fixture(scope="module")
def ref_top8(ref_all):
    C.write_corpus("tiny", ref_all.parent / "ref8", ctx=CTX, chunks=CHUNKS, top_k=8, log=quiet)
    return ref_all.parent / "ref8"


def mistaken(ref, name, mistake, dtype="float32"):
    out = Path(ref).parent / name
    if not out.exists():
        C.write_corpus(
            "tiny",
            out,
            backend={"name": C.REFERENCE_BACKEND, "dtype": dtype, "mistake": mistake},
            reference=ref,
            log=quiet,
        )
    return out


# -- the convention ---------------------------------------------------------------------------------------


def test_chunks_start_with_bos_and_score_the_second_half_as_llama_perplexity(ref_all):
    """perplexity.cpp: chunk c = tokens[c*ctx:(c+1)*ctx], <bos> for its first token in the forward, rows
    ctx/2 .. ctx-2 scored, predicting the next token. Checked against a plain full forward of each chunk."""
    g = C.load_corpus(ref_all)
    tok = g2.load_tokenizer("tiny")
    ids = np.array(tok.encode(C.BUNDLED_CORPUS.read_text(encoding="utf-8"), bos=True))
    tokens = g.tokens()
    assert tokens.shape == (CHUNKS, CTX) and (tokens.reshape(-1) == ids[: CHUNKS * CTX]).all()
    model = g2.load_model("tiny", dtype="float64")
    stored = np.concatenate([g.shard(i)["logprobs"] for i in range(len(g.shards))])
    targets = np.concatenate([g.shard(i)["target_logprob"] for i in range(len(g.shards))])
    for c in range(CHUNKS):
        run = tokens[c].astype(np.int64)
        run[0] = 2
        logits = model.logits(run)[CTX // 2 : CTX - 1]  # (R, V) rows 32..62
        lp = (
            logits
            - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True)
        )
        assert stored.shape[1] == CTX - 1 - CTX // 2
        np.testing.assert_allclose(stored[c], lp, atol=2e-5)  # float32 reference, float64 check
        np.testing.assert_allclose(targets[c], lp[np.arange(len(lp)), tokens[c, CTX // 2 + 1 :]], atol=2e-5)


def test_bundled_corpus_is_the_held_out_stream_the_tiny_models_never_trained_on():
    held_out_text = load_script("build_heldout_corpus").held_out_text

    assert C.BUNDLED_CORPUS.read_text(encoding="utf-8") == held_out_text(g2.load_tokenizer("tiny"))


def test_top_k_ids_are_sorted_by_log_prob_then_id():
    lp = np.log(np.array([[0.1, 0.3, 0.3, 0.05, 0.25]]))
    assert C.top_k_ids(lp, 3).tolist() == [[1, 2, 4]]
    assert C.top_k_ids(lp, 5).tolist() == [[1, 2, 4, 0, 3]]


# -- shards, resume, partial goldens ---------------------------------------------------------------------


class Interrupt(KeyboardInterrupt):
    pass


def interrupted_after(n):
    def executor(tasks, out_dir):
        for i, r in enumerate(C.serial_executor(tasks, out_dir)):
            yield r
            if i + 1 == n:
                raise Interrupt()

    return executor


def test_resume_after_an_interruption_is_byte_identical(tmp_path):
    kw = dict(ctx=32, chunks=5, top_k=16, shard_chunks=2, log=quiet)
    C.write_corpus("tiny", tmp_path / "whole", **kw)
    with pytest.raises(Interrupt):
        C.write_corpus("tiny", tmp_path / "cut", executor=interrupted_after(1), **kw)
    assert not (tmp_path / "cut" / C.MANIFEST).exists()
    with pytest.raises(C.CorpusError, match="partial corpus golden"):
        C.load_corpus(tmp_path / "cut")
    seen = []
    C.write_corpus(
        "tiny",
        tmp_path / "cut",
        executor=lambda t, o: (seen.extend(x.shard for x in t), C.serial_executor(t, o))[1],
        **kw,
    )
    assert seen == [1, 2]  # only the missing shards ran
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cut").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_a_tampered_shard_is_refused(tmp_path):
    C.write_corpus("tiny", tmp_path / "g", ctx=32, chunks=2, log=quiet)
    shard = tmp_path / "g" / C.shard_file(0)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(C.CorpusError, match="sha256 differs"):
        C.load_corpus(tmp_path / "g")


def test_a_candidate_returning_nan_writes_nothing(tmp_path, ref_all):
    g = C.load_corpus(ref_all)
    task = C.plan_shards(g.tokens(), g.manifest, "tiny", reference=g)[0]

    class NaNModel:
        def forward(self, ids, taps, logits_at):
            return {"logits": np.full((logits_at[1] - logits_at[0], 2048), np.nan, np.float32)}

    with pytest.raises(C.CorpusError, match="non-finite logits in chunk 0"):
        C.run_shard(task, tmp_path, model=NaNModel())
    assert list(tmp_path.iterdir()) == []


# -- the comparison ----------------------------------------------------------------------------------------


def test_the_same_model_in_float64_gives_kld_zero(ref_all):
    r = K.compare_corpus(ref_all, mistaken(ref_all, "f64", None, "float64"))
    assert r.passed and r.stats["kld_mean"] < 1e-9 and r.stats["same_top1"] == 1.0
    assert abs(r.stats["ln_ppl_ratio"]) < 1e-6


def test_a_known_mistake_gives_a_large_kld_and_exit_1(capsys, ref_all):
    cand = mistaken(ref_all, "nowindow", "no_sliding_window")
    code, out, err = cli(capsys, "compare", ref_all, cand, "--json")
    body = json.loads(out)
    assert code == 1 and body["kld_mean"] > K.THRESHOLDS["kld_mean"], body["kld_mean"]
    assert list(body)[: len(K.JSON_KEYS)] == list(K.JSON_KEYS)
    assert body["scored_tokens"] == CHUNKS * (CTX - 1 - CTX // 2)
    code, out, err = cli(capsys, "compare", ref_all, cand)
    assert code == 1 and "FAIL" in out and "largest KLD positions" in out


def test_statistics_follow_llama_perplexity_definitions():
    """mean_and_uncertainty / percentile / median of perplexity.cpp:1745-1753, :1919-1931, by hand."""
    x = np.arange(1.0, 21.0)
    m, u = K.mean_and_uncertainty(x)
    assert m == 10.5 and u == pytest.approx(np.sqrt((np.mean(x * x) - 10.5**2) / 19))
    assert K.mean_and_uncertainty(x[:10])[1] == 0.0  # no uncertainty for 10 values or fewer
    assert K.percentile(x, 0.99) == pytest.approx(19.81) and K.median(x) == 10.5 and K.median(x[:5]) == 3


def test_top_k_truncation_stays_within_its_bound_and_below_the_exact_kld(ref_all, ref_top8):
    """With --top-k 8 the KLD is at most the exact one (--top-k all) and at least exact - bound, per position."""
    exact = K.compare_corpus(ref_all, mistaken(ref_all, "gelu-all", "query_scale=head_dim (64)"))
    cut = K.compare_corpus(ref_top8, mistaken(ref_top8, "gelu-8", "query_scale=head_dim (64)"))
    e, c = exact.stats, cut.stats
    assert e["kld_mean"] > 1e-3  # a visible mistake
    assert c["kld_mean"] <= e["kld_mean"] + 1e-9
    assert c["kld_mean"] + c["kld_truncation_bound"] >= e["kld_mean"] - 1e-9
    assert e["kld_truncation_bound"] == 0.0
    assert c["ppl_ref"] == pytest.approx(e["ppl_ref"]) and c["same_top1"] == e["same_top1"]


def test_goldens_of_different_corpora_are_refused(capsys, tmp_path, ref_all):
    (tmp_path / "other.txt").write_text(C.BUNDLED_CORPUS.read_text(encoding="utf-8")[5000:])
    C.write_corpus(
        "tiny", tmp_path / "other", text=tmp_path / "other.txt", ctx=CTX, chunks=CHUNKS, top_k="all", log=quiet
    )
    assert "another corpus golden" in refused(capsys, "compare", ref_all, tmp_path / "other")


# -- llama.cpp's base file ---------------------------------------------------------------------------------


def test_our_base_file_holds_our_log_probs_to_its_quantization_step(ref_all):
    base = L.read_base_file(ref_all.parent / "ref.kld")
    g = C.load_corpus(ref_all)
    assert (base.n_ctx, base.n_vocab, base.n_chunk) == (CTX, 2048, CHUNKS)
    assert (np.asarray(base.tokens) == g.tokens()).all()
    lp = g.shard(0)["logprobs"][0]
    theirs = base.logprobs(0)
    scale = np.ascontiguousarray(base.rows(0)[:, :4]).view(np.float32)[:, 0]
    top = lp > lp.max(1, keepdims=True) - 16  # above llama.cpp's floor
    assert (np.abs(theirs - lp)[top] <= np.repeat(scale, top.sum(1)) * 0.5 + 1e-5).all()
    r = K.compare_corpus(ref_all, ref_all.parent / "ref.kld")
    assert r.passed and r.stats["kld_mean"] < 1e-6 and abs(r.stats["ln_ppl_ratio"]) < 1e-4


def test_base_row_layout_is_perplexity_cpp_log_softmax():
    logits = np.array([[0.0, 1.0, -20.0, 3.0, 2.0]], np.float32)
    row = L.base_rows(logits)[0]
    assert len(row) == 2 * 3 + 4
    scale, min_log_prob = np.ascontiguousarray(row[:4]).view(np.float32)
    lse = np.log(np.exp(logits[0] - 3).sum())
    assert scale == pytest.approx((3 - -13) / 65535) and min_log_prob == pytest.approx(-13 - 3 - lse, rel=1e-6)
    assert row[4 + 2] == 0 and row[4 + 3] == 65535 and row[-1] == 0  # below the floor; the max; padding


def bad_base(tmp_path, src, edit) -> Path:
    data = bytearray(Path(src).read_bytes())
    data = edit(data)
    out = tmp_path / "bad.kld"
    out.write_bytes(bytes(data))
    return out


def test_bad_base_files_are_refused_naming_the_file(capsys, tmp_path, ref_all):
    src = ref_all.parent / "ref.kld"
    cut = bad_base(tmp_path, src, lambda d: d[:-100])
    assert "truncated" in refused(capsys, "compare", ref_all, cut) and str(cut) in refused(
        capsys, "compare", ref_all, cut
    )
    vocab = bad_base(tmp_path, src, lambda d: d[:12] + struct.pack("<i", 2047) + d[16:])
    line = refused(capsys, "compare", ref_all, vocab)
    assert "vocabulary" in line or "bytes" in line
    tokens = bad_base(tmp_path, src, lambda d: d[: 20 + 4 * 5] + struct.pack("<i", 7) + d[24 + 4 * 5 :])
    assert "other tokens than the reference" in refused(capsys, "compare", ref_all, tokens)


# -- bad input: one line, exit 2 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--ctx", "63"], "even"),
        (["--ctx", "1024"], "past the model's context"),
        (["--top-k", "0"], "out of range"),
        (["--top-k", "4096"], "out of range"),
        (["--top-k", "many"], "'all'"),
        (["--ctx", "512", "--chunks", "1", "--tokens", "{short}"], "at least two are needed"),
        (["--text", "{empty}"], "is empty"),
        (["--text", "{latin1}"], "not UTF-8"),
        (["--tokens", "{outside}"], "outside the vocabulary"),
        (["--ray-address", "nohost"], "--ray-address"),  # HOST:PORT expected (or, without Ray: what to install)
        (["--backend", "transformers"], "needs both --backend NAME and --reference"),
    ],
)
def test_bad_corpus_options_are_one_line_and_exit_2(capsys, tmp_path, args, expected):
    files = {"short": "2 " * 700, "empty": " \n", "outside": "2 5 9000 3"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1").write_bytes("caf\xe9 au lait".encode("latin-1"))
    args = [a.format(**{n: tmp_path / n for n in [*files, "latin1"]}) for a in args]
    line = refused(capsys, "corpus", "tiny", "--out", tmp_path / "out", *args)
    assert expected in line, line
    assert not (tmp_path / "out" / C.MANIFEST).exists()


def test_a_partial_golden_is_never_a_reference(capsys, tmp_path):
    with pytest.raises(Interrupt):
        C.write_corpus(
            "tiny", tmp_path / "cut", ctx=32, chunks=4, shard_chunks=2, executor=interrupted_after(1), log=quiet
        )
    line = refused(
        capsys, "corpus", "tiny", "--out", tmp_path / "cand", "--backend", "gemma2-ref", "--reference", tmp_path / "cut"
    )
    assert "partial corpus golden" in line
    assert "partial corpus golden" in refused(capsys, "compare", tmp_path / "cut", tmp_path / "cut")


def test_another_command_into_a_partial_golden_is_refused(capsys, tmp_path):
    with pytest.raises(Interrupt):
        C.write_corpus(
            "tiny", tmp_path / "cut", ctx=32, chunks=4, shard_chunks=2, executor=interrupted_after(1), log=quiet
        )
    line = refused(capsys, "corpus", "tiny", "--out", tmp_path / "cut", "--ctx", "32", "--chunks", "3")
    assert "another command" in line and "n_chunks" in line


def test_sigkill_midway_then_the_same_command_gives_the_uninterrupted_bytes(tmp_path):
    """A real `gemma2-ref corpus` process killed with SIGKILL after its second shard (no cleanup can run): the
    same command resumes, and every file is the uninterrupted run's, byte for byte."""
    import os
    import signal
    import subprocess
    import time

    args = ["corpus", "tiny", "--ctx", "32", "--chunks", "8", "--top-k", "16", "--shard-chunks", "1"]
    # both runs in processes of their own, with the same BLAS threads: the bytes depend on the thread count,
    # and another test of this session may have set OMP/OPENBLAS_NUM_THREADS in this process's environment
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    whole = [sys.executable, "-m", "gemma2_ref.cli", *args, "--out", str(tmp_path / "whole")]
    assert subprocess.run(whole, env=env, capture_output=True).returncode == 0
    cmd = [sys.executable, "-m", "gemma2_ref.cli", *args, "--out", str(tmp_path / "cut")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / C.shard_file(1)).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (tmp_path / "cut" / C.MANIFEST).exists():
        pytest.skip("the run finished before it could be killed")
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == names  # a killed writer's temporaries gone
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_docs_state_how_much_of_the_bundled_corpus_tiny_it_was_tuned_on():
    """The bundled corpus is held out from tiny's and tiny-teacher's training (every 10th block), but tiny-it's SFT
    pairs come from 90 % of the corpus's *sections* (scripts/tiny_corpus.py split_pairs), another split: measure
    which held-out sentences a training pair holds word for word, and check docs/corpus.md says so."""
    from tests.helpers.scripts import load_script

    T = load_script("tiny_corpus")
    tok = g2.load_tokenizer("tiny")
    train, _ = T.split_pairs(T.chat_pairs(T.reflow(T.CORPUS.read_text()), tok))
    trained = "\n".join(p["prompt"] + "\n" + p["response"] for p in train if T.encode_pair(tok, p) is not None)
    text = C.BUNDLED_CORPUS.read_text(encoding="utf-8")
    sentences = [s for line in text.split("\n") for s in T.sentences(line.strip())]
    inside = [s for s in sentences if s in trained]
    share = sum(map(len, inside)) / len(text)
    docs = (REPO / "docs" / "corpus.md").read_text(encoding="utf-8")
    stated = f"{len(inside)} of its {len(sentences)} sentences ({100 * share:.0f} % of its characters)"
    assert stated in docs, stated

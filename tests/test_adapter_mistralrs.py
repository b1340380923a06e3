"""mistral.rs (the `mistralrs` wheel) against our forward. Not an adapter: its Python API takes text, not token ids,
and returns no logits, only the log-probabilities of the tokens it generates (`ChatCompletionRequest(logprobs=True,
top_logprobs=N)`; completion requests return none), so no golden case can be written from it
(docs/backends/mistralrs.md). What it returns is checked here: the full log-softmax row of every generated token
(top_logprobs = the vocabulary), greedy, through its own prefill and KV cache, on a prompt past the window."""

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref.model.gemma2 import log_softmax
from gemma2_ref.storage.checkpoints import random_weights, save_checkpoint
from gemma2_ref.storage.loader import resolve_checkpoint
from tests.helpers.backends import require

mistralrs = require("mistralrs", "pip install mistralrs==0.9.5")
TEXT = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)  # 93 tokens with <bos>: past the window 32
STEPS = 40


def local_directory(checkpoint: Path, out: Path) -> Path:
    """What mistral.rs loads: config.json with `rope_theta` (it refuses the transformers 5 `rope_parameters`
    form: "missing field `rope_theta`"), the weights, and a tokenizer.json (it reads no tokenizer.model)."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(checkpoint / "model.safetensors", out / "model.safetensors")
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)  # as onnxruntime-genai's builder does
    return out


def decode_logprobs(directory: Path, tmp_path: Path, dtype: str = "F32", kv_f32: bool = True):
    """(prompt ids, generated ids, (STEPS, V) log-probabilities) from mistral.rs, greedy, in a process of its own:
    the engine reads MISTRALRS_CPU_KV_F32 once per process (a second Runner keeps the first one's cache dtype)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_engine, directory, tmp_path, dtype, kv_f32).result()


def run_engine(directory: Path, tmp_path: Path, dtype: str, kv_f32: bool):
    """decode_logprobs' child. A chat template that passes the text through after <bos> (the bundled models
    have none)."""
    template = tmp_path / "raw.jinja"
    template.write_text("<bos>{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.environ.pop("MISTRALRS_CPU_KV_F32", None)
    if kv_f32:  # the default on CPU is an f16 cache whatever the model dtype
        os.environ["MISTRALRS_CPU_KV_F32"] = "1"
    runner = mistralrs.Runner(
        which=mistralrs.Which.Plain(
            model_id=str(directory), arch=mistralrs.Architecture.Gemma2, dtype=getattr(mistralrs.ModelDType, dtype)
        ),
        token_source="none",
        max_seqs=1,
        jinja_explicit=str(template),
    )
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    res = runner.send_chat_completion_request(
        mistralrs.ChatCompletionRequest(
            messages=[{"role": "user", "content": TEXT}],
            model="default",
            max_tokens=STEPS,
            temperature=0.0,
            logprobs=True,
            top_logprobs=vocab,
        )
    )
    rows = np.full((STEPS, vocab), -np.inf)
    for k, step in enumerate(res.choices[0].logprobs.content):
        for top in step.top_logprobs:
            rows[k, top.token] = top.logprob
    prompt = runner.tokenize_text("<bos>" + TEXT, add_special_tokens=False, enable_thinking=None)
    return np.array(prompt), rows.argmax(-1), rows


def ours(checkpoint, prompt, generated):
    ids = np.concatenate([prompt, generated[:-1]])
    return log_softmax(g2.load_model(checkpoint).logits(ids)[len(prompt) - 1 :].astype(np.float64))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return local_directory(resolve_checkpoint("tiny"), tmp_path_factory.mktemp("mistralrs-tiny"))


def test_float32_with_an_f32_cache_matches_ours_past_the_window(tiny_dir, tmp_path):
    prompt, generated, theirs = decode_logprobs(tiny_dir, tmp_path)
    assert list(prompt) == g2.load_tokenizer("tiny").encode(TEXT)  # the same ids, <bos> once
    expected = ours("tiny", prompt, generated)
    assert (expected.argmax(-1) == generated).all()
    assert np.abs(theirs - expected).max() < 1e-4


def test_the_default_cpu_kv_cache_is_float16(tiny_dir, tmp_path):
    prompt, generated, theirs = decode_logprobs(tiny_dir, tmp_path, kv_f32=False)
    err = np.abs(theirs - ours("tiny", prompt, generated)).max()
    assert 1e-4 < err < 1e-2  # float16 keys and values: ~1e-3, where the f32 cache gives ~1e-5


def test_27b_like_query_scale_and_window(tmp_path):
    cfg = g2.load_model("tiny").config.replace(
        hidden_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        intermediate_size=192,
        sliding_window=8,
    )
    ckpt = save_checkpoint(
        tmp_path / "27b",
        cfg,
        random_weights(cfg, seed=3, scale=2.0),
        dtype="F32",
        config_style="old",
        tokenizer=resolve_checkpoint("tiny") / "tokenizer.model",
    )
    prompt, generated, theirs = decode_logprobs(local_directory(ckpt, tmp_path / "mrs"), tmp_path)
    assert np.abs(theirs - ours(ckpt, prompt, generated)).max() < 1e-4

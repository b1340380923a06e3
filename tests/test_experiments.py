"""The toy-scale experiments and tiny-it (scripts/experiments.py, walkthrough chapters 14 and 15), checked
without retraining: the committed log, the bundled tiny-it, the chat data, the figures script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref.data import DATA_DIR, bundled_names
from gemma2_ref.generate import generate
from tests.helpers.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
LOG = SCRIPTS / "experiments.log.json"
tiny_corpus = load_script("tiny_corpus")
CORPUS, chat_pairs, encode_pair, eval_prompts = (
    tiny_corpus.CORPUS,
    tiny_corpus.chat_pairs,
    tiny_corpus.encode_pair,
    tiny_corpus.eval_prompts,
)
reflow, split_pairs, unseen = tiny_corpus.reflow, tiny_corpus.split_pairs, tiny_corpus.unseen

STAGES = ("tiny-it", "distill-vs-scratch", "deep-vs-wide", "gqa-vs-mha", "window", "softcap", "on-policy")


@pytest.fixture(scope="module")
def log():
    return json.loads(LOG.read_text())


@pytest.fixture(scope="module")
def pairs():
    """(train, held-out) chat pairs, as scripts/experiments.py made them."""
    return split_pairs(chat_pairs(reflow(CORPUS.read_text()), g2.load_tokenizer("tiny-it")))


def test_log_records_every_stage_with_machine_load_and_wall_time(log):
    assert set(STAGES) <= set(log)
    for stage in STAGES:
        run = log[stage]["run"]
        assert run["wall_s"] > 0 and len(run["loadavg_start"]) == 3 and len(run["loadavg_end"]) == 3
        assert run["machine"] and run["threads"] == 1 and run["command"].startswith("python scripts/experiments.py")


def test_the_whole_set_took_under_an_hour_of_cpu_time_on_one_thread(log):
    """Wall time depends on what else the machine runs (the log records the load average); CPU time of the
    single training thread is the work itself."""
    assert sum(log[s]["run"]["cpu_s"] for s in STAGES) < 3600


def test_distilled_and_scratch_runs_saw_the_same_steps_tokens_init_and_batches(log):
    d, s = log["distill-vs-scratch"]["distilled"], log["distill-vs-scratch"]["scratch"]
    for key in ("steps", "tokens", "batch", "init_seed", "data_seed", "peak_lr", "params"):
        assert d[key] == s[key], key
    assert [p["tokens"] for p in d["curve"]] == [p["tokens"] for p in s["curve"]]


def test_deep_and_wide_have_the_tiny_models_parameter_count_within_three_percent(log):
    base = log["deep-vs-wide"]["base (4 x 128)"]["params"]
    for name in ("deep (8 x 88)", "wide (2 x 184)"):
        assert abs(log["deep-vs-wide"][name]["params"] / base - 1) < 0.03


def test_mha_cache_is_twice_the_gqa_cache_for_the_keys_and_values(log):
    g = log["gqa-vs-mha"]["generate"]
    cfg = g2.load_model("tiny").config
    positions = g["prompt_tokens"] + g["new_tokens"]
    slots = [cfg.sliding_window if cfg.is_sliding(i) else positions for i in range(cfg.num_hidden_layers)]
    for key, K in (("gqa", 2), ("mha", 4)):
        assert g[key]["cache_bytes"] == sum(s * (2 * K * cfg.head_dim * 4 + 8) for s in slots)


def test_removing_the_final_softcap_never_changes_the_greedy_token(log):
    """tanh is monotonic: the argmax of capped and uncapped logits is the same token."""
    assert log["softcap"]["variants"]["no final cap"]["top1_agreement_with_trained"] == 1.0


# -- tiny-it, the bundled chat model ------------------------------------------------------------------------


def test_tiny_it_is_bundled_like_tiny_with_the_same_shape_and_tokenizer():
    assert {"tiny", "tiny-it"} <= set(bundled_names())
    it, base = g2.load_model("tiny-it"), g2.load_model("tiny")
    assert it.config == base.config
    tokenizer = (DATA_DIR / "tiny-it" / "tokenizer.model").read_bytes()
    assert tokenizer == (DATA_DIR / "tiny" / "tokenizer.model").read_bytes()
    assert (DATA_DIR / "tiny-it" / "model.safetensors").stat().st_size < 5 * 2**20
    assert not np.array_equal(it.weights.tensor("model.norm.weight"), base.weights.tensor("model.norm.weight"))


def test_tiny_it_ends_held_out_chat_turns_with_greedy_decoding(pairs):
    train_pairs, held_pairs = pairs
    tok = g2.load_tokenizer("tiny-it")
    prompts = unseen(eval_prompts(held_pairs, 100), train_pairs)[:10]
    ended = 0
    with g2.load_model("tiny-it", keep_converted=True) as m:
        for p in prompts:
            out = generate(m, tok.encode_chat(p["prompt"]), max_new_tokens=64)
            ended += out.stop_reason == "stop" and out.tokens[-1] == tok.end_of_turn_id
    assert ended >= 9, f"tiny-it ended {ended} of 10 held-out chat turns"


def test_generate_tiny_it_chat_stops_on_end_of_turn_from_the_command_line():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gemma2_ref.cli",
            "generate",
            "tiny-it",
            "--chat",
            "--prompt",
            "Tell me about the assert statement.",
            "--show-ids",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    new_ids = [line for line in result.stdout.splitlines() if line.startswith("new ids:")][0].split()[2:]
    assert new_ids[-1] == "107" and "stopped: stop token" in result.stderr


def test_logged_end_of_turn_fraction_reaches_the_goal_and_tiny_never_ends_a_turn(log):
    assert log["tiny-it"]["run A (seed 100) = tiny-it"]["chat"]["ended_fraction"] >= 0.9
    assert log["tiny-it"]["tiny (before SFT)"]["chat"]["ended_fraction"] < 0.1


def test_tiny_it_reproduces_its_logged_generations(log):
    tok = g2.load_tokenizer("tiny-it")
    with g2.load_model("tiny-it", keep_converted=True) as m:
        for s in log["tiny-it"]["run A (seed 100) = tiny-it"]["chat"]["samples"][:2]:
            out = generate(m, tok.encode_chat(s["prompt"]), max_new_tokens=64)
            assert tok.decode(out.tokens) == s["generated"]


# -- the chat data ------------------------------------------------------------------------------------------


def test_held_out_chat_pairs_come_from_sections_never_trained_on():
    tok = g2.load_tokenizer("tiny")
    train, held = split_pairs(chat_pairs(reflow(CORPUS.read_text()), tok))
    assert held and train
    assert not {p["section"] for p in train} & {p["section"] for p in held}
    clean = unseen(held, train)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in clean}
    assert len(held) - len(clean) == 30  # sentences the reference repeats across sections (chapter 15 says so)


def test_a_chat_sequence_is_the_chat_prompt_then_the_turn_ending_with_end_of_turn_and_eos():
    tok = g2.load_tokenizer("tiny")
    pair = {"prompt": "Tell me about loops.", "response": "A loop repeats a block."}
    ids, start = encode_pair(tok, pair)
    assert ids[:start] == tok.encode_chat(pair["prompt"])
    assert ids[-2:] == [tok.end_of_turn_id, tok.eos_id]
    assert tok.decode(ids[start:-2]) == pair["response"]


# -- the chapters and figures -------------------------------------------------------------------------------


def test_chapter_14_prints_the_logged_distilled_and_scratch_numbers(log):
    text = (ROOT / "walkthrough" / "14-experiments.md").read_text()
    for name in ("distilled", "scratch"):
        ce = log["distill-vs-scratch"][name]["final"]["held_out_ce"]
        assert re.search(rf"^{name}\s.*\s{ce:.3f}\s", text, re.M), (name, f"{ce:.3f}")


def test_chapter_15_prints_the_logged_end_of_turn_fraction(log):
    text = (ROOT / "walkthrough" / "15-post-training.md").read_text()
    c = log["tiny-it"]["run A (seed 100) = tiny-it"]["chat"]
    assert f"{c['ended_turn']:3d}/{c['prompts']} = {c['ended_fraction']:4.0%}" in text


def test_plot_script_makes_every_figure_chapters_14_and_15_embed(tmp_path):
    embedded = set()
    for name in ("14-experiments.md", "15-post-training.md"):
        embedded |= set(re.findall(r"!\[[^\]]*\]\(figures/([^)]+\.png)\)", (ROOT / "walkthrough" / name).read_text()))
    env = dict(os.environ, MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "plot_experiments.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    made = {p.name for p in tmp_path.glob("*.png")}
    assert embedded and embedded <= made
    assert all((ROOT / "walkthrough" / "figures" / n).is_file() for n in embedded)

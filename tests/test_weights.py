"""Loading checkpoints: exact dtype conversion, sharding, and a clear refusal of every broken checkpoint."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as st_load_torch
from safetensors.torch import save_file as st_save_torch

import gemma2_ref as g2
from gemma2_ref.checkpoints import random_weights, save_checkpoint
from gemma2_ref.weights import (
    WeightsError,
    bf16_bits_to_f32,
    f32_to_bf16_bits,
    read_safetensors_header,
    write_safetensors,
)

CFG = g2.PRESETS["tiny"].replace(
    num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"), vocab_size=300
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_bf16_rounding_equals_torch_round_to_nearest_even(values):
    x = np.array(values, dtype=np.float32)
    ours = f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(bf16_bits_to_f32(ours), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_bf16_ties_round_to_even():
    # 1 + 2^-8 lies exactly between bf16 neighbours 1 and 1 + 2^-7: rounds to the even one, 1.0
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    np.testing.assert_array_equal(bf16_bits_to_f32(f32_to_bf16_bits(x)), [1.0, 1 + 2**-6])


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_our_safetensors_files_read_back_identically_with_the_safetensors_library(tmp_path, dtype):
    tensors = {
        "b": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32),
        "a": np.arange(4.0, dtype=np.float32),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, dtype)
    theirs = st_load_torch(tmp_path / "x.safetensors")
    for name, a in tensors.items():
        expected = torch.from_numpy(a).to({"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype])
        assert torch.equal(theirs[name], expected)


def test_files_written_by_the_safetensors_library_load_exactly(tmp_path):
    cfg = CFG
    weights = random_weights(cfg, seed=1)
    save_checkpoint(tmp_path, cfg, weights, "F32")
    st_save_torch(
        {k: torch.from_numpy(v).to(torch.float16) for k, v in weights.items()},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    model = g2.load_model(tmp_path)
    assert model.weights.stored_dtypes == ["F16"]
    np.testing.assert_array_equal(
        model.weights.embedding(), weights["model.embed_tokens.weight"].astype(np.float16).astype(np.float32)
    )


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("shards", [1, 3])
def test_single_and_sharded_checkpoints_in_every_dtype_give_the_same_logits(tmp_path, dtype, shards):
    weights = random_weights(CFG, seed=2)
    reference = g2.load_model(save_checkpoint(tmp_path / "ref", CFG, weights, dtype))
    model = g2.load_model(save_checkpoint(tmp_path / "x", CFG, weights, dtype, shards=shards))
    assert len(model.weights.files) == shards
    ids = [2, 10, 20, 30]
    np.testing.assert_array_equal(model.logits(ids), reference.logits(ids))


def test_the_old_config_format_loads_the_same_model(tmp_path):
    weights = random_weights(CFG, seed=3)
    new = g2.load_model(save_checkpoint(tmp_path / "new", CFG, weights, config_style="new"))
    old = g2.load_model(save_checkpoint(tmp_path / "old", CFG, weights, config_style="old"))
    assert old.config == new.config
    np.testing.assert_array_equal(old.logits([2, 5, 6]), new.logits([2, 5, 6]))


# -- broken checkpoints ------------------------------------------------------------------------------------


def _open_fds_under(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]
    return found + maps


def _checkpoint(tmp_path, shards=1, dtype="BF16"):
    return save_checkpoint(tmp_path / "ckpt", CFG, random_weights(CFG, seed=4), dtype, shards=shards)


def _rewrite(path: Path, edit):
    """Rewrite one safetensors file after `edit(tensors dict)`, keeping the dtype."""
    header, _ = read_safetensors_header(path)
    model = g2.load_model(path.parent)
    tensors = {n: model.weights.tensor(n) for n in header}
    model.close()
    dtype = next(iter(header.values())).dtype
    edit(tensors)
    write_safetensors(path, tensors, dtype)


def _expect_refusal(ckpt: Path, *fragments):
    with pytest.raises(WeightsError) as e:
        g2.load_model(ckpt)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    assert _open_fds_under(ckpt) == []  # nothing left open or mapped: nothing half-loaded
    return str(e.value)


def test_a_missing_tensor_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path)
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _expect_refusal(ckpt, "missing tensor(s) model.layers.1.mlp.up_proj.weight", "num_hidden_layers=2")


def test_an_unexpected_tensor_is_named_with_its_file(tmp_path):
    ckpt = _checkpoint(tmp_path)
    _rewrite(ckpt / "model.safetensors", lambda t: t.__setitem__("lm_head.weight", np.zeros((3, 3), np.float32)))
    _expect_refusal(ckpt, "unexpected tensor(s) lm_head.weight", "model.safetensors")


def test_a_misshaped_tensor_is_named_with_expected_and_found_shapes(tmp_path):
    ckpt = _checkpoint(tmp_path)
    _rewrite(
        ckpt / "model.safetensors",
        lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((64, 128), np.float32)),
    )
    _expect_refusal(ckpt, "model.layers.0.self_attn.k_proj.weight", "has shape [64, 128], expected [128, 128]")


def test_a_truncated_file_is_refused_naming_the_tensor_that_is_cut(tmp_path):
    ckpt = _checkpoint(tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _expect_refusal(ckpt, "truncated", "model.safetensors")


def test_a_file_cut_inside_its_header_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    _expect_refusal(ckpt, "model.safetensors", "truncated")


def test_an_integer_tensor_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path, dtype="F32")
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "I32"
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    f.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :])
    _expect_refusal(ckpt, "model.norm.weight", "I32")


def test_a_shard_listed_in_the_index_but_absent_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path, shards=2)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    _expect_refusal(ckpt, "model-00002-of-00002.safetensors", "not in")


def test_an_index_that_points_to_the_wrong_shard_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path, shards=2)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = (
        "model-00001-of-00002.safetensors"
        if index["weight_map"]["model.norm.weight"].startswith("model-00002")
        else "model-00002-of-00002.safetensors"
    )
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_refusal(ckpt, "model.norm.weight")


def test_a_directory_without_weights_says_what_it_expected(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "model.safetensors").rename(ckpt / "weights.safetensors")
    _expect_refusal(ckpt, "no model.safetensors or model.safetensors.index.json", "weights.safetensors")


def test_config_and_weights_that_disagree_are_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"], config["layer_types"] = 3, config["layer_types"] + ["sliding_attention"]
    (ckpt / "config.json").write_text(json.dumps(config))
    _expect_refusal(ckpt, "missing tensor(s) model.layers.2.")


def test_load_model_explains_presets_and_unknown_names():
    with pytest.raises(ValueError, match="preset without weights"):
        g2.load_model("9b")
    with pytest.raises(FileNotFoundError, match="not a directory, nor a bundled model"):
        g2.load_model("no/such/dir")
    with pytest.raises(ValueError, match="dtype must be one of"):
        g2.load_model("tiny", dtype="bfloat16")


@pytest.mark.parametrize(
    "ids, message",
    [
        ([], "empty"),
        ([2, 5000], "token id 5000 at index (1,) is outside the vocabulary"),
        ([2, -1], "outside the vocabulary"),
        ([2.5, 3.0], "must be integers"),
        ([[[2]]], "1-D (seq,) or 2-D"),
    ],
)
def test_bad_token_ids_are_refused_clearly(ids, message):
    model = g2.load_model("tiny")
    with pytest.raises(ValueError) as e:
        model.logits(ids)
    assert message in str(e.value)


def test_the_bundled_bf16_weights_convert_exactly_as_torch_converts_them():
    model = g2.load_model("tiny")
    theirs = st_load_torch(model.path / "model.safetensors")  # numpy has no bf16: torch is the referee
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_array_equal(model.weights.tensor(name), theirs[name].float().numpy())


def test_forward_runs_on_plain_arrays_as_it_does_on_a_memory_mapped_checkpoint(tmp_path):
    """A REPL needs no files: model.forward takes any provider of embedding(), layer(i), final_norm()."""
    from gemma2_ref.loader import ArrayWeights
    from gemma2_ref.model import forward

    tensors = random_weights(CFG, seed=3)
    ids = np.array([2, 7, 9, 11, 40])
    in_memory = forward(ArrayWeights.from_tensors(CFG, tensors), CFG, ids, taps="residual")
    on_disk = g2.load_model(save_checkpoint(tmp_path / "ck", CFG, tensors, "F32")).forward(ids, taps="residual")
    assert in_memory.keys() == on_disk.keys()
    for name in on_disk:
        np.testing.assert_array_equal(in_memory[name], on_disk[name])

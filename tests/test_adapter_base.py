"""The adapter protocol (gemma2_ref/adapters/base.py): every registered backend declares it whole, its declared
capabilities are what its write_golden accepts, and write_candidate records the producer, model and decode
steps the way every adapter used to write them by hand. NumPy only: no engine is imported."""

import importlib
import inspect
import types

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref.adapters import BACKENDS, load_adapter
from gemma2_ref.adapters.base import Capabilities, check_protocol, wanted_taps, write_candidate
from gemma2_ref.storage.loader import resolve_checkpoint


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_backend_declares_the_protocol(backend):
    module = load_adapter(backend)  # importing an adapter imports no engine
    assert isinstance(module.CAPABILITIES, Capabilities)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_declared_capabilities_are_what_write_golden_accepts(backend):
    module = importlib.import_module(BACKENDS[backend])
    params = inspect.signature(module.write_golden).parameters
    assert module.CAPABILITIES.padded_batch == ("attention_mask" in params)
    assert module.CAPABILITIES.decode == ("prefill" in params)


def test_a_module_lacking_part_of_the_protocol_is_refused_naming_it():
    lame = types.ModuleType("lame")
    lame.CAPABILITIES, lame.reachable_taps = Capabilities(), lambda cfg: []
    with pytest.raises(TypeError, match="lame lacks backend_options, write_golden"):
        check_protocol(lame)


def test_capabilities_refuse_the_cases_a_backend_cannot_run():
    assert Capabilities().refusal("x", {"attention_mask": 1}) == "the x adapter does not run padded batches"
    assert (
        Capabilities(padded_batch=True).refusal("x", {"prefill": 3}) == "the x adapter does not run a KV-cache decode"
    )
    assert Capabilities(padded_batch=True, decode=True).refusal("x", {"attention_mask": 1, "prefill": 3}) is None


def test_a_decode_capture_wants_no_attention_matrices():
    cfg = g2.load_model("tiny").config
    assert "layers.0.attn.probs" in wanted_taps(cfg, "all")
    decode = wanted_taps(cfg, "all", decode=True)
    assert "logits" in decode and not any(n.endswith(("attn.scores", "attn.probs")) for n in decode)
    assert wanted_taps(cfg, ["embed"]) == {"embed", "logits"}


def test_write_candidate_records_producer_adapter_model_and_decode_steps(tmp_path):
    model = g2.load_model("tiny")
    ids = np.array([2, 5, 9, 11, 4])
    acts = model.forward(ids, taps=["embed"])
    out = write_candidate(
        tmp_path / "c",
        acts,
        ids,
        checkpoint=resolve_checkpoint("tiny"),
        cfg=model.config,
        producer={"name": "engine", "version": "1"},
        adapter="gemma2_ref.adapters.x",
        compute_dtype="float32",
        prefill=3,
    )
    case = G.load_case(out)
    assert case.manifest["producer"] == {"name": "engine", "version": "1", "adapter": "gemma2_ref.adapters.x"}
    decode = case.manifest["extra"]["decode"]
    assert (decode["prefill"], decode["steps"]) == (3, 2)
    assert case.manifest["model"]["weights"] == G.model_info(model, "tiny")["weights"]

"""Zero false alarms on llama.cpp: a clean f32 and a clean bf16 GGUF (llama.cpp's own converter, run by
llama-cpp-python) diagnosed against our float32 golden name no known mistake, under the profile `compare`'s
auto picks for each and under the one the backend docs recommend, and the precision stage does not claim a
bfloat16 rounding for a backend that keeps its activations in float32 (llama.cpp rounds only at its matmuls)."""

import pytest

import gemma2_ref as g2
from gemma2_ref import golden as G
from gemma2_ref.adapters import llamacpp as adapter
from gemma2_ref.compare import PROFILES, auto_profile
from gemma2_ref.diagnose import diagnose, format_diagnosis
from gemma2_ref.suites import generate_case
from tests.helpers.llamacpp_cases import RANDOM_IDS, backends, random_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    backends()
    d = tmp_path_factory.mktemp("llamacpp-diag")
    ckpt = random_checkpoint(d / "random")
    model = g2.load_model(ckpt)
    return ckpt, model, G.load_case(generate_case(model, RANDOM_IDS, d / "ours", taps="default"))


@pytest.mark.parametrize("outtype, recommended", [("f32", "fp16"), ("bf16", "bf16")])
def test_a_clean_llamacpp_gguf_names_no_mistake(setup, tmp_path, outtype, recommended):
    ckpt, model, reference = setup
    cand = G.load_case(adapter.write_golden(ckpt, RANDOM_IDS, tmp_path / outtype, dtype=outtype, taps="default"))
    for profile in {auto_profile(cand), recommended}:
        diag = diagnose(model, reference, cand, PROFILES[profile])
        assert not diag.named, f"{outtype} under {profile}:\n{format_diagnosis(diag)}"
        if diag.rounding is not None:
            assert diag.rounding.named is None, format_diagnosis(diag)

"""A golden never dies of memory (issue 20): cases are streamed to disk tap by tap, read back tap by tap, and a
case that cannot fit is refused before any work.

Each test can fail: hold the taps in memory again (a sink that keeps them) and the memory test fails; write a
tap at the wrong offset and the bit-identity test fails; drop the address-space limit from available_memory
and the setrlimit test dies of MemoryError instead of exit 2.
"""

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import gemma2_ref as g2
from gemma2_ref import compare as C
from gemma2_ref import golden as G
from gemma2_ref import suites as S
from gemma2_ref.model.taps import tap_bytes
from gemma2_ref.storage.loader import Model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return g2.load_model("tiny")


@pytest.mark.parametrize("taps, positions", [("all", None), ("default", (30, 40)), ("residual", (0, 1))])
def test_a_streamed_case_is_bit_identical_to_one_written_whole(tmp_path, tiny, taps, positions):
    ids = np.arange(2, 42)
    S.generate_case(tiny, ids, tmp_path / "streamed", taps=taps, positions=positions)
    G.write_case(
        tmp_path / "whole",
        tiny.forward(ids, taps=taps),
        ids,
        model=g2.golden.model_info(tiny),
        compute_dtype="float32",
        positions=positions,
    )
    streamed, whole = (tmp_path / d / G.ACTIVATIONS_FILE for d in ("streamed", "whole"))
    m1, m2 = (json.loads((tmp_path / d / G.MANIFEST).read_text()) for d in ("streamed", "whole"))
    assert m1["input"] == m2["input"]
    if positions is None:
        assert streamed.read_bytes() == whole.read_bytes()
        assert m1["taps"] == m2["taps"]
        return
    # the output head ran at the stored positions only: BLAS may sum a 1-row product in another order
    a, b = G.load_case(streamed.parent), G.load_case(whole.parent)
    for name in a.tap_names:
        if name in ("logits_raw", "logits"):
            np.testing.assert_allclose(a.activations[name], b.activations[name], rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(a.activations[name], b.activations[name])


def test_a_batched_case_streams_too(tmp_path, tiny):
    ids = np.stack([np.arange(2, 22), np.arange(30, 50)])
    S.generate_case(tiny, ids, tmp_path / "b", taps="default", positions=(15, 20))
    case = G.load_case(tmp_path / "b")
    whole = tiny.forward(ids, taps="default")
    assert case.activations["layers.2.mlp.up"].shape == (2, 5, tiny.config.intermediate_size)
    np.testing.assert_array_equal(case.activations["layers.2.mlp.up"], whole["layers.2.mlp.up"][:, 15:20])
    # the output head ran on the 5 stored rows only: another matmul shape, which OpenBLAS may round differently
    # (numpy 2.3's OpenBLAS 0.3.30 does on AMD EPYC), so equal to float32 rounding, not bit for bit
    np.testing.assert_allclose(case.activations["logits"], whole["logits"][:, 15:20], rtol=1e-6, atol=1e-6)


def test_streaming_holds_one_tap_at_a_time_not_the_case(tmp_path, tiny):
    ids = np.arange(2, 2002)  # 2000 tokens, every tap: scores and probs are (H, S, S) per layer
    # past the bundled model's 512-token context, which the forward refuses: the same weights with a longer one
    tiny = Model(tiny.config.replace(max_position_embeddings=2048), tiny.weights, tiny.dtype, tiny.path)
    held = tap_bytes(tiny.config, "all", 1, len(ids))  # what a forward returning them all holds
    budget = S.case_budget(tiny.config, "all", ids, rows=4)["memory"]
    tiny.forward(ids[:3])  # weights converted before measuring
    tracemalloc.start()
    try:
        S.generate_case(tiny, ids, tmp_path / "c", taps="all", positions=(1996, 2000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < held / 2, (peak, held)  # one layer's taps at a time, not the case's
    assert peak < budget, (peak, budget)  # and the estimate covers what it took
    assert G.load_case(tmp_path / "c").activations["layers.3.attn.probs"].shape == (4, 4, 2000)


def test_a_case_is_compared_through_memory_maps_tap_by_tap(tmp_path, tiny):
    ids = np.arange(2, 42)
    S.generate_case(tiny, ids, tmp_path / "c", taps="default")
    case = G.load_case(tmp_path / "c")
    assert isinstance(case.activations, G.MappedTensors)
    a = case.activations["layers.1.output"]
    assert not a.flags.writeable and not a.flags.owndata  # a view of the file, not a copy
    report = C.compare_cases(case, G.load_case(tmp_path / "c"), C.PROFILES["fp32"])
    assert report.passed


def test_blocked_metrics_equal_the_whole_array_ones(monkeypatch):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 50)).astype(np.float32)
    cand = (ref * 1.5 + rng.normal(size=ref.shape) * 1e-3).astype(np.float32)
    cand[4, 7] = ref[4, 7] + 3.0  # the largest error, in a late block
    profile = C.PROFILES["fp32"]
    whole = C.compare_tap("logits", ref, cand, profile)
    monkeypatch.setattr(C, "BLOCK_VALUES", 64)  # blocks of 1 row for logits, 64 values otherwise
    blocked = C.compare_tap("logits", ref, cand, profile)
    assert blocked.max_abs_index == whole.max_abs_index == [4, 7]
    for field in ("max_abs", "rel_l2", "cosine", "max_rel"):
        assert getattr(blocked, field) == pytest.approx(getattr(whole, field), rel=1e-12), field
    assert blocked.logits.pop("kl_max_position") == whole.logits.pop("kl_max_position")
    assert blocked.logits == pytest.approx(whole.logits, rel=1e-12)
    scaled = (ref * 1.5).astype(np.float32)
    fit = C.compare_tap("layers.0.output", ref, scaled, profile).scale_fit
    assert fit["scale"] == pytest.approx(1.5, rel=1e-6) and fit["rel_l2_after"] < 1e-6
    assert C.first_failing_row(ref, cand, 1e-2) == 0
    cand2 = ref.copy()
    cand2[5] += 1
    assert C.first_failing_row(ref, cand2, 1e-2) == 5


RUN_UNDER_LIMIT = textwrap.dedent("""
    import resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from gemma2_ref.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def run_limited(limit: int, *argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", RUN_UNDER_LIMIT, str(limit), *map(str, argv)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_under_an_address_space_limit_a_case_completes_or_is_refused_up_front(tmp_path):
    from gemma2_ref.checkpoints import build_random_checkpoint, preset_config

    model = build_random_checkpoint(
        tmp_path / "m", preset_config("tiny").replace(max_position_embeddings=8192), log=lambda *a: None
    )  # the tiny shapes, a context of 8192
    base = (
        int(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import gemma2_ref, numpy; print(open('/proc/self/status').read().split('VmSize:')[1].split()[0])",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
            ).stdout
        )
        * 1024
    )
    limit = base + (400 << 20)
    ids = " ".join(["2"] + ["651"] * 1500)
    fits = run_limited(limit, "golden", model, "--tokens", ids, "--taps", "default", "--out", tmp_path / "fits")
    assert fits.returncode == 0, fits.stderr[-2000:]
    case = G.load_case(tmp_path / "fits")
    assert case.activations["logits"].shape == (1501, 2048)
    # the whole (H, S, S) attention of 6000 tokens does not fit: refused with the options, before any work
    long = " ".join(["2"] + ["651"] * 6000)
    refused = run_limited(limit, "golden", model, "--tokens", long, "--taps", "all", "--out", tmp_path / "no")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "it would be killed. What fits:" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "no").exists()


KILL_MID_CASE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import gemma2_ref as g2
    from gemma2_ref import golden, suites
    written = []
    add = golden.CaseWriter.add
    def add_then_die(self, name, a):
        add(self, name, a)
        written.append(name)
        if len(written) == 10:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup can run: as the kernel's OOM killer does
    golden.CaseWriter.add = add_then_die
    suites.generate_case(g2.load_model("tiny"), np.arange(2, 40), sys.argv[1], taps="default")
""")


def test_a_run_killed_mid_case_leaves_nothing_a_later_command_accepts(tmp_path, capsys):
    from gemma2_ref.cli import main

    out = tmp_path / "g"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_CASE, str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9
    assert not out.exists()
    left = G.interrupted_writes(out)
    assert len(left) == 1 and (left[0] / G.ACTIVATIONS_FILE).exists() and not (left[0] / G.MANIFEST).exists()
    for path in (out, left[0]):
        with pytest.raises(G.GoldenError):
            G.load_golden(path)
    assert main(["compare", str(left[0]), str(REPO / "golden" / "short")]) == 2
    assert main(["golden", "tiny", "--tokens", "2 651 652", "--out", str(out)]) == 0  # the same --out works
    assert f"{left[0]} " in capsys.readouterr().err  # and names what the killed run left
    G.load_case(out)


def test_diagnose_reruns_a_variant_only_at_the_positions_the_candidate_stores(tmp_path, tiny):
    from gemma2_ref.diagnose import diagnose, variant_trace
    from gemma2_ref.mistakes import inject

    reference = G.load_case(REPO / "golden" / "window")  # 34 tokens, window 32: every position stored
    ids = reference.token_ids
    S.generate_case(inject(tiny, "no_sliding_window"), ids, tmp_path / "cand", taps="default", positions=(30, 34))
    candidate = G.load_case(tmp_path / "cand")
    trace, rows = variant_trace(tiny, ids, candidate.tap_names, None, candidate, len(ids))
    assert tuple(rows) == (30, 34) and trace["layers.0.mlp.up"].shape[0] == 4 and trace["logits"].shape[0] == 4
    diag = diagnose(tiny, reference, candidate, C.PROFILES["fp32"])
    assert diag.named[0].variant.name == "no_sliding_window" and diag.named[0].verdict == "matches"

"""The corpus on Ray (gemma2_ref/verify/corpus_ray.py): a local cluster on 127.0.0.1 only, the same shard bytes
from 1 process and from 2 Ray workers, a worker SIGKILLed mid-shard (its shard runs again, is named, and the golden
is byte-identical), a SIGKILLed driver (the rerun resumes), a node that cannot see a path (an error naming it).

Each cluster is started and stopped by its test (the module's fixture, or the CLI it runs in its own session),
bounded in time; no Ray process is left behind, also when a test fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gemma2_ref.cli.main import main
from gemma2_ref.storage.loader import resolve_checkpoint
from gemma2_ref.verify import corpus as corpus_mod
from gemma2_ref.verify.corpus import PLAN, ShardTask, plan_sha256, write_corpus
from gemma2_ref.verify.corpus_ray import (
    ClusterError,
    RayExecutor,
    cluster_pids,
    import_ray,
    local_cluster,
    pid_alive,
    visibility_problem,
)
from tests.helpers import ray_cluster as rc

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(ctx=64, chunks=8, shard_chunks=1)  # 8 shards of one 64-token chunk of the bundled corpus


def cli(*args, env=None, **kw):
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "gemma2_ref.cli", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def finish(proc, seconds: int):
    """stdout, stderr, exit code of a CLI process; on a timeout its whole session is killed and the test fails."""
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        rc.kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"the CLI ran past {seconds} s:\n{err[-3000:]}")
    finally:
        rc.kill_session(proc.pid)  # whatever of its session outlived it (Ray's agents)
    return out, err, proc.returncode


def golden_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def serial_golden(tmp_path_factory):
    """The small corpus golden from one process with one BLAS thread (the env var, read when NumPy loads)."""
    out = tmp_path_factory.mktemp("serial") / "golden"
    code = (
        f"from gemma2_ref.verify.corpus import write_corpus; write_corpus('tiny', {str(out)!r}, ctx=64, "
        f"chunks=8, shard_chunks=1, log=lambda m: None)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU cluster for this module's in-process tests; shut down at the end, no process left."""
    pytest.importorskip("ray")
    ray = import_ray()
    ray.cloudpickle.register_pickle_by_value(rc)  # the stand-ins: tests/ is not on the workers' path
    temp = tempfile.mkdtemp(prefix="g2r-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    cm = local_cluster(2, temp_dir=temp)
    before = set(rc.descendants(os.getpid()))  # children of earlier tests (vLLM's engine core, ...): not Ray's
    with rc.bounded(180, "starting a local Ray cluster"):
        ray = cm.__enter__()
    started = (cluster_pids(ray) | rc.descendants(os.getpid())) - before
    try:
        yield ray
    finally:
        cm.__exit__(None, None, None)
        left = [p for p in started if pid_alive(p) and p != os.getpid()]
        assert not left, f"Ray processes left after shutdown: {left}"
        assert not [p for p in rc.all_pids() if temp in rc.cmdline(p)], "a process of the test cluster survived"
        shutil.rmtree(temp, ignore_errors=True)  # Ray's session logs


def stand_in_tasks(tmp_path, n=4, model=None):
    """n ShardTasks of a plan whose plan.json is written into out (as write_corpus does before any shard)."""
    out = tmp_path / "out"
    out.mkdir()
    plan = {"kind": "stand-in", "n": n}
    (out / PLAN).write_text(json.dumps(plan))
    model = str(resolve_checkpoint("tiny")) if model is None else model
    tasks = [
        ShardTask(
            shard=i,
            chunks=(i, i + 1),
            tokens=b"",
            ctx=4,
            top_k=1,
            vocab_size=8,
            model=model,
            dtype="float32",
            plan=plan_sha256(plan),
        )
        for i in range(n)
    ]
    return tasks, out


# -- without Ray ----------------------------------------------------------------------------------------


def test_workers_2_without_ray_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["corpus", "tiny", "--out", str(tmp_path / "g"), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'gemma2-ref[ray]'" in err[0] and "--workers 2" in err[0], err
    assert not (tmp_path / "g").exists()  # refused before any work


def test_workers_1_without_ray_runs_here(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "g"
    assert main(["corpus", "tiny", "--out", str(out), "--workers", "1", "--ctx", "64", "--chunks", "2"]) == 0
    assert (out / "manifest.json").is_file()


def test_blas_threads_without_ray_workers_is_refused_not_ignored(tmp_path, capsys):
    assert main(["corpus", "tiny", "--out", str(tmp_path / "g"), "--blas-threads", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--blas-threads is for Ray workers" in err[0] and "OPENBLAS_NUM_THREADS" in err[0], err
    assert not (tmp_path / "g").exists()


def test_visibility_problem_names_the_path_a_worker_cannot_see(tmp_path):
    tasks, out = stand_in_tasks(tmp_path)
    assert visibility_problem(tasks[0], out) is None
    missing = dataclasses.replace(tasks[0], model=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in visibility_problem(missing, out)
    assert "--out directory" in visibility_problem(tasks[0], tmp_path / "elsewhere")
    other = tmp_path / "other"
    other.mkdir()
    (other / PLAN).write_text(json.dumps({"kind": "another run"}))
    assert "another --out directory" in visibility_problem(tasks[0], other)  # same path, another disk's copy


# -- a local cluster ------------------------------------------------------------------------------------


def test_local_cluster_listens_on_loopback_only_and_pins_one_blas_thread(cluster, tmp_path):
    tasks, out = stand_in_tasks(tmp_path, n=2)
    ex = RayExecutor(workers=2, start_timeout=120, shard_timeout=60, load=rc.stand_in_load, run=rc.stand_in_run)
    gen = ex(tasks, out)
    next(gen)  # the workers are up: their listeners exist
    ours = cluster_pids(cluster) | rc.descendants(os.getpid()) | {i["pid"] for i in ex.worker_info}
    found = [(addr, pid) for addr, pid in rc.listeners() if pid in ours]
    list(gen)
    assert len({pid for _, pid in found}) >= 3, found  # gcs_server, raylet, the workers
    assert {addr for addr, _ in found} == {"127.0.0.1"}, found
    assert len(ex.worker_info) == 2
    for info in ex.worker_info:
        assert info["blas"] == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_two_ray_workers_write_the_bytes_of_one_process(cluster, serial_golden, tmp_path):
    ex = RayExecutor(workers=2, start_timeout=120, shard_timeout=120, log=lambda m: None)
    out = write_corpus("tiny", tmp_path / "ray", executor=ex, log=lambda m: None, **SMALL)
    assert len({i["pid"] for i in ex.worker_info}) == 2 and ex.retried == []
    ref, got = golden_bytes(serial_golden), golden_bytes(out)
    assert sorted(got) == sorted(ref) and len(ref) == 8 + 2  # 8 shards, plan.json, manifest.json
    for name in ref:
        assert got[name] == ref[name], f"{name} differs between 1 process and 2 Ray workers"


def test_worker_killed_mid_shard_runs_it_again_and_golden_is_unchanged(cluster, serial_golden, tmp_path):
    logged = []
    ex = RayExecutor(
        workers=2, retries=2, start_timeout=120, shard_timeout=120, run=rc.slow_real_run, log=logged.append
    )
    out = tmp_path / "ray"
    killed = []

    def kill_first_started(_msg):
        """At the first progress line: SIGKILL the worker holding a shard that has started and not finished."""
        done = {p.name for p in out.glob("shard-*.safetensors")}
        for shard, pid in rc.markers(out):
            if not killed and corpus_mod.shard_file(shard) not in done and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(shard)

    with rc.bounded(240, "the corpus with a killed worker"):
        write_corpus("tiny", out, executor=ex, log=kill_first_started, **SMALL)
    assert len(killed) == 1
    assert ex.retried == killed
    assert any(f"ran again after a worker died: {killed[0]}" in m for m in logged), logged
    ref, got = golden_bytes(serial_golden), golden_bytes(out)
    assert got == ref, [n for n in ref if got.get(n) != ref[n]]


def test_worker_that_keeps_dying_stops_the_run_naming_the_shards_not_done(cluster, tmp_path):
    tasks, out = stand_in_tasks(tmp_path, n=3)
    ex = RayExecutor(
        workers=2,
        retries=1,
        start_timeout=120,
        shard_timeout=120,
        load=rc.stand_in_load,
        run=rc.dies_on_shard_zero,
        log=lambda m: None,
    )
    with rc.bounded(180, "a worker dying twice"), pytest.raises(ClusterError) as e:
        list(ex(tasks, out))
    assert "died 2 times" in str(e.value) and "shards not done: 0" in str(e.value), str(e.value)


def test_an_error_in_a_shard_is_raised_as_itself(cluster, tmp_path):
    tasks, out = stand_in_tasks(tmp_path, n=3)
    ex = RayExecutor(
        workers=2,
        start_timeout=120,
        shard_timeout=60,
        load=rc.stand_in_load,
        run=rc.raises_on_shard_one,
        log=lambda m: None,
    )
    with pytest.raises(OSError) as e:
        list(ex(tasks, out))
    assert "No space left" in str(e.value) and "shard-00001" in str(e.value)


def test_node_that_cannot_see_the_checkpoint_is_named_not_a_hang(cluster, tmp_path):
    tasks, out = stand_in_tasks(tmp_path, n=2, model=str(tmp_path / "not-shared" / "gemma-2-9b"))
    ex = RayExecutor(workers=2, start_timeout=120, load=rc.stand_in_load, run=rc.stand_in_run, log=lambda m: None)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as e:
        list(ex(tasks, out))
    msg = str(e.value)
    assert f"node {socket.gethostname()}" in msg and str(tmp_path / "not-shared" / "gemma-2-9b") in msg, msg
    assert time.monotonic() - t0 < 100


def test_worker_that_cannot_load_the_model_says_why_naming_the_node(cluster, tmp_path):
    tasks, out = stand_in_tasks(tmp_path, n=2)
    ex = RayExecutor(workers=2, start_timeout=120, load=rc.load_fails, run=rc.stand_in_run, log=lambda m: None)
    with pytest.raises(ClusterError) as e:
        list(ex(tasks, out))
    msg = str(e.value)
    assert f"node {socket.gethostname()}" in msg and "could not load the model: MemoryError" in msg, msg
    assert "shared file system" not in msg, msg


# -- the command line, its own cluster --------------------------------------------------------------------


def test_cli_driver_killed_then_rerun_resumes_byte_identical(tmp_path):
    pytest.importorskip("ray")
    args = ["corpus", "tiny", "--out", str(tmp_path / "g"), "--ctx", "512", "--chunks", "12", "--shard-chunks", "1"]
    ref = cli(*args[:3], str(tmp_path / "ref"), *args[4:], env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    first = cli(*args, "--workers", "2")
    deadline = time.monotonic() + 240
    while not list((tmp_path / "g").glob("shard-*.safetensors")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    time.sleep(3)  # the raylet dies with its driver (Ray's fate sharing) and Ray ends its workers
    alive = [p for p in rc.session_pids(first.pid) if "ShardWorker" in rc.cmdline(p)]
    rc.kill_session(first.pid)
    assert not alive, "a Ray worker outlived its killed driver (it could write into --out during the rerun)"
    written = len(list((tmp_path / "g").glob("shard-*.safetensors")))
    assert 1 <= written < 12 and not (tmp_path / "g" / "manifest.json").exists()

    _, err, code = finish(cli(*args, "--workers", "2"), 300)
    assert code == 0, err[-3000:]
    assert f"resuming {tmp_path / 'g'}: {written} of 12 shards already written" in err or "already written" in err, err[
        -2000:
    ]
    _, err_ref, code_ref = finish(ref, 300)
    assert code_ref == 0, err_ref[-2000:]
    assert golden_bytes(tmp_path / "g") == golden_bytes(tmp_path / "ref")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_with_nothing_there_is_one_line_not_a_hang(tmp_path):
    pytest.importorskip("ray")
    port = free_port()
    t0 = time.monotonic()
    run = cli("corpus", "tiny", "--out", str(tmp_path / "g"), "--ray-address", f"127.0.0.1:{port}")
    _, err, code = finish(run, 120)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"nothing answers at 127.0.0.1:{port}" in err and "ray start --head" in err, err
    assert time.monotonic() - t0 < 60 and not (tmp_path / "g").exists()


def test_cli_joins_a_ray_start_head_on_loopback(tmp_path, serial_golden):
    pytest.importorskip("ray")
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    port, temp = free_port(), tempfile.mkdtemp(prefix="g2r-head-", dir="/tmp")
    token = Path(temp) / "token"  # Ray 2.60's token authentication, as docs/corpus-ray.md's recipe sets it up
    token.write_text(generate_new_authentication_token())
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **auth)
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--include-dashboard=false",
            "--num-cpus",
            "2",
            "--temp-dir",
            temp,
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out[-3000:]
        run = cli(
            "corpus",
            "tiny",
            "--out",
            str(tmp_path / "g"),
            "--ray-address",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--ctx",
            "64",
            "--chunks",
            "8",
            "--shard-chunks",
            "1",
            env=auth,
        )
        _, err, code = finish(run, 300)
        assert code == 0, err[-3000:]
        assert "2 workers ready" in err, err[-2000:]
        head_pids = set(rc.session_pids(head.pid))
        addrs = {addr for addr, pid in rc.listeners() if pid in head_pids}
        assert addrs == {"127.0.0.1"}, addrs
        assert golden_bytes(tmp_path / "g") == golden_bytes(serial_golden)
    finally:
        rc.kill_session(head.pid)
        shutil.rmtree(temp, ignore_errors=True)

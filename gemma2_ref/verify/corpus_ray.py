"""Corpus goldens on a Ray cluster: an executor for `corpus.write_corpus` whose workers are long-lived Ray actors.

A corpus golden is prefill-bound and embarrassingly parallel over shards, but each worker must hold a memory-mapped
checkpoint (17-50 GiB for 9B / 27B), so a worker is an actor that loads the model once and takes shards as they
come (`ray.util.ActorPool`). What this module adds to Ray, and nothing more:

    determinism   every actor runs with the same BLAS thread count (OMP / OPENBLAS / MKL_NUM_THREADS in its
                  runtime_env): a shard's bytes do not depend on which worker wrote it or how many there are
    faults        a worker process that dies mid-shard is restarted and its shard run again (Ray's max_restarts
                  and max_task_retries); the shards that ran again are named (`RayExecutor.retried`)
    visibility    each actor checks at start that it sees the checkpoint and the --out directory (the driver's
                  plan.json, by its hash): a node that does not is one error naming the node and the path
    clusters      `workers=N` starts a local cluster bound to 127.0.0.1 (no dashboard, no usage statistics) and
                  stops it, leaving no process behind; `address=ADDR` joins a running cluster

    executor = RayExecutor(workers=2)
    write_corpus("tiny", out, executor=executor)
    executor.retried   # [] or the shards that ran again after a worker died

Ray is an optional dependency (`pip install 'gemma2-ref[ray]'`), imported when an executor runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from ..model.jsonfile import read_json
from .corpus import PLAN, CorpusError, plan_sha256, say

RAY_REQUIREMENT = "ray==2.60.0"  # pyproject.toml's `ray` extra
INSTALL_RAY = f"pip install 'gemma2-ref[ray]' (or {RAY_REQUIREMENT})"
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 128 << 20  # results are a few hundred bytes; the shards go to the shared file system


class ClusterError(CorpusError):
    """Ray missing, a cluster that cannot be started or joined, a worker that cannot see a path or keeps dying."""


# -- Ray itself ---------------------------------------------------------------------------------------------


def import_ray(option: str = "--workers"):
    """Ray, with usage statistics off (read when ray is imported); one line naming what to install if absent."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
        from ray.util import ActorPool  # noqa: F401  (the part of Ray used here: fail now, not later)
    except ImportError as e:
        raise ClusterError(
            f"{option} runs the workers on Ray, which is not installed here ({e}): "
            f"{INSTALL_RAY}; or run with --workers 1"
        ) from None
    return ray


@contextlib.contextmanager
def loopback_only(ray):
    """Ray's own address for this node is 127.0.0.1 while a local cluster starts: `_node_ip_address="127.0.0.1"`
    alone is replaced by the address of the default route (ray/_private/services.py resolve_ip_for_localhost),
    which makes every gRPC server listen on all interfaces. Ray's switch for this is the one it uses on macOS:
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (ray_constants.ENABLE_RAY_CLUSTER), read at import and inherited by the
    processes the cluster starts; both are set for the cluster's start and restored after."""
    from ray._private import ray_constants

    before_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = before_env


def cluster_pids(ray) -> set[int]:
    """The pids of the processes ray.init started on this machine (gcs_server, raylet, monitors)."""
    node = ray._private.worker._global_node
    if node is None:
        return set()
    return {info.process.pid for infos in node.all_processes.values() for info in infos}


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_leftovers(pids, grace: float = 10.0) -> list[int]:
    """SIGKILL, by pid, those of `pids` still alive `grace` seconds after ray.shutdown(); returns them."""
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if pid_alive(p)]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return left


@contextlib.contextmanager
def local_cluster(cpus: int, temp_dir: str | None = None):
    """A Ray cluster on this machine only: every listener on 127.0.0.1, no dashboard, `cpus` CPUs; shut down on
    exit (also on an error or Ctrl-C), and any of its processes still alive then killed by pid."""
    ray = import_ray()
    if ray.is_initialized():
        raise ClusterError(
            "Ray is already initialized in this process: use that cluster (RayExecutor with "
            "address=None runs on it) or ray.shutdown() first"
        )
    with loopback_only(ray):
        ray.init(
            address="local",
            num_cpus=cpus,
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            _temp_dir=temp_dir,
            logging_level="ERROR",
            configure_logging=True,
        )
    started = cluster_pids(ray)
    try:
        yield ray
    finally:
        ray.shutdown()
        stop_leftovers(started)


def address_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of --ray-address HOST:PORT (or ray://HOST:PORT); None for "auto" (the cluster of this node)."""
    if address == "auto":
        return None
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"--ray-address {address}: give HOST:PORT, the address `ray start --head` printed "
            f"(e.g. 10.0.0.1:6379), or auto"
        )
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A head that does not answer is one line now, not Ray's minutes of retries (ray.init waits for its GCS)."""
    hp = address_host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"--ray-address {address}: nothing answers at {hp[0]}:{hp[1]} ({e.strerror or e}): start "
            f"the head with `ray start --head --port {hp[1]}` (docs/corpus-ray.md)"
        ) from None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@contextlib.contextmanager
def joined_cluster(address: str):
    """A running cluster (`ray start --head` on one node, `ray start --address` on the others); left running.
    A head on 127.0.0.1 is reached there (Ray would otherwise replace it by this machine's network address)."""
    ray = import_ray("--ray-address")
    check_reachable(address)
    hp = address_host_port(address)
    local = hp is not None and is_loopback(hp[0])
    try:
        with loopback_only(ray) if local else contextlib.nullcontext():
            ray.init(address=address, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(
            f"--ray-address {address}: cannot join a Ray cluster there ({first_line(e)}); a head "
            f"with token authentication needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN_PATH) "
            f"here too; see docs/corpus-ray.md"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


# -- one worker -------------------------------------------------------------------------------------------


def blas_env(threads: int) -> dict[str, str]:
    """The environment every actor runs with: BLAS threads pinned (the bytes of a float32 matmul depend on
    the thread count), and OpenBLAS's kernel choice too when the driver pins it (OPENBLAS_CORETYPE)."""
    env = {name: str(threads) for name in BLAS_THREAD_VARS}
    if os.environ.get("OPENBLAS_CORETYPE"):
        env["OPENBLAS_CORETYPE"] = os.environ["OPENBLAS_CORETYPE"]
    return env


def node_name() -> str:
    return socket.gethostname()


def visibility_problem(task, out_dir) -> str | None:
    """None if this process sees the task's checkpoint (and GGUF) and the very --out directory the driver made
    (its plan.json, whose hash every task carries) and may write there; else what it does not see."""
    model = Path(task.model)
    if not (model / "config.json").is_file():
        return f"cannot see the checkpoint {model} (no config.json there)"
    if task.gguf and not Path(task.gguf).is_file():
        return f"cannot see the GGUF file {task.gguf}"
    out_dir = Path(out_dir)
    plan_file = out_dir / PLAN
    try:
        plan = read_json(plan_file)
    except (OSError, ValueError):
        return f"cannot see the --out directory {out_dir} (no readable {PLAN} there)"
    if plan_sha256(plan) != task.plan:
        return f"sees another --out directory at {out_dir} (its {PLAN} is not this run's)"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write into the --out directory {out_dir} ({e.strerror})"
    return None


def task_attempt() -> int:
    """0 the first time the running Ray task runs, k after k retries (Ray keeps the count per task)."""
    import ray

    return ray._private.worker.global_worker.core_worker.get_current_task_attempt_number()


def max_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ShardWorker:
    """One Ray actor: checks what it can see, loads the model once, then runs shards as they come. `load` and
    `run` default to corpus.load_worker_model / corpus.run_shard (tests give stand-ins)."""

    def __init__(self, first_task, out_dir, load=None, run=None):
        from . import corpus

        self.run_shard = run or corpus.run_shard
        self.out_dir = out_dir
        self.model = None
        self.problem = visibility_problem(first_task, out_dir)
        if self.problem is None:
            try:
                self.model = (load or corpus.load_worker_model)(first_task)
            except Exception as e:  # noqa: BLE001 (reported by ready(), naming the node)
                self.problem = f"could not load the model: {type(e).__name__}: {e}"

    def ready(self) -> dict:
        return {
            "node": node_name(),
            "pid": os.getpid(),
            "problem": self.problem,
            "blas": {k: os.environ.get(k) for k in BLAS_THREAD_VARS},
        }

    def run(self, task) -> dict:
        if self.problem is not None:
            raise ClusterError(f"node {node_name()} (pid {os.getpid()}) {self.problem}")
        try:
            result = dict(self.run_shard(task, self.out_dir, self.model))
        except Exception as e:  # noqa: BLE001 (returned, so the driver raises it as itself, naming the shard)
            return {"shard": task.shard, "error": e, "node": node_name(), "pid": os.getpid()}
        result.update(node=node_name(), pid=os.getpid(), attempt=task_attempt(), max_rss_bytes=max_rss_bytes())
        return result


# -- the executor -------------------------------------------------------------------------------------------


class RayExecutor:
    """`executor(tasks, out_dir)` for corpus.write_corpus: the tasks on `workers` Ray actors of `blas_threads`
    BLAS threads each, yielding run_shard's dicts as shards finish (plus "node", "pid", "attempt").

    workers       actors to start (a local cluster of workers x blas_threads CPUs); with `address`, default: as
                  many as the cluster's CPUs allow
    address       join that cluster instead ("auto", "HOST:6379", "ray://HOST:10001"); None and Ray already
                  initialized in this process: run on that cluster, left as found
    retries       restarts of a dead worker and re-runs of its shard before the run stops (a rerun resumes)
    start_timeout seconds for every worker to load its model and report; shard_timeout: for the next shard to
                  finish (None: no limit; a 27B shard can take hours)
    """

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        blas_threads: int = 1,
        retries: int = 3,
        start_timeout: float = 600.0,
        shard_timeout: float | None = None,
        temp_dir: str | None = None,
        log=say,
        load=None,
        run=None,
    ):
        if workers is not None and workers < 1:
            raise ClusterError(f"--workers {workers}: give at least 1")
        if blas_threads < 1:
            raise ClusterError(f"--blas-threads {blas_threads}: give at least 1")
        self.workers, self.address, self.blas_threads = workers, address, blas_threads
        self.retries, self.start_timeout, self.shard_timeout = retries, start_timeout, shard_timeout
        self.temp_dir, self.log, self.load, self.run = temp_dir, log, load, run
        self.retried: list[int] = []
        self.worker_info: list[dict] = []
        self.timings: dict[str, float] = {}  # perf_counter at "start", "cluster" (up), "ready" (models loaded), "done"

    def __call__(self, tasks, out_dir):
        tasks = list(tasks)
        if not tasks:
            return
        self.timings = {"start": time.perf_counter()}
        with self.cluster() as ray:
            self.timings["cluster"] = time.perf_counter()
            actors = self.start_workers(ray, tasks[0], os.path.abspath(out_dir), len(tasks))
            self.timings["ready"] = time.perf_counter()
            try:
                yield from self.run_pool(ray, actors, tasks)
            finally:
                for a in actors:  # a cluster this executor did not start is left as it was found
                    ray.kill(a, no_restart=True)
            self.timings["done"] = time.perf_counter()
            self.log(
                f"ray: {len(tasks)} shards on {len(actors)} workers"
                + (
                    f"; ran again after a worker died: {', '.join(map(str, sorted(self.retried)))}"
                    if self.retried
                    else "; none ran twice"
                )
            )

    def cluster(self):
        if self.address is not None:
            return joined_cluster(self.address)
        ray = import_ray()
        if ray.is_initialized():
            return contextlib.nullcontext(ray)
        return local_cluster((self.workers or 1) * self.blas_threads, self.temp_dir)

    def worker_count(self, ray, n_tasks: int) -> int:
        n = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.blas_threads)
        return min(n, n_tasks)

    def start_workers(self, ray, first_task, out_dir: str, n_tasks: int) -> list:
        """The actors, each having checked its paths and loaded the model; an error names a node that cannot."""
        actor = ray.remote(ShardWorker).options(
            num_cpus=self.blas_threads,
            max_restarts=self.retries,
            max_task_retries=self.retries,
            runtime_env={"env_vars": blas_env(self.blas_threads)},
            scheduling_strategy="SPREAD",
        )
        n = self.worker_count(ray, n_tasks)
        actors = [actor.remote(first_task, out_dir, self.load, self.run) for _ in range(n)]
        done, waiting = ray.wait([a.ready.remote() for a in actors], num_returns=n, timeout=self.start_timeout)
        if waiting:
            have = ray.cluster_resources().get("CPU", 0)
            raise ClusterError(
                f"only {len(done)} of {n} Ray workers started within {self.start_timeout:.0f} s (each "
                f"needs {self.blas_threads} CPU and the model in memory; the cluster has {have:g} "
                f"CPUs): give fewer --workers, or look at the nodes' logs (ray status)"
            )
        self.worker_info = ray.get(done)
        for info in self.worker_info:
            if info["problem"] is not None:
                advice = (
                    ""
                    if info["problem"].startswith("could not load")
                    else ": every node needs the checkpoint and --out at the same path (a shared file system)"
                )
                raise ClusterError(f"Ray worker on node {info['node']} (pid {info['pid']}) {info['problem']}{advice}")
        self.log(
            f"ray: {len(actors)} workers ready on "
            f"{', '.join(sorted({i['node'] for i in self.worker_info}))}, {self.blas_threads} BLAS thread(s) each"
        )
        return actors

    def run_pool(self, ray, actors, tasks):
        from ray.util import ActorPool

        pool, left = ActorPool(actors), {t.shard for t in tasks}
        for task in tasks:
            pool.submit(lambda a, t: a.run.remote(t), task)
        while pool.has_next():
            try:
                result = pool.get_next_unordered(timeout=self.shard_timeout)
            except TimeoutError:
                raise ClusterError(
                    f"no shard finished within {self.shard_timeout:.0f} s (shards not done: "
                    f"{shard_list(left)}); run the command again to resume"
                ) from None
            except ray.exceptions.RayActorError as e:
                raise ClusterError(
                    f"a Ray worker died {self.retries + 1} times ({first_line(e)}); shards not done: "
                    f"{shard_list(left)}; run the command again to resume"
                ) from None
            except ray.exceptions.RayTaskError as e:
                raise e.cause if isinstance(e.cause, Exception) else e from None
            if "error" in result:
                raise result["error"]
            left.discard(result["shard"])
            if result["attempt"] > 0:
                self.retried.append(result["shard"])
                self.log(
                    f"ray: shard {result['shard']} ran again ({result['attempt']} retr"
                    f"{'y' if result['attempt'] == 1 else 'ies'}) after its worker died; now on node "
                    f"{result['node']} pid {result['pid']}"
                )
            yield result


def shard_list(shards) -> str:
    s = sorted(shards)
    return ", ".join(map(str, s[:20])) + (f" and {len(s) - 20} more" if len(s) > 20 else "")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

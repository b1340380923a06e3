"""Test helpers for Ray: a time bound, the processes of a session, listening sockets, stand-in shard functions.

Every cluster a test starts binds to 127.0.0.1 and is stopped by the test, also when it fails; a process the
tests started (found by its session id or its pid) is what they stop, never a process found by its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import time
from pathlib import Path


@contextlib.contextmanager
def bounded(seconds: int, what: str):
    """Raise TimeoutError in the main thread after `seconds` (ray.get and ray.wait are interruptible)."""

    def expire(signum, frame):
        raise TimeoutError(f"{what}: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, session, ...), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a subprocess started with start_new_session=True: its pid); a process
    keeps its session when it is re-parented, so this finds a killed driver's Ray processes."""
    out = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st[0] != "Z" and int(st[3]) == sid:
            out.append(pid)
    return out


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None:
            children.setdefault(int(st[1]), []).append(pid)
    found, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def kill_session(sid: int, grace: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL, every live process of session `sid`; returns those that needed killing."""
    victims = session_pids(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace / 2
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not session_pids(sid), f"processes of session {sid} still alive: {session_pids(sid)}"
    return victims


def listeners() -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket of this machine's processes (from /proc/net/tcp and
    tcp6, state 0A, and each process's socket inodes: no `ss` needed)."""
    listening = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A":
                    listening[f[9]] = hex_address(f[1].split(":")[0], v6)
    found = []
    for pid in all_pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
                    if inode in listening:
                        found.append((listening[inode], pid))
    return found


def hex_address(h: str, v6: bool) -> str:
    """/proc/net/tcp's address: 4 bytes (or 16, as four 32-bit words) in host (little-endian) order."""
    raw = bytes.fromhex(h)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if not v6:
        return socket.inet_ntop(socket.AF_INET, words)
    addr = socket.inet_ntop(socket.AF_INET6, words)
    return addr[len("::ffff:") :] if addr.startswith("::ffff:") else addr


def marker_dir(out_dir) -> Path:
    """Beside --out, not in it: a golden directory holds only what gemma2-ref writes."""
    return Path(str(out_dir) + ".started")


def mark_started(task, out_dir) -> None:
    marker_dir(out_dir).mkdir(exist_ok=True)
    (marker_dir(out_dir) / f"{task.shard}.{os.getpid()}").touch()


def markers(out_dir) -> list[tuple[int, int]]:
    """(shard, pid) of every shard a worker started, in no particular order."""
    d = marker_dir(out_dir)
    return [tuple(int(x) for x in p.name.split(".")) for p in d.iterdir()] if d.is_dir() else []


# -- stand-ins for corpus.load_worker_model / run_shard, shipped to the actors by value -------------------


def stand_in_load(task):
    return {"loaded_by": os.getpid()}


def stand_in_bytes(task) -> bytes:
    return hashlib.sha256(f"shard {task.shard} chunks {task.chunks}".encode()).digest() * 64


def stand_in_run(task, out_dir, model, seconds: float = 0.0):
    """Marks the shard started (so a test knows which process holds it: markers()), waits `seconds`, then
    writes the shard's deterministic bytes; a worker killed meanwhile leaves only its marker."""
    out_dir = Path(out_dir)
    mark_started(task, out_dir)
    time.sleep(seconds)
    path = out_dir / f"shard-{task.shard:05d}.bin"
    path.write_bytes(stand_in_bytes(task))
    return {
        "shard": task.shard,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "tokens": 1,
        "seconds": seconds,
    }


def slow_stand_in_run(task, out_dir, model):
    return stand_in_run(task, out_dir, model, seconds=1.5)


def dies_on_shard_zero(task, out_dir, model):
    if task.shard == 0:
        os._exit(1)  # the process dies, as under the OOM killer
    return stand_in_run(task, out_dir, model)


def raises_on_shard_one(task, out_dir, model):
    if task.shard == 1:
        raise OSError(28, "No space left on device", str(Path(out_dir) / "shard-00001.safetensors"))
    return stand_in_run(task, out_dir, model)


def slow_real_run(task, out_dir, model):
    """corpus.run_shard, after a marker and a pause in which a test may kill this worker mid-shard."""
    from gemma2_ref.verify.corpus import run_shard

    mark_started(task, out_dir)
    time.sleep(1.5)
    return run_shard(task, out_dir, model)


def load_fails(task):
    raise MemoryError("Unable to allocate 3.5 GiB for an array with shape (256000, 3584)")

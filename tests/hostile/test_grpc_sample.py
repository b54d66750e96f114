"""A sample of the hostile catalogue through gRPC: a real ``sandbox serve`` subprocess on an
ephemeral port, functions deployed by name, the same post-conditions seen from outside.

After every case: the server is alive and serving, the processes the function named are dead,
the server's process tree and its worker cgroups are back to the warm pool, the next call is
OK. The module's server keeps warm workers across tests by design, so the conftest's per-test
guard is replaced (as in test_grpc.py) and ``ServerProcess.stop`` checks at the end that
nothing below the server outlives it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ZYGOTE_PROCESSES
from grpc_conftest import ServerProcess
from hostile_support import SETTLE_S, MiB, pids_named, short_tag, src, wait_dead
from test_runtime import HAS_MEMCG

from sandbox.client import Client
from sandbox.limits import Limits
from sandbox.outcome import Outcome

MIN_IDLE = 2

CASES: list[tuple[str, str, Limits | None, Outcome, tuple[str, ...]]] = [
    ("timeout", src("""
        import signal
        def handler(e, c):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                pass
        """), Limits(wall_timeout_s=0.5), Outcome.TIMEOUT, ("Timeout",)),
    ("memory-bomb", src("""
        def handler(e, c):
            hoard = []
            while True:
                try:
                    hoard.append(bytearray(16 << 20))
                except MemoryError:
                    pass
        """), Limits(memory_bytes=96 * MiB), Outcome.MEMORY_LIMIT, ("MemoryLimitExceeded",)),
    ("fork-bomb", src("""
        def handler(e, c):
            while True:
                try:
                    if _os.fork() == 0:
                        name(e["tag"])
                        while True:
                            pass
                except OSError:
                    pass
        """), Limits(wall_timeout_s=1.0, max_processes=32), Outcome.TIMEOUT, ("Timeout",)),
    ("protocol-violation", src("""
        import time
        def handler(e, c):
            _os.write(3, b"\\xde\\xad\\xbe\\xef" * 16)
            time.sleep(3600)
        """), Limits(wall_timeout_s=30), Outcome.CRASHED, ("ProtocolViolation",)),
    ("network-denied", src("""
        import socket
        def handler(e, c):
            out = {}
            s = None
            try:
                s = socket.create_connection(("127.0.0.1", e["port"]), timeout=2)
                out["tcp"] = "connected"
            except OSError as exc:
                out["tcp"] = ename(exc.errno)
            finally:
                if s is not None:
                    s.close()
            out["raw"] = attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, 1)
            return out
        """), None, Outcome.OK, ()),
    ("crash", src("""
        import ctypes
        def handler(e, c):
            if _os.fork() == 0:
                name(e["tag"])
                import time
                time.sleep(3600)
            ctypes.string_at(0)
        """), None, Outcome.CRASHED, ("KilledBySignal",)),
]


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Replaces the conftest guard (see the module docstring)."""
    yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("hostile-grpc") / "state",
                        "--min-idle", str(MIN_IDLE))
    try:
        with Client(srv.target, timeout=30) as client:
            for name, source, *_ in CASES:
                client.deploy(name, source)
            client.deploy("ok", "def handler(e, c):\n    return 'fine'\n")
        yield srv
    except BaseException:
        srv.kill()
        raise
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        sock.setblocking(False)
        yield sock


def _worker_groups(server_pid: int) -> list[str]:
    """The server's worker cgroups (pids hierarchy, or whichever has them)."""
    found: list[str] = []
    for pattern in (f"/sys/fs/cgroup/*/sandbox-{server_pid}-*/*/",
                    f"/sys/fs/cgroup/*/*/*/sandbox-{server_pid}-*/*/"):
        found += glob.glob(pattern)
    return found


def _occupied(group: str) -> bool:
    try:
        with open(group + "cgroup.procs") as f:
            return bool(f.read().split())
    except FileNotFoundError:
        return False


def _settled(server: ServerProcess, case: str) -> None:
    """The server's tree is back to its zygote and warm workers, each in a cgroup of its own;
    any other worker group is empty (removed, or kept empty for the next birth).

    Polls (bounded): deaths, reaping, refills and cgroup removal finish asynchronously in
    another process, with no event we can wait on from here.
    """
    deadline = time.monotonic() + SETTLE_S
    while True:
        below = server.descendants()
        groups = [g for g in _worker_groups(server.proc.pid) if _occupied(g)]
        hierarchies = {g.split("/sandbox-")[0] for g in groups}
        per = len(groups) // max(1, len(hierarchies))
        if len(below) == ZYGOTE_PROCESSES + MIN_IDLE and per in (0, MIN_IDLE):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{case}: server tree {[(p.pid, p.name()) for p in below]}, "
                                 f"worker cgroups {groups}")
        time.sleep(0.01)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_catalogue_sample_over_grpc(server: ServerProcess, client: Client,
                                    listener: socket.socket, case: tuple[Any, ...]) -> None:
    name, _source, limits, expected, error_types = case
    if name == "memory-bomb" and not HAS_MEMCG:
        pytest.skip("a function swallowing MemoryError under RLIMIT_DATA never grows its "
                    "resident set: only a memory cgroup's OOM kill ends it (else TIMEOUT)")
    tag = short_tag("grpc")
    result = client.invoke(name, {"tag": tag, "port": listener.getsockname()[1]},
                           limits=limits)
    assert result.outcome is expected, result
    if error_types:
        assert result.error is not None and result.error.type in error_types, result.error
    if name == "network-denied":
        assert result.result["tcp"] in ("EPERM", "ENETUNREACH", "EACCES"), result.result
        assert result.result["raw"] in ("EPERM", "EACCES"), result.result
        with contextlib.suppress(BlockingIOError):
            listener.accept()
            pytest.fail("the sandboxed function reached our listener")
    assert wait_dead(pids_named(tag)) == [], f"{name}: named processes survived"
    assert server.proc.poll() is None, "the server died"
    _settled(server, name)
    assert client.invoke("ok").result == "fine"
    assert os.getpid()  # (this process, the client, is untouched by construction)

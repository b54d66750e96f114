"""Shared fixtures: a runtime per test, and a guard that fails any test leaving a process behind.

Every process the runtime starts (zygotes, workers, and whatever a function forks) carries
``SANDBOX_INSTANCE`` in its environment; the guard finds them through ``/proc/*/environ``, plus
any child of the test process itself.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

from sandbox import Runtime

faulthandler.enable()

#: Every runtime started by this test session (in this process or a subprocess) tags its
#: processes with this, so the guard sees ours and nobody else's.
SESSION_TAG = f"pytest-{uuid.uuid4().hex[:12]}"
os.environ["SANDBOX_INSTANCE_TAG"] = SESSION_TAG
_MARK = f"SANDBOX_INSTANCE={SESSION_TAG}/".encode()

#: Deadlock guard for waiting on the kernel to finish killing and reaping (not a sync sleep).
LEFTOVER_GRACE_S = 10.0


def processes_with_env(needle: bytes) -> set[int]:
    """Pids of live (not zombie) processes whose environment block contains ``needle``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            found.add(int(name))
    return found


def marked_processes() -> set[int]:
    """Pids of live processes started by a runtime of this test session."""
    return processes_with_env(_MARK)


#: The tests' own process and its ancestors (never leftovers).
_ANCESTORS = {p.pid for p in [psutil.Process(), *psutil.Process().parents()]}


def processes_of_our_uid() -> set[int]:
    """Not root: live processes of our real uid. A confined worker is not dumpable, so its
    /proc/<pid>/environ is closed to its own uid and the environment mark cannot be read:
    run the tests as a user of their own (as CI does) and every such process is ours."""
    uid = os.getuid()
    found = set()
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.add(p.pid)
        except (psutil.Error, AttributeError):
            continue
    return found - _ANCESTORS


def leftovers(baseline: set[int]) -> set[int]:
    me = psutil.Process()
    children = set()
    for p in me.children(recursive=True):
        try:  # a child may exit while we look (a database backend whose client closed)
            if p.status() != psutil.STATUS_ZOMBIE:
                children.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    ours = marked_processes() if os.geteuid() == 0 else processes_of_our_uid()
    return (ours | children) - baseline


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the test if any process it caused is still alive after it (after a bounded wait
    for the kernel to finish deaths already under way)."""
    baseline = leftovers(set())
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    left = leftovers(baseline)
    while left and time.monotonic() < deadline:
        # Deaths are asynchronous in the kernel; wait on each pid's exit, bounded.
        for pid in left:
            try:
                psutil.Process(pid).wait(timeout=max(0.0, deadline - time.monotonic()))
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
        left = leftovers(baseline)
    if left:
        details = []
        for pid in left:
            try:
                p = psutil.Process(pid)
                details.append(f"{pid} {p.name()} {p.cmdline()[:4]}")
                os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
        if details:
            pytest.fail("processes left behind: " + "; ".join(details))


def userns_allowed() -> bool:
    """Whether we may create a user namespace (tried in a child)."""
    import ctypes

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0 else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


#: Processes a zygote is: one as root; without root, the process started and the zygote
#: proper below it, pid 1 of namespaces of its own (when user namespaces are allowed).
ZYGOTE_PROCESSES = 2 if os.geteuid() != 0 and userns_allowed() else 1

#: Every isolation layer: required as root (strict); as an ordinary user, every layer the
#: kernel allows it (best-effort; ``sandbox doctor`` lists what is missing and why).
ISOLATED = "strict" if os.geteuid() == 0 else "best-effort"


@pytest.fixture(params=[ISOLATED, "off"])
def rt(request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """A started runtime with one warm worker per profile, closed after the test: once with
    every isolation layer (:data:`ISOLATED`), once with processes, rlimits and cgroups only
    (off)."""
    runtime = Runtime(min_idle=1, isolation=request.param)
    try:
        yield runtime
    finally:
        runtime.close()


def cgroup_report() -> dict[str, object]:
    from sandbox.cgroups import CgroupManager

    manager = CgroupManager(prefix="sandbox-probe")
    try:
        return {"available": manager.available, **manager.report.to_dict()}
    finally:
        manager.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A PostgreSQL server shared by the session (tests/postgres.py); skips, saying why,
    where none can be started. Take a fresh database per test with ``postgres.database()``."""
    from postgres import Postgres, unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = Postgres()
    try:
        yield server
    finally:
        server.close()

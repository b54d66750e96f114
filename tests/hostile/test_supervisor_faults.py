"""Faults on the supervisor's side (SECURITY.md, "Supervisor-side faults"), with real processes.

A caller that cancels, a deadline shorter than the function's timeout, calls faster than the
pool serves, a zygote that dies or stops, the supervisor itself SIGKILLed with invocations in
flight, an oversized request. Each test has its own runtime; the conftest's leftover guard
checks that nothing survives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import psutil
import pytest
from conftest import ISOLATED
from hostile_support import (
    SETTLE_S,
    MiB,
    fd_count,
    marked,
    pids_named,
    rss_bytes,
    short_tag,
    sigkill_all,
    src,
    wait_dead,
)

from sandbox import AsyncRuntime, InvalidRequest, Limits, Outcome, Overloaded, Runtime

ROOT = Path(__file__).resolve().parents[2]
#: How fast a kill must show: SIGKILL of the tree, pidfd readable, result built.
KILL_BOUND_S = 2.0

HANG = src("""
import time
def handler(e, c):
    name(e["tag"])
    yield "running"
    time.sleep(3600)
""")
OK = "def handler(e, c):\n    return e\n"


def test_cancel_mid_call_kills_the_worker_within_a_bound(rt: Runtime) -> None:
    rt.register("hang", source=HANG)
    rt.register("ok", source=OK)
    tag = short_tag("cancl")
    stream = rt.stream("hang", {"tag": tag})
    assert next(stream) == "running"
    (pid,) = pids_named(tag)
    start = time.monotonic()
    stream.cancel()
    result = stream.result()
    assert wait_dead([pid], timeout=KILL_BOUND_S) == []
    elapsed = time.monotonic() - start
    assert result.outcome is Outcome.CANCELLED and result.stats.worker_pid == pid
    assert elapsed < KILL_BOUND_S, f"the worker outlived the cancel by {elapsed:.2f} s"
    rt.wait_warm(timeout=30)
    assert rt.invoke("ok", 1).result == 1


def test_asyncio_caller_that_goes_away_kills_the_worker() -> None:
    """The caller's task is cancelled (a disconnect looks the same): the worker dies."""
    tag = short_tag("gone")

    async def main() -> int:
        async with AsyncRuntime(min_idle=1) as art:
            art.register("sleepy", source=src("""
                import time
                def handler(e, c):
                    name(e["tag"])
                    time.sleep(3600)
                """))
            art.register("ok", source=OK)
            task = asyncio.ensure_future(art.invoke("sleepy", {"tag": tag}))
            # No event tells us the function is running: poll the process table, bounded.
            deadline = time.monotonic() + SETTLE_S
            while not pids_named(tag):
                assert time.monotonic() < deadline and not task.done(), "never started"
                await asyncio.sleep(0.005)
            (pid,) = pids_named(tag)
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(wait_dead, [pid], KILL_BOUND_S) == []
            assert time.monotonic() - start < KILL_BOUND_S
            await art.wait_warm(30)
            assert (await art.invoke("ok", 2)).result == 2
            return pid

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("offset", [0.3, -1.0], ids=["shorter", "already-past"])
def test_deadline_shorter_than_the_timeout(rt: Runtime, offset: float) -> None:
    rt.register("slow", source=src("""
        import time
        def handler(e, c):
            name(e["tag"])
            time.sleep(60)
        """))
    tag = short_tag("dline")
    start = time.monotonic()
    result = rt.invoke("slow", {"tag": tag}, deadline=start + offset,
                       limits=Limits(wall_timeout_s=30))
    elapsed = time.monotonic() - start
    assert result.outcome is Outcome.TIMEOUT, result.error
    assert elapsed < max(offset, 0) + KILL_BOUND_S, elapsed
    assert wait_dead(pids_named(tag)) == []


def test_calls_faster_than_the_pool_serves_are_refused_memory_flat() -> None:
    with Runtime(min_idle=0, max_concurrency=1, max_queue=3) as one:
        one.register("hang", source=HANG)
        one.register("ok", source=OK)
        tag = short_tag("busy")
        gate = one.stream("hang", {"tag": tag})
        assert next(gate) == "running"  # the one slot is taken
        queued = [one.submit("ok", i) for i in range(3)]
        fds, rss = fd_count(), rss_bytes()
        for i in range(2000):  # every one of them refused (pytest.raises fails otherwise)
            with pytest.raises(Overloaded, match="max_queue=3"):
                one.submit("ok", {"n": i, "blob": b"x" * 4096})
        assert fd_count() <= fds + 2, "refusals leaked fds"
        assert rss_bytes() <= rss + 8 * MiB, f"refusals grew RSS by {(rss_bytes() - rss) // MiB} MiB"
        assert one.info()["queued"] == 3
        gate.cancel()
        assert gate.result().outcome is Outcome.CANCELLED
        # The queued calls waited and now run.
        assert [q.result(timeout=60).result for q in queued] == [0, 1, 2]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV],
                         ids=["SIGKILL", "SIGTERM", "SIGSEGV"])
def test_zygote_killed_mid_load_is_replaced(rt: Runtime, sig: int) -> None:
    rt.register("hang", source=HANG)
    rt.register("ok", source=OK)
    zygote = rt.info()["pools"]["default"]["zygote_pid"]
    tag = short_tag("zkill")
    running = rt.stream("hang", {"tag": tag}, limits=Limits(wall_timeout_s=60))
    assert next(running) == "running"
    (worker,) = pids_named(tag)
    os.kill(zygote, sig)
    assert wait_dead([zygote]) == [], "the zygote ignored the signal"
    # Calls made right after the death wait for the replacement (or fail cleanly: never hang).
    calls = [rt.submit("ok", i) for i in range(4)]
    outcomes = [c.result(timeout=60) for c in calls]
    for i, r in enumerate(outcomes):
        assert r.outcome in (Outcome.OK, Outcome.CRASHED), r
        if r.outcome is Outcome.OK:
            assert r.result == i
    assert any(r.outcome is Outcome.OK for r in outcomes)
    running.cancel()  # (whether it died with its zygote: the next test)
    assert running.result().outcome in (Outcome.CRASHED, Outcome.CANCELLED)
    assert wait_dead([worker]) == []
    rt.wait_warm(timeout=60)
    info = rt.info()["pools"]["default"]
    assert info["zygote_pid"] != zygote and info["zygote_starts"] >= 2
    assert rt.invoke("ok", "after").result == "after"


@pytest.mark.parametrize("isolation", [ISOLATED, "off"])
def test_running_worker_dies_with_its_zygote(isolation: str) -> None:
    with Runtime(min_idle=1, isolation=isolation) as one:
        one.register("hang", source=HANG)
        zygote = one.info()["pools"]["default"]["zygote_pid"]
        tag = short_tag("orphn")
        running = one.stream("hang", {"tag": tag}, limits=Limits(wall_timeout_s=60))
        assert next(running) == "running"
        (worker,) = pids_named(tag)
        os.kill(zygote, signal.SIGKILL)
        try:
            assert wait_dead([worker], timeout=KILL_BOUND_S) == [], (
                "the running worker outlived its zygote")
            result = running.result()
            assert result.outcome is Outcome.CRASHED and result.error.type == "WorkerDied"
        finally:
            running.cancel()
            running.result()


def test_stopped_zygote_makes_new_births_wait_not_fail(rt: Runtime) -> None:
    rt.register("ok", source=OK)
    rt.wait_warm(timeout=30)
    zygote = rt.info()["pools"]["default"]["zygote_pid"]
    os.kill(zygote, signal.SIGSTOP)
    try:
        # The warm worker serves the first call; the next ones need births from the zygote.
        first = rt.invoke("ok", 0)
        assert first.outcome is Outcome.OK
        waiting = [rt.submit("ok", i) for i in range(1, 3)]
        assert not any(w.done() for w in waiting)
    finally:
        os.kill(zygote, signal.SIGCONT)
    assert [w.result(timeout=60).result for w in waiting] == [1, 2]
    rt.wait_warm(timeout=30)
    assert rt.info()["pools"]["default"]["zygote_pid"] == zygote


SUPERVISOR = """
import sys, threading
from sandbox import Limits, Runtime
rt = Runtime(min_idle=2, isolation=sys.argv[3])
rt.register("escape", source=sys.argv[1])
streams = [rt.stream("escape", {"tag": sys.argv[2] + str(i)}, limits=Limits(wall_timeout_s=300))
           for i in range(3)]
for s in streams:
    assert next(s) == "running"
print("running", rt.info()["pools"]["default"]["zygote_pid"], flush=True)
threading.Event().wait()
"""

ESCAPE = src("""
import signal, time
def handler(e, c):
    r, w = _os.pipe()
    if _os.fork() == 0:
        _os.setsid()
        if _os.fork() == 0:
            for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
            name(e["tag"])
            _os.write(w, b"k")
            while True:
                time.sleep(1)
        _os._exit(0)
    _os.read(r, 1)
    yield "running"
    while True:
        time.sleep(1)
""")


def _cgroup_bases() -> list[str]:
    from sandbox.cgroups import CgroupManager

    probe = CgroupManager(prefix="sandbox-probe")
    try:
        return sorted({os.path.dirname(p) for p in probe.paths})
    finally:
        probe.close()


def _stale_groups(bases: list[str], pid: int) -> list[str]:
    found = []
    for base in bases:
        with contextlib.suppress(FileNotFoundError):
            found += [e.path for e in os.scandir(base)
                      if e.is_dir() and e.name.startswith(f"sandbox-{pid}-")]
    return found


@contextlib.contextmanager
def loaded_supervisor(isolation: str) -> Iterator[tuple[subprocess.Popen[str], str, int, set[int]]]:
    """A supervisor in a subprocess with 3 invocations running, each with a setsid'd,
    signal-ignoring grandchild. Yields (process, mark, zygote pid, everything below it)."""
    tag = f"{os.environ['SANDBOX_INSTANCE_TAG']}-killed-{os.urandom(3).hex()}"
    gc_tag = short_tag("orph")[:9]
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, ESCAPE, gc_tag, isolation], cwd=ROOT,
        env={**os.environ, "SANDBOX_INSTANCE_TAG": tag}, stdout=subprocess.PIPE, text=True)
    below: set[int] = set()
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(60)  # deadlock guard: the supervisor prints as soon as all 3 run
        assert line and line[0].startswith("running"), (line, proc.poll())
        zygote = int(line[0].split()[1])
        grandchildren = {p for i in range(3) for p in pids_named(f"{gc_tag}{i}")}
        assert len(grandchildren) == 3, grandchildren
        # (a confined worker of an ordinary user is not dumpable: its environment, and so
        # its mark, is closed to that user; it is still below the supervisor)
        below = marked(tag + "/") | grandchildren | {
            p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        # zygote + 3 busy (+ up to 2 idle) workers + 3 grandchildren, all carrying the mark
        assert len(below) >= 1 + 3 + 3, below
        yield proc, tag, zygote, below
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        sigkill_all(marked(tag + "/") | below)


def test_supervisor_sigkilled_mid_load_everything_below_dies() -> None:
    with loaded_supervisor(ISOLATED) as (proc, tag, _zygote, below):
        proc.kill()
        proc.wait(30)
        left = wait_dead(below)
        assert not left, f"outlived their supervisor: {left}"
        assert not marked(tag + "/")


def test_supervisor_sigkilled_then_restart_sweeps_and_serves() -> None:
    with loaded_supervisor(ISOLATED) as (proc, tag, _zygote, below):
        proc.kill()
        proc.wait(30)
        dead_pid = proc.pid
        bases = _cgroup_bases()
        if not _stale_groups(bases, dead_pid):
            pytest.skip("no cgroups here: nothing to sweep")
        # A new runtime sweeps the dead supervisor's groups (killing anything still in them)
        # at start, then serves.
        with Runtime(min_idle=1) as fresh:
            assert _stale_groups(bases, dead_pid) == [], "stale cgroups survived the restart"
            assert wait_dead(below) == [], "the sweep left processes of the dead supervisor"
            assert not marked(tag + "/")
            fresh.register("ok", source=OK)
            assert fresh.invoke("ok", 5).result == 5


def test_oversized_request_is_rejected_before_a_worker_is_used(rt: Runtime) -> None:
    rt.register("echo", source=OK)
    rt.wait_warm(timeout=30)

    def workers() -> set[int]:
        def get() -> set[int]:
            return {w.pid for w in rt.async_runtime._pools["default"].workers}
        result: set[int] = rt._in_loop(get)
        return result

    before = workers()
    zygote_starts = rt.info()["pools"]["default"]["zygote_starts"]
    deep_msgpack = b"\x91" * 100_000 + b"\xc0"      # [[[[...]]]] 100k deep
    deep_json = b"[" * 100_000 + b"]" * 100_000
    for kwargs, match in [
        ({"event": b"x" * (64 * MiB + 1)}, "maximum"),
        ({"payload": deep_msgpack}, "not valid msgpack"),
        ({"payload": deep_json, "content_type": "application/json"}, "not valid JSON"),
        ({"payload": b"\xdd\xff\xff\xff\xff"}, "not valid msgpack"),  # array32 of 4 G items
    ]:
        with pytest.raises(InvalidRequest, match=match):
            rt.invoke("echo", **kwargs)
    assert workers() == before, "a worker was used (or forked) for a rejected request"
    assert rt.info()["pools"]["default"]["zygote_starts"] == zygote_starts
    result = rt.invoke("echo", msgpack.unpackb(msgpack.packb([1, 2])))
    assert result.result == [1, 2] and result.stats.worker_pid in before

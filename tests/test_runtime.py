"""The core runtime, end to end: real zygotes, real forks, real signals.

Each row of OUTCOMES is a real function and the one outcome it must produce; after each, the
pool must be back to its warm size and the next call must be OK.
"""

from __future__ import annotations

import asyncio
import errno
import os
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from sandbox import (
    ConfigurationError,
    FunctionNotFound,
    InvalidRequest,
    InvocationFailed,
    Limits,
    Outcome,
    Runtime,
    ShuttingDown,
)

MiB = 1024 * 1024


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def cgroups_have(controller: str) -> bool:
    try:
        from sandbox.cgroups import CgroupManager
    except ImportError:
        return False
    manager = CgroupManager(prefix="sandbox-probe")
    try:
        return manager.available and bool(getattr(manager.report, controller))
    finally:
        manager.close()


HAS_MEMCG = cgroups_have("memory")
HAS_PIDSCG = cgroups_have("pids")
needs_memcg = pytest.mark.skipif(not HAS_MEMCG, reason="no usable memory cgroup on this machine")
needs_pidscg = pytest.mark.skipif(not HAS_PIDSCG, reason="no usable pids cgroup on this machine")

# (id, source, limits, expected outcome, expected error type or None)
OUTCOMES = [
    ("ok", "def handler(e, c):\n    return {'echo': e}\n", None, Outcome.OK, None),
    ("infinite-loop", "def handler(e, c):\n    while True:\n        pass\n",
     Limits(wall_timeout_s=0.3), Outcome.TIMEOUT, "Timeout"),
    ("ignores-sigterm", src("""
        import signal
        def handler(e, c):
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):
                signal.signal(s, signal.SIG_IGN)
            while True:
                pass
        """), Limits(wall_timeout_s=0.3), Outcome.TIMEOUT, "Timeout"),
    ("sleeps", "import time\ndef handler(e, c):\n    time.sleep(3600)\n",
     Limits(wall_timeout_s=0.3), Outcome.TIMEOUT, "Timeout"),
    # (as pid 1 of its own pid namespace the worker cannot stop itself: then it spins)
    ("stops-itself", src("""
        import os, signal
        def handler(e, c):
            os.kill(os.getpid(), signal.SIGSTOP)
            while True:
                pass
        """), Limits(wall_timeout_s=0.3), Outcome.TIMEOUT, "Timeout"),
    ("reads-stdin", "import sys\ndef handler(e, c):\n    return sys.stdin.read()\n",
     None, Outcome.OK, None),  # stdin is /dev/null: reads EOF at once
    ("cpu-burner", "def handler(e, c):\n    while True:\n        pass\n",
     Limits(cpu_time_s=0.3, wall_timeout_s=20), Outcome.CPU_LIMIT, "CpuLimitExceeded"),
    ("cpu-burner-ignores-sigxcpu", src("""
        import signal
        def handler(e, c):
            signal.signal(signal.SIGXCPU, signal.SIG_IGN)
            while True:
                pass
        """), Limits(cpu_time_s=0.3, wall_timeout_s=20), Outcome.CPU_LIMIT, "CpuLimitExceeded"),
    ("segfault", "import ctypes\ndef handler(e, c):\n    ctypes.string_at(0)\n",
     None, Outcome.CRASHED, "KilledBySignal"),
    ("os-exit", "import os\ndef handler(e, c):\n    os._exit(3)\n", None, Outcome.CRASHED,
     "WorkerExited"),
    ("abort", "import os\ndef handler(e, c):\n    os.abort()\n", None, Outcome.CRASHED,
     "KilledBySignal"),
    ("sys-exit", "import sys\ndef handler(e, c):\n    sys.exit(2)\n", None,
     Outcome.FUNCTION_ERROR, "SystemExit"),
    ("keyboard-interrupt", "def handler(e, c):\n    raise KeyboardInterrupt\n", None,
     Outcome.FUNCTION_ERROR, "KeyboardInterrupt"),
    ("exception", "def handler(e, c):\n    raise ValueError('bad value 42')\n", None,
     Outcome.FUNCTION_ERROR, "ValueError"),
    ("syntax-error", "def handler(e, c)\n    return 1\n", None, Outcome.FUNCTION_ERROR,
     "SyntaxError"),
    ("missing-handler", "def other(e, c):\n    return 1\n", None, Outcome.FUNCTION_ERROR,
     "AttributeError"),
    ("unencodable-lambda", "def handler(e, c):\n    return lambda: 1\n", None,
     Outcome.FUNCTION_ERROR, "ResultEncodingError"),
    ("unencodable-bigint", "def handler(e, c):\n    return 2**70\n", None,
     Outcome.FUNCTION_ERROR, "ResultEncodingError"),
    ("unencodable-deep", src("""
        def handler(e, c):
            x = []
            for _ in range(100000):
                x = [x]
            return x
        """), None, Outcome.FUNCTION_ERROR, "ResultEncodingError"),
    ("oversized-result", "def handler(e, c):\n    return b'x' * (2 * 1024 * 1024)\n",
     Limits(max_result_bytes=1024 * 1024), Outcome.OUTPUT_LIMIT, "OutputLimitExceeded"),
    ("oversized-stream", "def handler(e, c):\n    for _ in range(100):\n        yield b'x' * 100000\n",
     Limits(max_result_bytes=1024 * 1024), Outcome.OUTPUT_LIMIT, "OutputLimitExceeded"),
    ("generator", "def handler(e, c):\n    for i in range(3):\n        yield i\n", None,
     Outcome.OK, None),
    ("hostile-str", src("""
        class E(Exception):
            def __str__(self):
                raise RuntimeError('no')
        def handler(e, c):
            raise E()
        """), None, Outcome.FUNCTION_ERROR, "E"),
]


@pytest.mark.parametrize("case", OUTCOMES, ids=[c[0] for c in OUTCOMES])
def test_outcome_table(rt: Runtime, case: tuple) -> None:
    name, source, limits, expected, error_type = case
    rt.register(name, source=source)
    result = rt.invoke(name, {"n": 1}, limits=limits)
    assert result.outcome is expected, (result.error, result.stderr[-2000:])
    if error_type is None:
        assert result.error is None
    else:
        assert result.error is not None and result.error.type == error_type, result.error
    # the pool is back to its warm size and serves the next call
    rt.wait_warm(timeout=30)
    rt.register("ok-after", source="def handler(e, c):\n    return 'fine'\n")
    after = rt.invoke("ok-after")
    assert after.outcome is Outcome.OK and after.result == "fine"


def test_ok_result_roundtrip_and_stats(rt: Runtime) -> None:
    rt.register("add", source=src("""
        def handler(event, context):
            print("adding", event["a"], event["b"])
            return {"sum": event["a"] + event["b"], "id": context.invocation_id,
                    "left": context.remaining_time_s(), "name": context.function_name}
        """))
    result = rt.invoke("add", {"a": 2, "b": 40}, id="inv-1", limits=Limits(wall_timeout_s=5))
    assert result.outcome is Outcome.OK
    assert result.result["sum"] == 42
    assert result.result["id"] == "inv-1" and result.id == "inv-1"
    assert 0 < result.result["left"] <= 5
    assert result.result["name"] == "add"
    assert result.stdout == "adding 2 40\n"
    assert result.stats.worker_pid and result.stats.run_s > 0
    assert result.unwrap()["sum"] == 42


def test_error_carries_traceback_and_unwrap_raises(rt: Runtime) -> None:
    rt.register("boom", source="def handler(e, c):\n    raise KeyError('missing')\n")
    result = rt.invoke("boom")
    assert result.outcome is Outcome.FUNCTION_ERROR
    assert result.error is not None
    assert "KeyError" in result.error.traceback and "line 2" in result.error.traceback
    with pytest.raises(InvocationFailed, match="FUNCTION_ERROR"):
        result.unwrap()


def test_each_invocation_gets_a_fresh_process(rt: Runtime) -> None:
    rt.register("state", source=src("""
        import os
        counter = []
        def handler(e, c):
            counter.append(1)
            leaked = os.environ.get("LEAK")
            os.environ["LEAK"] = "1"
            return {"count": len(counter), "leaked": leaked}
        """))
    first, second = rt.invoke("state"), rt.invoke("state")
    assert first.stats.worker_pid != second.stats.worker_pid
    assert first.result == second.result == {"count": 1, "leaked": None}


def test_reuse_keeps_worker_and_recycles_on_failure(rt: Runtime) -> None:
    rt.register("reuse", reuse=3, source=src("""
        calls = []
        def handler(e, c):
            calls.append(1)
            if e == "fail":
                raise RuntimeError("x")
            return len(calls)
        """))
    a, b, c = (rt.invoke("reuse", i) for i in range(3))
    assert a.stats.worker_pid == b.stats.worker_pid == c.stats.worker_pid
    assert [a.result, b.result, c.result] == [1, 2, 3]
    assert [a.stats.worker_invocations, c.stats.worker_invocations] == [1, 3]
    d = rt.invoke("reuse", 0)
    assert d.stats.worker_pid != a.stats.worker_pid  # served its 3 and was replaced
    assert rt.invoke("reuse", "fail").outcome is Outcome.FUNCTION_ERROR
    e = rt.invoke("reuse", 0)
    assert e.stats.worker_pid != d.stats.worker_pid  # recycled after the failure
    assert e.result == 1


def test_stdout_flood_is_truncated(rt: Runtime) -> None:
    rt.register("flood", source=src("""
        import os, sys
        def handler(e, c):
            for _ in range(200):
                sys.stdout.write("x" * 10000)
            os.write(2, b"e" * 500000)
            return "done"
        """))
    result = rt.invoke("flood", limits=Limits(max_log_bytes=64 * 1024))
    assert result.outcome is Outcome.OK and result.result == "done"
    assert len(result.stdout) == 64 * 1024 and result.stdout_truncated
    assert len(result.stderr) == 64 * 1024 and result.stderr_truncated


def test_generator_streams_chunks_in_order(rt: Runtime) -> None:
    rt.register("gen", source=src("""
        def handler(e, c):
            for i in range(e):
                yield {"i": i}
        """))
    stream = rt.stream("gen", 200)
    values = list(stream)
    assert values == [{"i": i} for i in range(200)]
    final = stream.result()
    assert final.outcome is Outcome.OK and final.chunks == 200


def test_generator_failure_mid_stream(rt: Runtime) -> None:
    rt.register("gen-fail", source=src("""
        def handler(e, c):
            yield 1
            yield 2
            raise RuntimeError("half way")
        """))
    stream = rt.stream("gen-fail")
    assert list(stream) == [1, 2]
    final = stream.result()
    assert final.outcome is Outcome.FUNCTION_ERROR and final.error.message == "half way"


def test_async_handler(rt: Runtime) -> None:
    rt.register("co", source=src("""
        import asyncio
        async def handler(e, c):
            await asyncio.sleep(0)
            return e * 2
        """))
    assert rt.invoke("co", 21).result == 42


def test_cancel_kills_the_worker(rt: Runtime) -> None:
    rt.register("hang", source=src("""
        import time
        def handler(e, c):
            yield "running"
            while True:
                time.sleep(1)
        """))
    stream = rt.stream("hang")
    assert next(stream) == "running"  # the function is running now
    stream.cancel()
    result = stream.result()
    assert result.outcome is Outcome.CANCELLED
    assert result.stats.worker_pid is not None
    assert _wait_dead(result.stats.worker_pid)


def test_cancel_while_queued(rt: Runtime) -> None:
    from sandbox import Runtime as R

    with R(min_idle=0, max_concurrency=1) as one:
        one.register("hang", source="import time\ndef handler(e, c):\n    time.sleep(60)\n")
        running = one.submit("hang")
        queued = one.submit("hang")
        queued.cancel()
        result = queued.result(timeout=30)
        assert result.outcome is Outcome.CANCELLED and result.stats.worker_pid is None
        running.cancel()
        assert running.result(timeout=30).outcome is Outcome.CANCELLED


def test_many_concurrent_invocations(rt: Runtime) -> None:
    rt.register("sq", source="def handler(e, c):\n    return e * e\n")
    results = rt.map("sq", range(40))
    assert [r.result for r in results] == [i * i for i in range(40)]
    assert len({r.stats.worker_pid for r in results}) == 40


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return not _alive(pid)
    return True


GRANDCHILD = src("""
    import os, time
    def handler(e, c):
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                import signal
                for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(s, signal.SIG_IGN)
                # A name the test can find from outside (pids inside a namespace differ).
                import ctypes
                ctypes.CDLL(None).prctl(15, e["name"].encode(), 0, 0, 0)  # PR_SET_NAME
                with open("/proc/self/comm") as f:
                    named = f.read().strip() == e["name"]
                os.write(w, b"ok" if named and os.getsid(0) != 1 else b"no")
                os.close(w)
                while True:
                    time.sleep(1)
            os._exit(0)
        os.close(w)
        if os.read(r, 64) != b"ok":
            raise RuntimeError("the grandchild could not set itself up")
        if e["mode"] == "return":
            return "spawned"
        print("spawned", flush=True)
        while True:
            time.sleep(1)
    """)


def pids_named(name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("mode", ["return", "timeout"])
def test_setsid_double_forked_grandchild_is_killed(rt: Runtime, mode: str) -> None:
    import uuid

    if not HAS_PIDSCG and not rt.info()["isolation"]["layers"].get("pid_ns", {}).get("enabled"):
        pytest.skip("tree kill of setsid grandchildren needs a cgroup or the pid namespace layer")

    name = f"esc{uuid.uuid4().hex[:10]}"
    rt.register("escape", source=GRANDCHILD)
    result = rt.invoke("escape", {"mode": mode, "name": name},
                       limits=Limits(wall_timeout_s=1.0))
    if mode == "return":
        assert result.outcome is Outcome.OK and result.result == "spawned"
    else:
        assert result.outcome is Outcome.TIMEOUT and result.stdout == "spawned\n"
    # SIGKILL was sent to every process of the tree before the result was delivered; the
    # kernel finishes the deaths asynchronously.
    for pid in pids_named(name):
        assert _wait_dead(pid), f"grandchild {pid} survived"
    assert pids_named(name) == []


@needs_pidscg
def test_fork_bomb_is_contained(rt: Runtime) -> None:
    """The bomb reaches the process limit and no further: it sees EAGAIN from fork."""
    rt.register("bomb", source=src("""
        import errno, os
        def handler(e, c):
            r, w = os.pipe()
            n = 0
            while n < 1000:
                try:
                    pid = os.fork()
                except OSError as exc:
                    return {"forked": n, "error": errno.errorcode[exc.errno]}
                if pid == 0:
                    os.read(r, 1)  # block until the tree is killed
                    os._exit(0)
                n += 1
            return {"forked": n, "error": None}
        """))
    result = rt.invoke("bomb", limits=Limits(wall_timeout_s=30, max_processes=32))
    assert result.outcome is Outcome.OK, result.error
    # the worker itself counts: at most 31 children, and the limit is what stopped it
    assert result.result["error"] == "EAGAIN", result.result
    assert 0 < result.result["forked"] <= 31, result.result


@needs_memcg
@pytest.mark.parametrize("variant", ["fast", "slow", "swallow"])
def test_memory_bomb(rt: Runtime, variant: str) -> None:
    rt.register("mem", source=src("""
        def handler(e, c):
            hoard = []
            while True:
                try:
                    if e == "slow":
                        hoard.append(bytearray(1024 * 1024))
                    else:
                        hoard.append(bytearray(32 * 1024 * 1024))
                except MemoryError:
                    if e != "swallow":
                        raise
        """))
    result = rt.invoke("mem", variant, limits=Limits(memory_bytes=128 * MiB, wall_timeout_s=30))
    assert result.outcome is Outcome.MEMORY_LIMIT, (result.error, result.stderr[-500:])
    assert result.stats.peak_memory_bytes is None or result.stats.peak_memory_bytes > 64 * MiB


def test_file_size_limit_fails_inside(rt: Runtime) -> None:
    rt.register("big", source=src("""
        def handler(e, c):
            try:
                with open("big", "wb") as f:
                    f.write(b"x" * (4 * 1024 * 1024))
            except OSError as exc:
                return exc.errno
            return "wrote"
        """))
    result = rt.invoke("big", limits=Limits(max_file_size_bytes=1024 * 1024))
    assert result.outcome is Outcome.OK
    assert result.result == 27  # EFBIG


def test_client_deadline_caps_the_timeout(rt: Runtime) -> None:
    rt.register("slow", source="import time\ndef handler(e, c):\n    time.sleep(60)\n")
    start = time.monotonic()
    result = rt.invoke("slow", deadline=time.monotonic() + 0.3)
    assert result.outcome is Outcome.TIMEOUT
    assert time.monotonic() - start < 10


def test_sources_file_directory_zip_and_ref(rt: Runtime, tmp_path: Path) -> None:
    single = tmp_path / "single.py"
    single.write_text("def main(e, c):\n    return 'file:' + str(e)\n")
    pkg = tmp_path / "proj" / "app"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "util.py").write_text("def double(x):\n    return 2 * x\n")
    (pkg / "main.py").write_text("from app.util import double\ndef handle(e, c):\n"
                                 "    return double(e)\n")
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped/__init__.py", "")
        z.writestr("zipped/entry.py", "def run(e, c):\n    return ['zip', e]\n")

    rt.register("f", path=single, handler="main")
    rt.register("d", path=tmp_path / "proj", handler="app.main:handle")
    rt.register("z", path=archive, handler="zipped.entry:run")
    rt.register("r", ref="json:dumps")  # any importable callable: json.dumps(event, context)
    assert rt.invoke("f", 1).result == "file:1"
    assert rt.invoke("d", 21).result == 42
    assert rt.invoke("z", 7).result == ["zip", 7]
    ref = rt.invoke("r", 1)
    assert ref.outcome is Outcome.FUNCTION_ERROR  # json.dumps(1, <Context>): TypeError
    assert ref.error is not None and ref.error.type == "TypeError"


def test_versions(rt: Runtime) -> None:
    v1 = rt.register("v", source="def handler(e, c):\n    return 1\n")
    v2 = rt.register("v", source="def handler(e, c):\n    return 2\n")
    assert (v1.version, v2.version) == (1, 2) and v1.digest != v2.digest
    assert rt.invoke("v").result == 2
    assert rt.invoke("v", version=1).result == 1
    with pytest.raises(FunctionNotFound):
        rt.invoke("v", version=3)
    rt.unregister("v", version=2)
    assert rt.invoke("v").result == 1


def test_json_payload_passthrough(rt: Runtime) -> None:
    rt.register("j", source="def handler(e, c):\n    return {'got': e}\n")
    result = rt.invoke("j", payload=b'{"x": [1, 2]}', content_type="application/json")
    assert result.outcome is Outcome.OK
    assert result.result_bytes == b'{"got":{"x":[1,2]}}'
    assert result.result == {"got": {"x": [1, 2]}}


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"event": {1, 2}}, InvalidRequest, "cannot be encoded"),
    ({"payload": b"\xc1"}, InvalidRequest, "not valid msgpack"),
    ({"payload": b"{", "content_type": "application/json"}, InvalidRequest, "not valid JSON"),
    ({"content_type": "text/plain"}, InvalidRequest, "content_type"),
])
def test_bad_requests_are_rejected_before_a_worker_is_used(
        rt: Runtime, kwargs: dict, error: type, match: str) -> None:
    rt.register("echo", source="def handler(e, c):\n    return e\n")
    with pytest.raises(error, match=match):
        rt.invoke("echo", **kwargs)
    assert rt.invoke("echo", 1).result == 1


def test_unknown_function(rt: Runtime) -> None:
    with pytest.raises(FunctionNotFound, match="nope"):
        rt.invoke("nope")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"source": "x", "path": "y"}, "exactly one"),
    ({"path": "/does/not/exist"}, "does not exist"),
    ({"source": "x", "handler": "a:b"}, "function name"),
    ({"source": "x", "profile": "nope"}, "unknown profile"),
    ({"source": "x", "reuse": 0}, "reuse"),
    ({"ref": "not a ref"}, "module:function"),
])
def test_bad_registrations(rt: Runtime, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        rt.register("bad", **kwargs)


def test_preload_profile_and_bad_profile() -> None:
    from sandbox import ProfileError

    with Runtime(profiles={"js": ["json", "decimal"]}, min_idle=0) as runtime:
        runtime.register("uses", profile="js", source=src("""
            import sys
            def handler(e, c):
                return "decimal" in sys.modules
            """))
        result = runtime.invoke("uses")
        assert result.result is True and result.stats.forked_on_demand
    with pytest.raises(ProfileError, match="no_such_module_xyz"):
        Runtime(profiles={"bad": ["no_such_module_xyz"]})


def test_zygote_death_is_survived(rt: Runtime) -> None:
    rt.register("ok", source="def handler(e, c):\n    return 1\n")
    zygote_pid = rt.info()["pools"]["default"]["zygote_pid"]
    os.kill(zygote_pid, 9)
    _wait_dead(zygote_pid)
    result = rt.invoke("ok")
    assert result.outcome is Outcome.OK
    info = rt.info()["pools"]["default"]
    assert info["zygote_pid"] != zygote_pid and info["zygote_starts"] == 2


def test_close_refuses_new_calls_and_leaves_nothing() -> None:
    runtime = Runtime(min_idle=2)
    runtime.register("ok", source="def handler(e, c):\n    return 1\n")
    assert runtime.invoke("ok").result == 1
    runtime.close()
    with pytest.raises(ShuttingDown):
        runtime.invoke("ok")
    runtime.close()  # idempotent


def test_close_cancels_running_invocations() -> None:
    runtime = Runtime(min_idle=0)
    runtime.register("hang", source="import time\ndef handler(e, c):\n    time.sleep(60)\n")
    handle = runtime.submit("hang")
    runtime.close(grace_s=0.2)
    assert handle.result(timeout=30).outcome is Outcome.CANCELLED


def test_overload_is_refused() -> None:
    from sandbox import Overloaded

    with Runtime(min_idle=0, max_concurrency=1, max_queue=2) as runtime:
        runtime.register("hang", source="import time\ndef handler(e, c):\n    time.sleep(60)\n")
        handles = [runtime.submit("hang") for _ in range(3)]  # 1 running + 2 queued
        with pytest.raises(Overloaded, match="max_queue=2"):
            runtime.submit("hang")
        for h in handles:
            h.cancel()
        assert [h.result(timeout=30).outcome for h in handles] == [Outcome.CANCELLED] * 3


def test_without_cgroups_memory_falls_back_to_an_rlimit() -> None:
    with Runtime(min_idle=0, cgroups=False, isolation="off") as runtime:
        layer = runtime.info()["isolation"]["layers"]["cgroup_memory"]
        assert layer == {"available": False, "enabled": False,
                         "reason": "disabled by configuration"}
        runtime.register("mem", source=src("""
            def handler(e, c):
                hoard = []
                while True:
                    hoard.append(bytearray(16 * 1024 * 1024))
            """))
        result = runtime.invoke("mem", limits=Limits(memory_bytes=128 * MiB))
        assert result.outcome is Outcome.MEMORY_LIMIT
        runtime.register("ok", source="def handler(e, c):\n    return 1\n")
        assert runtime.invoke("ok").result == 1


def test_reused_worker_is_recycled_when_its_memory_grows() -> None:
    with Runtime(min_idle=0, recycle_rss_growth_bytes=32 * MiB) as runtime:
        runtime.register("leak", reuse=10, source=src("""
            kept = []
            def handler(e, c):
                kept.append(bytearray(e * 1024 * 1024))
                return len(kept)
            """))
        a = runtime.invoke("leak", 1)
        b = runtime.invoke("leak", 1)
        assert a.stats.worker_pid == b.stats.worker_pid and b.result == 2
        c = runtime.invoke("leak", 64)  # grows past the threshold: served, then replaced
        assert c.outcome is Outcome.OK and c.result == 3
        d = runtime.invoke("leak", 1)
        assert d.stats.worker_pid != c.stats.worker_pid and d.result == 1


def test_a_profile_that_starts_threads_is_refused(tmp_path: Path) -> None:
    import sys

    from sandbox import ProfileError

    (tmp_path / "starts_a_thread.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ProfileError, match="single-threaded"):
            Runtime(profiles={"threads": ["starts_a_thread"]}, min_idle=0)
    finally:
        sys.path.remove(str(tmp_path))


def test_import_path_under_tmp_stays_visible_read_only(tmp_path: Path) -> None:
    """A checkout or venv under /tmp must not vanish under the worker's private /tmp."""
    import sys

    (tmp_path / "under_tmp_mod.py").write_text("VALUE = 42\n")
    os.chmod(tmp_path, 0o755)
    sys.path.insert(0, str(tmp_path))
    try:
        with Runtime(min_idle=0) as runtime:
            runtime.register("imp", source=src(f"""
                import under_tmp_mod
                def handler(e, c):
                    try:
                        open({str(tmp_path / 'written')!r}, "w").write("x")
                        wrote = True
                    except OSError:
                        wrote = False
                    return [under_tmp_mod.VALUE, wrote]
                """))
            result = runtime.invoke("imp")
            assert result.result is not None and result.result[0] == 42, result.error
            if runtime.info()["isolation"]["layers"]["filesystem"]["enabled"]:
                assert result.result[1] is False
                assert not (tmp_path / "written").exists()
    finally:
        sys.path.remove(str(tmp_path))


def test_without_cgroups_an_rss_watchdog_catches_what_rlimit_data_misses() -> None:
    """Shared anonymous memory is not counted by RLIMIT_DATA; the supervisor's watchdog sees
    the resident set grow and kills the worker."""
    with Runtime(min_idle=0, cgroups=False, isolation="off") as runtime:
        runtime.register("shm", source=src("""
            import mmap
            def handler(e, c):
                m = mmap.mmap(-1, 1024 * 1024 * 1024)  # MAP_SHARED | MAP_ANONYMOUS
                for i in range(0, len(m), 4096):
                    m[i] = 1
                return "survived"
            """))
        result = runtime.invoke("shm", limits=Limits(memory_bytes=128 * MiB, wall_timeout_s=60))
        assert result.outcome is Outcome.MEMORY_LIMIT, (result.outcome, result.error)
        assert "resident set" in result.error.message


def test_reused_worker_gets_a_cpu_budget_every_time(rt: Runtime) -> None:
    """RLIMIT_CPU counts a process's whole life: a reused worker (an unprivileged uid, which
    cannot raise a hard limit again) must still get each invocation's budget, past a whole
    second of cumulative CPU."""
    rt.register("burn", reuse=5, source=src("""
        import time
        def handler(e, c):
            end = time.process_time() + 0.4
            while time.process_time() < end:
                pass
            return time.process_time()
        """))
    results = [rt.invoke("burn", limits=Limits(cpu_time_s=0.8, wall_timeout_s=30))
               for _ in range(4)]
    assert [r.outcome for r in results] == [Outcome.OK] * 4, [r.error for r in results]
    assert len({r.stats.worker_pid for r in results}) == 1
    assert results[-1].result > 1.5  # this worker's CPU did pass a whole second


def test_sigint_the_function_sends_itself_is_keyboard_interrupt(rt: Runtime) -> None:
    """SIGINT has a Python handler in the worker, as in any program: KeyboardInterrupt."""
    rt.register("selfint", source=src("""
        import os, signal
        def handler(e, c):
            os.kill(os.getpid(), signal.SIGINT)
            return "not reached"
        """))
    result = rt.invoke("selfint", limits=Limits(wall_timeout_s=30))
    assert result.outcome is Outcome.FUNCTION_ERROR and result.error is not None
    assert result.error.type == "KeyboardInterrupt"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGKILL", "SIGSTOP"])
def test_a_signal_the_function_sends_itself_is_ignored(rt: Runtime, sig: str) -> None:
    """Documented behaviour (README, Isolation): the worker is pid 1 of its pid namespace, and
    the kernel ignores signals its init sends itself whose action is the default one."""
    rt.register("selfsig", source=src("""
        import os, signal
        def handler(e, c):
            os.kill(os.getpid(), getattr(signal, e))
            return "still here"
        """))
    pid_ns = rt.info()["isolation"]["layers"].get("pid_ns", {}).get("enabled", False)
    if not pid_ns and sig == "SIGSTOP":
        pytest.skip("a worker outside a pid namespace stops until its deadline")
    result = rt.invoke("selfsig", sig, limits=Limits(wall_timeout_s=5))
    if pid_ns:
        assert result.outcome is Outcome.OK and result.result == "still here", result.error
    else:
        assert result.outcome is Outcome.CRASHED, result


@pytest.mark.parametrize(("err", "outcome", "error_type"), [
    (errno.EBUSY, Outcome.MEMORY_LIMIT, "MemoryLimitExceeded"),
    (errno.EIO, Outcome.CRASHED, "LimitsNotApplied"),
])
def test_limits_the_cgroup_refuses_end_the_call_not_the_runtime(
        monkeypatch: pytest.MonkeyPatch, err: int, outcome: Outcome, error_type: str) -> None:
    """A kernel refusal of the call's limits (injected at the cgroupfs write: v1 answers EBUSY
    to a memory limit below the group's usage) is that call's outcome; the function never
    runs unlimited, and its worker is not left busy."""
    from sandbox.cgroups import CgroupManager, WorkerCgroup

    if not CgroupManager(prefix="probe").available:
        pytest.skip("no usable cgroups on this machine")
    real = WorkerCgroup.set_limits

    def refuse(self: WorkerCgroup, *, memory_bytes: int | None, max_pids: int | None) -> None:
        if memory_bytes == 17 << 20:
            raise OSError(err, os.strerror(err))
        real(self, memory_bytes=memory_bytes, max_pids=max_pids)

    monkeypatch.setattr(WorkerCgroup, "set_limits", refuse)
    with Runtime(min_idle=1, cgroups=True) as runtime:
        runtime.register("mark", source="def handler(e, c):\n    print('ran')\n    return 1\n")
        result = runtime.invoke("mark", limits=Limits(memory_bytes=17 << 20))
        assert result.outcome is outcome and result.error is not None, result
        assert result.error.type == error_type and "did not run" in result.error.message
        assert "ran" not in result.stdout
        assert runtime.invoke("mark").result == 1  # the runtime goes on


def test_an_exit_read_with_its_spawn_is_not_lost() -> None:
    """The zygote's "spawned" and "exited" reports of a worker that died at once can be read
    in one pass, before the worker's handle exists: the status is kept for the handle (it
    used to be dropped, leaving a 2 s wait and no reason). Fed to the handle's dispatcher in
    that order, as the control socket delivers them."""
    from sandbox.handles import ZygoteHandle

    async def main() -> list[tuple[int | None, float, int]]:
        zyg = ZygoteHandle("p", (), "instance", lambda _: None)
        zyg.alive = True
        spawned = asyncio.get_running_loop().create_future()
        zyg._pending[7] = spawned
        pidfd = os.pidfd_open(os.getpid())
        zyg._dispatch({"t": "spawned", "token": 7, "pid": 4242}, [pidfd])
        zyg._dispatch({"t": "exited", "pid": 4242, "status": 3 << 8, "cpu": 0.5,
                       "maxrss": 1024}, [])
        assert spawned.result() == (4242, pidfd)
        os.close(pidfd)
        got: list[tuple[int | None, float, int]] = []
        zyg.watch_exit(4242, lambda *status: got.append(status))
        return got

    assert asyncio.run(main()) == [(3 << 8, 0.5, 1024)]


@pytest.mark.skipif(os.geteuid() != 0, reason="the case is root without CAP_SYS_NICE")
def test_root_without_cap_sys_nice_still_births(tmp_path: Path) -> None:
    """Root in a container that does not grant CAP_SYS_NICE cannot leave SCHED_IDLE again:
    warm births must not use it there (before, the zygote died on its first refill)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    script = tmp_path / "nice.py"
    script.write_text(textwrap.dedent("""
        from sandbox import Runtime
        from sandbox.pool import can_renice
        assert not can_renice()
        with Runtime(min_idle=2) as rt:
            rt.register("f", source="def handler(e, c):\\n    return e + 1\\n")
            print(sum(rt.invoke("f", i).unwrap() for i in range(20)))
    """))
    done = subprocess.run(["setpriv", "--bounding-set=-sys_nice", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(sum(range(1, 21)))]


def test_workers_are_the_oom_killers_first_choice(rt: Runtime) -> None:
    """A memory shortage outside our cgroups (the machine's, a pod's limit) kills a worker
    before the supervisor: every worker has the highest oom_score_adj."""
    rt.register("adj", source=textwrap.dedent("""
        def handler(event, context):
            with open("/proc/self/oom_score_adj") as f:
                return int(f.read())
    """))
    assert rt.invoke("adj").unwrap() == 1000

"""The peers: the usual ways of running a function in another process, and the gRPC floor.

    subprocess-fresh   a fresh `python -I` per call that does the same imports
    mp-spawn           a multiprocessing.Process per call, spawn start method
    mp-forkserver      ... forkserver, with the profile as `set_forkserver_preload`
    mp-fork            ... fork, from this process with the profile imported
    ppe-warm           concurrent.futures.ProcessPoolExecutor, workers already started and preloaded
    pebble-warm        pebble.ProcessPool (per-task timeouts), workers already started and preloaded
    grpc-echo          a bare grpc.aio unary echo server in its own process: the gRPC floor
    grpc-echo-stream   the same server's bidirectional echo stream, calls pipelined on one stream
    fork-floor         os.fork + child os._exit(0) + waitpid in a loop, in a small clean
                       interpreter: the fork-and-reap floor (calls/s; no function runs at all)

Top-level imports stay light (no grpc, no pebble): a spawned child imports this module when it
runs `queued_rss`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import queue
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from benchmarks import workload
from benchmarks.core import Method, Unsupported, register

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Pools use the library default start method on Linux (fork) so the comparison is with what
#: users get; the initializer imports the profile in each worker.
POOL_START_METHOD = "fork"


def child_env() -> dict[str, str]:
    """Environment for helper interpreters: `benchmarks` importable wherever we run from."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def pool_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)


def _encode(event: Any) -> bytes:
    return json.dumps(event).encode()


@register
class SubprocessFresh(Method):
    name = "subprocess-fresh"

    def call(self, event: dict[str, Any]) -> Any:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", workload.FRESH_SCRIPT],
            input=_encode(event),
            capture_output=True,
            check=True,
        )
        return json.loads(proc.stdout)

    def call_with_timeout(self, event: dict[str, Any], timeout_s: float) -> str:
        try:
            subprocess.run(
                [sys.executable, "-I", "-c", workload.FRESH_SCRIPT],
                input=_encode(event),
                capture_output=True,
                check=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:  # run() has killed and reaped the child
            return "TIMEOUT"
        return "OK"


def _reap(proc: Any) -> None:
    """join() and close() a Process. With calls in flight on several threads, another thread's
    `multiprocessing` bookkeeping (`_cleanup` at each start()) can reap our child between our
    waitpid and close(), which then sees no return code for a moment: wait for it to be set."""
    proc.join()
    for _ in range(1000):
        try:
            proc.close()
            return
        except ValueError:
            time.sleep(0.001)
            proc.join()
    raise RuntimeError(f"could not reap {proc}")


class _ProcessPerCall(Method):
    """A `multiprocessing.Process` per call; the result comes back over a one-way Pipe."""

    start_method: ClassVar[str] = ""
    idle_freeze_modes: ClassVar[tuple[bool, ...]] = (False,)
    ctx: Any = None

    def setup(self) -> None:
        self.ctx = multiprocessing.get_context(self.start_method)

    def _start(self, target: Any, *args: Any, duplex: bool = False) -> tuple[Any, Any]:
        r, w = self.ctx.Pipe(duplex=duplex)
        proc = self.ctx.Process(target=target, args=(w, *args), daemon=True)
        proc.start()
        w.close()
        return proc, r

    def call(self, event: dict[str, Any]) -> Any:
        proc, r = self._start(workload.child_main, event)
        try:
            return r.recv()
        finally:
            r.close()
            _reap(proc)

    def call_with_timeout(self, event: dict[str, Any], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        proc, r = self._start(workload.child_main, event)
        try:
            if r.poll(max(0.0, deadline - time.monotonic())):
                r.recv()
                return "OK"
            proc.kill()
            return "TIMEOUT"
        finally:
            r.close()
            _reap(proc)

    @contextlib.contextmanager
    def idle_workers(self, count: int, freeze: bool) -> Iterator[list[int]]:
        """Start `count` idle workers (each runs a full gc once) and yield their pids."""
        if freeze and self.start_method != "fork":
            raise Unsupported("gc.freeze() before the fork is not controllable for " + self.name)
        started: list[tuple[Any, Any]] = []
        if freeze:
            import gc

            gc.collect()
            gc.freeze()
        try:
            for _ in range(count):
                started.append(self._start(workload.idle_child, True, self.modules, duplex=True))
            yield [r.recv() for _, r in started]
        finally:
            if freeze:
                import gc

                gc.unfreeze()
            for proc, r in started:
                # Tell it to exit: EOF alone is not enough, a forked child holds our end too.
                with contextlib.suppress(OSError):
                    r.send(None)
                r.close()
                proc.join(5)
                if proc.exitcode is None:
                    proc.kill()
                    proc.join()


@register
class MpSpawn(_ProcessPerCall):
    name = "mp-spawn"
    start_method = "spawn"


@register
class MpForkserver(_ProcessPerCall):
    name = "mp-forkserver"
    start_method = "forkserver"

    def setup(self) -> None:
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # type: ignore[attr-defined]  # a server with other preloads
        super().setup()
        self.ctx.set_forkserver_preload(["benchmarks.workload", *self.modules])
        forkserver.ensure_running()
        self.call({"op": "echo"})  # the server has imported its preloads: not a per-call cost

    def teardown(self) -> None:
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # type: ignore[attr-defined]


@register
class MpFork(_ProcessPerCall):
    name = "mp-fork"
    start_method = "fork"
    idle_freeze_modes = (False, True)

    def setup(self) -> None:
        super().setup()
        workload.preload(self.modules)  # the parent has the profile, as a forking server would


class _WarmPool(Method):
    workers: int = 0
    pool: Any = None

    def _warm(self, submit: Any) -> None:
        """Run tasks until every worker has answered, so none is still starting when timed."""
        want = self.workers
        seen: set[int] = set()
        for _ in range(50):
            futs = [submit(workload.warm, 0.05) for _ in range(want * 2)]
            seen.update(f.result(timeout=60) for f in futs)
            if len(seen) >= want:
                return
        raise RuntimeError(f"{self.name}: only {len(seen)} of {want} workers came up")


@register
class PpeWarm(_WarmPool):
    name = "ppe-warm"
    idle_freeze_modes = (False,)

    def setup(self) -> None:
        self.workers = int(self.options.get("workers") or pool_workers())
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context(POOL_START_METHOD),
            initializer=workload.preload,
            initargs=(self.modules,),
        )
        self._warm(self.pool.submit)

    def call(self, event: dict[str, Any]) -> Any:
        return self.pool.submit(workload.handler, event).result()

    def submit(self, event: dict[str, Any]) -> concurrent.futures.Future[Any]:
        return self.pool.submit(workload.handler, event)

    @contextlib.contextmanager
    def idle_workers(self, count: int, freeze: bool) -> Iterator[list[int]]:
        """The pool's workers, each after one full gc (as the per-call workers do)."""
        if freeze:
            raise Unsupported("ppe-warm workers are not forked from a frozen parent")
        seen: set[int] = set()
        for _ in range(50):
            futs = [self.pool.submit(workload.collect_pid, 0.05) for _ in range(self.workers * 2)]
            seen.update(f.result(timeout=60) for f in futs)
            if len(seen) >= min(count, self.workers):
                break
        yield sorted(seen)[:count]

    def teardown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


@register
class PebbleWarm(_WarmPool):
    name = "pebble-warm"

    def setup(self) -> None:
        import pebble

        self.workers = int(self.options.get("workers") or pool_workers())
        self.pool = pebble.ProcessPool(
            max_workers=self.workers,
            initializer=workload.preload,
            initargs=(self.modules,),
            context=multiprocessing.get_context(POOL_START_METHOD),
        )
        self._warm(lambda fn, *a: self.pool.schedule(fn, args=a))

    def call(self, event: dict[str, Any]) -> Any:
        return self.pool.schedule(workload.handler, args=(event,)).result()

    def submit(self, event: dict[str, Any]) -> concurrent.futures.Future[Any]:
        return self.pool.schedule(workload.handler, args=(event,))

    def call_with_timeout(self, event: dict[str, Any], timeout_s: float) -> str:
        fut = self.pool.schedule(workload.handler, args=(event,), timeout=timeout_s)
        try:
            fut.result()
        except TimeoutError:
            return "TIMEOUT"
        return "OK"

    def teardown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.stop()
            pool.join(timeout=10)
            self.pool = None


@register
class ZygoteFork(Method):
    """The paper suite's reference zygote (`benchmarks.zygote_helper`): plain os.fork of a
    single-threaded interpreter that preloaded the modules; the child imports them and answers."""

    name = "zygote-fork"
    proc: Any = None

    def setup(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                str(Path(__file__).with_name("zygote_helper.py")),
                *self.modules,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            self.teardown()
            raise RuntimeError(f"zygote helper failed to preload {self.modules}")

    def call(self, event: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith(b"ok "):
            raise RuntimeError(f"zygote child failed: {line!r}")
        return int(line[3:])

    def teardown(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            self.proc = None


@register
class ForkFloor(Method):
    """`benchmarks/fork_floor.py` loops, each in its own `python -I -S`. One caller: one loop.
    N callers: min(N, CPUs) loops at once (more loops than CPUs only contend for the same
    cores), started together; calls/s is every loop's forks over the time from the first start
    to the last end. Sets `wall_ns` (the loops' own start-up is not timed)."""

    name = "fork-floor"
    preloads = ("none",)

    def call(self, event: dict[str, Any]) -> Any:
        raise Unsupported("fork-floor runs whole loops (run_inflight)")

    def loops(self, inflight: int) -> int:
        return 1 if inflight <= 1 else min(inflight, pool_workers())

    def run_inflight(self, events: Sequence[dict[str, Any]], inflight: int) -> list[int]:
        k = self.loops(inflight)
        per_loop = -(-len(events) // k)
        script = str(Path(__file__).with_name("fork_floor.py"))
        procs = [
            subprocess.Popen(
                [sys.executable, "-I", "-S", script, str(per_loop)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for _ in range(k)
        ]
        try:
            for p in procs:
                assert p.stdout is not None
                if p.stdout.readline() != b"ready\n":
                    raise RuntimeError("fork-floor loop did not start")
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                p.stdin.flush()
            reports = []
            for p in procs:
                assert p.stdout is not None
                reports.append(json.loads(p.stdout.readline()))
        finally:
            for p in procs:
                with contextlib.suppress(OSError):
                    assert p.stdin is not None
                    p.stdin.close()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                if p.stdout is not None:
                    p.stdout.close()
        self.wall_ns = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
        return [x for r in reports for x in r["lat"]]


class EchoServer:
    """`python -m benchmarks.echo_server` as a child; stops when we close its stdin."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.echo_server", "127.0.0.1:0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"echo server did not report a port (got {line!r})")
        self.port = int(line)
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _Grpc(Method):
    preloads = ("none",)
    channel: Any = None
    server: Any = None

    def setup(self) -> None:
        import grpc

        from benchmarks import echo_server

        self._echo = echo_server
        self.server = EchoServer()
        self.channel = grpc.insecure_channel(self.server.target)
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def teardown(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()
            self.channel = None
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
            self.server = None


@register
class GrpcEcho(_Grpc):
    name = "grpc-echo"

    def setup(self) -> None:
        super().setup()
        self.stub = self.channel.unary_unary(self._echo.UNARY)

    def call(self, event: dict[str, Any]) -> Any:
        return json.loads(self.stub(_encode(event)))

    def submit(self, event: dict[str, Any]) -> Any:
        return self.stub.future(_encode(event))  # a grpc.Future: add_done_callback, exception


@register
class GrpcEchoStream(_Grpc):
    name = "grpc-echo-stream"

    def setup(self) -> None:
        super().setup()
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        stream = self.channel.stream_stream(self._echo.STREAM)
        self._responses = stream(iter(self._requests.get, None))

    def call(self, event: dict[str, Any]) -> Any:
        self._requests.put(_encode(event))
        return json.loads(next(self._responses))

    def run_inflight(self, events: Sequence[dict[str, Any]], inflight: int) -> list[int]:
        """Pipeline on the one stream: keep `inflight` requests outstanding, replies in order."""
        n = len(events)
        sent: collections.deque[int] = collections.deque()
        latencies: list[int] = []
        nxt = 0
        while nxt < min(inflight, n):
            sent.append(time.perf_counter_ns())
            self._requests.put(_encode(events[nxt]))
            nxt += 1
        for _ in range(n):
            reply = next(self._responses)
            latencies.append(time.perf_counter_ns() - sent.popleft())
            json.loads(reply)
            if nxt < n:
                sent.append(time.perf_counter_ns())
                self._requests.put(_encode(events[nxt]))
                nxt += 1
        return latencies

    def teardown(self) -> None:
        if getattr(self, "_requests", None) is not None:
            self._requests.put(None)  # half-close; the server ends the stream
            for _ in self._responses:
                pass
            self._requests = None  # type: ignore[assignment]
        super().teardown()


# --- memory: a supervisor with many calls queued, measured in a clean spawned process ---------


def queued_rss(kind: str, n: int) -> tuple[int, int, int]:
    """In a fresh process: start a 2-worker pool of `kind`, queue `n` calls, return
    (rss_bytes, uss_bytes, submit_ns) of this process with all of them queued."""
    import psutil

    me = psutil.Process()
    workers = 2
    if kind == "ppe-warm":
        pool: Any = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context(POOL_START_METHOD)
        )
        submit: Any = pool.submit
    elif kind == "pebble-warm":
        import pebble

        pool = pebble.ProcessPool(
            max_workers=workers, context=multiprocessing.get_context(POOL_START_METHOD)
        )
        submit = lambda fn, *a: pool.schedule(fn, args=a)  # noqa: E731
    else:
        raise ValueError(kind)
    try:
        for f in [submit(workload.warm, 0.01) for _ in range(workers * 2)]:
            f.result()
        t0 = time.perf_counter_ns()
        futs = [submit(workload.sleep, 0.5) for _ in range(n)]
        submit_ns = time.perf_counter_ns() - t0
        time.sleep(0.1)  # let the pool's threads move what they will
        info = me.memory_full_info()
        del futs
        return int(info.rss), int(info.uss), submit_ns
    finally:
        if kind == "ppe-warm":
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            pool.stop()
            pool.join(timeout=10)

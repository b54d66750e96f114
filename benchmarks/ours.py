"""Our methods, against the public API of `sandbox` (imported lazily, at setup).

    sandbox-fork         AsyncRuntime(min_idle=0, max_idle=0): every call forks a worker from the
                         zygote (max_idle=0 where the runtime has it: a pool that follows demand
                         would otherwise keep warm workers even with min_idle=0)
    sandbox-prefork      AsyncRuntime(min_idle=2), reuse=1: a pre-forked, single-use worker
    sandbox-reuse        AsyncRuntime(min_idle=2), reuse=REUSE: a worker serves many calls
    sandbox-grpc-unary   `sandbox serve` in its own process, `Client.invoke` per call
    sandbox-grpc-stream  the same server, `Client.invoke_many` (one bidirectional stream)

If `sandbox` is missing or incomplete, `setup` raises and the suite reports the method as
"unavailable: <reason>"; nothing here is imported by the peers.

The runtime is driven from its own event-loop thread, so the synchronous suites can time calls
with `perf_counter_ns` exactly as they do for the peers, and `run_inflight` keeps N calls
outstanding with asyncio rather than N threads.

`ready()` waits (untimed) until every pool has its `min_idle` warm workers: embedded with the
runtime's event-driven `wait_warm()`, over gRPC by polling `GetInfo`. The *light load* suites
call it before each timed sequential call, so such a measurement never includes a fork on
demand; the *sustained* suite never calls it, so there each call pays for the birth it needs.
Calls served by a worker forked on demand are counted (`take_on_demand`) and reported in the
suites' notes.

Options of the embedded methods (keyword arguments of the method class):
    runtime_defaults=True   AsyncRuntime(profiles=...) and nothing else: the runtime's defaults
    isolation=..., cgroups=..., min_idle=..., max_idle=...   passed to AsyncRuntime as given
    reuse=N, gc_freeze=False, max_concurrency=N
    setup_call=False        no call at setup (the `calls` suite: the runtime's call records are
                            then exactly the suite's calls)

`stats_log`: set it to a list and every result's `stats` of `call` and `run_inflight` is
appended to it (the `calls` suite reads `run_s` and `function_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar

from benchmarks import workload
from benchmarks.core import Method, Unsupported, register

FUNCTION = "bench"
#: invocations a worker serves in `sandbox-reuse`
REUSE = 1_000_000


def _profile_name(preload: str, modules: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", preload) if modules else "default"


def _profiles(preload: str, modules: Sequence[str]) -> dict[str, list[str]]:
    profiles: dict[str, list[str]] = {"default": []}
    if modules:
        profiles[_profile_name(preload, modules)] = list(modules)
    return profiles


def _check(res: Any) -> Any:
    outcome = str(getattr(res.outcome, "value", res.outcome))
    if outcome != "OK":
        raise RuntimeError(f"invocation ended {outcome}: {getattr(res, 'error', None)}")
    return res.result


def _on_demand(res: Any) -> int:
    stats = getattr(res, "stats", None)
    return int(bool(getattr(stats, "forked_on_demand", False)))


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _accepts(cls: Any, name: str) -> bool:
    """Whether `cls(...)` takes the keyword `name` (the runtime's options grow over time)."""
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


class _Embedded(Method):
    family = "ours"
    min_idle: ClassVar[int] = 0
    #: passed when not None and the runtime has the option
    max_idle: ClassVar[int | None] = None
    reuse: ClassVar[int] = 1
    idle_freeze_modes: ClassVar[tuple[bool, ...]] = (True, False)
    rt: Any = None
    loop: Any = None
    on_demand: int = 0
    stats_log: list[Any] | None = None

    def setup(self) -> None:
        try:
            AsyncRuntime = importlib.import_module("sandbox").AsyncRuntime
        except Exception as exc:
            raise RuntimeError(f"sandbox.AsyncRuntime not importable ({exc})") from exc
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=self.name, daemon=True)
        self.thread.start()
        kwargs: dict[str, Any] = {"profiles": _profiles(self.preload, self.modules)}
        if not self.options.get("runtime_defaults"):
            kwargs.update(
                min_idle=self.min_idle,
                max_concurrency=self.options.get("max_concurrency"),
                max_queue=4096,
            )
        if self.max_idle is not None and _accepts(AsyncRuntime, "max_idle"):
            kwargs["max_idle"] = self.max_idle
        for key in ("isolation", "cgroups", "min_idle", "max_idle"):
            if key in self.options:
                kwargs[key] = self.options[key]
        if self.options.get("gc_freeze") is False:  # the zygote freezes by default (DESIGN)
            kwargs["gc_freeze"] = False
        self.gc_freeze = bool(self.options.get("gc_freeze", True))
        self.rt = AsyncRuntime(**kwargs)
        self._run(self.rt.start)
        self._run(
            lambda: self.rt.register(
                FUNCTION,
                source=workload.SOURCE,
                profile=_profile_name(self.preload, self.modules),
                reuse=int(self.options.get("reuse", self.reuse)),
            )
        )
        if self.options.get("setup_call", True):
            self.call({"op": "echo"})  # the zygote exists and has served once: not a setup cost

    def _run(self, fn: Callable[[], Any], timeout: float | None = 120) -> Any:
        async def go() -> Any:
            return await _maybe_await(fn())

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout)

    def _invoke(self, event: dict[str, Any], limits: Any = None) -> Awaitable[Any]:
        if limits is None:
            return self.rt.invoke(FUNCTION, event)
        return self.rt.invoke(FUNCTION, event, limits=limits)

    def ready(self) -> None:
        self._run(lambda: self.rt.wait_warm(60))

    def take_on_demand(self) -> int:
        n, self.on_demand = self.on_demand, 0
        return n

    def call(self, event: dict[str, Any]) -> Any:
        res = self._run(lambda: self._invoke(event))
        self.on_demand += _on_demand(res)
        if self.stats_log is not None:
            self.stats_log.append(res.stats)
        return _check(res)

    def call_with_timeout(self, event: dict[str, Any], timeout_s: float) -> str:
        Limits = importlib.import_module("sandbox").Limits

        res = self._run(lambda: self._invoke(event, Limits(wall_timeout_s=timeout_s)))
        return str(getattr(res.outcome, "value", res.outcome))

    def info(self) -> dict[str, Any]:
        """`AsyncRuntime.info()`, read on the runtime's loop."""
        return dict(self._run(lambda: self.rt.info()))

    def timeout_lags(
        self, event: dict[str, Any], timeout_s: float, total: int, inflight: int
    ) -> list[int]:
        """The runtime arms a call's deadline when its worker gets the event, after any wait
        for a concurrency slot or a worker (`stats.queue_s`, `stats.startup_s`): deadline ->
        outcome is the call's time minus those waits minus the timeout. The raw call time minus
        the timeout is kept in `self.raw_lags` for the notes."""
        Limits = importlib.import_module("sandbox").Limits
        limits = Limits(wall_timeout_s=timeout_s)
        timeout_ns = int(timeout_s * 1e9)
        lags: list[int] = []
        self.raw_lags: list[int] = []

        async def many() -> None:
            slots = asyncio.Semaphore(inflight)

            async def one() -> None:
                async with slots:
                    t0 = time.perf_counter_ns()
                    res = await self._invoke(event, limits)
                    elapsed = time.perf_counter_ns() - t0
                    outcome = str(getattr(res.outcome, "value", res.outcome))
                    if outcome != "TIMEOUT":
                        raise RuntimeError(f"expected TIMEOUT, got {outcome}")
                    waited = int((res.stats.queue_s + res.stats.startup_s) * 1e9)
                    lags.append(max(0, elapsed - waited - timeout_ns))
                    self.raw_lags.append(max(0, elapsed - timeout_ns))

            await asyncio.gather(*(one() for _ in range(total)))

        self._run(many, timeout=None)
        return lags

    def run_inflight(self, events: Sequence[dict[str, Any]], inflight: int) -> list[int]:
        latencies = [0] * len(events)

        async def many() -> None:
            slots = asyncio.Semaphore(inflight)

            async def one(i: int, event: dict[str, Any]) -> None:
                async with slots:
                    t0 = time.perf_counter_ns()
                    res = await self._invoke(event)
                    latencies[i] = time.perf_counter_ns() - t0
                    self.on_demand += _on_demand(res)
                    if self.stats_log is not None:
                        self.stats_log.append(res.stats)
                    _check(res)

            await asyncio.gather(*(one(i, e) for i, e in enumerate(events)))

        self._run(many, timeout=None)
        return latencies

    @contextlib.contextmanager
    def idle_workers(self, count: int, freeze: bool) -> Iterator[list[int]]:
        """Pre-forked workers after one full gc each, as the peers measure theirs: a reusable
        function runs `gc.collect()` on `count` workers at once (the runtime keeps them for
        reuse, alive and idle); their host pids come from the results' stats. Cross-checked
        against the zygote's children (`info()["pools"][profile]["zygote_pid"]`)."""
        import psutil

        if freeze != self.gc_freeze:
            raise Unsupported(f"set up with gc_freeze={freeze}")
        self._run(
            lambda: self.rt.register(
                "collect",
                source=workload.SOURCE,
                profile=_profile_name(self.preload, self.modules),
                reuse=REUSE,
            )
        )
        self.ready()

        async def collect() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(self.rt.invoke("collect", {"op": "collect", "s": 0.3}) for _ in range(count))
                )
            )

        results = self._run(collect)
        for res in results:
            _check(res)
        pids = sorted({int(r.stats.worker_pid) for r in results if r.stats.worker_pid})
        if len(pids) < count:
            raise RuntimeError(f"wanted {count} distinct workers, got {pids}")
        info = self.info()["pools"][_profile_name(self.preload, self.modules)]
        zygote = info.get("zygote_pid")
        if zygote:
            children = {c.pid for c in psutil.Process(zygote).children()}
            missing = set(pids) - children
            if missing:
                raise RuntimeError(f"workers {missing} are not children of zygote {zygote}")
        yield pids[:count]

    def teardown(self) -> None:
        rt = getattr(self, "rt", None)
        if rt is not None:
            with contextlib.suppress(Exception):
                self._run(rt.aclose, timeout=30)
            self.rt = None
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            self.thread.join(10)
            loop.close()
            self.loop = None


@register
class SandboxFork(_Embedded):
    name = "sandbox-fork"
    min_idle = 0
    max_idle = 0


@register
class SandboxPrefork(_Embedded):
    name = "sandbox-prefork"
    min_idle = 2


@register
class SandboxReuse(_Embedded):
    name = "sandbox-reuse"
    min_idle = 2
    reuse = REUSE


# --- over gRPC -------------------------------------------------------------------------------

_PORT = re.compile(rb"(?:^|[\s:])(\d{2,5})\s*$")


def serve_argv(modules: Sequence[str], state_dir: str, extra: Sequence[str] = ()) -> list[str]:
    """`sandbox serve` on an ephemeral loopback port, warming the profile this run needs;
    `extra` flags come last (so they win)."""
    argv = [
        sys.executable,
        "-c",
        "import sys; from sandbox.cli import main; sys.exit(main(sys.argv[1:]))",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state_dir,
        "--log-level",
        "warning",
    ]
    if modules:
        argv += ["--preload", ",".join(modules)]
    return [*argv, *extra]


class _Served(Method):
    """Options: `serve_args=[...]` more flags for `sandbox serve`; `stderr_path=PATH` its
    stderr to that file (else a pipe read at teardown: fine while it logs little);
    `metrics_url` is set when the flags include `--metrics-listen`."""

    family = "ours"
    reuse: ClassVar[int] = 1
    client: Any = None
    proc: Any = None
    state_dir: str | None = None
    metrics_url: str | None = None
    _stderr: bytes = b""

    def setup(self) -> None:
        try:
            from sandbox.client import Client
        except Exception as exc:
            raise RuntimeError(f"sandbox.client not importable ({exc})") from exc
        from benchmarks.peers import child_env

        self.on_demand = 0
        self.state_dir = tempfile.mkdtemp(prefix="sandbox-bench-")
        extra = [str(a) for a in self.options.get("serve_args", ())]
        stderr_path = self.options.get("stderr_path")
        self._stderr_file = open(stderr_path, "wb") if stderr_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            serve_argv(self.modules, self.state_dir, extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file or subprocess.PIPE,
            env=child_env(),
            start_new_session=True,  # so teardown can end the whole tree it started
        )
        assert self.proc.stdout is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                m = _PORT.search(line.strip())
                port = int(m.group(1)) if m else None
        if port is None:
            self.teardown()
            err = self._stderr
            raise RuntimeError(f"`sandbox serve` reported no port: {err[-300:]!r}")
        if "--metrics-listen" in extra:
            line = self.proc.stdout.readline().decode().strip()  # "sandbox metrics on URL"
            self.metrics_url = line.rsplit(" ", 1)[-1]
        self.client = Client(f"127.0.0.1:{port}")
        self.client.wait_ready(30)
        fn = self.client.deploy(
            FUNCTION,
            workload.SOURCE,
            preload=self.modules,
            reuse=int(self.options.get("reuse", self.reuse)),
        )
        self.profile = fn.profile
        self.call({"op": "echo"})

    def ready(self) -> None:
        """Poll GetInfo (no event to wait on over the wire) until the pool has its 2 warm
        workers (`sandbox serve --min-idle` defaults to 2)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pool = self.client.info()["pools"].get(self.profile, {})
            if pool.get("idle", 0) >= 2:
                return
            time.sleep(0.002)
        raise RuntimeError("the server's pool did not get warm in 30 s")

    def take_on_demand(self) -> int:
        n, self.on_demand = self.on_demand, 0
        return n

    def call(self, event: dict[str, Any]) -> Any:
        res = self.client.invoke(FUNCTION, event)
        self.on_demand += _on_demand(res)
        return _check(res)

    def submit(self, event: dict[str, Any]) -> Any:
        """A future per call (grpc's own `.future`), so `run_inflight` needs no threads."""
        import concurrent.futures

        from sandbox.client import encode

        stub = self.client.stub
        pb = importlib.import_module("sandbox._proto.sandbox.v1.sandbox_pb2")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        call = stub.Invoke.future(pb.InvokeRequest(function=FUNCTION, payload=encode(event)))

        def done(c: Any) -> None:
            try:
                msg = c.result()
            except Exception as exc:
                fut.set_exception(exc)
                return
            if msg.outcome != pb.OUTCOME_OK:
                fut.set_exception(RuntimeError(f"invocation ended {msg.outcome}"))
                return
            self.on_demand += int(msg.stats.forked_on_demand)
            fut.set_result(msg.payload)

        call.add_done_callback(done)
        return fut

    def teardown(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
            self.client = None
        proc = getattr(self, "proc", None)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of its session left behind
            self._stderr = proc.stderr.read() if proc.stderr else b""
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
            self.proc = None
        if getattr(self, "_stderr_file", None) is not None:
            self._stderr_file.close()
            self._stderr_file = None
        if getattr(self, "state_dir", None):
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None


@register
class SandboxGrpcUnary(_Served):
    name = "sandbox-grpc-unary"


@register
class SandboxGrpcStream(_Served):
    name = "sandbox-grpc-stream"

    def call(self, event: dict[str, Any]) -> Any:
        from sandbox.client import Invocation

        (res,) = self.client.invoke_many([Invocation(FUNCTION, event, id="0")])
        self.on_demand += _on_demand(res)
        return _check(res)

    def submit(self, event: dict[str, Any]) -> Any:
        raise Unsupported("one InvokeMany stream carries the calls (run_inflight)")

    def run_inflight(self, events: Sequence[dict[str, Any]], inflight: int) -> list[int]:
        """One `InvokeMany` stream with exactly `inflight` invocations outstanding: the request
        iterator (consumed on gRPC's thread) waits for a slot before yielding the next."""
        from sandbox.client import Invocation

        slots = threading.Semaphore(inflight)
        sent: dict[str, int] = {}
        latencies: list[int] = []

        def requests() -> Iterator[Any]:
            for i, event in enumerate(events):
                slots.acquire()
                sent[str(i)] = time.perf_counter_ns()
                yield Invocation(FUNCTION, event, id=str(i))

        for res in self.client.invoke_many(requests()):
            t = time.perf_counter_ns()
            if not hasattr(res, "outcome"):  # InvocationRejected
                raise res.exception()
            self.on_demand += _on_demand(res)
            _check(res)
            latencies.append(t - sent[res.id])
            slots.release()
            if len(latencies) == len(events):
                break
        return latencies


def queued_rss(n: int) -> tuple[int, int, int]:
    """In a fresh process: an AsyncRuntime with 2 concurrent workers and `n` calls queued;
    return (rss_bytes, uss_bytes, submit_ns) of this process, the supervisor."""
    import psutil

    AsyncRuntime = importlib.import_module("sandbox").AsyncRuntime

    async def main() -> tuple[int, int, int]:
        rt = AsyncRuntime(profiles={"default": []}, min_idle=2, max_concurrency=2, max_queue=4096)
        await rt.start()
        try:
            await _maybe_await(rt.register(FUNCTION, source=workload.SOURCE, profile="default"))
            t0 = time.perf_counter_ns()
            tasks = [
                asyncio.ensure_future(rt.invoke(FUNCTION, {"op": "sleep", "s": 0.5}))
                for _ in range(n)
            ]
            await asyncio.sleep(0.1)
            submit_ns = time.perf_counter_ns() - t0
            info = psutil.Process().memory_full_info()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return int(info.rss), int(info.uss), submit_ns
        finally:
            await rt.aclose()

    return asyncio.run(main())

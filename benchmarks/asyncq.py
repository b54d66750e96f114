"""The `async` suite: asynchronous invocations' enqueue throughput and queue-to-start latency,
single node (the SQLite queue in a state directory) and fleet (the PostgreSQL queue).

    sandbox-async-sqlite       AsyncRuntime(async_queue=SqliteQueue(tmp)): WAL, synchronous=FULL,
                               group commit
    sandbox-async-postgresql   AsyncRuntime(async_queue=PostgresQueue(url)): the fleet's queue
                               (`SANDBOX_BENCH_POSTGRES_URL`, else a temporary server of
                               tests/postgres.py when PostgreSQL is installed; else unavailable)

The temporary PostgreSQL of tests/postgres.py runs with `fsync=off` and `synchronous_commit=off`
(a test server): its commits are not flushed, where the SQLite queue's are (`synchronous=FULL`);
a production PostgreSQL adds its commit flush to each transaction.

The function is a no-op deployed with `reuse=10000` (one worker serves many attempts), so the
rows measure the queue, not worker births. Every isolation layer is on (the runtime's default).

    queue-to-start          light load: one invocation at a time, the queue idle and the pool
                            warm before each: from `invoke_async` accepting it (`created`) to
                            its attempt starting (the attempt recorded RUNNING)
    enqueue-1-caller        sustained: `invoke_async` back to back from one task while the
                            dispatcher drains the queue; latency of each call, calls/s
    enqueue-32-callers      sustained: 32 tasks submitting at once (group commit at work)
    drain                   sustained: from the first submission of the 32-caller burst to the
                            last invocation SUCCEEDED; invocations completed per second
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.core import LIGHT, SUSTAINED, SuiteResult, summarize
from benchmarks.suites import Config, Unit

NOOP = "def handler(event, context):\n    return event\n"
#: (quick, full)
LIGHT_N = (10, 200)
ENQUEUE_N = (100, 2000)
CALLERS = 32


@contextlib.contextmanager
def _postgres_url() -> Iterator[str]:
    """A database URL for the fleet's queue (raises RuntimeError saying why there is none)."""
    given = os.environ.get("SANDBOX_BENCH_POSTGRES_URL")
    if given:
        yield given
        return
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    try:
        from postgres import Postgres, unavailable  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tests))
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    with Postgres() as server:
        yield server.database("bench")


async def _measure(queue: Any, cfg: Config) -> dict[str, Any]:
    from sandbox.runtime import AsyncRuntime

    out: dict[str, Any] = {}
    async with AsyncRuntime(min_idle=2, async_queue=queue) as rt:
        rt.register("noop", source=NOOP, reuse=10_000)
        await rt.wait_warm()
        first = await rt.invoke_async("noop", 0)  # the worker loaded
        await rt.wait_invocation(first.id, 60)
        # Light load: one at a time.
        lat = []
        for i in range(cfg.n(*LIGHT_N)):
            await rt.wait_warm()
            queued = await rt.invoke_async("noop", i)
            done = await rt.wait_invocation(queued.id, 60)
            lat.append(int((done.attempts[0].started - done.created) * 1e9))
        out["queue-to-start"] = (lat, None)
        # Sustained: one caller back to back.
        n = cfg.n(*ENQUEUE_N)
        lat, ids = [], []
        t0 = time.perf_counter_ns()
        for i in range(n):
            t = time.perf_counter_ns()
            ids.append((await rt.invoke_async("noop", i)).id)
            lat.append(time.perf_counter_ns() - t)
        out["enqueue-1-caller"] = (lat, time.perf_counter_ns() - t0)
        for ident in ids:
            await rt.wait_invocation(ident, 300)
        # Sustained: 32 callers at once, then the queue drained.
        lat, ids = [], []

        async def caller(k: int) -> None:
            for i in range(k, n, CALLERS):
                t = time.perf_counter_ns()
                ids.append((await rt.invoke_async("noop", i)).id)
                lat.append(time.perf_counter_ns() - t)

        t0 = time.perf_counter_ns()
        await asyncio.gather(*(caller(k) for k in range(CALLERS)))
        out["enqueue-32-callers"] = (lat, time.perf_counter_ns() - t0)
        finished = [await rt.wait_invocation(ident, 300) for ident in ids]
        wall = time.perf_counter_ns() - t0
        starts = [int((f.attempts[-1].started - f.created) * 1e9) for f in finished]
        out["drain"] = (starts, wall)
        out["states"] = sorted({f.state.value for f in finished})
    return out


def async_suite(cfg: Config) -> list[Unit]:
    def unit(method: str) -> Unit:
        def run(res: SuiteResult) -> None:
            try:
                with contextlib.ExitStack() as stack:
                    if method == "sandbox-async-sqlite":
                        from sandbox.asyncq_sqlite import SqliteQueue

                        tmp = stack.enter_context(tempfile.TemporaryDirectory(
                            prefix="sandbox-bench-async-"))
                        queue: Any = SqliteQueue(tmp)
                    else:
                        from sandbox.asyncq_pg import PostgresQueue

                        queue = PostgresQueue(stack.enter_context(_postgres_url()))
                    data = asyncio.run(_measure(queue, cfg))
            except Exception as exc:  # recorded, the suite goes on
                text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                res.unavailable.append(("*", method, "none", text))
                return
            for scenario, regime in (("queue-to-start", LIGHT), ("enqueue-1-caller", SUSTAINED),
                                     ("enqueue-32-callers", SUSTAINED), ("drain", SUSTAINED)):
                lat, wall = data[scenario]
                res.rows.append(summarize(scenario, method, "none", lat, wall_ns=wall,
                                          regime=regime))
            if method == "sandbox-async-postgresql" and not os.environ.get(
                    "SANDBOX_BENCH_POSTGRES_URL"):
                res.notes.append("sandbox-async-postgresql: a temporary test server with "
                                 "fsync=off, synchronous_commit=off (commits not flushed; the "
                                 "SQLite queue's are: synchronous=FULL)")
            res.notes.append(f"{method}: every invocation ended {', '.join(data['states'])}; "
                             "`drain` rows: latency is each invocation's queue-to-start in the "
                             "32-caller burst (it waited behind the backlog), throughput is "
                             "invocations completed per second")
        return Unit(f"async: {method}", run)

    methods = ["sandbox-async-sqlite", "sandbox-async-postgresql"]
    return [unit(m) for m in methods if cfg.only is None or m in cfg.only]

"""The `executor` suite: `sandbox.Executor` beside ProcessPoolExecutor, pebble and loky, one run.

Every pool gets the same number of workers (one per CPU) and runs `benchmarks.executor_work`.

    sustained map   `list(pool.map(noop, range(N)))` on a pool warmed by one untimed map: all N
                    calls submitted at once, results read as they come, no pauses between
                    calls (the *sustained* regime: with single-use workers every call waits for
                    a worker birth). Per-call time = wall / N (the rows' mean of the gaps between
                    consecutive results); calls/s = N / wall. Ratios: sandbox-executor per call
                    ÷ each peer's, every round.
    faults          a warm pool (*light load*), one bad call submitted with 2 × workers no-op
                    calls beside it: a call that never returns (0.5 s timeout), a call killed
                    for memory, a segfault. What the bad call's future raises, how many of the
                    others failed, whether the next call on the same pool works, what is left
                    behind (a broken pool, a worker spinning forever), and the time from the
                    moment the bad call's outcome is known and the calls beside it have ended
                    until a call has succeeded on a pool back at full capacity, doing what a
                    user must: nothing, make a new pool, or kill the stuck worker and make a
                    new pool (the rows).

    sandbox-executor        Executor(workers, limits=...) at its defaults: strict isolation as
                            root, a fresh worker per call; `preload=["benchmarks.executor_work"]`
                            (what a user does for their own module: a fresh worker would import
                            it at each call)
    sandbox-executor-reuse  the same with reuse=100 (a worker serves 100 calls)
    ppe                     concurrent.futures.ProcessPoolExecutor, fork (Linux's default)
    loky                    loky.ProcessPoolExecutor at its defaults
    pebble                  pebble.ProcessPool, fork; `schedule(..., timeout=)` for the timeout

How each fault is made. Timeout: `spin()` (100 % CPU, never returns); ours and pebble are given
a 0.5 s per-call timeout; ProcessPoolExecutor and loky have none, so the caller's
`future.result(timeout=0.5)` raises TimeoutError and the call goes on. Memory: ours allocates
512 MiB under `memory_bytes=128 MiB` (the cgroup's OOM killer); the peers have no memory limit
to run into, so their worker is SIGKILLed as the kernel's OOM killer would
(`executor_work.oom_killed`). Segfault: `ctypes.string_at(0)` everywhere.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks import executor_work as work
from benchmarks.core import LIGHT, SUSTAINED, Ratio, SuiteResult, summarize
from benchmarks.peers import POOL_START_METHOD, pool_workers
from benchmarks.suites import Config, Unit

#: map methods, in the order they run in each round
MAP_METHODS = ("ppe", "loky", "pebble", "sandbox-executor", "sandbox-executor-reuse")
FAULT_METHODS = ("ppe", "loky", "pebble", "sandbox-executor")
FAULTS = ("timeout", "memory", "segfault")
TIMEOUT_S = 0.5
REUSE = 100
#: timed map calls per method and round: (quick, full)
MAP_CALLS = (40, 2000)
#: deadlock guard for every wait (never reached when things work)
GUARD_S = 120.0


class Pool:
    """One executor under test: a uniform face over four APIs."""

    name = ""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: Any = None

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self.pool.submit(fn, *args)  # type: ignore[no-any-return]

    def map(self, fn: Callable[..., Any], items: range) -> Iterator[Any]:
        return self.pool.map(fn, items)  # type: ignore[no-any-return]

    def bad_call(self, fault: str) -> concurrent.futures.Future[Any]:
        return self.submit(work.spin if fault == "timeout" else
                           work.oom_killed if fault == "memory" else work.segfault, 0)

    def outcome(self, future: concurrent.futures.Future[Any], fault: str) -> BaseException | None:
        """Wait for the bad call the way this pool's user would; its exception."""
        timeout = TIMEOUT_S if fault == "timeout" else GUARD_S
        try:
            future.result(timeout=timeout)
        except BaseException as exc:
            return exc
        return None

    def kill(self) -> None:
        """Force the pool's processes down (a worker that never returns)."""
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def warm(self) -> None:
        list(self.map(work.noop, range(4 * self.workers)))


class Ppe(Pool):
    name = "ppe"

    def start(self) -> None:
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context(POOL_START_METHOD))

    def kill(self) -> None:
        # No public way before Python 3.14 (terminate_workers) to stop a running call.
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None


class Loky(Pool):
    name = "loky"

    def start(self) -> None:
        import loky  # type: ignore[import-untyped]

        self.pool = loky.ProcessPoolExecutor(self.workers)

    def kill(self) -> None:
        self.pool.shutdown(wait=True, kill_workers=True)
        self.pool = None


class Pebble(Pool):
    name = "pebble"

    def start(self) -> None:
        import pebble

        self.pool = pebble.ProcessPool(
            self.workers, context=multiprocessing.get_context(POOL_START_METHOD))

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self.pool.schedule(fn, args=args)  # type: ignore[no-any-return]

    def map(self, fn: Callable[..., Any], items: range) -> Iterator[Any]:
        return self.pool.map(fn, items).result()  # type: ignore[no-any-return]

    def bad_call(self, fault: str) -> concurrent.futures.Future[Any]:
        if fault == "timeout":
            return self.pool.schedule(work.spin, args=(0,), timeout=TIMEOUT_S)  # type: ignore[no-any-return]
        return super().bad_call(fault)

    def outcome(self, future: concurrent.futures.Future[Any], fault: str) -> BaseException | None:
        try:
            future.result(timeout=GUARD_S)
        except BaseException as exc:
            return exc
        return None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool.join(timeout=GUARD_S)
            self.pool = None


class Ours(Pool):
    name = "sandbox-executor"
    reuse = 1

    def start(self) -> None:
        from sandbox import Executor, Limits

        self.pool = Executor(
            self.workers, preload=["benchmarks.executor_work"], reuse=self.reuse,
            limits=Limits(wall_timeout_s=TIMEOUT_S if self.fault == "timeout" else None,
                          memory_bytes=128 * 2**20 if self.fault == "memory" else None))

    fault = ""

    def bad_call(self, fault: str) -> concurrent.futures.Future[Any]:
        if fault == "memory":
            return self.submit(work.allocate, 512 * 2**20)
        return super().bad_call(fault)

    def outcome(self, future: concurrent.futures.Future[Any], fault: str) -> BaseException | None:
        return Pebble.outcome(self, future, fault)  # the executor's own limits end it


class OursReuse(Ours):
    name = "sandbox-executor-reuse"
    reuse = REUSE


POOLS: dict[str, type[Pool]] = {cls.name: cls for cls in (Ppe, Loky, Pebble, Ours, OursReuse)}


@contextlib.contextmanager
def running(name: str, workers: int, fault: str = "") -> Iterator[Pool]:
    pool = POOLS[name](workers)
    if isinstance(pool, Ours):
        pool.fault = fault
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


# -- sustained map ------------------------------------------------------------------------------

@dataclasses.dataclass
class MapSample:
    gaps_ns: list[int]
    wall_ns: int

    @property
    def per_call_ms(self) -> float:
        return self.wall_ns / len(self.gaps_ns) / 1e6


def measure_map(name: str, workers: int, n: int) -> MapSample:
    with running(name, workers) as pool:
        pool.warm()
        stamps = []
        t0 = time.perf_counter_ns()
        for _ in pool.map(work.noop, range(n)):
            stamps.append(time.perf_counter_ns())
    gaps = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    return MapSample(gaps, stamps[-1] - t0)


# -- faults -------------------------------------------------------------------------------------

@dataclasses.dataclass
class FaultSample:
    error: str
    others_failed: int
    others: int
    next_call: str
    left: str
    action: str
    recover_ns: int
    lag_ns: int | None


def _name(exc: BaseException | None) -> str:
    return "no error" if exc is None else type(exc).__name__


def measure_fault(name: str, fault: str, workers: int) -> FaultSample:
    pool = POOLS[name](workers)
    if isinstance(pool, Ours):
        pool.fault = fault
    pool.start()
    try:
        pool.warm()
        t_submit = time.perf_counter_ns()
        bad = pool.bad_call(fault)
        others: list[concurrent.futures.Future[Any] | None] = []
        for i in range(2 * workers):
            try:
                others.append(pool.submit(work.noop, i))
            except Exception:  # a pool already broken refuses at submit: a failed call too
                others.append(None)
        error = pool.outcome(bad, fault)
        t_out = time.perf_counter_ns()
        lag = t_out - t_submit - int(TIMEOUT_S * 1e9) if fault == "timeout" else None
        stuck = not bad.done()
        failed = 0
        for future in others:
            if future is None:
                failed += 1
                continue
            with contextlib.suppress(BaseException):
                if future.exception(timeout=GUARD_S) is not None:
                    failed += 1
        # The next call, on the same pool, once the calls beside the bad one have ended (so it
        # waits for none of them: what is timed is the fault's aftermath alone).
        t_settled = time.perf_counter_ns()
        try:
            probe: Any = pool.submit(work.noop, -1).result(timeout=GUARD_S)
            next_call = "works" if probe == -1 else f"wrong result {probe!r}"
        except BaseException as exc:
            next_call = f"fails: {type(exc).__name__}"
        t_next = time.perf_counter_ns()
        if stuck:
            left = "the call still runs: a worker spinning at 100 % CPU, forever"
            action = "kill the pool's processes, make a new pool"
        elif next_call != "works":
            left = "a broken pool: every call refused"
            action = "make a new pool"
        else:
            left = "nothing"
            action = "none"
        if action == "none":
            recover = t_next - t_settled
        else:
            t_action = time.perf_counter_ns()
            if stuck:
                pool.kill()
            else:
                pool.close()
            pool.start()
            pool.submit(work.noop, 1).result(timeout=GUARD_S)
            recover = (t_next - t_settled) + (time.perf_counter_ns() - t_action)
        return FaultSample(_name(error), failed, len(others), next_call, left, action, recover,
                           lag)
    finally:
        if pool.pool is not None:
            pool.kill()  # whatever is left, a spinning worker included


# -- the suite ----------------------------------------------------------------------------------

def executor(cfg: Config) -> list[Unit]:
    workers = pool_workers()
    rounds = cfg.n(1, 3)
    n = cfg.n(*MAP_CALLS)
    fault_reps = cfg.n(1, 3)
    maps: dict[str, list[MapSample]] = {}
    faults: dict[tuple[str, str], list[FaultSample]] = {}
    failed: set[str] = set()
    chosen = [m for m in MAP_METHODS if cfg.only is None or m in cfg.only]
    units = []

    def guarded(res: SuiteResult, scenario: str, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            failed.add(f"{scenario}/{name}")
            res.unavailable.append((scenario, name, "none", f"{type(exc).__name__}: {exc}"[:300]))

    for r in range(rounds):
        for name in chosen:
            def run_map(res: SuiteResult, name: str = name) -> None:
                if f"map/{name}" in failed:
                    return
                guarded(res, "sustained-map-noop", name,
                        lambda: maps.setdefault(name, []).append(measure_map(name, workers, n)))

            units.append(Unit(f"executor map {name} (round {r + 1}/{rounds})", run_map))
    for fault in FAULTS:
        for name in (m for m in FAULT_METHODS if m in chosen):
            def run_fault(res: SuiteResult, name: str = name, fault: str = fault) -> None:
                def measure() -> None:
                    for _ in range(fault_reps):
                        faults.setdefault((fault, name), []).append(
                            measure_fault(name, fault, workers))
                guarded(res, f"fault: {fault}", name, measure)

            units.append(Unit(f"executor fault {fault} {name}", run_fault))

    def finish(res: SuiteResult) -> None:
        stop_loky_tracker()
        rows = {}
        for name in chosen:
            samples = maps.get(name)
            if not samples or f"sustained-map-noop/{name}" in failed:
                continue
            gaps = [g for s in samples for g in s.gaps_ns]
            row = summarize("sustained-map-noop", name, "none", gaps,
                            wall_ns=sum(s.wall_ns for s in samples), regime=SUSTAINED)
            rows[name] = row
            res.rows.append(row)
            res.notes.append(
                f"{name} sustained map: per call (wall / calls) "
                + ", ".join(f"{s.per_call_ms:.3g} ms" for s in samples) + " per round")
        for theirs_name in ("ppe", "loky", "pebble"):
            for ours_name in ("sandbox-executor", "sandbox-executor-reuse"):
                ours = maps.get(ours_name)
                theirs = maps.get(theirs_name)
                if not ours or not theirs or ours_name not in rows or theirs_name not in rows:
                    continue
                a = statistics.median(s.per_call_ms for s in ours)
                b = statistics.median(s.per_call_ms for s in theirs)
                res.ratios.append(Ratio(
                    label=f"sustained map, per call: {ours_name} ÷ {theirs_name}",
                    ours=f"{ours_name} ms per call", theirs=f"{theirs_name} ms per call",
                    ours_value=round(a, 4), theirs_value=round(b, 4), unit="ms",
                    value=round(a / b, 4),
                    per_round=[round(x.per_call_ms / y.per_call_ms, 4)
                               for x, y in zip(ours, theirs, strict=False)]))
        table: dict[str, dict[str, Any]] = {}
        for (fault, name), samples in faults.items():
            res.rows.append(summarize(f"fault: {fault}, until a call succeeds at full capacity",
                                      name, "none", [s.recover_ns for s in samples],
                                      regime=LIGHT))
            first = samples[0]
            table.setdefault(fault, {})[name] = {
                "error": sorted({s.error for s in samples}),
                "others_failed": [s.others_failed for s in samples],
                "others": first.others,
                "next_call": sorted({s.next_call for s in samples}),
                "left": sorted({s.left for s in samples}),
                "action": sorted({s.action for s in samples}),
                "recover_ms": [round(s.recover_ns / 1e6, 2) for s in samples],
                "deadline_to_outcome_ms": [round(s.lag_ns / 1e6, 2) for s in samples
                                           if s.lag_ns is not None],
            }
        res.extra["faults"] = table
        res.extra["workers"] = workers
        res.notes.append(
            f"{workers} workers per pool; sustained map: {n} calls per method and round, "
            f"{rounds} round(s); faults: {fault_reps} repetition(s) each, "
            f"{2 * workers} no-op calls beside the bad one")

    units.append(Unit("executor (summary)", finish))
    return units


def stop_loky_tracker() -> None:
    """loky starts a resource tracker process of its own that lives until we exit: stop it,
    so the suite leaves no process behind."""
    import sys

    module = sys.modules.get("loky.backend.resource_tracker")
    tracker = getattr(module, "_resource_tracker", None)
    if getattr(tracker, "_pid", None) is not None:
        tracker._stop()  # type: ignore[union-attr]

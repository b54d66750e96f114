"""The Method interface, the method table, timing, statistics, and machine information.

A *method* is one way of running `workload.handler` in another process (a fresh interpreter, a
`multiprocessing.Process`, a warm pool, a gRPC server, our runtime). Every method is a small class
with the same life cycle::

    m = METHODS["ppe-warm"](preload="stdlib")
    m.setup()                      # start pools/servers/zygotes; not timed
    m.ready()                      # wait until warm (pre-forked workers ready); not timed
    m.call(event)                  # one invocation, blocking; timed by the suite
    m.run_inflight(events, 8)      # many invocations, at most 8 in flight; per-call latencies
    m.call_with_timeout(ev, 0.1)   # -> "OK" | "TIMEOUT" | ...; methods that cannot time out raise
    m.timeout_lags(ev, 0.1, 32, 16)  # 32 timed-out calls, 16 at once: deadline -> outcome, ns
    m.teardown()                   # stop everything it started; idempotent

Suites time calls in this process with `time.perf_counter_ns`. A method whose `setup` raises
is reported as "unavailable: <reason>" and skipped; the suite still writes its files.

Every row says which *regime* it measures (`Row.regime`):

    light load, warm pool   before each timed call the harness waits, untimed, until the method
                            is warm (`ready()`: our pools have their pre-forked workers back), so
                            the call never pays a birth: the idle-pool latency
    sustained               calls back to back (1 caller) or N callers without pauses; only one
                            untimed warm-up call before the timed run. With single-use workers
                            every call needs a birth: the regime users live in
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from benchmarks.workload import PROFILES

PRELOADS = tuple(PROFILES)

#: the two regimes a row can measure (see the module docstring)
LIGHT = "light load, warm pool"
SUSTAINED = "sustained"


class Unsupported(Exception):
    """The method does not support this operation (e.g. a per-call timeout); skip the row."""


class Method:
    """One way of running the workload. Subclasses set `name` and override what they support."""

    name: ClassVar[str] = ""
    #: "peer" or "ours"
    family: ClassVar[str] = "peer"
    #: the preloads this method is meaningful for (a bare echo server ignores preloads)
    preloads: ClassVar[tuple[str, ...]] = PRELOADS

    #: for the memory suite: the gc.freeze() settings `idle_workers` can measure (empty: none)
    idle_freeze_modes: ClassVar[tuple[bool, ...]] = ()

    def __init__(self, preload: str = "none", **options: Any) -> None:
        """`preload` names a profile; `modules=[...]` overrides its modules (the paper suite
        labels a one-package profile by the package's name)."""
        if "modules" in options:
            self.modules: list[str] = list(options.pop("modules"))
        elif preload in PROFILES:
            self.modules = list(PROFILES[preload])
        else:
            raise ValueError(f"unknown preload {preload!r}; expected one of {PRELOADS}")
        self.preload = preload
        self.options = options

    def setup(self) -> None:
        """Start what the method needs (pools, servers, zygotes). Not timed."""

    def ready(self) -> None:
        """Wait, untimed, until the method is warm (e.g. its pre-forked workers are ready), so
        a timed call never includes a fork the method would normally have done ahead of time.
        The light-load suites call it before each timed call, the throughput suite before each
        level; the sustained suite never does (there each call pays for the birth it needs)."""

    def call(self, event: dict[str, Any]) -> Any:
        """Run one invocation and return its result."""
        raise NotImplementedError

    def take_on_demand(self) -> int:
        """Calls served by a worker forked on demand since the last call of this (our methods
        count them from the result's stats; peers return 0)."""
        return 0

    def submit(self, event: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """Start one invocation; methods with native futures override this for `run_inflight`."""
        raise Unsupported(f"{self.name} has no native futures")

    def call_with_timeout(self, event: dict[str, Any], timeout_s: float) -> str:
        """Run one invocation with a wall-clock timeout; return the outcome name."""
        raise Unsupported(f"{self.name} cannot time out a call")

    def timeout_lags(
        self, event: dict[str, Any], timeout_s: float, total: int, inflight: int
    ) -> list[int]:
        """`total` calls that must time out, `inflight` at once, back to back; for each, ns from
        its deadline to its outcome reaching the caller. Here: the call's time minus the timeout
        (right for methods whose deadline starts when the caller calls); methods that queue a
        call before its deadline starts override this."""
        timeout_ns = int(timeout_s * 1e9)

        def one(_: int) -> int:
            t0 = time.perf_counter_ns()
            outcome = self.call_with_timeout(event, timeout_s)
            elapsed = time.perf_counter_ns() - t0
            if outcome != "TIMEOUT":
                raise RuntimeError(f"expected TIMEOUT, got {outcome}")
            return max(0, elapsed - timeout_ns)

        with concurrent.futures.ThreadPoolExecutor(max_workers=inflight) as pool:
            return list(pool.map(one, range(total)))

    #: set by a `run_inflight` that times its own run (e.g. without its helpers' start-up)
    wall_ns: int | None = None

    def run_inflight(self, events: Sequence[dict[str, Any]], inflight: int) -> list[int]:
        """Run `events` with at most `inflight` outstanding; return each call's latency in ns."""
        try:
            return _run_with_futures(self.submit, events, inflight)
        except Unsupported:
            return _run_with_threads(self.call, events, inflight)

    def idle_workers(
        self, count: int, freeze: bool
    ) -> contextlib.AbstractContextManager[list[int]]:
        """Context manager: `count` idle workers exist while inside; yields their pids."""
        raise Unsupported(f"{self.name} has no idle workers to measure")

    def teardown(self) -> None:
        """Stop everything `setup` started. Must be idempotent."""

    def __enter__(self) -> Method:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} preload={self.preload}>"


def _run_with_futures(
    submit: Callable[[dict[str, Any]], concurrent.futures.Future[Any]],
    events: Sequence[dict[str, Any]],
    inflight: int,
) -> list[int]:
    n = len(events)
    latencies = [0] * n
    slots = threading.Semaphore(inflight)
    all_done = threading.Event()
    lock = threading.Lock()
    state = {"left": n}
    errors: list[BaseException] = []

    def finished(i: int, t0: int, fut: Any) -> None:
        latencies[i] = time.perf_counter_ns() - t0
        exc = fut.exception()
        with lock:
            if exc is not None:
                errors.append(exc)
            state["left"] -= 1
            if state["left"] == 0:
                all_done.set()
        slots.release()

    if n == 0:
        return []
    for i, event in enumerate(events):
        slots.acquire()
        if errors:
            break
        t0 = time.perf_counter_ns()
        fut = submit(event)
        fut.add_done_callback(lambda f, i=i, t0=t0: finished(i, t0, f))
    else:
        all_done.wait()
    if errors:
        raise errors[0]
    return latencies


def _run_with_threads(
    call: Callable[[dict[str, Any]], Any], events: Sequence[dict[str, Any]], inflight: int
) -> list[int]:
    def timed(event: dict[str, Any]) -> int:
        t0 = time.perf_counter_ns()
        call(event)
        return time.perf_counter_ns() - t0

    with concurrent.futures.ThreadPoolExecutor(max_workers=inflight) as pool:
        return list(pool.map(timed, events))


# --- the method table ------------------------------------------------------------------------

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the table under its `name`."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls
    return cls


def load_methods() -> dict[str, type[Method]]:
    """Fill the table (importing peers and ours; ours imports `sandbox` only at setup)."""
    import benchmarks.ours
    import benchmarks.peers  # noqa: F401

    return METHODS


# --- results ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of a suite's `results` (the JSON schema, field for field; `rss_bytes` and
    `births_per_s` only where measured)."""

    scenario: str
    method: str
    preload: str
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float | None = None
    uss_bytes: int | None = None
    rss_bytes: int | None = None
    #: LIGHT or SUSTAINED
    regime: str = LIGHT
    births_per_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d = {"regime": d.pop("regime"), **d}
        for optional in ("rss_bytes", "births_per_s"):
            if d[optional] is None:
                del d[optional]
        return d


@dataclasses.dataclass
class Ratio:
    """One ratio between two rows of the same run, with the target it is held to (if any).

    `value` is ours / theirs of the metrics named; `op` is "<=" or ">="; `goal` a stretch
    target beyond `target`; `per_round` the same ratio in each round of the run."""

    label: str
    ours: str
    theirs: str
    ours_value: float
    theirs_value: float
    unit: str
    value: float
    op: str = ""
    target: float | None = None
    goal: float | None = None
    per_round: list[float] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def verdict(self) -> str:
        if self.target is None:
            return "(no target)"
        sign = "≤" if self.op == "<=" else "≥"
        text = f"{sign} {self.target:g}×: " + ("pass" if self.passed else "FAIL")
        if self.goal is not None:
            reached = self.value <= self.goal if self.op == "<=" else self.value >= self.goal
            text += f"; goal {sign} {self.goal:g}×: " + ("reached" if reached else "not yet")
        return text

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed, "verdict": self.verdict()}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of already sorted values."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def summarize(
    scenario: str,
    method: str,
    preload: str,
    latencies_ns: Sequence[int],
    *,
    wall_ns: int | None = None,
    uss_bytes: int | None = None,
    rss_bytes: int | None = None,
    regime: str = LIGHT,
) -> Row:
    ms = sorted(x / 1e6 for x in latencies_ns)
    return Row(
        scenario=scenario,
        method=method,
        preload=preload,
        n=len(ms),
        p50_ms=round(percentile(ms, 50), 4),
        p99_ms=round(percentile(ms, 99), 4),
        mean_ms=round(statistics.fmean(ms), 4) if ms else 0.0,
        throughput_per_s=round(len(ms) / (wall_ns / 1e9), 2) if wall_ns else None,
        uss_bytes=uss_bytes,
        rss_bytes=rss_bytes,
        regime=regime,
    )


@dataclasses.dataclass
class SuiteResult:
    suite: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    #: (scenario, method, preload, reason) for methods that could not run
    unavailable: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: seconds each unit took (set up, measured, torn down), by unit label
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the suite's ratios against its targets (sustained, births)
    ratios: list[Ratio] = dataclasses.field(default_factory=list)
    #: suite-specific data written as top-level JSON keys (e.g. the births' phases)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- machine information ---------------------------------------------------------------------

_VERSIONED = (
    "sandbox", "grpcio", "pebble", "numpy", "pandas", "requests", "pydantic", "matplotlib",
    "tqdm", "psutil", "msgpack",
)  # fmt: skip


def _git() -> dict[str, Any] | None:
    """The checkout measured: commit, and whether `sandbox/` differs from it (None outside a
    git checkout)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "sandbox"],
                                 capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "sandbox_changed": bool(changed.strip())}  # fmt: skip


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    versions: dict[str, str | None] = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "memory_bytes": mem_total,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "packages": versions,
        "env": {
            k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ
        },
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        #: 1, 5 and 15 minute load averages when the run started (other work on the machine)
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "git": _git(),
    }

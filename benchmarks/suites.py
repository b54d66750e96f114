"""The suites: functions over (methods x preloads x scenarios) that time calls in this process.

Each suite is a list of *units* (one method x preload, set up, measured, torn down). The CLI
runs the units in order and advances the progress bar once per unit, so a suite's cost is
visible while it runs. A unit whose method cannot be set up is recorded as
"unavailable: <reason>" and the suite goes on.

    coldstart   invoke -> result of a function using its preloaded modules; method x preload
    latency     p50/p99 of a trivial call at light load (warm pool before each call), and after
                an idle gap
    throughput  calls/s at 1, 8, 32, 128 in flight; isolated (single-use) and reuse modes
    timeouts    a function that never returns, 100 ms timeout: deadline -> outcome -> next call,
                at light load and while 16 callers keep the pool busy
    memory      USS of idle workers per profile, with/without gc.freeze(); supervisor, 1000 queued
    paper       SOCK / Forklift: fresh `import X` vs a zygote that preloaded X, per package
    sustained   (sustained.py) no pauses: 1, 16, 128 callers; embedded, gRPC unary, InvokeMany,
                beside ppe-warm, mp-fork, the fork-and-reap floor and a bare gRPC echo
    births      (births.py) births/s and where a birth's time goes, all isolation layers vs none
    calls       (calls.py) where a call's time goes, phase by phase, at light load and sustained,
                all isolation layers vs none
    observability  (observability.py) a gRPC Invoke with metrics + JSON access logs on vs off,
                at light load and sustained, the two servers called in turn; counters checked
    executor    (executors.py) sandbox.Executor beside ProcessPoolExecutor, loky and pebble: a
                sustained map of a no-op (per call, ratios), and what a timeout, an OOM kill and
                a segfault cost each pool (one failed future, or a broken or stuck pool)
    async       (asyncq.py) asynchronous invocations: enqueue throughput (1 and 32 callers) and
                queue-to-start latency, single node (SQLite) and fleet (PostgreSQL)
    fleet       (fleet.py) three `sandbox serve` replicas sharing a PostgreSQL store
                (localfleet.py): a deploy through one served by the others (ms), and calls/s
                of 8 callers through a round_robin client over three vs one replica
    soak        (soak.py, not in `all`: long) 20,000 calls from 16 callers, 10 % hostile: nothing
                lost, every outcome right, the supervisor's RSS and fds flat (slopes)

Every row says its regime (`core.LIGHT`: the harness waited for a warm pool before each call;
`core.SUSTAINED`: no pauses between calls).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import multiprocessing
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.core import (
    LIGHT,
    METHODS,
    PRELOADS,
    SUSTAINED,
    Method,
    SuiteResult,
    Unsupported,
    percentile,
    summarize,
)
from benchmarks.workload import PROFILES


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool = False
    #: restrict to these method names (None: all the suite uses)
    only: frozenset[str] | None = None

    def n(self, quick: int, full: int) -> int:
        return quick if self.quick else full


@dataclasses.dataclass
class Unit:
    label: str
    run: Callable[[SuiteResult], None]


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def method(
    res: SuiteResult, name: str, preload: str, scenario: str = "*", **options: Any
) -> Iterator[Method | None]:
    """Set up a method; yield None (and record why) if it cannot run; always tear it down."""
    m: Method | None = None
    try:
        m = METHODS[name](preload, **options)
        m.setup()
    except Exception as exc:
        res.unavailable.append((scenario, name, preload, _reason(exc)))
        if m is not None:
            with contextlib.suppress(Exception):
                m.teardown()
        yield None
        return
    try:
        yield m
    finally:
        m.teardown()


def _guard(res: SuiteResult, scenario: str, m: Method, fn: Callable[[], None]) -> None:
    """Run one measurement; a method that fails mid-run is reported, not fatal."""
    try:
        fn()
    except Unsupported as exc:
        res.unavailable.append((scenario, m.name, m.preload, _reason(exc)))
    except Exception as exc:
        res.unavailable.append((scenario, m.name, m.preload, _reason(exc)))
        res.notes.append(f"{m.name} [{m.preload}] {scenario}: " + traceback.format_exc(limit=3))


def _sequential(
    m: Method, event: dict[str, Any], n: int, gap_s: float = 0.0
) -> tuple[list[int], int]:
    """Light load, warm pool: `n` calls one after the other; before each, untimed, `m.ready()`
    (our pools get their pre-forked workers back) and the idle gap. Returns (latencies, wall
    time of the calls alone: the sum of the latencies when anything was waited for between
    them)."""
    lat = []
    for _ in range(n):
        m.ready()
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter_ns()
        m.call(event)
        lat.append(time.perf_counter_ns() - t0)
    return lat, sum(lat)


def _note_on_demand(res: SuiteResult, m: Method, scenario: str, n: int) -> None:
    """Say when calls of a pre-forking method were served by a worker forked on demand."""
    k = m.take_on_demand()
    if k and m.name not in FORKING:
        res.notes.append(
            f"{m.name} [{m.preload}] {scenario}: {k} of {n} calls were served by a worker "
            "forked on demand"
        )


def _selected(cfg: Config, names: list[str]) -> list[str]:
    return [n for n in names if n in METHODS and (cfg.only is None or n in cfg.only)]


# --- coldstart -------------------------------------------------------------------------------

COLDSTART_METHODS = [
    "subprocess-fresh", "mp-spawn", "mp-forkserver", "mp-fork", "ppe-warm", "pebble-warm",
    "grpc-echo", "grpc-echo-stream",
    "sandbox-fork", "sandbox-prefork", "sandbox-reuse", "sandbox-grpc-unary", "sandbox-grpc-stream",
]  # fmt: skip
#: a fresh interpreter per call: fewer samples
SLOW = {"subprocess-fresh": (2, 15), "mp-spawn": (2, 15)}
FORKING = {"mp-forkserver", "mp-fork", "sandbox-fork"}


def coldstart(cfg: Config) -> list[Unit]:
    units = []
    for name in _selected(cfg, COLDSTART_METHODS):
        for preload in PRELOADS:
            if preload not in METHODS[name].preloads:
                continue

            def run(res: SuiteResult, name: str = name, preload: str = preload) -> None:
                scenario = "use-preloaded"
                event = {"op": "use", "modules": PROFILES[preload]}
                if name in SLOW:
                    n = cfg.n(*SLOW[name])
                elif name in FORKING:
                    n = cfg.n(8, 100)
                else:
                    n = cfg.n(20, 300)
                with method(res, name, preload, scenario) as m:
                    if m is None:
                        return

                    def measure() -> None:
                        if name not in SLOW:
                            m.call(event)  # warm-up (first-use effects in a warm worker)
                        m.take_on_demand()
                        lat, _ = _sequential(m, event, n)
                        _note_on_demand(res, m, scenario, n)
                        res.rows.append(summarize(scenario, name, preload, lat, regime=LIGHT))

                    _guard(res, scenario, m, measure)

            units.append(Unit(f"coldstart {name} [{preload}]", run))
    return units


# --- latency ---------------------------------------------------------------------------------

#: invocations a worker serves in the `reuse` rows of the gRPC methods
GRPC_REUSE = 1_000_000
#: (row label, method, options)
LATENCY_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("ppe-warm", "ppe-warm", {}),
    ("pebble-warm", "pebble-warm", {}),
    ("grpc-echo", "grpc-echo", {}),
    ("grpc-echo-stream", "grpc-echo-stream", {}),
    ("sandbox-prefork", "sandbox-prefork", {}),
    ("sandbox-reuse", "sandbox-reuse", {}),
    ("sandbox-fork", "sandbox-fork", {}),
    ("sandbox-grpc-unary", "sandbox-grpc-unary", {}),
    ("sandbox-grpc-stream", "sandbox-grpc-stream", {}),
    ("sandbox-grpc-unary-reuse", "sandbox-grpc-unary", {"reuse": GRPC_REUSE}),
    ("sandbox-grpc-stream-reuse", "sandbox-grpc-stream", {"reuse": GRPC_REUSE}),
]
IDLE_GAP_S = 0.05
#: the pool is warm before each call (the harness waits for it, untimed): light load
WARM_POOL = "light-load-warm-pool"
#: ... and an idle gap before each call
IDLE_GAP = f"light-load-idle-gap-{IDLE_GAP_S * 1000:.0f}ms"


def latency(cfg: Config) -> list[Unit]:
    """Rounds: every method once per round (set up, measured, torn down), the rounds one after
    the other, so slow drifts of the machine hit every method alike. The rows pool every
    round's samples; the notes give each round's p50 and its ratio to ppe-warm's."""
    rounds = cfg.n(1, 3)
    chosen = [(label, name, opts) for label, name, opts in LATENCY_METHODS
              if name in _selected(cfg, [name])]  # fmt: skip
    samples: dict[tuple[str, str], list[list[int]]] = {}
    failed: set[str] = set()
    units = []
    for r in range(rounds):
        for label, name, options in chosen:

            def run(
                res: SuiteResult, label: str = label, name: str = name, options: Any = options
            ) -> None:
                if label in failed:
                    return
                event = {"op": "echo", "payload": "x" * 32}
                before = len(res.unavailable)
                with method(res, name, "none", **options) as m:
                    if m is None:
                        failed.add(label)
                        return

                    def measure() -> None:
                        m.call(event)
                        m.take_on_demand()
                        n = cfg.n(60, 700)
                        lat, _ = _sequential(m, event, n)
                        _note_on_demand(res, m, f"{WARM_POOL} ({label})", n)
                        samples.setdefault((WARM_POOL, label), []).append(lat)
                        n = cfg.n(6, 40)
                        lat, _ = _sequential(m, event, n, gap_s=IDLE_GAP_S)
                        _note_on_demand(res, m, f"{IDLE_GAP} ({label})", n)
                        samples.setdefault((IDLE_GAP, label), []).append(lat)

                    _guard(res, "*", m, measure)
                if len(res.unavailable) > before:
                    failed.add(label)

            units.append(Unit(f"latency {label} (round {r + 1}/{rounds})", run))

    def finish(res: SuiteResult) -> None:
        for scenario in (WARM_POOL, IDLE_GAP):
            base = samples.get((scenario, "ppe-warm"), [])
            for label, _, _ in chosen:
                per_round = samples.get((scenario, label))
                if not per_round:
                    continue
                pooled = [x for lat in per_round for x in lat]
                res.rows.append(
                    summarize(scenario, label, "none", pooled, wall_ns=sum(pooled), regime=LIGHT)
                )
                p50s = [percentile(sorted(lat), 50) / 1e6 for lat in per_round]
                text = f"{label} {scenario}: p50 per round " + ", ".join(f"{p:.3g}" for p in p50s)
                if label != "ppe-warm" and len(base) == len(per_round):
                    ratios = [
                        p / (percentile(sorted(b), 50) / 1e6)
                        for p, b in zip(p50s, base, strict=True)
                    ]
                    text += " ms; / ppe-warm per round " + ", ".join(f"{x:.3g}×" for x in ratios)
                    text += f" (median {statistics.median(ratios):.3g}×)"
                else:
                    text += " ms"
                res.notes.append(text)

    units.append(Unit("latency (summary)", finish))
    return units


# --- throughput ------------------------------------------------------------------------------

INFLIGHT = (1, 8, 32, 128)
#: (method, mode, options): mode is how a worker is used; echo servers are the floor
THROUGHPUT_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("grpc-echo", "floor", {}),
    ("grpc-echo-stream", "floor", {}),
    ("ppe-warm", "reuse", {}),
    ("pebble-warm", "reuse", {}),
    ("mp-fork", "isolated", {}),
    ("sandbox-prefork", "isolated", {}),
    ("sandbox-reuse", "reuse", {}),
    ("sandbox-grpc-unary", "isolated", {}),
    ("sandbox-grpc-stream", "isolated", {}),
    ("sandbox-grpc-unary", "reuse", {"reuse": 1_000_000}),
    ("sandbox-grpc-stream", "reuse", {"reuse": 1_000_000}),
]


def throughput(cfg: Config) -> list[Unit]:
    units = []
    names = set(_selected(cfg, [n for n, _, _ in THROUGHPUT_METHODS]))
    for name, mode, options in THROUGHPUT_METHODS:
        if name not in names:
            continue

        def run(
            res: SuiteResult, name: str = name, mode: str = mode, options: dict[str, Any] = options
        ) -> None:
            event = {"op": "echo", "payload": "x" * 32}
            with method(res, name, "none", f"{mode} *", **options) as m:
                if m is None:
                    return
                m.call(event)
                for k in INFLIGHT:
                    scenario = f"{mode} inflight={k}"
                    total = max(cfg.n(2, 20) * k, cfg.n(24, 500))

                    def measure(k: int = k, total: int = total, scenario: str = scenario) -> None:
                        m.ready()
                        m.take_on_demand()
                        t0 = time.perf_counter_ns()
                        lat = m.run_inflight([event] * total, k)
                        wall = time.perf_counter_ns() - t0
                        res.rows.append(
                            summarize(scenario, name, "none", lat, wall_ns=wall, regime=SUSTAINED)
                        )
                        _note_on_demand(res, m, scenario, total)

                    _guard(res, scenario, m, measure)

        units.append(Unit(f"throughput {name} ({mode})", run))
    return units


# --- timeouts --------------------------------------------------------------------------------

TIMEOUT_METHODS = [
    "pebble-warm",
    "mp-fork",
    "subprocess-fresh",
    "sandbox-prefork",
    "sandbox-fork",
    "sandbox-reuse",
]
TIMEOUT_S = 0.1
#: under load: callers at once, each calling a function that sleeps forever (100 ms timeout)
LOADED_CALLERS = 16
#: the methods measured under load: pebble's deadline starts when one of its 2 workers takes
#: the task, which the caller cannot see (with 16 callers its queue would be the number)
LOADED_METHODS = ["mp-fork", "sandbox-prefork"]
SLEEP_FOREVER = {"op": "sleep", "s": 10**6}


def timeouts(cfg: Config) -> list[Unit]:
    units = []
    for name in _selected(cfg, TIMEOUT_METHODS):

        def run(res: SuiteResult, name: str = name) -> None:
            options = {"runtime_defaults": True} if name == "sandbox-prefork" else {}
            with method(res, name, "none", **options) as m:
                if m is None:
                    return

                def measure() -> None:
                    to_outcome, to_next = [], []
                    for _ in range(cfg.n(3, 20)):
                        m.ready()
                        t0 = time.perf_counter_ns()
                        outcome = m.call_with_timeout({"op": "hang"}, TIMEOUT_S)
                        t1 = time.perf_counter_ns()
                        if outcome != "TIMEOUT":
                            raise RuntimeError(f"expected TIMEOUT, got {outcome}")
                        m.call({"op": "echo"})
                        t2 = time.perf_counter_ns()
                        to_outcome.append(max(0, t1 - t0 - int(TIMEOUT_S * 1e9)))
                        to_next.append(t2 - t1)
                    res.rows.append(summarize("deadline-to-outcome", name, "none", to_outcome))
                    res.rows.append(summarize("next-call-after-timeout", name, "none", to_next))

                def loaded() -> None:
                    scenario = f"deadline-to-outcome-{LOADED_CALLERS}-callers"
                    k = LOADED_CALLERS
                    total = k * cfg.n(2, 12)
                    m.call({"op": "echo"})  # the one untimed warm-up; no waiting for warm
                    lags = m.timeout_lags(SLEEP_FOREVER, TIMEOUT_S, total, k)
                    res.rows.append(summarize(scenario, name, "none", lags, regime=SUSTAINED))
                    raw = getattr(m, "raw_lags", None)
                    if raw:
                        q = sorted(x / 1e6 for x in raw)
                        res.notes.append(
                            f"{name} {scenario}: the call's own time minus 100 ms, waits for a "
                            f"concurrency slot and a worker included: p50 {percentile(q, 50):.3g}"
                            f" ms, p99 {percentile(q, 99):.3g} ms (the row subtracts those "
                            "waits: the runtime arms the deadline when the worker gets the event)"
                        )

                _guard(res, "*", m, measure)
                if name in LOADED_METHODS:
                    _guard(res, f"deadline-to-outcome-{LOADED_CALLERS}-callers", m, loaded)

        units.append(Unit(f"timeouts {name}", run))
    return units


# --- memory ----------------------------------------------------------------------------------

MEMORY_METHODS = ["ppe-warm", "mp-spawn", "mp-forkserver", "mp-fork", "sandbox-prefork"]
QUEUED = 1000
QUEUED_METHODS = ["ppe-warm", "pebble-warm", "sandbox-prefork"]


def _uss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_full_info().uss)


def _in_clean_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in a freshly spawned interpreter: what this harness has imported or
    allocated so far (it runs many methods) must not show up in a fork-based method's memory."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        return ex.submit(fn, *args).result(timeout=180)


def _idle_uss(name: str, preload: str, freeze: bool) -> tuple[int, list[int]]:
    """In a clean process: set the method up, start 2 idle workers, return (ns to get them, USS)."""
    from benchmarks.core import load_methods

    load_methods()
    cls = METHODS[name]
    options = {"gc_freeze": freeze} if cls.family == "ours" else {}
    m = cls(preload, **options)
    m.setup()
    try:
        t0 = time.perf_counter_ns()
        with m.idle_workers(2, freeze) as pids:
            ready = time.perf_counter_ns() - t0
            return ready, [_uss(p) for p in pids]
    finally:
        m.teardown()


def _queued_in_child(name: str) -> tuple[int, int, int]:
    if name.startswith("sandbox"):
        from benchmarks import ours

        return _in_clean_process(ours.queued_rss, QUEUED)  # type: ignore[no-any-return]
    from benchmarks import peers

    return _in_clean_process(peers.queued_rss, name, QUEUED)  # type: ignore[no-any-return]


def memory(cfg: Config) -> list[Unit]:
    units = []
    for name in _selected(cfg, MEMORY_METHODS):
        for preload in PRELOADS if not cfg.quick else ("none", "heavy"):
            for freeze in METHODS[name].idle_freeze_modes:
                scenario = "idle-worker-gc-freeze" if freeze else "idle-worker"

                def run(
                    res: SuiteResult,
                    name: str = name,
                    preload: str = preload,
                    freeze: bool = freeze,
                    scenario: str = scenario,
                ) -> None:
                    try:
                        ready_ns, uss = _in_clean_process(_idle_uss, name, preload, freeze)
                    except Exception as exc:
                        res.unavailable.append((scenario, name, preload, _reason(exc)))
                        return
                    res.rows.append(
                        summarize(
                            scenario,
                            name,
                            preload,
                            [ready_ns],
                            uss_bytes=int(statistics.median(uss)),
                        )
                    )

                units.append(Unit(f"memory {name} [{preload}] {scenario}", run))
    for name in _selected(cfg, QUEUED_METHODS):
        scenario = f"supervisor-{QUEUED}-queued"

        def run_q(res: SuiteResult, name: str = name, scenario: str = scenario) -> None:
            try:
                rss, uss, submit_ns = _queued_in_child(name)
            except Exception as exc:
                res.unavailable.append((scenario, name, "none", _reason(exc)))
                return
            res.rows.append(
                summarize(
                    scenario,
                    name,
                    "none",
                    [submit_ns],
                    uss_bytes=uss,
                    rss_bytes=rss,
                    regime=SUSTAINED,
                )
            )

        units.append(Unit(f"memory {name} {scenario}", run_q))
    return units


# --- paper: SOCK (USENIX ATC '18) / Forklift ---------------------------------------------------

#: (PyPI project, import name), in order of PyPI downloads (the registry's top-15000 ranking,
#: 2026); the suite takes the first N that are installed here.
MOST_IMPORTED = [
    ("boto3", "boto3"), ("packaging", "packaging"), ("urllib3", "urllib3"), ("certifi", "certifi"),
    ("idna", "idna"), ("requests", "requests"), ("typing-extensions", "typing_extensions"),
    ("charset-normalizer", "charset_normalizer"), ("setuptools", "setuptools"),
    ("botocore", "botocore"), ("cryptography", "cryptography"),
    ("python-dateutil", "dateutil.parser"), ("six", "six"), ("pyyaml", "yaml"),
    ("pydantic", "pydantic.main"), ("pygments", "pygments.lexers"), ("cffi", "cffi"),
    ("click", "click"), ("numpy", "numpy"), ("pluggy", "pluggy"), ("grpcio", "grpc"),
    ("protobuf", "google.protobuf.descriptor_pool"), ("attrs", "attrs"), ("pytest", "pytest"),
    ("httpx", "httpx"), ("pandas", "pandas"), ("jinja2", "jinja2"), ("rich", "rich.console"),
    ("psutil", "psutil"), ("matplotlib", "matplotlib.pyplot"), ("tqdm", "tqdm"),
    ("pillow", "PIL.Image"), ("msgpack", "msgpack"), ("hypothesis", "hypothesis"),
]  # fmt: skip
#: stdlib-heavy modules, used when fewer third-party packages are installed than asked for
STDLIB_FALLBACK = [
    ("stdlib", "asyncio"), ("stdlib", "email.message"), ("stdlib", "http.client"),
    ("stdlib", "urllib.request"), ("stdlib", "xml.etree.ElementTree"), ("stdlib", "decimal"),
]  # fmt: skip


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def paper_packages(n: int) -> list[tuple[str, str]]:
    found = [(dist, mod) for dist, mod in MOST_IMPORTED if _installed(mod)]
    return (found + STDLIB_FALLBACK)[:n]


def paper(cfg: Config) -> list[Unit]:
    units = []
    for dist, module in paper_packages(cfg.n(3, 15)):

        def run(res: SuiteResult, module: str = module) -> None:
            scenario = f"import {module}"
            event = {"op": "use", "modules": [module]}
            for name, n in (
                ("subprocess-fresh", cfg.n(3, 10)),
                ("zygote-fork", cfg.n(8, 40)),
                ("sandbox-fork", cfg.n(8, 40)),
                ("sandbox-prefork", cfg.n(8, 40)),
            ):
                if cfg.only is not None and name not in cfg.only:
                    continue
                with method(res, name, module, scenario, modules=[module]) as m:
                    if m is None:
                        continue

                    def measure(m: Method = m, name: str = name, n: int = n) -> None:
                        if name != "subprocess-fresh":
                            m.call(event)
                        lat, _ = _sequential(m, event, n)
                        res.rows.append(summarize(scenario, name, module, lat))

                    _guard(res, scenario, m, measure)

        units.append(Unit(f"paper {dist} ({module})", run))
    return units



def _sustained(cfg: Config) -> list[Unit]:
    from benchmarks.sustained import sustained  # it uses the helpers above

    return sustained(cfg)


def _births(cfg: Config) -> list[Unit]:
    from benchmarks.births import births

    return births(cfg)


def _calls(cfg: Config) -> list[Unit]:
    from benchmarks.calls import calls

    return calls(cfg)


def _observability(cfg: Config) -> list[Unit]:
    from benchmarks.observability import observability

    return observability(cfg)


def _executor(cfg: Config) -> list[Unit]:
    from benchmarks.executors import executor

    return executor(cfg)


def _async(cfg: Config) -> list[Unit]:
    from benchmarks.asyncq import async_suite

    return async_suite(cfg)


def _fleet(cfg: Config) -> list[Unit]:
    from benchmarks.fleet import fleet

    return fleet(cfg)


def _soak(cfg: Config) -> list[Unit]:
    from benchmarks.soak import soak

    return soak(cfg)


SUITES: dict[str, Callable[[Config], list[Unit]]] = {
    "coldstart": coldstart,
    "latency": latency,
    "throughput": throughput,
    "timeouts": timeouts,
    "memory": memory,
    "paper": paper,
    "sustained": _sustained,
    "births": _births,
    "calls": _calls,
    "executor": _executor,
    "observability": _observability,
    "async": _async,
    "fleet": _fleet,
    "soak": _soak,
}

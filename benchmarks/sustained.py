"""The `sustained` suite: calls with no pauses between them, the regime users live in.

With single-use workers a warm pool only hides a birth while births keep up with arrivals; when
calls come back to back every call has to wait for a birth. So nothing here waits for a warm
pool: per method and level there is one untimed warm-up call, then the timed calls follow each
other at once (`ready()` / `wait_warm()` are never called).

Levels: 1 caller (calls back to back), 16 callers, 128 callers (N calls outstanding at all
times: a closed loop of N callers). Methods, each set up, measured at every level and torn down
in turn, in rounds (the rows pool every round's samples; the ratios give each round's value):

    sandbox-prefork      the embedded API at the runtime's defaults (single-use workers)
    sandbox-grpc-unary   `sandbox serve` at its defaults, `Invoke` per call
    sandbox-grpc-stream  the same, calls on one `InvokeMany` stream (1 caller: one outstanding)
    ppe-warm             a warm concurrent.futures.ProcessPoolExecutor (reuses its processes)
    mp-fork              a multiprocessing fork per call
    fork-floor           os.fork + os._exit(0) + waitpid in a loop in a small clean interpreter:
                         1 caller one loop; N callers min(N, CPUs) loops at once
    grpc-echo            a bare grpc.aio echo server (unary): the gRPC floor
    grpc-echo-stream     the same server's bidirectional stream: the InvokeMany floor

The ratios against the targets (`TARGETS`) are between rows of this same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any

from benchmarks.core import (
    SUSTAINED,
    Method,
    Ratio,
    SuiteResult,
    Unsupported,
    percentile,
    summarize,
)
from benchmarks.peers import ForkFloor
from benchmarks.suites import Config, Unit, _guard, _selected, method

LEVELS = (1, 16, 128)


def level_name(callers: int) -> str:
    return "1-caller" if callers == 1 else f"{callers}-callers"


#: (row label, method, options)
SUSTAINED_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("fork-floor", "fork-floor", {}),
    ("ppe-warm", "ppe-warm", {}),
    ("mp-fork", "mp-fork", {}),
    ("sandbox-prefork", "sandbox-prefork", {"runtime_defaults": True}),
    ("grpc-echo", "grpc-echo", {}),
    ("grpc-echo-stream", "grpc-echo-stream", {}),
    ("sandbox-grpc-unary", "sandbox-grpc-unary", {}),
    ("sandbox-grpc-stream", "sandbox-grpc-stream", {}),
]
#: one caller of these is one loop / one stream: `run_inflight(events, 1)`, not `call()`
STREAMED = {"fork-floor", "grpc-echo-stream", "sandbox-grpc-stream"}


@dataclasses.dataclass(frozen=True)
class Target:
    """ours / theirs, each (level, row label, metric); `op` and `target` None: context only."""

    label: str
    ours: tuple[str, str, str]
    theirs: tuple[str, str, str]
    op: str = ""
    target: float | None = None
    goal: float | None = None


_SEQ, _16, _128 = (level_name(k) for k in LEVELS)
TARGETS = [
    Target("sequential embedded p50 ÷ ppe-warm p50",
           (_SEQ, "sandbox-prefork", "p50_ms"), (_SEQ, "ppe-warm", "p50_ms"), "<=", 3.0),
    Target("sequential embedded p99 ÷ ppe-warm p50",
           (_SEQ, "sandbox-prefork", "p99_ms"), (_SEQ, "ppe-warm", "p50_ms"), "<=", 10.0),
    Target("16-caller embedded calls/s ÷ fork floor",
           (_16, "sandbox-prefork", "throughput_per_s"), (_16, "fork-floor", "throughput_per_s"),
           ">=", 0.25, goal=0.5),
    Target("16-caller InvokeMany calls/s ÷ fork floor",
           (_16, "sandbox-grpc-stream", "throughput_per_s"),
           (_16, "fork-floor", "throughput_per_s"), ">=", 0.2),
    Target("128-caller InvokeMany calls/s ÷ fork floor",
           (_128, "sandbox-grpc-stream", "throughput_per_s"),
           (_128, "fork-floor", "throughput_per_s"), ">=", 0.2),
    Target("sequential gRPC Invoke p50 ÷ grpc-echo p50",
           (_SEQ, "sandbox-grpc-unary", "p50_ms"), (_SEQ, "grpc-echo", "p50_ms"), "<=", 3.0),
    # context, no target
    Target("128-caller embedded calls/s ÷ fork floor",
           (_128, "sandbox-prefork", "throughput_per_s"),
           (_128, "fork-floor", "throughput_per_s")),
    Target("16-caller gRPC Invoke calls/s ÷ fork floor",
           (_16, "sandbox-grpc-unary", "throughput_per_s"),
           (_16, "fork-floor", "throughput_per_s")),
    Target("16-caller mp-fork calls/s ÷ fork floor",
           (_16, "mp-fork", "throughput_per_s"), (_16, "fork-floor", "throughput_per_s")),
    Target("sequential mp-fork p50 ÷ ppe-warm p50",
           (_SEQ, "mp-fork", "p50_ms"), (_SEQ, "ppe-warm", "p50_ms")),
]  # fmt: skip


@dataclasses.dataclass
class Sample:
    latencies: list[int]
    wall_ns: int
    on_demand: int

    def metric(self, name: str) -> float:
        if name == "throughput_per_s":
            return len(self.latencies) / (self.wall_ns / 1e9) if self.wall_ns else 0.0
        q = {"p50_ms": 50, "p99_ms": 99}[name]
        return percentile(sorted(self.latencies), q) / 1e6


def run_level(m: Method, label: str, event: dict[str, Any], callers: int, total: int) -> Sample:
    """One untimed warm-up call, then `total` timed calls by `callers` callers, no pauses."""
    with contextlib.suppress(Unsupported):
        m.call(event)
    m.take_on_demand()
    m.wall_ns = None
    if callers == 1 and label not in STREAMED:
        lat = []
        t_start = time.perf_counter_ns()
        for _ in range(total):
            t0 = time.perf_counter_ns()
            m.call(event)
            lat.append(time.perf_counter_ns() - t0)
        wall = time.perf_counter_ns() - t_start
    else:
        t_start = time.perf_counter_ns()
        lat = m.run_inflight([event] * total, callers)
        wall = m.wall_ns or (time.perf_counter_ns() - t_start)
    return Sample(lat, wall, m.take_on_demand())


#: timed calls per level and round: (quick, full)
TOTALS = {1: (20, 300), 16: (48, 640), 128: (256, 1280)}


def ratios(samples: dict[tuple[str, str], list[Sample]], rows: dict[tuple[str, str], Any]
           ) -> list[Ratio]:  # fmt: skip
    out = []
    for t in TARGETS:
        ours, theirs = rows.get(t.ours[:2]), rows.get(t.theirs[:2])
        if ours is None or theirs is None:
            continue
        a, b = getattr(ours, t.ours[2]), getattr(theirs, t.theirs[2])
        if not a or not b:
            continue
        rounds_a, rounds_b = samples[t.ours[:2]], samples[t.theirs[:2]]
        per_round = [
            round(x.metric(t.ours[2]) / y.metric(t.theirs[2]), 4)
            for x, y in zip(rounds_a, rounds_b, strict=False)
            if y.metric(t.theirs[2])
        ]
        unit = "/s" if t.ours[2] == "throughput_per_s" else "ms"
        what = {"p50_ms": "p50", "p99_ms": "p99", "throughput_per_s": "calls/s"}
        out.append(Ratio(
            label=t.label,
            ours=f"{t.ours[1]} {what[t.ours[2]]}, {t.ours[0]}",
            theirs=f"{t.theirs[1]} {what[t.theirs[2]]}, {t.theirs[0]}",
            ours_value=float(a), theirs_value=float(b), unit=unit,
            value=round(float(a) / float(b), 4), op=t.op, target=t.target, goal=t.goal,
            per_round=per_round,
        ))  # fmt: skip
    return out


def sustained(cfg: Config) -> list[Unit]:
    rounds = cfg.n(1, 3)
    chosen = [(label, name, opts) for label, name, opts in SUSTAINED_METHODS
              if name in _selected(cfg, [name])]  # fmt: skip
    samples: dict[tuple[str, str], list[Sample]] = {}
    failed: set[str] = set()
    event = {"op": "echo", "payload": "x" * 32}
    units = []
    for r in range(rounds):
        for label, name, options in chosen:

            def run(
                res: SuiteResult, label: str = label, name: str = name, options: Any = options
            ) -> None:
                if label in failed:
                    return
                before = len(res.unavailable)
                with method(res, name, "none", "*", **options) as m:
                    if m is None:
                        failed.add(label)
                        return
                    for callers in LEVELS:
                        scenario = level_name(callers)

                        def measure(callers: int = callers, scenario: str = scenario) -> None:
                            s = run_level(m, label, event, callers, cfg.n(*TOTALS[callers]))
                            samples.setdefault((scenario, label), []).append(s)

                        _guard(res, scenario, m, measure)
                if len(res.unavailable) > before:
                    failed.add(label)

            units.append(Unit(f"sustained {label} (round {r + 1}/{rounds})", run))

    def finish(res: SuiteResult) -> None:
        rows = {}
        for callers in LEVELS:
            scenario = level_name(callers)
            for label, _, _ in chosen:
                per_round = samples.get((scenario, label))
                if not per_round or label in failed:
                    continue
                pooled = [x for s in per_round for x in s.latencies]
                wall = sum(s.wall_ns for s in per_round)
                row = summarize(scenario, label, "none", pooled, wall_ns=wall, regime=SUSTAINED)
                rows[(scenario, label)] = row
                res.rows.append(row)
                on_demand = sum(s.on_demand for s in per_round)
                if on_demand:
                    res.notes.append(
                        f"{label} {scenario}: {on_demand} of {len(pooled)} calls were served by "
                        "a worker forked on demand (no warm worker was idle)"
                    )
                if label == "fork-floor":
                    loops = ForkFloor("none").loops(callers)
                    res.notes.append(
                        f"fork-floor {scenario}: {loops} fork-and-reap loop"
                        f"{'s' if loops > 1 else ''} at once"
                    )
        res.ratios.extend(ratios(samples, rows))
        for ratio in res.ratios:
            if len(ratio.per_round) > 1:
                res.notes.append(
                    f"{ratio.label}: per round " + ", ".join(f"{x:.3g}×" for x in ratio.per_round)
                    + f" (median {statistics.median(ratio.per_round):.3g}×)"
                )

    units.append(Unit("sustained (summary)", finish))
    return units

"""Write a suite's results: DIR/<suite>.json, DIR/<suite>.md (a table), DIR/<suite>.png.

JSON::

    {"suite": str, "machine": {...}, "results": [{"regime": "light load, warm pool" |
     "sustained", "scenario", "method", "preload", "n", "p50_ms", "p99_ms", "mean_ms",
     "throughput_per_s": float|null, "uss_bytes": int|null,
     ("rss_bytes": int, memory suite's supervisor rows only),
     ("births_per_s": float, births suite only)}],
     "ratios": [{"label", "ours", "theirs", "ours_value", "theirs_value", "unit", "value",
                 "op", "target", "goal", "per_round", "passed", "verdict"}],
     "unavailable": [{"scenario", "method", "preload", "reason"}], "notes": [str],
     "unit_seconds": {unit label: s}, (births suite: "births": {scenario: {configuration:
     the runtime's birth stats}}), (calls suite: "calls": {scenario: {configuration: the
     runtime's call stats, "calls", "forked_on_demand", "stats_ms"}}, "regimes": {scenario:
     regime}), (soak suite: "soak": {its findings, see benchmarks/soak.py}, "checks": [{"check",
     "value", "threshold", "passed": bool|null}])}

The table's last column compares each row with the suite's baseline method in the same scenario
(and the same preload, else `none`): see `BASELINES`. Suites with targets (sustained, births)
also write a table of their ratios against the targets.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.core import LIGHT, SUSTAINED, Ratio, Row, SuiteResult


@dataclass(frozen=True)
class Baseline:
    method: str
    #: "p50_ms" | "throughput_per_s" | "uss_bytes"
    metric: str
    #: True: baseline / row (a speed-up, higher is better); False: row / baseline
    speedup: bool = False
    about: str = ""


BASELINES: dict[str, Baseline] = {
    "coldstart": Baseline(
        "ppe-warm",
        "p50_ms",
        about="Time from invoke to result for a function "
        "that uses its preloaded modules (`op=use`), one call at a time, at light load: the "
        "harness waits for a warm pool before each call.",
    ),
    "latency": Baseline(
        "ppe-warm",
        "p50_ms",
        about="A trivial call (echo) at *light load*: the harness waits, untimed, for a warm "
        "pool before every call (`light-load-warm-pool`), and also leaves an idle gap "
        "(`light-load-idle-gap-50ms`). Calls back to back without that wait are the "
        "`sustained` suite.",
    ),
    "throughput": Baseline(
        "grpc-echo",
        "throughput_per_s",
        about="Echo calls per second with N "
        "calls in flight, sustained: no pauses between calls (the harness waits for a warm pool "
        "once, before each level). Modes: `isolated` (a process per call), `reuse` (a worker "
        "serves many calls), `floor` (a bare gRPC echo server, no process at all). The "
        "`sustained` suite has the same regime with the fork-and-reap floor beside it.",
    ),
    "timeouts": Baseline(
        "pebble-warm",
        "p50_ms",
        about="A function that never returns, with a "
        "100 ms timeout: time from the deadline to the outcome, and from the outcome until the "
        "next call has been served, at light load (warm pool before each call); and "
        "`deadline-to-outcome-16-callers` (sustained): 16 callers at once, back to back, each "
        "calling a function that sleeps forever with a 100 ms timeout, so the pool is busy and "
        "births a worker per call.",
    ),
    "memory": Baseline(
        "ppe-warm",
        "uss_bytes",
        about="USS of an idle worker (after one full gc in "
        "the worker) per preload profile, with and without gc.freeze() in the parent before the "
        "fork (a warm pool at rest: light load); and the supervisor's memory with 1000 calls "
        "queued (RSS column; sustained). Time columns: time to get the idle workers / to queue "
        "the calls.",
    ),
    "paper": Baseline(
        "subprocess-fresh",
        "p50_ms",
        speedup=True,
        about="SOCK (USENIX ATC '18) / "
        "Forklift: a fresh `python -I` that imports the package, against a fork of a zygote that "
        "preloaded it (the child imports it again: free). The ratio is the speed-up.",
    ),
    "sustained": Baseline(
        "fork-floor",
        "throughput_per_s",
        about="A trivial call (echo) with *no pauses between calls*: 1 caller back to back, 16 "
        "and 128 callers (that many calls outstanding at all times). One untimed warm-up call "
        "per method and level, never a wait for a warm pool: with single-use workers every "
        "call needs a birth, as in real use. `fork-floor` is a plain `os.fork()` + child "
        "`os._exit(0)` + `waitpid` loop in a small clean interpreter (`python -I -S`): one "
        "loop for 1 caller, min(N, CPUs) loops at once for N callers; nothing can be isolated "
        "per call faster. `grpc-echo` / `grpc-echo-stream`: a bare grpc.aio echo server, unary "
        "and one bidirectional stream, the floor of `sandbox-grpc-unary` (`Invoke`) and "
        "`sandbox-grpc-stream` (`InvokeMany`). `sandbox-prefork` is the embedded API at the "
        "runtime's defaults, `sandbox serve` runs at its defaults.",
    ),
    "births": Baseline(
        "sandbox-no-layers",
        "p50_ms",
        about="Worker births, every isolation layer (the runtime's defaults; strict as root) "
        "against none (`isolation=\"off\", cgroups=False`), same run. `on-demand-sequential`: "
        "`min_idle=0, max_idle=0`, every call forks its worker, calls back to back, the two "
        "runtimes alternating call by call. `16-callers`: the runtime's defaults, 16 callers "
        "without pauses (the pool births a worker per call). calls/s counts calls, births/s the "
        "births the runtime counted during them. The phase breakdown is the runtime's own "
        "(`info()[\"pools\"][\"default\"][\"births\"]`), p50 per phase in birth order.",
    ),
    "soak": Baseline(
        "noop",
        "p50_ms",
        about="One embedded `Runtime()` at its defaults, 16 caller threads without pauses, N "
        "calls of which exactly 10 % are hostile (a fixed-seed shuffle, every hostile kind in "
        "equal share): a sleep past a 0.1 s timeout, a 1 GiB allocation under 64 MiB, "
        "`os._exit(3)`, an exception, a 10 MB result under 1 MiB, a fork bomb under 16 "
        "processes and a 1 s timeout, 50 MB printed; the rest no-ops that return their event. "
        "Every call must get exactly one result with exactly its expected outcome, every no-op "
        "its own event back, no exception may escape, and no process of the runtime may "
        "outlive `close()`. The supervisor's (this process's) RSS and open fds are sampled every "
        "100 completed calls, under load, by a thread the callers' progress wakes; the verdict "
        "is the least-squares slope after a warm-up of the first 10 % of the calls, below its "
        "threshold (one-sided: a leak grows). Its standard error assumes independent "
        "samples; RSS moves in allocator steps of about 1 MiB, so one run's slope differs from "
        "the next by more than that: the per-tenth floors say more. The rows are the "
        "calls as the callers timed them, per kind (ratio: p50 against the no-ops').",
    ),
    "observability": Baseline(
        "sandbox-grpc-plain",
        "p50_ms",
        about="What Prometheus metrics and JSON access logs cost a gRPC `Invoke` of a trivial "
        "function (echo), same run: `sandbox-grpc-plain` is `sandbox serve --log-level warning` "
        "(no metrics, no access log), `sandbox-grpc-metrics-json-logs` adds `--metrics-listen "
        "--log-format json --log-level info` (every call counted, one JSON line per call to a "
        "file). Both servers run at once and are called in turn. `light-load-warm-pool`: the "
        "harness waits, untimed, for the called server's warm pool before each call, the "
        "servers alternating call by call. `1-caller` (sustained): calls back to back in "
        "blocks of 20 per server, alternating. Target: on ÷ off ≤ 1.05 (p50). The checks: the "
        "`on` server's counters and log lines equal the calls it served.",
    ),
    "executor": Baseline(
        "ppe",
        "throughput_per_s",
        about="`sandbox.Executor` beside `concurrent.futures.ProcessPoolExecutor` (`ppe`), loky "
        "and pebble, one worker per CPU each, same run. `sustained-map-noop` (sustained: no "
        "pauses between calls): `list(pool.map(noop, range(N)))` on a warmed pool; the rows' "
        "n, p50 and p99 are the gaps between consecutive results, their mean is the per-call "
        "time (wall / N). `sandbox-executor` runs each call in a fresh worker (strict "
        "isolation as root), `sandbox-executor-reuse` lets a worker serve 100. `fault: ...` "
        "(light load, warm pool): one bad call with 2 × workers no-op calls beside it; the "
        "rows time, from the moment the bad call's outcome is known and the calls beside it "
        "have ended, until a call has succeeded on a pool back at full capacity, doing what a "
        "user must (the fault table says what). How each fault is made "
        "is in `benchmarks/executors.py`: the peers have no memory limit, so their OOM is the "
        "SIGKILL the kernel's OOM killer sends.",
    ),
    "fleet": Baseline(
        "fleet-1-replica",
        "throughput_per_s",
        about="A fleet on one machine: a temporary PostgreSQL and three `sandbox serve --store "
        "postgresql://...` replicas on loopback (n1, n2, n3; the server's defaults, every "
        "isolation layer as root), same run. *Propagation* (rows `propagation: ...`, labelled "
        "light load: one deploy at a time on an otherwise idle fleet; not a call's latency): "
        "n1 deploys a new version of a function, and a client to n2, then one to n3, asks for "
        "that version (GetFunction) in a tight loop until it is there; timed from the start "
        "of the deploy (and from n1's answer) to n2 serving it and to n2 and n3 both serving "
        "it. Target (a check): p99 deploy start → served by every other replica ≤ 1 s. "
        "`8-callers` (sustained): 8 threads invoke a trivial function (echo, `reuse=1`: a "
        "worker birth per call) back to back through one `Client` balanced round_robin over "
        "the three replicas (`fleet-3-replicas`) and through a `Client` to n1 alone "
        "(`fleet-1-replica`), in blocks alternating 3 1, 1 3, ...; the ratio column is calls/s "
        "÷ one replica's. On one machine the replicas share its CPUs: three cannot triple one. "
        "Checks: each replica served within ±20 % of an even share of the balanced calls "
        "(`stats.node`), every propagated version answers right on n2 and n3, every replica "
        "exits 0 on SIGTERM and leaves nothing behind.",
    ),
    "calls": Baseline(
        "sandbox-no-layers",
        "p50_ms",
        about="Where a trivial call's (echo) time goes, every isolation layer (the runtime's "
        "defaults; strict as root) against none (`isolation=\"off\", cgroups=False`), same "
        "run. `light-load-warm-pool`: the harness waits, untimed, for a warm pool "
        "(`wait_warm()`) before each call. `1-caller` / `16-callers` (sustained): calls back "
        "to back, or 16 callers without pauses. A fresh runtime per scenario and "
        "configuration, no call before the scenario's, so the runtime's records of recent OK "
        "calls (`info()[\"calls\"]`) are exactly the scenario's. Phases, in order: `queue` "
        "(admission), `acquire` (a ready worker: ~0 when one was idle, else the wait for a "
        "birth), `dispatch`, `to_worker`, `load`, `run` (the function), `encode`, "
        "`to_supervisor`, `classify`; worker and supervisor share one monotonic clock. Beside "
        "them the results' own stats: `run_s`, `function_s` (the handler, timed in the worker) "
        "and their difference. The rows are the calls as the harness timed them. p50s do not "
        "add up to the total's p50, least of all where a phase is bimodal: `acquire` under "
        "sustained load is ~0 for a call that found an idle worker and a birth for one that "
        "did not, so with 1 caller its p50 is small and its p90 carries the births.",
    ),
}


def scenario_key(suite: str, scenario: str) -> str:
    """Which baseline row a row compares with: throughput matches on the in-flight count, memory
    on the kind of measurement."""
    if suite == "throughput":
        return scenario.split()[-1]
    if suite == "memory":
        return re.sub(r"-gc-freeze$", "", scenario)
    return scenario


def to_json(res: SuiteResult, machine: dict[str, Any]) -> dict[str, Any]:
    return {
        "suite": res.suite,
        "machine": machine,
        "results": [r.as_json() for r in res.rows],
        "ratios": [r.as_json() for r in res.ratios],
        "unavailable": [
            {"scenario": s, "method": m, "preload": p, "reason": why}
            for s, m, p, why in res.unavailable
        ],
        "notes": res.notes,
        "unit_seconds": res.timings,
        **res.extra,
    }


def _metric(row: Row, metric: str) -> float | None:
    if metric == "uss_bytes" and row.rss_bytes is not None:
        return float(row.rss_bytes)
    value = getattr(row, metric)
    return float(value) if value is not None else None


def ratio(res: SuiteResult, row: Row) -> str:
    base = BASELINES.get(res.suite)
    if base is None:
        return ""
    key = scenario_key(res.suite, row.scenario)
    candidates = [
        r
        for r in res.rows
        if r.method == base.method and scenario_key(res.suite, r.scenario) == key
    ]
    ref = next((r for r in candidates if r.preload == row.preload), None) or next(
        (r for r in candidates if r.preload == "none"), None
    )
    if ref is None:
        return ""
    a, b = _metric(row, base.metric), _metric(ref, base.metric)
    if not a or not b:
        return ""
    value = b / a if base.speedup else a / b
    return f"{value:.3g}×"


def _fmt(value: float | None, unit: float = 1.0) -> str:
    if value is None:
        return ""
    v = value / unit
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


#: how every suite measures (stated in each table's file)
RULES = (
    "How to read it: every ratio compares rows of this same run, never numbers from different "
    "runs or machines; p50 is the median of all samples (p99 nearest-rank); the latency and "
    "sustained suites run every method in several rounds one after the other and give each "
    "round's ratio in the notes. Machines are noisy (other work, frequency scaling, a shared "
    "2-vCPU VM): trust ratios and medians, not single numbers.\n\n"
    "Every row says its **regime**. *light load, warm pool*: before each timed call the "
    "harness waits, untimed, until the pool has its warm workers (`ready()` / `wait_warm()`), "
    "so the call never waits for a birth: the idle-pool latency. *sustained*: no pauses "
    "between calls (only one untimed warm-up call before the timed run); with single-use "
    "workers each call then has to wait for a worker birth: the regime users live in. Calls "
    "served by a worker forked on demand are counted in the notes."
)

_COLUMNS = [  # (header, Row -> cell text, shown only when some row has a value)
    ("n", lambda r: str(r.n), False),
    ("p50 ms", lambda r: _fmt(r.p50_ms), False),
    ("p99 ms", lambda r: _fmt(r.p99_ms), False),
    ("mean ms", lambda r: _fmt(r.mean_ms), False),
    ("calls/s", lambda r: _fmt(r.throughput_per_s), True),
    ("births/s", lambda r: _fmt(r.births_per_s), True),
    ("USS MiB", lambda r: _fmt(r.uss_bytes, 2**20), True),
    ("RSS MiB", lambda r: _fmt(r.rss_bytes, 2**20), True),
]


def ratios_markdown(res: SuiteResult) -> str:
    """The suite's ratios against its targets, as a markdown table ('' when it has none)."""
    if not res.ratios:
        return ""
    lines = [
        "| ratio | ours | baseline | value | per round | target |",
        "|---|--:|--:|--:|---|---|",
    ]
    for r in res.ratios:
        unit = " /s" if r.unit == "/s" else " ms"
        per_round = ", ".join(f"{x:.3g}×" for x in r.per_round) if len(r.per_round) > 1 else ""
        lines.append(
            f"| {r.label} | {r.ours}: {_fmt(r.ours_value)}{unit} "
            f"| {r.theirs}: {_fmt(r.theirs_value)}{unit} | **{r.value:.3g}×** | {per_round} "
            f"| {r.verdict()} |"
        )
    return "\n".join(lines) + "\n"


def _phase_cells(
    label: str, stats: list[dict[str, float] | None], faults: list[int | None] | None = None
) -> str:
    """One line of a phase table: p50 (p90, p99) per configuration, the ratio of the first two
    p50s when there are exactly two, and the median minor page faults per configuration when
    the runtime reports them."""
    text = " | ".join(
        f"{v['p50']:.3g} ({v['p90']:.3g}, {v['p99']:.3g})" if v else "—" for v in stats
    )
    if len(stats) == 2:
        a, b = (v["p50"] if v else None for v in stats)
        text += f" | {a / b:.3g}×" if a and b else " | —"
    if faults is not None:
        text += " | " + " | ".join("—" if f is None else f"{f:,}" for f in faults)
    return f"| {label} | {text} |"


def births_markdown(res: SuiteResult) -> str:
    """The births suite's phase tables: per scenario, p50 (p90, p99) per phase, per config;
    page faults per phase when the runtime reports them (`phase_faults`)."""
    data = res.extra.get("births")
    if not data:
        return ""
    out = []
    for scenario, by_config in data.items():
        if not by_config:
            continue
        configs = list(by_config)
        with_faults = any("phase_faults" in d for d in by_config.values())
        head = "| phase | " + " | ".join(f"{c}: p50 (p90, p99) ms" for c in configs)
        if len(configs) == 2:
            head += f" | {configs[0]} ÷ {configs[1]}, p50"
        if with_faults:
            head += " | " + " | ".join(f"{c}: minor faults (median)" for c in configs)
        n_cols = len(configs) + (len(configs) == 2) + (len(configs) if with_faults else 0)
        lines = [head + " |", "|---|" + "--:|" * n_cols]
        lines.append(_phase_cells(
            "**total** (request → ready)", [by_config[c].get("total_ms") or None for c in configs],
            [None] * len(configs) if with_faults else None,
        ))  # fmt: skip
        for phase in phase_order(by_config):
            lines.append(_phase_cells(
                phase, [by_config[c].get("phases_ms", {}).get(phase) for c in configs],
                [by_config[c].get("phase_faults", {}).get(phase) for c in configs]
                if with_faults else None,
            ))  # fmt: skip
        counts = ", ".join(
            f"{c}: {d.get('births', 0)} births, {d.get('sampled', 0)} sampled"
            for c, d in by_config.items()
        )
        out.append(
            f"### Birth phases, `{scenario}`\n\n" + "\n".join(lines) + f"\n\n{counts}.\n"
        )
    return "\n".join(out)


def calls_markdown(res: SuiteResult) -> str:
    """The calls suite's phase tables: per scenario (with its regime), p50 (p90, p99) per call
    phase in the runtime's order, per configuration, and the results' stats beside them."""
    from benchmarks.calls import STATS

    data = res.extra.get("calls")
    if not data:
        return ""
    regimes = res.extra.get("regimes", {})
    out = []
    for scenario, by_config in data.items():
        if not by_config:
            continue
        configs = list(by_config)
        head = "| phase | " + " | ".join(f"{c}: p50 (p90, p99) ms" for c in configs)
        if len(configs) == 2:
            head += f" | {configs[0]} ÷ {configs[1]}, p50"
        lines = [head + " |", "|---|" + "--:|" * (len(configs) + (len(configs) == 2))]
        lines.append(_phase_cells(
            "**total** (sum of the phases)", [by_config[c].get("total_ms") or None for c in configs]
        ))  # fmt: skip
        for phase in phase_order(by_config):
            lines.append(_phase_cells(
                phase, [by_config[c].get("phases_ms", {}).get(phase) for c in configs]
            ))  # fmt: skip
        for key, label in STATS:
            lines.append(_phase_cells(
                f"*{label}*", [by_config[c].get("stats_ms", {}).get(key) or None for c in configs]
            ))  # fmt: skip
        counts = ", ".join(
            f"{c}: {d.get('calls', 0)} calls, {d.get('sampled', 0)} sampled, "
            f"{d.get('forked_on_demand', 0)} forked on demand"
            for c, d in by_config.items()
        )
        regime = regimes.get(scenario, "")
        out.append(
            f"### Call phases, `{scenario}` ({regime})\n\n" + "\n".join(lines)
            + f"\n\n{counts}.\n"
        )
    return "\n".join(out)


def soak_markdown(res: SuiteResult) -> str:
    """The soak's verdicts (checks with thresholds) and its outcome counts per kind of call."""
    f = res.extra.get("soak")
    if not f:
        return ""
    verdict = {True: "pass", False: "**FAIL**", None: "not judged (quick run: too few samples)"}
    lines = [
        f"{f['total']:,} calls ({f['hostile']:,} hostile), {f['callers']} callers, seed "
        f"{f['seed']}: {f['wall_s']:.1f} s, **{f['calls_per_s']:,.1f} calls/s**. Samples every "
        f"{f['every']:,} completed calls; warm-up (not in the slopes): the first "
        f"{f['warmup_calls']:,}.\n",
        "| check | value | threshold | verdict |", "|---|--:|---|---|",
    ]
    for c in f["checks"]:
        lines.append(f"| {c['check']} | {c['value']} | {c['threshold']} | "
                     f"{verdict[c['passed']]} |")  # fmt: skip
    lines += ["", "### Outcomes per kind of call", "",
              "| call | what it does | limits | calls | expected | outcomes | right |",
              "|---|---|---|--:|---|---|--:|"]  # fmt: skip
    for kind, k in f["kinds"].items():
        limits = ", ".join(
            f"{n}={v / 2**20:g} MiB" if n.endswith("_bytes") else f"{n}={v:g}"
            for n, v in k["limits"].items()
        ) or "defaults"  # fmt: skip
        outs = ", ".join(f"{o} {n:,}" for o, n in k["outcomes"].items()) or "—"
        lines.append(f"| {kind} | {k['does']} | {limits} | {k['calls']:,} | {k['expected']} | "
                     f"{outs} | {k['right']:,} |")  # fmt: skip
    if f.get("tenths"):
        lines += ["", "### Per tenth of the run (a reading aid, not judged)", "",
                  "A leak raises the floor (the minimum) tenth after tenth; what the calls in "
                  "flight hold moves the median and the maximum.", "",
                  "| calls | samples | RSS MiB: min / median | fds: min / median "
                  "| Python blocks: min / median |", "|---|--:|--:|--:|--:|"]  # fmt: skip
        for t in f["tenths"]:
            r, d, b = t.get("rss_bytes"), t.get("fds"), t.get("py_blocks")
            lines.append(
                f"| {t['calls'][0]:,} – {t['calls'][1]:,} | {t['samples']} | "
                + (f"{r['min'] / 2**20:.2f} / {r['median'] / 2**20:.2f}" if r else "—") + " | "
                + (f"{d['min']} / {d['median']:g}" if d else "—") + " | "
                + (f"{b['min']:,} / {b['median']:,.0f}" if b else "—") + " |"
            )
        blocks = f["slopes"].get("py_blocks_per_1k_calls", {})
        if blocks.get("value") is not None:
            lines += ["", f"Python's allocated blocks after warm-up: slope {blocks['value']:.3g} "
                      f"± {blocks['stderr']:.2g} per 1k calls (not judged)."]  # fmt: skip
    load = f.get("loadavg")
    if load:
        lines += ["", f"Machine load average (1, 5, 15 min) at the start: "
                  f"{', '.join(f'{x:g}' for x in load['start'])}; at the end: "
                  f"{', '.join(f'{x:g}' for x in load['end'])} (2 CPUs; other work on the "
                  "machine slows the calls, not the checks)."]  # fmt: skip
    after = [x for x in f["samples"] if x["calls"] >= max(1, f["warmup_calls"])]
    if after:
        rss = [x["rss_bytes"] / 2**20 for x in after]
        fds = [x["fds"] for x in after]
        lines += ["", f"After warm-up ({len(after)} samples): supervisor RSS {min(rss):.1f} to "
                  f"{max(rss):.1f} MiB (first {rss[0]:.1f}, last {rss[-1]:.1f}), open fds "
                  f"{min(fds)} to {max(fds)} (first {fds[0]}, last {fds[-1]}); a sample is "
                  "read while calls are in flight, which hold fds and memory of their own."]
    return "## Verdict\n\n" + "\n".join(lines) + "\n"


def faults_markdown(res: SuiteResult) -> str:
    """The executor suite's fault table: per fault and pool, what the bad call raised, what
    happened to the calls beside it and to the pool, and what it took to get a pool back."""
    data = res.extra.get("faults")
    if not data:
        return ""
    lines = ["## What a bad call costs\n"]
    for fault, by_method in data.items():
        lines += [
            f"\n### {fault}\n",
            "| pool | the bad call raised | calls beside it failed | next call, same pool | "
            "left behind | what a user must do | until a call succeeds at full capacity, ms "
            "| deadline to outcome, ms |",
            "|---|---|--:|---|---|---|--:|--:|",
        ]
        for method, d in by_method.items():
            recover = d.get("recover_ms") or []
            lag = d.get("deadline_to_outcome_ms") or []
            lines.append(
                f"| {method} | {', '.join(d['error'])} | "
                f"{', '.join(str(x) for x in d['others_failed'])} of {d['others']} | "
                f"{', '.join(d['next_call'])} | {', '.join(d['left'])} | "
                f"{', '.join(d['action'])} | "
                f"{_fmt(statistics.median(recover)) if recover else ''} | "
                f"{_fmt(statistics.median(lag)) if lag else ''} |")
    return "\n".join(lines) + "\n"


def phase_order(by_config: dict[str, Any]) -> list[str]:
    from benchmarks.births import merge_order

    return merge_order([list(d.get("phases_ms", {})) for d in by_config.values()])


def to_markdown(res: SuiteResult, machine: dict[str, Any]) -> str:
    base = BASELINES.get(res.suite)
    head = f"# `{res.suite}`\n\n"
    if base is not None:
        head += base.about + "\n\n"
    head += RULES + "\n\n"
    head += (
        f"Machine: {machine.get('cpu_count')} CPUs ({machine.get('cpu_model') or 'unknown'}), "
        f"Python {machine.get('python')}, Linux {machine.get('kernel')}, "
        f"{machine.get('time_utc')}."
    )
    if machine.get("loadavg"):
        head += " Load average at the start: " + ", ".join(f"{x:g}" for x in machine["loadavg"])
        head += " (1, 5, 15 min)."
    git = machine.get("git")
    if git:
        head += f" Checkout {git['commit'][:10]}" + (
            " with uncommitted changes in `sandbox/`." if git.get("sandbox_changed") else "."
        )
    head += "\n\n"
    if base is not None:
        what = {"p50_ms": "p50", "throughput_per_s": "calls/s", "uss_bytes": "memory"}[base.metric]
        ratio_head = f"{base.method} / row ({what})" if base.speedup else f"{what} / {base.method}"
    else:
        ratio_head = "ratio"
    columns = [
        (name, cell) for name, cell, optional in _COLUMNS
        if not optional or any(cell(r) for r in res.rows)
    ]  # fmt: skip
    lines = [
        "| regime | scenario | method | preload | "
        + " | ".join(name for name, _ in columns) + f" | {ratio_head} |",
        "|---|---|---|---|" + "--:|" * (len(columns) + 1),
    ]
    for r in res.rows:
        lines.append(
            f"| {r.regime} | {r.scenario} | {r.method} | {r.preload} | "
            + " | ".join(cell(r) for _, cell in columns) + f" | {ratio(res, r)} |"
        )
    text = head
    if res.ratios:
        text += "## Ratios against the targets\n\n" + ratios_markdown(res) + "\n## Rows\n\n"
    elif res.extra.get("soak"):
        text += soak_markdown(res) + "\n## Rows\n\n"
    text += "\n".join(lines) + "\n"
    phases = births_markdown(res) or calls_markdown(res) or faults_markdown(res)
    if phases:
        text += "\n" + phases
    if res.notes:
        text += "\n## Notes\n\n" + "".join(
            "- " + note.strip().replace("\n", "\n  ") + "\n" for note in res.notes
        )
    if res.unavailable:
        text += "\n## Unavailable\n\n" + "".join(
            f"- `{m}` [{p}] {s}: unavailable: {why}\n" for s, m, p, why in res.unavailable
        )
    return text


def _sustained_png(plt: Any, rows: list[Row]) -> tuple[Any, Any]:
    """One panel per level: calls/s per method (bars, log scale), p50 and p99 in the labels."""
    levels = list(dict.fromkeys(r.scenario for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 0.45 * len(methods) + 1.6),
                             sharex=True, sharey=True, squeeze=False)  # fmt: skip
    top = max((r.throughput_per_s or 0.0) for r in rows) or 1.0
    low = min((r.throughput_per_s or top) for r in rows)
    for ax, level in zip(axes[0], levels, strict=True):
        by_method = {r.method: r for r in rows if r.scenario == level}
        values = [(by_method[m].throughput_per_s or 0.0) if m in by_method else 0.0
                  for m in methods]  # fmt: skip
        colors = [
            "tab:gray" if m == "fork-floor" else "tab:orange" if m.startswith("sandbox")
            else "tab:blue" for m in methods
        ]  # fmt: skip
        ax.barh(range(len(methods)), [max(v, 1e-3) for v in values], color=colors)
        for i, m in enumerate(methods):
            r = by_method.get(m)
            if r is not None:
                ax.text(max(values[i], 1e-3), i, f" p50 {r.p50_ms:.3g} / p99 {r.p99_ms:.3g} ms",
                        va="center", fontsize=6)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(low / 2, top * 12)  # room for the labels
        ax.set_xlabel("calls / s (log)")
        ax.set_title(f"sustained, {level}", fontsize=9)
    axes[0][0].set_yticks(range(len(methods)))
    axes[0][0].set_yticklabels(methods, fontsize=8)
    axes[0][0].invert_yaxis()
    return fig, None


def _births_png(plt: Any, data: dict[str, dict[str, Any]]) -> tuple[Any, Any]:
    """A stacked bar per (scenario, configuration): the p50 of each birth phase, in order, and
    a marker at the p50 of the whole birth (p50s do not add up exactly)."""
    bars = [(s, c, d) for s, by_config in data.items() for c, d in by_config.items()]
    phases = phase_order({f"{s}/{c}": d for s, c, d in bars})
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(bars) + 4), 5))
    cmap = plt.get_cmap("tab20")
    bottoms = [0.0] * len(bars)
    for k, phase in enumerate(phases):
        heights = [d.get("phases_ms", {}).get(phase, {}).get("p50", 0.0) for _, _, d in bars]
        ax.bar(range(len(bars)), heights, bottom=bottoms, color=cmap(k % 20), label=phase,
               width=0.6)  # fmt: skip
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    totals = [d.get("total_ms", {}).get("p50") for _, _, d in bars]
    xs = [i for i, t in enumerate(totals) if t]
    ax.scatter(xs, [totals[i] for i in xs], marker="_", s=600, color="black", zorder=3,
               label="total p50")  # fmt: skip
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([f"{c}\n{s}" for s, c, _ in bars], fontsize=8)
    ax.set_ylabel("birth, ms (p50 per phase, stacked)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig, ax


def _calls_png(plt: Any, data: dict[str, dict[str, Any]], regimes: dict[str, str]
               ) -> tuple[Any, Any]:  # fmt: skip
    """One panel per scenario (each its own scale: a sustained call waits far longer), a
    stacked bar per configuration: the p50 of each call phase in order, and a marker at the
    p50 of the whole call (p50s do not add up exactly)."""
    scenarios = [s for s, by_config in data.items() if by_config]
    phases = phase_order({f"{s}/{c}": d for s in scenarios for c, d in data[s].items()})
    fig, axes = plt.subplots(1, len(scenarios), figsize=(3.2 * len(scenarios) + 2.4, 4.8),
                             squeeze=False)  # fmt: skip
    cmap = plt.get_cmap("tab10")
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        configs = list(data[scenario])
        bottoms = [0.0] * len(configs)
        for k, phase in enumerate(phases):
            heights = [data[scenario][c].get("phases_ms", {}).get(phase, {}).get("p50", 0.0)
                       for c in configs]  # fmt: skip
            ax.bar(range(len(configs)), heights, bottom=bottoms, color=cmap(k % 10),
                   label=phase, width=0.6)  # fmt: skip
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        totals = [data[scenario][c].get("total_ms", {}).get("p50") for c in configs]
        xs = [i for i, t in enumerate(totals) if t]
        ax.scatter(xs, [totals[i] for i in xs], marker="_", s=500, color="black", zorder=3,
                   label="total p50")  # fmt: skip
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, fontsize=8)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_title(f"{scenario}\n({regimes.get(scenario, '')})", fontsize=9)
    axes[0][0].set_ylabel("call, ms (p50 per phase, stacked)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    return fig, None


def _soak_png(plt: Any, f: dict[str, Any]) -> tuple[Any, Any]:
    """Supervisor RSS and open fds against calls completed, the warm-up shaded, the
    least-squares line after it."""
    xs = [x["calls"] for x in f["samples"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, scale, unit, slope_key in (
        (axes[0], "rss_bytes", 2**20, "supervisor RSS, MiB", "rss_kib_per_1k_calls"),
        (axes[1], "fds", 1, "supervisor open fds", "fds_per_1k_calls"),
    ):
        ax.plot(xs, [x[key] / scale for x in f["samples"]], marker=".", linewidth=1)
        ax.axvspan(0, f["warmup_calls"], color="0.9", label="warm-up (not fitted)")
        s = f["slopes"][slope_key]
        if s.get("value") is not None:
            fit = [x for x in xs if x >= max(1, f["warmup_calls"])]
            per = 1024 if key == "rss_bytes" else 1  # the RSS slope is in KiB
            ax.plot(fit, [(s["intercept"] + s["value"] * x / 1000) * per / scale for x in fit],
                    color="tab:red", linewidth=1.5,
                    label=f"slope {s['value']:.3g} ± {s['stderr']:.2g} "
                          f"{'KiB' if key == 'rss_bytes' else 'fds'} / 1k calls")  # fmt: skip
        ax.set_xlabel("calls completed")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="lower right")
    return fig, None


def to_png(res: SuiteResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.rows
    if res.suite == "births" and res.extra.get("births"):
        fig, ax = _births_png(plt, res.extra["births"])
    elif res.suite == "soak" and res.extra.get("soak"):
        fig, ax = _soak_png(plt, res.extra["soak"])
    elif res.suite == "calls" and res.extra.get("calls"):
        fig, ax = _calls_png(plt, res.extra["calls"], res.extra.get("regimes", {}))
    elif res.suite == "sustained" and rows:
        fig, ax = _sustained_png(plt, rows)
    elif res.suite == "throughput" and rows:
        fig, ax = plt.subplots(figsize=(8, 5))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            mode, inflight = r.scenario.split()
            series.setdefault(f"{r.method} ({mode})", []).append(
                (int(inflight.split("=")[1]), r.throughput_per_s or 0.0)
            )
        colors = plt.get_cmap("tab20").colors
        for i, (label, pts) in enumerate(series.items()):
            pts.sort()
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=label,
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                linestyle="-" if label.startswith("sandbox") else "--",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("calls in flight")
        ax.set_ylabel("calls / s")
        ax.legend(fontsize=7)
    elif res.suite == "paper" and rows:
        scenarios = list(dict.fromkeys(r.scenario for r in rows))
        methods = list(dict.fromkeys(r.method for r in rows))
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(scenarios)), 5))
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            xs, ys = [], []
            for j, s in enumerate(scenarios):
                hit = next((r for r in rows if r.method == m and r.scenario == s), None)
                if hit is not None:
                    xs.append(j + i * width)
                    ys.append(max(hit.p50_ms, 1e-3))
            ax.bar(xs, ys, width=width, label=m)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(scenarios))])
        ax.set_xticklabels(
            [s.replace("import ", "") for s in scenarios], rotation=30, ha="right", fontsize=8
        )
        ax.set_yscale("log")
        ax.set_ylabel("cold start p50, ms (log)")
        ax.legend(fontsize=8)
    elif rows:
        memory = res.suite == "memory"
        labels = [f"{r.method} [{r.preload}] {r.scenario}" for r in rows]
        if memory:
            values = [((r.rss_bytes or r.uss_bytes or 0) / 2**20) for r in rows]
            err = None
        else:
            values = [max(r.p50_ms, 1e-3) for r in rows]
            err = [[0] * len(rows), [max(0.0, r.p99_ms - r.p50_ms) for r in rows]]
        fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(rows) + 1)))
        colors = ["tab:orange" if r.method.startswith("sandbox") else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), values, xerr=err, color=colors, ecolor="gray", capsize=2)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        if not memory:  # memory spans one decade: linear reads better
            ax.set_xscale("log")
        ax.set_xlabel(
            "MiB (USS; RSS for the supervisor rows)"
            if memory
            else "p50 ms (bar) to p99 (whisker), log"
        )
    else:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(
            0.5, 0.5, "no results (see the .md for unavailable methods)", ha="center", va="center"
        )
        ax.axis("off")
    if ax is None:
        fig.suptitle(f"sandbox bench: {res.suite}")
    else:
        ax.set_title(f"sandbox bench: {res.suite}")
    # the calls figure keeps its right edge for the legend of every panel
    fig.tight_layout(rect=(0, 0, 0.86, 1) if res.suite == "calls" else None)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(res: SuiteResult, machine: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{res.suite}.json", out / f"{res.suite}.md", out / f"{res.suite}.png"]
    paths[0].write_text(json.dumps(to_json(res, machine), indent=2) + "\n")
    paths[1].write_text(to_markdown(res, machine))
    to_png(res, paths[2])
    return paths


# --- re-rendering a run's files (no measuring) ---------------------------------------------------

#: scenario names of earlier runs -> their names now (the same measurement, renamed to say that
#: the harness waited for a warm pool before each call)
LEGACY_SCENARIOS = {
    ("latency", "back-to-back"): "light-load-warm-pool",
    ("latency", "idle-gap-50ms"): "light-load-idle-gap-50ms",
}


def _legacy_regime(suite: str, scenario: str) -> str:
    """The regime of a row written before rows carried one: what its suite did then."""
    if suite == "throughput" or scenario.startswith("supervisor-"):
        return SUSTAINED  # N in flight without pauses; calls queued
    return LIGHT  # a wait for a warm pool (`ready()`) before each timed call


def load(path: Path) -> tuple[SuiteResult, dict[str, Any]]:
    """A suite's JSON file back as (SuiteResult, machine); rows of earlier runs get their
    current scenario names and a regime (noted in the result's notes)."""
    data = json.loads(path.read_text())
    suite = data["suite"]
    res = SuiteResult(suite)
    renamed: set[tuple[str, str]] = set()
    fields = {f.name for f in dataclasses.fields(Row)}
    for item in data.get("results", []):
        row = Row(**{k: v for k, v in item.items() if k in fields})
        new = LEGACY_SCENARIOS.get((suite, row.scenario))
        if new is not None:
            renamed.add((row.scenario, new))
            row.scenario = new
        if "regime" not in item:
            row.regime = _legacy_regime(suite, row.scenario)
        res.rows.append(row)
    ratio_fields = {f.name for f in dataclasses.fields(Ratio)}
    res.ratios = [Ratio(**{k: v for k, v in r.items() if k in ratio_fields})
                  for r in data.get("ratios", [])]  # fmt: skip
    res.unavailable = [(u["scenario"], u["method"], u["preload"], u["reason"])
                       for u in data.get("unavailable", [])]  # fmt: skip
    res.notes = list(data.get("notes", []))
    for old, new in sorted(renamed):
        res.notes = [n.replace(f" {old}", f" {new}") for n in res.notes]
    res.timings = dict(data.get("unit_seconds", {}))
    known = {"suite", "machine", "results", "ratios", "unavailable", "notes", "unit_seconds"}
    res.extra = {k: v for k, v in data.items() if k not in known}
    if renamed or any("regime" not in item for item in data.get("results", [])):
        res.notes.append(
            "Re-rendered from this run's JSON by `python -m benchmarks.report` (no new "
            "measurement): each row given its regime"
            + "".join(f"; scenario `{old}` renamed `{new}`" for old, new in sorted(renamed))
            + "."
        )
    return res, dict(data.get("machine", {}))


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.report DIR [SUITE ...]`: rewrite DIR/<suite>.{json,md,png} from
    the JSON files already there (every suite found when none is named), in the current
    format; nothing is measured."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "bench-results")
    names = args[1:] or sorted(p.stem for p in out.glob("*.json") if p.stem in BASELINES)
    for name in names:
        res, machine = load(out / f"{name}.json")
        for path in write(res, machine, out):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write a suite's results: DIR/<suite>.json, DIR/<suite>.md (a table), DIR/<suite>.png.

JSON::

    {"suite": str, "machine": {...}, "results": [{"scenario", "method", "preload", "n",
     "p50_ms", "p99_ms", "mean_ms", "throughput_per_s": float|null, "uss_bytes": int|null,
     ("rss_bytes": int, memory suite's supervisor rows only)}],
     "unavailable": [{"scenario", "method", "preload", "reason"}], "notes": [str]}

The table's last column compares each row with the suite's baseline method in the same scenario
(and the same preload, else `none`): see `BASELINES`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.core import Row, SuiteResult


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
        "that uses its preloaded modules (`op=use`), one call at a time.",
    ),
    "latency": Baseline(
        "ppe-warm",
        "p50_ms",
        about="A trivial call (echo) at light load: back to back, and after an idle gap.",
    ),
    "throughput": Baseline(
        "grpc-echo",
        "throughput_per_s",
        about="Echo calls per second with N "
        "calls in flight. Modes: `isolated` (a process per call), `reuse` (a worker serves many "
        "calls), `floor` (a bare gRPC echo server, no process at all).",
    ),
    "timeouts": Baseline(
        "pebble-warm",
        "p50_ms",
        about="A function that never returns, with a "
        "100 ms timeout: time from the deadline to the outcome, and from the outcome until the "
        "next call has been served.",
    ),
    "memory": Baseline(
        "ppe-warm",
        "uss_bytes",
        about="USS of an idle worker (after one full gc in "
        "the worker) per preload profile, with and without gc.freeze() in the parent before the "
        "fork; and the supervisor's memory with 1000 calls queued (RSS column). Time columns: "
        "time to get the idle workers / to queue the calls.",
    ),
    "paper": Baseline(
        "subprocess-fresh",
        "p50_ms",
        speedup=True,
        about="SOCK (USENIX ATC '18) / "
        "Forklift: a fresh `python -I` that imports the package, against a fork of a zygote that "
        "preloaded it (the child imports it again: free). The ratio is the speed-up.",
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
        "unavailable": [
            {"scenario": s, "method": m, "preload": p, "reason": why}
            for s, m, p, why in res.unavailable
        ],
        "notes": res.notes,
        "unit_seconds": res.timings,
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
    "runs or machines; p50 is the median of all samples (p99 nearest-rank), and the latency "
    "suite runs every method in several rounds one after the other and gives each round's "
    "ratio in the notes. Machines are noisy (other work, frequency scaling, a shared 2-vCPU "
    "VM): trust ratios and medians, not single numbers. Our pre-forking methods wait, untimed, "
    "until their pool has its warm workers before each timed sequential call (`wait_warm()`), "
    "so a latency never includes a fork on demand by accident; calls that still were served by "
    "a worker forked on demand are counted in the notes."
)


def to_markdown(res: SuiteResult, machine: dict[str, Any]) -> str:
    base = BASELINES.get(res.suite)
    head = f"# `{res.suite}`\n\n"
    if base is not None:
        head += base.about + "\n\n"
    head += RULES + "\n\n"
    head += (
        f"Machine: {machine.get('cpu_count')} CPUs ({machine.get('cpu_model') or 'unknown'}), "
        f"Python {machine.get('python')}, Linux {machine.get('kernel')}, "
        f"{machine.get('time_utc')}.\n\n"
    )
    if base is not None:
        what = {"p50_ms": "p50", "throughput_per_s": "calls/s", "uss_bytes": "memory"}[base.metric]
        ratio_head = f"{base.method} / row ({what})" if base.speedup else f"{what} / {base.method}"
    else:
        ratio_head = "ratio"
    lines = [
        "| scenario | method | preload | n | p50 ms | p99 ms | mean ms | calls/s | USS MiB "
        f"| RSS MiB | {ratio_head} |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in res.rows:
        lines.append(
            f"| {r.scenario} | {r.method} | {r.preload} | {r.n} | {_fmt(r.p50_ms)} "
            f"| {_fmt(r.p99_ms)} | "
            f"{_fmt(r.mean_ms)} | {_fmt(r.throughput_per_s)} | {_fmt(r.uss_bytes, 2**20)} | "
            f"{_fmt(r.rss_bytes, 2**20)} | {ratio(res, r)} |"
        )
    text = head + "\n".join(lines) + "\n"
    if res.notes:
        text += "\n## Notes\n\n" + "".join(
            "- " + note.strip().replace("\n", "\n  ") + "\n" for note in res.notes
        )
    if res.unavailable:
        text += "\n## Unavailable\n\n" + "".join(
            f"- `{m}` [{p}] {s}: unavailable: {why}\n" for s, m, p, why in res.unavailable
        )
    return text


def to_png(res: SuiteResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.rows
    if res.suite == "throughput" and rows:
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
    ax.set_title(f"sandbox bench: {res.suite}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(res: SuiteResult, machine: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{res.suite}.json", out / f"{res.suite}.md", out / f"{res.suite}.png"]
    paths[0].write_text(json.dumps(to_json(res, machine), indent=2) + "\n")
    paths[1].write_text(to_markdown(res, machine))
    to_png(res, paths[2])
    return paths

"""The headline: the targets and the sustained rows, from one run's JSON files.

    python -m benchmarks.headline DIR     prints the markdown (README, docs/benchmarks/README.md)

Two tables. The targets: each comparison with its regime, ours, theirs, the ratio and the
target with its verdict (sustained first: the regime users live in; then births, the soak's
verdicts, timeouts, and the light-load rows, where the pool was warm when the call came). The
sustained rows: p50, p99 and calls/s per method at 1, 16 and 128 callers. Every ratio is between
rows of the same run (see the rule in `report.RULES`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WARM = "light-load-warm-pool"
#: the sustained methods shown in the headline's rows table, in order
SUSTAINED_ROWS = [
    "sandbox-prefork", "ppe-warm", "mp-fork", "fork-floor",
    "sandbox-grpc-unary", "sandbox-grpc-stream", "grpc-echo", "grpc-echo-stream",
]  # fmt: skip


def _load(out: Path, suite: str) -> dict[str, Any]:
    path = out / f"{suite}.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _rows(out: Path, suite: str) -> list[dict[str, Any]]:
    return list(_load(out, suite).get("results", []))


def _get(rows: list[dict[str, Any]], scenario: str, method: str, preload: str = "none"
         ) -> dict[str, Any] | None:  # fmt: skip
    return next(
        (r for r in rows
         if r["scenario"] == scenario and r["method"] == method and r["preload"] == preload),
        None,
    )  # fmt: skip


def _value(x: float, unit: str) -> str:
    return f"{x:,.0f} /s" if unit == "/s" else f"{x:.3g} ms"


def headlines(out: Path) -> list[tuple[str, str, str, str, str]]:
    """(comparison, ours, theirs, ratio, target and verdict) rows."""
    lines: list[tuple[str, str, str, str, str]] = []

    # The suites that carry their own ratios and targets: sustained, births.
    for suite, regime in (("sustained", "sustained"), ("births", "birth")):
        for r in _load(out, suite).get("ratios", []):
            if r.get("target") is None:
                continue
            lines.append((
                f"{regime}: {r['label']}",
                _value(r["ours_value"], r["unit"]), _value(r["theirs_value"], r["unit"]),
                f"{r['value']:.3g}×", r["verdict"],
            ))  # fmt: skip

    # The soak: behaviour (nothing lost, every outcome right) and flatness (slopes).
    soak = _load(out, "soak").get("soak")
    if soak:
        judged = {True: "pass", False: "FAIL", None: "not judged (quick run)"}
        where = (f"soak ({soak['total']:,} calls, {soak['callers']} callers, "
                 f"{soak['hostile_fraction']:.0%} hostile)")  # fmt: skip
        for c in soak.get("checks", []):
            if c["check"].startswith(("processes", "exceptions", "no-op")):
                continue  # on the soak's page
            lines.append((f"{where}: {c['check']}", c["value"], "—", "—",
                          f"{c['threshold']}: {judged[c['passed']]}"))  # fmt: skip

    def ratio(
        label: str, ours: dict[str, Any] | None, theirs: dict[str, Any] | None,
        metric: str, target: float, speedup: bool = False, unit: str = "ms",
    ) -> None:  # fmt: skip
        if ours is None or theirs is None:
            lines.append((label, "n/a", "n/a", "n/a", "not measured"))
            return
        a, b = float(ours[metric]), float(theirs[metric])
        value = b / a if speedup else a / b
        ok = value >= target if speedup else value <= target
        how = f"≥ {target:g}×" if speedup else f"≤ {target:g}×"
        verdict = (
            f"{how}: met" if ok
            else f"{how}: missed by {value / target if not speedup else target / value:.2f}×"
        )  # fmt: skip
        lines.append((label, f"{a:.3g} {unit}", f"{b:.3g} {unit}", f"{value:.3g}×", verdict))

    to = _rows(out, "timeouts")
    for scenario, regime, q in (
        ("deadline-to-outcome-16-callers", "sustained, 16 callers", "p99"),
        ("deadline-to-outcome", "light load, warm pool", "p50"),
    ):
        for method in ("sandbox-prefork", "sandbox-reuse", "sandbox-fork"):
            ours = _get(to, scenario, method)
            if ours is None:
                continue
            theirs = _get(to, scenario, "pebble-warm" if q == "p50" else "mp-fork")
            name = theirs["method"] if theirs else ("pebble-warm" if q == "p50" else "mp-fork")
            value = float(ours[f"{q}_ms"])
            if q == "p50":
                verdict = "< 10 ms: met" if value < 10 else f"< 10 ms: missed by {value / 10:.2f}×"
            else:
                verdict = "(no target)"
            lines.append((
                f"{regime}: deadline → outcome {q} (100 ms timeout), {method} vs {name}",
                f"{value:.3g} ms", f"{theirs[f'{q}_ms']:.3g} ms" if theirs else "n/a",
                f"{value / float(theirs[f'{q}_ms']):.3g}×" if theirs else "n/a", verdict,
            ))  # fmt: skip

    lat = _rows(out, "latency")
    for scenario in (WARM, "light-load-idle-gap-50ms"):
        ratio(
            f"light load, warm pool: isolated call p50 ({scenario}), sandbox-prefork / ppe-warm",
            _get(lat, scenario, "sandbox-prefork"), _get(lat, scenario, "ppe-warm"),
            "p50_ms", 1.0,
        )  # fmt: skip
    for label in ("sandbox-grpc-unary", "sandbox-grpc-unary-reuse"):
        ratio(
            f"light load, warm pool: gRPC call p50, {label} / grpc-echo",
            _get(lat, WARM, label), _get(lat, WARM, "grpc-echo"),
            "p50_ms", 1.3,
        )  # fmt: skip
    cold = _rows(out, "coldstart")
    ratio(
        "light load, warm pool: cold start p50, heavy preload, subprocess-fresh / sandbox-prefork "
        "(speed-up)",
        _get(cold, "use-preloaded", "sandbox-prefork", "heavy"),
        _get(cold, "use-preloaded", "subprocess-fresh", "heavy"),
        "p50_ms", 100.0, speedup=True,
    )  # fmt: skip
    thr = _rows(out, "throughput")
    for mode in ("isolated", "reuse"):
        for k in (1, 128):
            ours = _get(thr, f"{mode} inflight={k}", "sandbox-grpc-unary")
            theirs = _get(thr, f"floor inflight={k}", "grpc-echo")
            if ours is not None and theirs is not None:
                a, b = float(ours["throughput_per_s"]), float(theirs["throughput_per_s"])
                slower = b / a
                verdict = (
                    "≤ 1.3×: met" if slower <= 1.3 else f"≤ 1.3×: missed by {slower / 1.3:.2f}×"
                )
                lines.append((
                    f"sustained: gRPC throughput, {mode}, {k} in flight, grpc-echo / "
                    "sandbox-grpc-unary (times slower)",
                    f"{a:,.0f} /s", f"{b:,.0f} /s", f"{slower:.3g}×", verdict,
                ))  # fmt: skip
    return lines


def sustained_table(out: Path) -> str:
    """p50 / p99 ms and calls/s per method and level of the sustained suite ('' if not run)."""
    rows = _rows(out, "sustained")
    if not rows:
        return ""
    levels = list(dict.fromkeys(r["scenario"] for r in rows))
    methods = [m for m in SUSTAINED_ROWS if any(r["method"] == m for r in rows)]
    text = ("| sustained (no pauses) | "
            + " | ".join(f"{lv}: p50 / p99 ms, calls/s" for lv in levels) + " |\n"
            + "|---|" + "--:|" * len(levels) + "\n")  # fmt: skip
    for m in methods:
        cells = []
        for lv in levels:
            r = _get(rows, lv, m)
            cells.append(
                f"{r['p50_ms']:.3g} / {r['p99_ms']:.3g}, {r['throughput_per_s']:,.0f}"
                if r and r.get("throughput_per_s") else "—"
            )
        text += f"| {m} | " + " | ".join(cells) + " |\n"
    return text


def runs(out: Path) -> str:
    """When (and from which checkout) each suite in the tables was measured: suites can be
    re-run one at a time, so the tables may combine runs; each ratio is within one run."""
    parts = []
    for suite in ("sustained", "births", "calls", "soak", "timeouts", "latency", "coldstart",
                  "throughput"):
        machine = _load(out, suite).get("machine")
        if not machine:
            continue
        text = f"`{suite}` {str(machine.get('time_utc', '?'))[:10]}"
        git = machine.get("git")
        if git:
            dirty = ", uncommitted changes" if git.get("sandbox_changed") else ""
            text += f" ({git['commit'][:7]}{dirty})"
        parts.append(text)
    return "Measured: " + ", ".join(parts) + "." if parts else ""


def to_markdown(out: Path) -> str:
    text = "| comparison | ours | theirs | ratio | target |\n|---|--:|--:|--:|---|\n"
    for row in headlines(out):
        text += "| " + " | ".join(row) + " |\n"
    table = sustained_table(out)
    if table:
        text += "\n" + table
    when = runs(out)
    if when:
        text += "\n" + when + "\n"
    return text


if __name__ == "__main__":
    sys.stdout.write(to_markdown(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results")))

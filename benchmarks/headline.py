"""The issue's four target comparisons, from one run's JSON files:
`python -m benchmarks.headline DIR` prints a markdown table (used for docs/benchmarks/README.md).

Every ratio is between rows of the same run (see the rule in `report.RULES`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _rows(out: Path, suite: str) -> list[dict[str, Any]]:
    path = out / f"{suite}.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["results"])


def _get(rows: list[dict[str, Any]], scenario: str, method: str, preload: str = "none"
         ) -> dict[str, Any] | None:  # fmt: skip
    return next(
        (r for r in rows
         if r["scenario"] == scenario and r["method"] == method and r["preload"] == preload),
        None,
    )  # fmt: skip


def headlines(out: Path) -> list[tuple[str, str, str, str, str]]:
    """(comparison, ours, theirs, ratio, target and verdict) rows."""
    lines: list[tuple[str, str, str, str, str]] = []

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

    lat = _rows(out, "latency")
    for scenario in ("back-to-back", "idle-gap-50ms"):
        ratio(
            f"isolated call p50, {scenario}: sandbox-prefork / ppe-warm",
            _get(lat, scenario, "sandbox-prefork"), _get(lat, scenario, "ppe-warm"),
            "p50_ms", 1.0,
        )  # fmt: skip
    cold = _rows(out, "coldstart")
    ratio(
        "cold start p50, heavy preload: subprocess-fresh / sandbox-prefork (speed-up)",
        _get(cold, "use-preloaded", "sandbox-prefork", "heavy"),
        _get(cold, "use-preloaded", "subprocess-fresh", "heavy"),
        "p50_ms", 100.0, speedup=True,
    )  # fmt: skip
    for label in ("sandbox-grpc-unary", "sandbox-grpc-unary-reuse"):
        ratio(
            f"gRPC call p50, back-to-back: {label} / grpc-echo",
            _get(lat, "back-to-back", label), _get(lat, "back-to-back", "grpc-echo"),
            "p50_ms", 1.3,
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
                    f"gRPC throughput, {mode}, {k} in flight: grpc-echo / sandbox-grpc-unary "
                    "(times slower)",
                    f"{a:,.0f} /s", f"{b:,.0f} /s", f"{slower:.3g}×", verdict,
                ))  # fmt: skip
    to = _rows(out, "timeouts")
    for method in ("sandbox-prefork", "sandbox-reuse", "sandbox-fork"):
        ours = _get(to, "deadline-to-outcome", method)
        theirs = _get(to, "deadline-to-outcome", "pebble-warm")
        if ours is None:
            continue
        p50 = float(ours["p50_ms"])
        verdict = "< 10 ms: met" if p50 < 10 else f"< 10 ms: missed by {p50 / 10:.2f}×"
        lines.append((
            f"deadline → outcome p50 (100 ms timeout): {method} vs pebble-warm",
            f"{p50:.3g} ms", f"{theirs['p50_ms']:.3g} ms" if theirs else "n/a",
            f"{p50 / float(theirs['p50_ms']):.3g}×" if theirs else "n/a", verdict,
        ))  # fmt: skip
    return lines


def to_markdown(out: Path) -> str:
    text = "| comparison | ours | theirs | ratio | target |\n|---|--:|--:|--:|---|\n"
    for row in headlines(out):
        text += "| " + " | ".join(row) + " |\n"
    return text


if __name__ == "__main__":
    sys.stdout.write(to_markdown(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results")))

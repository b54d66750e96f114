"""What the isolation layers cost: time from "fork a worker" to "worker ready", side by side.

    python -m benchmarks.layers [--n 100] [--out DIR]

Two runtimes run at once, one with every isolation layer (strict) and one with none (off:
session, death signal, fds, rlimits and cgroups only); workers are forked from each in turn, A B
A B..., so both see the same machine noise. Reports p50/p90/p99 of each and the ratio of the
medians. Forks happen here on demand (the cost a warm pool pays in the background).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def measure(n: int) -> dict[str, Any]:
    from sandbox import AsyncRuntime

    runtimes = {"all layers": AsyncRuntime(min_idle=0, isolation="strict"),
                "no layers": AsyncRuntime(min_idle=0, isolation="off")}
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    try:
        for rt in runtimes.values():
            await rt.start()
        for _ in range(n):
            for name, rt in runtimes.items():
                pool = rt._pools["default"]
                t = time.perf_counter()
                worker, _ = await pool.spawn()
                times[name].append((time.perf_counter() - t) * 1000)
                pool.discard(worker)
                await worker.dead
        layers = runtimes["all layers"].info()["isolation"]["layers"]
    finally:
        for rt in runtimes.values():
            await rt.aclose()
    rows = {name: {"n": len(xs), "p50_ms": statistics.median(xs), "p90_ms": _pct(xs, 0.9),
                   "p99_ms": _pct(xs, 0.99)} for name, xs in times.items()}
    return {"rows": rows,
            "ratio_p50": rows["all layers"]["p50_ms"] / rows["no layers"]["p50_ms"],
            "layers_on": [name for name, layer in layers.items() if layer["enabled"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layers")
    parser.add_argument("--n", type=int, default=100, help="workers forked per configuration")
    parser.add_argument("--out", type=Path, default=None, help="also write layers.json here")
    args = parser.parse_args(argv)
    data = asyncio.run(measure(args.n))
    print("| configuration | n | p50 ms | p90 ms | p99 ms |")
    print("|---|--:|--:|--:|--:|")
    for name, row in data["rows"].items():
        print(f"| {name} | {row['n']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
              f"{row['p99_ms']:.2f} |")
    print(f"\nall layers / no layers, p50: {data['ratio_p50']:.2f}x  "
          f"(layers on: {', '.join(data['layers_on'])})")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "layers.json").write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

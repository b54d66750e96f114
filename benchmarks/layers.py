"""What the isolation layers cost: time from "fork a worker" to "worker ready", side by side.

    python -m benchmarks.layers [--n 100] [--out DIR]

Two runtimes run at once, one with every isolation layer (strict) and one with none (off, no
cgroups: session, death signal, fds and rlimits only), both with `min_idle=0`, so every call
forks its worker on demand; calls alternate A B A B..., so both see the same machine noise.
The birth times are the runtime's own (`info()["pools"]["default"]["births"]["total_ms"]`:
request to ready), p50/p90/p99 of each and the ratio of the medians. Public API only. The
`births` suite (`python -m benchmarks births`) measures the same and more: births/s, under
load, and per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

SOURCE = "def handler(event, context):\n    return event\n"


async def measure(n: int) -> dict[str, Any]:
    from sandbox import AsyncRuntime

    runtimes = {"all layers": AsyncRuntime(min_idle=0, isolation="strict"),
                "no layers": AsyncRuntime(min_idle=0, isolation="off", cgroups=False)}
    try:
        for rt in runtimes.values():
            await rt.start()
            rt.register("layers", source=SOURCE)
        for _ in range(n):
            for rt in runtimes.values():
                res = await rt.invoke("layers", 1)
                if str(getattr(res.outcome, "value", res.outcome)) != "OK":
                    raise RuntimeError(f"invocation ended {res.outcome}: {res.error}")
        births = {name: rt.info()["pools"]["default"]["births"] for name, rt in runtimes.items()}
        layers = runtimes["all layers"].info()["isolation"]["layers"]
    finally:
        for rt in runtimes.values():
            await rt.aclose()
    rows = {name: {"n": b["sampled"], "p50_ms": b["total_ms"]["p50"],
                   "p90_ms": b["total_ms"]["p90"], "p99_ms": b["total_ms"]["p99"]}
            for name, b in births.items()}
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

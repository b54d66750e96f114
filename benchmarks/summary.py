"""Write ``DIR/README.md`` from one run's files: the targets, the layer cost, every suite's
table and plot. ``python -m benchmarks.summary DIR`` (after ``python -m benchmarks all --out
DIR`` and, optionally, ``python -m benchmarks.layers --out DIR``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.headline import to_markdown as headline_table

SUITES = [
    ("latency", "Latency (trivial call, light load)"),
    ("timeouts", "Timeouts (a function that never returns, 100 ms timeout)"),
    ("coldstart", "Cold start with a preloaded profile"),
    ("throughput", "Throughput"),
    ("memory", "Memory"),
    ("paper", "SOCK / Forklift: fresh interpreter vs a zygote that preloaded the package"),
]

INTRO = """# Benchmark results

{machine}. Reproduce with:

```
python -m benchmarks all --out docs/benchmarks      # or: sandbox bench all --out docs/benchmarks
python -m benchmarks.layers --out docs/benchmarks   # cost of the isolation layers
python -m benchmarks.summary docs/benchmarks        # this page
```

**How to read it.** Every ratio compares rows of the same run; p50 is the median of all samples;
the latency suite runs every method in rounds, one after the other. The machine is a shared,
noisy 2-vCPU VM: trust ratios and medians, not single numbers. Pre-forking methods wait, untimed,
until their pool is warm before each timed sequential call, so no latency includes a fork on
demand by accident.
"""

READING = """
**What the numbers say.** A deadline ends a call in a few milliseconds (pebble: ~100 ms), and a
pre-forked, already-confined worker answers a function that uses numpy, pandas, requests and
pydantic 100+ times sooner than a fresh interpreter that imports them. A *fresh isolated process
per call* (`sandbox-prefork`) costs a few times a warm `ProcessPoolExecutor` call, which reuses
one hot process: the difference is the new process's first run (page faults on copy-on-write
memory, a cold cache, the wake-up of a process that has been asleep since its birth), not the
isolation layers, which are paid at birth (see the layer cost), off the call. `sandbox-reuse`
(one worker serving many calls of one function) is the like-for-like comparison with a warm
pool. Over gRPC the call adds the Python gRPC floor (`grpc-echo`) to the embedded cost.
"""


def _first_table(md: str) -> str:
    lines, out, started = md.splitlines(), [], False
    for line in lines:
        if line.startswith("|"):
            out.append(line)
            started = True
        elif started:
            break
    return "\n".join(out)


def _machine(out: Path) -> str:
    for suite, _ in SUITES:
        path = out / f"{suite}.json"
        if path.exists():
            m = json.loads(path.read_text()).get("machine", {})
            return (f"The last full run on this machine type: {m.get('cpu_count', '?')} vCPUs "
                    f"({m.get('cpu_model', '?')}), Python {m.get('python', '?')}, Linux "
                    f"{m.get('kernel', '?')}, {m.get('time_utc', '')}").rstrip(", ")
    return "No run found"


def _layers(out: Path) -> str:
    path = out / "layers.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    rows = ["| configuration | n | p50 ms | p90 ms | p99 ms |", "|---|--:|--:|--:|--:|"]
    for name, row in data["rows"].items():
        rows.append(f"| {name} | {row['n']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                    f"{row['p99_ms']:.2f} |")
    return ("\n## The isolation layers: fork → ready, side by side\n\n" + "\n".join(rows)
            + f"\n\nAll layers / none, p50: **{data['ratio_p50']:.2f}×** (layers on: "
            + ", ".join(data["layers_on"]) + "). Paid by the warm pool at idle priority, off "
            "the call; a fork on demand pays it on the call.\n")


def write(out: Path) -> Path:
    parts = [INTRO.format(machine=_machine(out)), "## The issue's targets\n",
             headline_table(out), READING, _layers(out)]
    for suite, title in SUITES:
        md = out / f"{suite}.md"
        if not md.exists():
            continue
        parts.append(f"\n## {title}\n\n![{suite}]({suite}.png)\n\n"
                     f"{_first_table(md.read_text())}\n\nNotes and every row: [{suite}.md]"
                     f"({suite}.md).\n")
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(write(Path(args[0] if args else "docs/benchmarks")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

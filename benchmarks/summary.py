"""Write ``DIR/README.md`` from one run's files: the targets, the sustained rows, the births,
every suite's table and plot. ``python -m benchmarks.summary DIR`` (after ``python -m
benchmarks all --out DIR``; ``python -m benchmarks.report DIR`` re-renders older files first).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.headline import to_markdown as headline_table

SUITES = [
    ("sustained", "Sustained load: no pauses between calls (1, 16, 128 callers)"),
    ("births", "Worker births: births/s and phases, all isolation layers vs none"),
    ("calls", "Where a call's time goes: phases at light load and sustained, all layers vs none"),
    ("soak", "Soak: 16 callers, 10 % hostile calls; nothing lost, supervisor RSS and fds flat"),
    ("executor", "sandbox.Executor beside ProcessPoolExecutor, loky and pebble: a sustained map, "
                 "and what a timeout, an OOM and a segfault cost"),
    ("async", "Asynchronous invocations: enqueue throughput and queue-to-start latency, single "
              "node (SQLite) and fleet (PostgreSQL)"),
    ("observability", "Metrics and JSON access logs on vs off: a gRPC Invoke at light load and "
                      "sustained"),
    ("fleet", "A fleet on one machine: deploy propagation between replicas, and 3 replicas "
              "balanced round_robin vs 1 (sustained)"),
    ("latency", "Latency at light load (warm pool before each call)"),
    ("timeouts", "Timeouts (100 ms timeout): light load, and 16 callers at once"),
    ("coldstart", "Cold start with a preloaded profile (light load, warm pool)"),
    ("throughput", "Throughput (sustained: N in flight)"),
    ("memory", "Memory"),
    ("paper", "SOCK / Forklift: fresh interpreter vs a zygote that preloaded the package"),
]

INTRO = """# Benchmark results

{machine}. Reproduce with:

```
python -m benchmarks all --out docs/benchmarks      # or: sandbox bench all --out docs/benchmarks
python -m benchmarks sustained --out docs/benchmarks  # one suite (births, calls, latency, ...)
python -m benchmarks soak --out docs/benchmarks     # the soak: long, not part of `all`
python -m benchmarks.summary docs/benchmarks        # this page
```

{runs}

**How to read it.** Every ratio compares rows of the same run; p50 is the median of all samples;
the latency and sustained suites run every method in rounds, one after the other. The machine is
a shared, noisy 2-vCPU VM: trust ratios and medians, not single numbers. Every row names its
**regime**: *light load, warm pool* (the harness waited, untimed, for a warm pool before each
call, so no call paid a birth) or *sustained* (no pauses between calls, one untimed warm-up
call: with single-use workers each call waits for a birth, as in real use).
"""

READING = """
**What the numbers say.** At *light load* a pre-forked, already-confined worker is waiting for
the call: a deadline ends a call in a few milliseconds (pebble: ~100 ms), and a function that uses
numpy, pandas, requests and pydantic answers 100+ times sooner than from a fresh interpreter.
Under *sustained* load a single-use worker is born for every call, so the birth (see `births`:
fork, the isolation layers, warm-up, and the wait for the zygote) is the call's cost: compare
`sandbox-prefork` with `fork-floor`, the fork-and-reap loop nothing isolated per call can beat,
and with `ppe-warm`, which reuses one hot process. `reuse=N` is the like-for-like comparison
with a warm pool. Over gRPC the call adds the Python gRPC floor (`grpc-echo`).
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
            return (f"Machine: {m.get('cpu_count', '?')} vCPUs ({m.get('cpu_model', '?')}), "
                    f"Python {m.get('python', '?')}, Linux {m.get('kernel', '?')}")
    return "No run found"


def _runs(out: Path) -> str:
    """When each suite's file was measured (suites can be re-run one at a time)."""
    parts = []
    for suite, _ in SUITES:
        path = out / f"{suite}.json"
        if path.exists():
            when = json.loads(path.read_text()).get("machine", {}).get("time_utc", "?")
            parts.append(f"`{suite}` {when}")
    return "Measured: " + ", ".join(parts) + "." if parts else ""


def _ratios(md: str) -> str:
    """A suite page's ratios-against-targets table, if it has one."""
    head = "## Ratios against the targets"
    if head not in md:
        return ""
    return _first_table(md.split(head, 1)[1])


def _phases(md: str) -> str:
    """The births or calls page's phase tables (from its first "### Birth phases" or "### Call
    phases" to its notes); the executor page's fault tables."""
    for mark in ("### Birth phases", "### Call phases", "## What a bad call costs"):
        if mark in md:
            text = (mark if mark.startswith("###") else "") + md.split(mark, 1)[1]
            return text.split("\n## ", 1)[0].replace("### ", "#### ")
    return ""


def _verdict(md: str) -> str:
    """The soak page's verdict and outcome tables (its "## Verdict" section)."""
    if "## Verdict" not in md:
        return ""
    text = md.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    return text.replace("### ", "#### ").strip()


def write(out: Path) -> Path:
    parts = [INTRO.format(machine=_machine(out), runs=_runs(out)), "## The targets\n",
             headline_table(out), READING]
    for suite, title in SUITES:
        md_path = out / f"{suite}.md"
        if not md_path.exists():
            continue
        md = md_path.read_text()
        rows = md.split("## Rows", 1)[1] if "## Rows" in md else md
        section = f"\n## {title}\n\n![{suite}]({suite}.png)\n\n"
        ratios = _ratios(md)
        if ratios:
            section += ratios + "\n\n"
        verdict = _verdict(md)
        if verdict:
            section += verdict + "\n\n"
        section += _first_table(rows) + "\n\n"
        phases = _phases(md)
        if phases:
            section += phases.strip() + "\n\n"
        section += f"Notes and every row: [{suite}.md]({suite}.md).\n"
        parts.append(section)
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(write(Path(args[0] if args else "docs/benchmarks")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

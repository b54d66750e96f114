"""`sandbox bench [SUITE|all] [--quick] [--out DIR]`, SUITE one of `SUITE_NAMES` (all of them:
`all`) or `LONG_SUITES` (only when named: `soak`).

Also `python -m benchmarks ...`. `main(argv) -> int` is what the `sandbox bench` subcommand calls.
Runs each suite's units under one tqdm progress bar (stderr), writes DIR/<suite>.{json,md,png},
and at the end makes sure no process it started is left: pools, servers and zygotes are torn
down by their methods; anything still alive is reported and killed (exit status 3). A suite
whose own checks failed (`extra["checks"]`, the soak's: a call lost, a wrong outcome, a slope
over its threshold) makes the exit status 4.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SUITE_NAMES = (
    "coldstart", "latency", "sustained", "throughput", "timeouts", "births", "calls", "memory",
    "paper", "observability", "executor", "async", "fleet",
)  # fmt: skip
#: suites run only when named (long): not in `all`
LONG_SUITES = ("soak",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sandbox bench",
        description="Cold start, latency (light load and sustained), throughput, timeout, "
        "birth, call-phase, memory, observability-overhead and fleet (PostgreSQL + three "
        "replicas: deploy propagation, 3 vs 1 replicas) benchmarks (`all`); `soak` "
        "(long, only when named): 20,000 calls, 10 % hostile, nothing lost, supervisor memory "
        "and fds flat.",
    )
    p.add_argument("suite", nargs="?", default="all",
                   choices=(*SUITE_NAMES, *LONG_SUITES, "all"))  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="few samples: all suites in well under 2 minutes"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    p.add_argument(
        "--only", default=None, help="comma-separated method names to run (default: all)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _leftovers() -> list[str]:
    """End what is still alive under us (we started all of it) and say what it was."""
    import multiprocessing
    from multiprocessing import resource_tracker

    import psutil

    # multiprocessing's resource tracker lives until we exit; stop it so nothing is left.
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if getattr(tracker, "_pid", None) is not None:
        tracker._stop()  # type: ignore[union-attr]
    for child in multiprocessing.active_children():
        child.join(1)
    children = psutil.Process().children(recursive=True)
    left = []
    for c in children:
        try:
            left.append(f"{c.pid} {' '.join(c.cmdline())[:120]}")
            c.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(children, timeout=5)
    return left


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import tqdm  # type: ignore[import-untyped]

    from benchmarks import report, suites
    from benchmarks.core import SuiteResult, load_methods, machine_info

    tqdm.tqdm.monitor_interval = 0  # no monitor thread: mp-fork forks from this process
    load_methods()
    names = list(SUITE_NAMES) if args.suite == "all" else [args.suite]
    only = frozenset(x.strip() for x in args.only.split(",")) if args.only else None
    cfg = suites.Config(quick=args.quick, only=only)
    plans = [(name, suites.SUITES[name](cfg)) for name in names]
    machine = machine_info()
    t_start = time.monotonic()
    written: list[Path] = []
    failed: list[str] = []
    with tqdm.tqdm(
        total=sum(len(units) for _, units in plans),
        file=sys.stderr,
        disable=args.no_progress,
        unit="step",
        dynamic_ncols=True,
    ) as bar:
        try:
            for name, units in plans:
                res = SuiteResult(name)
                for unit in units:
                    bar.set_description(unit.label[:60])
                    t0 = time.monotonic()
                    unit.run(res)
                    res.timings[unit.label] = round(time.monotonic() - t0, 2)
                    bar.update()
                written += report.write(res, machine, args.out)
                failed += [f"{name}: {c['check']}: {c['value']}"
                           for c in res.extra.get("checks", []) if c.get("passed") is False]
        finally:
            left = _leftovers()
    for path in written:
        print(path)
    print(f"done in {time.monotonic() - t_start:.1f} s", file=sys.stderr)
    if left:
        print("leftover processes (killed): " + "; ".join(left), file=sys.stderr)
        return 3
    if failed:
        print("checks failed: " + "; ".join(failed), file=sys.stderr)
        return 4
    return 0

"""The `calls` suite: where an isolated call's time goes, phase by phase, with every isolation
layer and with none, in the same run.

    all layers   AsyncRuntime at its defaults (as root: strict, every layer and cgroups)
    no layers    AsyncRuntime(isolation="off", cgroups=False)

Scenarios (both configurations in each; a trivial function, `{"op": "echo"}`):

    light-load-warm-pool   light load: before each timed call the harness waits, untimed, for
                           the warm pool (`wait_warm()`), so the call finds an idle worker
    1-caller               sustained: calls back to back, no waiting between them
    16-callers             sustained: 16 callers without pauses

Each (scenario, configuration) gets a fresh runtime with no call at setup and no warm-up call,
so the runtime's records of recent OK calls (`info()["calls"]`, the last 1024) are exactly the
scenario's calls. The breakdown is the runtime's own, read after the scenario: `phases_ms` (p50/
p90/p99 per phase, in call order: queue, acquire, dispatch, to_worker, load, run, encode,
to_supervisor, classify; worker and supervisor share one monotonic clock) and `total_ms` (the
phases' sum per call). Beside it, from each result's stats: `run_s` (event sent -> outcome
known), `function_s` (the handler's own run, measured in the worker) and their difference (what
the isolation cost the call once a worker had it), `startup_s` (the wait for a worker).

Rows: the calls as the harness timed them (invoke -> result in this process), calls/s for the
sustained scenarios. Phases are taken as the runtime names them, in its order.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.core import LIGHT, SUSTAINED, Method, SuiteResult, percentile, summarize
from benchmarks.suites import Config, Unit, _guard, method

#: (configuration, row method label, AsyncRuntime options): as in the births suite
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("all layers", "sandbox-all-layers", {}),
    ("no layers", "sandbox-no-layers", {"isolation": "off", "cgroups": False}),
]
WARM = "light-load-warm-pool"
SEQUENTIAL = "1-caller"
CALLERS = 16
LOADED = f"{CALLERS}-callers"
#: scenario -> (regime, calls: (quick, full)); at most 1024 so the runtime keeps every record
SCENARIOS: dict[str, tuple[str, tuple[int, int]]] = {
    WARM: (LIGHT, (10, 400)),
    SEQUENTIAL: (SUSTAINED, (20, 1000)),
    LOADED: (SUSTAINED, (48, 1024)),
}
#: the result stats shown beside the phases: (key, label)
STATS = [
    ("startup_s", "stats.startup_s (wait for a worker)"),
    ("run_s", "stats.run_s (event sent → outcome)"),
    ("function_s", "stats.function_s (the handler, in the worker)"),
    ("overhead_s", "run_s − function_s (isolation's share once a worker had the call)"),
]


def _q(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 in ms of values in seconds (nearest rank, as the runtime's own)."""
    ms = sorted(v * 1e3 for v in values)
    return {f"p{q}": round(percentile(ms, q), 4) for q in (50, 90, 99)} if ms else {}


def stats_ms(stats: list[Any]) -> dict[str, dict[str, float]]:
    """The results' stats as p50/p90/p99 ms: startup_s, run_s, function_s, run_s - function_s
    (calls whose function_s is unknown are left out of the last two)."""
    timed = [s for s in stats if getattr(s, "function_s", None) is not None]
    return {
        "startup_s": _q([s.startup_s for s in stats]),
        "run_s": _q([s.run_s for s in stats]),
        "function_s": _q([s.function_s for s in timed]),
        "overhead_s": _q([s.run_s - s.function_s for s in timed]),
    }


def _measure(m: Method, scenario: str, n: int) -> tuple[list[int], int]:
    """The scenario's calls on a fresh runtime: (latencies ns, wall ns of the timed calls)."""
    event = {"op": "echo"}
    lat: list[int] = []
    if scenario == LOADED:
        t0 = time.perf_counter_ns()
        lat = m.run_inflight([event] * n, CALLERS)
        return lat, time.perf_counter_ns() - t0
    t_start = time.perf_counter_ns()
    for _ in range(n):
        if scenario == WARM:
            m.ready()  # untimed: the pool has its warm workers back
        t0 = time.perf_counter_ns()
        m.call(event)
        lat.append(time.perf_counter_ns() - t0)
    wall = sum(lat) if scenario == WARM else time.perf_counter_ns() - t_start
    return lat, wall


def calls(cfg: Config) -> list[Unit]:
    #: scenario -> configuration -> {"lat", "wall", "info", "stats_ms", "on_demand"}
    data: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SCENARIOS}

    def run(res: SuiteResult, scenario: str, config: str, options: dict[str, Any]) -> None:
        n = cfg.n(*SCENARIOS[scenario][1])
        with method(res, "sandbox-prefork", "none", scenario, runtime_defaults=True,
                    setup_call=False, **options) as m:  # fmt: skip
            if m is None:
                return

            def measure() -> None:
                m.stats_log = []  # type: ignore[attr-defined]
                m.take_on_demand()
                lat, wall = _measure(m, scenario, n)
                info = dict(m.info()["calls"])  # type: ignore[attr-defined]
                if info.get("sampled") != min(n, 1024):
                    res.notes.append(
                        f"{scenario} ({config}): the runtime sampled {info.get('sampled')} "
                        f"calls, not the {n} of the scenario"
                    )
                data[scenario][config] = {
                    "lat": lat, "wall": wall, "info": info,
                    "stats_ms": stats_ms(m.stats_log),  # type: ignore[attr-defined]
                    "on_demand": m.take_on_demand(), "n": n,
                }  # fmt: skip

            _guard(res, scenario, m, measure)

    def finish(res: SuiteResult) -> None:
        for scenario, (regime, _) in SCENARIOS.items():
            for config, label, _ in CONFIGS:
                d = data[scenario].get(config)
                if d is None:
                    continue
                res.rows.append(summarize(scenario, label, "none", d["lat"], wall_ns=d["wall"],
                                          regime=regime))  # fmt: skip
                res.notes.append(
                    f"{scenario} ({config}): {d['n']} calls, {d['info'].get('sampled', 0)} in "
                    f"the runtime's records, {d['on_demand']} served by a worker forked on "
                    "demand"
                )
        res.extra["calls"] = {
            scenario: {
                config: {**d["info"], "calls": d["n"], "forked_on_demand": d["on_demand"],
                         "stats_ms": d["stats_ms"]}
                for config, d in by_config.items()
            }
            for scenario, by_config in data.items()
        }  # fmt: skip
        res.extra["regimes"] = {scenario: regime for scenario, (regime, _) in SCENARIOS.items()}

    units = []
    if cfg.only is None or "sandbox-prefork" in cfg.only:
        for scenario in SCENARIOS:
            for config, _, options in CONFIGS:
                units.append(Unit(
                    f"calls {scenario} ({config})",
                    lambda res, s=scenario, c=config, o=options: run(res, s, c, o),
                ))  # fmt: skip
    units.append(Unit("calls (summary)", finish))
    return units

"""The `births` suite: how fast workers are born, and where a birth's time goes, with every
isolation layer and with none, in the same run.

    all layers   AsyncRuntime at its defaults (as root: strict, every layer and cgroups)
    no layers    AsyncRuntime(isolation="off", cgroups=False)

Scenarios (both configurations in each):

    on-demand-sequential   min_idle=0, max_idle=0 (`sandbox-fork`): every call forks its worker
                           (the notes count the calls that did); calls back to back, the
                           two runtimes alternating call by call (A B A B...) so both see the
                           same machine noise
    16-callers             the runtime's defaults (warm pool) and 16 callers without pauses:
                           the pool births a worker per call, in the background; one
                           configuration after the other

Rows: the calls (latency, calls/s) and `births_per_s` (births the runtime counted during the
timed calls / their wall time). The per-phase breakdown comes from the runtime itself,
`info()["pools"]["default"]["births"]` (`phases_ms`: p50/p90/p99 per phase, in birth order;
`total_ms`: request to ready), read after the scenario; it covers the runtime's recent births
(the warm-up's included). Phases are taken as the runtime names them, in its order.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from benchmarks.core import SUSTAINED, Method, Ratio, SuiteResult, summarize
from benchmarks.suites import Config, Unit, _guard, method

#: (configuration, row method label, AsyncRuntime options)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("all layers", "sandbox-all-layers", {}),
    ("no layers", "sandbox-no-layers", {"isolation": "off", "cgroups": False}),
]
ON_DEMAND = "on-demand-sequential"
LOADED_CALLERS = 16
LOADED = f"{LOADED_CALLERS}-callers"
SCENARIOS = (ON_DEMAND, LOADED)
#: the target for all layers / no layers, birth total p50 (on demand)
TARGET = 2.0


def _births(m: Method) -> dict[str, Any]:
    info = m.info()  # type: ignore[attr-defined]
    return dict(info["pools"]["default"]["births"])


def merge_order(orders: list[list[str]]) -> list[str]:
    """One phase order from several (each in birth order; a configuration may skip phases):
    every phase after the phases that precede it in any of them."""
    out: list[str] = []
    for order in orders:
        for i, name in enumerate(order):
            if name in out:
                continue
            before = [p for p in order[:i] if p in out]
            at = out.index(before[-1]) + 1 if before else 0
            out.insert(at, name)
    return out


def births(cfg: Config) -> list[Unit]:
    #: scenario -> configuration -> {"lat": [...], "wall": ns, "births": n, "info": {...}}
    data: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SCENARIOS}
    event = {"op": "echo"}

    def on_demand(res: SuiteResult) -> None:
        n = cfg.n(8, 200)
        with contextlib.ExitStack() as stack:
            ms: list[tuple[str, Method]] = []
            for config, _, options in CONFIGS:
                m = stack.enter_context(
                    method(res, "sandbox-fork", "none", ON_DEMAND, min_idle=0, **options)
                )
                if m is not None:
                    ms.append((config, m))
            if not ms:
                return

            def measure() -> None:
                lat: dict[str, list[int]] = {c: [] for c, _ in ms}
                before = {c: _births(m)["births"] for c, m in ms}
                for _, m in ms:
                    m.take_on_demand()
                for _ in range(n):
                    for config, m in ms:
                        t0 = time.perf_counter_ns()
                        m.call(event)
                        lat[config].append(time.perf_counter_ns() - t0)
                for config, m in ms:
                    info = _births(m)
                    res.notes.append(
                        f"{ON_DEMAND} ({config}): {m.take_on_demand()} of {n} calls were served "
                        "by a worker forked on demand"
                    )
                    data[ON_DEMAND][config] = {
                        "lat": lat[config], "wall": sum(lat[config]),
                        "births": info["births"] - before[config], "info": info,
                    }  # fmt: skip

            _guard(res, ON_DEMAND, ms[0][1], measure)

    def loaded(res: SuiteResult, config: str, options: dict[str, Any]) -> None:
        total = cfg.n(48, 1000)
        with method(res, "sandbox-prefork", "none", LOADED, runtime_defaults=True,
                    **options) as m:  # fmt: skip
            if m is None:
                return

            def measure() -> None:
                m.call(event)  # the one untimed warm-up; no waiting for a warm pool
                before = _births(m)["births"]
                m.take_on_demand()
                t0 = time.perf_counter_ns()
                lat = m.run_inflight([event] * total, LOADED_CALLERS)
                wall = time.perf_counter_ns() - t0
                info = _births(m)
                res.notes.append(
                    f"{LOADED} ({config}): {m.take_on_demand()} of {total} calls were served by "
                    "a worker forked on demand (no warm worker was idle)"
                )
                data[LOADED][config] = {
                    "lat": lat, "wall": wall, "births": info["births"] - before, "info": info,
                }  # fmt: skip

            _guard(res, LOADED, m, measure)

    def finish(res: SuiteResult) -> None:
        for scenario in SCENARIOS:
            for config, label, _ in CONFIGS:
                d = data[scenario].get(config)
                if d is None:
                    continue
                row = summarize(scenario, label, "none", d["lat"], wall_ns=d["wall"],
                                regime=SUSTAINED)  # fmt: skip
                row.births_per_s = round(d["births"] / (d["wall"] / 1e9), 2) if d["wall"] else None
                res.rows.append(row)
        res.extra["births"] = {
            scenario: {config: d["info"] for config, d in by_config.items()}
            for scenario, by_config in data.items()
        }
        for scenario in SCENARIOS:
            both = data[scenario]
            if "all layers" not in both or "no layers" not in both:
                continue
            a = both["all layers"]["info"].get("total_ms", {}).get("p50")
            b = both["no layers"]["info"].get("total_ms", {}).get("p50")
            if not a or not b:
                continue
            res.ratios.append(Ratio(
                label=f"birth p50, all layers ÷ no layers ({scenario})",
                ours="all layers, birth total p50", theirs="no layers, birth total p50",
                ours_value=float(a), theirs_value=float(b), unit="ms",
                value=round(float(a) / float(b), 4),
                op="<=" if scenario == ON_DEMAND else "",
                target=TARGET if scenario == ON_DEMAND else None,
            ))  # fmt: skip

    units = []
    if cfg.only is None or "sandbox-fork" in cfg.only:
        units.append(Unit(f"births {ON_DEMAND} (all layers, no layers)", on_demand))
    if cfg.only is None or "sandbox-prefork" in cfg.only:
        for config, _, options in CONFIGS:
            units.append(
                Unit(f"births {LOADED} ({config})",
                     lambda res, config=config, options=options: loaded(res, config, options))
            )  # fmt: skip
    units.append(Unit("births (summary)", finish))
    return units

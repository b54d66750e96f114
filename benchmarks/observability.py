"""The `observability` suite: what Prometheus metrics and JSON access logs cost a gRPC Invoke,
in the same run.

    off   `sandbox serve` (`--log-level warning`: no access-log line, no metrics)
    on    `sandbox serve --metrics-listen 127.0.0.1:0 --log-format json --log-level info`:
          every call counted (the runtime's and the per-RPC metrics) and logged (one JSON line
          per invocation, written to a file)

Both servers run at once, at their defaults otherwise (every isolation layer as root), and the
harness calls them in turn, so both see the same machine noise:

    light-load-warm-pool   light load: before each timed call the harness waits, untimed, for
                           both servers' warm pools; the servers alternate call by call, in
                           the order A B, B A, A B...
    1-caller               sustained: calls back to back, in blocks of `BLOCK` per server,
                           the servers alternating block by block (A B, B A, ...)

A trivial function (echo), `Client.invoke` (unary `Invoke`). Rows: the calls as the harness
timed them. Ratios: p50 on ÷ p50 off per scenario, against the target (≤ 1.05: at most 5 %
more), with each round's value. Checks (exit status 4 when one fails): the `on` server's
`sandbox_invocations_total` and its `invocation` log lines both equal the calls it served,
and `grpc_server_handled_total{grpc_method="Invoke",grpc_code="OK"}` too. Nothing scrapes
during the timed calls (a Prometheus scraping every 15 s costs one exposition per 15 s).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import urllib.request
from typing import Any

from benchmarks.core import LIGHT, SUSTAINED, Method, Ratio, SuiteResult, percentile, summarize
from benchmarks.suites import Config, Unit, method

#: (configuration, row method label, `sandbox serve` flags)
CONFIGS: list[tuple[str, str, list[str]]] = [
    ("off", "sandbox-grpc-plain", ["--log-level", "warning"]),
    ("on", "sandbox-grpc-metrics-json-logs", [
        "--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "info"]),
]
WARM = "light-load-warm-pool"
SEQUENTIAL = "1-caller"
#: calls per configuration: (quick, full)
CALLS = {WARM: (40, 600), SEQUENTIAL: (40, 1000)}
#: sustained calls per block (one server back to back, then the other)
BLOCK = 20
ROUNDS = 3
TARGET = 1.05


def _p50(lat: list[int]) -> float:
    return percentile(sorted(x / 1e6 for x in lat), 50)


def _time(m: Method, event: dict[str, Any]) -> int:
    t0 = time.perf_counter_ns()
    m.call(event)
    return time.perf_counter_ns() - t0


def _measure(ms: dict[str, Method], scenario: str, n: int) -> dict[str, list[list[int]]]:
    """Per configuration, per round: latencies (ns)."""
    event = {"op": "echo"}
    per_round = max(1, n // ROUNDS)
    out: dict[str, list[list[int]]] = {c: [] for c in ms}
    # Whichever server is called second runs while the first one's worker exits and its pool
    # refills: the order alternates (A B, B A, ...) so neither always pays for that.
    order = [list(ms), list(reversed(list(ms)))]
    for _ in range(ROUNDS):
        lats: dict[str, list[int]] = {c: [] for c in ms}
        if scenario == WARM:
            for i in range(per_round):
                for config in order[i % 2]:
                    for m in ms.values():
                        m.ready()  # untimed: both pools have their warm workers back
                    lats[config].append(_time(ms[config], event))
        else:
            done, i = 0, 0
            while done < per_round:
                block = min(BLOCK, per_round - done)
                for config in order[i % 2]:
                    lats[config].extend(_time(ms[config], event) for _ in range(block))
                done, i = done + block, i + 1
        for config in ms:
            out[config].append(lats[config])
    return out


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _sample(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def observability(cfg: Config) -> list[Unit]:
    #: scenario -> configuration -> per-round latencies
    data: dict[str, dict[str, list[list[int]]]] = {}

    def run(res: SuiteResult) -> None:
        with tempfile.TemporaryDirectory(prefix="sandbox-bench-obs-") as tmp:
            log_path = os.path.join(tmp, "server.log")
            with method(res, "sandbox-grpc-unary", "none", "*", serve_args=CONFIGS[0][2]) \
                    as off, method(res, "sandbox-grpc-unary", "none", "*",
                                   serve_args=CONFIGS[1][2], stderr_path=log_path) as on:
                if off is None or on is None:
                    return
                ms = {"off": off, "on": on}
                for scenario, counts in CALLS.items():
                    data[scenario] = _measure(ms, scenario, cfg.n(*counts))
                # Every call the `on` server served, the setup call included.
                served = 1 + sum(len(r) for s in data.values() for r in s["on"])
                url = on.metrics_url  # type: ignore[attr-defined]
                text = _scrape(url) if url else ""
            lines = []
            with open(log_path) as f:
                for line in f:
                    record = json.loads(line)  # every stderr line is one JSON object
                    if record.get("event") == "invocation":
                        lines.append(record)
        counted = _sample(text, "sandbox_invocations_total", function="bench", outcome="OK")
        handled = _sample(text, "grpc_server_handled_total", grpc_method="Invoke",
                          grpc_code="OK")
        checks = res.extra.setdefault("checks", [])
        for check, value in (
            ("sandbox_invocations_total{outcome=OK} == calls served", counted),
            ("grpc_server_handled_total{Invoke,OK} == calls served", handled),
            ("JSON `invocation` log lines == calls served", float(len(lines))),
        ):
            checks.append({"check": check, "value": value, "threshold": served,
                           "passed": value == served})
        res.notes.append(f"the `on` server served {served} calls (one at setup), counted "
                         f"{counted}, logged {len(lines)} invocation lines")

    def finish(res: SuiteResult) -> None:
        for scenario, regime in ((WARM, LIGHT), (SEQUENTIAL, SUSTAINED)):
            rounds = data.get(scenario)
            if not rounds:
                continue
            pooled = {c: [x for r in rounds[c] for x in r] for c in rounds}
            for config, label, _ in CONFIGS:
                lat = pooled[config]
                wall = sum(lat)
                res.rows.append(summarize(scenario, label, "none", lat, wall_ns=wall,
                                          regime=regime))
            on, off = _p50(pooled["on"]), _p50(pooled["off"])
            per_round = [round(_p50(a) / _p50(b), 4)
                         for a, b in zip(rounds["on"], rounds["off"], strict=True)]
            res.ratios.append(Ratio(
                label=f"{regime}: Invoke p50, metrics + JSON logs on ÷ off ({scenario})",
                ours=f"{CONFIGS[1][1]} p50", theirs=f"{CONFIGS[0][1]} p50",
                ours_value=round(on, 4), theirs_value=round(off, 4), unit="ms",
                value=round(on / off, 4), op="<=", target=TARGET, per_round=per_round))
            res.notes.append(
                f"{scenario}: per round on ÷ off " + ", ".join(f"{x:.3g}×" for x in per_round)
                + f" (median {statistics.median(per_round):.3g}×)")

    units = []
    if cfg.only is None or "sandbox-grpc-unary" in cfg.only:
        units.append(Unit("observability: metrics + JSON logs on vs off", run))
    units.append(Unit("observability (summary)", finish))
    return units

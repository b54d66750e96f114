"""The `fleet` suite: three `sandbox serve` replicas sharing one function store in PostgreSQL
(benchmarks/localfleet.py: a temporary PostgreSQL, the replicas on loopback at their defaults,
every isolation layer as root), measured in one run:

    propagation      replica n1 deploys a new version (a `Client` to n1); a `Client` to n2
                     asks n2 for that version (`function(name, version)`, GetFunction) in a
                     tight loop until n2 has it, then the same on n3. The loop is the
                     measurement (no sleeps). Rows: deploy start -> served by n2; deploy
                     start -> served by n2 and n3 (every other replica); deploy acknowledged
                     -> served by n2; and the deploy RPC itself. After each, untimed: n2 and
                     n3 each invoke that version once and must return its own value. Target
                     (a check): served by every other replica within a second (p99).
    8-callers        sustained: 8 caller threads invoking a trivial function (echo) back to
                     back through one `Client` balanced round_robin over the three replicas
                     (`fleet-3-replicas`), and the same load through a `Client` to replica n1
                     alone (`fleet-1-replica`; the other two stay up, idle), in blocks of
                     `BLOCK` calls, the two alternating block by block (3 1, 1 3, ...) so both
                     see the same machine noise. calls/s; the ratio 3 ÷ 1 per round. Checks:
                     each replica served within ±20 % of an even share of the balanced calls
                     (`stats.node`), every call of the other client was served by n1.

Regimes: the throughput rows are *sustained* (no pauses between calls; a function deployed at
its default `reuse=1`, so every call needs a worker birth on the replica that serves it). The
propagation rows are their own kind: not a call's latency but how long a deploy takes to reach
the other replicas (NOTIFY, their listener reading the change, the bundle into their mirror),
one deploy at a time on an otherwise idle fleet; they carry the *light load* label (nothing
else runs while they are measured) and the notes say what they are.

Where PostgreSQL cannot be started (not installed, no psycopg, root without an ordinary user
to run it as) the suite records "unavailable: <reason>" and writes its files.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import statistics
import threading
import time
import traceback
from typing import Any

from benchmarks.core import LIGHT, SUSTAINED, Ratio, SuiteResult, percentile, summarize
from benchmarks.suites import Config, Unit

REPLICAS = ("n1", "n2", "n3")
DEPLOYER, FOLLOWER, THIRD = REPLICAS
#: deploys measured: (quick, full)
DEPLOYS = (10, 100)
CALLERS = 8
#: sustained calls per block (one configuration back to back, then the other)
BLOCK = (80, 400)
ROUNDS = (2, 6)
#: untimed calls per configuration before the timed blocks
WARMUP_CALLS = 2 * CALLERS
#: the issue's target: a deploy through one replica served by every other within a second
PROPAGATION_TARGET_MS = 1000.0
#: each replica's share of the balanced calls: within this fraction of an even share
SPREAD = 0.20
#: Deadlock guards only (propagation takes milliseconds; a replica answers in milliseconds)
PROPAGATION_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 60.0

FUNCTION = "bench-echo"
ECHO = "def handler(event, context):\n    return event\n"
PROPAGATED = "bench-propagation"

BALANCED = "fleet-3-replicas"
SINGLE = "fleet-1-replica"
SCENARIO = f"{CALLERS}-callers"
#: propagation rows: (key, scenario, method)
PROPAGATION_ROWS = (
    ("served_b", "propagation: deploy start → served by n2", "n1 → n2"),
    ("served_all", "propagation: deploy start → served by n2 and n3", "n1 → n2, n3"),
    ("ack_b", "propagation: deploy acknowledged → served by n2", "n1 → n2"),
    ("deploy", "deploy RPC (through n1)", "n1"),
)
METHODS = (BALANCED, SINGLE, "n1 → n2", "n1 → n2, n3", "n1")


def _wait_served(client: Any, name: str, version: int, deadline: float) -> int:
    """Ask ``client``'s replica for ``name@version`` until it has it; returns how many times
    it answered NOT_FOUND first."""
    from sandbox.errors import FunctionNotFound

    misses = 0
    while True:
        try:
            client.function(name, version)
            return misses
        except FunctionNotFound:
            misses += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}@{version} not served within "
                                   f"{PROPAGATION_TIMEOUT_S} s") from None


def _propagation(direct: dict[str, Any], n: int, data: dict[str, Any]) -> None:
    a, b, c = (direct[node] for node in REPLICAS)
    times: dict[str, list[int]] = {key: [] for key, _, _ in PROPAGATION_ROWS}
    misses_b, misses_c, wrong = [], [], []
    for i in range(n):
        source = f"def handler(event, context):\n    return {i}\n"  # a new version each time
        t0 = time.perf_counter_ns()
        fn = a.deploy(PROPAGATED, source)
        t_ack = time.perf_counter_ns()
        deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
        misses_b.append(_wait_served(b, PROPAGATED, fn.version, deadline))
        t_b = time.perf_counter_ns()
        misses_c.append(_wait_served(c, PROPAGATED, fn.version, deadline))
        t_all = time.perf_counter_ns()
        times["deploy"].append(t_ack - t0)
        times["served_b"].append(t_b - t0)
        times["ack_b"].append(t_b - t_ack)
        times["served_all"].append(t_all - t0)
        for node, client in ((FOLLOWER, b), (THIRD, c)):  # untimed: they serve it
            got = client.invoke(PROPAGATED, None, version=fn.version).unwrap()
            if got != i:
                wrong.append(f"{node} v{fn.version}: {got!r}")
    data["propagation"] = {"times_ns": times, "misses_n2": misses_b, "misses_n3": misses_c,
                           "wrong": wrong, "versions": n}


def _block(client: Any, calls: int, start: int) -> tuple[list[int], int, list[str]]:
    """`calls` invocations from `CALLERS` threads back to back; (latencies ns, wall ns, the
    node of each result)."""
    lat: list[int] = []
    nodes: list[str] = []
    lock = threading.Lock()
    ids = iter(range(start, start + calls))
    errors: list[BaseException] = []

    def caller() -> None:
        while True:
            with lock:
                i = next(ids, None)
            if i is None or errors:
                return
            t0 = time.perf_counter_ns()
            try:
                res = client.invoke(FUNCTION, i)
                value = res.unwrap()
                if value != i:
                    raise RuntimeError(f"call {i} returned {value!r}")
            except BaseException as exc:
                errors.append(exc)
                return
            elapsed = time.perf_counter_ns() - t0
            with lock:
                lat.append(elapsed)
                nodes.append(res.stats.node)

    threads = [threading.Thread(target=caller, name=f"fleet-caller-{k}")
               for k in range(CALLERS)]
    t0 = time.perf_counter_ns()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter_ns() - t0
    if errors:
        raise errors[0]
    return lat, wall, nodes


def _throughput(clients: dict[str, Any], block: int, rounds: int, data: dict[str, Any]) -> None:
    counter = itertools.count(step=block)
    for client in clients.values():  # untimed warm-up
        _block(client, WARMUP_CALLS, next(counter))
    per_round: dict[str, list[tuple[list[int], int]]] = {c: [] for c in clients}
    nodes: dict[str, collections.Counter[str]] = {c: collections.Counter() for c in clients}
    order = [list(clients), list(reversed(list(clients)))]
    for r in range(rounds):
        for config in order[r % 2]:
            lat, wall, served = _block(clients[config], block, next(counter))
            per_round[config].append((lat, wall))
            nodes[config].update(served)
    data["throughput"] = {"rounds": per_round, "nodes": nodes}


def _isolation(info: dict[str, Any]) -> list[str]:
    return sorted(name for name, layer in info.get("isolation", {}).items()
                  if layer.get("enabled"))


def fleet(cfg: Config) -> list[Unit]:
    data: dict[str, Any] = {}

    def run(res: SuiteResult) -> None:
        from benchmarks.localfleet import LocalFleet, unavailable

        reason = unavailable()
        if reason is not None:
            res.unavailable.append(("*", "fleet", "none", reason))
            return
        try:
            from sandbox.client import Client
        except Exception as exc:  # sandbox not importable: said, not fatal
            res.unavailable.append(("*", "fleet", "none", f"sandbox.client: {exc}"))
            return
        checks = res.extra.setdefault("checks", [])
        fleet = LocalFleet(len(REPLICAS), names=REPLICAS)
        try:
            t0 = time.monotonic()
            fleet.start()
            data["start_s"] = round(time.monotonic() - t0, 2)
        except Exception as exc:
            res.unavailable.append(("*", "fleet", "none", f"the fleet did not start: "
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
            return
        try:
            with contextlib.ExitStack() as stack:
                direct = {node: stack.enter_context(Client(fleet.replicas[node].target,
                                                           timeout=CALL_TIMEOUT_S))
                          for node in REPLICAS}
                balanced = stack.enter_context(Client(fleet.target, timeout=CALL_TIMEOUT_S))
                info = direct[DEPLOYER].info()
                data["isolation"] = _isolation(info)
                data["version"] = info.get("version")
                _propagation(direct, cfg.n(*DEPLOYS), data)
                direct[DEPLOYER].deploy(FUNCTION, ECHO)
                deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
                for node in (FOLLOWER, THIRD):
                    _wait_served(direct[node], FUNCTION, 1, deadline)
                # round_robin picks among connected replicas: have all three before timing
                seen: set[str] = set()
                while seen != set(REPLICAS):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the balanced client reached only {seen}")
                    seen.add(balanced.info()["node"])
                _throughput({BALANCED: balanced, SINGLE: direct[DEPLOYER]},
                            cfg.n(*BLOCK), cfg.n(*ROUNDS), data)
        except Exception as exc:
            res.unavailable.append(("*", "fleet", "none",
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                                    if str(exc) else type(exc).__name__))
            res.notes.append("fleet: " + traceback.format_exc(limit=4))
        finally:
            try:
                statuses = fleet.stop()
                left = ""
            except AssertionError as exc:
                statuses, left = {}, str(exc)
                fleet.kill()
            finally:
                fleet.close()
            checks.append({"check": "every replica exits 0 after SIGTERM, nothing of theirs "
                           "left", "value": left or statuses,
                           "threshold": dict.fromkeys(REPLICAS, 0),
                           "passed": not left and statuses == dict.fromkeys(REPLICAS, 0)})

    def finish(res: SuiteResult) -> None:
        checks = res.extra.setdefault("checks", [])
        found: dict[str, Any] = {"replicas": list(REPLICAS), "deployer": DEPLOYER,
                                 "single": DEPLOYER, "callers": CALLERS,
                                 "isolation": data.get("isolation"),
                                 "start_s": data.get("start_s")}
        prop = data.get("propagation")
        if prop:
            times = prop["times_ns"]
            for key, scenario, method in PROPAGATION_ROWS:
                lat = times[key]
                res.rows.append(summarize(scenario, method, "none", lat, regime=LIGHT))
            every = sorted(x / 1e6 for x in times["served_all"])
            p99 = percentile(every, 99)
            checks.append({"check": "propagation p99, deploy start → served by every other "
                           f"replica ≤ {PROPAGATION_TARGET_MS:g} ms", "value": round(p99, 3),
                           "threshold": PROPAGATION_TARGET_MS,
                           "passed": p99 <= PROPAGATION_TARGET_MS})
            checks.append({"check": "every propagated version, invoked on n2 and n3, returns "
                           "its own value", "value": prop["wrong"] or "all right",
                           "threshold": "all right", "passed": not prop["wrong"]})
            at_ack = sum(1 for m in prop["misses_n2"] if m == 0)
            tenth = max(1, len(every) // 10)
            first = statistics.median(x / 1e6 for x in times["served_all"][:tenth])
            last = statistics.median(x / 1e6 for x in times["served_all"][-tenth:])
            found["propagation"] = {
                "deploys": prop["versions"],
                **{f"{key}_ms": {"p50": round(percentile(sorted(x / 1e6 for x in times[key]),
                                                         50), 3),
                                 "p99": round(percentile(sorted(x / 1e6 for x in times[key]),
                                                         99), 3),
                                 "max": round(max(times[key]) / 1e6, 3)}
                   for key, _, _ in PROPAGATION_ROWS},
                "n2_had_it_at_ack": at_ack,
                "not_found_answers_n2": {"median": statistics.median(prop["misses_n2"]),
                                         "max": max(prop["misses_n2"])},
                "not_found_answers_n3": {"median": statistics.median(prop["misses_n3"]),
                                         "max": max(prop["misses_n3"])},
            }
            res.notes.append(
                "Propagation rows (regime label: light load; what they are): not a call's "
                "latency but the time from a deploy through n1 to n2 (then n3) serving that "
                "version, measured by asking n2 and n3 for it (GetFunction) in a tight loop, "
                f"one deploy at a time on an otherwise idle fleet; {prop['versions']} deploys, "
                f"each a new version of one function (the store holds 1 to "
                f"{prop['versions']} versions as they go: a notification makes a replica "
                f"re-read that function's versions, and fetch only new bundles; median "
                f"deploy start → every other replica in the first tenth {first:.3g} ms, in "
                f"the last {last:.3g} ms). n2 already had the version "
                f"when n1's answer arrived in {at_ack} of {prop['versions']} deploys (the NOTIFY "
                "is sent at commit, before n1 answers); the loop on n2 got NOT_FOUND a median "
                f"{statistics.median(prop['misses_n2']):g} times (max "
                f"{max(prop['misses_n2'])}) before it had it. Target: p99 deploy start → "
                f"served by every other replica ≤ {PROPAGATION_TARGET_MS:g} ms: "
                f"{p99:.3g} ms ({'pass' if p99 <= PROPAGATION_TARGET_MS else 'FAIL'}).")
        tp = data.get("throughput")
        if tp:
            rounds = tp["rounds"]
            rates = {}
            for config in (BALANCED, SINGLE):
                lat = [x for r in rounds[config] for x in r[0]]
                wall = sum(r[1] for r in rounds[config])
                row = summarize(SCENARIO, config, "none", lat, wall_ns=wall, regime=SUSTAINED)
                res.rows.append(row)
                rates[config] = row.throughput_per_s or 0.0
            per_round = [round((len(a[0]) / a[1]) / (len(b[0]) / b[1]), 4)
                         for a, b in zip(rounds[BALANCED], rounds[SINGLE], strict=True)]
            res.ratios.append(Ratio(
                label=f"{SUSTAINED}: calls/s, {CALLERS} callers, 3 replicas (round_robin) ÷ 1 "
                      "replica", ours=f"{BALANCED} calls/s", theirs=f"{SINGLE} calls/s",
                ours_value=rates[BALANCED], theirs_value=rates[SINGLE], unit="/s",
                value=round(rates[BALANCED] / rates[SINGLE], 4), per_round=per_round))
            counts = dict(sorted(tp["nodes"][BALANCED].items()))
            total = sum(counts.values())
            even = total / len(REPLICAS)
            low, high = (1 - SPREAD) * even, (1 + SPREAD) * even
            shares_ok = set(counts) == set(REPLICAS) and all(low <= v <= high
                                                             for v in counts.values())
            checks.append({"check": f"each replica served within ±{SPREAD:.0%} of an even share "
                           "of the balanced calls", "value": counts,
                           "threshold": [round(low, 1), round(high, 1)], "passed": shares_ok})
            single = dict(tp["nodes"][SINGLE])
            checks.append({"check": f"every call through the 1-replica client served by "
                           f"{DEPLOYER}", "value": single, "threshold": {DEPLOYER: "all"},
                           "passed": set(single) == {DEPLOYER}})
            found["throughput"] = {"calls_per_s": rates, "ratio": res.ratios[-1].value,
                                   "per_round": per_round, "per_node": counts,
                                   "single_per_node": single, "block": len(rounds[BALANCED][0][0]),
                                   "rounds": len(rounds[BALANCED])}
            res.notes.append(
                f"{SCENARIO} (sustained): {CALLERS} threads, one `Client` each configuration, "
                f"blocks of {found['throughput']['block']} calls alternating "
                f"({len(per_round)} rounds); 3 replicas ÷ 1 per round "
                + ", ".join(f"{x:.3g}×" for x in per_round)
                + f" (median {statistics.median(per_round):.3g}×). Balanced calls per node: "
                + ", ".join(f"{k} {v}" for k, v in counts.items())
                + f" (even: {even:.1f} each). This machine has "
                f"{_cpus()} CPUs shared by the three replicas, their workers, PostgreSQL and the "
                "callers: a worker birth per call is CPU work, so three replicas here cannot "
                "triple one replica's calls/s; the ratio shows what balancing costs or gains on "
                "one machine, not a fleet of machines.")
        if data.get("isolation") is not None:
            res.notes.append("Replicas at `sandbox serve`'s defaults (`--log-level warning`): "
                             "isolation layers enabled: " + (", ".join(data["isolation"])
                                                             or "none")
                             + f"; the fleet (PostgreSQL + 3 replicas) started in "
                             f"{data.get('start_s')} s.")
        for c in checks:
            res.notes.append(f"check: {c['check']}: {c['value']} → "
                             + ("pass" if c["passed"] else "**FAIL**"))
        res.extra["fleet"] = found

    units = []
    if cfg.only is None or any(m in cfg.only for m in (*METHODS, "fleet")):
        units.append(Unit("fleet: PostgreSQL + 3 replicas: propagation, 3 vs 1 replicas", run))
    units.append(Unit("fleet (summary)", finish))
    return units


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

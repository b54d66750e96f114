"""The `soak` suite: nothing lost under hostile sustained load (not in `all`: it is long).

    python -m benchmarks soak [--quick] [--out DIR]      (full: 20,000 calls; quick: 600)

One embedded `Runtime()` at its defaults (plus a queue bound no caller can reach), one
function, 16 caller threads without pauses. Of the N calls, exactly 10 % are hostile, drawn
from a fixed-seed shuffle that gives every hostile kind the same share; the rest are no-ops
that return their event (which carries the call's index and a nonce):

    kind       what it does                                  limits of the call      expected
    timeout    sleeps forever                                wall_timeout_s=0.1      TIMEOUT
    memory     allocates 1 GiB in 1 MiB chunks               memory_bytes=64 MiB     MEMORY_LIMIT
    crash      os._exit(3) (a signal to itself would not do:  -                      CRASHED
               the worker is pid 1 of its namespace)
    error      raises ValueError("hostile <index>")          -                      FUNCTION_ERROR
    output     returns 10 MB                                 max_result_bytes=1 MiB  OUTPUT_LIMIT
    forkbomb   forks in a loop, ignoring errors              max_processes=16,       TIMEOUT
                                                             wall_timeout_s=1
    stdout     prints 50 MB, returns its event               (max_log_bytes: 1 MiB)  OK, stdout
                                                                                     truncated
    noop       returns its event                             -                       OK

Checked per call: exactly one result (a count per call index), exactly the expected outcome (a
count per kind and outcome; every mismatch listed), a no-op's (and a stdout flood's) result
equals its own event, an error carries its own index (nothing crossed between calls), no
exception escaped `invoke`. The harness keeps its per-call state in arrays allocated before
the first call, so its own memory stays flat.

Flatness: a sampling thread, woken by the callers' progress (every `every` completed calls:
100 in the full run, 200 samples; never by a timer), reads this process's (the supervisor's)
RSS and open fd count (and, as a reading aid, Python's allocated blocks: Python objects kept
alive would grow them, a C heap step would not). Each sample is taken under load, so it
includes what the calls in flight hold (a stdout flood's captured megabyte, a worker's channel
and pidfd): about 0.75 MiB and 8 fds of noise from sample to sample, which is why the samples
are dense. The verdict is
the least-squares slope after a warm-up (the first 10 % of the calls), per 1,000 calls, below
`RSS_SLOPE_MAX_KIB` and `FD_SLOPE_MAX` (one-sided: a leak grows; a negative slope is memory
settling after the warm-up, reported as it is); its standard error is reported beside it.
At the end, after `close()`, no process of the runtime may be left (`SANDBOX_INSTANCE` of this
process in /proc/*/environ, the zygotes, our children).
"""

from __future__ import annotations

import array
import os
import queue
import random
import re
import select
import statistics
import sys
import threading
import time
from typing import Any

from benchmarks.core import SUSTAINED, Row, SuiteResult, percentile, summarize
from benchmarks.suites import Config, Unit

SOURCE = '''
import os, sys, time

def handler(event, context):
    kind = event["kind"]
    if kind == "timeout":
        while True:
            time.sleep(3600)
    if kind == "memory":
        chunks = []
        for _ in range(1024):
            chunks.append(b"x" * 2**20)
        return len(chunks)
    if kind == "crash":
        os._exit(3)
    if kind == "error":
        raise ValueError("hostile %d" % event["i"])
    if kind == "output":
        return b"x" * (10 * 2**20)
    if kind == "forkbomb":
        while True:
            try:
                os.fork()
            except OSError:
                pass
    if kind == "stdout":
        block = "y" * (2**20 - 1) + "\\n"
        for _ in range(50):
            sys.stdout.write(block)
        sys.stdout.flush()
    return event
'''
FUNCTION = "soak"

#: kind -> (expected outcome, the call's limits as Limits keyword arguments, what it does)
KINDS: dict[str, tuple[str, dict[str, Any], str]] = {
    "noop": ("OK", {}, "returns its event"),
    "timeout": ("TIMEOUT", {"wall_timeout_s": 0.1}, "sleeps forever"),
    "memory": ("MEMORY_LIMIT", {"memory_bytes": 64 * 2**20}, "allocates 1 GiB in 1 MiB chunks"),
    "crash": ("CRASHED", {}, "os._exit(3)"),
    "error": ("FUNCTION_ERROR", {}, "raises ValueError"),
    "output": ("OUTPUT_LIMIT", {"max_result_bytes": 2**20}, "returns 10 MB"),
    "forkbomb": ("TIMEOUT", {"max_processes": 16, "wall_timeout_s": 1.0},
                 "forks in a loop, ignoring errors"),
    "stdout": ("OK", {}, "prints 50 MB (stdout truncated), returns its event"),
}  # fmt: skip
HOSTILE = [k for k in KINDS if k != "noop"]
HOSTILE_FRACTION = 0.10
CALLERS = 16
SEED = 20_000
#: calls: (quick, full)
TOTAL = (600, 20_000)
#: the first 10 % of the calls are warm-up: not in the slopes
WARMUP_FRACTION = 0.10
#: Pass thresholds of the slopes after warm-up, per 1,000 calls (one-sided). RSS: 64 KiB per
#: 1,000 calls is 64 bytes per call, less than anything a call could leave behind (its result
#: object and stats alone are several hundred bytes, an invocation id ~80), so a per-call leak
#: of any kind shows above it, and over 20,000 calls it allows 1.25 MiB of drift in all
#: (allocator fragmentation, caches filling); it is ~4 standard errors of the fit over 180
#: samples. fds: the rarest kind of call is ~1.4 % of all, so an fd leaked by one kind is >= 14
#: per 1,000 calls; 1 per 1,000 is far below that, and ~8 standard errors of the fit.
RSS_SLOPE_MAX_KIB = 64.0
FD_SLOPE_MAX = 1.0
#: the most mismatches and escaped exceptions kept as examples (all are counted)
EXAMPLES = 50


def plan(total: int, seed: int = SEED) -> bytearray:
    """The kind of every call, as indices into `KINDS`: exactly 10 % hostile (rounded down),
    the hostile kinds in equal shares (round robin), positions and order shuffled by `seed`."""
    rng = random.Random(seed)
    names = list(KINDS)
    kinds = bytearray(total)  # zeros: "noop"
    n_hostile = int(total * HOSTILE_FRACTION)
    hostile = [names.index(HOSTILE[j % len(HOSTILE)]) for j in range(n_hostile)]
    rng.shuffle(hostile)
    for i, k in zip(sorted(rng.sample(range(total), n_hostile)), hostile, strict=True):
        kinds[i] = k
    return kinds


def nonce(i: int, seed: int = SEED) -> int:
    """A per-call value the no-op must hand back (no storage per call)."""
    return ((i + 1) * 0x9E3779B97F4A7C15 + seed) & (2**62 - 1)


def event_of(i: int, kind: str, seed: int = SEED) -> dict[str, Any]:
    return {"kind": kind, "i": i, "nonce": nonce(i, seed)}


def slope(points: list[tuple[float, float]]) -> dict[str, float | int | None]:
    """Least-squares slope of y on x, its standard error, and the number of points."""
    n = len(points)
    if n < 3:
        return {"value": None, "stderr": None, "n": n}
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return {"value": None, "stderr": None, "n": n}
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    resid = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    se = (resid / (n - 2) / sxx) ** 0.5
    return {"value": b, "stderr": se, "n": n, "intercept": a}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _instance_processes(pid: int) -> list[int]:
    """Live processes whose environment names a runtime started by process `pid`
    (`SANDBOX_INSTANCE=[tag/]<pid>-<hex>`)."""
    mark = re.compile(rb"(?:^|\0)SANDBOX_INSTANCE=(?:[^\0]*/)?%d-[0-9a-f]+(?:\0|$)" % pid)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and mark.search(env):
            found.append(int(name))
    return found


def _left_behind(pids: set[int], grace_s: float = 10.0) -> list[int]:
    """Which of `pids` (plus any process of a runtime of ours) are still alive, after a
    bounded wait on each (its pidfd) for deaths the kernel has under way."""
    deadline = time.monotonic() + grace_s
    left = sorted(set(_instance_processes(os.getpid())) | {p for p in pids if _alive(p)})
    for pid in left:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:  # readable once the process has exited
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
    return sorted(set(_instance_processes(os.getpid())) | {p for p in pids if _alive(p)})


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run(total: int, callers: int = CALLERS, seed: int = SEED, every: int | None = None,
        judge_slopes: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the soak: `total` calls from `callers` threads; return its findings (see
    `to_result` for how they are reported). `every`: completed calls between samples (default
    every 100 calls, and at least ~40 samples)."""
    import psutil

    from sandbox import Limits, Outcome, Runtime

    names = list(KINDS)
    outcomes = [o.value for o in Outcome]
    limits = {k: Limits(**kw) if kw else None for k, (_, kw, _) in KINDS.items()}
    kinds = plan(total, seed)
    every = every or max(1, min(100, total // 40))

    # Per-call state, allocated before the first call (constant memory while the soak runs).
    got = bytearray(b"\xff" * total)  # the outcome's index, 0xfe: an exception, 0xff: none
    answers = bytearray(total)  # results received per call
    right = bytearray(total)  # 1: everything as expected
    lat = array.array("q", bytes(8 * total))
    mismatches: list[dict[str, Any]] = []
    escaped: list[str] = []
    counts = {"mismatches": 0, "escaped": 0, "completed": 0}
    lock = threading.Lock()
    samples: list[dict[str, Any]] = []
    checkpoints: queue.Queue[int | None] = queue.Queue()
    next_call = iter(range(total))

    children_before = {c.pid for c in psutil.Process().children(recursive=True)}
    load_start = os.getloadavg()
    rt = Runtime(max_queue=max(4096, 4 * callers))
    zygotes: set[int] = set()
    t_start = t_end = 0
    try:
        rt.register(FUNCTION, source=SOURCE)
        for pool in rt.info()["pools"].values():
            if pool.get("zygote_pid"):
                zygotes.add(int(pool["zygote_pid"]))

        def sample(calls: int) -> None:
            rss, fds, threads = _rss_bytes(), _fds(), _threads()
            blocks = sys.getallocatedblocks()
            info = rt.info()
            pool = info["pools"].get("default", {})
            samples.append({
                "calls": calls, "rss_bytes": rss, "fds": fds, "threads": threads,
                "py_blocks": blocks,
                "running": info.get("running"), "queued": info.get("queued"),
                "idle_workers": pool.get("idle"),
            })  # fmt: skip
            if pool.get("zygote_pid"):
                zygotes.add(int(pool["zygote_pid"]))

        def sampler() -> None:
            while (calls := checkpoints.get()) is not None:
                sample(calls)

        def check(i: int, kind: str, event: dict[str, Any], res: Any) -> str | None:
            expected = KINDS[kind][0]
            outcome = res.outcome.value
            if outcome != expected:
                err = res.error
                return f"got {outcome}" + (f" ({err.type}: {err.message[:120]})" if err else "")
            if kind in ("noop", "stdout") and res.result != event:
                return f"result {str(res.result)[:120]!r} is not its event"
            if kind == "stdout" and not res.stdout_truncated:
                return f"stdout not truncated ({len(res.stdout)} chars)"
            if kind == "error" and (res.error is None or res.error.type != "ValueError"
                                    or res.error.message != f"hostile {i}"):  # fmt: skip
                return f"error {res.error!r} is not this call's"
            return None

        def caller() -> None:
            while True:
                with lock:
                    i = next(next_call, None)
                if i is None:
                    return
                kind = names[kinds[i]]
                event = event_of(i, kind, seed)
                t0 = time.perf_counter_ns()
                try:
                    if limits[kind] is None:
                        res = rt.invoke(FUNCTION, event)
                    else:
                        res = rt.invoke(FUNCTION, event, limits=limits[kind])
                except Exception as exc:  # nothing may escape: count it, keep going
                    lat[i] = time.perf_counter_ns() - t0
                    with lock:
                        got[i] = 0xFE
                        counts["escaped"] += 1
                        if len(escaped) < EXAMPLES:
                            escaped.append(f"call {i} ({kind}): {type(exc).__name__}: {exc}")
                else:
                    lat[i] = time.perf_counter_ns() - t0
                    problem = check(i, kind, event, res)
                    with lock:
                        answers[i] += 1
                        got[i] = outcomes.index(res.outcome.value)
                        right[i] = problem is None
                        if problem is not None:
                            counts["mismatches"] += 1
                            if len(mismatches) < EXAMPLES:
                                mismatches.append({"call": i, "kind": kind,
                                                   "expected": KINDS[kind][0],
                                                   "problem": problem})  # fmt: skip
                del res  # a stdout flood's megabyte goes now, not at the next call
                with lock:
                    counts["completed"] += 1
                    done = counts["completed"]
                if done % every == 0 or done == total:
                    checkpoints.put(done)

        sample(0)
        sampling = threading.Thread(target=sampler, name="soak-sampler")
        sampling.start()
        threads = [threading.Thread(target=caller, name=f"soak-caller-{k}")
                   for k in range(callers)]  # fmt: skip
        t_start = time.perf_counter_ns()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_end = time.perf_counter_ns()
        checkpoints.put(None)
        sampling.join()
        for pool in rt.info()["pools"].values():
            if pool.get("zygote_pid"):
                zygotes.add(int(pool["zygote_pid"]))
    finally:
        rt.close()
    ours_now = {c.pid for c in psutil.Process().children(recursive=True)} - children_before
    left = _left_behind(zygotes | ours_now)

    wall_s = (t_end - t_start) / 1e9
    by_kind: dict[str, Any] = {}
    for k, kind in enumerate(names):
        idx = [i for i in range(total) if kinds[i] == k]
        outs: dict[str, int] = {}
        for i in idx:
            name = ("EXCEPTION" if got[i] == 0xFE else "NONE" if got[i] == 0xFF
                    else outcomes[got[i]])  # fmt: skip
            outs[name] = outs.get(name, 0) + 1
        ms = sorted(lat[i] / 1e6 for i in idx)
        by_kind[kind] = {
            "expected": KINDS[kind][0], "does": KINDS[kind][2],
            "limits": KINDS[kind][1], "calls": len(idx), "outcomes": outs,
            "right": sum(right[i] for i in idx),
            "p50_ms": round(percentile(ms, 50), 4), "p99_ms": round(percentile(ms, 99), 4),
        }  # fmt: skip
    warmup = int(total * WARMUP_FRACTION)
    after = [s for s in samples if s["calls"] >= max(1, warmup)]
    rss = slope([(s["calls"] / 1000, s["rss_bytes"] / 1024) for s in after])
    fds = slope([(s["calls"] / 1000, s["fds"]) for s in after])
    blocks = slope([(s["calls"] / 1000, s["py_blocks"]) for s in after])
    answered_once = sum(1 for a in answers if a == 1)
    findings: dict[str, Any] = {
        "total": total, "callers": callers, "seed": seed, "every": every,
        "hostile_fraction": HOSTILE_FRACTION, "hostile": sum(1 for k in kinds if k),
        "wall_s": round(wall_s, 3), "calls_per_s": round(total / wall_s, 2) if wall_s else None,
        "answered_once": answered_once,
        "lost": sum(1 for i in range(total) if answers[i] == 0 and got[i] != 0xFE),
        "answered_twice": sum(1 for a in answers if a > 1),
        "right": sum(right), "mismatches": counts["mismatches"],
        "mismatch_examples": mismatches, "escaped": counts["escaped"],
        "escaped_examples": escaped,
        "noops_equal_event": sum(right[i] for i in range(total) if kinds[i] == 0),
        "kinds": by_kind, "samples": samples, "warmup_calls": warmup,
        "slopes": {"rss_kib_per_1k_calls": rss, "fds_per_1k_calls": fds,
                   "py_blocks_per_1k_calls": blocks},
        "tenths": tenths(samples, total),
        "loadavg": {"start": [round(x, 2) for x in load_start],
                    "end": [round(x, 2) for x in os.getloadavg()]},
        "thresholds": {"rss_kib_per_1k_calls": RSS_SLOPE_MAX_KIB,
                       "fds_per_1k_calls": FD_SLOPE_MAX},
        "judge_slopes": judge_slopes, "left_behind": left,
    }  # fmt: skip
    findings["checks"] = checks(findings)
    # the calls as the callers timed them (not part of the JSON: the rows summarize them)
    findings["latencies_ms"] = {
        kind: sorted(lat[i] / 1e6 for i in range(total) if kinds[i] == k)
        for k, kind in enumerate(names)
    }
    return findings


def tenths(samples: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """Per tenth of the run (by calls completed): the floor (minimum) and median of RSS, fds
    and Python's allocated blocks. Not judged: a reading aid. A leak raises the floor tenth
    after tenth; what calls in flight hold only moves the median and the maximum."""
    out = []
    for k in range(10):
        lo, hi = total * k // 10, total * (k + 1) // 10
        window = [s for s in samples if lo < s["calls"] <= hi]
        if not window:
            continue
        row: dict[str, Any] = {"calls": [lo, hi], "samples": len(window)}
        for key in ("rss_bytes", "fds", "py_blocks"):
            values = [s[key] for s in window if s.get(key) is not None]
            if values:
                row[key] = {"min": min(values), "median": statistics.median(values)}
        out.append(row)
    return out


def checks(f: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdicts: (check, value, threshold, passed); slopes judged only when asked (a
    quick run has too few samples: passed None)."""
    total = f["total"]
    out = [
        {"check": "every call answered exactly once",
         "value": f"{f['answered_once']:,} of {total:,} (lost {f['lost']}, twice "
                  f"{f['answered_twice']})",
         "threshold": "all", "passed": f["answered_once"] == total},
        {"check": "every outcome as expected",
         "value": f"{f['right']:,} of {total:,} ({f['mismatches']} mismatches)",
         "threshold": "all", "passed": f["right"] == total},
        {"check": "no-op results equal their own event",
         "value": f"{f['noops_equal_event']:,} of {f['kinds']['noop']['calls']:,}",
         "threshold": "all",
         "passed": f["noops_equal_event"] == f["kinds"]["noop"]["calls"]},
        {"check": "exceptions escaped invoke", "value": str(f["escaped"]), "threshold": "0",
         "passed": f["escaped"] == 0},
        {"check": "processes of the runtime left after close",
         "value": str(len(f["left_behind"])), "threshold": "0",
         "passed": not f["left_behind"]},
    ]  # fmt: skip
    for key, label, unit in (
        ("rss_kib_per_1k_calls", "supervisor RSS slope after warm-up", "KiB / 1k calls"),
        ("fds_per_1k_calls", "supervisor open fds slope after warm-up", "fds / 1k calls"),
    ):
        s, limit = f["slopes"][key], f["thresholds"][key]
        if s["value"] is None:
            value, passed = f"— ({s['n']} samples)", None
        else:
            value = f"{s['value']:.3g} ± {s['stderr']:.2g} {unit} ({s['n']} samples)"
            passed = s["value"] < limit if f["judge_slopes"] else None
        out.append({"check": label, "value": value, "threshold": f"< {limit:g}",
                    "passed": passed})  # fmt: skip
    return out


def _verdict(passed: bool | None) -> str:
    return "pass" if passed else "not judged (quick run)" if passed is None else "FAIL"


def to_result(res: SuiteResult, f: dict[str, Any]) -> None:
    """Rows (per kind of call; one for all with calls/s), notes and the findings (JSON)."""
    scenario = f"soak-{f['callers']}-callers"
    for kind, ms in f["latencies_ms"].items():
        if ms:
            res.rows.append(summarize(scenario, kind, "none", [int(x * 1e6) for x in ms],
                                      regime=SUSTAINED))  # fmt: skip
    all_ms = sorted(x for ms in f["latencies_ms"].values() for x in ms)
    res.rows.append(Row(
        scenario=scenario, method="all calls", preload="none", n=len(all_ms),
        p50_ms=round(percentile(all_ms, 50), 4), p99_ms=round(percentile(all_ms, 99), 4),
        mean_ms=round(statistics.fmean(all_ms), 4) if all_ms else 0.0,
        throughput_per_s=f["calls_per_s"], regime=SUSTAINED,
    ))  # fmt: skip
    for c in f["checks"]:
        if c["passed"] is False:
            res.notes.append(f"FAILED: {c['check']}: {c['value']} (threshold {c['threshold']})")
    for m in f["mismatch_examples"]:
        res.notes.append(f"mismatch: call {m['call']} ({m['kind']}, expected {m['expected']}):"
                         f" {m['problem']}")  # fmt: skip
    for e in f["escaped_examples"]:
        res.notes.append(f"escaped: {e}")
    if f["left_behind"]:
        res.notes.append(f"left behind after close: pids {f['left_behind']}")
    findings = {k: v for k, v in f.items() if k != "latencies_ms"}
    res.extra["soak"] = findings
    res.extra["checks"] = f["checks"]


def soak(cfg: Config) -> list[Unit]:
    total = cfg.n(*TOTAL)

    def go(res: SuiteResult) -> None:
        to_result(res, run(total, judge_slopes=not cfg.quick))

    return [Unit(f"soak {total:,} calls, {CALLERS} callers, 10 % hostile", go)]

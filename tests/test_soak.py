"""Smoke test of the soak suite (benchmarks/soak.py) with tiny numbers: its structure, and the
behaviour it checks (every call answered exactly once with exactly its expected outcome,
no-ops get their own event back, nothing escapes, nothing left behind). The slopes are not
asserted: 200 calls give too few samples to judge memory or fd growth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report, soak
from benchmarks.core import SUSTAINED, SuiteResult

TOTAL = 200


@pytest.fixture(scope="module")
def findings() -> dict[str, Any]:
    return soak.run(TOTAL, every=10, judge_slopes=False)


def test_plan_is_fixed_and_fair() -> None:
    """Exactly 10 % hostile, every hostile kind in equal share (within one), the same plan for
    the same seed and a different one for another."""
    kinds = soak.plan(20_000)
    names = list(soak.KINDS)
    counts = {name: kinds.count(k) for k, name in enumerate(names)}
    assert counts["noop"] == 18_000 and sum(counts.values()) == 20_000
    hostile = [counts[k] for k in soak.HOSTILE]
    assert max(hostile) - min(hostile) <= 1
    assert soak.plan(600) == soak.plan(600) != soak.plan(600, seed=1)
    small = soak.plan(TOTAL)
    assert all(small.count(names.index(k)) >= 2 for k in soak.HOSTILE)


def test_slope() -> None:
    line = soak.slope([(x, 3.0 + 2.5 * x) for x in range(10)])
    assert line["value"] == pytest.approx(2.5) and line["stderr"] == pytest.approx(0, abs=1e-9)
    assert soak.slope([(1, 1), (2, 2)])["value"] is None


def test_nothing_lost_every_outcome_right(findings: dict[str, Any]) -> None:
    f = findings
    assert f["total"] == TOTAL and f["hostile"] == TOTAL // 10
    assert f["answered_once"] == TOTAL and f["lost"] == 0 and f["answered_twice"] == 0
    assert f["mismatches"] == 0, f["mismatch_examples"]
    assert f["escaped"] == 0, f["escaped_examples"]
    assert f["right"] == TOTAL
    assert f["noops_equal_event"] == f["kinds"]["noop"]["calls"]
    for kind, k in f["kinds"].items():
        assert k["outcomes"] == {k["expected"]: k["calls"]}, kind
        assert k["right"] == k["calls"] >= 1
    assert f["left_behind"] == []
    assert [c["passed"] for c in f["checks"]][:5] == [True] * 5
    assert all(c["passed"] is None for c in f["checks"][5:])  # slopes: not judged


def test_sampled_by_progress(findings: dict[str, Any]) -> None:
    """A sample before the first call, then one every `every` completed calls up to the last;
    both slopes computed (not judged) over the samples after the warm-up."""
    calls = [s["calls"] for s in findings["samples"]]
    assert calls == list(range(0, TOTAL + 1, findings["every"]))
    assert all(s["rss_bytes"] > 0 and s["fds"] > 0 and s["py_blocks"] > 0
               for s in findings["samples"])  # fmt: skip
    tenths = findings["tenths"]
    assert [t["calls"] for t in tenths] == [[TOTAL * k // 10, TOTAL * (k + 1) // 10]
                                            for k in range(10)]  # fmt: skip
    assert sum(t["samples"] for t in tenths) == len(calls) - 1  # all but the one before call 0
    assert all(t["rss_bytes"]["min"] <= t["rss_bytes"]["median"] for t in tenths)
    for key in ("rss_kib_per_1k_calls", "fds_per_1k_calls"):
        s = findings["slopes"][key]
        assert s["value"] is not None and s["n"] == sum(
            1 for c in calls if c >= findings["warmup_calls"]
        )


def test_report(findings: dict[str, Any], tmp_path: Path) -> None:
    """The suite's files: rows per kind (sustained) and one for all calls with calls/s; the
    verdict and outcome tables; the plot."""
    res = SuiteResult("soak")
    soak.to_result(res, dict(findings))
    paths = report.write(res, {"cpu_count": 2}, tmp_path)
    data = json.loads(paths[0].read_text())
    methods = {r["method"]: r for r in data["results"]}
    assert set(methods) == {*soak.KINDS, "all calls"}
    assert all(r["regime"] == SUSTAINED for r in data["results"])
    assert methods["all calls"]["n"] == TOTAL and methods["all calls"]["throughput_per_s"] > 0
    assert data["soak"]["checks"] == data["checks"]
    md = paths[1].read_text()
    assert "## Verdict" in md and "### Outcomes per kind of call" in md
    assert "| every outcome as expected | 200 of 200 (0 mismatches) | all | pass |" in md
    assert "| forkbomb |" in md and "not judged" in md
    assert "### Per tenth of the run" in md and "Load average" not in md  # no machine given
    assert paths[2].read_bytes()[:4] == b"\x89PNG"

"""Smoke test of the benchmark harness: `python -m benchmarks all --quick` produces, for every
suite, a well-formed JSON (the schema in benchmarks/report.py), a markdown table and a PNG, and
leaves no process behind. Speeds are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli, report
from benchmarks.core import METHODS, Row, load_methods, summarize

REPO = Path(__file__).resolve().parent.parent

PEERS = {
    "subprocess-fresh", "mp-spawn", "mp-forkserver", "mp-fork", "ppe-warm", "pebble-warm",
    "grpc-echo", "grpc-echo-stream",
}  # fmt: skip
OURS = {
    "sandbox-fork",
    "sandbox-prefork",
    "sandbox-reuse",
    "sandbox-grpc-unary",
    "sandbox-grpc-stream",
}
RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "scenario": (str,),
    "method": (str,),
    "preload": (str,),
    "n": (int,),
    "p50_ms": (float, int),
    "p99_ms": (float, int),
    "mean_ms": (float, int),
    "throughput_per_s": (float, int, type(None)),
    "uss_bytes": (int, type(None)),
}


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--out", str(out), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return out, proc


def test_method_table_has_the_issue_names() -> None:
    load_methods()
    assert set(METHODS) >= PEERS | OURS


def test_percentiles() -> None:
    row = summarize("s", "m", "none", [i * 1_000_000 for i in range(1, 101)], wall_ns=10**9)
    assert isinstance(row, Row)
    assert (row.n, row.p50_ms, row.p99_ms, row.mean_ms) == (100, 50.0, 99.0, 50.5)
    assert row.throughput_per_s == 100.0


def test_quick_run_writes_every_suite(
    quick_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leftover processes" not in proc.stderr
    for suite in cli.SUITE_NAMES:
        data = json.loads((out / f"{suite}.json").read_text())
        assert data["suite"] == suite
        machine = data["machine"]
        for key in ("cpu_count", "cpu_model", "python", "kernel", "packages"):
            assert key in machine
        assert isinstance(data["results"], list)
        for row in data["results"]:
            for key, types in RESULT_TYPES.items():
                assert isinstance(row[key], types), (suite, key, row)
            assert row["n"] >= 1
            assert row["p99_ms"] >= row["p50_ms"] >= 0
        for item in data["unavailable"]:
            assert set(item) == {"scenario", "method", "preload", "reason"}
        md = (out / f"{suite}.md").read_text()
        assert "| scenario | method | preload |" in md and "|---|" in md
        assert md.count("\n| ") >= 2 + len(data["results"]) - 1
        png = (out / f"{suite}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_peers_measured(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Every peer runs (they need nothing of ours); our methods may still be unavailable."""
    out, _ = quick_run
    data = json.loads((out / "coldstart.json").read_text())
    measured = {(r["method"], r["preload"]) for r in data["results"]}
    for peer in PEERS:
        preloads = ["none"] if peer.startswith("grpc") else ["none", "stdlib", "heavy"]
        for preload in preloads:
            assert (peer, preload) in measured, data["unavailable"]
    for suite, methods in {
        "latency": {"ppe-warm", "pebble-warm", "grpc-echo", "grpc-echo-stream"},
        "throughput": {"grpc-echo", "grpc-echo-stream"},
        "timeouts": {"pebble-warm"},
        "memory": {"ppe-warm", "mp-fork"},
        "paper": {"subprocess-fresh", "zygote-fork"},
    }.items():
        rows = json.loads((out / f"{suite}.json").read_text())["results"]
        assert methods <= {r["method"] for r in rows}, suite
    memory = json.loads((out / "memory.json").read_text())["results"]
    assert all(r["uss_bytes"] and r["uss_bytes"] > 0 for r in memory)


def test_markdown_ratio_against_baseline() -> None:
    from benchmarks.core import SuiteResult

    res = SuiteResult("latency")
    res.rows = [
        summarize("back-to-back", "ppe-warm", "none", [2_000_000]),
        summarize("back-to-back", "grpc-echo", "none", [1_000_000]),
    ]
    md = report.to_markdown(res, {"cpu_count": 2})
    assert "| 0.5× |" in md and "p50 / ppe-warm" in md


def test_ours_measured(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Our methods run in every suite that uses them, gRPC reuse rows included."""
    out, _ = quick_run
    for suite, wanted in {
        "coldstart": {"sandbox-fork", "sandbox-prefork", "sandbox-reuse", "sandbox-grpc-unary"},
        "latency": {"sandbox-prefork", "sandbox-reuse", "sandbox-grpc-unary-reuse"},
        "timeouts": {"sandbox-prefork", "sandbox-fork", "sandbox-reuse"},
        "memory": {"sandbox-prefork"},
        "paper": {"sandbox-fork", "sandbox-prefork"},
    }.items():
        data = json.loads((out / f"{suite}.json").read_text())
        assert wanted <= {r["method"] for r in data["results"]}, (suite, data["unavailable"])
    throughput = json.loads((out / "throughput.json").read_text())
    measured = {(r["method"], r["scenario"].split()[0]) for r in throughput["results"]}
    for name in ("sandbox-grpc-unary", "sandbox-grpc-stream"):
        assert {(name, "isolated"), (name, "reuse")} <= measured, throughput["unavailable"]
    memory = json.loads((out / "memory.json").read_text())["results"]
    scenarios = {r["scenario"] for r in memory if r["method"] == "sandbox-prefork"}
    assert {"idle-worker", "idle-worker-gc-freeze"} <= scenarios


def test_headline_ratios(tmp_path: Path) -> None:
    from benchmarks import headline

    def rows(*items: tuple[str, str, str, float]) -> dict[str, object]:
        return {"results": [
            {"scenario": s, "method": m, "preload": p, "p50_ms": v, "throughput_per_s": None}
            for s, m, p, v in items
        ]}  # fmt: skip

    (tmp_path / "latency.json").write_text(json.dumps(rows(
        ("back-to-back", "ppe-warm", "none", 0.2), ("back-to-back", "sandbox-prefork", "none", 0.4),
    )))  # fmt: skip
    (tmp_path / "timeouts.json").write_text(json.dumps(rows(
        ("deadline-to-outcome", "pebble-warm", "none", 100.0),
        ("deadline-to-outcome", "sandbox-prefork", "none", 4.0),
    )))  # fmt: skip
    text = headline.to_markdown(tmp_path)
    assert "| 0.4 ms | 0.2 ms | 2× | ≤ 1×: missed by 2.00× |" in text
    assert "| 4 ms | 100 ms | 0.04× | < 10 ms: met |" in text

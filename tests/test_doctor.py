"""`sandbox doctor`: the report a runtime uses, as a table or one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sandbox import Runtime

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"mount_ns", "pid_ns", "net_ns", "ipc_ns", "uts_ns", "filesystem", "credentials",
          "landlock", "seccomp", "cgroup_memory", "cgroup_pids", "cgroup_cpu"}


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_doctor_json_matches_the_runtime_report() -> None:
    proc = doctor("--json")
    data = json.loads(proc.stdout)
    assert set(data["layers"]) >= LAYERS
    for name, layer in data["layers"].items():
        assert set(layer) == {"available", "enabled", "reason"}, name
        if not layer["available"]:
            assert layer["reason"], f"{name} is unavailable without a reason"
    # exit status says whether strict mode would start
    assert proc.returncode == (0 if data["strict_ready"] else 1)
    assert data["missing"] == sorted(
        n for n, layer in data["layers"].items()
        if not layer["available"] and not (n == "user_ns" and data["root"]))
    with Runtime(isolation="best-effort", min_idle=0) as rt:
        runtime_layers = rt.info()["isolation"]["layers"]
    assert {n: v["available"] for n, v in runtime_layers.items()} == \
        {n: v["available"] for n, v in data["layers"].items()}


def test_doctor_table() -> None:
    proc = doctor()
    assert proc.returncode in (0, 1)
    assert "layer" in proc.stdout and "seccomp" in proc.stdout
    assert ("strict mode: every layer is available" in proc.stdout) == (proc.returncode == 0)


def test_strict_refuses_what_the_kernel_lacks_and_best_effort_reports_it() -> None:
    """Strict mode with a layer the machine cannot give is a start-up error, not a silent
    downgrade; best-effort starts and says so."""
    import pytest

    from sandbox import IsolationUnavailable
    from sandbox.isolation import IsolationConfig

    # A private tmpfs cannot be mounted on a directory that does not exist: the filesystem
    # layer is really unavailable with this config, on any machine.
    impossible = IsolationConfig(mode="strict", tmp_dir="/nonexistent-sandbox-test-dir")
    with pytest.raises(IsolationUnavailable, match="filesystem"):
        Runtime(isolation=impossible, min_idle=0)
    lenient = IsolationConfig(mode="best-effort", tmp_dir="/nonexistent-sandbox-test-dir")
    with Runtime(isolation=lenient, min_idle=0) as rt:
        layer = rt.info()["isolation"]["layers"]["filesystem"]
        assert layer["available"] is False and layer["enabled"] is False and layer["reason"]
        rt.register("ok", source="def handler(e, c):\n    return 1\n")
        assert rt.invoke("ok").result == 1

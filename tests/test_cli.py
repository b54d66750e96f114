"""`sandbox run`, as a user runs it: a real subprocess, JSON on stdout, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "hello.py"


def sandbox(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True,
                          text=True, timeout=120, input=stdin, cwd=ROOT)


def test_run_ok_prints_one_json_object() -> None:
    proc = sandbox("run", f"{HELLO}:handler", "--event", '{"name": "tests"}')
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["outcome"] == "OK"
    assert out["result"]["greeting"] == "Hello, tests!"
    assert out["error"] is None
    assert "hello from" in out["stdout"]
    assert {"queue_s", "startup_s", "run_s", "cpu_s", "peak_memory_bytes"} <= set(out["stats"])


def test_run_failure_exits_1_with_error(tmp_path: Path) -> None:
    fn = tmp_path / "fail.py"
    fn.write_text("def handler(e, c):\n    raise ValueError('nope')\n")
    proc = sandbox("run", f"{fn}:handler")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["outcome"] == "FUNCTION_ERROR"
    assert out["error"]["type"] == "ValueError" and "nope" in out["error"]["traceback"]


def test_run_timeout_memory_cpu_flags(tmp_path: Path) -> None:
    fn = tmp_path / "spin.py"
    fn.write_text("def handler(e, c):\n    while True:\n        pass\n")
    proc = sandbox("run", f"{fn}:handler", "--timeout", "0.3", "--memory", "256MiB")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["outcome"] == "TIMEOUT"
    proc = sandbox("run", f"{fn}:handler", "--cpu", "0.3", "--timeout", "30")
    assert json.loads(proc.stdout)["outcome"] == "CPU_LIMIT"


def test_run_preload_and_event_from_stdin(tmp_path: Path) -> None:
    fn = tmp_path / "pre.py"
    fn.write_text("import sys\ndef handler(e, c):\n    return ['decimal' in sys.modules, e]\n")
    proc = sandbox("run", f"{fn}:handler", "--preload", "decimal,json", "--event", "-",
                   stdin="[1, 2]")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"] == [True, [1, 2]]


def test_bytes_results_are_base64(tmp_path: Path) -> None:
    fn = tmp_path / "b.py"
    fn.write_text("def handler(e, c):\n    return b'\\x00\\x01'\n")
    out = json.loads(sandbox("run", f"{fn}:handler").stdout)
    assert out["result"] == {"$base64": "AAE="}


@pytest.mark.parametrize(("args", "names"), [
    (["run", "nope.py:handler"], "PATH.py:FUNCTION"),
    (["run", "examples/hello.py"], "PATH.py:FUNCTION"),
    (["run", "examples/hello.py:handler", "--timeout", "soon"], "--timeout"),
    (["run", "examples/hello.py:handler", "--timeout", "-1"], "--timeout"),
    (["run", "examples/hello.py:handler", "--memory", "lots"], "--memory"),
    (["run", "examples/hello.py:handler", "--memory", "1K"], "memory_bytes"),
    (["run", "examples/hello.py:handler", "--cpu", "nan"], "--cpu"),
    (["run", "examples/hello.py:handler", "--event", "{oops"], "--event"),
    (["run", "examples/hello.py:handler", "--preload", "no such"], "--preload"),
    (["run", "examples/hello.py:handler", "--preload", "no_such_module_xyz"],
     "no_such_module_xyz"),
])
def test_bad_arguments_one_line_no_traceback(args: list[str], names: str) -> None:
    proc = sandbox(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert names in lines[0] and "Traceback" not in proc.stderr


def test_run_flags_are_the_limits_even_above_the_defaults(tmp_path: Path) -> None:
    """`--timeout` above the 30 s default and `--memory` above the 512 MiB default are what the
    function gets (the user is the operator here), not silently cut to the defaults."""
    fn = tmp_path / "limits.py"
    fn.write_text("def handler(e, c):\n"
                  "    return [c.limits['wall_timeout_s'], c.limits['memory_bytes'],\n"
                  "            c.limits['cpu_time_s']]\n")
    proc = sandbox("run", f"{fn}:handler", "--timeout", "45", "--memory", "2GiB", "--cpu", "40")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"] == [45.0, 2 * 2**30, 40.0]
    proc = sandbox("run", f"{fn}:handler", "--timeout", "2", "--memory", "64MiB")
    assert json.loads(proc.stdout)["result"][:2] == [2.0, 64 * 2**20]

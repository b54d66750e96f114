"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_is_two_commands() -> None:
    section = README.split("## Quickstart", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("sandbox serve")
    assert "pytest" in commands[1]


def test_embedded_example_runs() -> None:
    section = README.split("## Embedded use", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    proc = subprocess.run([sys.executable, "-c", code.group(1)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Hello, you!" in proc.stdout
    assert proc.stdout.strip().splitlines()[-3:] == ["3", "2", "1"]


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, lang: str = "") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_metrics_example_runs() -> None:
    (code,) = _blocks(_section("Metrics, logs, traces"), "python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3.0", "3"]


def test_async_example_runs() -> None:
    (code,) = _blocks(_section("Asynchronous invocations"), "python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["QUEUED", "SUCCEEDED 3", "DEAD_LETTERED 3"]


def test_security_commands_work(tmp_path: Path) -> None:
    """The certificate, token, serve, deploy and invoke commands of "Security of the API", as
    written (on a free loopback port instead of 0.0.0.0:50051, a state dir of the test's)."""
    import os
    import shutil
    import socket

    from grpc_conftest import wait_gone

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    section = _section("Security of the API")
    certs = next(b for b in _blocks(section) if "openssl req -x509" in b)
    tokens = next(b for b in _blocks(section) if "sandbox serve --listen 0.0.0.0" in b)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tokens = tokens.replace("0.0.0.0:50051", f"127.0.0.1:{port}").replace(
        "localhost:50051", f"localhost:{port}")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SANDBOX_STATE_DIR": str(tmp_path / "state")}
    env.pop("SANDBOX_TOKEN", None)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    subprocess.run(["bash", "-euo", "pipefail", "-c", certs], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=60)
    lines = tokens.strip().splitlines()
    serve = next(i for i, line in enumerate(lines) if line.startswith("sandbox serve"))
    setup, clients = "\n".join(lines[:serve]), "\n".join(lines[serve + 1:])
    script = f"{setup}\necho \"$TOKEN\" > token.txt\n"
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                   check=True, timeout=60)
    server = subprocess.Popen(["bash", "-c", f"exec {lines[serve]}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        assert "listening on" in server.stdout.readline()
        token = (tmp_path / "token.txt").read_text().strip()
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", f"TOKEN={token}\n{clients}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert '"greeting": "Hello, tls!"' in out.stdout
        refused = subprocess.run(
            ["bash", "-c", clients.splitlines()[-1].replace("SANDBOX_TOKEN=$TOKEN ", "")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
    finally:
        import psutil

        below = psutil.Process(server.pid).children(recursive=True)
        server.terminate()
        server.wait(60)
        assert server.stdout is not None
        server.stdout.close()
        assert not wait_gone(below)

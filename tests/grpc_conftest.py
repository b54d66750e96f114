"""A real ``sandbox serve`` in a subprocess on an ephemeral loopback port, for the gRPC tests.

:class:`ServerProcess` starts ``python -m sandbox.remote_cli serve --listen 127.0.0.1:0`` and
reads the port from its first line of output (``--listen unix:PATH`` in ``args`` makes the
target that socket; ``--metrics-listen`` in ``args`` makes it read the metrics URL from the
second line); :meth:`ServerProcess.stop` sends SIGTERM, waits for the drain, keeps the rest of
the server's stdout in ``stdout_rest`` and checks that nothing the server started is still
alive. ``stderr``: a file for the server's logs (default: the test's own stderr).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
#: Deadlock guards only: the server is ready in about a second, a drain takes the grace.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


class ServerProcess:
    """One ``sandbox serve`` subprocess."""

    def __init__(self, state_dir: Path, *args: str, grace_s: float = 5.0,
                 stderr: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.stdout_rest = ""
        cmd = [sys.executable, "-m", "sandbox.remote_cli", "serve", "--listen", "127.0.0.1:0",
               "--state-dir", str(state_dir), "--grace", str(grace_s), "--log-level",
               "warning", *args]
        self._stderr = open(stderr, "w") if stderr is not None else None  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        listening = self._read_line("listening on ").rsplit(" ", 1)[1]
        if listening.startswith("unix:"):
            self.port, self.target = 0, listening
        else:
            self.port = int(listening.rsplit(":", 1)[1])
            self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = (self._read_line("metrics on ").rsplit(" ", 1)[1]
                            if "--metrics-listen" in args else None)
        self.psutil = psutil.Process(self.proc.pid)

    def _read_line(self, expected: str) -> str:
        assert self.proc.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not line or expected not in line[0]:
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}, exit {self.proc.poll()}")
        return line[0].strip()

    def descendants(self) -> list[psutil.Process]:
        """Live (non-zombie) processes below the server."""
        try:
            procs = self.psutil.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        return out

    def terminate(self) -> None:
        """Send SIGTERM (the drain starts)."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM, wait for the exit; returns the exit status. Raises if anything the server
        started outlives it."""
        below = self.descendants()
        if self.proc.poll() is None:
            self.terminate()
        try:
            status = self.wait()
            if self.proc.stdout is not None:
                self.stdout_rest = self.proc.stdout.read()
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            if self._stderr is not None:
                self._stderr.close()
        alive = wait_gone(below)
        if alive:
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            raise AssertionError(f"left running after the server stopped: {alive}")
        return status

    def kill(self) -> None:
        """Last resort: SIGKILL the server and everything below it."""
        below = self.descendants()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        for p in below:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self._stderr is not None:
            self._stderr.close()


def wait_gone(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """Wait (bounded) for processes to exit; returns those still alive (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = []
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except psutil.NoSuchProcess:
            continue
        except psutil.TimeoutExpired:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
    return alive

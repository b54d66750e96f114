"""A real PostgreSQL server for the tests: Debian's package, a temporary cluster, loopback TCP.

:class:`Postgres` runs ``initdb`` and ``postgres`` from the installed server (the
``postgresql`` package puts them under ``/usr/lib/postgresql/<major>/bin``) in a temporary
directory. PostgreSQL refuses to run as root, so as root the cluster belongs to an ordinary
user (``postgres`` from the package, else ``sandbox-ci``, else ``nobody``) and both programs run
as that user (``subprocess``'s ``user=``/``group=``: no intermediate process between us and the
server, so signals reach it). Readiness is read from the server's own log line, never
polled with sleeps. :meth:`Postgres.database` makes a fresh database per test, so tests never
see each other's rows; :meth:`Postgres.stop` and :meth:`Postgres.start` take the server down
and bring it back on the same port, for the tests of what a fleet does while its database is
away (such a test starts a server of its own, ``with Postgres() as pg:``: the session's shared
one is never stopped).

:func:`unavailable` says why no server can be started here (the tests skip with that
reason), or ``None``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

#: Deadlock guards only: initdb takes about two seconds here, a start well under one.
INITDB_TIMEOUT_S = 120.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
READY_LINE = "database system is ready to accept connections"


def bindir() -> Path | None:
    """The newest installed PostgreSQL server's ``bin`` directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).resolve().parent if on_path else None


def _server_user() -> str | None:
    """As root: the ordinary user the cluster runs as. Not root: None (ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "sandbox-ci", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return None


def unavailable() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None."""
    if bindir() is None:
        return ("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run "
                "installs it)")
    if os.geteuid() == 0 and _server_user() is None:
        return "PostgreSQL refuses root, and there is no ordinary user to run it as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary,pool]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """One temporary PostgreSQL cluster on ``127.0.0.1:port``; superuser ``sandbox``, trust
    authentication on loopback only."""

    def __init__(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        self.bin = bindir()
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="sandbox-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.sockets.mkdir()
        self.log_path = self.root / "server.log"
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._log_file = None
        try:
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "sandbox",
                       "--auth=trust", "--encoding=UTF8", "--no-sync", "-N"],
                      timeout=INITDB_TIMEOUT_S)
            self.start()
        except BaseException:
            self.close()
            raise

    def _as_user(self) -> dict[str, object]:
        """``subprocess`` arguments that run a program as the cluster's user."""
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
                "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
                        "HOME": str(self.root)}}

    def _run(self, argv: list[str], timeout: float) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, check=False, **self._as_user())  # type: ignore[call-overload]
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")

    @property
    def dsn(self) -> str:
        """The superuser's connection string to the ``postgres`` database."""
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://sandbox@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the server (on the port it had before, if it ran before) and wait until it
        says it accepts connections."""
        assert self.proc is None, "already running"
        for attempt in range(5):
            port = self.port or _free_port()
            argv = [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1",
                    "-p", str(port), "-k", str(self.sockets), "-c", "fsync=off",
                    "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    "-c", "max_connections=200", "-c", "logging_collector=off",
                    # no background worker may come and go mid-test (the leftover guard)
                    "-c", "autovacuum=off"]
            proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,  # type: ignore[call-overload]
                                    stdin=subprocess.DEVNULL, cwd=self.root,
                                    start_new_session=True, **self._as_user())
            if self._wait_ready(proc):
                self.proc, self.port = proc, port
                return
            if not self.port or attempt == 4:
                break
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self.log()[-3000:]}")

    def _wait_ready(self, proc: subprocess.Popen[str]) -> bool:
        """Copy the server's stderr to the log file until it is ready (True) or gone."""
        assert proc.stderr is not None
        ready = threading.Event()
        stream = proc.stderr

        def pump() -> None:
            with open(self.log_path, "a") as log:
                for line in stream:
                    log.write(line)
                    log.flush()
                    if READY_LINE in line:
                        ready.set()

        threading.Thread(target=pump, daemon=True, name="postgres-log").start()
        if ready.wait(START_TIMEOUT_S) and proc.poll() is None:
            return True
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(STOP_TIMEOUT_S)
        return False

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected); returns once the server has exited."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def database(self, prefix: str = "t") -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

"""A fleet on one machine: a temporary PostgreSQL and N ``sandbox serve`` replicas sharing it.

Used by the ``fleet`` benchmark suite (benchmarks/fleet.py), by ``examples/fleet.py`` and by the
tests (tests/postgres.py re-exports :class:`Postgres`); it lives in the installed package so
all three can import it (``pip install -e .`` installs ``benchmarks`` beside ``sandbox``).

:class:`Postgres` runs ``initdb`` and ``postgres`` from the installed server (Debian's
``postgresql`` package puts them under ``/usr/lib/postgresql/<major>/bin``) in a temporary
directory. PostgreSQL refuses to run as root, so as root the cluster belongs to an ordinary
user (``postgres`` from the package, else ``sandbox-ci``, else ``nobody``) and both programs run
as that user (``subprocess``'s ``user=``/``group=``: no intermediate process between us and the
server, so signals reach it). Readiness is read from the server's own log line, never
polled with sleeps. :meth:`Postgres.database` makes a fresh database (the tests take one per
test, so they never see each other's rows); :meth:`Postgres.stop` and :meth:`Postgres.start`
take the server down and bring it back on the same port, for the tests of what a fleet does
while its database is away (such a test starts a server of its own, ``with Postgres() as pg:``:
the tests' session-wide one is never stopped).

:func:`unavailable` says why no server can be started here (the tests skip with that reason,
the benchmark records it), or ``None``.

:class:`LocalFleet` starts N replicas, ``sandbox serve --store URL --node-name nX --listen
127.0.0.1:0 --state-dir DIR`` (a database of its own :class:`Postgres` unless given a store
URL), all at once, and reads each one's port from its first line of output (``sandbox
listening on HOST:PORT``), without sleeps::

    with LocalFleet(3) as fleet:                 # PostgreSQL + n1, n2, n3
        Client(fleet.target)                     # "ipv4:127.0.0.1:P1,127.0.0.1:P2,..."
        Client(fleet.replicas["n2"].target)      # one of them

:meth:`LocalFleet.stop` sends every replica SIGTERM, waits for the drains and checks that
nothing a replica started (zygotes, workers) outlives it; :meth:`LocalFleet.kill` SIGKILLs each
replica's process group and every process below it. Leaving the ``with`` block stops the
replicas (killing them if a stop fails), then the database, then removes the temporary
directory. A replica's stderr (its log) goes to ``ROOT/<node>.log``.
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
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import psutil

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


# --- the replicas ------------------------------------------------------------------------------

#: Deadlock guards only: a replica is listening in about a second (strict isolation, two cores,
#: three starting at once: a few), and drains within its grace.
SERVE_START_TIMEOUT_S = 60.0
SERVE_STOP_TIMEOUT_S = 60.0
#: How long a replica's in-flight calls may finish after SIGTERM (``sandbox serve --grace``).
GRACE_S = 5.0
#: Deadlock guard for processes to be gone after their server (the kernel reaps them).
GONE_TIMEOUT_S = 10.0
LISTENING = "sandbox listening on "


def serve_command() -> list[str]:
    """``sandbox serve``, run by this interpreter (no reliance on ``PATH``); ``-P``: the
    current directory is not put on ``sys.path`` (the server exposes its ``sys.path`` to the
    workers, read-only, so that they can import what it can)."""
    return [sys.executable, "-P", "-m", "sandbox.cli", "serve"]


class Replica:
    """One ``sandbox serve`` subprocess of a :class:`LocalFleet` (in a session of its own, so a
    Ctrl-C at a terminal reaches only whoever started it, which then stops it)."""

    def __init__(self, node: str, argv: list[str], state_dir: Path, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.node = node
        self.state_dir = state_dir
        self.log_path = log_path
        self.port = 0
        self.host = ""
        self.output: list[str] = []  # what it printed after the listening line
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed at stop/kill)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.psutil = psutil.Process(self.proc.pid)
        self._line: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"sandbox-{node}-stdout")
        self._reader.start()

    def _read(self) -> None:
        """Take the first line (the address), then keep the pipe drained (the server never
        blocks on a full pipe) until it closes."""
        assert self.proc.stdout is not None
        for i, line in enumerate(self.proc.stdout):
            if i == 0:
                self._line.append(line)
                self._listening.set()
            else:
                self.output.append(line)
        self._listening.set()  # exited without a line

    def wait_listening(self, timeout: float = SERVE_START_TIMEOUT_S) -> str:
        """Wait for ``sandbox listening on HOST:PORT``; returns the target ``HOST:PORT``.
        Raises (with the tail of its log) if the replica exits or says something else."""
        self._listening.wait(timeout)
        line = self._line[0].strip() if self._line else ""
        if not line.startswith(LISTENING):
            status = self.proc.poll()
            raise RuntimeError(f"replica {self.node} did not start (first line {line!r}, exit "
                               f"status {status}); its log:\n{self.log()[-3000:]}")
        address = line[len(LISTENING):]
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        return self.target

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        """Live (non-zombie) processes below the replica."""
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
        """SIGTERM: the replica drains (in-flight calls finish within its grace) and exits."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait(self, below: list[psutil.Process], timeout: float = SERVE_STOP_TIMEOUT_S) -> int:
        """Wait for the exit after :meth:`terminate`; returns the exit status. Raises
        ``AssertionError`` (after killing them) if any of ``below`` outlives the replica."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close()
        alive = wait_gone(below)
        if alive:
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            raise AssertionError(f"left running after replica {self.node} stopped: {alive}")
        return status

    def stop(self, timeout: float = SERVE_STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait for the exit, check that nothing it started is left."""
        below = self.descendants()
        self.terminate()
        return self.wait(below, timeout)

    def kill(self) -> None:
        """SIGKILL the replica's process group and everything below it, and wait for them."""
        below = self.descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        for p in below:  # in process groups (and PID namespaces) of their own
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(GONE_TIMEOUT_S)
        wait_gone(below)
        self._close()

    def _close(self) -> None:
        self._reader.join(GONE_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def wait_gone(procs: list[psutil.Process], timeout: float = GONE_TIMEOUT_S
              ) -> list[psutil.Process]:
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


class LocalFleet:
    """N ``sandbox serve`` replicas on loopback sharing one function store in PostgreSQL.

    Args:
        replicas: how many (named ``n1``, ``n2``, ...; or ``names``).
        store: the store's URL; default: a fresh database in a :class:`Postgres` of the
            fleet's own (stopped with it).
        root: where the state directories and logs go; default: a temporary directory,
            removed at :meth:`close`.
        serve_args: more ``sandbox serve`` flags for every replica (e.g. ``--isolation off``;
            default: the server's defaults, strict isolation as root).
        log_level: the replicas' ``--log-level`` (``warning``: no access-log line per call).
    """

    def __init__(self, replicas: int = 3, *, store: str | None = None,
                 root: str | Path | None = None, serve_args: Sequence[str] = (),
                 names: Sequence[str] | None = None, log_level: str = "warning",
                 grace_s: float = GRACE_S) -> None:
        self.names = list(names) if names is not None else [f"n{i + 1}" for i in
                                                            range(replicas)]
        self.serve_args = list(serve_args)
        self.log_level = log_level
        self.grace_s = grace_s
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="sandbox-fleet-")) if root is None else Path(root)
        self.postgres: Postgres | None = None
        self.store = store or ""
        self.replicas: dict[str, Replica] = {}
        self._started = False

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> LocalFleet:
        """Start the database (unless given a URL) and every replica, all at once; return
        when each one is listening."""
        try:
            if not self.store:
                self.postgres = Postgres()
                self.store = self.postgres.database("fleet")
            started = [self.start_replica(node, wait=False) for node in self.names]
            for replica in started:
                replica.wait_listening()
        except BaseException:
            self.close()
            raise
        self._started = True
        return self

    def start_replica(self, node: str, port: int = 0, *, wait: bool = True) -> Replica:
        """Start (or restart: the same state directory; ``port`` its old one) one replica."""
        state = self.root / node
        state.mkdir(parents=True, exist_ok=True)
        argv = [*serve_command(), "--store", self.store, "--node-name", node,
                "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                "--grace", str(self.grace_s), "--log-level", self.log_level, *self.serve_args]
        replica = Replica(node, argv, state, self.root / f"{node}.log")
        self.replicas[node] = replica
        if wait:
            replica.wait_listening()
        return replica

    def stop(self) -> dict[str, int]:
        """SIGTERM every replica at once, wait for each; returns their exit statuses. Raises
        ``AssertionError`` if any process of theirs is left (those are killed)."""
        below = {node: r.descendants() for node, r in self.replicas.items()
                 if r.proc.returncode is None}
        for node in below:
            self.replicas[node].terminate()
        statuses, errors = {}, []
        for node, procs in below.items():
            try:
                statuses[node] = self.replicas[node].wait(procs)
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{node}: {exc}")
        if errors:
            raise AssertionError("; ".join(errors))
        return statuses

    def kill(self) -> None:
        """SIGKILL every replica and everything below it."""
        for replica in self.replicas.values():
            if replica.proc.returncode is None or replica.descendants():
                replica.kill()

    def close(self) -> None:
        """Stop the replicas (kill them if that fails), the database, remove the directory."""
        try:
            try:
                self.stop()
            except BaseException:
                self.kill()
                raise
        finally:
            if self.postgres is not None:
                self.postgres.close()
                self.postgres = None
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalFleet:
        return self if self._started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses -------------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        """Every replica's ``127.0.0.1:PORT``, in node order."""
        return [self.replicas[n].target for n in self.names]

    @property
    def target(self) -> str:
        """One gRPC target over every replica (``Client`` balances it round_robin)."""
        return "ipv4:" + ",".join(self.targets)

"""The zygote process: preload once, then only fork workers.

Started by the supervisor as a fresh ``exec`` of ``sys.executable -I`` with a minimal
environment (see :func:`command` and :func:`environment`), never forked from the supervisor,
so it never inherits a thread, a gRPC object or a lock held by another thread. Its life:

1. death signal (SIGKILL when the supervisor thread that started it exits), child subreaper
   (orphaned grandchildren of workers come back to it, to be reaped, not to init);
2. import the profile's modules, with BLAS/OpenMP pools pinned to one thread by the
   environment, then ``gc.freeze()`` so a worker's first collection copies nothing;
3. ``zready`` (or ``zfailed`` naming the module that would not import, then exit);
4. loop on a selector: ``spawn`` requests on the control socket, SIGCHLD through a wakeup fd.

Before every fork it checks ``/proc/self/task``: a zygote that gained a thread (a preloaded
module started one) refuses with ``spawn_failed`` and the supervisor replaces it. It reaps every
child (workers and orphans) with ``wait4`` and reports ``exited`` with status and rusage. When
the control socket closes it SIGKILLs its workers and exits.

This module must stay lean: it is imported into every zygote, so it imports no asyncio, no
gRPC and nothing of the supervisor.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from sandbox import _linux

__all__ = ["ENVIRONMENT_NAMES", "command", "environment", "serve"]

MAX_CONTROL_MESSAGE = 256 * 1024

#: Variables every zygote gets; nothing else of the supervisor's environment is passed, except
#: the few in _PASS_THROUGH.
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "random",
    "PYTHONDONTWRITEBYTECODE": "1",
    # One thread per BLAS/OpenMP pool: a zygote must stay single-threaded to fork safely.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "GOTO_NUM_THREADS": "1",
}
# OpenBLAS needs these on some processors to compute correctly at all.
_PASS_THROUGH = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TZ")
#: Every variable a zygote's environment (and so a worker's, before the worker sets HOME and
#: TMPDIR) can hold: the fixed ones, the passed-through ones when the supervisor has them, and
#: SANDBOX_INSTANCE.
ENVIRONMENT_NAMES = frozenset({*_BASE_ENV, *_PASS_THROUGH, "SANDBOX_INSTANCE"})


def environment(instance: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The minimal environment of a zygote (and so of its workers)."""
    env = dict(_BASE_ENV)
    for name in _PASS_THROUGH:
        if name in os.environ:
            env[name] = os.environ[name]
    env["SANDBOX_INSTANCE"] = instance
    if extra:
        env.update(extra)
    return env


def command(modules: Sequence[str], sys_path: Sequence[str], parent_pid: int,
            control_fd: int, isolation: Mapping[str, Any] | None = None,
            netns_fd: int = -1, gc_freeze: bool = True) -> list[str]:
    """The argv that starts a zygote (isolated mode; sys.path given explicitly).

    ``isolation`` is an :class:`sandbox.isolation.IsolationConfig` as a dict (None: no
    isolation layers); ``netns_fd`` the shared empty network namespace (passed as an fd);
    ``gc_freeze`` False skips ``gc.freeze()`` (only to measure what it saves).
    """
    boot = (
        "import sys; sys.path[:0] = [p for p in sys.argv[1].split(':') if p]; "
        "from sandbox.zygote import serve; "
        "serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))"
    )
    return [sys.executable, "-I", "-c", boot, ":".join(sys_path), ",".join(modules),
            str(parent_pid), str(control_fd),
            json.dumps({"isolation": isolation, "gc_freeze": gc_freeze}), str(netns_fd)]


def _send(sock: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _preload(modules: Sequence[str], sock: socket.socket) -> bool:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            _send(sock, {"t": "zfailed", "module": name,
                         "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()})
            return False
    return True


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _detect_isolation(wanted: dict[str, Any] | None, netns_fd: int, sock: socket.socket
                      ) -> tuple[Any, dict[str, Any] | None]:
    """Detect the isolation layers here, single-threaded, before any preload runs.

    Returns the effective config (what every worker applies) and the report; in strict mode a
    missing layer is reported as ``zfailed`` and the zygote exits.
    """
    if not wanted:
        return None, None
    from sandbox import isolation
    from sandbox.errors import IsolationUnavailable

    wanted["expose"] = tuple(wanted.get("expose", ()))
    wanted["hide"] = tuple(wanted.get("hide", ()))
    config = isolation.IsolationConfig(**wanted)
    try:
        report = isolation.detect(config, netns_fd=netns_fd if netns_fd >= 0 else None)
    except IsolationUnavailable as exc:
        _send(sock, {"t": "zfailed", "kind": "isolation", "module": "", "error": str(exc),
                     "traceback": ""})
        os._exit(0)
    isolation.prepare(report.effective)
    data = report.to_dict()
    data["view"] = isolation.view_report(report.effective)
    return report.effective, data


def _enter_own_namespaces(wanted: Mapping[str, Any] | None) -> dict[str, int] | None:
    """Without root, with user and pid namespaces wanted: become pid 1 of namespaces of our
    own (:func:`sandbox.isolation.enter_zygote_namespaces`). Returns the supervisor's
    namespace ids (what each worker's must differ from), None when we stay in them."""
    if not wanted or os.geteuid() == 0 or not wanted.get("user_ns", True) \
            or not wanted.get("pid_ns", True):
        return None
    from sandbox import isolation

    host_namespaces = isolation.namespace_ids()
    try:
        isolation.enter_zygote_namespaces()
    except OSError as exc:
        # Reported by detect() as the reason pid_ns is missing; strict mode refuses there.
        isolation.zygote_namespaces_error = isolation.userns_refusal(exc.strerror or str(exc))
        return None
    return host_namespaces


def serve(modules_arg: str, parent_pid: int, control_fd: int, options_json: str = "{}",
          netns_fd: int = -1) -> None:
    """The zygote's main loop. Runs in the exec'd zygote process; never returns."""
    code = 0
    try:
        _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(0)  # the supervisor is already gone
        _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)
        sock = socket.socket(fileno=control_fd)
        sock.setblocking(True)
        modules = [m for m in modules_arg.split(",") if m]
        # Import the worker side now: it is part of every worker, so it belongs in the snapshot.
        from sandbox import worker

        options = json.loads(options_json)
        host_namespaces = _enter_own_namespaces(options.get("isolation"))
        isolation_config, report = _detect_isolation(options.get("isolation"), netns_fd, sock)
        if not _preload(modules, sock):
            os._exit(0)
        threads = _linux.thread_count()
        if threads != 1:
            # Forking a process with threads copies locks held by threads that do not exist
            # in the child: refuse the profile rather than fork workers that may deadlock.
            _send(sock, {"t": "zfailed", "module": ",".join(modules),
                         "error": f"preloading started {threads - 1} thread(s); a zygote must "
                                  "stay single-threaded (set the library's thread pool to 0 "
                                  "or import it in the function instead)", "traceback": ""})
            os._exit(0)
        gc.collect()
        if options.get("gc_freeze", True):
            gc.freeze()
        _Zygote(sock, modules, worker, isolation_config, report, netns_fd,
                host_namespaces).run()
    except (BrokenPipeError, ConnectionError):
        code = 0  # the supervisor went away: nothing to report to
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


class _Zygote:
    def __init__(self, sock: socket.socket, modules: list[str], worker: Any,
                 isolation_config: Any, report: dict[str, Any] | None, netns_fd: int,
                 host_namespaces: dict[str, int] | None = None) -> None:
        self.sock = sock
        self.modules = modules
        self.worker = worker
        self.isolation = isolation_config
        self.isolation_module: Any = None
        self.report = report
        self.netns_fd = netns_fd
        self.host_namespaces: dict[str, int] = {}
        #: in a pid namespace of our own (not root): our pid for a child -> the host's
        self.own_pid_ns = host_namespaces is not None
        self.outer_fd = -1
        self.host_pids: dict[int, int] = {}
        self.fork: Callable[[], int] = os.fork
        #: the config of a worker allowed on the network (host netns, INET sockets)
        self.network_isolation: Any = None
        if isolation_config is not None:
            import dataclasses

            from sandbox import isolation

            self.isolation_module = isolation
            if isolation.zygote_namespaces is not None:
                self.outer_fd = int(isolation.zygote_namespaces["outer_fd"])
            # The posture check compares a worker's namespaces with the supervisor's: ours,
            # unless we entered our own user and pid namespaces.
            self.host_namespaces = host_namespaces or isolation.namespace_ids()
            if isolation_config.pid_ns:
                self.fork = isolation.fork_in_new_pid_namespace
            self.network_isolation = dataclasses.replace(
                isolation_config, net_ns=False, allow_network=True)
        self.children: set[int] = set()
        # Workers keep the read end; only the zygote holds the write end (each worker closes
        # its inherited copy at birth): end-of-file there means the zygote is gone.
        self.alive_r, self.alive_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor
        # As the host numbers us: /proc is the host's (we are pid 1 of our own namespace
        # when not root, and the supervisor must be able to signal us).
        _send(self.sock, {"t": "zready", "pid": int(os.readlink("/proc/self")),
                          "modules": self.modules,
                          "rss": _rss_bytes(), "threads": _linux.thread_count(),
                          "isolation": self.report})
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "control")
        selector.register(self.wake_r, selectors.EVENT_READ, "sigchld")
        try:
            while True:
                for key, _ in selector.select():
                    if key.data == "sigchld":
                        self._drain_wakeup()
                        self._reap()
                    elif not self._on_control():
                        return
        finally:
            for pid in list(self.children):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            was_worker = pid in self.children
            self.children.discard(pid)
            if was_worker:
                pid = self.host_pids.pop(pid, pid)
                _send(self.sock, {"t": "exited", "pid": pid, "status": status,
                                  "cpu": ru.ru_utime + ru.ru_stime,
                                  "maxrss": ru.ru_maxrss * 1024})

    def _on_control(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_CONTROL_MESSAGE, 8)
        except (ConnectionError, OSError):
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False  # the supervisor is gone
        msg = msgpack.unpackb(data, raw=False)
        if msg.get("t") == "spawn":
            self._spawn(msg, fds)
        else:
            for fd in fds:
                os.close(fd)
        return True

    def _spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        received_ns = time.monotonic_ns()
        token = msg["token"]
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            _send(self.sock, {"t": "spawn_failed", "token": token,
                              "error": f"spawn needs 3 fds, got {len(fds)}"})
            return
        if self.outer_fd >= 0 and select.select([self.outer_fd], [], [], 0)[0]:
            os._exit(0)  # the process the supervisor started is gone: so are we
        threads = _linux.thread_count()
        if threads != 1:
            for fd in fds:
                os.close(fd)
            _send(self.sock, {"t": "spawn_failed", "token": token, "fatal": True,
                              "error": f"zygote has {threads} threads; refusing to fork"})
            return
        config = dict(msg["config"])
        config["zygote_pid"] = os.getpid()
        config["received_ns"] = received_ns
        config["alive_fd"] = self.alive_r
        if self.isolation is not None:
            iso = self.network_isolation if config.get("network") else self.isolation
            config["isolation"] = iso
            config["netns_fd"] = self.netns_fd if iso.net_ns else -1
            config["host_namespaces"] = self.host_namespaces
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        idle = bool(config.get("idle_birth"))
        if idle:
            # A warm (refill) worker: fork with spare CPU only. Root may switch back after.
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError:
                idle = False
        try:
            pid = self.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(self.sock, {"t": "spawn_failed", "token": token, "error": f"fork: {exc}"})
            return
        if pid == 0:  # the worker; never returns
            try:
                self.worker.main(fds[0], fds[1], fds[2], config)
            finally:
                os._exit(72)
        if idle:
            try:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            except OSError:
                pass  # no CAP_SYS_NICE after all: forks stay at idle priority, nothing worse
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        pidfd = os.pidfd_open(pid)
        try:
            if self.own_pid_ns:
                self.host_pids[pid] = self.isolation_module.host_pid(pidfd)
                pid = self.host_pids[pid]
            _send(self.sock, {"t": "spawned", "token": token, "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)

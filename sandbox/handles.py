"""The supervisor's handles on its child processes: a zygote, and a worker.

- :class:`ZygoteHandle` starts a zygote process (fresh ``exec``), talks to it over a
  ``SOCK_SEQPACKET`` control socket: ``spawn`` with three fds in, ``spawned`` with a pidfd out,
  ``exited`` with the wait status and rusage of every worker it reaps.
- :class:`WorkerHandle` is the supervisor's view of one worker: its channel (non-blocking,
  read by the event loop into a capped :class:`~sandbox.protocol.FrameDecoder`), its captured
  stdout/stderr (bounded buffers, the rest counted and dropped), its pidfd (readable when it
  dies: race-free kill and exit detection) and its cgroup.

Nothing here blocks the event loop on a child: all child I/O is non-blocking and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from sandbox import protocol, zygote
from sandbox._logging import get_logger
from sandbox.errors import IsolationUnavailable, ProfileError, ProtocolError, SandboxError
from sandbox.limits import Limits

if TYPE_CHECKING:
    from sandbox.cgroups import WorkerCgroup
    from sandbox.execution import Execution
    from sandbox.pool import Pool

__all__ = ["WorkerHandle", "WorkerStartError", "ZygoteHandle"]

log = get_logger(__name__)

ZYGOTE_START_TIMEOUT_S = 120.0
#: How long a forked worker may take to confine itself and report ready.
WORKER_READY_TIMEOUT_S = 30.0
#: After SIGKILL, how long to wait for the kernel to report the death before giving up.
DEATH_TIMEOUT_S = 10.0
#: How long to wait for the zygote's exit report (status, rusage) once the pidfd fired.
STATUS_TIMEOUT_S = 2.0
#: Chunks buffered for a slow stream consumer before the worker's channel stops being read.
STREAM_BUFFER_CHUNKS = 64
_READ_SIZE = 256 * 1024

class WorkerStartError(SandboxError):
    """A worker could not be started (the zygote refused, or the worker died at birth)."""


# -- zygote handle ------------------------------------------------------------------------------

class ZygoteHandle:
    """The supervisor's end of one zygote process."""

    def __init__(self, profile: str, modules: Sequence[str], instance: str,
                 on_death: Callable[[ZygoteHandle], None],
                 isolation: Mapping[str, Any] | None = None, netns_fd: int = -1,
                 gc_freeze: bool = True) -> None:
        self.profile = profile
        self.modules = tuple(modules)
        self.instance = instance
        self.gc_freeze = gc_freeze
        self.isolation = isolation
        self.netns_fd = netns_fd
        #: what the zygote detected (``IsolationReport.to_dict()``), None without isolation
        self.isolation_report: dict[str, Any] | None = None
        self.pid: int | None = None
        self.rss_bytes = 0
        self.alive = False
        self._on_death = on_death
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        #: without root the zygote proper is pid 1 of namespaces of its own, a child of the
        #: process we started: its pidfd (killed with it, waited for before ``reaped``)
        self._inner_pidfd: int | None = None
        #: its pid, as the host numbers it (None until ready, and when it is ``pid``)
        self.inner_pid: int | None = None
        self._started: asyncio.Future[None] = self._loop.create_future()
        #: done once the zygote process has exited and been reaped
        self.reaped: asyncio.Future[None] = self._loop.create_future()
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._tokens = itertools.count(1)
        #: pid -> callback(status, cpu_s, maxrss_bytes) for the workers it forked
        self.exit_callbacks: dict[int, Callable[[int | None, float, int], None]] = {}
        #: workers reported spawned whose handle is not made yet, and exits that came first
        self._unclaimed: dict[int, None] = {}
        self._early_exits: dict[int, tuple[int, float, int]] = {}

    async def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = zygote.command(self.modules, [p for p in sys.path if p], os.getpid(),
                                  child.fileno(), self.isolation, self.netns_fd,
                                  self.gc_freeze)
            fds = [child.fileno()] + ([self.netns_fd] if self.netns_fd >= 0 else [])
            self._proc = subprocess.Popen(
                argv, pass_fds=fds, env=zygote.environment(self.instance),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None, cwd="/",
                close_fds=True)
        finally:
            child.close()
        self.pid = self._proc.pid
        self._pidfd = os.pidfd_open(self.pid)
        parent.setblocking(False)
        self._sock = parent
        self.alive = True
        self._loop.add_reader(parent.fileno(), self._on_readable)
        self._loop.add_reader(self._pidfd, self._on_exit)
        try:
            await asyncio.wait_for(asyncio.shield(self._started), ZYGOTE_START_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            raise ProfileError(f"profile {self.profile!r}: the zygote did not finish importing "
                               f"{list(self.modules)} within {ZYGOTE_START_TIMEOUT_S:.0f} s") \
                from None

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, 65536, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self._dead("control socket closed")
                return
            try:
                msg = protocol.strict_unpackb(data, max_bytes=65536)
                if not isinstance(msg, dict):
                    raise ProtocolError("zygote message is not a map")
                self._dispatch(msg, fds)
            except (ProtocolError, KeyError, TypeError) as exc:
                for fd in fds:
                    os.close(fd)
                log.error("zygote %s sent a bad message (%s); replacing it", self.profile, exc)
                self.kill()
                return

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        kind = msg.get("t")
        if kind == "exited":
            pid = int(msg["pid"])
            status = (int(msg["status"]), float(msg["cpu"]), int(msg["maxrss"]))
            callback = self.exit_callbacks.pop(pid, None)
            if callback is not None:
                callback(*status)
            elif pid in self._unclaimed:
                # Died before its handle existed ("spawned" and "exited" read in one pass):
                # keep the status for watch_exit rather than lose it.
                self._early_exits[pid] = status
        elif kind == "spawned":
            fut = self._pending.pop(int(msg["token"]), None)
            if fut is None or fut.done() or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return
            pid = int(msg["pid"])
            self._unclaimed[pid] = None
            while len(self._unclaimed) > 1024:  # spawns whose caller went away
                stale = next(iter(self._unclaimed))
                del self._unclaimed[stale]
                self._early_exits.pop(stale, None)
            fut.set_result((pid, fds[0]))
        elif kind == "spawn_failed":
            fut = self._pending.pop(int(msg["token"]), None)
            if fut is not None and not fut.done():
                fut.set_exception(WorkerStartError(f"zygote {self.profile!r}: {msg['error']}"))
            if msg.get("fatal"):
                log.warning("zygote %s: %s; replacing it", self.profile, msg["error"])
                self.kill()
        elif kind == "zready":
            self.rss_bytes = int(msg.get("rss", 0))
            inner = int(msg.get("pid", 0))
            if inner and inner != self.pid and self._inner_pidfd is None:
                with contextlib.suppress(ProcessLookupError):
                    self._inner_pidfd = os.pidfd_open(inner)
                    self.inner_pid = inner
            report = msg.get("isolation")
            self.isolation_report = report if isinstance(report, dict) else None
            if not self._started.done():
                self._started.set_result(None)
        elif kind == "zfailed" and not self._started.done() and msg.get("kind") == "isolation":
            self._started.set_exception(IsolationUnavailable(str(msg["error"])))
        elif kind == "zfailed" and not self._started.done():
            self._started.set_exception(ProfileError(
                f"profile {self.profile!r}: cannot import {msg['module']!r}: "
                f"{msg['error']}"))
        for fd in fds if kind != "spawned" else ():
            os.close(fd)

    def _on_exit(self) -> None:
        self._dead("zygote process exited")

    def _reap(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._proc is not None:
            self._proc.poll()  # exited: the pidfd is readable
        inner = self._inner_pidfd
        if inner is not None:
            # The outer process has gone; pid 1 of the zygote's namespace follows (death
            # signal) and goes only once every process in its namespace has.
            self._loop.remove_reader(inner)
            if not select.select([inner], [], [], 0)[0]:
                self._loop.add_reader(inner, self._reap)
                return
            os.close(inner)
            self._inner_pidfd = None
        if not self.reaped.done():
            self.reaped.set_result(None)

    def _dead(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        log.info("zygote %s (pid %s): %s", self.profile, self.pid, why)
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._inner_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._inner_pidfd, signal.SIGKILL)
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            # Reap it when the kernel says it is gone (never block the loop on a child).
            self._loop.remove_reader(self._pidfd)
            self._loop.add_reader(self._pidfd, self._reap)
        exc = WorkerStartError(f"zygote {self.profile!r} died ({why})")
        if not self._started.done():
            self._started.set_exception(ProfileError(
                f"profile {self.profile!r}: the zygote exited while importing "
                f"{list(self.modules)} (see its stderr)"))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        # Workers die with their zygote (death signal); their pidfds report it. Statuses are
        # lost with the zygote: tell whoever waits for one.
        self._unclaimed.clear()
        self._early_exits.clear()
        callbacks, self.exit_callbacks = self.exit_callbacks, {}
        for callback in callbacks.values():
            callback(None, 0.0, 0)
        self._on_death(self)

    def watch_exit(self, pid: int, callback: Callable[[int | None, float, int], None]) -> None:
        """Call ``callback(status, cpu_s, maxrss)`` when the zygote reports ``pid`` reaped (at
        once if it already has; with None if the zygote dies first)."""
        self._unclaimed.pop(pid, None)
        early = self._early_exits.pop(pid, None)
        if early is not None:
            callback(*early)
        elif not self.alive:
            callback(None, 0.0, 0)
        else:
            self.exit_callbacks[pid] = callback

    async def spawn(self, config: Mapping[str, Any], fds: Sequence[int]) -> tuple[int, int]:
        """Ask for a worker; returns its (pid, pidfd)."""
        if not self.alive or self._sock is None:
            raise WorkerStartError(f"zygote {self.profile!r} is not running")
        token = next(self._tokens)
        fut: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self._pending[token] = fut
        data = msgpack.packb({"t": "spawn", "token": token, "config": dict(config)},
                                      use_bin_type=True)
        try:
            socket.send_fds(self._sock, [data], list(fds))
        except BlockingIOError:
            # The zygote is behind on reading; its queue is bounded, so wait for room.
            writable: asyncio.Future[None] = self._loop.create_future()
            fd = self._sock.fileno()
            def on_writable() -> None:
                if not writable.done():
                    writable.set_result(None)

            self._loop.add_writer(fd, on_writable)
            try:
                await writable
            finally:
                self._loop.remove_writer(fd)
            if self._sock is None:
                raise WorkerStartError(f"zygote {self.profile!r} died") from None
            socket.send_fds(self._sock, [data], list(fds))
        except OSError as exc:
            self._pending.pop(token, None)
            raise WorkerStartError(f"zygote {self.profile!r}: {exc}") from exc
        return await fut

    def still_alive(self) -> bool:
        """Alive, asking the kernel now (one poll of its pidfds) rather than waiting for the
        loop to read the news: a worker of a zygote that has just died is doomed."""
        if self.alive and select.select(
                [fd for fd in (self._pidfd, self._inner_pidfd) if fd is not None], [], [], 0)[0]:
            self._dead("zygote process exited")
        return self.alive

    @property
    def pids(self) -> tuple[int, ...]:
        """Every process of the zygote itself: the one started, and (without root) the
        zygote proper below it, pid 1 of its own namespaces."""
        return tuple(p for p in (self.pid, self.inner_pid) if p is not None)

    @property
    def pidfd(self) -> int | None:
        """The zygote's pidfd (readable once it has died), None once reaped."""
        return self._pidfd

    def kill(self) -> None:
        """SIGKILL the zygote (its workers follow by their death signal)."""
        if self._pidfd is not None and self.alive:
            for pidfd in (self._inner_pidfd, self._pidfd):
                if pidfd is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        self._dead("killed by the supervisor")

    def close(self) -> None:
        """Close the control socket (the zygote kills its workers and exits) and reap it."""
        if self._sock is not None and self.alive:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self.kill()


# -- worker handle ------------------------------------------------------------------------------

class _Capture:
    """A bounded capture of one pipe: first ``cap`` bytes kept, the rest counted."""

    __slots__ = ("buf", "cap", "dropped")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.cap = 64 * 1024  # before the first invocation: what a failed birth printed
        self.dropped = 0

    def reset(self, cap: int | None) -> None:
        self.buf.clear()
        self.cap = sys.maxsize if cap is None else cap
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if room >= len(data):
            self.buf += data
        else:
            if room > 0:
                self.buf += data[:room]
            self.dropped += len(data) - max(room, 0)

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


class WorkerHandle:
    """The supervisor's view of one worker process."""

    def __init__(self, pool: Pool, zyg: ZygoteHandle, pid: int, pidfd: int, sock: socket.socket,
                 out_fd: int, err_fd: int, cgroup: WorkerCgroup | None) -> None:
        self.pool = pool
        self.zygote = zyg
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.cgroup = cgroup
        self.loop = asyncio.get_running_loop()
        self.decoder = protocol.FrameDecoder()
        self.stdout = _Capture()
        self.stderr = _Capture()
        self.ready: asyncio.Future[protocol.Ready] = self.loop.create_future()
        self.dead: asyncio.Future[None] = self.loop.create_future()
        self.status: asyncio.Future[tuple[int | None, float, int]] = self.loop.create_future()
        self.execution: Execution | None = None
        self.served = 0
        self.function_key: str | None = None
        self.limits: Limits | None = None
        self.slot = -1
        self.network = False
        #: pid 1 of its own pid namespace (its death kills all its descendants)
        self.pid_namespace = False
        self.idle_priority = False
        #: ``time.monotonic_ns()`` when the supervisor asked for this worker, and when its
        #: ``ready`` arrived (with the worker's own phase marks: :meth:`birth_phases`)
        self.requested_ns = 0
        self.ready_ns = 0
        #: the loop's time when it last became idle (the pool sheds after ``idle_ttl_s``)
        self.idle_since = 0.0
        self.channel_eof = False
        self.violation: str | None = None
        self._reading = False
        self.closed = False
        zyg.watch_exit(pid, self._on_status)
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
        self.loop.add_reader(out_fd, self._on_pipe, out_fd, self.stdout)
        self.loop.add_reader(err_fd, self._on_pipe, err_fd, self.stderr)
        self.loop.add_reader(pidfd, self._on_dead)
        self.resume_reading()

    @property
    def alive(self) -> bool:
        return not self.dead.done()

    def usable(self) -> bool:
        """Alive, and neither it nor its zygote has died in a way the event loop has not
        dispatched yet (a dead zygote's workers are doomed: their death signal is on its way).
        Asks the kernel: one ``select`` on the two pidfds."""
        if not self.alive or self.pidfd < 0 or not self.zygote.alive:
            return False
        fds = [self.pidfd]
        zygote_fd = self.zygote.pidfd
        if zygote_fd is not None:
            fds.append(zygote_fd)
        readable, _, _ = select.select(fds, [], [], 0)
        return not readable

    def birth_phases(self) -> list[tuple[str, float, int]]:
        """Where this worker's birth went, in order: (phase, seconds, minor page faults in
        it). ``request`` is the spawn request reaching the zygote, ``fork`` the zygote's fork
        until the child runs, then the worker's own phases (:mod:`sandbox.worker`), and
        ``report`` its ``ready`` reaching us."""
        if not self.ready.done() or self.ready.exception() is not None or not self.requested_ns:
            return []
        out: list[tuple[str, float, int]] = []
        last, faults = self.requested_ns, 0
        for name, ns, minflt in self.ready.result().phases:
            out.append(("fork" if name == "forked" else name, max(0, ns - last) / 1e9,
                         max(0, minflt - faults)))
            last, faults = ns, minflt
        out.append(("report", max(0, self.ready_ns - last) / 1e9, 0))
        return out

    # reading ----------------------------------------------------------------------------------
    def resume_reading(self) -> None:
        if not self._reading and not self.channel_eof and not self.closed:
            self._reading = True
            self.loop.add_reader(self.sock.fileno(), self._on_channel)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _on_channel(self) -> None:
        try:
            data = self.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.pause_reading()
            self.channel_eof = True
            try:
                self.decoder.close()
            except ProtocolError as exc:
                self._violate(str(exc))
            if self.execution is not None:
                self.execution.on_channel_eof()
            return
        try:
            bodies = self.decoder.feed(data)
            for body in bodies:
                msg = protocol.decode_worker_message(body, max_bytes=self.decoder.cap)
                self._dispatch(msg)
                if self.violation is not None or self.closed:
                    return
        except ProtocolError as exc:
            self._violate(f"{type(exc).__name__}: {exc}")

    def _dispatch(self, msg: protocol.WorkerMessage) -> None:
        if isinstance(msg, protocol.Ready):
            if self.ready.done():
                self._violate("a second 'ready' message")
            else:
                self.ready_ns = time.monotonic_ns()
                self.ready.set_result(msg)
            return
        if self.execution is None:
            self._violate(f"unsolicited {type(msg).__name__.lower()!r} message")
            return
        self.execution.on_message(msg)

    def _violate(self, why: str) -> None:
        if self.violation is None:
            self.violation = why
        self.pause_reading()
        self.kill()
        if not self.ready.done():
            self.ready.set_exception(WorkerStartError(f"worker {self.pid}: {why}"))
            self.ready.exception()
        if self.execution is not None:
            self.execution.on_violation(why)

    def _on_pipe(self, fd: int, capture: _Capture) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            return
        capture.add(data)

    def drain_pipes(self) -> None:
        """Read what is already in the pipes (written before the terminal frame was sent)."""
        for fd, capture in ((self.out_fd, self.stdout), (self.err_fd, self.stderr)):
            for _ in range(64):  # bounded: a live grandchild may keep writing
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                capture.add(data)

    # death ------------------------------------------------------------------------------------
    def _drain_channel(self) -> None:
        """After the death: read what the worker wrote before it died, even while paused (the
        socket buffer bounds it; a bounded number of reads guards against a grandchild that
        keeps writing)."""
        if self.closed or self.channel_eof:
            return
        for _ in range(256):
            if self.channel_eof or self.violation is not None or self.closed:
                return
            try:
                data = self.sock.recv(_READ_SIZE, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                self._on_channel()  # records the EOF
                return
            self._on_channel()

    def _on_dead(self) -> None:
        self.loop.remove_reader(self.pidfd)
        self._drain_channel()
        if not self.dead.done():
            self.dead.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(WorkerStartError(
                f"worker {self.pid} died before it was ready"))
            self.ready.exception()  # retrieved here: a closing pool may await it no more
        if self.execution is not None:
            self.execution.on_dead()
        self.pool.on_worker_dead(self)

    def _on_status(self, status: int | None, cpu_s: float, maxrss: int) -> None:
        if not self.status.done():
            self.status.set_result((status, cpu_s, maxrss))

    def kill(self) -> None:
        """SIGKILL the whole worker tree now (does not wait).

        A worker that is pid 1 of its own pid namespace takes every process of the namespace
        with it (the kernel kills them all when their init dies): one signal through the pidfd
        is the whole kill, and the cgroup kill waits for the clean-up after the death.
        """
        if self.pid_namespace and self.alive:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                return
        if self.cgroup is not None:
            try:
                self.cgroup.kill_all()
            except OSError as exc:
                log.warning("cgroup kill of worker %s failed: %s", self.pid, exc)
        if self.alive and self.pidfd >= 0 and not select.select([self.pidfd], [], [], 0)[0]:
            with contextlib.suppress(ProcessLookupError, OSError):
                # The worker leads its own session: take its group first. Only while the
                # kernel says it has not exited (its pidfd is not readable): an exited worker
                # may already be reaped by the zygote and its pid (the group id) reused.
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        """Forget the worker: kill it, stop reading, close our fds, release its cgroup."""
        if self.closed:
            return
        self.closed = True
        self.kill()
        self.pause_reading()
        for fd in (self.out_fd, self.err_fd):
            self.loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()
        if not self.alive:  # else the pidfd stays watched: the pool reaps after the death
            self._release_pidfd()

    def _release_pidfd(self) -> None:
        self.loop.remove_reader(self.pidfd)
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.pidfd = -1

    async def send(self, message: Mapping[str, Any]) -> None:
        await self.loop.sock_sendall(self.sock, protocol.encode_frame(message))

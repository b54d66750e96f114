"""Warm pools of confined workers, and the execution of one invocation on one worker.

Data flow (one pool per preload profile)::

    AsyncRuntime.invoke ──▶ Pool.acquire ──▶ idle worker? ──yes──▶ Execution.run ──▶ result
                                 │                 │ no                  │  ▲
                                 │                 ▼                     │  │ frames (msgpack),
                                 │        ZygoteHandle.spawn ──fork──▶ Worker  stdout/stderr pipes,
                                 └── refill (off the critical path) ─────┘  pidfd (exit), cgroup

Who does what:

- :class:`ZygoteHandle` starts a zygote process (fresh ``exec``), talks to it over a
  ``SOCK_SEQPACKET`` control socket: ``spawn`` with three fds in, ``spawned`` with a pidfd out,
  ``exited`` with the wait status and rusage of every worker it reaps.
- :class:`WorkerHandle` is the supervisor's view of one worker: its channel (non-blocking,
  read by the event loop into a capped :class:`~sandbox.protocol.FrameDecoder`), its captured
  stdout/stderr (bounded buffers, the rest counted and dropped), its pidfd (readable when it
  dies: race-free kill and exit detection) and its cgroup.
- :class:`Pool` keeps ``min_idle`` workers ready per profile, refills after each take, forks on
  demand when none is idle, keeps reusable workers per function version, and replaces a zygote
  that died or gained a thread.
- :class:`Execution` sends one ``invoke``, enforces the deadline and the CPU limit from outside,
  collects chunks and the terminal frame, kills the whole worker tree when it must, and
  classifies exactly one outcome (precedence in :mod:`sandbox.outcome`).

Nothing here blocks the event loop on a child: all child I/O is non-blocking and bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from sandbox import protocol, zygote
from sandbox.errors import IsolationUnavailable, ProfileError, ProtocolError, SandboxError
from sandbox.limits import Limits, format_size
from sandbox.outcome import ErrorInfo, InvocationResult, Outcome, Stats

if TYPE_CHECKING:
    from sandbox.cgroups import CgroupManager, WorkerCgroup
    from sandbox.functions import FunctionInfo

__all__ = ["Execution", "Pool", "WorkerHandle", "WorkerStartError", "ZygoteHandle"]

log = logging.getLogger(__name__)

#: How long a zygote may take to import its profile.
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


def _monotonic() -> float:
    return time.monotonic()


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
        self._started: asyncio.Future[None] = self._loop.create_future()
        #: done once the zygote process has exited and been reaped
        self.reaped: asyncio.Future[None] = self._loop.create_future()
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._tokens = itertools.count(1)
        #: pid -> callback(status, cpu_s, maxrss_bytes) for the workers it forked
        self.exit_callbacks: dict[int, Callable[[int | None, float, int], None]] = {}

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
            callback = self.exit_callbacks.pop(int(msg["pid"]), None)
            if callback is not None:
                callback(int(msg["status"]), float(msg["cpu"]), int(msg["maxrss"]))
        elif kind == "spawned":
            fut = self._pending.pop(int(msg["token"]), None)
            if fut is None or fut.done() or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return
            fut.set_result((int(msg["pid"]), fds[0]))
        elif kind == "spawn_failed":
            fut = self._pending.pop(int(msg["token"]), None)
            if fut is not None and not fut.done():
                fut.set_exception(WorkerStartError(f"zygote {self.profile!r}: {msg['error']}"))
            if msg.get("fatal"):
                log.warning("zygote %s: %s; replacing it", self.profile, msg["error"])
                self.kill()
        elif kind == "zready":
            self.rss_bytes = int(msg.get("rss", 0))
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
        callbacks, self.exit_callbacks = self.exit_callbacks, {}
        for callback in callbacks.values():
            callback(None, 0.0, 0)
        self._on_death(self)

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

    def kill(self) -> None:
        """SIGKILL the zygote (its workers follow by their death signal)."""
        if self._pidfd is not None and self.alive:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
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
        self.cap = 0
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
        self.born = _monotonic()
        self.slot = -1
        self.network = False
        self.idle_priority = False
        self.channel_eof = False
        self.violation: str | None = None
        self._reading = False
        self.closed = False
        zyg.exit_callbacks[pid] = self._on_status
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
        self.loop.add_reader(out_fd, self._on_pipe, out_fd, self.stdout)
        self.loop.add_reader(err_fd, self._on_pipe, err_fd, self.stderr)
        self.loop.add_reader(pidfd, self._on_dead)
        self.resume_reading()

    @property
    def alive(self) -> bool:
        return not self.dead.done()

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
        """SIGKILL the whole worker tree now (does not wait)."""
        if self.cgroup is not None:
            try:
                self.cgroup.kill_all()
            except OSError as exc:
                log.warning("cgroup kill of worker %s failed: %s", self.pid, exc)
        if self.alive:
            with contextlib.suppress(ProcessLookupError, OSError):
                # The worker leads its own session: take its group first, while the pidfd
                # still proves the pid is ours.
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
        if self.alive:
            # Keep watching the pidfd: the pool removes the cgroup after the death.
            pass
        else:
            self._release_pidfd()

    def _release_pidfd(self) -> None:
        self.loop.remove_reader(self.pidfd)
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.pidfd = -1

    async def send(self, message: Mapping[str, Any]) -> None:
        await self.loop.sock_sendall(self.sock, protocol.encode_frame(message))


# -- execution ----------------------------------------------------------------------------------

ChunkSink = Callable[[bytes], None]


class Execution:
    """One invocation on one worker, from ``invoke`` to exactly one outcome."""

    def __init__(self, worker: WorkerHandle, fn: FunctionInfo, invocation_id: str, event: bytes,
                 content_type: str, limits: Limits, timeout_s: float | None, last: bool,
                 chunk_sink: ChunkSink | None) -> None:
        self.worker = worker
        self.fn = fn
        self.id = invocation_id
        self.event = event
        self.content_type = content_type
        self.limits = limits
        self.timeout_s = timeout_s
        self.last = last
        self.chunk_sink = chunk_sink
        self.loop = worker.loop
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.terminal: protocol.Result | protocol.Failed | None = None
        self.chunks = 0
        self.chunk_bytes = 0
        self.timed_out = False
        self.cancelled = False
        self.cpu_exceeded = False
        self.output_exceeded = False
        self.violation: str | None = None
        self.killed = False
        self.started = 0.0
        self.oom_before = 0
        self.cpu_before = 0.0
        self._timers: list[asyncio.TimerHandle] = []

    # events from the worker -------------------------------------------------------------------
    def on_message(self, msg: protocol.WorkerMessage) -> None:
        if self.terminal is not None:
            self.worker._violate("a message after the terminal frame")
            return
        if isinstance(msg, protocol.Chunk):
            self.chunks += 1
            self.chunk_bytes += len(msg.data)
            cap = self.limits.max_result_bytes
            if cap is not None and self.chunk_bytes > cap:
                self.output_exceeded = True
                self._kill()
                return
            if self.chunk_sink is not None:
                self.chunk_sink(msg.data)
            return
        if isinstance(msg, protocol.Result | protocol.Failed):
            self.terminal = msg
            if isinstance(msg, protocol.Result) and msg.streamed and self.chunk_sink is None:
                pass
            self._finish()
            return
        self.worker._violate(f"unexpected {type(msg).__name__.lower()!r} message")

    def on_violation(self, why: str) -> None:
        self.violation = why
        self.killed = True  # _violate killed the tree
        # Wait for the death: on_dead finishes.

    def on_channel_eof(self) -> None:
        pass  # the death (pidfd) decides; a grandchild may still hold the channel

    def on_dead(self) -> None:
        self._finish()

    # events from the supervisor ---------------------------------------------------------------
    def _on_deadline(self) -> None:
        if not self.done.done():
            self.timed_out = True
            self._kill()

    def _on_cpu_check(self) -> None:
        if self.done.done():
            return
        limit = self.limits.cpu_time_s
        assert limit is not None
        used = self._cpu_used()
        if used is not None:
            used -= self.cpu_before
        if used is not None and used >= limit:
            self.cpu_exceeded = True
            self._kill()
            return
        left = limit - (used or 0.0)
        # The tree cannot burn more than one CPU-second per second per core.
        delay = max(0.005, left / (os.cpu_count() or 1))
        self._timers.append(self.loop.call_later(delay, self._on_cpu_check))

    def cancel(self) -> None:
        if not self.done.done():
            self.cancelled = True
            self._kill()

    def _cpu_used(self) -> float | None:
        cg = self.worker.cgroup
        if cg is not None:
            value = cg.cpu_time_s()
            if value is not None:
                return value
        try:
            with open(f"/proc/{self.worker.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            return None

    def _kill(self) -> None:
        self.killed = True
        self.worker.kill()
        # on_dead (pidfd readable) finishes the execution.

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # the run ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Send the invocation and wait until its outcome is decided (not built)."""
        worker = self.worker
        worker.execution = self
        worker.stdout.reset(self.limits.max_log_bytes)
        worker.stderr.reset(self.limits.max_log_bytes)
        cap = self.limits.max_result_bytes
        worker.decoder.cap = protocol.FRAME_OVERHEAD + (cap if cap is not None else 2**31)
        if worker.cgroup is not None:
            worker.cgroup.set_limits(memory_bytes=self.limits.memory_bytes,
                                     max_pids=self.limits.max_processes)
        if worker.idle_priority:
            # Warm workers wait at SCHED_IDLE; the invocation runs at normal priority.
            worker.idle_priority = False
            with contextlib.suppress(OSError):
                os.sched_setscheduler(worker.pid, os.SCHED_OTHER, os.sched_param(0))
        if worker.served > 0:
            # A reused worker: measure this invocation only.
            if worker.cgroup is not None:
                self.oom_before = worker.cgroup.oom_kills()
                worker.cgroup.reset_peak()
            self.cpu_before = self._cpu_used() or 0.0
        worker.served += 1
        message = {
            "t": "invoke", "id": self.id, "fn": self.fn.descriptor(), "event": self.event,
            "ct": self.content_type, "limits": self.limits.to_dict(), "timeout": self.timeout_s,
            "last": self.last,
        }
        self.started = _monotonic()
        if self.timeout_s is not None:
            self._timers.append(self.loop.call_later(self.timeout_s, self._on_deadline))
        if self.limits.cpu_time_s is not None:
            self._timers.append(self.loop.call_later(
                max(0.005, self.limits.cpu_time_s / (os.cpu_count() or 1)), self._on_cpu_check))
        with contextlib.suppress(OSError):
            # On failure the worker died or closed the channel: its death decides.
            await worker.send(message)
        try:
            await self.done
        finally:
            for timer in self._timers:
                timer.cancel()
        if self.killed or self.terminal is None:
            # Make sure the whole tree is gone before the outcome is reported.
            worker.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.dead), DEATH_TIMEOUT_S)
            if not (self.timed_out or self.cancelled):
                # The exit status tells a crash from a signal; the zygote reports it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(worker.status), STATUS_TIMEOUT_S)

    def outcome(self) -> tuple[Outcome, ErrorInfo | None]:
        """Classify, by the precedence of :mod:`sandbox.outcome`."""
        limits = self.limits
        if self.cancelled:
            return Outcome.CANCELLED, ErrorInfo("Cancelled", "the caller cancelled the invocation")
        if self.timed_out:
            return Outcome.TIMEOUT, ErrorInfo(
                "Timeout", f"wall-clock timeout of {self.timeout_s:g} s exceeded; the worker "
                "tree was killed")
        cg = self.worker.cgroup
        status = self.worker.status.result()[0] if self.worker.status.done() else None
        if cg is not None and cg.oom_kills() > self.oom_before:
            return Outcome.MEMORY_LIMIT, ErrorInfo(
                "MemoryLimitExceeded", f"memory limit of {format_size(limits.memory_bytes)} "
                "exceeded; killed by the OOM killer")
        if (isinstance(self.terminal, protocol.Failed) and self.terminal.type == "MemoryError"
                and limits.memory_bytes is not None
                and (cg is None or not self.worker.pool.memory_cgroup)):
            return Outcome.MEMORY_LIMIT, ErrorInfo(
                "MemoryLimitExceeded", f"memory limit of {format_size(limits.memory_bytes)} "
                "exceeded (MemoryError)", self.terminal.traceback)
        signaled = status is not None and os.WIFSIGNALED(status)
        sig = os.WTERMSIG(status) if status is not None and signaled else None
        if self.cpu_exceeded or sig == signal.SIGXCPU or (
                self.terminal is None and limits.cpu_time_s is not None and sig == signal.SIGKILL
                and (self._cpu_used() or 0.0) - self.cpu_before >= limits.cpu_time_s):
            return Outcome.CPU_LIMIT, ErrorInfo(
                "CpuLimitExceeded", f"CPU time limit of {limits.cpu_time_s:g} s exceeded")
        if self.output_exceeded:
            return Outcome.OUTPUT_LIMIT, ErrorInfo(
                "OutputLimitExceeded", f"streamed chunks exceed max_result_bytes="
                f"{limits.max_result_bytes}")
        if isinstance(self.terminal, protocol.Failed) and self.terminal.output_limit:
            return Outcome.OUTPUT_LIMIT, ErrorInfo(
                "OutputLimitExceeded", self.terminal.message)
        if self.violation is not None:
            return Outcome.CRASHED, ErrorInfo(
                "ProtocolViolation", f"the worker broke the protocol: {self.violation}")
        if self.terminal is None:
            if status is None:
                why = ("its zygote died" if not self.worker.zygote.alive
                       else "no exit status was reported")
                return Outcome.CRASHED, ErrorInfo("WorkerDied",
                                                  f"the worker died without a result ({why})")
            if sig is not None:
                name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ \
                    else str(sig)
                return Outcome.CRASHED, ErrorInfo(
                    "KilledBySignal", f"the worker was killed by {name} (signal {sig}) before "
                    "it returned" + (" (segmentation fault)" if sig == signal.SIGSEGV else ""))
            return Outcome.CRASHED, ErrorInfo(
                "WorkerExited", f"the worker exited with code {os.WEXITSTATUS(status)} before "
                "it returned")
        if isinstance(self.terminal, protocol.Failed):
            return Outcome.FUNCTION_ERROR, ErrorInfo(
                self.terminal.type, self.terminal.message, self.terminal.traceback)
        return Outcome.OK, None


# -- pool ---------------------------------------------------------------------------------------

class Pool:
    """Warm, pre-forked, confined workers of one preload profile."""

    def __init__(self, profile: str, modules: Sequence[str], *, instance: str, min_idle: int,
                 cgroups: CgroupManager | None, birth_config: Mapping[str, Any],
                 slots: SlotAllocator, isolation: Mapping[str, Any] | None = None,
                 netns_fd: int = -1, gc_freeze: bool = True) -> None:
        self.profile = profile
        self.gc_freeze = gc_freeze
        self.slots = slots
        self.isolation = isolation
        self.netns_fd = netns_fd
        self.modules = tuple(modules)
        self.instance = instance
        self.min_idle = min_idle
        self.cgroups = cgroups
        self.memory_cgroup = bool(cgroups is not None and cgroups.available
                                  and cgroups.report.memory)
        self.birth_config = dict(birth_config)
        self.zygote: ZygoteHandle | None = None
        self._zygote_starting: asyncio.Task[ZygoteHandle] | None = None
        self.idle: collections.deque[WorkerHandle] = collections.deque()
        self.reusable: dict[str, collections.deque[WorkerHandle]] = {}
        self.busy: set[WorkerHandle] = set()
        self.workers: set[WorkerHandle] = set()
        self.starting = 0
        self.closed = False
        self.zygote_starts = 0
        self._names = itertools.count(1)
        self._refill_tasks: set[asyncio.Task[None]] = set()
        self._refill_failures = 0
        self._waiters: list[asyncio.Future[None]] = []

    # zygote -------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._ensure_zygote()
        self.refill()

    async def _ensure_zygote(self) -> tuple[ZygoteHandle, bool]:
        """The running zygote, starting one if needed; True if this call waited for a start."""
        if self.zygote is not None and self.zygote.alive:
            return self.zygote, False
        if self.closed:
            raise WorkerStartError(f"pool {self.profile!r} is closed")
        if self._zygote_starting is None:
            self._zygote_starting = asyncio.ensure_future(self._start_zygote())
        try:
            zyg = await asyncio.shield(self._zygote_starting)
        finally:
            if self._zygote_starting is not None and self._zygote_starting.done():
                self._zygote_starting = None
        return zyg, True

    async def _start_zygote(self) -> ZygoteHandle:
        zyg = ZygoteHandle(self.profile, self.modules, self.instance, self._on_zygote_death,
                           self.isolation, self.netns_fd, self.gc_freeze)
        self.zygote_starts += 1
        await zyg.start()
        if self.closed:
            zyg.close()
            raise WorkerStartError(f"pool {self.profile!r} is closed")
        self.zygote = zyg
        log.info("zygote %s ready (pid %s, %s preloaded, rss %s)", self.profile, zyg.pid,
                 list(self.modules), format_size(zyg.rss_bytes))
        return zyg

    def _on_zygote_death(self, zyg: ZygoteHandle) -> None:
        if self.zygote is zyg:
            self.zygote = None
        if not self.closed:
            self.refill()  # starts a replacement zygote through _ensure_zygote

    # workers ----------------------------------------------------------------------------------
    async def spawn(self, *, network: bool = False, warm: bool = False
                    ) -> tuple[WorkerHandle, bool]:
        """Fork a new worker and wait until it is ready; True if a zygote had to start.

        ``network``: born without the network namespace (for a function allowed on the
        network); such workers are never kept warm.
        """
        zyg, cold = await self._ensure_zygote()
        cgroup = None
        if self.cgroups is not None and self.cgroups.available:
            cgroup = self.cgroups.create(f"{self.profile}-{next(self._names)}")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        slot = self.slots.acquire()
        config = dict(self.birth_config)
        config["cgroup_procs"] = cgroup.procs_files() if cgroup is not None else []
        config["memory_cgroup"] = self.memory_cgroup
        config["slot"] = slot
        config["network"] = network
        # Warm workers (refills) are born at idle priority when we can undo it from outside.
        config["idle_birth"] = idle_birth = warm and os.geteuid() == 0
        try:
            pid, pidfd = await zyg.spawn(config, [child.fileno(), out_w, err_w])
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            parent.close()
            self.slots.release(slot)
            if cgroup is not None:
                cgroup.remove()
            raise
        finally:
            child.close()
            os.close(out_w)
            os.close(err_w)
        parent.setblocking(False)
        worker = WorkerHandle(self, zyg, pid, pidfd, parent, out_r, err_r, cgroup)
        worker.slot = slot
        worker.network = network
        worker.idle_priority = idle_birth
        self.workers.add(worker)
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), WORKER_READY_TIMEOUT_S)
        except BaseException as exc:
            if not worker.alive and not isinstance(exc, asyncio.CancelledError):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(worker.status), STATUS_TIMEOUT_S)
            worker.drain_pipes()
            detail = worker.stderr.text().strip().splitlines()[-1:] or [""]
            if worker.status.done() and worker.status.result()[0] is not None:
                status = worker.status.result()[0]
                assert status is not None
                how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                       else f"exit code {os.WEXITSTATUS(status)}")
                detail = [f"{how}{': ' + detail[0] if detail[0] else ''}"]
            log.debug("worker %s failed at birth: %s", pid, worker.stderr.text())
            self.discard(worker)
            if isinstance(exc, TimeoutError):
                raise WorkerStartError(f"worker {pid} was not ready within "
                                       f"{WORKER_READY_TIMEOUT_S:.0f} s") from None
            if isinstance(exc, WorkerStartError) and detail[0]:
                raise WorkerStartError(f"{exc}: {detail[0]}") from None
            raise
        return worker, cold

    async def acquire(self, fn: FunctionInfo, limits: Limits) -> tuple[WorkerHandle, bool, bool]:
        """A ready worker for ``fn``: (worker, cold_start, forked_on_demand)."""
        network = limits.network and self.isolation is not None
        if fn.reuse > 1:
            queue = self.reusable.get(fn.key)
            while queue:
                worker = queue.pop()
                if worker.alive and worker.limits == limits:
                    self.busy.add(worker)
                    return worker, False, False
                self.discard(worker)
        while self.idle and not network:
            worker = self.idle.popleft()
            if worker.alive:
                # The refill starts after the result is delivered (AsyncRuntime._run): on
                # two cores, forking next to a running function slows the function down.
                self.busy.add(worker)
                return worker, False, False
            self.discard(worker)
        worker, cold = await self.spawn(network=network)
        self.busy.add(worker)
        return worker, cold, True

    def release(self, worker: WorkerHandle, *, keep_for: FunctionInfo | None) -> None:
        """Give a worker back after an invocation: keep it for reuse, or let it go."""
        self.busy.discard(worker)
        worker.execution = None
        if keep_for is not None and worker.alive and not self.closed and not worker.closed:
            if worker.cgroup is not None:
                # Whatever the invocation left running goes; the worker itself stays.
                for pid in worker.cgroup.pids():
                    if pid != worker.pid:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)
            worker.function_key = keep_for.key
            self.reusable.setdefault(keep_for.key, collections.deque()).append(worker)
        else:
            self.discard(worker)

    def discard(self, worker: WorkerHandle) -> None:
        """Kill and forget a worker; its cgroup goes once it is dead."""
        self.busy.discard(worker)
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        if worker.function_key is not None:
            queue = self.reusable.get(worker.function_key)
            if queue is not None:
                with contextlib.suppress(ValueError):
                    queue.remove(worker)
                if not queue:
                    del self.reusable[worker.function_key]
        worker.close()
        if not worker.alive:
            self._reap(worker)

    def on_worker_dead(self, worker: WorkerHandle) -> None:
        if self.closed:
            if worker.closed:
                self._reap(worker)
            return
        if worker.execution is None and not worker.closed:
            log.info("idle worker %s of %s died; replacing it", worker.pid, self.profile)
            self.discard(worker)
            self.refill()
        elif worker.closed:
            self._reap(worker)

    def _reap(self, worker: WorkerHandle) -> None:
        """After death: close the pidfd, remove the cgroup (retrying while it is busy)."""
        self.workers.discard(worker)
        if worker.slot >= 0:
            self.slots.release(worker.slot)
            worker.slot = -1
        if worker.pidfd >= 0:
            worker._release_pidfd()
        cgroup = worker.cgroup
        if cgroup is None:
            return
        worker.cgroup = None

        def attempt(tries: int) -> None:
            try:
                cgroup.kill_all()
                if cgroup.remove():
                    return
            except OSError as exc:
                log.debug("cgroup %s removal: %s", cgroup.name, exc)
            if tries < 12:
                # The kernel frees a cgroup only after its last task is reaped (by the zygote);
                # retry with backoff rather than block the loop.
                asyncio.get_running_loop().call_later(0.002 * 2**tries, attempt, tries + 1)
            else:
                log.warning("cgroup %s could not be removed", cgroup.name)

        attempt(0)

    def refill(self) -> None:
        """Start forks until ``min_idle`` workers are ready or starting (off the critical path)."""
        if self.closed:
            return
        missing = self.min_idle - len(self.idle) - self.starting
        for _ in range(max(0, missing)):
            self.starting += 1
            task = asyncio.ensure_future(self._refill_one())
            self._refill_tasks.add(task)
            task.add_done_callback(self._refill_tasks.discard)

    async def _refill_one(self) -> None:
        try:
            if self._refill_failures:
                # Back off when births keep failing (a broken profile must not spin the CPU).
                await asyncio.sleep(min(5.0, 0.05 * 2 ** self._refill_failures))
            worker, _ = await self.spawn(warm=True)
        except Exception as exc:
            self._refill_failures += 1
            if not self.closed:
                log.warning("pool %s: could not start a warm worker: %s", self.profile, exc)
            self.starting -= 1
            if not self.closed and self._refill_failures < 20:
                self.refill()
            return
        self.starting -= 1
        self._refill_failures = 0
        if self.closed:
            self.discard(worker)
            return
        self.idle.append(worker)
        self._notify()

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_warm(self) -> None:
        """Wait until ``min_idle`` workers are idle (event-driven, no polling)."""
        while len(self.idle) < self.min_idle and not self.closed:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.refill()
            await waiter

    def sizes(self) -> dict[str, int]:
        return {
            "idle": len(self.idle),
            "busy": len(self.busy),
            "starting": self.starting,
            "reusable": sum(len(q) for q in self.reusable.values()),
        }

    async def close(self) -> None:
        """Kill every worker and the zygote; wait (bounded) until they are gone."""
        self.closed = True
        self._notify()
        for task in list(self._refill_tasks):
            task.cancel()
        if self._zygote_starting is not None:
            self._zygote_starting.cancel()
            with contextlib.suppress(BaseException):
                await self._zygote_starting
        workers = list(self.workers)
        for worker in workers:
            worker.kill()
        deaths = [w.dead for w in workers if w.alive]
        if deaths:
            await asyncio.wait(deaths, timeout=DEATH_TIMEOUT_S)
        for worker in workers:
            self.discard(worker)
        if self.zygote is not None:
            zyg, self.zygote = self.zygote, None
            zyg.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(zyg.reaped), DEATH_TIMEOUT_S)
        if self._refill_tasks:
            await asyncio.wait(list(self._refill_tasks), timeout=DEATH_TIMEOUT_S)


class SlotAllocator:
    """Small integers for live workers (a worker's uid is ``uid_base + slot``): no two live
    workers share one, so none can signal or ptrace another."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: collections.deque[int] = collections.deque(range(size))
        self._used: set[int] = set()

    def acquire(self) -> int:
        if not self._free:
            raise WorkerStartError(f"all {self.size} worker slots are in use")
        slot = self._free.popleft()
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._used:
            self._used.discard(slot)
            self._free.append(slot)


def build_result(execution: Execution, *, queue_s: float, startup_s: float, cold: bool,
                 on_demand: bool, decode: Callable[[bytes], Any] | None) -> InvocationResult:
    """The :class:`InvocationResult` of a finished execution."""
    worker = execution.worker
    worker.drain_pipes()
    outcome, error = execution.outcome()
    terminal = execution.terminal
    result_bytes = b""
    result: Any = None
    if outcome is Outcome.OK and isinstance(terminal, protocol.Result) and not terminal.streamed:
        result_bytes = terminal.data
        if decode is not None:
            try:
                result = decode(result_bytes)
            except ProtocolError as exc:
                outcome, error = Outcome.CRASHED, ErrorInfo(
                    "ProtocolViolation", f"the result is not valid encoded data: {exc}")
                result_bytes = b""
    cg = worker.cgroup
    cpu_s: float | None = None
    peak: int | None = None
    if cg is not None:
        cpu_s = cg.cpu_time_s()
        if cpu_s is not None:
            cpu_s -= execution.cpu_before
        peak = cg.peak_memory_bytes()
    if worker.status.done():
        _, status_cpu, maxrss = worker.status.result()
        cpu_s = cpu_s if cpu_s is not None else status_cpu
        peak = peak if peak is not None else (maxrss or None)
    if terminal is not None:
        cpu_s = cpu_s if cpu_s is not None else terminal.cpu_s
        peak = peak if peak is not None else terminal.rss_bytes
    run_s = _monotonic() - execution.started
    return InvocationResult(
        id=execution.id,
        outcome=outcome,
        result=result,
        result_bytes=result_bytes,
        error=error,
        stdout=worker.stdout.text(),
        stderr=worker.stderr.text(),
        stdout_truncated=worker.stdout.dropped > 0,
        stderr_truncated=worker.stderr.dropped > 0,
        chunks=execution.chunks,
        stats=Stats(queue_s=queue_s, startup_s=startup_s, run_s=run_s, cpu_s=cpu_s,
                    peak_memory_bytes=peak, cold_start=cold, forked_on_demand=on_demand,
                    worker_pid=worker.pid, worker_invocations=worker.served),
    )

"""One invocation on one worker: from ``invoke`` to exactly one outcome.

:class:`Execution` sends one ``invoke``, enforces the deadline and the CPU limit from outside,
collects chunks and the terminal frame, kills the whole worker tree when it must, and
classifies exactly one outcome (precedence in :mod:`sandbox.outcome`); :func:`build_result`
turns it into the caller's :class:`~sandbox.outcome.InvocationResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sandbox import protocol
from sandbox.errors import ProtocolError
from sandbox.handles import DEATH_TIMEOUT_S, STATUS_TIMEOUT_S, WorkerHandle
from sandbox.limits import Limits, format_size, wire_dict
from sandbox.outcome import ErrorInfo, InvocationResult, Outcome, Stats

if TYPE_CHECKING:
    from sandbox.functions import FunctionInfo

__all__ = ["ChunkSink", "Execution", "build_result"]


#: How often the RSS watchdog looks, when there is no memory cgroup.
MEMORY_WATCH_S = 0.01
_PAGE = os.sysconf("SC_PAGE_SIZE")


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
        self.memory_exceeded = False
        self.violation: str | None = None
        #: the invocation's limits could not be put in place (its cgroup refused them)
        self.limits_error: OSError | None = None
        self.killed = False
        self.started = 0.0
        #: ``time.monotonic_ns()`` when the invoke was sent and the terminal frame arrived
        self.sent_ns = 0
        self.received_ns = 0
        self.oom_before = 0
        self.cpu_before = 0.0
        #: the call's trace id, handed to the function as ``context.trace_id`` (None: none)
        self.trace_id: str | None = None
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
            self.received_ns = time.monotonic_ns()
            self.terminal = msg
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

    def _on_memory_check(self) -> None:
        """Without a memory cgroup: watch the worker's RSS from outside (RLIMIT_DATA inside
        catches most, but not memory the kernel maps on its behalf)."""
        if self.done.done():
            return
        limit = self.limits.memory_bytes
        assert limit is not None
        try:
            with open(f"/proc/{self.worker.pid}/statm", "rb") as f:
                rss = int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return  # gone: its death decides
        if rss > limit:
            self.memory_exceeded = True
            self._kill()
            return
        self._timers.append(self.loop.call_later(MEMORY_WATCH_S, self._on_memory_check))

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
        reused = worker.served > 0
        worker.pool.bind(worker, self)
        worker.stdout.reset(self.limits.max_log_bytes)
        worker.stderr.reset(self.limits.max_log_bytes)
        cap = self.limits.max_result_bytes
        worker.decoder.cap = protocol.FRAME_OVERHEAD + (cap if cap is not None else 2**31)
        if worker.cgroup is not None:
            try:
                worker.cgroup.set_limits(memory_bytes=self.limits.memory_bytes,
                                         max_pids=self.limits.max_processes)
            except OSError as exc:
                # Never run a function without its limits: the worker goes, unused.
                self.limits_error = exc
                self._kill()
                await self.settle()
                return
        if reused:
            # A reused worker: measure this invocation only.
            if worker.cgroup is not None:
                self.oom_before = worker.cgroup.oom_kills()
                worker.cgroup.reset_peak()
            self.cpu_before = self._cpu_used() or 0.0
        message = {
            "t": "invoke", "id": self.id, "fn": self.fn.descriptor(), "event": self.event,
            "ct": self.content_type, "limits": wire_dict(self.limits), "timeout": self.timeout_s,
            "last": self.last,
        }
        if self.trace_id is not None:
            message["trace"] = self.trace_id
        self.started = time.monotonic()
        if self.timeout_s is not None:
            self._timers.append(self.loop.call_later(self.timeout_s, self._on_deadline))
        if self.limits.memory_bytes is not None and not worker.pool.memory_cgroup:
            self._timers.append(self.loop.call_later(MEMORY_WATCH_S, self._on_memory_check))
        if self.limits.cpu_time_s is not None:
            self._timers.append(self.loop.call_later(
                max(0.005, self.limits.cpu_time_s / (os.cpu_count() or 1)), self._on_cpu_check))
        self.sent_ns = time.monotonic_ns()
        with contextlib.suppress(OSError):
            # On failure the worker died or closed the channel: its death decides.
            await worker.send(message)
        try:
            # Shielded: a caller that goes away cancels this wait, not the outcome's future, so
            # cancel() still sees a running invocation and classifies it CANCELLED (not a
            # CRASHED by our own kill in settle()).
            await asyncio.shield(self.done)
        finally:
            for timer in self._timers:
                timer.cancel()
        await self.settle()

    async def settle(self) -> None:
        """After the outcome is decided: if the worker was killed or died, wait (bounded) until
        the kernel reports the death and the zygote its status. Idempotent."""
        worker = self.worker
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
        if self.limits_error is not None:
            exc = self.limits_error
            if exc.errno == errno.EBUSY and limits.memory_bytes is not None:
                return Outcome.MEMORY_LIMIT, ErrorInfo(
                    "MemoryLimitExceeded", f"memory limit of {format_size(limits.memory_bytes)} "
                    "is below what a worker uses before the function even starts; the function "
                    "did not run")
            return Outcome.CRASHED, ErrorInfo(
                "LimitsNotApplied", f"the invocation's limits could not be applied to its "
                f"worker ({exc}); the function did not run")
        if self.memory_exceeded:
            return Outcome.MEMORY_LIMIT, ErrorInfo(
                "MemoryLimitExceeded", f"memory limit of {format_size(limits.memory_bytes)} "
                "exceeded (resident set seen from outside); the worker tree was killed")
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
    if outcome is Outcome.OK and worker.served == 1 and terminal is not None:
        # The common case: the worker's own account in its terminal frame (its peak resident
        # set, its CPU and its reaped children's) and no cgroupfs read on the call's path.
        cg = None
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
    run_s = time.monotonic() - execution.started
    marks = terminal.marks if terminal is not None else ()
    function_s = (marks[2] - marks[1]) / 1e9 if marks else None
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
                    worker_pid=worker.pid, worker_invocations=worker.served,
                    function_s=function_s),
    )

"""The outcome vocabulary, one for every way in (Python, proto, CLI JSON).

Every invocation ends with exactly one :class:`InvocationResult`. Its :class:`Outcome` says how
the function ended; when several apply the most specific wins, in this order::

    CANCELLED > TIMEOUT > MEMORY_LIMIT > CPU_LIMIT > OUTPUT_LIMIT > CRASHED > FUNCTION_ERROR > OK

(``CANCELLED`` is the caller's own doing, so it is reported as such whatever the function was
doing; ``OUTPUT_LIMIT`` is decided by the supervisor, which refuses the oversized result.)

Problems with the *call* (unknown function, bad payload, overload, shutting down) are not
outcomes: they are exceptions of :mod:`sandbox.errors`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

__all__ = ["ErrorInfo", "InvocationResult", "Outcome", "Stats"]


class Outcome(enum.StrEnum):
    """How an invocation ended."""

    OK = "OK"
    #: the function raised (SystemExit and KeyboardInterrupt included) or returned something
    #: that cannot be serialized
    FUNCTION_ERROR = "FUNCTION_ERROR"
    #: the wall-clock timeout passed; the worker tree was killed
    TIMEOUT = "TIMEOUT"
    #: the CPU-time limit was reached
    CPU_LIMIT = "CPU_LIMIT"
    #: the memory limit was reached (the OOM killer fired in the worker's cgroup, or the
    #: fallback watchdog saw the limit crossed)
    MEMORY_LIMIT = "MEMORY_LIMIT"
    #: the result (or the streamed chunks together) exceeded ``max_result_bytes``
    OUTPUT_LIMIT = "OUTPUT_LIMIT"
    #: the worker died without a result: a signal, ``os._exit``, or a protocol violation
    CRASHED = "CRASHED"
    #: the caller cancelled the invocation; the worker tree was killed
    CANCELLED = "CANCELLED"


#: Precedence when several outcomes apply: earlier wins.
PRECEDENCE: tuple[Outcome, ...] = (
    Outcome.CANCELLED,
    Outcome.TIMEOUT,
    Outcome.MEMORY_LIMIT,
    Outcome.CPU_LIMIT,
    Outcome.OUTPUT_LIMIT,
    Outcome.CRASHED,
    Outcome.FUNCTION_ERROR,
    Outcome.OK,
)


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What went wrong, for every outcome but ``OK``.

    ``type`` is the exception's qualified name for ``FUNCTION_ERROR`` (``"ValueError"``,
    ``"SystemExit"``), and a descriptive name of ours otherwise (``"Timeout"``,
    ``"KilledBySignal"``, ``"ProtocolViolation"``...). ``traceback`` is the function's own
    formatted traceback when there is one, else ``""``.
    """

    type: str
    message: str
    traceback: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """Where the time and memory of one invocation went. Times are seconds.

    Attributes:
        queue_s: waiting for admission (a free concurrency slot).
        startup_s: waiting for a ready worker (0 when a warm one was idle).
        run_s: from sending the event to the worker until the outcome was known.
        cpu_s: CPU time of the worker tree (user + system), when measured.
        peak_memory_bytes: peak memory of the worker tree (cgroup) or of the worker (rusage).
        cold_start: a zygote had to be started for this invocation.
        forked_on_demand: no warm worker was idle; one was forked for this invocation.
        worker_pid: the worker's pid (as seen by the supervisor).
        worker_invocations: how many invocations this worker has served, this one included.
        function_s: the handler's own run, measured in the worker (None if it never
            finished): ``run_s - function_s`` is what the isolation cost this call.
        node: the server that ran it (its ``--node-name``), for results that came over gRPC;
            empty in process.
    """

    queue_s: float = 0.0
    startup_s: float = 0.0
    run_s: float = 0.0
    cpu_s: float | None = None
    peak_memory_bytes: int | None = None
    cold_start: bool = False
    forked_on_demand: bool = False
    worker_pid: int | None = None
    worker_invocations: int = 1
    function_s: float | None = None
    node: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class InvocationResult:
    """The one terminal outcome of an invocation.

    ``result`` is the decoded return value for ``OK`` (``None`` otherwise, and ``None`` for a
    generator function, whose values arrive as chunks). ``result_bytes`` is the same value as
    the worker encoded it (msgpack, or JSON when the call asked for JSON), so a server can pass
    it through without decoding it.
    """

    id: str
    outcome: Outcome
    result: Any = None
    result_bytes: bytes = b""
    error: ErrorInfo | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    chunks: int = 0
    stats: Stats = dataclasses.field(default_factory=Stats)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def unwrap(self) -> Any:
        """The result if ``OK``, else raise :class:`sandbox.errors.InvocationFailed`."""
        if self.outcome is Outcome.OK:
            return self.result
        from sandbox.errors import InvocationFailed

        raise InvocationFailed(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape shared by ``sandbox run`` and ``sandbox invoke``."""
        return {
            "id": self.id,
            "outcome": self.outcome.value,
            "result": self.result,
            "error": None if self.error is None else self.error.to_dict(),
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "chunks": self.chunks,
            "stats": self.stats.to_dict(),
        }

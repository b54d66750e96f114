"""The runtime's one observation hook: what happened, told to whoever listens.

::

    AsyncRuntime ──▶ Observers (fan-out) ──▶ Metrics      (sandbox.metrics: Prometheus)
    Pool ───────────┘                    ├─▶ AccessLog    (sandbox.logs: one line per call)
                                         └─▶ Tracing      (sandbox.tracing: OpenTelemetry)

The runtime and its pools know nothing of Prometheus, logging formats or OpenTelemetry: they
call the few methods of :class:`Observer` (an invocation began, an invocation ended, a worker
was born, a birth failed, a zygote started, a call was refused) on an :class:`Observers`
fan-out, which costs one truth test when nobody listens. Gauges (pool sizes, queue depth) are
not events: a collector reads :meth:`sandbox.runtime.AsyncRuntime.gauges` when it is scraped.

Where a call came from (the gRPC peer, the W3C trace context of its metadata) is not the
runtime's business either: the server puts an :class:`Origin` in :data:`CALL_ORIGIN` (a context
variable) before it calls the runtime, and the runtime copies it into the call's
:class:`InvocationRecord` when it admits the call.

Nothing here imports more than the standard library: an observer that needs Prometheus or
OpenTelemetry lives in its own module, imported only when it is used.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sandbox._logging import get_logger
from sandbox.errors import FunctionNotFound, Overloaded, ShuttingDown

if TYPE_CHECKING:
    from sandbox.outcome import InvocationResult

__all__ = [
    "CALL_ORIGIN",
    "REJECTION_REASONS",
    "InvocationRecord",
    "Observer",
    "Observers",
    "Origin",
    "otel_requested",
    "rejection_reason",
    "trace_id_from_traceparent",
]

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """Where a call came from: set by the server, read by observers (never by the runtime)."""

    #: the caller's address as gRPC names it (``ipv4:127.0.0.1:5555``, ``unix:...``)
    peer: str = ""
    #: W3C trace context headers of the call (``traceparent``, ``tracestate``), if any
    trace_headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


#: The origin of the calls made in this context (the server sets it per RPC).
CALL_ORIGIN: contextvars.ContextVar[Origin | None] = contextvars.ContextVar(
    "sandbox_call_origin", default=None)


@dataclasses.dataclass(slots=True)
class InvocationRecord:
    """One admitted invocation, as observers see it: made when the call is admitted, given to
    :meth:`Observer.invocation_started` and then to :meth:`Observer.invocation_finished` with
    its result. Never the event, the result or the captured output."""

    id: str
    function: str
    version: int
    profile: str
    #: the effective memory limit (bytes), None when unlimited
    memory_bytes: int | None
    #: ``time.time_ns()`` when the call was admitted
    start_ns: int
    origin: Origin | None = None
    #: handed to the function as ``context.trace_id``: set by a tracing observer, else taken
    #: from the caller's ``traceparent``
    trace_id: str | None = None
    #: observers' own per-call state (e.g. a span), keyed by observer
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)


class Observer:
    """What the runtime tells its observers; every method does nothing here. Called on the
    runtime's event loop, so an implementation must be quick and must not block."""

    def invocation_started(self, record: InvocationRecord) -> None:
        """A call was admitted (it may still wait in the queue)."""

    def invocation_finished(self, record: InvocationRecord, result: InvocationResult) -> None:
        """A call ended with ``result`` (every admitted call ends here or in
        :meth:`invocation_failed`, exactly once)."""

    def invocation_failed(self, record: InvocationRecord, error: BaseException) -> None:
        """An admitted call ended without a result: an error of the call itself (no worker
        could be born for it, say)."""

    def rejected(self, reason: str, function: str) -> None:
        """A call was refused before admission (``reason`` from :data:`REJECTION_REASONS`)."""

    def worker_born(self, profile: str, seconds: float) -> None:
        """A worker of ``profile`` is ready, ``seconds`` after it was requested."""

    def birth_failed(self, profile: str, error: BaseException) -> None:
        """A birth of the pool's (a warm-up or one a caller waits for) failed."""

    def zygote_started(self, profile: str, pid: int, replacement: bool) -> None:
        """A zygote of ``profile`` is ready; ``replacement``: an earlier one died."""

    def async_event(self, event: str, function: str) -> None:
        """Something happened to an asynchronous invocation of ``function`` (``event`` from
        :data:`ASYNC_EVENTS`: queued, started, retried, succeeded, failed, dead_lettered,
        cancelled, redriven, crashed)."""


class Observers(Observer):
    """The runtime's fan-out: each event to every observer, in the order they were added. An
    observer that raises is logged and skipped: observing never breaks a call."""

    def __init__(self) -> None:
        self._observers: tuple[Observer, ...] = ()

    def __bool__(self) -> bool:
        return bool(self._observers)

    def add(self, observer: Observer) -> None:
        if not isinstance(observer, Observer):
            raise TypeError(f"an observer must subclass sandbox.observe.Observer, got "
                            f"{type(observer).__name__}")
        self._observers = (*self._observers, observer)

    def remove(self, observer: Observer) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def _each(self, method: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("observer %s failed in %s", type(observer).__name__, method)

    def invocation_started(self, record: InvocationRecord) -> None:
        self._each("invocation_started", record)
        if record.trace_id is None and record.origin is not None:
            traceparent = record.origin.trace_headers.get("traceparent")
            if traceparent is not None:
                record.trace_id = trace_id_from_traceparent(traceparent)

    def invocation_finished(self, record: InvocationRecord, result: InvocationResult) -> None:
        self._each("invocation_finished", record, result)

    def invocation_failed(self, record: InvocationRecord, error: BaseException) -> None:
        self._each("invocation_failed", record, error)

    def rejected(self, reason: str, function: str) -> None:
        self._each("rejected", reason, function)

    def worker_born(self, profile: str, seconds: float) -> None:
        self._each("worker_born", profile, seconds)

    def birth_failed(self, profile: str, error: BaseException) -> None:
        self._each("birth_failed", profile, error)

    def zygote_started(self, profile: str, pid: int, replacement: bool) -> None:
        self._each("zygote_started", profile, pid, replacement)

    def async_event(self, event: str, function: str) -> None:
        self._each("async_event", event, function)


#: What happens to asynchronous invocations (``sandbox_async_invocations_total{event}``):
#: queued (accepted), started (an attempt began), retried (an attempt failed; another will
#: come), succeeded, failed (an outcome the policy does not retry), dead_lettered, cancelled,
#: redriven, crashed (an attempt's lease expired without an outcome: its supervisor died).
ASYNC_EVENTS = ("queued", "started", "retried", "succeeded", "failed", "dead_lettered",
                "cancelled", "redriven", "crashed")

#: Why a call was refused before it was admitted (``sandbox_rejected_total{reason}``).
REJECTION_REASONS = ("overloaded", "shutting_down", "not_found", "invalid_request")


def rejection_reason(exc: BaseException) -> str:
    """The :data:`REJECTION_REASONS` entry for an error of the call."""
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, ShuttingDown):
        return "shutting_down"
    if isinstance(exc, FunctionNotFound):
        return "not_found"
    return "invalid_request"  # InvalidRequest, ConfigurationError: the request's fault


_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def trace_id_from_traceparent(value: str) -> str | None:
    """The trace id of a W3C ``traceparent`` header (32 lowercase hex digits), or None when the
    header is malformed, all zeros or of the reserved version ``ff``."""
    match = _TRACEPARENT.match(value.strip())
    if match is None or match.group(1) == "ff" or match.group(2) == "0" * 32 \
            or match.group(3) == "0" * 16:
        return None
    return match.group(2)


def otel_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for OpenTelemetry traces (standard variables:
    ``OTEL_TRACES_EXPORTER`` other than ``none``, or an OTLP endpoint; never when
    ``OTEL_SDK_DISABLED`` is true). Imports nothing."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))

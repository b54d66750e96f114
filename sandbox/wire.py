"""The wire conversions between the embedded vocabulary and the proto messages, in one place:
the server and the client both use them (the client does not import the server).

Limits field for field (unset is unlimited), outcomes by name, results with their stats, and
the source formats of a deployment.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
from sandbox.errors import InvalidRequest
from sandbox.limits import Limits
from sandbox.outcome import ErrorInfo, InvocationResult, Outcome, Stats
from sandbox.store import SourceFormat

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "REFUSED_METADATA_KEY",
    "limits_from_proto",
    "limits_to_proto",
    "result_from_proto",
    "result_to_proto",
    "source_format_from_proto",
    "source_format_to_proto",
]

CONTENT_TYPES = ("application/msgpack", "application/json")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Trailing metadata of a call the server refused before running anything (the value says why,
#: e.g. ``draining``): a client may send it again, even an invocation that is not idempotent.
REFUSED_METADATA_KEY = "sandbox-refused"

_OUTCOME_TO_PROTO: dict[Outcome, pb.Outcome] = {
    o: getattr(pb, f"OUTCOME_{o.value}") for o in Outcome}
_OUTCOME_FROM_PROTO: dict[int, Outcome] = {int(v): k for k, v in _OUTCOME_TO_PROTO.items()}
_LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(Limits))
_FORMAT_TO_PROTO: dict[str, pb.SourceFormat] = {"python": pb.SOURCE_FORMAT_PYTHON,
                                     "zip": pb.SOURCE_FORMAT_ZIP}
_FORMAT_FROM_PROTO: dict[int, SourceFormat] = {pb.SOURCE_FORMAT_PYTHON: "python",
                                               pb.SOURCE_FORMAT_ZIP: "zip"}


def limits_to_proto(limits: Limits | None) -> pb.Limits | None:
    """``None`` fields stay unset; ``network`` is set only when true."""
    if limits is None:
        return None
    msg = pb.Limits()
    for name in _LIMIT_FIELDS:
        value = getattr(limits, name)
        if value is not None and (name != "network" or value):
            setattr(msg, name, value)
    return msg


def limits_from_proto(msg: pb.Limits, present: bool = True) -> Limits | None:
    """Unset fields become ``None`` (inherit). Raises InvalidRequest naming a bad field."""
    if not present:
        return None
    values: dict[str, Any] = {name: getattr(msg, name) for name in _LIMIT_FIELDS
                              if msg.HasField(name)}
    for name in ("wall_timeout_s", "cpu_time_s"):
        if name in values and not math.isfinite(values[name]):
            raise InvalidRequest(f"Limits.{name} must be finite, got {values[name]!r}")
    try:
        return Limits(**values)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None


def result_to_proto(result: InvocationResult, content_type: str, node: str = ""
                    ) -> pb.InvokeResponse:
    """``node``: the server's name, for ``stats.node`` (the result's own when empty)."""
    s = result.stats
    stats = pb.Stats(queue_s=s.queue_s, startup_s=s.startup_s, run_s=s.run_s,
                     cold_start=s.cold_start, forked_on_demand=s.forked_on_demand,
                     worker_invocations=s.worker_invocations, node=node or s.node)
    if s.cpu_s is not None:
        stats.cpu_s = s.cpu_s
    if s.peak_memory_bytes is not None:
        stats.peak_memory_bytes = s.peak_memory_bytes
    if s.worker_pid is not None:
        stats.worker_pid = s.worker_pid
    if s.function_s is not None:
        stats.function_s = s.function_s
    msg = pb.InvokeResponse(
        id=result.id, outcome=_OUTCOME_TO_PROTO[result.outcome], payload=result.result_bytes,
        content_type=content_type, stdout=result.stdout, stderr=result.stderr,
        stdout_truncated=result.stdout_truncated, stderr_truncated=result.stderr_truncated,
        chunks=result.chunks, stats=stats)
    if result.error is not None:
        msg.error.CopyFrom(pb.ErrorInfo(type=result.error.type, message=result.error.message,
                                        traceback=result.error.traceback))
    return msg


def result_from_proto(msg: pb.InvokeResponse,
                      decode: Callable[[bytes, str], Any] | None = None) -> InvocationResult:
    """The embedded vocabulary for a result off the wire; ``decode(payload, content_type)``
    fills ``result`` for an OK outcome."""
    outcome = _OUTCOME_FROM_PROTO.get(msg.outcome)
    if outcome is None:
        raise InvalidRequest(f"the server sent an unknown outcome {msg.outcome}")
    s = msg.stats
    stats = Stats(
        queue_s=s.queue_s, startup_s=s.startup_s, run_s=s.run_s,
        cpu_s=s.cpu_s if s.HasField("cpu_s") else None,
        peak_memory_bytes=s.peak_memory_bytes if s.HasField("peak_memory_bytes") else None,
        cold_start=s.cold_start, forked_on_demand=s.forked_on_demand,
        worker_pid=s.worker_pid if s.HasField("worker_pid") else None,
        worker_invocations=s.worker_invocations,
        function_s=s.function_s if s.HasField("function_s") else None, node=s.node)
    error = (ErrorInfo(msg.error.type, msg.error.message, msg.error.traceback)
             if msg.HasField("error") else None)
    value = None
    if outcome is Outcome.OK and decode is not None and msg.payload:
        value = decode(msg.payload, msg.content_type or CONTENT_TYPES[0])
    return InvocationResult(
        id=msg.id, outcome=outcome, result=value, result_bytes=msg.payload, error=error,
        stdout=msg.stdout, stderr=msg.stderr, stdout_truncated=msg.stdout_truncated,
        stderr_truncated=msg.stderr_truncated, chunks=msg.chunks, stats=stats)


def source_format_to_proto(fmt: str | None) -> pb.SourceFormat:
    return _FORMAT_TO_PROTO.get(fmt or "", pb.SOURCE_FORMAT_UNSPECIFIED)


def source_format_from_proto(value: int) -> SourceFormat | None:
    return _FORMAT_FROM_PROTO.get(value)



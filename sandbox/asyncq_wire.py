"""Wire conversions of asynchronous invocations (:mod:`sandbox.asyncq`): policies, states,
attempts and invocations, for the server and the client alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2

from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
from sandbox.asyncq import AsyncPolicy, Attempt, InvocationState, QueuedInvocation
from sandbox.errors import InvalidRequest
from sandbox.outcome import ErrorInfo, Outcome
from sandbox.wire import result_from_proto, result_to_proto

__all__ = ["invocation_from_proto", "invocation_to_proto", "policy_fields_from_proto",
           "policy_to_proto", "state_from_proto", "state_to_proto"]

_STATE_TO_PROTO: dict[InvocationState, pb.InvocationState] = {
    s: getattr(pb, f"INVOCATION_STATE_{s.value}") for s in InvocationState}
_STATE_FROM_PROTO = {int(v): k for k, v in _STATE_TO_PROTO.items()}
_OUTCOME_TO_PROTO: dict[Outcome, pb.Outcome] = {
    o: getattr(pb, f"OUTCOME_{o.value}") for o in Outcome}
_OUTCOME_FROM_PROTO = {int(v): k for k, v in _OUTCOME_TO_PROTO.items()}
_SCALARS = ("max_retries", "max_event_age_s", "backoff_initial_s", "backoff_multiplier",
            "backoff_max_s", "jitter", "retention_s")


def state_to_proto(state: InvocationState | None) -> pb.InvocationState:
    return pb.INVOCATION_STATE_UNSPECIFIED if state is None else _STATE_TO_PROTO[state]


def state_from_proto(value: int) -> InvocationState | None:
    """None for UNSPECIFIED. Raises InvalidRequest for an unknown value."""
    if value == 0:
        return None
    state = _STATE_FROM_PROTO.get(value)
    if state is None:
        raise InvalidRequest(f"unknown invocation state {value}")
    return state


def policy_fields_from_proto(msg: pb.AsyncPolicy) -> dict[str, Any]:
    """The fields set in ``msg`` (unset ones are left to the function's policy or the
    defaults). Raises InvalidRequest for an unknown outcome."""
    fields: dict[str, Any] = {}
    for name in _SCALARS:
        if msg.HasField(name):
            fields[name] = getattr(msg, name)
    if msg.HasField("retry_on"):
        outcomes = []
        for value in msg.retry_on.outcomes:
            outcome = _OUTCOME_FROM_PROTO.get(value)
            if outcome is None:
                raise InvalidRequest(f"async policy: retry_on: unknown outcome {value}")
            outcomes.append(outcome.value)
        fields["retry_on"] = sorted(set(outcomes))
    return fields


def policy_to_proto(policy: AsyncPolicy | dict[str, Any]) -> pb.AsyncPolicy:
    """A whole policy (every field set), or only the fields of a dict."""
    fields = policy.to_dict() if isinstance(policy, AsyncPolicy) else dict(policy)
    msg = pb.AsyncPolicy()
    for name in _SCALARS:
        if fields.get(name) is not None:
            setattr(msg, name, fields[name])
    if fields.get("retry_on") is not None:
        msg.retry_on.CopyFrom(pb.OutcomeSet(outcomes=[
            _OUTCOME_TO_PROTO[Outcome(o)] for o in sorted(fields["retry_on"])]))
    return msg


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return float(stamp.ToNanoseconds()) / 1e9


def _attempt_to_proto(attempt: Attempt, content_type: str) -> pb.Attempt:
    msg = pb.Attempt(number=attempt.number, start_time=_stamp(attempt.started),
                     node=attempt.node, charged=attempt.charged,
                     outcome=pb.OUTCOME_UNSPECIFIED if attempt.outcome is None
                     else _OUTCOME_TO_PROTO[attempt.outcome])
    if attempt.ended is not None:
        msg.end_time.CopyFrom(_stamp(attempt.ended))
    if attempt.error is not None:
        msg.error.CopyFrom(pb.ErrorInfo(type=attempt.error.type, message=attempt.error.message,
                                        traceback=attempt.error.traceback))
    if attempt.stats is not None:
        from sandbox.outcome import InvocationResult

        stats = result_to_proto(InvocationResult("", Outcome.OK, stats=attempt.stats),
                                content_type).stats
        msg.stats.CopyFrom(stats)
    return msg


def invocation_to_proto(inv: QueuedInvocation) -> pb.AsyncInvocation:
    msg = pb.AsyncInvocation(
        id=inv.id, function=inv.function, version=inv.version,
        state=state_to_proto(inv.state), create_time=_stamp(inv.created),
        update_time=_stamp(inv.updated),
        attempts=[_attempt_to_proto(a, inv.content_type) for a in inv.attempts],
        reason=inv.reason, idempotency_key=inv.idempotency_key or "",
        policy=policy_to_proto(inv.policy), redrives=inv.redrives,
        content_type=inv.content_type)
    if inv.finished is not None:
        msg.end_time.CopyFrom(_stamp(inv.finished))
    if inv.next_attempt_at is not None:
        msg.next_attempt_time.CopyFrom(_stamp(inv.next_attempt_at))
    if inv.result is not None:
        msg.result.CopyFrom(result_to_proto(inv.result, inv.content_type))
    return msg


def invocation_from_proto(msg: pb.AsyncInvocation,
                          decode: Callable[[bytes, str], Any] | None = None
                          ) -> QueuedInvocation:
    attempts = []
    for a in msg.attempts:
        stats = None
        if a.HasField("stats"):
            stats = result_from_proto(pb.InvokeResponse(outcome=pb.OUTCOME_OK, stats=a.stats)
                                      ).stats
        attempts.append(Attempt(
            number=a.number, started=_seconds(a.start_time),
            ended=_seconds(a.end_time) if a.HasField("end_time") else None,
            outcome=_OUTCOME_FROM_PROTO.get(a.outcome),
            error=ErrorInfo(a.error.type, a.error.message, a.error.traceback)
            if a.HasField("error") else None,
            stats=stats, node=a.node, charged=a.charged))
    policy = AsyncPolicy.from_dict(policy_fields_from_proto(msg.policy))
    state = state_from_proto(msg.state) or InvocationState.QUEUED
    result = result_from_proto(msg.result, decode) if msg.HasField("result") else None
    if result is not None:
        result = dataclasses.replace(result, id=msg.id)
    return QueuedInvocation(
        id=msg.id, function=msg.function, version=msg.version, state=state,
        created=_seconds(msg.create_time), updated=_seconds(msg.update_time),
        content_type=msg.content_type or "application/msgpack", policy=policy,
        attempts=tuple(attempts), result=result, reason=msg.reason,
        idempotency_key=msg.idempotency_key or None, redrives=msg.redrives,
        next_attempt_at=_seconds(msg.next_attempt_time)
        if msg.HasField("next_attempt_time") else None,
        finished=_seconds(msg.end_time) if msg.HasField("end_time") else None)


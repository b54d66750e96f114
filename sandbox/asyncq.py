"""Asynchronous invocations: a durable queue, retries, dead letters, results by id.

::

    invoke_async(name, event) ─▶ validate (function, version, payload, limits: NOT_FOUND /
        INVALID_ARGUMENT now, never later) ─▶ bound (RESOURCE_EXHAUSTED) ─▶ queue row QUEUED
        ─▶ id returned at once

    Dispatcher (one per runtime): claim ≤ free slots ─▶ row RUNNING, attempt n recorded, lease
        ─▶ AsyncRuntime.submit (shares admission with synchronous calls, at most
        ``concurrency`` async attempts at once) ─▶ outcome recorded ─▶ SUCCEEDED | QUEUED
        (retry after backoff) | FAILED | DEAD_LETTERED
        heartbeat: leases renewed while attempts run; an invocation cancelled (or lost) under
        a running attempt has its worker killed

**At-least-once.** An attempt is recorded (``RUNNING``, attempt *n*, a lease) *before* it runs
and its outcome *after*. A supervisor that dies between the two leaves an attempt whose
outcome is unknown: when its lease expires (single node: at the next start, since the state
directory has one owner) it counts as an attempt with outcome ``CRASHED`` ("the supervisor
stopped during the attempt") and the invocation is retried if the policy allows. So a
function may run more than once for one id (make it idempotent: ``context.invocation_id`` is
the async id); each id still ends with exactly one terminal state and one result, because an
outcome is only recorded by the holder of the attempt's lease (the attempt number fences it).

States: ``QUEUED`` → ``RUNNING`` → ``SUCCEEDED`` (outcome OK) | ``QUEUED`` again (a retried
outcome, after a backoff with jitter) | ``FAILED`` (an outcome the policy does not retry) |
``DEAD_LETTERED`` (retries exhausted, or ``max_event_age_s`` passed) | ``CANCELLED``.
``redrive`` puts a dead letter back in the queue with a fresh attempt budget (the old attempts
stay in its history). Terminal invocations are purged ``retention_s`` after they ended; an
``idempotency_key`` is unique per function while its invocation is kept.

Backends: :class:`sandbox.asyncq_sqlite.SqliteQueue` (single node, WAL, in the state
directory) and :class:`sandbox.asyncq_pg.PostgresQueue` (a fleet: ``FOR UPDATE SKIP LOCKED``
claims with leases, so any replica takes work and a dead replica's attempts are retried once
their lease expires). Both share the SQL and the decisions of :class:`SqlQueue`. The tables'
version is in ``sandbox_async_schema``: created or migrated at open, and a queue written by a
newer sandbox than this one is refused rather than misread.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import enum
import json
import math
import os
import random
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from sandbox._logging import get_logger
from sandbox.errors import (
    ConfigurationError,
    FunctionNotFound,
    InvalidRequest,
    Overloaded,
    SandboxError,
    ShuttingDown,
)
from sandbox.limits import Limits
from sandbox.outcome import ErrorInfo, InvocationResult, Outcome, Stats

if TYPE_CHECKING:
    from sandbox.runtime import AsyncInvocation, AsyncRuntime

__all__ = [
    "DEFAULT_RETRY_ON",
    "TERMINAL_STATES",
    "AsyncPolicy",
    "Attempt",
    "Claim",
    "Dispatcher",
    "InvocationNotFound",
    "InvocationState",
    "NewInvocation",
    "QueuedInvocation",
    "SqlQueue",
]

log = get_logger(__name__)


class InvocationNotFound(FunctionNotFound):
    """No asynchronous invocation by that id (never queued, or purged after its retention).
    A :class:`FunctionNotFound` so it maps to ``NOT_FOUND`` like every lookup."""


class InvocationState(enum.StrEnum):
    """Where an asynchronous invocation is."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    #: ended with an outcome the policy does not retry
    FAILED = "FAILED"
    #: retries exhausted, or ``max_event_age_s`` passed (``reason`` says which)
    DEAD_LETTERED = "DEAD_LETTERED"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = frozenset({InvocationState.SUCCEEDED, InvocationState.FAILED,
                             InvocationState.DEAD_LETTERED, InvocationState.CANCELLED})

#: Outcomes retried by default: every one but OK and CANCELLED.
DEFAULT_RETRY_ON = frozenset(Outcome) - {Outcome.OK, Outcome.CANCELLED}

#: Bounds of the policy's fields.
MAX_RETRIES = 100
MAX_EVENT_AGE_S = 7 * 24 * 3600.0
MAX_RETENTION_S = 30 * 24 * 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class AsyncPolicy:
    """How a function's asynchronous invocations are retried and kept (set at deploy or
    register; a call may override fields).

    Attributes:
        max_retries: attempts after the first (an invocation gets ``1 + max_retries``).
        max_event_age_s: an invocation not finished this long after it was queued is
            dead-lettered (checked before each attempt and before each retry).
        retry_on: the outcomes that are retried (default: all but OK and CANCELLED); an
            attempt that ended otherwise makes the invocation FAILED.
        backoff_initial_s, backoff_multiplier, backoff_max_s: the delay before retry *n* is
            ``min(max, initial x multiplier^(n-1))``...
        jitter: ...less a random part of it, up to this fraction (0: none, 1: "full jitter").
        retention_s: terminal invocations (their results and attempts) are kept this long.
    """

    max_retries: int = 2
    max_event_age_s: float = 6 * 3600.0
    retry_on: frozenset[Outcome] = DEFAULT_RETRY_ON
    backoff_initial_s: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max_s: float = 300.0
    jitter: float = 0.5
    retention_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float, *, low_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < low or value > high \
                    or (low_open and value == low):
                bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
                raise InvalidRequest(f"async policy: {name} must be a number in {bound}, got "
                                     f"{value!r}")

        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or not 0 <= self.max_retries <= MAX_RETRIES:
            raise InvalidRequest(f"async policy: max_retries must be an int in [0, "
                                 f"{MAX_RETRIES}], got {self.max_retries!r}")
        number("max_event_age_s", 0.0, MAX_EVENT_AGE_S, low_open=True)
        number("backoff_initial_s", 0.0, 3600.0)
        number("backoff_multiplier", 1.0, 100.0)
        number("backoff_max_s", 0.0, 24 * 3600.0)
        number("jitter", 0.0, 1.0)
        number("retention_s", 0.0, MAX_RETENTION_S)
        try:
            retry_on = frozenset(Outcome(o) for o in self.retry_on)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"async policy: retry_on: {exc}") from None
        if Outcome.OK in retry_on:
            raise InvalidRequest("async policy: retry_on cannot include OK")
        object.__setattr__(self, "retry_on", retry_on)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The delay before retry number ``retry`` (1 for the first retry), jitter included."""
        base = min(self.backoff_max_s,
                   self.backoff_initial_s * self.backoff_multiplier ** max(0, retry - 1))
        return base * (1.0 - self.jitter * (rng or random).random())

    def replace(self, **changes: Any) -> AsyncPolicy:
        """This policy with some fields changed (validated)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InvalidRequest(f"async policy: unknown field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["retry_on"] = sorted(o.value for o in self.retry_on)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AsyncPolicy:
        """A policy from :meth:`to_dict`'s shape; absent fields take the defaults.

        Raises:
            InvalidRequest: an unknown field or a bad value.
        """
        return cls().replace(**dict(data))


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of an asynchronous invocation.

    ``outcome`` is None while it runs, and for an attempt that ended without running the
    function (its function not found on the node that claimed it); ``error`` then says why.
    An attempt interrupted by a graceful shutdown is recorded with ``charged=False``: it does
    not count against the retry budget.
    """

    number: int
    started: float
    ended: float | None = None
    outcome: Outcome | None = None
    error: ErrorInfo | None = None
    stats: Stats | None = None
    node: str = ""
    charged: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "started": self.started, "ended": self.ended,
                "outcome": None if self.outcome is None else self.outcome.value,
                "error": None if self.error is None else self.error.to_dict(),
                "stats": None if self.stats is None else self.stats.to_dict(),
                "node": self.node, "charged": self.charged}


@dataclasses.dataclass(frozen=True, slots=True)
class QueuedInvocation:
    """An asynchronous invocation as the queue knows it.

    Attributes:
        id: returned by ``invoke_async``; also the ``context.invocation_id`` of its attempts.
        state: see :class:`InvocationState`.
        attempts: every attempt, oldest first (a redriven invocation keeps its old ones).
        result: the final result (the last attempt's) once SUCCEEDED, FAILED or
            DEAD_LETTERED after an attempt; None otherwise.
        reason: why it is FAILED, DEAD_LETTERED or CANCELLED.
        next_attempt_at: when a QUEUED invocation may start (after a retry's backoff).
        duplicate: ``invoke_async`` found an invocation with the same idempotency key.
    """

    id: str
    function: str
    version: int
    state: InvocationState
    created: float
    updated: float
    content_type: str
    policy: AsyncPolicy
    attempts: tuple[Attempt, ...] = ()
    result: InvocationResult | None = None
    reason: str = ""
    idempotency_key: str | None = None
    redrives: int = 0
    next_attempt_at: float | None = None
    finished: float | None = None
    duplicate: bool = False

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "function": self.function, "version": self.version,
            "state": self.state.value, "created": self.created, "updated": self.updated,
            "finished": self.finished, "reason": self.reason,
            "idempotency_key": self.idempotency_key, "redrives": self.redrives,
            "next_attempt_at": self.next_attempt_at, "content_type": self.content_type,
            "attempts": [a.to_dict() for a in self.attempts],
            "result": None if self.result is None else self.result.to_dict(),
            "policy": self.policy.to_dict(),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class NewInvocation:
    """What ``invoke_async`` queues (validated before)."""

    id: str
    function: str
    version: int
    payload: bytes
    content_type: str
    limits: Limits | None
    policy: AsyncPolicy
    idempotency_key: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """An attempt a dispatcher holds the lease of."""

    id: str
    function: str
    version: int
    payload: bytes
    content_type: str
    limits: Limits | None
    attempt: int
    created: float


# ---------------------------------------------------------------------------------------------
# Encoding of what is stored

def new_id() -> str:
    """32 hex digits: milliseconds since the epoch (12), then 80 random bits: ids sort by
    submission time, which listing pages use."""
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def encode_result(result: InvocationResult) -> bytes:
    data = {
        "outcome": result.outcome.value, "result_bytes": result.result_bytes,
        "error": None if result.error is None else result.error.to_dict(),
        "stdout": result.stdout, "stderr": result.stderr,
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated, "chunks": result.chunks,
        "stats": result.stats.to_dict(),
    }
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def _decode_value(data: bytes, content_type: str) -> Any:
    if not data:
        return None
    try:
        if content_type == "application/json":
            return json.loads(data)
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None


def decode_result(invocation_id: str, blob: bytes | None, content_type: str
                  ) -> InvocationResult | None:
    if not blob:
        return None
    data = msgpack.unpackb(bytes(blob), raw=False)
    error = data.get("error")
    raw = bytes(data.get("result_bytes") or b"")
    return InvocationResult(
        id=invocation_id, outcome=Outcome(data["outcome"]),
        result=_decode_value(raw, content_type), result_bytes=raw,
        error=None if error is None else ErrorInfo(**error),
        stdout=data.get("stdout", ""), stderr=data.get("stderr", ""),
        stdout_truncated=bool(data.get("stdout_truncated")),
        stderr_truncated=bool(data.get("stderr_truncated")),
        chunks=int(data.get("chunks", 0)), stats=Stats(**data.get("stats", {})))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _error_json(error: ErrorInfo | None) -> str | None:
    return None if error is None else _dumps(error.to_dict())


def _limits_json(limits: Limits | None) -> str:
    if limits is None:
        return ""
    return _dumps({k: v for k, v in limits.to_dict().items() if v is not None})


def _limits_from(text: str) -> Limits | None:
    return Limits.from_dict(json.loads(text)) if text else None


# ---------------------------------------------------------------------------------------------
# Decisions: the same for every backend

@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    state: InvocationState
    not_before: float | None = None
    reason: str = ""
    #: the event logged and counted: succeeded, retried, failed, dead_lettered
    event: str = ""


def decide(policy: AsyncPolicy, charged: int, outcome: Outcome | None, error: ErrorInfo | None,
           now: float, expires_at: float) -> Decision:
    """What follows an attempt that ended with ``outcome`` (None: the function could not be
    run at all, retried like a retryable outcome), ``charged`` attempts having counted
    against the budget so far (this one included)."""
    if outcome is Outcome.OK:
        return Decision(InvocationState.SUCCEEDED, event="succeeded")
    what = outcome.value if outcome is not None else (error.type if error else "no outcome")
    if outcome is not None and outcome not in policy.retry_on:
        return Decision(InvocationState.FAILED, reason=f"the attempt ended {what}, an outcome "
                        "the policy does not retry", event="failed")
    if charged >= 1 + policy.max_retries:
        return Decision(InvocationState.DEAD_LETTERED,
                        reason=f"retries exhausted: {charged} attempt(s), the last ended {what}",
                        event="dead_lettered")
    delay = policy.backoff(charged)
    if now + delay >= expires_at:
        return Decision(InvocationState.DEAD_LETTERED,
                        reason=f"max_event_age_s ({policy.max_event_age_s:g} s) passes before "
                               f"the next attempt; the last ended {what}",
                        event="dead_lettered")
    return Decision(InvocationState.QUEUED, not_before=now + delay, event="retried")


CRASHED_ERROR = ErrorInfo("SupervisorStopped", "the supervisor stopped during the attempt (its "
                          "lease expired without an outcome recorded)")
INTERRUPTED_ERROR = ErrorInfo("Interrupted", "the server shut down during the attempt; it is "
                              "retried without counting against the budget")
NOT_STARTED_ERROR = ErrorInfo("NotStarted", "the invocation was cancelled before the attempt "
                              "started")
AGED_OUT = "max_event_age_s passed before an attempt could start"


# ---------------------------------------------------------------------------------------------
# The queue interface, in SQL (SQLite and PostgreSQL)

#: Events of the queue, each with its function: counted (metrics) and logged by the caller.
Events = list[tuple[str, str, str]]


#: The version of the queue's tables this code reads and writes; each step up is a migration
#: in :meth:`SqlQueue._create_schema`.
SCHEMA_VERSION = 1


class SqlQueue(abc.ABC):
    """The durable queue over a DB-API connection. Subclasses provide connections and
    transactions (``_transaction``), the placeholder style and the row locking clause.

    Every method is blocking; :class:`Dispatcher` and the runtime call them off the event loop
    (the SQLite queue in its one writer thread, PostgreSQL's in threads with a pool).
    """

    #: rows of this table and of the attempts table
    TABLE = "sandbox_async_invocations"
    ATTEMPTS = "sandbox_async_attempts"
    #: one row: the version of the tables (:data:`SCHEMA_VERSION` once opened)
    SCHEMA = "sandbox_async_schema"
    #: appended to the SELECTs that lock rows (``FOR UPDATE SKIP LOCKED`` in PostgreSQL)
    LOCK = ""
    LOCK_ROW = ""
    BLOB = "BLOB"
    REAL = "DOUBLE PRECISION"
    #: whether this process is the only one using the queue (single node): every RUNNING
    #: attempt found at open belonged to a dead process
    single_owner = False
    #: what the queue is, for logs (``sqlite:PATH``, ``postgresql://host/db``)
    description = ""

    def __init__(self, *, max_queued: int = 100_000, max_queued_per_function: int = 10_000
                 ) -> None:
        self.max_queued = max_queued
        self.max_queued_per_function = max_queued_per_function

    # -- backend --------------------------------------------------------------------------
    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A cursor inside a transaction, committed when the block ends (rolled back on an
        exception)."""

    def _sql(self, text: str) -> str:
        return text

    def open(self) -> None:
        """Create or migrate the schema."""
        with self._transaction() as cur:
            self._create_schema(cur)

    def close(self) -> None:  # noqa: B027
        """Release connections."""

    def shutdown(self) -> None:
        """Close, and stop the threads of :meth:`run` (waits for the calls in them)."""
        self.close()

    def _create_schema(self, cur: Any) -> None:
        """Create the tables, or migrate them to :data:`SCHEMA_VERSION` (the caller holds the
        transaction; PostgreSQL's also an advisory lock, so replicas migrate once).

        Raises:
            ConfigurationError: the queue's schema is newer than this sandbox understands.
        """
        cur.execute(f"CREATE TABLE IF NOT EXISTS {self.SCHEMA} (version INTEGER NOT NULL)")
        row = self._x(cur, f"SELECT version FROM {self.SCHEMA}").fetchone()
        # 0: no version row; the tables may still exist (a queue made before the version
        # table was), and the first version's statements all keep what is there
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the async queue in {self.description} has schema version {current}, newer "
                f"than this sandbox understands ({SCHEMA_VERSION}): upgrade sandbox")
        if current < 1:
            self._create_tables(cur)
        if row is None:
            self._x(cur, f"INSERT INTO {self.SCHEMA} (version) VALUES (?)", (SCHEMA_VERSION,))
        elif current != SCHEMA_VERSION:
            self._x(cur, f"UPDATE {self.SCHEMA} SET version = ?", (SCHEMA_VERSION,))
        if current != SCHEMA_VERSION:
            log.info("async queue %s: schema version %d", self.description, SCHEMA_VERSION)

    def _create_tables(self, cur: Any) -> None:
        """The tables of schema version 1."""
        t, a, blob, real = self.TABLE, self.ATTEMPTS, self.BLOB, self.REAL
        cur.execute(f"""CREATE TABLE IF NOT EXISTS {t} (
            id TEXT PRIMARY KEY, function TEXT NOT NULL, version INTEGER NOT NULL,
            payload {blob} NOT NULL, content_type TEXT NOT NULL, limits TEXT NOT NULL,
            policy TEXT NOT NULL, retention_s {real} NOT NULL, idempotency_key TEXT,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            charged INTEGER NOT NULL DEFAULT 0, redrives INTEGER NOT NULL DEFAULT 0,
            created {real} NOT NULL, updated {real} NOT NULL, not_before {real} NOT NULL,
            expires_at {real} NOT NULL, lease_until {real}, owner TEXT, finished {real},
            purge_at {real}, reason TEXT NOT NULL DEFAULT '', result {blob},
            UNIQUE (function, idempotency_key))""")
        cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_due ON {t} (state, not_before)")
        cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_function ON {t} (function, state)")
        cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_purge ON {t} (purge_at)")
        cur.execute(f"""CREATE TABLE IF NOT EXISTS {a} (
            invocation TEXT NOT NULL, number INTEGER NOT NULL, started {real} NOT NULL,
            ended {real}, outcome TEXT, error TEXT, stats TEXT, node TEXT NOT NULL,
            charged INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (invocation, number))""")

    # -- helpers --------------------------------------------------------------------------
    def _x(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(sql), tuple(params))
        return cur

    _COLUMNS = ("id, function, version, content_type, policy, idempotency_key, state, "
                "created, updated, not_before, reason, result, redrives, finished")

    def _row(self, cur: Any, row: Sequence[Any]) -> QueuedInvocation:
        (ident, function, version, content_type, policy, key, state, created, updated,
         not_before, reason, result, redrives, finished) = row
        attempts = []
        for (number, started, ended, outcome, error, stats, node, charged) in self._x(
                cur, f"SELECT number, started, ended, outcome, error, stats, node, charged "
                     f"FROM {self.ATTEMPTS} WHERE invocation = ? ORDER BY number",
                (ident,)).fetchall():
            attempts.append(Attempt(
                number=int(number), started=float(started),
                ended=None if ended is None else float(ended),
                outcome=None if outcome is None else Outcome(outcome),
                error=None if error is None else ErrorInfo(**json.loads(error)),
                stats=None if stats is None else Stats(**json.loads(stats)),
                node=node, charged=bool(charged)))
        st = InvocationState(state)
        return QueuedInvocation(
            id=ident, function=function, version=int(version), state=st,
            created=float(created), updated=float(updated), content_type=content_type,
            policy=AsyncPolicy.from_dict(json.loads(policy)), attempts=tuple(attempts),
            result=decode_result(ident, result, content_type), reason=reason,
            idempotency_key=key, redrives=int(redrives),
            next_attempt_at=float(not_before) if st is InvocationState.QUEUED else None,
            finished=None if finished is None else float(finished))

    def _get(self, cur: Any, ident: str, lock: bool = False) -> QueuedInvocation | None:
        row = self._x(cur, f"SELECT {self._COLUMNS} FROM {self.TABLE} WHERE id = ?"
                           f"{self.LOCK_ROW if lock else ''}", (ident,)).fetchone()
        return None if row is None else self._row(cur, row)

    # -- the API --------------------------------------------------------------------------
    def submit(self, item: NewInvocation, now: float) -> tuple[QueuedInvocation, Events]:
        """Queue ``item``, or return the invocation that has its idempotency key.

        Raises:
            Overloaded: too many invocations queued or running (of the function, or overall).
        """
        t = self.TABLE
        with self._transaction() as cur:
            if item.idempotency_key is not None:
                existing = self._existing(cur, item)
                if existing is not None:
                    return existing, []
            total, mine = self._x(cur, f"SELECT count(*), count(*) FILTER (WHERE function = ?) "
                                       f"FROM {t} WHERE state IN ('QUEUED', 'RUNNING')",
                                  (item.function,)).fetchone()
            if total >= self.max_queued:
                raise Overloaded(f"the async queue is full: {total} invocations queued or "
                                 f"running (max {self.max_queued})")
            if mine >= self.max_queued_per_function:
                raise Overloaded(f"the async queue of {item.function!r} is full: {mine} "
                                 f"invocations queued or running (max "
                                 f"{self.max_queued_per_function})")
            policy = item.policy
            cur = self._x(cur, f"""INSERT INTO {t} (id, function, version, payload, content_type,
                limits, policy, retention_s, idempotency_key, state, created, updated,
                not_before, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'QUEUED', ?, ?, ?, ?)
                ON CONFLICT DO NOTHING""",
                (item.id, item.function, item.version, item.payload, item.content_type,
                 _limits_json(item.limits), _dumps(policy.to_dict()), policy.retention_s,
                 item.idempotency_key, now, now, now, now + policy.max_event_age_s))
            if cur.rowcount != 1:
                existing = self._existing(cur, item)
                if existing is None:
                    raise InvalidRequest(f"invocation id {item.id!r} is already in use")
                return existing, []
            self._notify(cur)
        return (QueuedInvocation(
            id=item.id, function=item.function, version=item.version,
            state=InvocationState.QUEUED, created=now, updated=now,
            content_type=item.content_type, policy=policy,
            idempotency_key=item.idempotency_key, next_attempt_at=now),
            [("queued", item.id, item.function)])

    def _notify(self, cur: Any) -> None:  # noqa: B027
        """Tell idle dispatchers elsewhere that there is work."""

    def _existing(self, cur: Any, item: NewInvocation) -> QueuedInvocation | None:
        row = self._x(cur, f"SELECT {self._COLUMNS} FROM {self.TABLE} WHERE function = ? AND "
                           "idempotency_key = ?", (item.function, item.idempotency_key)
                      ).fetchone()
        if row is None:
            return None
        return dataclasses.replace(self._row(cur, row), duplicate=True)

    def get(self, ident: str) -> QueuedInvocation:
        """Raises InvocationNotFound."""
        with self._transaction() as cur:
            found = self._get(cur, ident)
        if found is None:
            raise InvocationNotFound(f"no asynchronous invocation with id {ident!r}")
        return found

    def page(self, function: str | None = None, state: InvocationState | None = None,
             page_size: int = 100, page_token: str = "") -> tuple[list[QueuedInvocation], str]:
        """Invocations in submission order, a page at a time; returns the page and the token
        of the next one (empty at the end)."""
        page_size = max(1, min(int(page_size or 100), 1000))
        where, params = ["id > ?"], [page_token or ""]
        if function:
            where.append("function = ?")
            params.append(function)
        if state is not None:
            where.append("state = ?")
            params.append(InvocationState(state).value)
        with self._transaction() as cur:
            rows = self._x(cur, f"SELECT {self._COLUMNS} FROM {self.TABLE} WHERE "
                                f"{' AND '.join(where)} ORDER BY id LIMIT ?",
                           (*params, page_size + 1)).fetchall()
            items = [self._row(cur, row) for row in rows[:page_size]]
        token = items[-1].id if len(rows) > page_size else ""
        return items, token

    def cancel(self, ident: str, now: float) -> tuple[QueuedInvocation, Events]:
        """QUEUED or RUNNING → CANCELLED (a running attempt's worker is killed by the
        dispatcher that holds it, which then records the attempt). Terminal: unchanged.

        Raises:
            InvocationNotFound.
        """
        with self._transaction() as cur:
            found = self._get(cur, ident, lock=True)
            if found is None:
                raise InvocationNotFound(f"no asynchronous invocation with id {ident!r}")
            if found.done:
                return found, []
            self._x(cur, f"""UPDATE {self.TABLE} SET state = 'CANCELLED', updated = ?,
                finished = ?, purge_at = ? + retention_s, reason = ? WHERE id = ?""",
                (now, now, now, f"cancelled while {found.state.value}", ident))
            after = self._get(cur, ident)
        assert after is not None
        return after, [("cancelled", ident, found.function)]

    def redrive(self, ident: str, now: float) -> tuple[QueuedInvocation, Events]:
        """DEAD_LETTERED → QUEUED with a fresh attempt budget and event age.

        Raises:
            InvocationNotFound; InvalidRequest when it is not DEAD_LETTERED.
        """
        with self._transaction() as cur:
            found = self._get(cur, ident, lock=True)
            if found is None:
                raise InvocationNotFound(f"no asynchronous invocation with id {ident!r}")
            if found.state is not InvocationState.DEAD_LETTERED:
                raise InvalidRequest(f"only a DEAD_LETTERED invocation can be redriven; "
                                     f"{ident} is {found.state.value}")
            # A fresh event age: the policy's, from now (not the last one's span again, which
            # grew by the time between submission and each redrive).
            self._x(cur, f"""UPDATE {self.TABLE} SET state = 'QUEUED', charged = 0,
                redrives = redrives + 1, updated = ?, not_before = ?,
                expires_at = ?, finished = NULL, purge_at = NULL,
                reason = '', result = NULL, owner = NULL, lease_until = NULL WHERE id = ?""",
                (now, now, now + found.policy.max_event_age_s, ident))
            self._notify(cur)
            after = self._get(cur, ident)
        assert after is not None
        return after, [("redriven", ident, found.function)]

    def expire_leases(self, now: float) -> int:
        """Single node, at start: every RUNNING attempt belonged to a process that is gone
        (the state directory has one owner): its lease ends now."""
        with self._transaction() as cur:
            cur = self._x(cur, f"UPDATE {self.TABLE} SET lease_until = ? WHERE state = "
                               "'RUNNING'", (now - 1.0,))
            running = int(cur.rowcount)
            # Cancelled while running: their open attempts are swept by the next claim.
            self._x(cur, f"UPDATE {self.TABLE} SET lease_until = ? WHERE state = 'CANCELLED' "
                         "AND lease_until IS NOT NULL", (now - 1.0,))
            return running

    def claim(self, owner: str, node: str, n: int, now: float, lease_s: float,
              running: Collection[tuple[str, int]] = ()) -> tuple[list[Claim], Events]:
        """Take up to ``n`` due invocations: each becomes RUNNING with its next attempt
        recorded, leased to ``owner`` until ``now + lease_s``. First, attempts whose lease
        expired are recorded CRASHED (and retried or dead-lettered), and queued invocations
        past their maximum age are dead-lettered.

        ``running``: (id, attempt) of the attempts this owner is running now. Their leases
        may have lapsed while the database was away, but they are not lost: the owner renews
        them as soon as it can, unless another owner took them over meanwhile."""
        events: Events = []
        t, a = self.TABLE, self.ATTEMPTS
        claims: list[Claim] = []
        with self._transaction() as cur:
            aged = self._x(cur, f"SELECT id, function FROM {t} WHERE state = 'QUEUED' AND "
                                f"expires_at <= ?{self.LOCK}", (now,)).fetchall()
            for ident, function in aged:
                self._x(cur, f"""UPDATE {t} SET state = 'DEAD_LETTERED', reason = ?,
                    updated = ?, finished = ?, purge_at = ? + retention_s WHERE id = ?""",
                    (AGED_OUT, now, now, now, ident))
                events.append(("dead_lettered", ident, function))
            expired = self._x(cur, f"SELECT id, function, attempts, charged, policy, expires_at, "
                                   f"owner FROM {t} WHERE state = 'RUNNING' AND lease_until < ?"
                                   f"{self.LOCK}", (now,)).fetchall()
            for ident, function, attempts, charged, policy, expires_at, holder in expired:
                if holder == owner and (ident, int(attempts)) in running:
                    continue
                self._x(cur, f"UPDATE {a} SET ended = ?, outcome = 'CRASHED', error = ? WHERE "
                             "invocation = ? AND number = ? AND ended IS NULL",
                        (now, _error_json(CRASHED_ERROR), ident, attempts))
                events.append(("crashed", ident, function))
                decision = decide(AsyncPolicy.from_dict(json.loads(policy)), int(charged),
                                  Outcome.CRASHED, CRASHED_ERROR, now, float(expires_at))
                self._apply(cur, ident, decision, now, None)
                events.append((decision.event, ident, function))
            # Cancelled while running, and the holder never recorded the attempt (it died, or
            # lost the database): the attempt ends CRASHED once the lease it held is over.
            gone = self._x(cur, f"SELECT id FROM {t} WHERE state = 'CANCELLED' AND "
                                f"lease_until < ?{self.LOCK}", (now,)).fetchall()
            for (ident,) in gone:
                self._x(cur, f"UPDATE {a} SET ended = ?, outcome = 'CRASHED', error = ? WHERE "
                             "invocation = ? AND ended IS NULL",
                        (now, _error_json(CRASHED_ERROR), ident))
                self._x(cur, f"UPDATE {t} SET lease_until = NULL WHERE id = ?", (ident,))
            if n > 0:
                rows = self._x(cur, f"""SELECT id, function, version, payload, content_type,
                    limits, attempts, created FROM {t} WHERE state = 'QUEUED' AND
                    not_before <= ? ORDER BY not_before LIMIT ?{self.LOCK}""",
                               (now, n)).fetchall()
                for ident, function, version, payload, ctype, limits, attempts, created in rows:
                    number = int(attempts) + 1
                    self._x(cur, f"""UPDATE {t} SET state = 'RUNNING', attempts = ?,
                        charged = charged + 1, owner = ?, lease_until = ?, updated = ?
                        WHERE id = ?""", (number, owner, now + lease_s, now, ident))
                    self._x(cur, f"INSERT INTO {a} (invocation, number, started, node) VALUES "
                                 "(?, ?, ?, ?)", (ident, number, now, node))
                    claims.append(Claim(ident, function, int(version), bytes(payload), ctype,
                                        _limits_from(limits), number, float(created)))
                    events.append(("started", ident, function))
        return claims, events

    def _apply(self, cur: Any, ident: str, decision: Decision, now: float,
               result: bytes | None) -> None:
        if decision.state is InvocationState.QUEUED:
            self._x(cur, f"""UPDATE {self.TABLE} SET state = 'QUEUED', not_before = ?,
                owner = NULL, lease_until = NULL, updated = ?, result = ? WHERE id = ?""",
                (decision.not_before, now, result, ident))
        else:
            self._x(cur, f"""UPDATE {self.TABLE} SET state = ?, reason = ?, owner = NULL,
                lease_until = NULL, updated = ?, finished = ?, purge_at = ? + retention_s,
                result = ? WHERE id = ?""",
                (decision.state.value, decision.reason, now, now, now, result, ident))

    def finish(self, claim: Claim, owner: str, now: float, result: InvocationResult | None,
               error: ErrorInfo | None = None) -> tuple[InvocationState | None, Events]:
        """Record how an attempt ended and what follows (retry, dead letter...). Only the
        lease holder's outcome decides: if the invocation was cancelled, or its lease lost
        (another dispatcher took it over), the attempt is recorded and nothing else changes.
        Returns the invocation's state afterwards (None: it is gone)."""
        t, a = self.TABLE, self.ATTEMPTS
        outcome = None if result is None else result.outcome
        err = error if result is None else result.error
        stats = None if result is None else _dumps(result.stats.to_dict())
        with self._transaction() as cur:
            row = self._x(cur, f"SELECT state, attempts, charged, owner, policy, expires_at FROM "
                               f"{t} WHERE id = ?{self.LOCK_ROW}", (claim.id,)).fetchone()
            self._x(cur, f"UPDATE {a} SET ended = ?, outcome = ?, error = ?, stats = ? WHERE "
                         "invocation = ? AND number = ? AND ended IS NULL",
                    (now, None if outcome is None else outcome.value, _error_json(err), stats,
                     claim.id, claim.attempt))
            if row is None:
                return None, []
            state, attempts, charged, holder, policy, expires_at = row
            if state != "RUNNING" or int(attempts) != claim.attempt or holder != owner:
                return InvocationState(state), []
            decision = decide(AsyncPolicy.from_dict(json.loads(policy)), int(charged), outcome,
                              err, now, float(expires_at))
            self._apply(cur, claim.id, decision, now,
                        None if result is None else encode_result(result))
            if decision.state is InvocationState.QUEUED:
                self._notify(cur)
        return decision.state, [(decision.event, claim.id, claim.function)]

    def release(self, claim: Claim, owner: str, now: float, *, started: bool,
                delay_s: float = 0.0, error: ErrorInfo = INTERRUPTED_ERROR) -> None:
        """Give an attempt back without charging it: it never started (the runtime refused it,
        or its function is not known here yet: the attempt is forgotten), or a graceful
        shutdown interrupted it (recorded, not charged). The invocation is QUEUED again."""
        t, a = self.TABLE, self.ATTEMPTS
        with self._transaction() as cur:
            row = self._x(cur, f"SELECT state, attempts, owner FROM {t} WHERE id = ?"
                               f"{self.LOCK_ROW}", (claim.id,)).fetchone()
            mine = (row is not None and row[0] == "RUNNING" and int(row[1]) == claim.attempt
                    and row[2] == owner)
            if mine and not started:  # forgotten: it never ran
                self._x(cur, f"DELETE FROM {a} WHERE invocation = ? AND number = ?",
                        (claim.id, claim.attempt))
            else:
                # Interrupted; or no longer ours (cancelled meanwhile): the attempt stays in the
                # history, ended and not charged, never "running" forever.
                self._x(cur, f"UPDATE {a} SET ended = ?, outcome = 'CANCELLED', error = ?, "
                             "charged = 0 WHERE invocation = ? AND number = ? AND ended IS NULL",
                        (now, _error_json(error if started else NOT_STARTED_ERROR), claim.id,
                         claim.attempt))
            if not mine:
                return
            self._x(cur, f"""UPDATE {t} SET state = 'QUEUED', charged = charged - 1,
                attempts = attempts - ?, not_before = ?, owner = NULL, lease_until = NULL,
                updated = ? WHERE id = ?""",
                (0 if started else 1, now + delay_s, now, claim.id))

    def renew(self, owner: str, claims: Sequence[Claim], now: float, lease_s: float
              ) -> list[Claim]:
        """Extend the leases of running attempts; returns those this owner no longer holds
        (cancelled, or taken over after a lease expired): their workers should be killed."""
        lost = []
        with self._transaction() as cur:
            for claim in claims:
                cur = self._x(cur, f"UPDATE {self.TABLE} SET lease_until = ? WHERE id = ? AND "
                                   "state = 'RUNNING' AND owner = ? AND attempts = ?",
                              (now + lease_s, claim.id, owner, claim.attempt))
                if cur.rowcount != 1:
                    lost.append(claim)
        return lost

    def purge(self, now: float, batch: int = 500) -> int:
        """Delete terminal invocations past their retention, with their attempts; returns how
        many. The rows are locked first and deleted by id, a batch per transaction: one
        redriven meanwhile (its ``purge_at`` cleared) keeps its history."""
        t, a = self.TABLE, self.ATTEMPTS
        total = 0
        while True:
            with self._transaction() as cur:
                ids = [row[0] for row in self._x(
                    cur, f"SELECT id FROM {t} WHERE purge_at <= ? LIMIT ?{self.LOCK}",
                    (now, batch)).fetchall()]
                if ids:
                    marks = ", ".join(["?"] * len(ids))
                    self._x(cur, f"DELETE FROM {a} WHERE invocation IN ({marks})", ids)
                    self._x(cur, f"DELETE FROM {t} WHERE id IN ({marks})", ids)
            total += len(ids)
            if len(ids) < batch:
                return total

    def next_due(self) -> float | None:
        """The earliest time something becomes due: a queued invocation's ``not_before``, a
        lease's end, a queued invocation's maximum age."""
        t = self.TABLE
        with self._transaction() as cur:
            row = self._x(cur, f"""SELECT (SELECT min(not_before) FROM {t} WHERE state = 'QUEUED'),
                (SELECT min(lease_until) FROM {t} WHERE state = 'RUNNING'),
                (SELECT min(expires_at) FROM {t} WHERE state = 'QUEUED')""").fetchone()
        values = [float(v) for v in row if v is not None]
        return min(values) if values else None

    def counts(self) -> dict[str, int]:
        """Invocations by state."""
        with self._transaction() as cur:
            rows = self._x(cur, f"SELECT state, count(*) FROM {self.TABLE} GROUP BY state"
                           ).fetchall()
        out = {s.value: 0 for s in InvocationState}
        out.update({state: int(n) for state, n in rows})
        return out

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one of the blocking methods off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def wait_notified(self, timeout: float) -> bool:
        """Block until another process says there is work (True) or ``timeout`` passes;
        backends without notifications just return False."""
        return False


# ---------------------------------------------------------------------------------------------
# The dispatcher

@dataclasses.dataclass(slots=True)
class _Running:
    claim: Claim
    handle: AsyncInvocation | None = None
    #: the invocation was cancelled (or its lease lost): record the attempt, change nothing
    abandoned: bool = False


#: How long after its submission, or after this dispatcher started if that is later, an
#: invocation whose function this runtime does not know is put back without charging an attempt
#: (the function may be on its way: a deploy elsewhere in the fleet, a restart registering its
#: functions again); after it, such attempts count.
UNKNOWN_GRACE_S = 300.0

#: Log levels of the queue's events (the rest: INFO).
_LEVELS = {"queued": 10, "started": 10, "succeeded": 10, "dead_lettered": 30, "crashed": 30}


class Dispatcher:
    """Runs a queue's invocations through a runtime: at most ``concurrency`` attempts at once
    (so synchronous calls keep the rest of ``max_concurrency``), leases renewed every
    ``lease_s / 3``, terminal invocations purged every ``purge_every_s``.

    Args:
        call: runs the queue's blocking methods off the loop (default: ``queue.run``).
        owner: this dispatcher's identity in leases (unique per process).
        node: the server's name, recorded with each attempt.
    """

    def __init__(self, runtime: AsyncRuntime, queue: SqlQueue, *, concurrency: int,
                 owner: str, node: str = "", lease_s: float = 30.0, poll_s: float = 1.0,
                 purge_every_s: float = 60.0, call: Any = None) -> None:
        self.runtime = runtime
        self.queue = queue
        self.concurrency = concurrency
        self.owner = owner
        self.node = node
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.purge_every_s = purge_every_s
        self._call = call if call is not None else queue.run
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._attempts: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._counts: dict[str, int] = {s.value: 0 for s in InvocationState}
        self._counts_at = 0.0
        #: ids whose terminal state was recorded here, and waiters on them
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._started_at = time.time()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._started_at = time.time()
        if self.queue.single_owner:
            expired = await self._call(self.queue.expire_leases, time.time())
            if expired:
                log.warning("%d asynchronous attempt(s) were running when the previous server "
                            "stopped: recorded CRASHED, retried as their policy allows",
                            expired, extra={"event": "async_recover",
                                            "fields": {"attempts": expired}})
        self._tasks = [asyncio.create_task(self._loop(), name="sandbox-async-dispatch"),
                       asyncio.create_task(self._heartbeat(), name="sandbox-async-heartbeat"),
                       asyncio.create_task(self._purger(), name="sandbox-async-purge")]
        if type(self.queue).wait_notified is not SqlQueue.wait_notified:
            self._listener = asyncio.create_task(self._listen(), name="sandbox-async-listen")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop claiming; give running attempts ``grace_s``, then cancel them: they go back to
        the queue without counting against their budget."""
        if self._stopping:
            return
        self._stopping = True
        # The loop ends by itself at its next turn: cancelled inside a claim, it would leave
        # the rows that claim commits RUNNING with nobody to run them (charged CRASHED later).
        self._wake.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks[:1], timeout=60)
            for task in late:  # a database that does not answer
                task.cancel()
            await asyncio.gather(*self._tasks[:1], return_exceptions=True)
        if self._attempts and grace_s > 0:
            await asyncio.wait(set(self._attempts), timeout=grace_s)
        for running in list(self._running.values()):
            if running.handle is not None:
                running.handle.cancel()
        if self._attempts:
            await asyncio.wait(set(self._attempts), timeout=30)
        for task in [*self._tasks[1:], *([self._listener] if self._listener else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks[1:], *([self._listener] if self._listener else []),
                             return_exceptions=True)

    def wake(self) -> None:
        """There may be work now (a submission, a redrive)."""
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._running)

    def gauges(self) -> dict[str, int]:
        """Queued (anywhere in the queue) and running here; read from memory (the queued count
        is refreshed by the dispatch loop at most once a second)."""
        return {"queued": self._counts.get("QUEUED", 0), "running": len(self._running)}

    # -- events -----------------------------------------------------------------------------
    def record(self, events: Events) -> None:
        """Count and log what happened in the queue."""
        observers = self.runtime._observers
        for event, ident, function in events:
            if observers:
                observers.async_event(event, function)
            if event in ("succeeded", "failed", "dead_lettered", "cancelled"):
                self._finished(ident)
            level = _LEVELS.get(event, 20)
            if not log.isEnabledFor(level):
                continue
            log.log(level, "async invocation %s of %s: %s", ident, function, event,
                    extra={"event": f"async_{event}",
                           "fields": {"id": ident, "function": function, "node": self.node}})

    def _finished(self, ident: str) -> None:
        for waiter in self._waiters.pop(ident, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def wait_local(self, ident: str, timeout: float) -> None:
        """Wait until ``ident`` is recorded terminal here, or ``timeout`` passes."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ident, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(ident)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[ident]

    def cancelled(self, ident: str) -> None:
        """The invocation was cancelled: kill its attempt if it runs here."""
        running = self._running.get(ident)
        if running is not None:
            running.abandoned = True
            if running.handle is not None:
                running.handle.cancel()

    # -- loops ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                # Cleared before looking, so a wake-up that comes while we look is kept.
                self._wake.clear()
                free = self.concurrency - len(self._running)
                now = time.time()
                mine = {(r.claim.id, r.claim.attempt) for r in self._running.values()}
                claims, events = await self._call(self.queue.claim, self.owner, self.node,
                                                  free, now, self.lease_s, mine)
                self.record(events)
                for claim in claims:
                    earlier = self._running.get(claim.id)
                    if earlier is not None:
                        # Our own attempt whose lease lapsed (renewals failed, the loop
                        # stalled): the claim recorded it CRASHED and this is the retry. The
                        # old worker must not run on beside it.
                        earlier.abandoned = True
                        if earlier.handle is not None:
                            earlier.handle.cancel()
                    running = self._running[claim.id] = _Running(claim)
                    task = asyncio.create_task(self._attempt(running))
                    self._attempts.add(task)
                    task.add_done_callback(self._attempts.discard)
                if now - self._counts_at >= 1.0:
                    self._counts = await self._call(self.queue.counts)
                    self._counts_at = now
                if self._stopping:
                    break
                if len(claims) >= free:
                    await self._wait(self.poll_s)  # full: an attempt's end wakes us
                    continue
                due = await self._call(self.queue.next_due)
                delay = self.poll_s if due is None else min(self.poll_s,
                                                            max(0.0, due - time.time()))
                if not claims:
                    delay = max(delay, 0.01)  # due but locked by another replica: no spin
                if delay > 0:
                    await self._wait(delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: keep trying
                log.error("async dispatch: %s: %s", type(exc).__name__, exc,
                          extra={"event": "async_error",
                                 "fields": {"error": f"{type(exc).__name__}: {exc}"}})
                await asyncio.sleep(self.poll_s)

    async def _wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _listen(self) -> None:
        """Wake the loop when another replica says there is work."""
        while True:
            try:
                if await self._call(self.queue.wait_notified, 1.0):
                    self.wake()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(self.poll_s)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            claims = [r.claim for r in self._running.values()]
            if not claims:
                continue
            try:
                lost = await self._call(self.queue.renew, self.owner, claims, time.time(),
                                        self.lease_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("async leases not renewed: %s: %s", type(exc).__name__, exc,
                          extra={"event": "async_error",
                                 "fields": {"error": f"{type(exc).__name__}: {exc}"}})
                continue
            for claim in lost:
                running = self._running.get(claim.id)
                if running is not None and running.claim.attempt == claim.attempt:
                    running.abandoned = True
                    if running.handle is not None:
                        running.handle.cancel()

    async def _purger(self) -> None:
        while True:
            try:
                purged = await self._call(self.queue.purge, time.time())
                if purged:
                    log.info("purged %d asynchronous invocation(s) past their retention",
                             purged, extra={"event": "async_purge",
                                            "fields": {"invocations": purged}})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("async purge: %s: %s", type(exc).__name__, exc,
                          extra={"event": "async_error",
                                 "fields": {"error": f"{type(exc).__name__}: {exc}"}})
            await asyncio.sleep(self.purge_every_s)

    async def _attempt(self, running: _Running) -> None:
        claim = running.claim
        try:
            try:
                handle = self.runtime.submit(claim.function, version=claim.version,
                                             payload=claim.payload or None,
                                             content_type=claim.content_type,
                                             limits=claim.limits, id=claim.id)
            except (Overloaded, ShuttingDown):
                await self._record(self.queue.release, claim, started=False, delay_s=0.1)
                return
            except FunctionNotFound as exc:
                if time.time() - max(claim.created, self._started_at) < UNKNOWN_GRACE_S:
                    # Not known here yet: a fleet replica that has not loaded a new
                    # deployment, or a restart before its functions are registered again.
                    # Not charged; tried again in a second.
                    await self._record(self.queue.release, claim, started=False, delay_s=1.0)
                else:  # deleted, most likely: a failed attempt, retried then dead-lettered
                    await self._finish(claim, None, ErrorInfo("FunctionNotFound", str(exc)))
                return
            except SandboxError as exc:
                await self._finish(claim, None, ErrorInfo(type(exc).__name__, str(exc)))
                return
            running.handle = handle
            if running.abandoned:
                handle.cancel()
            try:
                result = await handle
            except (SandboxError, Exception) as exc:
                await self._finish(claim, None, ErrorInfo(type(exc).__name__, str(exc)))
                return
            if (result.outcome is Outcome.CANCELLED and self._stopping
                    and not running.abandoned):
                await self._record(self.queue.release, claim, started=True)
                return
            await self._finish(claim, result, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("async attempt %s of %s: not recorded: %s: %s", claim.attempt, claim.id,
                      type(exc).__name__, exc,
                      extra={"event": "async_error",
                             "fields": {"id": claim.id, "error": f"{type(exc).__name__}: {exc}"}})
        finally:
            if self._running.get(claim.id) is running:  # not a later attempt's entry
                del self._running[claim.id]
            self._wake.set()

    async def _record(self, method: Any, claim: Claim, *args: Any, **kwargs: Any) -> Any:
        """``method(claim, owner, now, *args, **kwargs)``: how an attempt ended, into the queue,
        tried again while the database is away (a restart, a dropped connection) for up to
        twice the lease: the attempt stays in ``_running`` meanwhile, so its lease is renewed
        as soon as the database answers, and a finished attempt is not later charged as
        CRASHED for want of one write."""
        deadline = time.monotonic() + 2 * self.lease_s
        pause = 0.05
        while True:
            try:
                return await self._call(method, claim, self.owner, time.time(), *args,
                                        **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("async attempt %s of %s: not recorded yet, trying again: %s: %s",
                            claim.attempt, claim.id, type(exc).__name__, exc,
                            extra={"event": "async_error", "fields": {
                                "id": claim.id, "error": f"{type(exc).__name__}: {exc}"}})
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _finish(self, claim: Claim, result: InvocationResult | None,
                      error: ErrorInfo | None) -> None:
        if result is not None and self.node:
            result = dataclasses.replace(
                result, stats=dataclasses.replace(result.stats, node=self.node))
        state, events = await self._record(self.queue.finish, claim, result, error)
        self.record(events)
        if state is not None and state in TERMINAL_STATES:
            self._finished(claim.id)


def open_queue(store: Any, **bounds: Any) -> SqlQueue:
    """A server's queue, beside its function store: in the fleet's PostgreSQL database when
    the store is a :class:`sandbox.pgstore.PostgresStore` (its ``url``), else SQLite in the
    state directory (``store.root``). Not opened yet (the runtime opens it at start)."""
    url = getattr(store, "url", None)
    if isinstance(url, str) and url.startswith(("postgresql://", "postgres://")):
        from sandbox.asyncq_pg import PostgresQueue

        return PostgresQueue(url, **bounds)
    from sandbox.asyncq_sqlite import SqliteQueue

    return SqliteQueue(store.root, **bounds)

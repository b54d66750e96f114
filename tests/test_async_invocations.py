"""Asynchronous invocations (sandbox.asyncq): the durable queue, retries, dead letters, results
by id; the same semantics on SQLite (single node) and PostgreSQL (a fleet).

The queue tests and the 1,000-call test run once per backend (PostgreSQL skips, saying why,
where it cannot be started); the SIGKILL test kills a real `sandbox serve` with 200
invocations queued or running and restarts it on the same state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc_conftest import ServerProcess, wait_gone
from prometheus_client import CollectorRegistry

from sandbox import Runtime
from sandbox.asyncq import (
    AGED_OUT,
    AsyncPolicy,
    Claim,
    InvocationNotFound,
    InvocationState,
    NewInvocation,
    SqlQueue,
    decide,
    new_id,
)
from sandbox.asyncq_sqlite import SqliteQueue
from sandbox.errors import ConfigurationError, FunctionNotFound, InvalidRequest, Overloaded
from sandbox.limits import Limits
from sandbox.outcome import ErrorInfo, InvocationResult, Outcome
from sandbox.runtime import AsyncRuntime

ROOT = Path(__file__).resolve().parent.parent
Q, R, S, F, D, C = (InvocationState.QUEUED, InvocationState.RUNNING, InvocationState.SUCCEEDED,
                    InvocationState.FAILED, InvocationState.DEAD_LETTERED,
                    InvocationState.CANCELLED)
FAST = {"backoff_initial_s": 0.0, "jitter": 0.0}

OK_SRC = "def handler(event, context):\n    return {'id': context.invocation_id, 'x': event}\n"
BAD_SRC = "def handler(event, context):\n    raise ValueError(event)\n"
SLEEP_SRC = "import time\n\ndef handler(event, context):\n    time.sleep(event)\n    return event\n"


# ---------------------------------------------------------------------------------------------
# Backends

@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    """A PostgreSQL server of this module's own (tests/postgres.py), started before its first
    test and stopped after its last, so neither the leftover guard nor a later module's
    child reaper sees it; skips, saying why, where none can be started."""
    from postgres import Postgres, unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = Postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module", autouse=True)
def _pg_first(request: pytest.FixtureRequest) -> None:
    """``pg`` starts with the module, not inside a test (whose guard would count it)."""
    try:
        request.getfixturevalue("pg")
    except pytest.skip.Exception:
        pass


@pytest.fixture(params=["sqlite", "postgresql"])
def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., SqlQueue]]:
    """Makes queues of one backend over one store (SQLite: a state directory; PostgreSQL: a
    fresh database of the session's server)."""
    made: list[SqlQueue] = []
    if request.param == "sqlite":
        def make(**kwargs: Any) -> SqlQueue:
            queue = SqliteQueue(tmp_path / "state", **kwargs)
            made.append(queue)
            return queue
    else:
        from sandbox.asyncq_pg import PostgresQueue

        url = request.getfixturevalue("pg").database()

        def make(**kwargs: Any) -> SqlQueue:
            queue = PostgresQueue(url, **kwargs)
            made.append(queue)
            return queue
    yield make
    for queue in made:
        queue.shutdown()


def _item(function: str = "f", key: str | None = None, **policy: Any) -> NewInvocation:
    return NewInvocation(new_id(), function, 1, b"\x01", "application/msgpack", None,
                         AsyncPolicy().replace(**{**FAST, **policy}), key)


def _result(claim: Claim, outcome: Outcome, value: bytes = b"") -> InvocationResult:
    error = None if outcome is Outcome.OK else ErrorInfo("E", "failed")
    return InvocationResult(claim.id, outcome, result_bytes=value, error=error)


# ---------------------------------------------------------------------------------------------
# Decisions and the queue, per backend

def test_decisions_follow_the_policy() -> None:
    policy = AsyncPolicy(max_retries=2, backoff_initial_s=1.0, jitter=0.0)
    far = 1e12
    assert decide(policy, 1, Outcome.OK, None, 0.0, far).state is S
    retry = decide(policy, 1, Outcome.TIMEOUT, None, 0.0, far)
    assert (retry.state, retry.not_before) == (Q, 1.0)
    assert decide(policy, 2, Outcome.CRASHED, None, 0.0, far).not_before == 2.0  # x2
    assert decide(policy, 3, Outcome.CRASHED, None, 0.0, far).state is D  # 1 + 2 attempts
    assert decide(policy, 1, Outcome.CANCELLED, None, 0.0, far).state is F  # not retried
    narrow = decide(policy, 1, Outcome.TIMEOUT, None, 0.0, 0.5)  # age passes before the retry
    assert narrow.state is D and "max_event_age_s" in narrow.reason
    only = AsyncPolicy(retry_on=frozenset({Outcome.TIMEOUT}))
    assert decide(only, 1, Outcome.FUNCTION_ERROR, None, 0.0, far).state is F
    with pytest.raises(InvalidRequest):
        AsyncPolicy(max_retries=-1)
    with pytest.raises(InvalidRequest):
        AsyncPolicy(retry_on=frozenset({Outcome.OK}))
    with pytest.raises(InvalidRequest):
        AsyncPolicy.from_dict({"max_retries": 1, "nonsense": 2})
    assert AsyncPolicy.from_dict(AsyncPolicy(max_retries=0).to_dict()) == AsyncPolicy(
        max_retries=0)
    jittered = {AsyncPolicy(backoff_initial_s=1.0).backoff(1) for _ in range(20)}
    assert len(jittered) > 1 and all(0.5 <= d <= 1.0 for d in jittered)


def test_attempts_are_recorded_before_they_run_and_retried(make_queue: Callable[..., SqlQueue]
                                                           ) -> None:
    queue = make_queue()
    queue.open()
    item = _item(max_retries=1)
    queued, events = queue.submit(item, time.time())
    assert queued.state is Q and events == [("queued", item.id, "f")]
    (claim,), _ = queue.claim("me", "node-a", 8, time.time(), 30.0)
    running = queue.get(item.id)
    # RUNNING, attempt 1 recorded with no outcome yet: a crash now leaves a trace.
    assert running.state is R and [(a.number, a.outcome, a.node) for a in running.attempts] \
        == [(1, None, "node-a")]
    state, events = queue.finish(claim, "me", time.time(), _result(claim, Outcome.TIMEOUT))
    assert state is Q and events == [("retried", item.id, "f")]
    (claim2,), _ = queue.claim("me", "node-a", 8, time.time(), 30.0)
    assert claim2.attempt == 2
    state, _ = queue.finish(claim2, "me", time.time(), _result(claim2, Outcome.OK, b"\x05"))
    done = queue.get(item.id)
    assert state is S and done.state is S and done.result is not None
    assert done.result.result == 5 and done.finished is not None
    assert [a.outcome for a in done.attempts] == [Outcome.TIMEOUT, Outcome.OK]
    # A second finish of the same attempt changes nothing (one result per id).
    assert queue.finish(claim2, "me", time.time(), _result(claim2, Outcome.OK))[1] == []


def test_the_schema_is_versioned_and_a_newer_one_is_refused(
        make_queue: Callable[..., SqlQueue]) -> None:
    from sandbox.asyncq import SCHEMA_VERSION

    first = make_queue()
    first.open()
    item = _item()
    first.submit(item, time.time())
    with first._transaction() as cur:
        assert first._x(cur, f"SELECT version FROM {first.SCHEMA}").fetchall() \
            == [(SCHEMA_VERSION,)]
        # A queue made before the version table (its tables, no version row) is adopted as it
        # is: reopening keeps its invocations and records the version.
        cur.execute(f"DROP TABLE {first.SCHEMA}")
    first.close()
    second = make_queue()
    second.open()
    assert second.get(item.id).state is Q
    with second._transaction() as cur:
        assert second._x(cur, f"SELECT version FROM {second.SCHEMA}").fetchall() \
            == [(SCHEMA_VERSION,)]
        # Written by a newer sandbox: refused, saying so, rather than misread.
        second._x(cur, f"UPDATE {second.SCHEMA} SET version = ?", (SCHEMA_VERSION + 1,))
    second.close()
    with pytest.raises(ConfigurationError,
                       match=rf"schema version {SCHEMA_VERSION + 1}, newer than this sandbox "
                             rf"understands \({SCHEMA_VERSION}\): upgrade sandbox"):
        make_queue().open()


def test_idempotency_keys_and_bounds(make_queue: Callable[..., SqlQueue]) -> None:
    queue = make_queue(max_queued=5, max_queued_per_function=3)
    queue.open()
    first, _ = queue.submit(_item(key="k"), time.time())
    again, events = queue.submit(_item(key="k"), time.time())
    assert again.id == first.id and again.duplicate and events == []
    other, _ = queue.submit(_item("g", key="k"), time.time())  # keys are per function
    assert other.id != first.id
    queue.submit(_item(), time.time())
    queue.submit(_item(), time.time())
    with pytest.raises(Overloaded, match="'f'"):
        queue.submit(_item(), time.time())
    queue.submit(_item("g"), time.time())
    with pytest.raises(Overloaded, match="full"):
        queue.submit(_item("h"), time.time())
    # The key still answers while its invocation is kept, even with the queue full.
    assert queue.submit(_item(key="k"), time.time())[0].id == first.id


def test_an_expired_lease_is_a_crashed_attempt(make_queue: Callable[..., SqlQueue]) -> None:
    """A dispatcher that died mid-attempt: once its lease expires, whoever claims next records
    the attempt CRASHED and retries it; the dead one's late outcome changes nothing."""
    queue = make_queue()
    queue.open()
    item = _item(max_retries=1)
    queue.submit(item, time.time())
    (dead,), _ = queue.claim("dead", "node-a", 8, time.time(), 0.05)
    assert queue.renew("dead", [dead], time.time(), 0.05) == []
    time.sleep(0.1)
    claims, events = queue.claim("alive", "node-b", 8, time.time(), 30.0)
    assert [e[0] for e in events] == ["crashed", "retried", "started"]
    assert [c.attempt for c in claims] == [2]
    assert queue.renew("dead", [dead], time.time(), 30.0) == [dead]  # lost: kill the worker
    assert queue.finish(dead, "dead", time.time(), _result(dead, Outcome.OK))[1] == []
    queue.finish(claims[0], "alive", time.time(), _result(claims[0], Outcome.OK))
    done = queue.get(item.id)
    assert done.state is S
    assert [(a.outcome, a.node) for a in done.attempts] == [(Outcome.CRASHED, "node-a"),
                                                              (Outcome.OK, "node-b")]
    assert done.attempts[0].error is not None
    assert done.attempts[0].error.type == "SupervisorStopped"
    # Again, with the budget spent: dead-lettered, not retried.
    spent = _item(max_retries=0)
    queue.submit(spent, time.time())
    queue.claim("dead", "node-a", 8, time.time(), 0.0)
    time.sleep(0.01)
    _, events = queue.claim("alive", "node-b", 0, time.time(), 30.0)
    assert [e[0] for e in events] == ["crashed", "dead_lettered"]
    assert "retries exhausted" in queue.get(spent.id).reason


def test_cancel_redrive_age_and_retention(make_queue: Callable[..., SqlQueue]) -> None:
    queue = make_queue()
    queue.open()
    doomed = _item()
    queue.submit(doomed, time.time())
    cancelled, _ = queue.cancel(doomed.id, time.time())
    assert cancelled.state is C and cancelled.attempts == ()
    assert queue.cancel(doomed.id, time.time())[0].state is C  # terminal: unchanged
    with pytest.raises(InvalidRequest, match="DEAD_LETTERED"):
        queue.redrive(doomed.id, time.time())
    with pytest.raises(InvocationNotFound):
        queue.get("no-such-id")
    # Dead letter after its budget, then redriven with a fresh budget; history kept.
    letter = _item(max_retries=0)
    queue.submit(letter, time.time())
    (claim,), _ = queue.claim("me", "n", 8, time.time(), 30.0)
    queue.finish(claim, "me", time.time(), _result(claim, Outcome.CRASHED))
    assert queue.get(letter.id).state is D
    again, events = queue.redrive(letter.id, time.time())
    assert again.state is Q and again.redrives == 1 and events[0][0] == "redriven"
    (claim,), _ = queue.claim("me", "n", 8, time.time(), 30.0)
    assert claim.attempt == 2
    queue.finish(claim, "me", time.time(), _result(claim, Outcome.OK))
    assert [a.number for a in queue.get(letter.id).attempts] == [1, 2]
    # Too old before its first attempt: dead-lettered, with the reason.
    old = _item(max_event_age_s=0.05)
    queue.submit(old, time.time())
    time.sleep(0.1)
    queue.claim("me", "n", 8, time.time(), 30.0)
    aged = queue.get(old.id)
    assert aged.state is D and aged.reason == AGED_OUT and aged.attempts == ()
    # Retention: terminal invocations are purged, and their key is free again.
    short = _item(key="short", retention_s=0.0)
    queue.submit(short, time.time())
    queue.cancel(short.id, time.time())
    assert queue.purge(time.time() + 0.001) >= 1
    with pytest.raises(InvocationNotFound):
        queue.get(short.id)
    assert queue.submit(_item(key="short"), time.time())[0].id != short.id
    # Pages in submission order.
    seen, token = [], ""
    while True:
        page, token = queue.page(page_size=2, page_token=token)
        seen.extend(i.id for i in page)
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen)) >= 4
    assert {i.state for i in queue.page(state=C)[0]} == {C}


def test_each_redrive_gives_the_policys_event_age_from_then(
        make_queue: Callable[..., SqlQueue]) -> None:
    queue = make_queue()
    queue.open()
    t0 = time.time()
    letter = _item(max_retries=0, max_event_age_s=100.0)
    queue.submit(letter, t0)
    (claim,), _ = queue.claim("me", "n", 8, t0, 30.0)
    queue.finish(claim, "me", t0 + 1, _result(claim, Outcome.FUNCTION_ERROR))
    for at in (t0 + 500, t0 + 5000, t0 + 50000):
        assert queue.redrive(letter.id, at)[0].state is Q
        queue.claim("me", "n", 0, at + 99, 30.0)  # n=0: ages out, takes nothing
        assert queue.get(letter.id).state is Q
        queue.claim("me", "n", 0, at + 101, 30.0)
        aged = queue.get(letter.id)
        # Before: each redrive gave the span since submission again (600 s, then 5,600 s).
        assert aged.state is D and aged.reason == AGED_OUT, (at - t0, aged)


def test_an_attempt_of_a_cancelled_invocation_always_ends(
        make_queue: Callable[..., SqlQueue]) -> None:
    queue = make_queue()
    queue.open()
    t0 = time.time()
    # Claimed, then cancelled before the claimer started it: the claimer gives it back.
    first = _item()
    queue.submit(first, t0)
    (claim,), _ = queue.claim("me", "n", 8, t0, 30.0)
    queue.cancel(first.id, t0 + 1)
    queue.release(claim, "me", t0 + 2, started=False)
    (attempt,) = queue.get(first.id).attempts
    assert attempt.ended is not None and attempt.outcome is Outcome.CANCELLED
    assert not attempt.charged and attempt.error is not None
    # Cancelled while running on a replica that then died: once the lease it held is over,
    # the next claim (by anyone) ends the attempt CRASHED instead of "running" forever.
    second = _item()
    queue.submit(second, t0)
    (claim,), _ = queue.claim("gone", "n", 8, t0, 30.0)
    queue.cancel(second.id, t0 + 1)
    queue.claim("other", "n", 8, t0 + 10, 30.0)
    assert queue.get(second.id).attempts[0].ended is None  # its holder may still record it
    queue.claim("other", "n", 8, t0 + 31, 30.0)
    after = queue.get(second.id)
    assert after.state is C and [(a.outcome, a.ended) for a in after.attempts] \
        == [(Outcome.CRASHED, t0 + 31)]


def test_an_owner_keeps_its_running_attempt_when_its_lease_lapsed(
        make_queue: Callable[..., SqlQueue]) -> None:
    """The database was away longer than the lease: the owner, still running the attempt,
    does not take it from itself, and renews it when it can; anyone else may take it over
    while the lease is lapsed."""
    queue = make_queue()
    queue.open()
    t0 = time.time()
    item = _item(max_retries=0)
    queue.submit(item, t0)
    (claim,), _ = queue.claim("me", "n", 8, t0, 30.0)
    assert queue.claim("me", "n", 8, t0 + 31, 30.0, {(item.id, 1)}) == ([], [])
    assert queue.renew("me", [claim], t0 + 31, 30.0) == []  # renewed: until t0 + 61
    assert queue.claim("other", "n", 8, t0 + 40, 30.0) == ([], [])
    assert queue.get(item.id).state is R
    queue.claim("other", "n", 8, t0 + 62, 30.0)  # lapsed again, and "me" says nothing
    assert queue.get(item.id).state is D
    assert queue.renew("me", [claim], t0 + 63, 30.0) == [claim]  # lost: kill the worker


def test_purge_takes_attempts_with_their_invocations_in_batches(
        make_queue: Callable[..., SqlQueue]) -> None:
    queue = make_queue()
    queue.open()
    t0 = time.time()
    items = [_item(max_retries=0, retention_s=10.0) for _ in range(5)]
    kept = _item(max_retries=0, retention_s=10.0)
    for item in [*items, kept]:
        queue.submit(item, t0)
    claims, _ = queue.claim("me", "n", 8, t0, 30.0)
    for claim in claims:
        queue.finish(claim, "me", t0 + 1, _result(claim, Outcome.FUNCTION_ERROR))
    queue.redrive(kept.id, t0 + 2)  # back in the queue: kept, with its history
    assert queue.purge(t0 + 12, batch=2) == 5
    for item in items:
        with pytest.raises(InvocationNotFound):
            queue.get(item.id)
    assert [a.number for a in queue.get(kept.id).attempts] == [1]
    with queue._transaction() as cur:
        left = queue._x(cur, f"SELECT DISTINCT invocation FROM {queue.ATTEMPTS}").fetchall()
    assert left == [(kept.id,)]


# ---------------------------------------------------------------------------------------------
# Through the runtime

def test_a_thousand_async_calls_with_ten_percent_failing(make_queue: Callable[..., SqlQueue]
                                                         ) -> None:
    """Every id reaches a terminal state; the failing ones are dead-lettered after exactly
    1 + max_retries attempts; the successes carry their results; the metrics agree."""
    from sandbox.metrics import Metrics

    async def main() -> None:
        async with AsyncRuntime(min_idle=1, isolation="off", max_concurrency=16,
                                async_queue=make_queue(), node="node-a") as rt:
            registry = CollectorRegistry()
            Metrics(rt, registry)
            rt.register("ok", source=OK_SRC, reuse=10_000)
            rt.register("bad", source=BAD_SRC, reuse=10_000,
                        async_policy={"max_retries": 2, "backoff_initial_s": 0.01,
                                      "backoff_max_s": 0.02})
            ids = {}
            for i in range(1000):
                queued = await rt.invoke_async("bad" if i % 10 == 0 else "ok", i)
                assert queued.state is Q
                ids[queued.id] = i
            deadline = time.monotonic() + 90
            results = [await rt.wait_invocation(ident, deadline - time.monotonic())
                       for ident in ids]
            for inv in results:
                i = ids[inv.id]
                if i % 10 == 0:
                    assert inv.state is D, inv
                    assert len(inv.attempts) == 3 and "retries exhausted" in inv.reason
                    assert {a.outcome for a in inv.attempts} == {Outcome.FUNCTION_ERROR}
                    assert inv.result is not None and inv.result.error is not None
                else:
                    assert inv.state is S, inv
                    assert len(inv.attempts) == 1 and inv.attempts[0].node == "node-a"
                    assert inv.result is not None
                    assert inv.result.result == {"id": inv.id, "x": i}
            states = Counter(inv.state for inv in results)
            assert states == {S: 900, D: 100}

            def counted(event: str) -> float:
                return sum(registry.get_sample_value(
                    "sandbox_async_invocations_total", {"function": f, "event": event}) or 0
                    for f in ("ok", "bad"))

            assert (counted("queued"), counted("succeeded"), counted("dead_lettered"),
                    counted("retried"), counted("started")) == (1000, 900, 100, 200, 1200)
            assert rt.gauges()["async"]["running"] == 0

    asyncio.run(main())


def test_submit_checks_everything_it_can(tmp_path: Path) -> None:
    with Runtime(min_idle=0, isolation="off") as plain:
        plain.register("f", source=OK_SRC)
        with pytest.raises(ConfigurationError, match="state_dir"):
            plain.invoke_async("f")
    with Runtime(min_idle=0, isolation="off", state_dir=tmp_path / "state") as rt:
        rt.register("f", source=OK_SRC)
        with pytest.raises(FunctionNotFound):
            rt.invoke_async("nope")
        with pytest.raises(FunctionNotFound):
            rt.invoke_async("f", version=7)
        with pytest.raises(InvalidRequest, match="msgpack"):
            rt.invoke_async("f", payload=b"\xc1")
        with pytest.raises(InvalidRequest, match="JSON"):
            rt.invoke_async("f", payload=b"{", content_type="application/json")
        with pytest.raises(InvalidRequest):
            rt.invoke_async("f", {1, 2})  # not encodable
        with pytest.raises(InvalidRequest):
            rt.invoke_async("f", policy={"max_retries": 1000})
        with pytest.raises(InvalidRequest):
            rt.invoke_async("f", idempotency_key="")
        with pytest.raises(InvalidRequest):
            rt.register("g", source=OK_SRC, async_policy={"retry_on": ["OK"]})
        assert rt.invocations()[0] == []  # nothing was queued
        json_call = rt.invoke_async("f", payload=b"[1]", content_type="application/json",
                                    limits=Limits(wall_timeout_s=5))
        done = rt.wait_invocation(json_call.id, 30)
        assert done.state is S and done.result is not None and done.result.result["x"] == [1]
        assert done.content_type == "application/json"


def test_cancel_a_running_invocation_and_back_pressure(tmp_path: Path) -> None:
    with Runtime(min_idle=1, isolation="off", state_dir=tmp_path / "state",
                 async_concurrency=1, async_max_queued_per_function=2) as rt:
        rt.register("sleep", source=SLEEP_SRC)
        running = rt.invoke_async("sleep", 60)
        waiting = rt.invoke_async("sleep", 60)
        with pytest.raises(Overloaded):
            rt.invoke_async("sleep", 60)
        deadline = time.monotonic() + 30
        while rt.invocation(running.id).state is not R:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert rt.gauges()["async"]["running"] == 1
        t0 = time.monotonic()
        assert rt.cancel_invocation(running.id).state is C
        assert rt.cancel_invocation(waiting.id).state is C
        # The worker is killed, and the attempt recorded CANCELLED, at once.
        while rt.invocation(running.id).attempts[-1].outcome is None:
            assert time.monotonic() - t0 < 10
            time.sleep(0.02)
        attempt = rt.invocation(running.id).attempts[-1]
        assert attempt.outcome is Outcome.CANCELLED and time.monotonic() - t0 < 10
        assert rt.invocation(waiting.id).attempts == ()
        assert rt.invoke_async("sleep", 0).state is Q  # room again


def test_an_attempt_cut_short_by_a_graceful_close_is_not_charged(tmp_path: Path) -> None:
    with Runtime(min_idle=1, isolation="off", state_dir=tmp_path / "state") as rt:
        rt.register("sleep", source=SLEEP_SRC, async_policy={"max_retries": 0})
        queued = rt.invoke_async("sleep", 1.5)
        while rt.invocation(queued.id).state is not R:
            time.sleep(0.02)
        rt.close(grace_s=0)
    with Runtime(min_idle=1, isolation="off", state_dir=tmp_path / "state") as rt:
        rt.register("sleep", source=SLEEP_SRC, async_policy={"max_retries": 0})
        done = rt.wait_invocation(queued.id, 30)
        assert done.state is S, done  # max_retries=0, yet it ran again: not charged
        assert [(a.outcome, a.charged) for a in done.attempts] == [
            (Outcome.CANCELLED, False), (Outcome.OK, True)]


def test_an_outcome_is_recorded_when_the_database_fails_a_moment(tmp_path: Path) -> None:
    """Recording how an attempt ended fails twice (a dropped connection): it is tried again,
    and the invocation succeeds once, not charged CRASHED when its lease runs out."""

    class Flaky(SqliteQueue):
        failures = 2

        def finish(self, *args: Any, **kwargs: Any) -> Any:
            if self.failures:
                self.failures -= 1
                raise OSError("connection lost")
            return super().finish(*args, **kwargs)

    queue = Flaky(tmp_path / "state")

    async def main() -> None:
        async with AsyncRuntime(min_idle=1, isolation="off", async_queue=queue) as rt:
            rt.register("f", source=OK_SRC, async_policy={"max_retries": 0})
            queued = await rt.invoke_async("f", 1)
            done = await rt.wait_invocation(queued.id, 30)
            assert done.state is S and [a.outcome for a in done.attempts] == [Outcome.OK]
            assert queue.failures == 0

    asyncio.run(main())


def test_a_graceful_stop_in_the_middle_of_a_claim_charges_nothing(tmp_path: Path) -> None:
    """The stop comes while the dispatch loop waits for a claim that commits: the loop is not
    cut off there (its rows would stay RUNNING with nobody to run them, then be charged
    CRASHED at the next start); the claimed attempt runs within the grace period."""
    import threading

    class Held(SqliteQueue):
        """Holds the dispatch loop's first claim that took something, after its commit (the
        rows are RUNNING), until the test lets it go on."""

        armed = False
        claimed = threading.Event()
        go_on = threading.Event()

        async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            answer = await super().run(fn, *args, **kwargs)
            if getattr(fn, "__name__", "") == "claim" and answer[0] and self.armed:
                self.armed = False
                self.claimed.set()
                assert await asyncio.to_thread(self.go_on.wait, 30)
            return answer

    state = tmp_path / "state"
    queue = Held(state)

    async def first() -> str:
        async with AsyncRuntime(min_idle=1, isolation="off", async_queue=queue) as rt:
            rt.register("f", source=OK_SRC, async_policy={"max_retries": 0})
            queue.armed = True
            ident = (await rt.invoke_async("f", 1)).id
            assert await asyncio.to_thread(queue.claimed.wait, 30)
            dispatcher = rt._dispatcher
            assert dispatcher is not None
            stopping = asyncio.create_task(dispatcher.stop(grace_s=10))
            await asyncio.sleep(0)  # stop() runs up to its first wait
            queue.go_on.set()
            await stopping
            return ident

    async def second(ident: str) -> None:
        async with AsyncRuntime(min_idle=1, isolation="off", state_dir=state) as rt:
            rt.register("f", source=OK_SRC, async_policy={"max_retries": 0})
            done = await rt.wait_invocation(ident, 30)
            assert done.state is S, done
            assert [a.outcome for a in done.attempts] == [Outcome.OK], done.attempts

    asyncio.run(second(asyncio.run(first())))


def test_a_restart_gives_old_invocations_time_to_find_their_function(tmp_path: Path) -> None:
    """Queued long ago (a backlog, a long outage): after a restart the dispatcher may claim one
    before the server has registered its functions again. The grace for an unknown function
    counts from the start too, not only from the submission."""
    import threading

    state = tmp_path / "state"
    early = SqliteQueue(state)
    early.open()
    item = NewInvocation(new_id(), "f", 1, b"\x01", "application/msgpack", None,
                         AsyncPolicy(max_retries=0), None)
    early.submit(item, time.time() - 3600)
    early.shutdown()

    class Watched(SqliteQueue):
        given_back = threading.Event()

        def release(self, *args: Any, **kwargs: Any) -> None:
            super().release(*args, **kwargs)
            self.given_back.set()

    queue = Watched(state)

    async def main() -> None:
        async with AsyncRuntime(min_idle=1, isolation="off", async_queue=queue) as rt:
            # Claimed while "f" is unknown here: given back, not charged.
            assert await asyncio.to_thread(queue.given_back.wait, 30)
            rt.register("f", source=OK_SRC)
            done = await rt.wait_invocation(item.id, 30)
            assert done.state is S, done
            assert [a.outcome for a in done.attempts] == [Outcome.OK]

    asyncio.run(main())


def test_renewals_failing_past_the_lease_do_not_crash_a_running_attempt(
        tmp_path: Path) -> None:
    """Renewals fail for twice the lease while the attempt runs; the dispatcher neither takes
    the attempt from itself nor runs a second copy beside it: one attempt, OK."""

    class Blip(SqliteQueue):
        failing_until = 0.0

        def renew(self, *args: Any, **kwargs: Any) -> Any:
            if time.time() < self.failing_until:
                raise OSError("connection lost")
            return super().renew(*args, **kwargs)

    queue = Blip(tmp_path / "state")

    async def main() -> None:
        async with AsyncRuntime(min_idle=1, isolation="off", async_queue=queue,
                                async_lease_s=1.0) as rt:
            rt.register("sleep", source=SLEEP_SRC, async_policy={"max_retries": 3,
                                                                  "backoff_initial_s": 0.0})
            queue.failing_until = time.time() + 2.0
            queued = await rt.invoke_async("sleep", 3.0)
            done = await rt.wait_invocation(queued.id, 60)
            assert done.state is S, done
            assert [a.outcome for a in done.attempts] == [Outcome.OK], done.attempts

    asyncio.run(main())


def test_the_postgresql_queue_survives_a_database_restart() -> None:
    """PostgreSQL restarts while an attempt runs: the pool hands out no dead connection and
    the outcome is recorded; the attempt is neither charged CRASHED nor run twice. (A server
    of its own: a restarted one has new processes, which must be gone when the test ends.)"""
    from postgres import Postgres, unavailable

    from sandbox.asyncq_pg import PostgresQueue

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)

    async def main(pg: Any) -> None:
        url = pg.database()
        async with AsyncRuntime(min_idle=1, isolation="off", node="a",
                                async_queue=PostgresQueue(url)) as rt:
            rt.register("sleep", source=SLEEP_SRC, async_policy={"max_retries": 0})
            queued = await rt.invoke_async("sleep", 2.0)
            while (await rt.invocation(queued.id)).state is not R:
                await asyncio.sleep(0.02)
            # Every pooled connection used once, so each would be stale after the restart.
            await asyncio.gather(*(rt.invocation(queued.id) for _ in range(16)))
            await asyncio.to_thread(pg.stop)
            await asyncio.to_thread(pg.start)
            done = await rt.wait_invocation(queued.id, 60)
            assert done.state is S, done
            assert [a.outcome for a in done.attempts] == [Outcome.OK], done.attempts
            again = await rt.invoke_async("sleep", 0.0)
            assert (await rt.wait_invocation(again.id, 30)).state is S

    with Postgres() as server:
        asyncio.run(main(server))


def test_two_replicas_share_the_postgresql_queue(pg: Any) -> None:
    """A fleet: two runtimes over one database both take work; each id ends once."""
    from sandbox.asyncq_pg import PostgresQueue

    url = pg.database()

    async def main() -> None:
        async with AsyncRuntime(min_idle=1, isolation="off", node="a",
                                async_queue=PostgresQueue(url)) as a, \
                AsyncRuntime(min_idle=1, isolation="off", node="b",
                             async_queue=PostgresQueue(url)) as b:
            for rt in (a, b):
                rt.register("sleep", source=SLEEP_SRC, reuse=1000)
            ids = [(await a.invoke_async("sleep", 0.05)).id for _ in range(40)]
            done = [await b.wait_invocation(i, 60) for i in ids]
            assert {d.state for d in done} == {S}
            assert all(len(d.attempts) == 1 for d in done)
            assert {d.attempts[0].node for d in done} == {"a", "b"}

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# A real server: SIGKILL with 200 in flight; the CLI

WORK_SRC = ("import time\n\n"
            "def handler(event, context):\n"
            "    time.sleep(0.05)\n"
            "    return {'id': context.invocation_id, 'double': event * 2}\n")


def test_sigkill_with_200_in_flight_loses_nothing(tmp_path: Path) -> None:
    from sandbox.client import Client

    state = tmp_path / "state"
    server = ServerProcess(state, stderr=tmp_path / "first.log")
    try:
        with Client(server.target, timeout=30) as client:
            client.deploy("work", WORK_SRC,
                          async_policy={"max_retries": 2, "backoff_initial_s": 0.05})
            ids = {client.invoke_async("work", i).id: i for i in range(200)}
            deadline = time.monotonic() + 60
            while True:  # some done, some running, the rest queued: then kill
                page, _ = client.invocations(page_size=1000)
                states = Counter(inv.state for inv in page)
                if states[S] >= 20 and states[R] >= 1:
                    break
                assert time.monotonic() < deadline, states
                time.sleep(0.01)
        below = server.descendants()
        server.proc.kill()  # SIGKILL: no drain, no outcome of the running attempts recorded
        server.proc.wait(30)
        assert wait_gone(below) == []  # its zygote and workers die with it
    finally:
        server.kill()
    server = ServerProcess(state, stderr=tmp_path / "second.log")
    try:
        with Client(server.target, timeout=30) as client:
            final = {i: client.wait_invocation(i, 60, poll_s=0.05) for i in ids}
            page, _ = client.invocations(page_size=1000)
    finally:
        server.stop()
    assert sorted(inv.id for inv in page) == sorted(ids)  # none lost, none added
    crashed = 0
    for ident, inv in final.items():
        assert inv.state is S, inv
        assert inv.result is not None and inv.result.result == {"id": ident,
                                                               "double": ids[ident] * 2}
        outcomes = [a.outcome for a in inv.attempts]
        assert outcomes.count(Outcome.OK) == 1 and outcomes[-1] is Outcome.OK  # counted once
        crashed += outcomes.count(Outcome.CRASHED)
    assert crashed >= 1  # those running at the kill: recorded CRASHED, run again
    assert crashed == sum(1 for inv in final.values() if len(inv.attempts) > 1)


def test_a_replica_killed_mid_attempt_has_it_retried_by_another(pg: Any,
                                                                 tmp_path: Path) -> None:
    """A fleet (two `sandbox serve --store postgresql://...`): SIGKILL the replica running the
    attempts; once their leases expire the other records them CRASHED and runs them again."""
    from sandbox.client import Client

    url = pg.database()
    lease = ("--async-lease", "2")
    a = ServerProcess(tmp_path / "a", "--store", url, "--node-name", "A", *lease)
    b = None
    try:
        with Client(a.target, timeout=30) as client:
            client.deploy("slow", SLEEP_SRC, async_policy={"backoff_initial_s": 0.1})
            ids = [client.invoke_async("slow", 3).id for _ in range(2)]
            deadline = time.monotonic() + 30
            while any(client.invocation(i).state is not R for i in ids):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        b = ServerProcess(tmp_path / "b", "--store", url, "--node-name", "B", *lease)
        below = a.descendants()
        a.proc.kill()
        a.proc.wait(30)
        assert wait_gone(below) == []
        with Client(b.target, timeout=30) as client:
            done = [client.wait_invocation(i, 60, poll_s=0.1) for i in ids]
    finally:
        a.kill()
        if b is not None:
            b.stop()
    for inv in done:
        assert inv.state is S and inv.result is not None and inv.result.result == 3
        assert [(x.outcome, x.node) for x in inv.attempts] == [(Outcome.CRASHED, "A"),
                                                                 (Outcome.OK, "B")]


def test_cli_async_commands(tmp_path: Path) -> None:
    from sandbox.client import Client

    server = ServerProcess(tmp_path / "state")
    try:
        with Client(server.target, timeout=30) as client:
            client.deploy("add", "def handler(event, context):\n    return event['a'] + 1\n")
            client.deploy("bad", BAD_SRC, async_policy={"max_retries": 0})
            fn = client.function("bad")
        assert fn.name == "bad"

        def cli(*argv: str) -> tuple[int, Any]:
            proc = subprocess.run([sys.executable, "-m", "sandbox.cli", *argv, "--target",
                                   server.target], capture_output=True, text=True, timeout=60,
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            return proc.returncode, json.loads(proc.stdout) if proc.stdout else proc.stderr

        code, out = cli("invoke", "--async", "add", '{"a": 41}', "--wait", "30")
        assert code == 0 and out["state"] == "SUCCEEDED" and out["result"]["result"] == 42
        code, out = cli("invoke", "--async", "bad", "1", "--idempotency-key", "once")
        assert code == 0 and out["state"] == "QUEUED" and not out["duplicate"]
        bad_id = out["id"]
        code, out = cli("invoke", "--async", "bad", "1", "--idempotency-key", "once")
        assert out["id"] == bad_id and out["duplicate"]
        code, out = cli("invocation", bad_id, "--wait", "30")
        assert code == 0 and out["state"] == "DEAD_LETTERED"
        code, out = cli("invocations", "--state", "dead_lettered")
        assert [i["id"] for i in out["invocations"]] == [bad_id]
        code, out = cli("invocation", bad_id, "--redrive")
        assert code == 0 and out["state"] in ("QUEUED", "RUNNING", "DEAD_LETTERED")
        code, out = cli("invoke", "--async", "nope")
        assert code == 2 and "nope" in out
        code, out = cli("invocation", "no-such-id")
        assert code == 2 and "no-such-id" in out
    finally:
        server.stop()

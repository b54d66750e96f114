"""The asyncio face of the runtime: the same behaviour through ``AsyncRuntime``."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from sandbox import AsyncRuntime, Limits, Outcome

HANG = "import time\ndef handler(e, c):\n    yield 'running'\n    time.sleep(60)\n"


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


def test_invoke_stream_map() -> None:
    async def main() -> None:
        async with AsyncRuntime(min_idle=1) as rt:
            rt.register("sq", source="def handler(e, c):\n    return e * e\n")
            rt.register("gen", source="def handler(e, c):\n    yield from range(e)\n")
            assert (await rt.invoke("sq", 7)).result == 49
            stream = rt.stream("gen", 5)
            assert [x async for x in stream] == [0, 1, 2, 3, 4]
            assert (await stream.result()).outcome is Outcome.OK
            results = await rt.map("sq", range(10))
            assert [r.result for r in results] == [i * i for i in range(10)]
            await rt.wait_warm()
            assert rt.info()["pools"]["default"]["idle"] == 1

    run(main())


def _gone(pid: int) -> bool:
    try:
        psutil.Process(pid).wait(timeout=10)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_cancelling_the_stream_consumer_kills_the_worker() -> None:
    async def main() -> None:
        async with AsyncRuntime(min_idle=0) as rt:
            rt.register("hang", source=HANG)
            stream = rt.stream("hang")
            assert await stream.__anext__() == "running"
            worker = stream._ticket.execution.worker.pid  # type: ignore[union-attr]
            waiting = asyncio.ensure_future(stream.result())
            await asyncio.sleep(0)  # one loop turn: the task is now awaiting the result
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert _gone(worker)

    run(main())


def test_caller_task_cancelled_mid_invoke() -> None:
    async def main() -> None:
        async with AsyncRuntime(min_idle=0) as rt:
            rt.register("slow", source="import time\ndef handler(e, c):\n    time.sleep(60)\n")
            handle = rt.submit("slow", limits=Limits(wall_timeout_s=120))
            await handle.running()
            worker = handle.worker_pid
            assert worker is not None
            caller = asyncio.ensure_future(_await(handle))
            await asyncio.sleep(0)  # one loop turn: the caller is now awaiting
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            assert _gone(worker)
            # the runtime serves on
            rt.register("ok", source="def handler(e, c):\n    return 'ok'\n")
            assert (await rt.invoke("ok")).result == "ok"
            assert rt.info()["running"] == 0

    run(main())


async def _await(handle: object) -> object:
    return await handle  # type: ignore[misc]


def test_handle_cancel_gives_a_cancelled_result() -> None:
    async def main() -> None:
        async with AsyncRuntime(min_idle=0) as rt:
            rt.register("slow", source="import time\ndef handler(e, c):\n    time.sleep(60)\n")
            handle = rt.submit("slow")
            await handle.running()
            handle.cancel()
            result = await handle
            assert result.outcome is Outcome.CANCELLED
            assert result.stats.worker_pid is not None and _gone(result.stats.worker_pid)

    run(main())


HANG_PLAIN = "import time\ndef handler(e, c):\n    time.sleep(60)\n"
NOOP = "def handler(e, c):\n    return e\n"


def test_admission_holds_within_one_loop_turn() -> None:
    """Calls submitted without ever yielding to the loop are counted at admission: the
    (max_concurrency + max_queue + 1)th is refused at once."""
    from sandbox import Overloaded

    async def main() -> None:
        async with AsyncRuntime(min_idle=0, max_concurrency=1, max_queue=2) as rt:
            rt.register("hang", source=HANG_PLAIN)
            handles = [rt.submit("hang") for _ in range(3)]  # no await in between
            with pytest.raises(Overloaded, match="max_queue=2"):
                rt.submit("hang")
            with pytest.raises(Overloaded):
                rt.stream("hang")
            assert rt.info()["queued"] == 3  # none has started running yet
            for h in handles:
                h.cancel()
            assert [(await h).outcome for h in handles] == [Outcome.CANCELLED] * 3
            assert rt.info()["queued"] == 0 and rt.info()["running"] == 0

    run(main())


def test_map_pulls_events_lazily() -> None:
    """A map longer than the queue is not refused, and never holds more than
    max_concurrency calls in flight."""
    async def main() -> None:
        async with AsyncRuntime(min_idle=1, max_concurrency=2, max_queue=0) as rt:
            rt.register("noop", source=NOOP)
            in_flight: list[int] = []

            def events():  # type: ignore[no-untyped-def]
                for i in range(30):
                    in_flight.append(rt.info()["running"] + rt.info()["queued"])
                    yield i

            results = await rt.map("noop", events())
            assert [r.result for r in results] == list(range(30))
            assert max(in_flight) <= 2, in_flight

    run(main())


def test_close_answers_queued_invokes_cancelled() -> None:
    """aclose() cancels an invoke() still waiting for a slot: its caller gets a CANCELLED
    result (not an exception, not a start error later), and its task is not left marked as
    being cancelled."""
    async def main() -> None:
        rt = AsyncRuntime(min_idle=0, max_concurrency=1)
        await rt.start()
        rt.register("hang", source=HANG_PLAIN)
        running = rt.submit("hang")
        await running.running()

        async def caller() -> tuple[Outcome, int]:
            result = await rt.invoke("hang")
            task = asyncio.current_task()
            assert task is not None
            return result.outcome, task.cancelling()

        queued = asyncio.ensure_future(caller())
        await asyncio.sleep(0)  # one loop turn: the invoke is admitted and waits for a slot
        assert rt.info()["queued"] == 1
        await rt.aclose(grace_s=0)
        assert await queued == (Outcome.CANCELLED, 0)
        assert (await running).outcome is Outcome.CANCELLED

    run(main())

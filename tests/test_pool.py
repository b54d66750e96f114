"""The warm pool follows demand: the target arithmetic alone, then a real pool scaling up
under a burst, handing births to waiting callers, and shedding to zero in silence."""

from __future__ import annotations

import asyncio

import pytest

from sandbox import AsyncRuntime, ConfigurationError, Outcome
from sandbox.pool import Demand

NOOP = "def handler(e, c):\n    return e\n"


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


# -- Demand: arithmetic on given times ----------------------------------------------------------

def test_target_is_min_idle_without_traffic() -> None:
    d = Demand(min_idle=2, max_idle=10, idle_ttl_s=60)
    assert d.rate(0.0) == 0.0
    assert d.target(0.0) == 2


def test_target_follows_littles_law_with_headroom() -> None:
    d = Demand(min_idle=0, max_idle=100, idle_ttl_s=60, headroom=2.0, window_s=1.0,
               birth_s=0.010)
    for i in range(2000):            # 200 calls/s for 10 s: steady state
        d.arrival(i * 0.005)
    rate = d.rate(10.0)
    assert 190 <= rate <= 210
    # 200/s x 10 ms x 2 = 4 workers on their way
    assert d.target(10.0) == 4


def test_target_is_capped_by_max_idle() -> None:
    d = Demand(min_idle=1, max_idle=3, idle_ttl_s=60, birth_s=0.1)
    for i in range(1000):
        d.arrival(i * 0.001)
    assert d.target(1.0) == 3


def test_silence_scales_to_zero() -> None:
    d = Demand(min_idle=0, max_idle=50, idle_ttl_s=5, birth_s=0.01)
    for i in range(100):
        d.arrival(i * 0.01)
    assert d.target(1.0) >= 1
    # under one call per idle_ttl_s is no demand at all
    assert d.target(30.0) == 0


def test_birth_time_is_a_moving_average() -> None:
    d = Demand(min_idle=0, max_idle=50, idle_ttl_s=60, birth_s=0.005)
    for _ in range(50):
        d.born(0.020)
    assert d.birth_s == pytest.approx(0.020, rel=0.01)


# -- a real pool --------------------------------------------------------------------------------

def test_burst_is_served_by_births_handed_to_waiting_callers() -> None:
    """No warm worker at all: every call of a burst waits for a birth and gets one."""
    async def main() -> None:
        async with AsyncRuntime(min_idle=0, max_idle=0) as rt:
            rt.register("noop", source=NOOP)
            results = await asyncio.gather(*(rt.invoke("noop", i) for i in range(12)))
            assert [r.result for r in results] == list(range(12))
            assert all(r.outcome is Outcome.OK and r.stats.forked_on_demand for r in results)
            assert len({r.stats.worker_pid for r in results}) == 12
            sizes = rt.info()["pools"]["default"]
            assert sizes["waiting"] == 0 and sizes["busy"] == 0
            # nothing is kept warm above max_idle
            await rt.wait_idle(at_most=0)

    run(main())


def test_warm_target_rises_with_demand_and_sheds_in_silence() -> None:
    async def main() -> None:
        async with AsyncRuntime(min_idle=0, max_idle=6, idle_ttl_s=0.5) as rt:
            rt.register("noop", source=NOOP)
            for i in range(40):
                assert (await rt.invoke("noop", i)).outcome is Outcome.OK
            sizes = rt.info()["pools"]["default"]
            assert sizes["arrival_rate"] > 2 and sizes["target"] >= 1, sizes
            assert sizes["birth_ms"] > 0
            # the demand keeps workers warm ...
            await rt.wait_idle(at_least=1)
            # ... and a silent profile lets them go: scale to zero
            await rt.wait_idle(at_most=0, timeout=60)
            sizes = rt.info()["pools"]["default"]
            assert sizes["shed"] >= 1 and sizes["target"] == 0, sizes
            # and comes back on demand
            result = await rt.invoke("noop", "back")
            assert result.result == "back" and result.stats.forked_on_demand

    run(main())


def test_a_cancelled_waiter_leaves_its_worker_to_the_pool() -> None:
    async def main() -> None:
        async with AsyncRuntime(min_idle=0, max_idle=0, idle_ttl_s=60) as rt:
            rt.register("noop", source=NOOP)
            handle = rt.submit("noop", 1)
            await asyncio.sleep(0)  # one loop turn: its task ran its first step
            assert rt.info()["pools"]["default"]["waiting"] == 1
            handle.cancel()  # while it waits for the birth it started
            result = await handle
            assert result.outcome is Outcome.CANCELLED
            # that birth is not lost: it serves the next call, and no other birth happens
            assert (await rt.invoke("noop", 2)).result == 2
            pool = rt.info()["pools"]["default"]
            assert pool["births"]["births"] == 1 and pool["waiting"] == 0, pool

    run(main())


def test_a_call_cancelled_before_its_task_ran_is_cancelled() -> None:
    async def main() -> None:
        async with AsyncRuntime(min_idle=0) as rt:
            rt.register("noop", source=NOOP)
            handle = rt.submit("noop", 1)
            handle.cancel()  # its task has not run at all yet
            assert (await handle).outcome is Outcome.CANCELLED

    run(main())


def test_pool_knobs_are_validated_and_reported() -> None:
    with pytest.raises(ConfigurationError, match="max_idle"):
        AsyncRuntime(min_idle=3, max_idle=2)
    with pytest.raises(ConfigurationError, match="idle_ttl_s"):
        AsyncRuntime(idle_ttl_s=0)

    async def main() -> None:
        async with AsyncRuntime(min_idle=1, max_idle=5, idle_ttl_s=7.5) as rt:
            await rt.wait_warm()
            info = rt.info()
            assert (info["min_idle"], info["max_idle"], info["idle_ttl_s"]) == (1, 5, 7.5)
            pool = info["pools"]["default"]
            assert (pool["min_idle"], pool["max_idle"], pool["idle_ttl_s"]) == (1, 5, 7.5)
            assert pool["births"]["births"] >= 1

    run(main())


def test_cgroups_of_dead_workers_are_recycled_empty_and_reset() -> None:
    """A worker's cgroup is reused by a later birth only once empty, with its counters reset:
    the next worker's OOM count, peak and CPU start from zero."""
    from sandbox.cgroups import CgroupManager

    if not CgroupManager(prefix="probe").available:
        pytest.skip("no usable cgroups on this machine")

    async def main() -> None:
        async with AsyncRuntime(min_idle=0, max_idle=0, cgroups=True) as rt:
            rt.register("noop", source=NOOP)
            rt.register("hog", source="def handler(e, c):\n    b = bytearray(32 << 20)\n"
                                      "    s = 0\n    for i in range(300000):\n        s += i\n"
                                      "    return len(b)\n")
            rt.register("fail", source="def handler(e, c):\n    raise ValueError(e)\n")
            hog = await rt.invoke("hog")
            assert hog.outcome is Outcome.OK
            # A failed call reads its figures from the cgroup: were the hog's group handed on
            # unreset, one of these would report its 32 MiB peak.
            extra = 3
            for i in range(40):
                result = await rt.invoke("fail", i)
                assert result.outcome is Outcome.FUNCTION_ERROR
                peak = result.stats.peak_memory_bytes
                assert peak is not None and peak < 32 << 20, (i, peak)
                if rt.info()["pools"]["default"]["cgroups_recycled"]:
                    extra -= 1
                    if extra == 0:
                        break
            assert extra == 0, "no cgroup was reused"

    run(main())

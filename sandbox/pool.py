"""Warm pools of confined workers: the scheduling side of the supervisor.

Data flow (one pool per preload profile)::

    AsyncRuntime.invoke ──▶ Pool.acquire ──▶ idle worker? ──yes──▶ Execution.run ──▶ result
                                 │                 │ no                  │  ▲
                                 │                 ▼                     │  │ frames (msgpack),
                                 │        ZygoteHandle.spawn ──fork──▶ Worker  stdout/stderr pipes,
                                 └── refill (off the critical path) ─────┘  pidfd (exit), cgroup

Who does what:

- :class:`~sandbox.handles.ZygoteHandle` (in :mod:`sandbox.handles`) starts a zygote and asks
  it for workers; :class:`~sandbox.handles.WorkerHandle` is the supervisor's view of one worker.
- :class:`Pool` keeps ``min_idle`` workers ready per profile, refills after each take, forks on
  demand when none is idle, keeps reusable workers per function version, and replaces a zygote
  that died or gained a thread. Refills are born at idle priority and start after a result
  is delivered, so forking stays off the invocations' critical path.
- :class:`~sandbox.execution.Execution` (in :mod:`sandbox.execution`) sends one ``invoke``,
  enforces the deadline and the CPU limit from outside, collects chunks and the terminal
  frame, kills the whole worker tree when it must, and classifies exactly one outcome.
- :class:`SlotAllocator` gives each live worker a slot, hence a uid of its own.

Nothing here blocks the event loop on a child: all child I/O is non-blocking and bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sandbox._logging import get_logger
from sandbox.handles import (
    DEATH_TIMEOUT_S,
    STATUS_TIMEOUT_S,
    WORKER_READY_TIMEOUT_S,
    WorkerHandle,
    WorkerStartError,
    ZygoteHandle,
)
from sandbox.limits import Limits, format_size
from sandbox.observe import Observer, Observers

if TYPE_CHECKING:
    from sandbox.cgroups import CgroupManager, WorkerCgroup
    from sandbox.execution import Execution
    from sandbox.functions import FunctionInfo

__all__ = ["Pool", "SlotAllocator"]

log = get_logger(__name__)


_CAP_SYS_NICE = 23


def can_renice() -> bool:
    """Whether this process may leave SCHED_IDLE again, and move its children out of it: it
    holds CAP_SYS_NICE (root usually does; root in a container without it does not)."""
    global _can_renice
    if _can_renice is None:
        try:
            with open("/proc/self/status") as f:
                line = next(x for x in f if x.startswith("CapEff:"))
            _can_renice = bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
        except (OSError, StopIteration, ValueError, IndexError):
            _can_renice = False
    return _can_renice


_can_renice: bool | None = None


def summarize_ms(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 of durations in seconds, in milliseconds ({} for none)."""
    if not values:
        return {}
    values = sorted(values)
    n = len(values)
    return {f"p{q}": round(values[min(n - 1, n * q // 100)] * 1e3, 4) for q in (50, 90, 99)}


def default_max_idle() -> int:
    """The default cap on a pool's warm workers: 4 per core, at least 8."""
    return max(8, 4 * (os.cpu_count() or 1))


class Demand:
    """How many warm workers a pool should keep: the arrival rate times the birth time (Little's
    law: the workers that must already be on their way to meet the calls that will come while
    one is born), times ``headroom``, within ``[min_idle, max_idle]``.

    The arrival rate is an exponentially decaying count of acquisitions (time constant
    ``window_s``): ``count`` tends to ``rate * window_s`` under steady load and to 0 in
    silence. The birth time is a moving average of measured births. A profile that sees less
    than one call per ``idle_ttl_s`` has no demand: with ``min_idle=0`` it scales to zero.

    Pure arithmetic on the times it is given (no clock of its own), so it is tested alone.
    """

    def __init__(self, *, min_idle: int, max_idle: int, idle_ttl_s: float,
                 headroom: float = 2.0, window_s: float = 1.0,
                 birth_s: float = 0.005) -> None:
        self.min_idle = min_idle
        self.max_idle = max_idle
        self.idle_ttl_s = idle_ttl_s
        self.headroom = headroom
        self.window_s = window_s
        self.birth_s = birth_s
        self._count = 0.0
        self._last = 0.0

    def arrival(self, now: float) -> None:
        """One acquisition at ``now``."""
        self._count = self._decayed(now) + 1.0
        self._last = now

    def born(self, seconds: float) -> None:
        """One birth took ``seconds`` (request to ready)."""
        self.birth_s += 0.2 * (seconds - self.birth_s)

    def _decayed(self, now: float) -> float:
        return self._count * math.exp(-max(0.0, now - self._last) / self.window_s)

    def rate(self, now: float) -> float:
        """Acquisitions per second, recently."""
        return self._decayed(now) / self.window_s

    def target(self, now: float) -> int:
        """Warm workers to keep now."""
        rate = self.rate(now)
        want = 0
        if rate * self.idle_ttl_s >= 1.0:
            want = math.ceil(rate * self.birth_s * self.headroom)
        return max(self.min_idle, min(self.max_idle, want))


class Pool:
    """Warm, pre-forked, confined workers of one preload profile."""

    def __init__(self, profile: str, modules: Sequence[str], *, instance: str, min_idle: int,
                 cgroups: CgroupManager | None, birth_config: Mapping[str, Any],
                 slots: SlotAllocator, isolation: Mapping[str, Any] | None = None,
                 netns_fd: int = -1, gc_freeze: bool = True,
                 default_limits: Limits | None = None, max_idle: int | None = None,
                 idle_ttl_s: float = 60.0, max_births: int | None = None,
                 observer: Observer | None = None) -> None:
        self.profile = profile
        #: told of births, failed births and zygote starts (the runtime's fan-out)
        self.observer = observer if observer is not None else Observers()
        self.gc_freeze = gc_freeze
        self.default_limits = default_limits
        self.slots = slots
        self.isolation = isolation
        self.netns_fd = netns_fd
        self.modules = tuple(modules)
        self.instance = instance
        self.min_idle = min_idle
        self.max_idle = max(min_idle, max_idle if max_idle is not None else default_max_idle())
        self.idle_ttl_s = idle_ttl_s
        #: births under way at once, at most (more than the cores only queue in the zygote)
        self.max_births = max_births or max(2, os.cpu_count() or 1)
        self.demand = Demand(min_idle=min_idle, max_idle=self.max_idle, idle_ttl_s=idle_ttl_s)
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
        #: births under way at normal priority (for callers waiting now), of ``starting``
        self.urgent = 0
        #: callers waiting for the next worker born (none was idle)
        self._acquirers: collections.deque[asyncio.Future[tuple[WorkerHandle, bool]]] = \
            collections.deque()
        self._shed_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.zygote_starts = 0
        self.births = 0
        self._birth_records: collections.deque[
            tuple[float, list[tuple[str, float, int]]]] = collections.deque(maxlen=1024)
        self._names = itertools.count(1)
        self._refill_tasks: set[asyncio.Task[None]] = set()
        self._refill_failures = 0
        self.shed = 0
        self._waiters: list[asyncio.Future[None]] = []
        #: empty, reset cgroups of dead workers, for the next births
        self.spare_cgroups: collections.deque[WorkerCgroup] = collections.deque()
        self.cgroups_recycled = 0
        self._spare_cap = self.max_idle + self.max_births + 4

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
        replacement = self.zygote_starts > 1
        log.info("zygote %s %s (pid %s, %s preloaded, rss %s)", self.profile,
                 "replaced" if replacement else "ready", zyg.pid, list(self.modules),
                 format_size(zyg.rss_bytes),
                 extra={"event": "zygote_replace" if replacement else "zygote_start",
                        "fields": {"profile": self.profile, "pid": zyg.pid,
                                   "modules": list(self.modules),
                                   "rss_bytes": zyg.rss_bytes}})
        self.observer.zygote_started(self.profile, zyg.pid or 0, replacement)
        return zyg

    def _on_zygote_death(self, zyg: ZygoteHandle) -> None:
        if self.zygote is zyg:
            self.zygote = None
        # Its idle workers are doomed (their death signal is on its way): never hand one out.
        for worker in [w for w in self.idle if w.zygote is zyg]:
            self.discard(worker)
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
        slot = self.slots.acquire()
        cgroup = None
        try:
            if self.cgroups is not None and self.cgroups.available:
                # A recycled group (empty, counters reset) saves a mkdir per hierarchy now and
                # an rmdir per hierarchy after the death.
                cgroup = (self.spare_cgroups.popleft() if self.spare_cgroups
                          else self.cgroups.create(f"{self.profile}-{next(self._names)}"))
                if self.default_limits is not None:
                    # The usual limits now, off the critical path: an invocation with these
                    # limits then writes nothing to cgroupfs.
                    cgroup.set_limits(memory_bytes=self.default_limits.memory_bytes,
                                      max_pids=self.default_limits.max_processes)
            fds: list[int] = []
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                out_r, out_w = os.pipe()
                fds += (out_r, out_w)
                err_r, err_w = os.pipe()
            except BaseException:
                parent.close()
                child.close()
                for fd in fds:
                    os.close(fd)
                raise
        except BaseException:
            # Nothing was forked: the slot and the group go back (no leak when cgroupfs or
            # the fd table refuses).
            self.slots.release(slot)
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroup.remove()
            raise
        config = dict(self.birth_config)
        config["cgroup_procs"] = cgroup.procs_files() if cgroup is not None else []
        config["memory_cgroup"] = self.memory_cgroup
        config["slot"] = slot
        config["network"] = network
        # Warm workers (refills) are born at idle priority when we can undo it from outside
        # (and the zygote from inside): CAP_SYS_NICE, which a container may not grant root.
        config["idle_birth"] = idle_birth = warm and can_renice()
        requested_ns = time.monotonic_ns()
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
        worker.requested_ns = requested_ns
        worker.network = network
        report = zyg.isolation_report
        worker.pid_namespace = bool(report and report["layers"].get("pid_ns", {}).get("enabled"))
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
        self._record_birth(worker)
        return worker, cold

    def _record_birth(self, worker: WorkerHandle) -> None:
        self.births += 1
        seconds = (worker.ready_ns - worker.requested_ns) / 1e9 \
            if worker.ready_ns and worker.requested_ns else None
        if seconds is not None:
            self.demand.born(seconds)
        self.observer.worker_born(self.profile, seconds or 0.0)
        phases = worker.birth_phases()
        if phases:
            self._birth_records.append(
                ((worker.ready_ns - worker.requested_ns) / 1e9, phases))

    def birth_stats(self) -> dict[str, Any]:
        """Births so far, and where the recent ones (up to 1024) spent their time: per phase
        in the order a birth goes through them, p50/p90/p99 in milliseconds and the median
        page faults, plus the total from the request to the ``ready`` message."""
        records = list(self._birth_records)
        summary = summarize_ms

        phases: dict[str, list[float]] = {}
        faults: dict[str, list[int]] = {}
        for _, parts in records:
            for name, seconds, minflt in parts:
                phases.setdefault(name, []).append(seconds)
                faults.setdefault(name, []).append(minflt)
        return {
            "births": self.births,
            "sampled": len(records),
            "total_ms": summary([total for total, _ in records]) if records else {},
            "phases_ms": {name: summary(values) for name, values in phases.items()},
            # minor (mostly copy-on-write) page faults per phase, median
            "phase_faults": {name: sorted(values)[len(values) // 2]
                             for name, values in faults.items()},
        }

    async def acquire(self, fn: FunctionInfo, limits: Limits) -> tuple[WorkerHandle, bool, bool]:
        """A ready worker for ``fn``: (worker, cold_start, waited_for_a_birth).

        Takes the most recently born idle worker (the oldest age out after ``idle_ttl_s``);
        with none idle, waits for the next birth: one already under way, or one started now
        at normal priority.
        """
        network = limits.network and self.isolation is not None
        if fn.reuse > 1:
            queue = self.reusable.get(fn.key)
            while queue:
                worker = queue.pop()
                if worker.alive and worker.limits == limits:
                    self.busy.add(worker)
                    return worker, False, False
                self.discard(worker)
        loop = asyncio.get_running_loop()
        self.demand.arrival(loop.time())
        if network:
            worker, cold = await self.spawn(network=True)
            self.busy.add(worker)
            return worker, cold, True
        while self.idle:
            worker = self.idle.pop()
            if worker.usable() and worker.zygote.still_alive():
                self.busy.add(worker)
                self.refill()  # at idle priority while others are idle: spare CPU only
                return worker, False, False
            self.discard(worker)
        waiter: asyncio.Future[tuple[WorkerHandle, bool]] = loop.create_future()
        self._acquirers.append(waiter)
        self.refill()
        try:
            worker, cold = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._offer(*waiter.result())  # born for us after all: the next one's
            else:
                with contextlib.suppress(ValueError):
                    self._acquirers.remove(waiter)
            raise
        self.busy.add(worker)
        return worker, cold, True

    def bind(self, worker: WorkerHandle, execution: Execution) -> None:
        """``worker`` (acquired) runs ``execution`` now: counted, at normal priority."""
        worker.execution = execution
        worker.served += 1
        if worker.idle_priority:
            # Warm workers wait at SCHED_IDLE; the invocation runs at normal priority.
            worker.idle_priority = False
            with contextlib.suppress(OSError):
                os.sched_setscheduler(worker.pid, os.SCHED_OTHER, os.sched_param(0))

    def release(self, worker: WorkerHandle, keep_for: FunctionInfo | None = None,
                limits: Limits | None = None) -> None:
        """Give a worker back after an invocation: keep it for reuse by ``keep_for`` (with
        these ``limits`` in force), or let it go."""
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
            worker.limits = limits
            self.reusable.setdefault(keep_for.key, collections.deque()).append(worker)
        else:
            self.discard(worker)

    def forget(self, function_key: str) -> None:
        """Let go of the workers kept for a function version (it was unregistered)."""
        for worker in list(self.reusable.get(function_key, ())):
            self.discard(worker)

    def discard(self, worker: WorkerHandle) -> None:
        """Kill and forget a worker; its cgroup goes once it is dead."""
        if worker in self.busy:
            self.busy.discard(worker)
        else:
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
        """After death: close the pidfd; once the worker's cgroup is empty (retrying while a
        process of its tree is still exiting), recycle the group or remove it, and only then
        free its slot (its uid): a new worker never shares a uid with a process of an old one.
        """
        self.workers.discard(worker)
        if worker.pidfd >= 0:
            worker._release_pidfd()
        slot, worker.slot = worker.slot, -1
        cgroup, worker.cgroup = worker.cgroup, None
        if cgroup is None:
            self.slots.release(slot)
            return

        def attempt(tries: int) -> None:
            try:
                cgroup.kill_all()
                if not self.closed and len(self.spare_cgroups) < self._spare_cap:
                    if cgroup.recycle():
                        self.spare_cgroups.append(cgroup)
                        self.cgroups_recycled += 1
                        self.slots.release(slot)
                        return
                    if cgroup.has_tasks() and tries < 8:
                        # Not empty yet (the zygote has not reaped the worker): wait to
                        # recycle rather than remove (an rmdir may succeed before the reap).
                        asyncio.get_running_loop().call_later(
                            0.001 * 2**tries, attempt, tries + 1)
                        return
                if cgroup.remove():
                    self.slots.release(slot)
                    return
            except OSError as exc:
                log.debug("cgroup %s removal: %s", cgroup.name, exc)
            if tries < 12:
                # The kernel frees a cgroup only after its last task is reaped (by the zygote);
                # retry with backoff rather than block the loop.
                asyncio.get_running_loop().call_later(0.002 * 2**tries, attempt, tries + 1)
            else:
                log.warning("cgroup %s could not be removed; its slot stays taken", cgroup.name)

        attempt(0)

    def refill(self) -> None:
        """Start births until the warm target (:class:`Demand`) plus the waiting callers are
        covered by idle workers and births under way; at most ``max_births`` at once.

        Births for waiting callers run at normal priority; the others at idle priority (as
        root), so they only use spare CPU and never slow a running invocation down.
        """
        if self.closed:
            return
        waiting = len(self._acquirers)
        # Births for waiting callers do not wait behind idle-priority ones (which a busy
        # machine may starve): they count against the cap among themselves.
        for _ in range(min(waiting - self.urgent, self.max_births - self.urgent)):
            self._start_birth(urgent=True)
        target = self.demand.target(asyncio.get_running_loop().time())
        missing = target + waiting - len(self.idle) - self.starting
        for _ in range(min(missing, self.max_births - self.starting)):
            self._start_birth(urgent=False)
        self._arm_shedding()

    def _start_birth(self, *, urgent: bool) -> None:
        self.starting += 1
        self.urgent += urgent
        task = asyncio.ensure_future(self._birth(urgent))
        self._refill_tasks.add(task)
        task.add_done_callback(self._refill_tasks.discard)

    async def _birth(self, urgent: bool) -> None:
        try:
            if self._refill_failures:
                # Back off when births keep failing (a broken profile must not spin the CPU).
                await asyncio.sleep(min(5.0, 0.05 * 2 ** self._refill_failures))
            # Idle priority only while an idle worker is there to serve the next call.
            worker, cold = await self.spawn(warm=not urgent and bool(self.idle))
        except Exception as exc:
            self.starting -= 1
            self.urgent -= urgent
            self._refill_failures += 1
            # A worker that died at birth (its zygote was killed, say) is retried for the
            # waiting callers; an error that will repeat (the profile cannot be imported),
            # or a third failure in a row, is theirs to see.
            transient = isinstance(exc, WorkerStartError) and self._refill_failures < 3
            waiter = None if transient else self._next_acquirer()
            if not self.closed:
                self.observer.birth_failed(self.profile, exc)
            if waiter is not None:
                waiter.set_exception(exc)  # the caller learns why it got no worker
            elif not self.closed:
                log.warning("pool %s: could not start a worker: %s", self.profile, exc,
                            extra={"event": "birth_failed",
                                   "fields": {"profile": self.profile, "error": str(exc)}})
            if self._refill_failures >= 20:
                # Births keep failing: every waiting caller gets the error now, and the pool
                # tries again only when a new call comes.
                while (waiter := self._next_acquirer()) is not None:
                    waiter.set_exception(exc)
            elif not self.closed:
                self.refill()
            return
        except BaseException:
            self.starting -= 1
            self.urgent -= urgent
            raise
        self.starting -= 1
        self.urgent -= urgent
        self._refill_failures = 0
        self._offer(worker, cold)
        self.refill()

    def _next_acquirer(self) -> asyncio.Future[tuple[WorkerHandle, bool]] | None:
        while self._acquirers:
            waiter = self._acquirers.popleft()
            if not waiter.done():
                return waiter
        return None

    def _offer(self, worker: WorkerHandle, cold: bool) -> None:
        """A ready worker: to the longest-waiting caller, else to the idle set."""
        if self.closed or not worker.alive or not worker.zygote.still_alive():
            # (a worker whose zygote has just died is doomed: its death signal is on its way)
            self.discard(worker)
            if not self.closed:
                self.refill()
            return
        waiter = self._next_acquirer()
        if waiter is not None:
            waiter.set_result((worker, cold))
            return
        worker.idle_since = asyncio.get_running_loop().time()
        self.idle.append(worker)
        self._notify()

    def _arm_shedding(self) -> None:
        if self._shed_timer is None and len(self.idle) > self.min_idle and not self.closed:
            oldest = self.idle[0].idle_since
            loop = asyncio.get_running_loop()
            delay = max(0.0, oldest + self.idle_ttl_s - loop.time())
            self._shed_timer = loop.call_later(delay, self._shed)

    def _shed(self) -> None:
        """Let go of idle workers above the warm target that waited ``idle_ttl_s``."""
        self._shed_timer = None
        if self.closed:
            return
        now = asyncio.get_running_loop().time()
        target = self.demand.target(now)
        while (len(self.idle) > target and self.idle
               and self.idle[0].idle_since + self.idle_ttl_s <= now):
            self.discard(self.idle.popleft())
            self.shed += 1
        self._notify()
        self._arm_shedding()

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_warm(self) -> None:
        """Wait until ``min_idle`` workers are idle (event-driven, no polling)."""
        await self.wait_idle(lambda idle: idle >= self.min_idle, refill=True)

    async def wait_idle(self, predicate: Callable[[int], bool], *, refill: bool = False
                        ) -> None:
        """Wait until ``predicate(number of idle workers)`` holds, or the pool closes
        (event-driven: woken at every change of the idle set)."""
        while not predicate(len(self.idle)) and not self.closed:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            if refill:
                self.refill()
            await waiter

    def counts(self) -> dict[str, int]:
        """Workers by state: ``idle`` (warm, or kept for a function's reuse), ``busy``,
        ``starting``. Lengths and counters only, so any thread may read them (a scrape)."""
        kept = sum(len(queue) for queue in list(self.reusable.values()))
        return {"idle": len(self.idle) + kept, "busy": len(self.busy),
                "starting": self.starting}

    def sizes(self) -> dict[str, Any]:
        now = asyncio.get_running_loop().time()
        return {
            "idle": len(self.idle),
            "busy": len(self.busy),
            "starting": self.starting,
            "waiting": len(self._acquirers),
            "reusable": sum(len(q) for q in self.reusable.values()),
            "target": self.demand.target(now),
            "min_idle": self.min_idle,
            "max_idle": self.max_idle,
            "idle_ttl_s": self.idle_ttl_s,
            "arrival_rate": round(self.demand.rate(now), 3),
            "birth_ms": round(self.demand.birth_s * 1e3, 3),
            "shed": self.shed,
            "cgroups_recycled": self.cgroups_recycled,
        }

    async def close(self) -> None:
        """Kill every worker and the zygote; wait (bounded) until they are gone."""
        self.closed = True
        self._notify()
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None
        while (waiter := self._next_acquirer()) is not None:
            waiter.set_exception(WorkerStartError(f"pool {self.profile!r} is closed"))
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
        while self.spare_cgroups:
            spare = self.spare_cgroups.popleft()
            with contextlib.suppress(OSError):
                spare.remove()  # empty: the manager's close sweeps anything left
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

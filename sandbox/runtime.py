"""The supervisor, embedded: :class:`AsyncRuntime` (asyncio) and :class:`Runtime` (sync).

A runtime puts together one owner per concern and dispatches calls through them::

    invoke(name, event) ─▶ Registry.function + limits.resolve ─▶ Admission.admit (ticket)
        ─▶ Admission slot ─▶ Pool(profile).acquire ─▶ Execution.run ─▶ build_result
        ─▶ result to the caller ─▶ (then) Pool.release, Pool.refill

- :class:`~sandbox.host.Host`: the machine-level setup (bundle dir, cgroups, the isolation
  configuration, the shared network namespace);
- :class:`~sandbox.registry.Registry`: the functions and their versions;
- :class:`~sandbox.admission.Admission`: the bounded queue in front of ``max_concurrency``
  running calls, and each call's cancellable :class:`~sandbox.admission.Ticket`;
- :class:`~sandbox.pool.Pool` (one per preload profile): zygote, warm workers, births;
  the only one that changes a worker's state;
- :class:`~sandbox.execution.Execution`: one call on one worker, to exactly one outcome.

This module is the dispatcher (``_execute``, ``_run``), the limits' one resolution point
(:func:`sandbox.limits.resolve`), the introspection (``info()``), and the public faces.

:class:`Runtime` runs an :class:`AsyncRuntime` on an event loop in a thread of its own, so a
plain program gets the same behaviour through blocking calls. Zygotes are started by a fresh
``exec``, so the threads of the runtime (or of the program embedding it) never reach them.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgpack

from sandbox import __version__, protocol
from sandbox._logging import get_logger
from sandbox.admission import Admission, Ticket
from sandbox.asyncq import (
    AsyncPolicy,
    Dispatcher,
    InvocationState,
    NewInvocation,
    QueuedInvocation,
    SqlQueue,
    new_id,
)
from sandbox.errors import (
    ConfigurationError,
    InvalidRequest,
    ProtocolError,
    SandboxError,
    ShuttingDown,
)
from sandbox.execution import Execution, build_result
from sandbox.functions import FunctionInfo
from sandbox.handles import STREAM_BUFFER_CHUNKS
from sandbox.host import Host
from sandbox.limits import DEFAULT_LIMITS, Limits, resolve
from sandbox.observe import CALL_ORIGIN, InvocationRecord, Observer, Observers, rejection_reason
from sandbox.outcome import ErrorInfo, InvocationResult, Outcome, Stats
from sandbox.pool import Pool, default_max_idle, summarize_ms
from sandbox.registry import Registry

__all__ = ["AsyncInvocation", "AsyncRuntime", "Invocation", "InvocationStream", "Runtime",
           "StreamIterator"]

log = get_logger(__name__)

MSGPACK = "application/msgpack"
JSON = "application/json"
CONTENT_TYPES = (MSGPACK, JSON)
DEFAULT_PROFILE = "default"
#: Largest encoded event accepted.
MAX_EVENT_BYTES = 64 * 1024 * 1024


def _check_modules(name: str, modules: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modules, str):
        raise ConfigurationError(f"profile {name!r}: modules must be a list of names, not a "
                                 "string")
    out = []
    for module in modules:
        if not isinstance(module, str) or not all(
                part.isidentifier() for part in module.split(".")):
            raise ConfigurationError(f"profile {name!r}: {module!r} is not a module name")
        out.append(module)
    return tuple(out)


@dataclasses.dataclass(slots=True)
class _Call:
    """An admitted invocation, before it runs."""

    fn: FunctionInfo
    data: bytes
    content_type: str
    limits: Limits
    deadline: float | None
    id: str
    ticket: Ticket
    #: what observers see of the call (None when nobody observes and no origin was given)
    record: InvocationRecord | None = None
    #: the result, kept when the caller went away before it was delivered (for observers)
    result: InvocationResult | None = None
    #: observers were told how it ended
    reported: bool = False


class AsyncRuntime:
    """The sandbox runtime for asyncio programs.

    Args:
        profiles: preload profile name → modules its zygote imports. ``"default"`` (no
            modules) always exists.
        limits: defaults for every function (a function's own limits replace them field by
            field; a call's limits can only tighten).
        max_limits: the operator's maxima; nothing can exceed them.
        min_idle: warm workers always kept ready per profile (0: a profile without traffic
            scales to zero and forks on demand when calls come back).
        max_idle: the most warm workers a pool keeps (default 4 per core, at least 8). Between
            the two, the warm target follows demand: arrival rate x birth time x 2.
        idle_ttl_s: warm workers above the target are let go after waiting this long.
        max_concurrency: invocations running at once (default: 4 per CPU, at least 4).
        max_queue: invocations waiting for a slot before new ones get :class:`Overloaded`.
        cgroups: use cgroups for memory, processes, CPU accounting and tree kills; None
            (default) uses them when the machine offers them (required in strict isolation),
            False never, True requires them.
        isolation: ``"strict"`` (every layer of :mod:`sandbox.isolation` or a start-up
            error; the default as root), ``"best-effort"`` (what the kernel offers, and the
            report says what is missing; the default otherwise), ``"off"`` (processes and
            rlimits only), or an :class:`sandbox.isolation.IsolationConfig`.
        bundle_dir: where registered files, directories and zips are copied (content
            addressed) so workers can read them; default a private directory under
            ``/var/tmp`` removed at close.
        gc_freeze: call ``gc.freeze()`` in each zygote after preloading (default; turning it
            off only serves to measure what it saves).
        recycle_rss_growth_bytes: a reused worker whose RSS grew by more than this since its
            birth is replaced rather than kept.
        hide: directories no worker may see even if they are under an exposed one (the bundle
            directory always is; a server adds its state directory).
        state_dir: where asynchronous invocations persist (a SQLite queue, ``async.sqlite3``):
            it enables :meth:`invoke_async` and its companions. Hidden from workers.
        async_queue: the queue of asynchronous invocations itself (a server's: SQLite in its
            state directory, or PostgreSQL for a fleet), instead of ``state_dir``'s.
        async_concurrency: asynchronous attempts running at once (default: half of
            ``max_concurrency``, at least 1), so synchronous calls always keep slots.
        async_max_queued, async_max_queued_per_function: asynchronous invocations queued or
            running, overall and per function, before ``invoke_async`` raises
            :class:`Overloaded` (for ``state_dir``'s queue).
        async_lease_s: how long an attempt's lease lasts without renewal (renewed every third
            of it while the attempt runs); a supervisor that dies mid-attempt has it retried
            this long after.
        node: this runtime's name, recorded with each asynchronous attempt (default: the
            host's name).

    Use it as ``async with AsyncRuntime(...) as rt:`` or call :meth:`start` and
    :meth:`aclose`.
    """

    def __init__(
        self,
        profiles: Mapping[str, Sequence[str]] | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        max_limits: Limits | None = None,
        min_idle: int = 2,
        max_idle: int | None = None,
        idle_ttl_s: float = 60.0,
        max_concurrency: int | None = None,
        max_queue: int = 4096,
        cgroups: bool | None = None,
        isolation: Any = None,
        bundle_dir: str | os.PathLike[str] | None = None,
        gc_freeze: bool = True,
        recycle_rss_growth_bytes: int = 64 * 1024 * 1024,
        hide: Sequence[str | os.PathLike[str]] = (),
        state_dir: str | os.PathLike[str] | None = None,
        async_queue: SqlQueue | None = None,
        async_concurrency: int | None = None,
        async_max_queued: int = 100_000,
        async_max_queued_per_function: int = 10_000,
        async_lease_s: float = 30.0,
        node: str | None = None,
    ) -> None:
        if not isinstance(limits, Limits):
            raise ConfigurationError("limits must be a sandbox.Limits")
        if max_limits is not None and not isinstance(max_limits, Limits):
            raise ConfigurationError("max_limits must be a sandbox.Limits or None")
        if isinstance(min_idle, bool) or not isinstance(min_idle, int) or min_idle < 0:
            raise ConfigurationError(f"min_idle must be an int >= 0, got {min_idle!r}")
        if max_idle is not None and (isinstance(max_idle, bool) or not isinstance(max_idle, int)
                                     or max_idle < min_idle):
            raise ConfigurationError(f"max_idle must be an int >= min_idle ({min_idle}), got "
                                     f"{max_idle!r}")
        if isinstance(idle_ttl_s, bool) or not isinstance(idle_ttl_s, int | float) \
                or not idle_ttl_s > 0:
            raise ConfigurationError(f"idle_ttl_s must be a number > 0, got {idle_ttl_s!r}")
        if max_concurrency is None:
            max_concurrency = max(4, 4 * (os.cpu_count() or 1))
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) \
                or max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be an int >= 1, got "
                                     f"{max_concurrency!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigurationError(f"max_queue must be an int >= 0, got {max_queue!r}")
        self._profiles: dict[str, tuple[str, ...]] = {DEFAULT_PROFILE: ()}
        for name, modules in (profiles or {}).items():
            self._profiles[name] = _check_modules(name, modules)
        self.limits = limits
        self.max_limits = max_limits
        self.min_idle = min_idle
        self.max_idle = max(min_idle, max_idle if max_idle is not None else default_max_idle())
        self.idle_ttl_s = float(idle_ttl_s)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        #: the machine-level setup: bundle dir, cgroups, isolation configuration
        if async_queue is None and state_dir is not None:
            from sandbox.asyncq_sqlite import SqliteQueue

            async_queue = SqliteQueue(state_dir, max_queued=async_max_queued,
                                      max_queued_per_function=async_max_queued_per_function)
            hide = [*hide, str(async_queue.root)]
        if async_concurrency is None:
            async_concurrency = max(1, max_concurrency // 2)
        if isinstance(async_concurrency, bool) or not isinstance(async_concurrency, int) \
                or not 1 <= async_concurrency <= max_concurrency:
            raise ConfigurationError(f"async_concurrency must be an int in [1, max_concurrency "
                                     f"({max_concurrency})], got {async_concurrency!r}")
        if isinstance(async_lease_s, bool) or not isinstance(async_lease_s, int | float) \
                or not async_lease_s > 0:
            raise ConfigurationError(f"async_lease_s must be a number > 0, got {async_lease_s!r}")
        #: the durable queue of asynchronous invocations (None: invoke_async is unavailable)
        self._async_queue = async_queue
        self.async_concurrency = async_concurrency
        self.async_lease_s = float(async_lease_s)
        self._dispatcher: Dispatcher | None = None
        #: each function version's async policy, when it was given one
        self._async_policies: dict[tuple[str, int], AsyncPolicy] = {}
        self.node = node or socket.gethostname()
        self._host = Host(isolation=isolation, cgroups=cgroups, bundle_dir=bundle_dir,
                          hide=hide)
        self._isolation_report: dict[str, Any] | None = None
        self._slots_alloc: Any = None
        self.gc_freeze = bool(gc_freeze)
        self.recycle_rss_growth_bytes = recycle_rss_growth_bytes
        # Every process of this runtime carries SANDBOX_INSTANCE=<instance> in its environment,
        # so an operator (or a test) can find them; SANDBOX_INSTANCE_TAG prefixes it.
        tag = os.environ.get("SANDBOX_INSTANCE_TAG", "")
        self.instance = f"{tag + '/' if tag else ''}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Invocation ids: 32 hex digits, unique per runtime by a counter (a uuid4 per call
        # would cost a getrandom system call), and across runtimes by a random base.
        self._id_base = uuid.uuid4().hex[:20]
        self._id_counter = itertools.count(1)
        self._registry = Registry(self._profiles, lambda: self._host.bundle_dir)
        #: where recent OK calls spent their time, phase by phase (see call_stats)
        self._call_records: collections.deque[tuple[float, ...]] = collections.deque(
            maxlen=1024)
        self._pools: dict[str, Pool] = {}
        self._admission = Admission(max_concurrency, max_queue)
        #: who is told what happens (metrics, access log, traces): see sandbox.observe
        self._observers = Observers()
        self._started = False
        self._closing = False
        self._closed = False
        self.started_at: float | None = None

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the zygotes of every profile and fill the warm pools.

        Raises:
            ProfileError: a profile's module failed to import (named in the message).
            IsolationUnavailable: ``cgroups=True`` but the machine has none usable.
        """
        if self._started:
            return
        self._started = True
        try:
            self._host.setup()
            from sandbox.pool import SlotAllocator

            cfg = self._host.isolation
            self._slots_alloc = SlotAllocator(cfg.id_count if cfg is not None else 65536)
            await asyncio.gather(*(self._start_pool(name) for name in self._profiles))
            queue = self._async_queue
            if queue is not None:
                await asyncio.to_thread(queue.open)
                self._dispatcher = Dispatcher(self, queue, concurrency=self.async_concurrency,
                                              owner=self.instance, node=self.node,
                                              lease_s=self.async_lease_s)
                await self._dispatcher.start()
        except BaseException:
            await self.aclose(grace_s=0)
            raise
        first = next(iter(self._pools.values()), None)
        if first is not None and first.zygote is not None:
            self._isolation_report = first.zygote.isolation_report
        self.started_at = time.time()
        log.info("runtime %s started: profiles %s, isolation %s", self.instance,
                 list(self._profiles), self.isolation_summary(),
                 extra={"event": "start", "fields": {
                     "instance": self.instance, "profiles": list(self._profiles),
                     "isolation": self.isolation_summary()}})

    def isolation_summary(self) -> str:
        report = self._isolation_report
        if report is None:
            return "off"
        on = [name for name, layer in report["layers"].items() if layer["enabled"]]
        off = [name for name, layer in report["layers"].items()
               if not layer["enabled"] and name != "user_ns"]
        return f"{report['mode']}: on {on}" + (f", off {off}" if off else "")

    async def _start_pool(self, name: str) -> None:
        host = self._host
        pool = Pool(name, self._profiles[name], instance=self.instance, min_idle=self.min_idle,
                    cgroups=host.cgroups, birth_config=host.birth_config(), slots=self._slots_alloc,
                    isolation=host.pool_isolation(), netns_fd=host.netns_fd,
                    gc_freeze=self.gc_freeze,
                    default_limits=resolve(None, None, self.limits, self.max_limits),
                    max_idle=self.max_idle, idle_ttl_s=self.idle_ttl_s,
                    observer=self._observers)
        self._pools[name] = pool
        await pool.start()

    async def add_profile(self, name: str, modules: Sequence[str]) -> None:
        """Start a zygote for a new preload profile (no-op if it exists with these modules).

        Raises:
            ConfigurationError: the name exists with other modules.
            ProfileError: a module failed to import.
        """
        mods = _check_modules(name, modules)
        if name in self._profiles:
            if self._profiles[name] != mods:
                raise ConfigurationError(f"profile {name!r} exists with modules "
                                         f"{list(self._profiles[name])}")
            if name in self._pools or not self._started:
                return
        self._profiles[name] = mods
        if self._started:
            try:
                await self._start_pool(name)
            except BaseException:
                pool = self._pools.pop(name, None)
                del self._profiles[name]
                if pool is not None:
                    await pool.close()
                raise

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, give running ones ``grace_s`` to finish, cancel the rest, then
        kill every worker and zygote. Idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._dispatcher is not None:
            # Running asynchronous attempts get the grace period too; those cut short go back
            # to the queue without counting against their budget.
            await self._dispatcher.stop(grace_s)
        finished = [t.finished for t in self._admission.inflight]
        if finished and grace_s > 0:
            await asyncio.wait(finished, timeout=grace_s)
        # Whatever is still queued, starting or running ends CANCELLED (an invoke() awaiting
        # in its caller's task included).
        for ticket in list(self._admission.inflight):
            ticket.cancel()
        finished = [t.finished for t in self._admission.inflight]
        if finished:
            await asyncio.wait(finished, timeout=30)
        await asyncio.gather(*(pool.close() for pool in self._pools.values()),
                             return_exceptions=True)
        if self._async_queue is not None:
            await asyncio.to_thread(self._async_queue.shutdown)
        self._host.close()
        self._closed = True

    async def __aenter__(self) -> AsyncRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closing

    # observers ----------------------------------------------------------------------------------
    def add_observer(self, observer: Observer) -> None:
        """Tell ``observer`` (a :class:`sandbox.observe.Observer`) about every invocation,
        birth, zygote start and refused call from now on (on the runtime's event loop)."""
        self._observers.add(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def gauges(self) -> dict[str, Any]:
        """Calls queued and running, and each pool's workers by state (``idle``, ``busy``,
        ``starting``). Reads counters only, so any thread may call it (a metrics scrape)."""
        gauges: dict[str, Any] = {
            "queued": self._admission.queued,
            "running": self._admission.running,
            "pools": {name: pool.counts() for name, pool in list(self._pools.items())},
        }
        if self._dispatcher is not None:
            gauges["async"] = self._dispatcher.gauges()
        return gauges

    # functions ----------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        source: str | bytes | None = None,
        path: str | os.PathLike[str] | None = None,
        ref: str | None = None,
        handler: str | None = None,
        profile: str = DEFAULT_PROFILE,
        limits: Limits | None = None,
        reuse: int = 1,
        version: int | None = None,
        digest: str | None = None,
        async_policy: AsyncPolicy | Mapping[str, Any] | None = None,
    ) -> FunctionInfo:
        """Register a function; registering a name again makes a new version.

        Exactly one of ``source`` (Python source text; ``handler`` names the function, default
        ``"handler"``), ``path`` (a ``.py`` file, a directory or a zip of modules; for the
        latter two ``handler`` is ``"module:function"``) or ``ref`` (an importable
        ``"module:function"``).

        Args:
            profile: the preload profile whose zygote forks this function's workers.
            limits: the function's default limits.
            reuse: invocations one worker may serve before it is replaced (1: a fresh process
                for every invocation). A reused worker is recycled on any failure.
            version: register under this version number (used when reloading a store).
            async_policy: how :meth:`invoke_async` retries and keeps this version's
                invocations (an :class:`~sandbox.asyncq.AsyncPolicy` or its fields as a dict;
                default ``AsyncPolicy()``).

        Raises:
            ConfigurationError: bad name, handler, path, profile or limits.
            InvalidRequest: a bad async policy.
        """
        policy = _policy(async_policy)
        info = self._registry.register(name, source=source, path=path, ref=ref,
                                       handler=handler, profile=profile, limits=limits,
                                       reuse=reuse, version=version, digest=digest)
        if policy is not None:
            self._async_policies[(info.name, info.version)] = policy
        return info

    def unregister(self, name: str, version: int | None = None) -> None:
        """Forget a function (every version, or one); workers kept for it are let go.

        Raises:
            FunctionNotFound: no such function or version.
        """
        for fn in self._registry.unregister(name, version):
            self._async_policies.pop((fn.name, fn.version), None)
            pool = self._pools.get(fn.profile)
            if pool is not None:
                pool.forget(fn.key)

    def function(self, name: str, version: int | None = None) -> FunctionInfo:
        """The latest (or the given) version of a function.

        Raises:
            FunctionNotFound: no such function or version.
        """
        return self._registry.function(name, version)

    def functions(self) -> list[FunctionInfo]:
        """Every registered version of every function, by name then version."""
        return self._registry.functions()

    @property
    def profiles(self) -> dict[str, list[str]]:
        return {name: list(mods) for name, mods in self._profiles.items()}

    # invocation ---------------------------------------------------------------------------------
    def _prepare(self, name: str, event: Any, version: int | None, limits: Limits | None,
                 payload: bytes | None, content_type: str
                 ) -> tuple[FunctionInfo, bytes, Limits]:
        if self._closing or not self._started:
            raise ShuttingDown("the runtime is closed" if self._closing
                               else "the runtime is not started")
        if content_type not in CONTENT_TYPES:
            raise InvalidRequest(f"content_type must be one of {list(CONTENT_TYPES)}, got "
                                 f"{content_type!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise InvalidRequest("limits must be a sandbox.Limits")
        fn = self.function(name, version)
        if payload is not None:
            if event is not None:
                raise InvalidRequest("give event= or payload=, not both")
            if not isinstance(payload, bytes | bytearray | memoryview):
                raise InvalidRequest("payload must be bytes")
            data = bytes(payload)
            _validate_payload(data, content_type)
        else:
            try:
                if content_type == JSON:
                    data = json.dumps(event, allow_nan=False).encode()
                else:
                    data = msgpack.packb(event, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidRequest(f"the event cannot be encoded as "
                                     f"{'JSON' if content_type == JSON else 'msgpack'}: "
                                     f"{exc}") from None
        if len(data) > MAX_EVENT_BYTES:
            raise InvalidRequest(f"the event is {len(data)} bytes; the maximum is "
                                 f"{MAX_EVENT_BYTES}")
        effective = resolve(limits, fn.limits, self.limits, self.max_limits)
        return fn, data, effective

    def _begin(self, name: str, event: Any, version: int | None, limits: Limits | None,
               payload: bytes | None, content_type: str, deadline: float | None,
               invocation_id: str | None) -> _Call:
        """Validate a call and admit it (or raise); nothing runs yet."""
        try:
            fn, data, effective = self._prepare(name, event, version, limits, payload,
                                                content_type)
            ticket = self._admission.admit()
        except SandboxError as exc:
            if self._observers:
                self._observers.rejected(rejection_reason(exc), name)
            raise
        call = _Call(fn, data, content_type, effective, deadline,
                     invocation_id or f"{self._id_base}{next(self._id_counter):012x}", ticket)
        origin = CALL_ORIGIN.get()
        if self._observers or origin is not None:
            call.record = InvocationRecord(call.id, fn.name, fn.version, fn.profile,
                                           effective.memory_bytes, time.time_ns(), origin)
            self._observers.invocation_started(call.record)
        return call

    def _spawn_task(self, call: _Call, chunk_sink: Any = None) -> asyncio.Task[InvocationResult]:
        task = asyncio.ensure_future(self._execute(call, chunk_sink))
        call.ticket.task = task
        # A task cancelled before it ever ran never enters _execute: admission forgets it here
        # (and observers hear that it ended CANCELLED).
        task.add_done_callback(lambda _: self._never_ran(call))
        return task

    def _never_ran(self, call: _Call) -> None:
        self._admission.over(call.ticket)
        if call.record is not None and not call.reported:
            self._report(call, _cancelled(call.id, 0.0))

    def _report(self, call: _Call, result: InvocationResult) -> None:
        assert call.record is not None
        call.reported = True
        self._observers.invocation_finished(call.record, result)

    @staticmethod
    def _swallow_our_cancel() -> None:
        """We cancelled the current task to stop a wait (the call was cancelled): the call
        answers CANCELLED normally, and the task must not stay marked as being cancelled
        (when it is the caller's own task, for invoke())."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()

    async def _execute(self, call: _Call, chunk_sink: Any = None) -> InvocationResult:
        """Run an admitted call; observers hear how it ended, exactly once."""
        if call.record is None:
            return await self._dispatch(call, chunk_sink)
        t0 = time.monotonic()
        try:
            result = await self._dispatch(call, chunk_sink)
        except asyncio.CancelledError:
            # The caller went away: the call ended CANCELLED (its result, if it had one).
            if not call.reported:
                self._report(call, call.result or _cancelled(call.id, time.monotonic() - t0))
            raise
        except BaseException as exc:
            if not call.reported:
                call.reported = True
                self._observers.invocation_failed(call.record, exc)
            raise
        self._report(call, result)
        return result

    async def _dispatch(self, call: _Call, chunk_sink: Any = None) -> InvocationResult:
        ticket, invocation_id = call.ticket, call.id
        t0 = time.monotonic()
        ticket.entered = True
        if ticket.task is None:
            ticket.task = asyncio.current_task()  # invoke(): the caller's task
        try:
            if ticket.cancelled:
                return _cancelled(invocation_id, 0.0)
            try:
                await self._admission.acquire_slot()
            except asyncio.CancelledError:
                if ticket.cancelled:
                    self._swallow_our_cancel()
                    return _cancelled(invocation_id, time.monotonic() - t0)
                raise
            try:
                return await self._run(call, chunk_sink, t0)
            finally:
                self._admission.release_slot()
        finally:
            self._admission.over(ticket)

    async def _run(self, call: _Call, chunk_sink: Any, t0: float) -> InvocationResult:
        fn, limits, ticket, invocation_id = call.fn, call.limits, call.ticket, call.id
        content_type, deadline = call.content_type, call.deadline
        t1 = time.monotonic()
        t1_ns = time.monotonic_ns()
        pool = self._pools.get(fn.profile)
        if pool is None:
            raise ConfigurationError(f"profile {fn.profile!r} is not running")
        try:
            worker, cold, on_demand = await pool.acquire(fn, limits)
        except asyncio.CancelledError:
            if ticket.cancelled:
                self._swallow_our_cancel()
                return _cancelled(invocation_id, t1 - t0)
            raise
        startup_s = time.monotonic() - t1
        acquired_ns = time.monotonic_ns()
        timeout = limits.wall_timeout_s
        if deadline is not None:
            left = max(0.001, deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        last = worker.served + 1 >= fn.reuse
        execution = Execution(worker, fn, invocation_id, call.data, content_type, limits, timeout,
                              last, chunk_sink)
        if call.record is not None:
            execution.trace_id = call.record.trace_id
        ticket.execution = execution
        ticket.started.set()
        if ticket.cancelled:
            execution.cancel()
        caller_cancelled = False
        try:
            await execution.run()
        except asyncio.CancelledError:
            # The caller went away: kill the worker now, settle cleanly, then re-raise.
            caller_cancelled = True
            if ticket.cancelled:
                self._swallow_our_cancel()  # a cancel of ours that raced the start
            execution.cancel()
            settle = asyncio.ensure_future(execution.settle())
            while not settle.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(settle)
        decode = _decoder(content_type, limits)
        result = build_result(execution, queue_s=t1 - t0, startup_s=startup_s, cold=cold,
                              on_demand=on_demand, decode=decode)
        terminal = execution.terminal
        if result.outcome is Outcome.OK and terminal is not None and terminal.marks:
            recv, loaded, ran, encoded = terminal.marks
            self._call_records.append((
                t1 - t0, (acquired_ns - t1_ns) / 1e9, (execution.sent_ns - acquired_ns) / 1e9,
                (recv - execution.sent_ns) / 1e9, (loaded - recv) / 1e9, (ran - loaded) / 1e9,
                (encoded - ran) / 1e9, (execution.received_ns - encoded) / 1e9,
                (time.monotonic_ns() - execution.received_ns) / 1e9))
        keep = (fn if result.outcome is Outcome.OK and not execution.killed and not last
                and not self._grew(execution) else None)
        loop = asyncio.get_running_loop()
        if keep is not None:
            pool.release(worker, keep_for=keep, limits=limits)  # at once: the next call
        else:
            # Teardown (kill, close, reap, cgroup clean-up) once the caller has its result:
            # two hops, so the callbacks that deliver it (queued when this task ends) go first.
            def teardown() -> None:
                pool.release(worker)

            loop.call_soon(loop.call_soon, teardown)
        # Refill after that too, for the same reason.
        loop.call_soon(loop.call_soon, pool.refill)
        if caller_cancelled and not ticket.cancelled:
            call.result = result
            raise asyncio.CancelledError
        return result

    def _grew(self, execution: Execution) -> bool:
        """Whether a reusable worker's memory grew too much to keep it (a leak would
        otherwise accumulate across invocations)."""
        worker = execution.worker
        terminal = execution.terminal
        if terminal is None or not worker.ready.done() or worker.ready.exception() is not None:
            return True
        born = worker.ready.result().rss_bytes
        return terminal.rss_bytes - born > self.recycle_rss_growth_bytes

    async def invoke(
        self,
        name: str,
        event: Any = None,
        *,
        version: int | None = None,
        limits: Limits | None = None,
        id: str | None = None,
        payload: bytes | None = None,
        content_type: str = MSGPACK,
        deadline: float | None = None,
    ) -> InvocationResult:
        """Run a function once, in a fresh (or reused, if the function allows) worker.

        Args:
            event: the first argument of the handler (msgpack- or JSON-encodable data).
            limits: per-call limits; they can only tighten the function's.
            id: an invocation id of the caller's (default: a random one).
            payload: the event already encoded in ``content_type`` (instead of ``event``).
            content_type: ``application/msgpack`` (default) or ``application/json``; the
                result's ``result_bytes`` come back in the same type.
            deadline: ``time.monotonic()`` value after which the caller stops caring; caps the
                wall-clock timeout.

        Returns:
            The one :class:`InvocationResult`; function failures are outcomes, not exceptions.

        Raises:
            FunctionNotFound, InvalidRequest, Overloaded, ShuttingDown: problems of the call.
            asyncio.CancelledError: the awaiting task was cancelled (its worker is killed).
        """
        call = self._begin(name, event, version, limits, payload, content_type, deadline, id)
        return await self._execute(call)

    def submit(
        self,
        name: str,
        event: Any = None,
        *,
        version: int | None = None,
        limits: Limits | None = None,
        id: str | None = None,
        payload: bytes | None = None,
        content_type: str = MSGPACK,
        deadline: float | None = None,
    ) -> AsyncInvocation:
        """Start an invocation and return a handle to await or :meth:`~AsyncInvocation.cancel`.

        Raises at once (not when awaited) for problems of the call, like :meth:`invoke`.
        """
        call = self._begin(name, event, version, limits, payload, content_type, deadline, id)
        task = self._spawn_task(call)
        return AsyncInvocation(call.id, call.ticket, task)

    def stream(
        self,
        name: str,
        event: Any = None,
        *,
        version: int | None = None,
        limits: Limits | None = None,
        id: str | None = None,
        payload: bytes | None = None,
        content_type: str = MSGPACK,
        deadline: float | None = None,
        raw: bool = False,
    ) -> InvocationStream:
        """Start an invocation of a generator function and iterate its chunks as they come.

        ``async for value in rt.stream(...)`` yields each decoded value (the encoded bytes with
        ``raw=True``); afterwards ``await stream.result()`` gives the final result. A slow
        consumer slows the function down (the channel is not read while
        ``STREAM_BUFFER_CHUNKS`` chunks wait), so nothing is buffered without bound.
        """
        call = self._begin(name, event, version, limits, payload, content_type, deadline, id)
        stream = InvocationStream(call.id, call.ticket, _decoder(content_type, call.limits), raw)
        task = self._spawn_task(call, stream._on_chunk)
        stream._task = task
        task.add_done_callback(lambda _: stream._wake())
        return stream

    async def map(self, name: str, events: Iterable[Any], *, limits: Limits | None = None
                  ) -> list[InvocationResult]:
        """Invoke ``name`` once per event, concurrently; results in the order of the events.

        Events are pulled lazily: at most ``max_concurrency`` calls of the map are in flight
        at once, so a long (or endless) iterable neither floods admission nor holds a task per
        event.
        """
        results: list[InvocationResult] = []
        window: collections.deque[AsyncInvocation] = collections.deque()
        try:
            for event in events:
                if len(window) >= self.max_concurrency:
                    results.append(await window.popleft())
                window.append(self.submit(name, event, limits=limits))
            while window:
                results.append(await window.popleft())
        except BaseException:
            for handle in window:
                handle.cancel()
            raise
        return results

    async def wait_warm(self, timeout: float | None = 60.0) -> None:
        """Wait until every pool has ``min_idle`` ready workers (e.g. before measuring).

        Raises:
            TimeoutError: not warm within ``timeout`` seconds.
        """
        await asyncio.wait_for(
            asyncio.gather(*(pool.wait_warm() for pool in self._pools.values())), timeout)

    async def wait_idle(self, *, at_least: int = 0, at_most: int | None = None,
                        profile: str = DEFAULT_PROFILE, timeout: float | None = 60.0) -> None:
        """Wait until ``profile``'s pool holds between ``at_least`` and ``at_most`` idle
        workers (e.g. to see it scale up with demand, or shed to zero in silence).

        Raises:
            ConfigurationError: no such profile. TimeoutError: not within ``timeout``.
        """
        pool = self._pools.get(profile)
        if pool is None:
            raise ConfigurationError(f"profile {profile!r} is not running")
        await asyncio.wait_for(pool.wait_idle(
            lambda n: n >= at_least and (at_most is None or n <= at_most)), timeout)

    # asynchronous invocations -------------------------------------------------------------------
    def set_node(self, node: str) -> None:
        """Name this runtime (a server's ``--node-name``): recorded with each asynchronous
        attempt and its result's ``stats.node``."""
        self.node = node
        if self._dispatcher is not None:
            self._dispatcher.node = node

    def _queue(self) -> tuple[SqlQueue, Dispatcher]:
        if self._closing or not self._started:
            raise ShuttingDown("the runtime is closed" if self._closing
                               else "the runtime is not started")
        if self._async_queue is None or self._dispatcher is None:
            raise ConfigurationError("asynchronous invocations need a queue: give the runtime "
                                     "state_dir= (or a server its state directory)")
        return self._async_queue, self._dispatcher

    def async_policy(self, name: str, version: int | None = None) -> AsyncPolicy:
        """The async policy of a function version (the default one when it was given none).

        Raises:
            FunctionNotFound: no such function or version.
        """
        fn = self.function(name, version)
        return self._async_policies.get((fn.name, fn.version), AsyncPolicy())

    async def invoke_async(
        self,
        name: str,
        event: Any = None,
        *,
        version: int | None = None,
        limits: Limits | None = None,
        payload: bytes | None = None,
        content_type: str = MSGPACK,
        idempotency_key: str | None = None,
        policy: AsyncPolicy | Mapping[str, Any] | None = None,
    ) -> QueuedInvocation:
        """Queue an invocation durably and return at once (its ``id``, state QUEUED).

        Everything that can be checked now is checked now (the function and version exist,
        the event encodes, the payload decodes, the limits are valid), so an accepted
        invocation never fails for a reason its caller could have been told. It then runs at
        least once: see :mod:`sandbox.asyncq` (retries, dead letters, results by id).

        Args:
            version: pinned now (the latest when None).
            idempotency_key: the same key (for the same function) while the first invocation
                is kept returns that invocation (``duplicate=True``) instead of queueing again.
            policy: overrides of the function's async policy for this invocation (a dict of
                fields, or a whole :class:`~sandbox.asyncq.AsyncPolicy`).

        Raises:
            FunctionNotFound, InvalidRequest: problems of the call.
            Overloaded: the queue is full (overall, or of this function).
            ConfigurationError: this runtime has no queue (no ``state_dir``).
        """
        queue, dispatcher = self._queue()
        try:
            fn, data, _ = self._prepare(name, event, version, limits, payload, content_type)
            if idempotency_key is not None and (
                    not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= 256
                    or not idempotency_key.isprintable()):
                raise InvalidRequest("idempotency_key must be 1 to 256 printable characters")
            base = self._async_policies.get((fn.name, fn.version), AsyncPolicy())
            if isinstance(policy, AsyncPolicy):
                base = policy
            elif policy is not None:
                base = base.replace(**dict(policy))
            item = NewInvocation(id=new_id(), function=fn.name, version=fn.version,
                                 payload=data, content_type=content_type, limits=limits,
                                 policy=base, idempotency_key=idempotency_key or None)
            queued, events = await queue.run(queue.submit, item, time.time())
        except SandboxError as exc:
            if self._observers:
                self._observers.rejected(rejection_reason(exc), name)
            raise
        dispatcher.record(events)
        if events:
            dispatcher.wake()
        result: QueuedInvocation = queued
        return result

    async def invocation(self, invocation_id: str) -> QueuedInvocation:
        """An asynchronous invocation: state, attempts, result.

        Raises:
            InvocationNotFound: no such id (or purged after its retention).
        """
        queue, _ = self._queue()
        found: QueuedInvocation = await queue.run(queue.get, invocation_id)
        return found

    async def invocations(self, function: str | None = None,
                          state: InvocationState | str | None = None, *, page_size: int = 100,
                          page_token: str = "") -> tuple[list[QueuedInvocation], str]:
        """Asynchronous invocations in submission order, optionally of one function and in
        one state: a page, and the token of the next page (empty after the last)."""
        queue, _ = self._queue()
        try:
            st = InvocationState(state) if state else None
        except ValueError:
            raise InvalidRequest(f"unknown state {state!r}; one of "
                                 f"{[s.value for s in InvocationState]}") from None
        page: tuple[list[QueuedInvocation], str] = await queue.run(
            queue.page, function or None, st, page_size, page_token)
        return page

    async def cancel_invocation(self, invocation_id: str) -> QueuedInvocation:
        """Cancel a QUEUED or RUNNING asynchronous invocation (a running attempt's worker is
        killed): it ends CANCELLED. A terminal one is returned as it is.

        Raises:
            InvocationNotFound.
        """
        queue, dispatcher = self._queue()
        found, events = await queue.run(queue.cancel, invocation_id, time.time())
        dispatcher.record(events)
        dispatcher.cancelled(invocation_id)
        result: QueuedInvocation = found
        return result

    async def redrive_invocation(self, invocation_id: str) -> QueuedInvocation:
        """Put a DEAD_LETTERED invocation back in the queue with a fresh attempt budget (its
        earlier attempts stay in its history).

        Raises:
            InvocationNotFound; InvalidRequest when it is not DEAD_LETTERED.
        """
        queue, dispatcher = self._queue()
        found, events = await queue.run(queue.redrive, invocation_id, time.time())
        dispatcher.record(events)
        dispatcher.wake()
        result: QueuedInvocation = found
        return result

    async def wait_invocation(self, invocation_id: str, timeout: float | None = None
                              ) -> QueuedInvocation:
        """Wait until an asynchronous invocation is terminal; returns it.

        Raises:
            InvocationNotFound; TimeoutError after ``timeout`` seconds.
        """
        _, dispatcher = self._queue()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = await self.invocation(invocation_id)
            if found.done:
                return found
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"invocation {invocation_id} is still {found.state.value}")
            await dispatcher.wait_local(invocation_id, left)

    # introspection ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Version, profiles, pool sizes, queue, and the isolation in force."""
        pools = {}
        for name, pool in self._pools.items():
            sizes = pool.sizes()
            zyg = pool.zygote
            pools[name] = {**sizes, "zygote_pid": zyg.pid if zyg is not None else None,
                           "zygote_pids": list(zyg.pids) if zyg is not None else [],
                           "zygote_rss_bytes": zyg.rss_bytes if zyg is not None else None,
                           "zygote_starts": pool.zygote_starts,
                           "births": pool.birth_stats()}
        return {
            "version": __version__,
            "profiles": self.profiles,
            "pools": pools,
            "running": self._admission.running,
            "queued": self._admission.queued,
            "calls": self.call_stats(),
            "max_concurrency": self.max_concurrency,
            "max_queue": self.max_queue,
            "min_idle": self.min_idle,
            "max_idle": self.max_idle,
            "idle_ttl_s": self.idle_ttl_s,
            "limits": self.limits.to_dict(),
            "max_limits": None if self.max_limits is None else self.max_limits.to_dict(),
            "isolation": self.isolation_report(),
        }

    #: The phases of a call, in order (:meth:`call_stats`).
    CALL_PHASES = ("queue", "acquire", "dispatch", "to_worker", "load", "run", "encode",
                   "to_supervisor", "classify")

    def call_stats(self) -> dict[str, Any]:
        """Where recent OK calls (up to 1024) spent their time, per phase in order, p50/p90/
        p99 in milliseconds: ``queue`` (admission), ``acquire`` (a ready worker: 0 when one
        was idle, else a birth), ``dispatch`` (the invoke encoded and sent), ``to_worker``
        (until the worker had read it), ``load`` (handler loaded, event decoded), ``run`` (the
        function), ``encode`` (its result), ``to_supervisor`` (the terminal frame back to
        us), ``classify`` (outcome, stats, result built). Worker and supervisor share one
        monotonic clock."""
        records = list(self._call_records)
        return {
            "sampled": len(records),
            "total_ms": summarize_ms([sum(r) for r in records]),
            "phases_ms": {name: summarize_ms([r[i] for r in records])
                          for i, name in enumerate(self.CALL_PHASES)},
        }

    def isolation_report(self) -> dict[str, Any]:
        """Which isolation layers are in force: each with ``available``, ``enabled`` and a
        ``reason``; cgroups included."""
        report = self._isolation_report
        layers: dict[str, Any] = {}
        if report is not None:
            layers.update(report["layers"])
        cg = self._host.cgroup_report
        for controller in ("memory", "pids", "cpu"):
            available = bool(cg.get("available")) and bool(cg.get(controller, False))
            layers[f"cgroup_{controller}"] = {
                "available": available, "enabled": available and bool(cg.get("enabled")),
                "reason": cg.get("reason", "") if not available else
                f"cgroup v{cg.get('version')} under {cg.get('paths', {}).get(controller, '?')}"
                + (f" (delegated to uid {os.geteuid()})" if cg.get("delegated") else "")}
        view = report.get("view") if report is not None else None
        return {
            "mode": report["mode"] if report is not None else "off",
            "view": view or {"minimal": False, "read_only": False, "paths": ["/"],
                             "devices": [], "hidden": [], "private": []},
            "root": os.geteuid() == 0,
            "kernel": os.uname().release,
            "landlock_abi": report.get("landlock_abi") if report is not None else None,
            "layers": layers,
        }


def _policy(value: AsyncPolicy | Mapping[str, Any] | None) -> AsyncPolicy | None:
    if value is None or isinstance(value, AsyncPolicy):
        return value
    if isinstance(value, Mapping):
        return AsyncPolicy.from_dict(value)
    raise InvalidRequest("async_policy must be a sandbox.AsyncPolicy or a dict of its fields")


def _validate_payload(data: bytes, content_type: str) -> None:
    """A payload must decode, so a malformed one fails the call, not the worker."""
    if not data:
        return
    try:
        if content_type == JSON:
            json.loads(data)
        else:
            protocol.strict_unpackb(data, max_bytes=len(data))
    except (ValueError, RecursionError, ProtocolError) as exc:
        kind = "JSON" if content_type == JSON else "msgpack"
        raise InvalidRequest(f"the payload is not valid {kind}: {exc}") from None


def _decoder(content_type: str, limits: Limits) -> Any:
    cap = limits.max_result_bytes or MAX_EVENT_BYTES

    def decode(data: bytes) -> Any:
        if not data:
            return None
        if content_type == JSON:
            try:
                return json.loads(data)
            except (ValueError, RecursionError) as exc:
                raise ProtocolError(f"invalid JSON: {exc}") from None
        return protocol.strict_unpackb(data, max_bytes=max(cap, len(data)))

    return decode


def _cancelled(invocation_id: str, queue_s: float) -> InvocationResult:
    return InvocationResult(id=invocation_id, outcome=Outcome.CANCELLED,
                            error=ErrorInfo("Cancelled", "the caller cancelled the invocation "
                                            "before it started"),
                            stats=Stats(queue_s=queue_s, worker_invocations=0))


class AsyncInvocation:
    """A running invocation: ``await`` it for the result, or :meth:`cancel` it."""

    def __init__(self, invocation_id: str, ticket: Ticket,
                 task: asyncio.Task[InvocationResult]) -> None:
        self.id = invocation_id
        self._ticket = ticket
        self._task = task

    def cancel(self) -> None:
        """Kill the invocation's worker (or drop it from the queue): the result is CANCELLED."""
        self._ticket.cancel()

    def done(self) -> bool:
        return self._task.done()

    @property
    def task(self) -> asyncio.Task[InvocationResult]:
        """The task that runs the invocation (to add done callbacks; cancel with
        :meth:`cancel`)."""
        return self._task

    async def running(self) -> None:
        """Wait until the invocation has left the queue and is on a worker (or has ended)."""
        await self._ticket.started.wait()

    @property
    def worker_pid(self) -> int | None:
        """The pid of the worker running it, once it runs."""
        execution = self._ticket.execution
        return None if execution is None else execution.worker.pid

    def __await__(self) -> Any:
        return self._task.__await__()


class InvocationStream:
    """The chunks of a generator function, as they arrive; then the final result."""

    def __init__(self, invocation_id: str, ticket: Ticket, decode: Any, raw: bool) -> None:
        self.id = invocation_id
        self._ticket = ticket
        self._decode = decode
        self._raw = raw
        self._chunks: list[bytes] = []
        self._head = 0
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[InvocationResult] | None = None
        self._paused = False

    def _on_chunk(self, data: bytes) -> None:
        self._chunks.append(data)
        if len(self._chunks) - self._head >= STREAM_BUFFER_CHUNKS:
            execution = self._ticket.execution
            if execution is not None:
                execution.worker.pause_reading()
                self._paused = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        assert self._task is not None
        while self._head >= len(self._chunks):
            if self._task.done():
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._chunks[self._head]
        self._chunks[self._head] = b""
        self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._chunks):
            del self._chunks[: self._head]
            self._head = 0
        if self._paused and len(self._chunks) - self._head < STREAM_BUFFER_CHUNKS // 2:
            self._paused = False
            execution = self._ticket.execution
            if execution is not None:
                execution.worker.resume_reading()
        if self._raw:
            return data
        try:
            return self._decode(data)
        except ProtocolError:
            self.cancel()
            raise

    async def result(self) -> InvocationResult:
        """The final result (waits for the end of the stream; unread chunks are dropped)."""
        assert self._task is not None
        if self._paused:
            self._paused = False
            execution = self._ticket.execution
            if execution is not None:
                execution.worker.resume_reading()
        self._head = len(self._chunks)
        return await self._task

    def cancel(self) -> None:
        """Stop the function now; the result will be CANCELLED."""
        self._ticket.cancel()


# -- sync wrapper --------------------------------------------------------------------------------

class Invocation:
    """A running invocation of a sync :class:`Runtime`."""

    def __init__(self, runtime: Runtime, handle: AsyncInvocation,
                 future: concurrent.futures.Future[InvocationResult]) -> None:
        self.id = handle.id
        self._runtime = runtime
        self._handle = handle
        self._future = future

    def cancel(self) -> None:
        """Kill the invocation's worker; :meth:`result` then returns a CANCELLED result."""
        self._runtime._loop.call_soon_threadsafe(self._handle.cancel)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> InvocationResult:
        """Wait for the result (``TimeoutError`` after ``timeout`` seconds, if given)."""
        return self._future.result(timeout)


class StreamIterator(Iterator[Any]):
    """The chunks of a generator function for a sync :class:`Runtime`."""

    def __init__(self, runtime: Runtime, stream: InvocationStream) -> None:
        self._runtime = runtime
        self._stream = stream
        self.id = stream.id

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> Any:
        try:
            return self._runtime._call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def result(self) -> InvocationResult:
        result: InvocationResult = self._runtime._call(self._stream.result())
        return result

    def cancel(self) -> None:
        self._runtime._loop.call_soon_threadsafe(self._stream.cancel)


#: Sync runtimes not closed yet: closed at interpreter exit, so a program that forgets to
#: close one still leaves no process and no cgroup behind.
_open_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _close_open_runtimes() -> None:
    for runtime in list(_open_runtimes):
        with contextlib.suppress(Exception):
            runtime.close(grace_s=0)


class Runtime:
    """The sandbox runtime for ordinary (blocking) programs; same arguments as
    :class:`AsyncRuntime`. Starts at construction; use it as a context manager or call
    :meth:`close`.

    Example::

        from sandbox import Runtime, Limits

        with Runtime() as rt:
            rt.register("add", source="def handler(event, context):\\n"
                                      "    return event['a'] + event['b']\\n")
            print(rt.invoke("add", {"a": 1, "b": 2}).result)   # 3
    """

    def __init__(self, profiles: Mapping[str, Sequence[str]] | None = None,
                 **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="sandbox-runtime", daemon=True)
        self._thread.start()
        ready.wait()
        self._closed = False

        async def make() -> AsyncRuntime:
            rt = AsyncRuntime(profiles, **kwargs)
            await rt.start()
            return rt

        try:
            self._rt: AsyncRuntime = self._call(make())
        except BaseException:
            self._stop_loop()
            raise
        _open_runtimes.add(self)

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._loop.is_closed():
            coro.close()
            raise ShuttingDown("the runtime is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def _in_loop(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)

        return self._call(call())

    @property
    def async_runtime(self) -> AsyncRuntime:
        """The :class:`AsyncRuntime` underneath (lives on the runtime's own loop)."""
        return self._rt

    def register(self, name: str, **kwargs: Any) -> FunctionInfo:
        """See :meth:`AsyncRuntime.register`."""
        info: FunctionInfo = self._in_loop(self._rt.register, name, **kwargs)
        return info

    def unregister(self, name: str, version: int | None = None) -> None:
        self._in_loop(self._rt.unregister, name, version)

    def function(self, name: str, version: int | None = None) -> FunctionInfo:
        info: FunctionInfo = self._in_loop(self._rt.function, name, version)
        return info

    def functions(self) -> list[FunctionInfo]:
        infos: list[FunctionInfo] = self._in_loop(self._rt.functions)
        return infos

    def add_profile(self, name: str, modules: Sequence[str]) -> None:
        self._call(self._rt.add_profile(name, modules))

    def add_observer(self, observer: Observer) -> None:
        """See :meth:`AsyncRuntime.add_observer` (its methods run on the runtime's loop
        thread)."""
        self._in_loop(self._rt.add_observer, observer)

    def remove_observer(self, observer: Observer) -> None:
        self._in_loop(self._rt.remove_observer, observer)

    def gauges(self) -> dict[str, Any]:
        """See :meth:`AsyncRuntime.gauges` (safe from any thread)."""
        return self._rt.gauges()

    def invoke(self, name: str, event: Any = None, **kwargs: Any) -> InvocationResult:
        """See :meth:`AsyncRuntime.invoke`. Ctrl-C while waiting kills the worker."""
        result: InvocationResult = self._call(self._rt.invoke(name, event, **kwargs))
        return result

    def submit(self, name: str, event: Any = None, **kwargs: Any) -> Invocation:
        """Start an invocation; returns a handle with ``result()`` and ``cancel()``."""
        async def start() -> tuple[AsyncInvocation, asyncio.Future[InvocationResult]]:
            handle = self._rt.submit(name, event, **kwargs)
            return handle, handle._task

        handle, task = self._call(start())
        future: concurrent.futures.Future[InvocationResult] = concurrent.futures.Future()

        def copy(t: asyncio.Future[InvocationResult]) -> None:
            if t.cancelled():
                future.cancel()
            elif t.exception() is not None:
                future.set_exception(t.exception())
            else:
                future.set_result(t.result())

        self._loop.call_soon_threadsafe(task.add_done_callback, copy)
        return Invocation(self, handle, future)

    def map(self, name: str, events: Iterable[Any], **kwargs: Any) -> list[InvocationResult]:
        """Invoke ``name`` once per event, concurrently; results in the order of the events.

        Events are pulled lazily (in the calling thread): at most ``max_concurrency`` calls of
        the map are in flight at once.
        """
        results: list[InvocationResult] = []
        window: collections.deque[Invocation] = collections.deque()
        try:
            for event in events:
                if len(window) >= self._rt.max_concurrency:
                    results.append(window.popleft().result())
                window.append(self.submit(name, event, **kwargs))
            while window:
                results.append(window.popleft().result())
        except BaseException:
            for handle in window:
                handle.cancel()
            raise
        return results

    def stream(self, name: str, event: Any = None, **kwargs: Any) -> StreamIterator:
        """Iterate a generator function's chunks; ``.result()`` afterwards."""
        async def start() -> InvocationStream:
            return self._rt.stream(name, event, **kwargs)

        return StreamIterator(self, self._call(start()))

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = self._in_loop(self._rt.info)
        return data

    def invoke_async(self, name: str, event: Any = None, **kwargs: Any) -> QueuedInvocation:
        """See :meth:`AsyncRuntime.invoke_async`: queue durably, return at once."""
        queued: QueuedInvocation = self._call(self._rt.invoke_async(name, event, **kwargs))
        return queued

    def invocation(self, invocation_id: str) -> QueuedInvocation:
        """See :meth:`AsyncRuntime.invocation`."""
        found: QueuedInvocation = self._call(self._rt.invocation(invocation_id))
        return found

    def invocations(self, function: str | None = None, state: InvocationState | str | None = None,
                    **kwargs: Any) -> tuple[list[QueuedInvocation], str]:
        """See :meth:`AsyncRuntime.invocations`."""
        page: tuple[list[QueuedInvocation], str] = self._call(
            self._rt.invocations(function, state, **kwargs))
        return page

    def cancel_invocation(self, invocation_id: str) -> QueuedInvocation:
        """See :meth:`AsyncRuntime.cancel_invocation`."""
        found: QueuedInvocation = self._call(self._rt.cancel_invocation(invocation_id))
        return found

    def redrive_invocation(self, invocation_id: str) -> QueuedInvocation:
        """See :meth:`AsyncRuntime.redrive_invocation`."""
        found: QueuedInvocation = self._call(self._rt.redrive_invocation(invocation_id))
        return found

    def wait_invocation(self, invocation_id: str, timeout: float | None = None
                        ) -> QueuedInvocation:
        """See :meth:`AsyncRuntime.wait_invocation`."""
        found: QueuedInvocation = self._call(self._rt.wait_invocation(invocation_id, timeout))
        return found

    def wait_warm(self, timeout: float | None = 60.0) -> None:
        """See :meth:`AsyncRuntime.wait_warm`."""
        self._call(self._rt.wait_warm(timeout))

    def wait_idle(self, **kwargs: Any) -> None:
        """See :meth:`AsyncRuntime.wait_idle`."""
        self._call(self._rt.wait_idle(**kwargs))

    def close(self, grace_s: float = 5.0) -> None:
        """Stop everything; nothing the runtime started is left running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_runtimes.discard(self)
        try:
            self._call(self._rt.aclose(grace_s))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


"""``sandbox.Executor``: a :class:`concurrent.futures.Executor` whose every call runs isolated.

A drop-in for :class:`concurrent.futures.ProcessPoolExecutor` (``submit``, ``map``,
``shutdown``, a context manager, ``loop.run_in_executor``) where each call runs in a fresh
confined worker of a sandbox runtime (or a reused one with ``reuse=N``), under the executor's
limits, and where a call that times out, runs out of memory or crashes fails its own future
and nothing else::

    caller threads                    the executor's thread ("sandbox-executor": an event loop)
    ──────────────                    ──────────────────────────────────────────────────────────
    submit(fn, *args) ─ pickle ─▶ pending ─▶ _dispatch: at most max_workers calls at once
                                              ─▶ AsyncRuntime.submit(payload) ─▶ a worker runs
                                                 sandbox.executor_worker.run(fn, args, kwargs)
    Future.result() ◀─ set_result / ◀─ _finished ◀─ the reply: msgpack (sandbox.executor_wire),
                       set_exception                    never unpickled; or the call's outcome

- Caller threads pickle the call (function by reference, arguments by value), queue it and
  wake the loop. Nothing blocks on a worker.
- The loop (one thread per executor) owns an :class:`~sandbox.runtime.AsyncRuntime` started at
  the first ``submit``: one zygote preloaded with ``pickle``, the worker entry and ``preload``;
  a warm pool; the limits. It keeps ``max_workers`` calls in the runtime, settles each future
  from its call's result, and runs the futures' done callbacks.
- ``shutdown`` refuses new calls, cancels what is still queued if asked, waits (or lets a
  closer thread wait) for the calls in flight, then closes the runtime: no process is left.

Exceptions a call's future raises (a builtin exception the function raised is raised as
itself)::

    SandboxError
    ├── FunctionError                 the function raised a non-builtin exception
    └── CallFailed                    the call did not return; ``.result`` has its outcome
        ├── CallTimedOut              (also TimeoutError)       TIMEOUT
        ├── CallOutOfMemory           (also MemoryError)        MEMORY_LIMIT
        ├── CPULimitExceeded                                    CPU_LIMIT
        ├── OutputLimitExceeded                                 OUTPUT_LIMIT
        ├── ResultNotSerializable     (also TypeError)          the result is not plain data
        └── WorkerCrashed             (also BrokenProcessPool)  CRASHED, or the initializer
                                                                raised; the executor goes on
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import os
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, RUNNING
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ParamSpec, TypeVar

import msgpack

from sandbox import executor_wire as wire
from sandbox import executor_worker
from sandbox.errors import ConfigurationError, SandboxError
from sandbox.limits import DEFAULT_LIMITS, Limits
from sandbox.outcome import InvocationResult, Outcome
from sandbox.runtime import MAX_EVENT_BYTES, AsyncInvocation, AsyncRuntime

__all__ = [
    "EXECUTOR_LIMITS",
    "CPULimitExceeded",
    "CallFailed",
    "CallOutOfMemory",
    "CallTimedOut",
    "Executor",
    "FunctionError",
    "OutputLimitExceeded",
    "RemoteTraceback",
    "ResultNotSerializable",
    "WorkerCrashed",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: The limits of an executor's calls when ``limits=`` leaves a field None: the runtime's
#: defaults without the wall-clock timeout (a ProcessPoolExecutor has none; set one with
#: ``Limits(wall_timeout_s=...)``).
EXECUTOR_LIMITS = DEFAULT_LIMITS.replace(wall_timeout_s=None)
#: The name the executor's one function is registered under in its runtime.
_CALL = "executor-call"


# -- exceptions ---------------------------------------------------------------------------------

class RemoteTraceback(Exception):
    """The worker's traceback, as the ``__cause__`` of a call's exception (as
    ProcessPoolExecutor does), so ``traceback.print_exc()`` shows where it was raised."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class FunctionError(SandboxError):
    """The function raised an exception whose type is not a builtin (its class is not
    rebuilt in the caller: nothing from a worker is unpickled).

    Attributes:
        type_name: the exception's qualified name, with its module (``"app.errors.Oops"``).
        message: ``str()`` of the exception.
        traceback: the worker's formatted traceback.
        remote_args: the exception's ``args`` when they are plain data, else None.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "",
                 remote_args: list[Any] | None = None) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.remote_args = remote_args


class CallFailed(SandboxError):
    """A call that did not return: its worker was stopped (a limit), died, or could not send
    its result back. ``result`` is the call's :class:`~sandbox.InvocationResult` (outcome,
    error, captured stdout and stderr, stats)."""

    result: InvocationResult | None = None


class CallTimedOut(CallFailed, TimeoutError):
    """The call ran past ``wall_timeout_s``: its worker tree was killed."""


class CallOutOfMemory(CallFailed, MemoryError):
    """The call went over ``memory_bytes``: the worker was killed (or raised MemoryError)."""


class CPULimitExceeded(CallFailed):
    """The call used more than ``cpu_time_s`` of CPU time."""


class OutputLimitExceeded(CallFailed):
    """The call's result was larger than ``max_result_bytes``."""


class ResultNotSerializable(CallFailed, TypeError):
    """The function returned something that is not plain data (see
    :mod:`sandbox.executor_wire` for what round-trips)."""


class WorkerCrashed(CallFailed, BrokenProcessPool):
    """The worker died without a result (a signal such as SIGSEGV, ``os._exit``, a broken
    protocol), or the executor's initializer raised. Unlike ProcessPoolExecutor's
    BrokenProcessPool, only this call failed: the executor keeps working."""


_OUTCOME_ERRORS: dict[Outcome, type[CallFailed]] = {
    Outcome.TIMEOUT: CallTimedOut,
    Outcome.MEMORY_LIMIT: CallOutOfMemory,
    Outcome.CPU_LIMIT: CPULimitExceeded,
    Outcome.OUTPUT_LIMIT: OutputLimitExceeded,
    Outcome.CRASHED: WorkerCrashed,
}


def _failed(cls: type[CallFailed], message: str, result: InvocationResult | None,
            tb: str = "") -> CallFailed:
    exc = cls(message)  # one argument: OSError subclasses read two as (errno, strerror)
    exc.result = result
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


def _rebuild(record: dict[str, Any]) -> BaseException:
    """The function's exception, raised again in the caller: the builtin type itself when it
    is one (from its plain-data args, else its message), else a :class:`FunctionError`; its
    ``__cause__`` is the remote traceback."""
    module, name = str(record.get("module", "")), str(record.get("type", ""))
    message, tb = str(record.get("message", "")), str(record.get("traceback", ""))
    args = record.get("args")
    exc: BaseException | None = None
    cls = getattr(builtins, name, None) if module == "builtins" else None
    if isinstance(cls, type) and issubclass(cls, BaseException):
        attempts = ([args] if isinstance(args, list) else []) + [[message]]
        for attempt in attempts:
            try:
                exc = cls(*attempt)
                break
            except Exception:
                continue
    if exc is None:
        full = name if module in ("builtins", "") else f"{module}.{name}"
        exc = FunctionError(full, message, tb, args if isinstance(args, list) else None)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


# -- futures ------------------------------------------------------------------------------------

class _Future(concurrent.futures.Future[Any]):
    """A call's future. ``cancel()`` works on a running call too: its worker is killed and the
    future is cancelled (a ProcessPoolExecutor future refuses once running)."""

    _stop: Callable[[], object] | None = None

    def _bind(self, stop: Callable[[], object]) -> None:
        """Remember how to stop the running call; stop it now if it was cancelled meanwhile."""
        with self._condition:
            self._stop = stop
            cancelled = self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)
        if cancelled:
            stop()

    def cancel(self) -> bool:
        # Future's own state machine, extended by one transition: RUNNING -> cancelled (the
        # stdlib's cancel() refuses it). Waiters (wait, as_completed) are told at once.
        with self._condition:
            running = self._state == RUNNING
            if running:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
            stop = self._stop
        if not running:
            return super().cancel()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        if stop is not None:
            stop()
        return True


def _settle(future: concurrent.futures.Future[Any], *, value: Any = None,
            exception: BaseException | None = None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(value)


@dataclasses.dataclass(slots=True)
class _WorkItem:
    future: _Future
    payload: bytes
    label: str


# -- the executor -------------------------------------------------------------------------------

#: Executors not shut down yet: shut down (waiting for their calls, as ProcessPoolExecutor
#: does) at interpreter exit, before the runtimes' own exit handler runs.
_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_exiting = False


@atexit.register
def _shutdown_live_executors() -> None:
    global _exiting
    _exiting = True
    for executor in list(_live):
        with contextlib.suppress(Exception):
            executor.shutdown(wait=True)


def _label(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        fn = fn.args[0] if fn.func is executor_worker.process_chunk and fn.args else fn.func
    name = getattr(fn, "__qualname__", None)
    return f"{name}()" if isinstance(name, str) else type(fn).__name__


def _main_spec() -> list[str] | None:
    """How a worker loads the caller's ``__main__`` (what multiprocessing's spawn sends)."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if isinstance(spec_name, str):
        if spec_name == "__main__" or spec_name.endswith(".__main__"):
            return None  # python -m pkg: nothing a worker needs (as spawn)
        return ["module", spec_name]
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and os.path.splitext(os.path.basename(path))[0] != "ipython":
        return ["path", os.path.abspath(path)]
    return None


def _caller_path() -> list[str]:
    """The caller's ``sys.path``, absolute (``""`` is the current directory)."""
    return list(dict.fromkeys(os.path.abspath(p) for p in sys.path if isinstance(p, str)))


class Executor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` that runs every call in its own sandboxed worker.

    Args:
        max_workers: calls running at once (default: the number of CPUs).
        limits: what each call may use. Fields left None take :data:`EXECUTOR_LIMITS` (the
            runtime's defaults, 512 MiB of memory among them, but no wall-clock timeout).
            A call over ``wall_timeout_s`` raises :class:`CallTimedOut` (a TimeoutError), over
            ``memory_bytes`` :class:`CallOutOfMemory` (a MemoryError).
        preload: modules the zygote imports once, so workers start with them (numpy, your
            own module...): a fresh worker would otherwise import them at each call.
        reuse: calls one worker may serve (1, the default: a fresh process per call). A
            worker is always replaced after a limit, a crash or a cancellation.
        isolation: ``"strict"``, ``"best-effort"``, ``"off"`` or an
            :class:`~sandbox.isolation.IsolationConfig`, as for :class:`~sandbox.Runtime`
            (default: strict as root, best-effort otherwise). The caller's ``sys.path`` and
            the directory of its main script are added to what a worker sees, read-only.
        forward_output: write what a call printed (captured, up to ``max_log_bytes``) to this
            process's stdout and stderr when the call ends (default). False drops it; it is
            still on a failed call's ``exception.result``.
        mp_context: accepted for compatibility with ProcessPoolExecutor, and ignored (workers
            fork from the executor's zygote).
        initializer, initargs: called as ``initializer(*initargs)`` in each worker before its
            first call (with ``reuse=1``: before every call). If it raises, that call fails
            with :class:`WorkerCrashed`.
        max_tasks_per_child: ProcessPoolExecutor's name for ``reuse`` (None: ``reuse``).

    Processes start at the first :meth:`submit`. Functions and arguments are pickled to the
    worker (module-level functions and ``functools.partial`` of them, including functions of
    the main script); results come back as plain data (:mod:`sandbox.executor_wire`).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        limits: Limits | None = None,
        preload: Sequence[str] = (),
        reuse: int = 1,
        isolation: Any = None,
        forward_output: bool = True,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, got {max_workers!r}")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if reuse not in (1, max_tasks_per_child):
                raise ValueError("give reuse= or max_tasks_per_child=, not both")
            reuse = max_tasks_per_child
        if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 1:
            raise ConfigurationError(f"reuse must be an int >= 1, got {reuse!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise ConfigurationError("limits must be a sandbox.Limits")
        if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
            raise ConfigurationError("preload must be a list of module names")
        from sandbox.host import isolation_config

        isolation_config(isolation)  # a bad value is an error now, not at the first call
        self._max_workers = max_workers
        self._limits = limits
        self._preload = tuple(preload)
        self._reuse = reuse
        self._isolation = isolation
        self._forward_output = bool(forward_output)
        self._init = (None if initializer is None else
                      pickle.dumps((initializer, tuple(initargs)), pickle.HIGHEST_PROTOCOL))
        #: guards everything below that callers and the loop both touch
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._pending: collections.deque[_WorkItem] = collections.deque()
        self._inflight = 0
        self._dispatch_scheduled = False
        self._shutdown = False
        self._start_lock = threading.Lock()
        self._rt: AsyncRuntime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closer: threading.Thread | None = None
        self._closed = threading.Event()
        self._main: list[str] | None = None
        self._prefix_key: tuple[Any, ...] | None = None
        self._prefix = b""

    # lifecycle ----------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._rt is not None:
            return
        with self._start_lock:
            if self._rt is not None:
                return
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if executor_worker.active:
                raise RuntimeError(
                    "an Executor cannot start inside one of its own workers: guard the code "
                    "that uses it in the main script with `if __name__ == \"__main__\":`")
            self._main = _main_spec()
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=serve, name="sandbox-executor", daemon=True)
            thread.start()
            ready.wait()
            try:
                rt = asyncio.run_coroutine_threadsafe(self._make_runtime(), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self._loop, self._thread = loop, thread
            self._rt = rt  # last: submit() reads it without the lock, then the loop
            _live.add(self)

    def _isolation_config(self) -> Any:
        """The isolation asked for, with the caller's code directories visible (read-only)."""
        from sandbox.host import isolation_config

        config = isolation_config(self._isolation)
        if config is None:
            return "off"
        extra = [p for p in _caller_path() if os.path.isdir(p)]
        if self._main is not None and self._main[0] == "path":
            extra.append(os.path.dirname(self._main[1]))
        expose = tuple(dict.fromkeys([*config.expose, *extra]))
        return dataclasses.replace(config, expose=expose)

    async def _make_runtime(self) -> AsyncRuntime:
        rt = AsyncRuntime(
            {"default": ["pickle", "sandbox.executor_worker", *self._preload]},
            limits=EXECUTOR_LIMITS, max_concurrency=self._max_workers,
            max_queue=self._max_workers, min_idle=min(2, self._max_workers),
            isolation=self._isolation_config())
        try:
            await rt.start()
            rt.register(_CALL, ref="sandbox.executor_worker:run", limits=self._limits,
                        reuse=self._reuse)
        except BaseException:
            await rt.aclose(grace_s=0)
            raise
        return rt

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``cancel_futures``, cancel the calls still queued (not those
        running); with ``wait``, return once every call has ended and every process of the
        executor is gone (else that happens in the background). Idempotent."""
        with self._lock:
            self._shutdown = True
            dropped = list(self._pending) if cancel_futures else []
            if cancel_futures:
                self._pending.clear()
                self._drained.notify_all()
        for item in dropped:
            item.future.cancel()
            item.future.set_running_or_notify_cancel()  # wakes wait() / as_completed()
        on_loop = threading.current_thread() is self._thread
        with self._start_lock:
            if self._rt is None:
                self._closed.set()
                return
            inline = wait and not on_loop and self._closer is None
            if self._closer is None:
                # Closing waits for the calls in flight: here when the caller waits (no new
                # thread, so it works at interpreter exit too), else in a thread of its own.
                self._closer = threading.current_thread() if inline else threading.Thread(
                    target=self._close, name="sandbox-executor-close", daemon=True)
                if not inline:
                    self._closer.start()
        if inline:
            self._close()
        elif wait and not on_loop:
            self._closed.wait()

    def _close(self) -> None:
        """Wait until no call is queued or running, then close the runtime and its loop."""
        with self._drained:
            self._drained.wait_for(lambda: not self._pending and self._inflight == 0)
        rt, loop, thread = self._rt, self._loop, self._thread
        assert rt is not None and loop is not None and thread is not None
        try:
            asyncio.run_coroutine_threadsafe(rt.aclose(grace_s=0), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            _live.discard(self)
            self._closed.set()

    # calls --------------------------------------------------------------------------------------
    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> concurrent.futures.Future[_T]:
        """Run ``fn(*args, **kwargs)`` in a worker; returns its future.

        A call that cannot be pickled gets a future with the pickling error (as with
        ProcessPoolExecutor). Raises RuntimeError after :meth:`shutdown`.
        """
        self._check_open()
        self._ensure_started()
        future = _Future()
        try:
            call = pickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
            if len(call) > MAX_EVENT_BYTES - 64 * 1024:
                raise ValueError(f"the call's function and arguments pickle to {len(call)} "
                                 f"bytes; at most {MAX_EVENT_BYTES - 64 * 1024} go to a worker")
        except Exception as exc:
            future.set_exception(exc)
            return future
        item = _WorkItem(future, self._payload_prefix() + msgpack.packb(call), _label(fn))
        with self._lock:
            self._check_open()
            self._pending.append(item)
            wake = not self._dispatch_scheduled
            self._dispatch_scheduled = True
        if wake:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._dispatch)
        return future

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _payload_prefix(self) -> bytes:
        """The event's first three items (msgpack): the caller's sys.path, its main module,
        the initializer. Made again only when sys.path or the working directory change."""
        key = (tuple(sys.path), os.getcwd())
        if key != self._prefix_key:
            self._prefix = (b"\x94" + msgpack.packb(_caller_path()) + msgpack.packb(self._main)
                            + msgpack.packb(self._init))
            self._prefix_key = key
        return self._prefix

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1,
            buffersize: int | None = None) -> Iterator[_T]:
        """``map(fn, *iterables)``, each call in a worker: results in order, lazily.

        As :meth:`concurrent.futures.Executor.map`: calls are submitted at once (with
        ``buffersize``, as in Python 3.14, only that many ahead of the results read);
        ``timeout`` (seconds from this call) makes the iterator raise TimeoutError; leaving
        the iterator early cancels the calls not done (running ones are stopped).
        ``chunksize`` > 1 sends that many items to one worker as one call (one isolation
        unit, one timeout).
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError("chunksize must be an integer")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        if chunksize == 1:
            return _map(self, fn, zip(*iterables, strict=False), timeout, buffersize)
        chunks = _chunks(zip(*iterables, strict=False), chunksize)
        results = _map(self, functools.partial(executor_worker.process_chunk, fn),
                       ((chunk,) for chunk in chunks), timeout, buffersize)
        return _flatten(results)

    def info(self) -> dict[str, Any]:
        """The runtime's :meth:`~sandbox.AsyncRuntime.info` (pools, isolation, call phases);
        empty before the first call."""
        rt, loop = self._rt, self._loop
        if rt is None or loop is None or self._closed.is_set():
            return {}

        if threading.current_thread() is self._thread:
            return rt.info()

        async def info() -> dict[str, Any]:
            return rt.info()

        return asyncio.run_coroutine_threadsafe(info(), loop).result()

    # on the loop --------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Move queued calls into the runtime while fewer than ``max_workers`` run."""
        rt, loop = self._rt, self._loop
        assert rt is not None and loop is not None
        while True:
            with self._lock:
                if not self._pending or self._inflight >= self._max_workers:
                    self._dispatch_scheduled = False
                    if not self._pending and self._inflight == 0:
                        self._drained.notify_all()
                    return
                item = self._pending.popleft()
                if not item.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                self._inflight += 1
            try:
                invocation = rt.submit(_CALL, payload=item.payload)
            except Exception as exc:  # ShuttingDown, Overloaded: this call only
                with self._lock:
                    self._inflight -= 1
                _settle(item.future, exception=exc)
                continue
            item.future._bind(functools.partial(_call_soon, loop, invocation.cancel))
            invocation.task.add_done_callback(functools.partial(self._finished, item,
                                                                invocation))

    def _finished(self, item: _WorkItem, invocation: AsyncInvocation,
                  task: asyncio.Task[InvocationResult]) -> None:
        with self._lock:
            self._inflight -= 1
        try:
            if task.cancelled():
                item.future.cancel()
            elif task.exception() is not None:
                _settle(item.future, exception=task.exception())
            else:
                self._complete(item, task.result())
        except BaseException as exc:  # never leave a future unsettled
            _settle(item.future, exception=exc)
            raise
        finally:
            self._dispatch()

    def _complete(self, item: _WorkItem, result: InvocationResult) -> None:
        """Settle a call's future from its result."""
        if self._forward_output:
            _forward(result)
        future, outcome, error = item.future, result.outcome, result.error
        if outcome is Outcome.CANCELLED:
            future.cancel()
            return
        if outcome is not Outcome.OK:
            message = f"{item.label}: {error.message}" if error is not None else item.label
            if outcome is Outcome.FUNCTION_ERROR and error is not None:
                # The worker entry reports the function's exceptions itself; this is one it let
                # through (MemoryError) or one before it ran.
                module, _, name = error.type.rpartition(".")
                _settle(future, exception=_rebuild({
                    "module": module or "builtins", "type": name, "args": None,
                    "message": error.message, "traceback": error.traceback}))
                return
            cls = _OUTCOME_ERRORS.get(outcome, WorkerCrashed)
            if outcome is Outcome.CRASHED and error is not None:
                message = f"{item.label}: {error.type}: {error.message}"
            _settle(future, exception=_failed(cls, message, result,
                                              error.traceback if error is not None else ""))
            return
        try:
            reply = wire.loads(result.result)
            tag, payload = reply
        except (wire.InvalidReply, TypeError, ValueError) as exc:
            _settle(future, exception=_failed(
                WorkerCrashed, f"{item.label}: the worker's reply is not valid: {exc}", result))
            return
        if tag == wire.OK:
            _settle(future, value=payload)
        elif tag == wire.RAISED and isinstance(payload, dict):
            _settle(future, exception=_rebuild(payload))
        elif tag == wire.UNSENDABLE:
            _settle(future, exception=_failed(ResultNotSerializable,
                                              f"{item.label}: {payload}", result))
        elif tag == wire.INIT_FAILED and isinstance(payload, dict):
            failure = _failed(WorkerCrashed, f"{item.label}: the executor's initializer "
                              f"raised {payload.get('type')}: {payload.get('message')}", result)
            failure.__cause__ = _rebuild(payload)
            _settle(future, exception=failure)
        else:
            _settle(future, exception=_failed(
                WorkerCrashed, f"{item.label}: the worker's reply is not valid: tag {tag!r}",
                result))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """``fn`` on ``loop``, from any thread; nothing if the loop is closed (all is over)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


def _forward(result: InvocationResult) -> None:
    """What a call printed, to our own stdout and stderr (as a forked worker's would go)."""
    for text, truncated, stream in ((result.stdout, result.stdout_truncated, sys.stdout),
                                    (result.stderr, result.stderr_truncated, sys.stderr)):
        if not text and not truncated:
            continue
        with contextlib.suppress(Exception):
            stream.write(text + ("\n[output truncated at max_log_bytes]\n" if truncated
                                 else ""))
            stream.flush()


# -- map ----------------------------------------------------------------------------------------

def _result_or_cancel(future: concurrent.futures.Future[Any], timeout: float | None = None
                      ) -> Any:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # no reference kept to a result that may be large


def _map(executor: Executor, fn: Callable[..., Any], args_iter: Iterator[tuple[Any, ...]],
         timeout: float | None, buffersize: int | None) -> Iterator[Any]:
    """Python 3.14's Executor.map (``buffersize`` included), submitting through ``executor``."""
    end_time = None if timeout is None else timeout + time.monotonic()
    if buffersize:
        fs: collections.deque[concurrent.futures.Future[Any]] = collections.deque(
            executor.submit(fn, *args) for args in itertools.islice(args_iter, buffersize))
    else:
        fs = collections.deque(executor.submit(fn, *args) for args in args_iter)
    ref = weakref.ref(executor)

    def result_iterator() -> Iterator[Any]:
        try:
            fs.reverse()  # pop() from the right: results in order
            while fs:
                if buffersize and (ex := ref()) is not None and \
                        (args := next(args_iter, None)) is not None:
                    fs.appendleft(ex.submit(fn, *args))
                if end_time is None:
                    yield _result_or_cancel(fs.pop())
                else:
                    yield _result_or_cancel(fs.pop(), end_time - time.monotonic())
        finally:
            for future in fs:
                future.cancel()

    return result_iterator()


def _chunks(args_iter: Iterator[tuple[Any, ...]], size: int) -> Iterator[tuple[Any, ...]]:
    while chunk := tuple(itertools.islice(args_iter, size)):
        yield chunk


def _flatten(results: Iterator[list[Any]]) -> Iterator[Any]:
    for chunk in results:
        chunk.reverse()
        while chunk:
            yield chunk.pop()

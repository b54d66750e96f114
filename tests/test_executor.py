"""sandbox.Executor: the semantics CPython's own executor tests check (submit, map, shutdown,
cancel, wait, as_completed, done callbacks, use after shutdown), with real workers; every
failure is its own future's; what comes back from a worker is plain data only.

Calls that must be running when a test acts block on a FIFO (`Gate`): the test's blocking open
for writing returns exactly when the worker has opened it for reading, and the call returns
when the test writes. No sleeps; thread joins and future waits have deadlock-guard timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import functools
import itertools
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import executor_functions as fx
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox import (
    CallFailed,
    CallOutOfMemory,
    CallTimedOut,
    CPULimitExceeded,
    Executor,
    FunctionError,
    Limits,
    Outcome,
    OutputLimitExceeded,
    ResultNotSerializable,
    WorkerCrashed,
)
from sandbox import executor_wire as wire
from sandbox.errors import ConfigurationError
from sandbox.executor import RemoteTraceback
from sandbox.isolation import IsolationConfig, interpreter_paths

#: deadlock guard for every wait on a future, a thread or a FIFO
GUARD_S = 60.0
ROOT = Path(__file__).resolve().parent.parent


class Gate:
    """A FIFO a call blocks on (`executor_functions.wait_gate`)."""

    _names = itertools.count()

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"gate-{next(self._names)}")
        os.mkfifo(self.path)
        os.chmod(self.path, 0o666)  # the worker runs as a uid of its own
        self._fd: int | None = None

    def wait_running(self) -> None:
        """Return once the call has opened the FIFO: it is running in its worker."""
        opened: dict[str, int] = {}
        opener = threading.Thread(
            target=lambda: opened.setdefault("fd", os.open(self.path, os.O_WRONLY)),
            daemon=True)
        opener.start()
        opener.join(GUARD_S)
        if opener.is_alive():
            with contextlib.suppress(OSError):  # unblock the opener before failing
                os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
            pytest.fail(f"the call never opened {self.path}")
        self._fd = opened["fd"]

    def release(self, data: bytes = b"released") -> None:
        if self._fd is None:
            self.wait_running()
        assert self._fd is not None
        os.write(self._fd, data)
        os.close(self._fd)
        self._fd = None

    def close(self) -> None:
        """Let a call still blocked on the gate go (teardown)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):  # ENXIO: nobody is waiting on it
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))


class Harness:
    """Makes executors (strict isolation, the gates' directory visible) and gates; shuts
    everything down after the test."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.executors: list[Executor] = []
        self.gates: list[Gate] = []

    def executor(self, *args: Any, isolation: Any = "strict", **kwargs: Any) -> Executor:
        if isolation == "strict":
            isolation = IsolationConfig(mode="strict",
                                        expose=(*interpreter_paths(), self.directory))
        executor = Executor(*args, isolation=isolation, **kwargs)
        self.executors.append(executor)
        return executor

    def gate(self) -> Gate:
        gate = Gate(self.directory)
        self.gates.append(gate)
        return gate

    def close(self) -> None:
        for gate in self.gates:
            gate.close()
        for executor in self.executors:
            closing = threading.Thread(target=executor.shutdown, daemon=True)
            closing.start()
            closing.join(GUARD_S)
            assert not closing.is_alive(), "shutdown() did not return"


@pytest.fixture
def harness() -> Iterator[Harness]:
    directory = tempfile.mkdtemp(prefix="sandbox-executor-test-")
    os.chmod(directory, 0o755)
    h = Harness(directory)
    try:
        yield h
    finally:
        h.close()
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


# -- submit and results -------------------------------------------------------------------------

def test_submit_returns_a_future_with_the_result(harness: Harness) -> None:
    ex = harness.executor(2)
    assert isinstance(ex, concurrent.futures.Executor)
    future = ex.submit(fx.add, 1, b=2)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(GUARD_S) == 3
    assert future.done() and not future.running() and not future.cancelled()
    assert ex.submit(functools.partial(fx.add, "a"), "b").result(GUARD_S) == "ab"
    assert ex.submit(abs, -4).result(GUARD_S) == 4  # builtins pickle by reference too


PLAIN = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**200, -(2**200), 1.5,
    float("inf"), 1 + 2j, "text é", b"\x00bytes", [1, [2, [3]]], (1, (2, "b"), ()),
    {"a": 1, 2: "int key", 2.5: None, None: [], b"k": {"nested": (1,)}}, {1, "s", b"b"},
    frozenset({1, "f"}), {"sets": [{1, 2}, frozenset()]},
]


def test_plain_data_round_trips_with_its_type(harness: Harness) -> None:
    ex = harness.executor(2)
    for value in PLAIN:
        back = ex.submit(fx.identity, value).result(GUARD_S)
        assert back == value and type(back) is type(value), value
    assert ex.submit(fx.identity, bytearray(b"ab")).result(GUARD_S) == b"ab"


@pytest.mark.parametrize("value, named", [
    (object(), "object"),
    (collections.OrderedDict(a=1), "OrderedDict"),
    (collections.namedtuple("P", "x")(1), "P"),
    (enum.IntEnum("E", "A").A, "E"),
    ({(1, 2): "tuple key"}, "tuple"),
    ({2**70: "big int key"}, "int"),
    ({(1, 2)}, "tuple"),
])
def test_what_does_not_round_trip_is_refused_by_name(value: Any, named: str) -> None:
    with pytest.raises(wire.NotPlainData, match=named):
        wire.dumps(value)


def test_a_result_that_is_not_plain_data_fails_its_call(harness: Harness) -> None:
    ex = harness.executor(1)
    with pytest.raises(ResultNotSerializable, match="not plain data") as caught:
        ex.submit(fx.unsendable).result(GUARD_S)
    assert isinstance(caught.value, TypeError)
    assert ex.submit(fx.add, 1, 1).result(GUARD_S) == 2


def test_a_call_that_cannot_be_pickled_fails_its_future(harness: Harness) -> None:
    ex = harness.executor(1)
    future = ex.submit(lambda: 1)
    assert isinstance(future.exception(GUARD_S), pickle.PicklingError | AttributeError)
    assert ex.submit(fx.add, 2, 2).result(GUARD_S) == 4


@pytest.mark.parametrize("run_as", ["script", "module"])
def test_functions_of_the_main_module_and_its_sys_path(tmp_path: Path, run_as: str) -> None:
    """As with spawn: the main script (``python app.py``) or module (``python -m app``) is
    loaded as __mp_main__ in the worker (its guarded block does not run), and what the caller
    imports from its sys.path, the worker does."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "helper.py").write_text("def triple(x):\n    return 3 * x\n")
    script = tmp_path / "app.py"
    script.write_text(
        "import sys\n"
        "import helper\n"
        "from sandbox import Executor\n"
        "print('loaded as', __name__, file=sys.stderr)\n"
        "def square(x):\n"
        "    return x * x\n"
        "def name():\n"
        "    return __name__\n"
        "if __name__ == '__main__':\n"
        "    with Executor(2, isolation='strict') as ex:\n"
        "        print(list(ex.map(square, range(5))))\n"
        "        print(ex.submit(helper.triple, 5).result())\n"
        "        print(ex.submit(name).result())\n")
    argv = [str(script)] if run_as == "script" else ["-m", "app"]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=GUARD_S, cwd="/" if run_as == "script" else tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[0, 1, 4, 9, 16]", "15", "__mp_main__"]
    # The worker ran the main module's top level as __mp_main__ and forwarded what it printed.
    assert "loaded as __mp_main__" in proc.stderr


def test_the_worker_entry_imports_nothing_heavy() -> None:
    """The zygote of an executor imports sandbox.executor_worker: pickle, runpy, traceback
    come later, and only in the worker (the executor's profile preloads pickle itself)."""
    code = ("import sys, sandbox.executor_worker; print(sorted(m for m in ('pickle', 'runpy', "
            "'traceback', 'threading', 'asyncio', 'concurrent.futures') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=GUARD_S, env={"PYTHONPATH": ""}, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_executor_refuses_to_start_in_its_own_worker(harness: Harness) -> None:
    ex = harness.executor(1)
    with pytest.raises(RuntimeError, match="inside one of its own workers"):
        ex.submit(fx.nested_executor).result(GUARD_S)


def test_output_is_forwarded_when_the_call_ends(harness: Harness,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ex = harness.executor(1)
    assert ex.submit(fx.printer, "hello").result(GUARD_S) == 5
    out, err = capsys.readouterr()
    assert "hello\n" in out and "hello (stderr)\n" in err
    quiet = harness.executor(1, forward_output=False)
    assert quiet.submit(fx.printer, "quiet").result(GUARD_S) == 5
    assert "quiet" not in capsys.readouterr().out


# -- exceptions ---------------------------------------------------------------------------------

def test_builtin_exceptions_come_back_as_themselves(harness: Harness) -> None:
    ex = harness.executor(2)
    with pytest.raises(ValueError, match="bad value") as value_error:
        ex.submit(fx.raise_value_error, "bad value").result(GUARD_S)
    assert type(value_error.value) is ValueError
    with pytest.raises(KeyError) as key_error:
        ex.submit(fx.raise_key_error, "k").result(GUARD_S)
    assert key_error.value.args == ("k",)
    with pytest.raises(FileNotFoundError) as not_found:
        ex.submit(fx.raise_file_not_found).result(GUARD_S)
    assert not_found.value.errno == 2 and not_found.value.filename == "/nonexistent/file"
    with pytest.raises(SystemExit) as system_exit:
        ex.submit(fx.raise_system_exit, 3).result(GUARD_S)
    assert system_exit.value.code == 3


def test_other_exceptions_carry_type_message_and_remote_traceback(harness: Harness) -> None:
    ex = harness.executor(1)
    future = ex.submit(fx.raise_custom, "custom trouble")
    with pytest.raises(FunctionError) as caught:
        future.result(GUARD_S)
    error = caught.value
    assert error.type_name == "executor_functions.CustomError"
    assert error.message == "custom trouble" and error.remote_args == ["custom trouble"]
    assert "raise CustomError(message)" in error.traceback
    assert isinstance(error.__cause__, RemoteTraceback)
    # What traceback.print_exc() shows: the worker's traceback, then ours.
    shown = "".join(traceback.format_exception(error))
    assert "raise CustomError(message)" in shown and "direct cause" in shown
    assert "executor_functions.CustomError: custom trouble" in shown
    # A builtin one is chained the same way.
    value_error = ex.submit(fx.raise_value_error, "v").exception(GUARD_S)
    assert isinstance(value_error, ValueError)
    assert isinstance(value_error.__cause__, RemoteTraceback)
    assert "raise ValueError(message)" in str(value_error.__cause__)


GOOD_CALLS = 3

FAULTS = [  # (id, function, args, limits, exception, also an instance of, message fragment)
    ("timeout", fx.sleep_forever, (), Limits(wall_timeout_s=0.5), CallTimedOut, TimeoutError,
     "wall-clock timeout of 0.5 s"),
    ("memory", fx.allocate, (512 * 2**20,), Limits(memory_bytes=64 * 2**20), CallOutOfMemory,
     MemoryError, "memory limit of 64 MiB"),
    ("cpu", fx.spin, (), Limits(cpu_time_s=0.5), CPULimitExceeded, CallFailed,
     "CPU time limit of 0.5 s"),
    ("output", fx.big_result, (2**20,), Limits(max_result_bytes=64 * 1024),
     OutputLimitExceeded, CallFailed, "max_result_bytes"),
    ("segfault", fx.segfault, (), None, WorkerCrashed, BrokenProcessPool, "SIGSEGV"),
    ("exit", fx.exit_abruptly, (3,), None, WorkerCrashed, BrokenProcessPool,
     "exited with code 3"),
]


@pytest.mark.parametrize("fault, fn, args, limits, expected, also, fragment", FAULTS,
                         ids=[f[0] for f in FAULTS])
def test_a_failure_fails_its_own_future_only(
        harness: Harness, fault: str, fn: Callable[..., Any], args: tuple[Any, ...],
        limits: Limits | None, expected: type[CallFailed], also: type[BaseException],
        fragment: str) -> None:
    ex = harness.executor(2, limits=limits)
    bad = ex.submit(fn, *args)
    good = [ex.submit(fx.add, i, 1) for i in range(GOOD_CALLS)]
    with pytest.raises(expected, match=fragment) as caught:
        bad.result(GUARD_S)
    assert isinstance(caught.value, also)
    assert caught.value.result is not None and caught.value.result.outcome is not Outcome.OK
    assert [f.result(GUARD_S) for f in good] == [i + 1 for i in range(GOOD_CALLS)]
    assert ex.submit(fx.add, 40, 2).result(GUARD_S) == 42  # not a broken pool


@pytest.mark.parametrize("hostile", [fx.break_the_reply, fx.tuple_keys_reply])
def test_a_hostile_reply_fails_its_own_call(harness: Harness,
                                            hostile: Callable[[], Any]) -> None:
    ex = harness.executor(1)
    with pytest.raises(WorkerCrashed, match="reply is not valid"):
        ex.submit(hostile).result(GUARD_S)
    assert ex.submit(fx.add, 1, 2).result(GUARD_S) == 3


# -- map ----------------------------------------------------------------------------------------

def test_map_results_in_order(harness: Harness) -> None:
    ex = harness.executor(2)
    assert list(ex.map(fx.add, range(10), range(100, 110))) == [100 + 2 * i for i in range(10)]
    assert list(ex.map(fx.add, [1, 2, 3], [1])) == [2]  # zip: the shortest iterable
    assert list(ex.map(fx.add, [])) == []
    assert list(ex.map(fx.add, range(7), range(7), chunksize=3)) == [2 * i for i in range(7)]
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(fx.add, [1], chunksize=0)


def test_map_raises_at_the_failing_item(harness: Harness) -> None:
    ex = harness.executor(2)
    results = ex.map(fx.fail_on, range(5), itertools.repeat(3))
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3 is bad"):
        next(results)


def test_map_is_lazy_with_buffersize(harness: Harness) -> None:
    ex = harness.executor(2)
    results = ex.map(fx.identity, itertools.count(), buffersize=2)  # an endless iterable
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    results.close()


def test_map_timeout_raises_timeout_error_and_stops_the_rest(harness: Harness) -> None:
    ex = harness.executor(2)
    gate = harness.gate()
    results = ex.map(fx.gate_or_value, [1, gate.path, 3], timeout=1.0)
    assert next(results) == 1
    with pytest.raises(TimeoutError):
        next(results)
    # Leaving the iterator cancelled the blocked call (its worker killed): shutdown returns
    # although nobody releases the gate.
    ex.shutdown(wait=True)


# -- cancel -------------------------------------------------------------------------------------

def test_cancel_a_queued_call(harness: Harness) -> None:
    ex = harness.executor(1)
    gate = harness.gate()
    running = ex.submit(fx.wait_gate, gate.path)
    gate.wait_running()
    queued = ex.submit(fx.add, 1, 1)
    called: list[concurrent.futures.Future[Any]] = []
    queued.add_done_callback(called.append)
    assert queued.cancel() and queued.cancelled() and queued.done()
    assert called == [queued]
    gate.release(b"done")
    assert running.result(GUARD_S) == b"done"
    assert not running.cancel()  # finished
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(GUARD_S)


def test_cancel_a_running_call_kills_its_worker(harness: Harness) -> None:
    ex = harness.executor(1)
    gate = harness.gate()
    running = ex.submit(fx.wait_gate, gate.path)
    gate.wait_running()
    assert running.running()
    called: list[concurrent.futures.Future[Any]] = []
    running.add_done_callback(called.append)
    waiter = threading.Thread(target=concurrent.futures.wait, args=([running],), daemon=True)
    waiter.start()
    assert running.cancel() and running.cancelled()
    waiter.join(GUARD_S)
    assert not waiter.is_alive() and called == [running]
    with pytest.raises(concurrent.futures.CancelledError):
        running.result(GUARD_S)
    # The only slot is free again although nobody released the gate: the call was killed.
    assert ex.submit(fx.add, 1, 2).result(GUARD_S) == 3


# -- shutdown -----------------------------------------------------------------------------------

def test_use_after_shutdown_raises_runtime_error(harness: Harness) -> None:
    unused = harness.executor(1)
    unused.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        unused.submit(fx.add, 1, 2)
    ex = harness.executor(1)
    assert ex.submit(fx.add, 1, 2).result(GUARD_S) == 3
    ex.shutdown()
    ex.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(fx.add, 1, 2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(fx.add, [1])


def test_context_manager_shuts_down(harness: Harness) -> None:
    with harness.executor(1) as ex:
        future = ex.submit(fx.add, 2, 3)
    assert future.done() and future.result() == 5
    with pytest.raises(RuntimeError):
        ex.submit(fx.add, 1, 1)


def test_shutdown_waits_for_running_calls(harness: Harness) -> None:
    ex = harness.executor(1)
    gate = harness.gate()
    future = ex.submit(fx.wait_gate, gate.path)
    gate.wait_running()
    closing = threading.Thread(target=ex.shutdown, kwargs={"wait": True}, daemon=True)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive() and not future.done()  # waiting for the call
    gate.release(b"finished")
    closing.join(GUARD_S)
    assert not closing.is_alive()
    assert future.result(0) == b"finished"


def test_shutdown_without_wait_returns_at_once(harness: Harness) -> None:
    ex = harness.executor(1)
    gate = harness.gate()
    future = ex.submit(fx.wait_gate, gate.path)
    gate.wait_running()
    ex.shutdown(wait=False)  # returns although the call cannot end before the release
    assert not future.done()
    with pytest.raises(RuntimeError):
        ex.submit(fx.add, 1, 1)
    gate.release(b"later")
    assert future.result(GUARD_S) == b"later"
    ex.shutdown(wait=True)  # waits until the executor's processes are gone


def test_shutdown_cancel_futures_cancels_the_queued_calls(harness: Harness) -> None:
    ex = harness.executor(1)
    gate = harness.gate()
    running = ex.submit(fx.wait_gate, gate.path)
    gate.wait_running()
    queued = [ex.submit(fx.add, i, i) for i in range(3)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    done, not_done = concurrent.futures.wait(queued, timeout=GUARD_S)
    assert done == set(queued) and not not_done  # waiters were told
    assert not running.cancelled()
    gate.release(b"kept")
    assert running.result(GUARD_S) == b"kept"
    ex.shutdown(wait=True)


# -- waiting on futures -------------------------------------------------------------------------

def test_wait_and_as_completed(harness: Harness) -> None:
    ex = harness.executor(2)
    gate = harness.gate()
    slow = ex.submit(fx.wait_gate, gate.path)
    gate.wait_running()
    quick = ex.submit(fx.add, 1, 1)
    failing = ex.submit(fx.raise_value_error, "x")
    done, not_done = concurrent.futures.wait([slow, quick], timeout=GUARD_S,
                                             return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    done, not_done = concurrent.futures.wait([slow, failing], timeout=GUARD_S,
                                             return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    with pytest.raises(TimeoutError):
        list(concurrent.futures.as_completed([slow], timeout=0.2))
    gate.release()
    done, not_done = concurrent.futures.wait([slow, quick, failing], timeout=GUARD_S)
    assert done == {slow, quick, failing} and not not_done
    futures = [ex.submit(fx.add, i, 0) for i in range(6)]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, GUARD_S)) == \
        list(range(6))


def test_done_callbacks(harness: Harness) -> None:
    ex = harness.executor(1)
    called: queue.SimpleQueue[concurrent.futures.Future[Any]] = queue.SimpleQueue()
    ok = ex.submit(fx.add, 1, 2)
    failed = ex.submit(fx.raise_value_error, "no")
    ok.add_done_callback(called.put)
    failed.add_done_callback(lambda f: 1 / 0)  # a raising callback is logged, not fatal
    failed.add_done_callback(called.put)
    assert {called.get(timeout=GUARD_S), called.get(timeout=GUARD_S)} == {ok, failed}
    assert ok.result() == 3 and isinstance(failed.exception(), ValueError)
    ok.add_done_callback(called.put)  # on a done future: called at once, in this thread
    assert called.get_nowait() is ok
    assert called.empty()


def test_run_in_executor_and_cancelling_the_awaiting_task(harness: Harness) -> None:
    ex = harness.executor(1)
    gate = harness.gate()

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(ex, fx.add, i, 10)
                                         for i in range(3)))
        blocked = loop.run_in_executor(ex, fx.wait_gate, gate.path)
        await loop.run_in_executor(None, gate.wait_running)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(blocked, timeout=0.1)  # cancels it: the worker is killed
        after = await loop.run_in_executor(ex, fx.add, 1, 1)  # the one slot is free again
        return results, after

    assert asyncio.run(main()) == ([10, 11, 12], 2)


# -- workers: reuse, initializer, limits --------------------------------------------------------

def test_a_fresh_worker_per_call_unless_reused(harness: Harness) -> None:
    fresh = harness.executor(1)
    assert [fresh.submit(fx.count_calls).result(GUARD_S) for _ in range(4)] == [1, 1, 1, 1]
    reused = harness.executor(1, reuse=3)
    assert [reused.submit(fx.count_calls).result(GUARD_S) for _ in range(6)] == \
        [1, 2, 3, 1, 2, 3]
    alias = harness.executor(1, max_tasks_per_child=2)
    assert [alias.submit(fx.count_calls).result(GUARD_S) for _ in range(3)] == [1, 2, 1]


def test_initializer_runs_before_each_workers_first_call(harness: Harness) -> None:
    ex = harness.executor(1, initializer=fx.initialize, initargs=("ready",), reuse=2)
    assert [ex.submit(fx.initialized).result(GUARD_S) for _ in range(3)] == [["ready"]] * 3
    broken = harness.executor(1, initializer=fx.failing_initializer)
    for _ in range(2):  # each call fails; the executor does not break
        with pytest.raises(WorkerCrashed, match="initializer raised RuntimeError") as caught:
            broken.submit(fx.add, 1, 1).result(GUARD_S)
        assert isinstance(caught.value, BrokenProcessPool)
        assert isinstance(caught.value.__cause__, RuntimeError)


def test_limits_left_unset_keep_the_executor_defaults(harness: Harness) -> None:
    ex = harness.executor(1, limits=Limits(wall_timeout_s=30))
    assert ex.submit(fx.open_files_limit).result(GUARD_S) == 256  # EXECUTOR_LIMITS
    wide = harness.executor(1, limits=Limits(max_open_files=512))
    assert wide.submit(fx.open_files_limit).result(GUARD_S) == 512


def test_preload_and_isolation_off(harness: Harness) -> None:
    ex = harness.executor(2, preload=["executor_functions", "json"], isolation="off")
    assert list(ex.map(fx.add, range(3), range(3))) == [0, 2, 4]
    assert ex.info()["profiles"]["default"][-2:] == ["executor_functions", "json"]


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        Executor(0)
    with pytest.raises(TypeError, match="initializer"):
        Executor(1, initializer=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="isolation"):
        Executor(1, isolation="sometimes")
    with pytest.raises(ConfigurationError, match="reuse"):
        Executor(1, reuse=0)
    with pytest.raises(ValueError, match="not both"):
        Executor(1, reuse=2, max_tasks_per_child=3)


# -- the reply format ---------------------------------------------------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary() | st.complex_numbers(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(st.text() | st.integers(-(2**63), 2**63) | st.binary(), children,
                      max_size=4)
    | st.frozensets(st.integers(-(2**63), 2**63) | st.text(), max_size=4)
    | st.sets(st.text(), max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_reply_format_round_trips_plain_data(value: Any) -> None:
    back = wire.loads(wire.dumps(value))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("data", [
    b"\xc1",                                                           # never used byte
    msgpack.packb(1) + msgpack.packb(2),                               # trailing data
    msgpack.packb({msgpack.ExtType(1, msgpack.packb([1])): 1}),         # tuple key
    msgpack.packb({msgpack.ExtType(5, (2**70).to_bytes(10, "big")): 1}),  # big int key
    msgpack.packb(msgpack.ExtType(2, msgpack.packb([[1]]))),           # unhashable element
    msgpack.packb(msgpack.ExtType(9, b"")),                            # unknown extension
    msgpack.packb(msgpack.ExtType(4, msgpack.packb(["a", "b"]))),      # malformed complex
])
def test_reply_format_refuses_what_a_hostile_worker_may_send(data: bytes) -> None:
    with pytest.raises(wire.InvalidReply):
        wire.loads(data)


# -- README -------------------------------------------------------------------------------------

def test_readme_executor_example_runs(tmp_path: Path) -> None:
    """The README's conversion example, as a script (its functions live in its __main__)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Executor: ProcessPoolExecutor", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from sandbox import Executor" in code
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "convert.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=GUARD_S, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"

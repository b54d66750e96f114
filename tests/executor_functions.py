"""Functions tests/test_executor.py runs in sandbox.Executor workers (a module of its own, so a
fresh worker imports this, not pytest)."""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import time
from typing import Any

_calls = [0]
_initialized: list[Any] = []


def add(a: Any, b: Any = 0) -> Any:
    return a + b


def identity(value: Any) -> Any:
    return value


def wait_gate(path: str) -> bytes:
    """Block until the test writes to (or closes) the FIFO ``path``; return what it wrote.
    Opening it for reading is what the test's blocking open for writing waits for: when that
    returns, this call is running in its worker."""
    with open(path, "rb") as f:
        return f.read()


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_key_error(key: Any) -> None:
    raise KeyError(key)


def raise_file_not_found() -> None:
    open("/nonexistent/file")  # noqa: SIM115


def raise_system_exit(code: int) -> None:
    sys.exit(code)


class CustomError(Exception):
    pass


def raise_custom(message: str) -> None:
    raise CustomError(message)


def segfault() -> None:
    ctypes.string_at(0)


def exit_abruptly(code: int) -> None:
    os._exit(code)


def allocate(n_bytes: int) -> int:
    block = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):  # touch every page
        block[i] = 1
    return len(block)


def spin() -> None:
    while True:
        pass


def big_result(n_bytes: int) -> bytes:
    return b"x" * n_bytes


def unsendable() -> object:
    return object()


def printer(text: str) -> int:
    print(text)
    print(text + " (stderr)", file=sys.stderr)
    return len(text)


def count_calls() -> int:
    """How many calls this worker process has served (its module's state survives reuse)."""
    _calls[0] += 1
    return _calls[0]


def initialize(value: Any) -> None:
    _initialized.append(value)


def initialized() -> list[Any]:
    return list(_initialized)


def failing_initializer() -> None:
    raise RuntimeError("the initializer failed")


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nested_executor() -> None:
    from sandbox import Executor

    Executor(1).submit(add, 1, 2)


def break_the_reply() -> None:
    """A hostile function: replaces the worker's encoder, so its reply is not valid msgpack."""
    from sandbox import executor_wire

    executor_wire.dumps = lambda value: b"\xc1 not msgpack"  # type: ignore[assignment]


def tuple_keys_reply() -> bytes:
    """A hostile function: the reply claims OK with a dict keyed by tuples (hash-collidable)."""
    import msgpack

    from sandbox import executor_wire

    tuple_key = msgpack.ExtType(1, msgpack.packb([1, 2]))
    reply = msgpack.packb([0, {tuple_key: 1}])
    executor_wire.dumps = lambda value: reply  # type: ignore[assignment]
    return b""


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def gate_or_value(x: Any) -> Any:
    """A path blocks on that gate (`wait_gate`); anything else comes back at once."""
    return wait_gate(x) if isinstance(x, str) else x

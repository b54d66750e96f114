"""The single-node asynchronous queue: SQLite in WAL mode, in the state directory.

One connection, used by one thread (the writer), so the event loop never blocks on the disk
and no two writers contend. The writer commits in groups: it takes every operation waiting
(submissions, claims, outcomes...), runs each in a savepoint of one transaction (an operation
that fails is rolled back alone), commits once, and only then answers them all, so under load
one fsync serves many operations and none is answered before it is durable.
``synchronous=FULL`` by default: a committed operation (an ``invoke_async`` answered with its
id) survives a SIGKILL of the supervisor and a power loss alike (``synchronous="NORMAL"``
keeps the first and may lose the last commits on the second).

The database (``async.sqlite3``) has one owner at a time, held by an ``flock`` on
``async.lock`` beside it: so at open every attempt still marked RUNNING belonged to a process
that is gone, and :class:`sandbox.asyncq.Dispatcher` records it CRASHED and retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox.asyncq import SqlQueue
from sandbox.errors import ConfigurationError

__all__ = ["DB_NAME", "SqliteQueue"]

DB_NAME = "async.sqlite3"
LOCK_NAME = "async.lock"


class SqliteQueue(SqlQueue):
    """The queue in ``<state_dir>/async.sqlite3``.

    Raises:
        ConfigurationError: another process has the queue open, or the database cannot be
            opened.
    """

    single_owner = True
    REAL = "REAL"

    def __init__(self, state_dir: str | os.PathLike[str], *, synchronous: str = "FULL",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigurationError(f"synchronous must be FULL, NORMAL or EXTRA, got "
                                     f"{synchronous!r}")
        self.root = Path(state_dir).resolve()
        self.path = self.root / DB_NAME
        self.description = f"sqlite:{self.path}"
        self.synchronous = synchronous.upper()
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        #: set in the writer thread while it runs a group (operations use savepoints)
        self._in_group = False
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        #: one transaction at a time on the one connection, whatever thread calls
        self._guard = threading.RLock()

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigurationError(f"the async queue in {self.root} is in use by another "
                                     "process") from None
        self._lock_fd = fd
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA foreign_keys=OFF")
            self._conn = conn
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
            super().open()
        except sqlite3.Error as exc:
            self.close()
            raise ConfigurationError(f"cannot open the async queue {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in the writer thread, in the next group commit; its answer comes once
        the group is durable."""
        if self._writer is None:
            with self._guard:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write, daemon=True,
                                                    name="sandbox-async-sqlite")
                    self._writer.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._ops.put(_Op(fn, args, kwargs, loop, future))
        return await future

    def _write(self) -> None:
        while True:
            first = self._ops.get()
            if first is None:
                return
            group = [first]
            while len(group) < GROUP_MAX:
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    self._ops.put(None)  # stop after this group
                    break
                group.append(op)
            self._run_group(group)

    def _run_group(self, group: list[_Op]) -> None:
        answers: list[tuple[_Op, Any, BaseException | None]] = []
        with self._guard:
            conn = self._conn
            if conn is None:
                error: BaseException = ConfigurationError("the async queue is closed")
                answers = [(op, None, error) for op in group]
            else:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    self._in_group = True
                    try:
                        for op in group:
                            conn.execute("SAVEPOINT op")
                            try:
                                value = op.fn(*op.args, **op.kwargs)
                            except BaseException as exc:
                                conn.execute("ROLLBACK TO op")
                                conn.execute("RELEASE op")
                                answers.append((op, None, exc))
                            else:
                                conn.execute("RELEASE op")
                                answers.append((op, value, None))
                    finally:
                        self._in_group = False
                    conn.execute("COMMIT")
                except BaseException as exc:  # the commit failed: nothing of the group holds
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    answers = [(op, None, exc) for op in group]
        for op, value, failure in answers:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                op.loop.call_soon_threadsafe(_answer, op.future, value, failure)

    def shutdown(self) -> None:
        """Finish the operations waiting, stop the writer, close the database."""
        writer = self._writer
        if writer is not None:
            self._ops.put(None)
            writer.join(timeout=60)
            self._writer = None
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        conn = self._conn
        if conn is None:
            raise ConfigurationError("the async queue is closed")
        if self._in_group and threading.current_thread() is self._writer:
            cur = conn.cursor()  # the group's savepoint holds this operation
            try:
                yield cur
            finally:
                cur.close()
            return
        with self._guard:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                conn.rollback()
                raise
            else:
                conn.commit()
            finally:
                cur.close()


#: The most operations one group commit holds.
GROUP_MAX = 256


class _Op:
    __slots__ = ("args", "fn", "future", "kwargs", "loop")

    def __init__(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.loop = loop
        self.future = future


def _answer(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)

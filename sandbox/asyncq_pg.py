"""The fleet's asynchronous queue: PostgreSQL, shared by every replica.

Tables ``sandbox_async_invocations`` and ``sandbox_async_attempts`` (created, or migrated, at
start under ``pg_advisory_xact_lock``), in the database of the fleet's function store. Any
replica claims due invocations with ``SELECT ... FOR UPDATE SKIP LOCKED`` (no two replicas
take the same one, and none waits for another's locks) and holds each attempt under a lease
(``lease_until``) that its dispatcher renews while the attempt runs. A replica that dies
mid-attempt stops renewing: once the lease expires, whichever replica claims next records the
attempt ``CRASHED`` and retries it as the policy allows. Submitting or re-queueing sends
``NOTIFY sandbox_async``; idle replicas ``LISTEN`` and claim at once instead of at their next
poll.

Submissions run concurrently (a pool of connections per replica): the bounds are checked in
each submission's transaction, so submissions in flight at the same moment may overshoot a
bound by at most their number (the pool's size, per replica); idempotency keys hold exactly (a
unique constraint).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

from sandbox.asyncq import SqlQueue
from sandbox.errors import ConfigurationError

__all__ = ["CHANNEL", "PostgresQueue"]

#: The NOTIFY channel.
CHANNEL = "sandbox_async"
#: The advisory lock key of schema changes ("sbxasync" in ASCII).
SCHEMA_LOCK = 0x736278_6173796E63 & 0x7FFFFFFFFFFFFFFF


class PostgresQueue(SqlQueue):
    """The queue in the PostgreSQL database at ``url`` (``postgresql://...``).

    Raises:
        ConfigurationError: the database cannot be reached at open.
    """

    LOCK = " FOR UPDATE SKIP LOCKED"
    LOCK_ROW = " FOR UPDATE"
    BLOB = "BYTEA"

    def __init__(self, url: str, *, min_connections: int = 1, max_connections: int = 8,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.description = _redact(url)
        self.min_connections = min_connections
        self.max_connections = max_connections
        self._pool: Any = None
        self._renewing = threading.Lock()
        self._listener: Any = None
        # Threads of its own: one per connection, and one for LISTEN.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_connections + 1, thread_name_prefix="sandbox-async-pg")

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self.close()
        self._executor.shutdown(wait=True)

    def open(self) -> None:
        import psycopg


        try:
            self._pool = self._new_pool()
            self._pool.open(wait=True, timeout=30.0)
            super().open()
        except (psycopg.Error, Exception) as exc:
            self.close()
            if isinstance(exc, ConfigurationError):
                raise
            raise ConfigurationError(f"cannot open the async queue in {self.description}: "
                                     f"{type(exc).__name__}: {exc}") from exc

    #: How long an operation waits for a connection before it fails (and is tried again).
    CONNECTION_TIMEOUT_S = 10.0

    def _new_pool(self) -> Any:
        from psycopg_pool import ConnectionPool

        from sandbox.pgstore import connection_kwargs

        return ConnectionPool(self.url, min_size=self.min_connections,
                              max_size=self.max_connections,
                              kwargs=connection_kwargs(self.url, autocommit=True),
                              open=False, check=_check, timeout=self.CONNECTION_TIMEOUT_S,
                              name="sandbox-async")

    def _renew_pool(self, failed: Any) -> None:
        """No connection came in time: a fresh pool, unless another thread made one already.
        (After a database restart, a pool whose reconnection attempts failed while the
        database was going down waits out a backoff that doubles up to minutes.)"""
        with self._renewing:
            if self._pool is not failed:
                return
            pool = self._new_pool()
            pool.open(wait=False)
            self._pool = pool
        with contextlib.suppress(Exception):
            failed.close(timeout=0)

    def _create_schema(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        super()._create_schema(cur)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.close()

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        from psycopg_pool import PoolTimeout

        pool = self._pool
        if pool is None:
            raise ConfigurationError("the async queue is closed")
        try:
            with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except PoolTimeout:
            self._renew_pool(pool)
            raise

    def _notify(self, cur: Any) -> None:
        cur.execute(f"NOTIFY {CHANNEL}")

    def wait_notified(self, timeout: float) -> bool:
        import psycopg

        from sandbox.pgstore import connection_kwargs

        if self._pool is None:
            return False
        if self._listener is None or self._listener.closed:
            self._listener = psycopg.connect(self.url, **connection_kwargs(
                self.url, autocommit=True, connect_timeout=10))
            self._listener.execute(f"LISTEN {CHANNEL}")
        got = False
        for _ in self._listener.notifies(timeout=timeout, stop_after=1):
            got = True
        return got


def _check(conn: Any) -> None:
    """The pool's check of a connection before handing it out, without a round trip (one per
    operation cost a third of a busy queue's throughput): an idle connection has nothing to
    read, so a readable socket means the server closed it or said why it is about to (a
    restart, an administrator's termination); the pool then makes another one. A peer that
    vanished silently is left to TCP keepalives and ``tcp_user_timeout``."""
    import select

    import psycopg

    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    if readable:
        conn.close()  # the pool discards it: a closed connection needs nothing more
        raise psycopg.OperationalError("the server closed the connection, or is closing it")


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.partition(":")[0]
    return f"{scheme}://{user}@{host}"

"""The function store of a fleet: functions, versions and bundles in PostgreSQL.

Every supervisor of a fleet points ``sandbox serve --store postgresql://...`` at one database.
A deploy, new version or delete made through any of them is committed there with a
``NOTIFY``, and every other supervisor, listening, reads the change and serves it (well within
a second). A supervisor started later reads everything at start. Nothing here is home-made
consensus: version numbers come from one row per name updated in the deploy's transaction, so
concurrent deploys of a name through two supervisors get two versions, never one lost.

Schema (versioned in ``sandbox_schema``; created or migrated at start, under an advisory lock,
so replicas starting together migrate once)::

    sandbox_functions (name PK, next_version)        version numbers are never reused
    sandbox_bundles   (digest PK, content, size)     content-addressed: stored once, however
                                                     many functions or versions use it
    sandbox_versions  (name, version) PK, digest FK  one deployed version (its metadata as
                      -> sandbox_bundles, meta jsonb the local index keeps it)

Each supervisor keeps a local mirror: a :class:`~sandbox.store.FunctionStore` in its own state
directory holding the versions the database has and their bundles (fetched once per digest).
Everything the runtime reads (functions, versions, bundle files) comes from that mirror, never
from the database on a call's path. So while the database is away, calls go on for every
function already mirrored, even across a restart of the supervisor; deploys and deletes fail
with :class:`StoreUnavailable` (gRPC ``UNAVAILABLE``) and a message that says so; and when the
database is back the listener reconnects, reads what changed meanwhile, and carries on.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox._logging import get_logger
from sandbox.errors import ConfigurationError, FunctionNotFound, StoreUnavailable
from sandbox.limits import Limits
from sandbox.store import FunctionStore, SourceFormat, StoredFunction, check_deploy

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ["SCHEMA_VERSION", "PostgresStore", "StoreUnavailable", "is_postgres_url",
           "redact"]

log = get_logger(__name__)

#: The notification channel every supervisor listens on.
CHANNEL = "sandbox_functions"
#: Serialises schema changes of replicas starting together (an arbitrary, fixed key).
_SCHEMA_LOCK_KEY = 0x5A4E_D80C

#: Schema migrations, in order: ``MIGRATIONS[n]`` takes the schema from version n to n + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sandbox_functions (
        name          text PRIMARY KEY,
        next_version  integer NOT NULL
    );
    CREATE TABLE sandbox_bundles (
        digest      text PRIMARY KEY CHECK (digest ~ '^[0-9a-f]{64}$'),
        content     bytea NOT NULL,
        size_bytes  bigint NOT NULL,
        created     timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE sandbox_versions (
        name     text NOT NULL REFERENCES sandbox_functions (name),
        version  integer NOT NULL,
        digest   text NOT NULL REFERENCES sandbox_bundles (digest),
        meta     jsonb NOT NULL,
        created  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, version)
    );
    CREATE INDEX sandbox_versions_digest ON sandbox_versions (digest);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

#: How long a deploy or delete waits for a database connection before it fails UNAVAILABLE.
CONNECT_TIMEOUT_S = 5.0
#: How long the first read at start may take before the mirror on disk is served instead.
START_TIMEOUT_S = 10.0
#: The listener's reconnection backoff, seconds: doubles from the first to the second.
RECONNECT_BACKOFF_S = (0.2, 5.0)
#: How often the idle listener asks the database something, so a connection that died
#: silently (a failover, a restart behind a partition) is noticed, and a full re-read done.
PING_EVERY_S = 10.0
#: libpq parameters of every connection: TCP keepalives notice a peer that is gone while the
#: connection is idle, ``tcp_user_timeout`` one that stops acknowledging what we send, and
#: ``statement_timeout`` a query the server never finishes; so none of these holds a deploy
#: (and the locks it holds) for the kernel's two hours. A URL's own values are kept.
LIVENESS: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                            "keepalives_count": 3, "tcp_user_timeout": 30_000}
STATEMENT_TIMEOUT_MS = 60_000
#: How long a liveness check (the listener's ping, the pool's check of a connection it hands
#: out) may wait for its answer before the connection is cut: this also catches a peer that
#: acknowledges every packet and answers nothing (a proxy or balancer whose backend is gone),
#: which no TCP timeout notices.
CHECK_TIMEOUT_S = 5.0
#: How long a deploy's or a delete's transaction may take before its socket is cut (the
#: server's own ``statement_timeout`` ends a query it sees; this, one it never answers).
TRANSACTION_TIMEOUT_S = STATEMENT_TIMEOUT_MS / 1000 + 30.0


@contextlib.contextmanager
def answered_within(conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Cut ``conn``'s socket if the block has not finished within ``seconds``: a read blocked
    on it then fails at once (``OperationalError``) instead of waiting forever."""
    import os
    import socket

    def cut() -> None:
        with contextlib.suppress(Exception), \
                socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _check(conn: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection before handing it out, answered within
    :data:`CHECK_TIMEOUT_S` (or the connection is discarded, and another one made)."""
    from psycopg_pool import ConnectionPool

    with answered_within(conn, CHECK_TIMEOUT_S):
        ConnectionPool.check_connection(conn)


class _SchemaError(ConfigurationError):
    """The database's schema is one this version cannot use: fatal for the store."""


def connection_kwargs(url: str, *, statement_timeout: bool = True, **kwargs: Any
                      ) -> dict[str, Any]:
    """``kwargs`` plus :data:`LIVENESS` and (unless ``statement_timeout`` is False) the
    statement timeout, less what ``url`` sets."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    extra = {k: v for k, v in LIVENESS.items() if k not in given}
    options = str(given.get("options", ""))
    if statement_timeout and "statement_timeout" not in options:
        extra["options"] = f"{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
    return {**extra, **kwargs}


def is_postgres_url(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except Exception:  # a URL psycopg cannot parse: show nothing of it
        return "postgresql://<unparsable>"
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host", "")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"


Listener = Callable[[list[StoredFunction], list[StoredFunction]], None]


class PostgresStore:
    """Functions in PostgreSQL, mirrored under ``state_dir``. Thread-safe.

    Reads (:meth:`get`, :meth:`versions`, :meth:`functions`, :meth:`bundle_path`) are served
    by the local mirror. :meth:`deploy` and :meth:`delete` are transactions in the database
    (then applied to the mirror at once). Changes made by other supervisors reach the mirror
    through a listener thread, and each one that does is passed to the callbacks given to
    :meth:`watch` as ``(added, removed)``.

    Args:
        url: ``postgresql://user:password@host:port/dbname`` (any libpq URL or parameters).
        state_dir: this supervisor's own directory for the mirror (locked while open).
        node: this supervisor's name, sent with its notifications (for the logs).
        max_source_bytes: largest source accepted (as the local store).
        start_timeout_s: how long the first read may take before the mirror on disk is
            served instead (the listener goes on trying).

    Raises:
        ConfigurationError: the state directory is in use, or the database's schema is newer
            than this version understands.
    """

    def __init__(self, url: str, state_dir: str | Path, *, node: str = "",
                 max_source_bytes: int = 64 * 1024 * 1024,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(url)
        except Exception:  # refused here, before a pool logs the text (and its password)
            raise ConfigurationError(
                "the function store's URL is not a valid PostgreSQL connection URL "
                "(postgresql://user:password@host:port/dbname; a password's special "
                "characters percent-encoded)") from None
        self.url = url
        self.node = node
        self.cache = FunctionStore(state_dir, max_source_bytes=max_source_bytes)
        self.root = self.cache.root
        self._sync = threading.Lock()  # one change of the mirror at a time: refresh or ours
        self._listeners: list[Listener] = []
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._pool: ConnectionPool[Any] = self._new_pool()
        self._thread = threading.Thread(target=self._listen, name="sandbox-store-listener",
                                        daemon=True)
        self._thread.start()
        if not self._connected.wait(start_timeout_s) and not self._closed.is_set():
            log.error("the function store %s cannot be reached; serving the %d function "
                      "versions mirrored in %s until it can (deploys fail meanwhile)",
                      redact(url), len(self.cache.functions(all_versions=True)), self.root,
                      extra={"event": "store_unavailable", "fields": {"store": redact(url)}})
        if self._schema_error is not None:
            self.close()
            raise self._schema_error

    _schema_error: ConfigurationError | None = None
    _outage = False  # the listener has failed to connect since it last was

    def _new_pool(self) -> ConnectionPool[Any]:
        from psycopg_pool import ConnectionPool

        pool: ConnectionPool[Any] = ConnectionPool(
            self.url, min_size=1, max_size=4, open=False, timeout=CONNECT_TIMEOUT_S,
            check=_check, name="sandbox-store",
            reconnect_timeout=RECONNECT_BACKOFF_S[1] * 6,
            kwargs=connection_kwargs(self.url, connect_timeout=int(CONNECT_TIMEOUT_S),
                                      autocommit=False,
                                      application_name=f"sandbox {self.node}".strip()))
        pool.open(wait=False)
        return pool

    def _renew_pool(self) -> None:
        """The database is back: a fresh pool, rather than one waiting out the doubling
        backoff its reconnection attempts reached while the database was away."""
        old, self._pool = self._pool, self._new_pool()
        old.close(timeout=0)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop listening, close the connections, release the state directory. Idempotent."""
        self._closed.set()
        self._thread.join(10.0)
        self._pool.close(timeout=5.0)
        self.cache.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return redact(self.url)

    @property
    def connected(self) -> bool:
        """Whether the listener is connected now (the mirror follows the database)."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the listener is connected (True), or ``timeout`` seconds (False)."""
        return self._connected.wait(timeout) and not self._closed.is_set()

    def watch(self, listener: Listener) -> None:
        """Call ``listener(added, removed)`` (from the listener's thread) after each change
        made by another supervisor reaches the mirror."""
        self._listeners.append(listener)

    # -- reads: the mirror -------------------------------------------------------------------
    def bundle_path(self, fn: StoredFunction) -> Path:
        return self.cache.bundle_path(fn)

    def get(self, name: str, version: int | None = None) -> StoredFunction:
        return self.cache.get(name, version)

    def versions(self, name: str) -> list[int]:
        return self.cache.versions(name)

    def functions(self, all_versions: bool = False) -> list[StoredFunction]:
        return self.cache.functions(all_versions)

    # -- changes: the database ---------------------------------------------------------------
    def deploy(self, name: str, source: bytes, *, handler: str = "",
               preload: Sequence[str] = (), limits: Limits | None = None,
               source_format: SourceFormat | None = None, created: float | None = None,
               reuse: int = 1, async_policy: dict[str, Any] | None = None) -> StoredFunction:
        """Store the bundle (once per digest) and the next version of ``name``; or, when the
        latest version of ``name`` is already exactly this deployment (source, handler,
        preload, limits, reuse: a retried deploy whose first attempt landed, through this
        replica or another), return that version.

        Raises:
            InvalidRequest: as the local store.
            StoreUnavailable: the database cannot be reached; nothing was deployed.
        """
        import psycopg
        from psycopg.types.json import Jsonb

        handler, preload_t, fmt, digest, reuse = check_deploy(
            name, source, handler=handler, preload=preload, source_format=source_format,
            reuse=reuse, check_zip=self.cache._check_zip,
            max_source_bytes=self.cache.max_source_bytes)
        template = StoredFunction(
            name=name, version=0, digest=digest, handler=handler, preload=preload_t,
            limits=limits if limits is not None else Limits(),
            created=time.time() if created is None else created, source_format=fmt,
            source_size_bytes=len(source), reuse=reuse, async_policy=async_policy)
        with self._sync:
            existing: StoredFunction | None = None
            for attempt in range(3):
                try:
                    with self._transaction() as conn:
                        # The name's row, locked: deploys of one name take turns from here.
                        conn.execute("INSERT INTO sandbox_functions (name, next_version) "
                                     "VALUES (%s, 1) ON CONFLICT (name) DO NOTHING", (name,))
                        conn.execute("SELECT 1 FROM sandbox_functions WHERE name = %s "
                                     "FOR UPDATE", (name,))
                        latest = conn.execute(
                            "SELECT meta FROM sandbox_versions WHERE name = %s "
                            "ORDER BY version DESC LIMIT 1", (name,)).fetchone()
                        if latest is not None and _same_deployment(
                                StoredFunction.from_dict(name, latest[0]), template):
                            # Idempotent: a retried deploy whose first attempt landed
                            # (through any replica) gets that version, not a second one.
                            existing = StoredFunction.from_dict(name, latest[0])
                            break
                        have = conn.execute("SELECT 1 FROM sandbox_bundles WHERE digest = %s",
                                            (digest,)).fetchone()
                        if have is None:
                            conn.execute(
                                "INSERT INTO sandbox_bundles (digest, content, size_bytes) "
                                "VALUES (%s, %s, %s) ON CONFLICT (digest) DO NOTHING",
                                (digest, source, len(source)))
                        row = conn.execute(
                            "UPDATE sandbox_functions SET next_version = next_version + 1 "
                            "WHERE name = %s RETURNING next_version - 1", (name,)).fetchone()
                        assert row is not None
                        fn = _with_version(template, int(row[0]))
                        conn.execute(
                            "INSERT INTO sandbox_versions (name, version, digest, meta) "
                            "VALUES (%s, %s, %s, %s)",
                            (name, fn.version, digest, Jsonb(fn.to_dict())))
                        self._notify(conn, "deploy", name, [fn.version])
                    break
                except psycopg.errors.ForeignKeyViolation:
                    # A delete elsewhere removed the bundle between our check and our
                    # version's insert: the transaction rolled back; do it again.
                    if attempt == 2:
                        raise
            if existing is not None:
                if (existing.name, existing.version) not in {
                        (f.name, f.version) for f in self.cache.functions(all_versions=True)}:
                    self._apply_ours(added=[(existing, source)])
                return existing
            self._apply_ours(added=[(fn, source)])
        log.info("deployed %s version %d (%s, %d bytes) to %s", name, fn.version, digest[:12],
                 len(source), self.describe())
        return fn

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version, or every version, of ``name``; returns the versions deleted.

        Raises:
            FunctionNotFound: the database has no such function or version.
            StoreUnavailable: the database cannot be reached; nothing was deleted.
        """
        import psycopg

        with self._sync:
            with self._transaction() as conn:
                if version is None:
                    rows = conn.execute("DELETE FROM sandbox_versions WHERE name = %s "
                                        "RETURNING version, digest", (name,)).fetchall()
                else:
                    rows = conn.execute("DELETE FROM sandbox_versions WHERE name = %s AND "
                                        "version = %s RETURNING version, digest",
                                        (name, version)).fetchall()
                if not rows:
                    raise FunctionNotFound(f"no function named {name!r}" if version is None
                                           else f"function {name!r} has no version {version}")
                deleted = sorted(int(r[0]) for r in rows)
                self._notify(conn, "delete", name, deleted)
            # Bundles nobody uses any more; a deploy elsewhere reusing one meanwhile keeps it
            # (its version's foreign key makes our delete of that row fail, harmlessly).
            digests = sorted({str(r[1]) for r in rows})
            with contextlib.suppress(psycopg.errors.ForeignKeyViolation,
                                     StoreUnavailable), self._transaction() as conn:
                conn.execute("DELETE FROM sandbox_bundles b WHERE b.digest = ANY(%s) AND NOT "
                             "EXISTS (SELECT 1 FROM sandbox_versions v WHERE v.digest = "
                             "b.digest)", (digests,))
            gone = [fn for fn in self.cache.functions(all_versions=True)
                    if fn.name == name and fn.version in deleted]
            self._apply_ours(removed=gone)
        return deleted

    # -- internals ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection in a transaction (committed on success); the database's absence is
        :class:`StoreUnavailable`."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._closed.is_set():
            raise ConfigurationError("the function store is closed")
        # Known to be away: fail fast rather than hold the caller for the whole timeout.
        timeout = CONNECT_TIMEOUT_S if self._connected.is_set() else 1.0
        try:
            with self._pool.connection(timeout) as conn, \
                    answered_within(conn, TRANSACTION_TIMEOUT_S), conn.transaction():
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailable(
                f"the function store {self.describe()} is unavailable ({_first_line(exc)}); "
                "nothing was changed: try again when it is back (calls of deployed functions "
                "go on meanwhile)") from exc
        except psycopg.OperationalError as exc:
            # Lost during the transaction: its commit may or may not have landed.
            raise StoreUnavailable(
                f"the function store {self.describe()} is unavailable ({_first_line(exc)}); "
                "the change may not have been made: look before doing it again (a Deploy "
                "repeated is idempotent; calls of deployed functions go on meanwhile)"
                ) from exc

    def _notify(self, conn: psycopg.Connection[Any], op: str, name: str,
                versions: list[int]) -> None:
        payload = json.dumps({"op": op, "name": name, "versions": versions, "node": self.node})
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def _apply_ours(self, added: Sequence[tuple[StoredFunction, bytes]] = (),
                    removed: Sequence[StoredFunction] = ()) -> None:
        """Our own committed change, into the mirror at once (the caller holds ``_sync``)."""
        sources = {fn.digest: source for fn, source in added}
        gone = {(fn.name, fn.version) for fn in removed}
        now = [fn for fn in self.cache.functions(all_versions=True)
               if (fn.name, fn.version) not in gone]
        now.extend(fn for fn, _ in added)
        nexts = {fn.name: fn.version + 1 for fn, _ in added}
        self.cache.mirror(now, nexts, lambda digests: {d: sources[d] for d in digests
                                                       if d in sources})

    def _refresh(self, conn: psycopg.Connection[Any], names: set[str] | None = None) -> None:
        """Read the versions of ``names`` (every name when None: at start and after a
        reconnection) from the database into the mirror; tell the listeners what changed.
        A notification names its function, so a deploy costs a read of that function's
        versions, not of the whole store."""
        with self._sync, conn.transaction():
            # One snapshot for the versions and their bundles (the listener's connection is
            # REPEATABLE READ): a delete committed between two reads cannot leave a version
            # whose bundle is gone. Bundles are fetched here, not under the mirror's lock,
            # which the event loop's reads take.
            if names is None:
                rows = conn.execute("SELECT name, meta FROM sandbox_versions "
                                    "ORDER BY name, version").fetchall()
                nexts = dict(conn.execute("SELECT name, next_version FROM "
                                          "sandbox_functions").fetchall())
            else:
                wanted = sorted(names)
                rows = conn.execute("SELECT name, meta FROM sandbox_versions WHERE name = "
                                    "ANY(%s) ORDER BY name, version", (wanted,)).fetchall()
                nexts = dict(conn.execute("SELECT name, next_version FROM "
                                          "sandbox_functions WHERE name = ANY(%s)",
                                          (wanted,)).fetchall())
            functions = [] if names is None else [
                fn for fn in self.cache.functions(all_versions=True) if fn.name not in names]
            for name, meta in rows:
                try:
                    functions.append(StoredFunction.from_dict(name, meta))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("function %s: unreadable version in the store, skipped: %s",
                              name, exc)

            missing = sorted({fn.digest for fn in self.cache.unmirrored(functions)})
            fetched = {str(d): bytes(c) for d, c in conn.execute(
                "SELECT digest, content FROM sandbox_bundles WHERE digest = ANY(%s)",
                (missing,)).fetchall()} if missing else {}
            added, removed = self.cache.mirror(
                functions, nexts,
                lambda digests: {d: fetched[d] for d in digests if d in fetched})
        if added or removed:
            log.info("function store: %d version(s) added, %d removed by other nodes",
                     len(added), len(removed),
                     extra={"event": "store_sync", "fields": {
                         "added": [f"{f.name}@{f.version}" for f in added],
                         "removed": [f"{f.name}@{f.version}" for f in removed]}})
            for listener in list(self._listeners):
                try:
                    listener(added, removed)
                except Exception:
                    log.exception("a function store listener failed")

    def _listen(self) -> None:
        """The listener thread: connect, migrate, LISTEN, read everything, then re-read on
        every notification; on any connection failure, back off and start again."""
        import psycopg

        backoff = RECONNECT_BACKOFF_S[0]
        while not self._closed.is_set():
            try:
                # No statement timeout here: a replica's first read fetches every bundle,
                # which may take long on a big store; its pings have their own 5 s cut.
                with psycopg.connect(self.url, **connection_kwargs(
                        self.url, statement_timeout=False, autocommit=True,
                        connect_timeout=int(CONNECT_TIMEOUT_S),
                        application_name=f"sandbox {self.node} listener".strip())) as conn:
                    _migrate(conn)
                    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._refresh(conn)
                    if self._outage:
                        self._renew_pool()
                        self._outage = False
                    if not self._connected.is_set():
                        log.info("function store: %s (schema %d), %d function versions",
                                 self.describe(), SCHEMA_VERSION,
                                 len(self.cache.functions(all_versions=True)),
                                 extra={"event": "store_connected",
                                        "fields": {"store": self.describe()}})
                    self._connected.set()
                    backoff = RECONNECT_BACKOFF_S[0]
                    pinged = time.monotonic()
                    while not self._closed.is_set():
                        # Back at once with the first notification (the others queued
                        # meanwhile are read by the same refresh, or wake the next turn);
                        # at least every half second to notice close().
                        names: set[str] = set()
                        for note in conn.notifies(timeout=0.5, stop_after=1):
                            names.add(_notified_name(note.payload))
                        if names:
                            self._refresh(conn, None if "" in names else names)
                        elif time.monotonic() - pinged >= PING_EVERY_S:
                            with answered_within(conn, CHECK_TIMEOUT_S):
                                conn.execute("SELECT 1")  # a dead connection fails here
                            pinged = time.monotonic()
            except _SchemaError as exc:  # a schema we do not understand: fatal
                self._schema_error = exc
                self._closed.set()
                self._connected.set()
                return
            except ConfigurationError as exc:
                # The mirror could not take a change (a bundle that does not match its
                # digest): said, and read again from the start after the backoff.
                log.error("function store %s: %s; reading it again", self.describe(), exc,
                          extra={"event": "store_sync_failed",
                                 "fields": {"store": self.describe(), "error": str(exc)}})
                self._closed.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])
            except (psycopg.Error, OSError) as exc:
                if self._closed.is_set():
                    return
                if self._connected.is_set():
                    log.error("function store %s unreachable (%s): serving the mirror; "
                              "reconnecting", self.describe(), _first_line(exc),
                              extra={"event": "store_unavailable",
                                     "fields": {"store": self.describe()}})
                self._connected.clear()
                self._outage = True
                self._closed.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])
            except Exception:
                log.exception("function store listener failed; restarting it")
                self._closed.wait(backoff)


def _migrate(conn: psycopg.Connection[Any]) -> None:
    """Create or migrate the schema to :data:`SCHEMA_VERSION` (one replica at a time)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS sandbox_schema (version integer NOT NULL)")
        row = conn.execute("SELECT version FROM sandbox_schema").fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise _SchemaError(
                f"the function store's schema is version {current}, newer than this sandbox "
                f"understands ({SCHEMA_VERSION}): upgrade sandbox on this node")
        for step in range(current, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[step])
            log.info("function store schema migrated to version %d", step + 1)
        if row is None:
            conn.execute("INSERT INTO sandbox_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        elif current != SCHEMA_VERSION:
            conn.execute("UPDATE sandbox_schema SET version = %s", (SCHEMA_VERSION,))


def _notified_name(payload: str) -> str:
    """The function a notification names ("" when it cannot be read: re-read everything)."""
    try:
        name = json.loads(payload).get("name")
    except (ValueError, AttributeError):
        return ""
    return name if isinstance(name, str) else ""


def _same_deployment(a: StoredFunction, b: StoredFunction) -> bool:
    """Whether two versions are one deployment: everything but the version number, the time
    and the size (which the digest decides) is equal."""
    import dataclasses

    return dataclasses.replace(a, version=0, created=0.0) == dataclasses.replace(
        b, version=0, created=0.0)


def _with_version(fn: StoredFunction, version: int) -> StoredFunction:
    import dataclasses

    return dataclasses.replace(fn, version=version)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

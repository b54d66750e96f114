"""The fleet's function store on a real PostgreSQL (tests/postgres.py), without servers.

Two :class:`PostgresStore` objects on one database stand for two supervisors: what one deploys
or deletes reaches the other through LISTEN/NOTIFY (waited for on an event, never a sleep);
concurrent deploys of one name get distinct versions; a bundle is stored once; the schema is
versioned; and while the database is away, reads go on from the mirror, changes fail with a
clear ``StoreUnavailable``, and the store recovers by itself.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import ConfigurationError, FunctionNotFound, InvalidRequest, StoreUnavailable
from sandbox.limits import Limits
from sandbox.pgstore import SCHEMA_VERSION, PostgresStore, redact
from sandbox.store import FunctionStore, StoredFunction

psycopg = pytest.importorskip("psycopg")

#: Deadlock guard for a change to reach another store (it takes milliseconds).
PROPAGATION_TIMEOUT_S = 30.0

SOURCE_1 = b"def handler(event, context):\n    return 1\n"
SOURCE_2 = b"def handler(event, context):\n    return 2\n"


class Changes:
    """Records what a store's listener reports; :meth:`wait_for` waits on it."""

    def __init__(self, store: PostgresStore) -> None:
        self.cond = threading.Condition()
        self.added: list[tuple[str, int]] = []
        self.removed: list[tuple[str, int]] = []
        store.watch(self)

    def __call__(self, added: list[StoredFunction], removed: list[StoredFunction]) -> None:
        with self.cond:
            self.added += [(f.name, f.version) for f in added]
            self.removed += [(f.name, f.version) for f in removed]
            self.cond.notify_all()

    def wait_for(self, *, added: tuple[str, int] | None = None,
                 removed: tuple[str, int] | None = None) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: (added is None or added in self.added)
                                    and (removed is None or removed in self.removed),
                                    PROPAGATION_TIMEOUT_S)
        assert ok, f"not propagated: added {added}, removed {removed}"


@pytest.fixture
def url(postgres: Any) -> str:
    return str(postgres.database())


@pytest.fixture
def two(url: str, tmp_path: Path) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    a = PostgresStore(url, tmp_path / "a", node="a")
    b = PostgresStore(url, tmp_path / "b", node="b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def rows(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(query, args).fetchall())


def test_a_deploy_reaches_the_other_store_with_its_bundle(
        two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    seen = Changes(b)
    fn = a.deploy("hello", SOURCE_1, limits=Limits(wall_timeout_s=3.0), preload=["json"],
                  reuse=5)
    assert (fn.version, fn.digest) == (1, hashlib.sha256(SOURCE_1).hexdigest())
    assert a.get("hello") == fn, "the deploying store has it at once"
    seen.wait_for(added=("hello", 1))
    theirs = b.get("hello")
    assert theirs == fn
    assert b.bundle_path(theirs).read_bytes() == SOURCE_1
    assert b.bundle_path(theirs).is_relative_to(b.root)
    assert (theirs.limits.wall_timeout_s, theirs.preload, theirs.reuse) == (3.0, ("json",), 5)


def test_versions_deletes_and_bundles_stored_once(
        url: str, two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    seen = Changes(b)
    a.deploy("one", SOURCE_1)
    a.deploy("two", SOURCE_1)  # the same bytes under another name
    a.deploy("one", SOURCE_2)
    seen.wait_for(added=("one", 2))
    assert rows(url, "SELECT count(*) FROM sandbox_bundles") == [(2,)]
    assert b.versions("one") == [1, 2] and b.versions("two") == [1]
    assert b.delete("one", 1) == [1]
    with pytest.raises(FunctionNotFound, match="no version 1"):
        b.delete("one", 1)
    a_seen = Changes(a)
    b.delete("one")
    a_seen.wait_for(removed=("one", 2))
    assert a.versions("one") == []
    with pytest.raises(FunctionNotFound):
        a.get("one")
    # SOURCE_1 is still used by "two"; SOURCE_2 was used by no one else: gone, here and there.
    assert rows(url, "SELECT digest FROM sandbox_bundles") == [
        (hashlib.sha256(SOURCE_1).hexdigest(),)]
    assert not (a.root / "bundles" / hashlib.sha256(SOURCE_2).hexdigest()).exists()
    # Version numbers are never reused, even after every version was deleted.
    assert a.deploy("one", SOURCE_2).version == 3


def test_concurrent_deploys_of_one_name_through_two_stores_lose_no_version(
        url: str, two: tuple[PostgresStore, PostgresStore]) -> None:
    stores = two
    per_thread = 15
    versions: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def deploy(store: PostgresStore, n: int) -> None:
        start.wait(30)
        for i in range(per_thread):
            source = f"def handler(event, context):\n    return {n * 100 + i}\n".encode()
            v = store.deploy("contended", source).version
            with lock:
                versions.append(v)

    threads = [threading.Thread(target=deploy, args=(stores[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(versions) == list(range(1, 4 * per_thread + 1))
    assert rows(url, "SELECT count(*) FROM sandbox_versions WHERE name = 'contended'") == [
        (4 * per_thread,)]


def test_bad_deploys_are_refused_before_the_database(
        url: str, two: tuple[PostgresStore, PostgresStore]) -> None:
    a, _ = two
    with pytest.raises(InvalidRequest, match="invalid function name"):
        a.deploy("../x", SOURCE_1)
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        a.deploy("x", b"\xff\xfe")
    assert rows(url, "SELECT count(*) FROM sandbox_versions") == [(0,)]


def test_a_store_started_later_serves_everything(url: str, tmp_path: Path) -> None:
    with PostgresStore(url, tmp_path / "a") as a:
        a.deploy("early", SOURCE_1)
        a.deploy("early", SOURCE_2)
    with PostgresStore(url, tmp_path / "late") as late:
        assert late.versions("early") == [1, 2]
        assert late.bundle_path(late.get("early", 2)).read_bytes() == SOURCE_2


def test_schema_is_versioned_and_a_newer_one_is_refused(url: str, tmp_path: Path) -> None:
    with PostgresStore(url, tmp_path / "a"):
        pass
    assert rows(url, "SELECT version FROM sandbox_schema") == [(SCHEMA_VERSION,)]
    with PostgresStore(url, tmp_path / "b"):  # a second start migrates nothing
        pass
    assert rows(url, "SELECT count(*) FROM sandbox_schema") == [(1,)]
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE sandbox_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigurationError, match="newer than this sandbox understands"):
        PostgresStore(url, tmp_path / "c")
    # the refused store released its state directory
    FunctionStore(tmp_path / "c").close()


def test_the_state_directory_is_one_servers(url: str, tmp_path: Path) -> None:
    with PostgresStore(url, tmp_path / "a"), pytest.raises(ConfigurationError, match="in use"):
        PostgresStore(url, tmp_path / "a")


def test_redact_hides_the_password() -> None:
    assert redact("postgresql://u:secret@db.example:5433/fns") == (
        "postgresql://u@db.example:5433/fns")
    assert "secret" not in redact("postgresql://u:secret@/fns?host=/run/pg")


def test_database_down_reads_go_on_changes_fail_clearly_recovery_is_automatic(
        tmp_path: Path) -> None:
    from postgres import Postgres, unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with Postgres() as pg:
        url = pg.database()
        with PostgresStore(url, tmp_path / "a", node="a") as a, \
                PostgresStore(url, tmp_path / "b", node="b") as b:
            seen = Changes(b)
            a.deploy("kept", SOURCE_1)
            seen.wait_for(added=("kept", 1))
            pg.stop()
            # Reads are the mirror's.
            assert b.get("kept").version == 1 and b.bundle_path(b.get("kept")).is_file()
            with pytest.raises(StoreUnavailable, match="unavailable.*nothing was changed"):
                a.deploy("new", SOURCE_2)
            with pytest.raises(StoreUnavailable):
                b.delete("kept")
            # A supervisor restarted meanwhile serves its mirror.
            b.close()
            with PostgresStore(url, tmp_path / "b", node="b", start_timeout_s=0.5) as b2:
                assert b2.get("kept").version == 1
                assert not b2.connected
                b2_seen = Changes(b2)
                pg.start()
                # Recovery: the listeners reconnect by themselves; then deploys work again.
                assert a.wait_connected(PROPAGATION_TIMEOUT_S)
                assert b2.wait_connected(PROPAGATION_TIMEOUT_S)
                assert a.deploy("new", SOURCE_2).version == 1
                b2_seen.wait_for(added=("new", 1))
                assert b2.connected
                assert b2.bundle_path(b2.get("new")).read_bytes() == SOURCE_2


def test_a_deploy_identical_to_the_latest_returns_it_through_any_store(
        url: str, two: tuple[PostgresStore, PostgresStore]) -> None:
    """Deploy is idempotent fleet-wide: a retried deploy whose first attempt landed through
    another replica (whose news this one may not have yet) gets that version."""
    a, b = two
    first = a.deploy("same", SOURCE_1, limits=Limits(wall_timeout_s=2.0))
    again = b.deploy("same", SOURCE_1, limits=Limits(wall_timeout_s=2.0))
    assert again == first and b.get("same") == first
    # Anything different is a new version, and so is an older source deployed again.
    assert b.deploy("same", SOURCE_1, limits=Limits(wall_timeout_s=3.0)).version == 2
    assert a.deploy("same", SOURCE_2).version == 3
    assert a.deploy("same", SOURCE_1, limits=Limits(wall_timeout_s=2.0)).version == 4
    # Many identical deploys at once, through both: one version.
    source = b"def handler(event, context):\n    return 'once'\n"
    start = threading.Barrier(6)
    got: list[int] = []

    def deploy(store: PostgresStore) -> None:
        start.wait(30)
        got.append(store.deploy("racing", source).version)

    threads = [threading.Thread(target=deploy, args=(two[n % 2],)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [1] * 6
    assert rows(url, "SELECT count(*) FROM sandbox_versions WHERE name = 'racing'") == [(1,)]


def test_a_delete_between_a_refresh_and_its_bundles_does_not_stop_the_follower(
        two: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """B deletes a version (and its bundle) just after A read that version and before A
    fetched its bundle. A reads both in one snapshot: it mirrors the version, then the delete,
    and goes on following (before, the missing bundle stopped its listener for good)."""
    a, b = two
    seen = Changes(a)
    real = a.cache.unmirrored
    raced = threading.Event()

    def racing(functions: list[StoredFunction]) -> list[StoredFunction]:
        if not raced.is_set() and any(f.name == "x" for f in functions):
            raced.set()
            b.delete("x")  # committed between A's read of the versions and of the bundles
        return real(functions)

    monkeypatch.setattr(a.cache, "unmirrored", racing)
    b.deploy("x", SOURCE_1)
    seen.wait_for(added=("x", 1), removed=("x", 1))
    assert raced.is_set() and a.connected
    b.deploy("after", SOURCE_2)
    seen.wait_for(added=("after", 1))
    assert a.deploy("mine", SOURCE_1).version == 1  # and A's own changes go on


def test_a_bundle_fetch_held_up_does_not_hold_up_reads_of_the_mirror(
        two: tuple[PostgresStore, PostgresStore], url: str) -> None:
    """A's listener waits for a bundle (the table locked by another session): meanwhile its
    mirror answers reads at once (the server's event loop reads it)."""
    a, b = two
    b.deploy("kept", SOURCE_1)
    Changes(a).wait_for(added=("kept", 1))
    digest = hashlib.sha256(SOURCE_2).hexdigest()
    meta = {**b.get("kept").to_dict(), "version": 1, "digest": digest,
            "source_size_bytes": len(SOURCE_2)}
    with psycopg.connect(url, autocommit=True) as conn:  # the bundle, before the lock
        conn.execute("INSERT INTO sandbox_bundles (digest, content, size_bytes) VALUES "
                     "(%s, %s, %s)", (digest, SOURCE_2, len(SOURCE_2)))
    locker = psycopg.connect(url)
    try:
        locker.execute("LOCK TABLE sandbox_bundles IN ACCESS EXCLUSIVE MODE")
        # A version of it, and the notification that makes A fetch it (the foreign key's
        # check would wait on the lock too: off for this session).
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("INSERT INTO sandbox_functions VALUES ('late', 2)")
            conn.execute("INSERT INTO sandbox_versions (name, version, digest, meta) VALUES "
                         "('late', 1, %s, %s)", (digest, psycopg.types.json.Jsonb(meta)))
            conn.execute("SELECT pg_notify('sandbox_functions', '{\"name\": \"late\"}')")
            deadline = PROPAGATION_TIMEOUT_S
            waiting: list[Any] = []
            for _ in range(int(deadline * 20)):
                waiting = conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'sandbox a "
                    "listener' AND wait_event_type = 'Lock'").fetchall()
                if waiting:
                    break
                threading.Event().wait(0.05)
            assert waiting, "A's listener never waited for the bundle"
        answered: list[StoredFunction] = []
        reader = threading.Thread(target=lambda: answered.append(a.get("kept")))
        reader.start()
        reader.join(10)
        assert answered and answered[0].name == "kept"  # while the fetch still waits
    finally:
        locker.close()


def test_a_connection_that_stops_answering_is_noticed_and_replaced(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reaches the database through a relay that, at some point, keeps every connection
    open and answers nothing (a balancer whose backend is gone: TCP sees nothing wrong). A's
    listener notices it at its next ping, reconnects and re-reads; a deploy through A is not
    held on a dead connection."""
    import select
    import socket

    import sandbox.pgstore as pgstore

    monkeypatch.setattr(pgstore, "PING_EVERY_S", 0.5)
    monkeypatch.setattr(pgstore, "CHECK_TIMEOUT_S", 1.0)
    host, port = psycopg.conninfo.conninfo_to_dict(url)["host"], \
        int(psycopg.conninfo.conninfo_to_dict(url)["port"])
    listener = socket.create_server(("127.0.0.1", 0))
    silenced: set[socket.socket] = set()
    pairs: list[tuple[socket.socket, socket.socket]] = []
    stop = threading.Event()

    def pump(client: socket.socket, upstream: socket.socket) -> None:
        with client, upstream:
            while not stop.is_set() and client not in silenced:
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                for sock in ready:
                    if client in silenced:
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
            stop.wait()  # silenced: held open, never answered

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((host, port))
            pairs.append((client, upstream))
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()

    relay = threading.Thread(target=accept, daemon=True)
    relay.start()
    relayed = url.replace(f":{port}/", f":{listener.getsockname()[1]}/")
    try:
        with PostgresStore(relayed, tmp_path / "a", node="a") as a, \
                PostgresStore(url, tmp_path / "b", node="b") as b:
            seen = Changes(a)
            b.deploy("before", SOURCE_1)
            seen.wait_for(added=("before", 1))
            silenced.update(client for client, _ in pairs)  # every connection so far
            b.deploy("after", SOURCE_1)
            seen.wait_for(added=("after", 1))  # through a new connection, after a re-read
            assert a.wait_connected(PROPAGATION_TIMEOUT_S)
            assert a.deploy("mine", SOURCE_2).version == 1  # on a fresh pool
    finally:
        stop.set()
        listener.close()


def test_an_unparsable_url_is_refused_without_showing_its_password(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "My%zzSecret"
    with pytest.raises(ConfigurationError, match="not a valid PostgreSQL connection URL") as exc:
        PostgresStore(f"postgresql://u:{secret}@127.0.0.1:1/db", tmp_path / "a",
                      start_timeout_s=1.0)
    assert secret not in str(exc.value)
    assert not [r for r in caplog.records if secret in r.getMessage()]


def test_a_change_made_while_a_replica_registers_its_functions_is_served(
        url: str, tmp_path: Path) -> None:
    """A server registers what its mirror holds at start; a version deployed elsewhere in the
    meantime reaches the mirror during that, and is served too (before, it was never)."""
    import asyncio
    import time

    from sandbox.runtime import AsyncRuntime
    from sandbox.server import SandboxServicer

    with PostgresStore(url, tmp_path / "b", node="b") as b:
        b.deploy("first", SOURCE_1)
        with PostgresStore(url, tmp_path / "a", node="a") as a:
            seen = Changes(a)

            async def main() -> None:
                async with AsyncRuntime(min_idle=1, isolation="off") as rt:
                    servicer = SandboxServicer(rt, a, node="a")
                    real = servicer._ensure_profile
                    late: list[str] = []

                    async def ensure(modules: Any) -> None:
                        if not late:  # while the snapshot is being registered
                            late.append("late")
                            await asyncio.to_thread(b.deploy, "late", SOURCE_2)
                            await asyncio.to_thread(seen.wait_for, added=("late", 1))
                        await real(modules)

                    servicer._ensure_profile = ensure  # type: ignore[method-assign]
                    await servicer.load_store()
                    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
                    while {f.name for f in rt.functions()} != {"first", "late"}:
                        assert time.monotonic() < deadline, rt.functions()
                        await asyncio.sleep(0.01)
                    assert (await rt.invoke("late", None)).result == 2

            asyncio.run(main())

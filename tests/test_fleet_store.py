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

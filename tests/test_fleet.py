"""A fleet on one machine, for real: PostgreSQL (tests/postgres.py), three ``sandbox serve``
replicas sharing it as their function store (``--store``), one client balancing round_robin
over the three.

- a deploy through replica A is served by every replica (``stats.node`` shows all three, the
  calls spread evenly), and so are a new version and a delete;
- SIGKILL one replica under steady load: every call completes or fails ``UNAVAILABLE`` within
  its deadline, none is reported OK without having run, none runs twice; the client carries on
  with the other two; the replica restarts (same port, same state directory) and rejoins.

The replicas run with ``--isolation off`` because the load's function appends a line per run
to a file of the test: that is how runs are counted across replicas (isolation has tests of its
own). Skips, saying why, where PostgreSQL cannot be started.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
from grpc_conftest import ServerProcess, wait_gone

from sandbox.client import Client
from sandbox.errors import FunctionNotFound, ShuttingDown
from sandbox.outcome import InvocationResult

NODES = ("a", "b", "c")
#: Deadline of each call of the load (its function runs for milliseconds).
CALL_DEADLINE_S = 15.0
#: Deadlock guards: propagation takes milliseconds, a replica starts in about a second, a
#: channel reconnects to a restarted replica within its reconnect backoff.
PROPAGATION_TIMEOUT_S = 10.0
REJOIN_TIMEOUT_S = 60.0

FUNCS = '''
import os

def record(event, context):
    # one line per run, in a file of the test's (the replicas run with --isolation off)
    fd = os.open(event["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"{event['tag']}\\n".encode())
    os.close(fd)
    return event["tag"]
'''


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Overrides the conftest guard: the replicas keep warm workers across the module's tests
    by design; each is checked when it stops (or is killed)."""
    yield


class Fleet:
    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.replicas: dict[str, ServerProcess] = {}

    def start(self, node: str, port: int = 0) -> ServerProcess:
        srv = ServerProcess(self.root / node, "--store", self.url, "--node-name", node,
                            "--isolation", "off", "--min-idle", "1",
                            *(["--listen", f"127.0.0.1:{port}"] if port else []))
        self.replicas[node] = srv
        return srv

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(self.replicas[n].target for n in NODES)


@pytest.fixture(scope="module")
def fleet(postgres: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(postgres.database("fleet"), tmp_path_factory.mktemp("fleet"))
    try:
        for node in NODES:
            fleet.start(node)
        yield fleet
    except BaseException:
        for srv in fleet.replicas.values():
            srv.kill()
        raise
    for srv in fleet.replicas.values():
        assert srv.stop() == 0


def served_by(client: Client, nodes: set[str]) -> None:
    """Wait until round_robin has every replica ready (it picks among connected ones)."""
    seen: set[str] = set()
    deadline = time.monotonic() + REJOIN_TIMEOUT_S
    while seen != nodes:
        assert time.monotonic() < deadline, f"only {seen} of {nodes} answered"
        seen.add(client.info()["node"])


def until(what: str, check: Any, timeout: float = PROPAGATION_TIMEOUT_S) -> Any:
    """``check()`` until it returns something truthy (it makes a real call each time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"


def serves(client: Client, name: str, version: int | None = None) -> bool:
    try:
        client.function(name, version)
    except FunctionNotFound:
        return False
    return True


def test_a_deploy_through_one_replica_is_served_by_all(fleet: Fleet, tmp_path: Path) -> None:
    a, b, c = (Client(fleet.replicas[n].target, timeout=30) for n in NODES)
    with a, b, c, Client(fleet.target, timeout=30) as balanced:
        assert [cl.info()["node"] for cl in (a, b, c)] == list(NODES)
        deployed = a.deploy("hello", "def handler(event, context):\n    return event + 1\n")
        for direct in (b, c):
            until("the deploy reaches every replica", lambda d=direct: serves(d, "hello"))
            assert direct.function("hello").digest == deployed.digest
        served_by(balanced, set(NODES))
        results = [balanced.invoke("hello", i) for i in range(300)]
        assert [r.unwrap() for r in results] == [i + 1 for i in range(300)]
        counts = collections.Counter(r.stats.node for r in results)
        assert set(counts) == set(NODES)
        for n in counts.values():
            assert 80 <= n <= 120, counts  # within ±20 % of an even 100 each

        # A new version through C, a delete through B: everyone follows.
        two = c.deploy("hello", "def handler(event, context):\n    return event + 2\n")
        assert two.version == 2
        until("version 2 everywhere",
              lambda: all(serves(cl, "hello", 2) for cl in (a, b)))
        assert {balanced.invoke("hello", 1).unwrap() for _ in range(9)} == {3}
        assert b.delete("hello", 1) == [1]
        until("the delete everywhere",
              lambda: not any(serves(cl, "hello", 1) for cl in (a, c)))
        assert a.versions("hello") == [2]


def test_sigkill_a_replica_under_steady_load(fleet: Fleet, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    with Client(fleet.replicas["a"].target, timeout=30) as a:
        a.deploy("record", FUNCS, handler="funcs:record")
    for node in NODES:
        with Client(fleet.replicas[node].target, timeout=30) as direct:
            until(f"record on {node}", lambda d=direct: serves(d, "record"))
    with Client(fleet.target, timeout=CALL_DEADLINE_S) as client:
        served_by(client, set(NODES))
        outcomes: dict[str, InvocationResult | BaseException] = {}
        started: dict[str, float] = {}
        ended: dict[str, float] = {}
        stop = threading.Event()
        killed = threading.Event()
        after_kill = collections.Counter[str]()

        def load(worker: int) -> None:
            i = 0
            while not stop.is_set():
                tag = f"w{worker}-{i}"
                i += 1
                started[tag] = time.monotonic()
                try:
                    outcomes[tag] = result = client.invoke(
                        "record", {"log": str(runs), "tag": tag})
                    if killed.is_set():
                        after_kill[result.stats.node] += 1
                except Exception as exc:
                    outcomes[tag] = exc
                ended[tag] = time.monotonic()

        with futures.ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(load, w) for w in range(4)]
            until("steady load", lambda: len(outcomes) >= 200, timeout=120)
            victim = fleet.replicas["c"]
            below = victim.descendants()
            victim.kill()  # SIGKILL: the server, its zygotes and workers
            assert wait_gone(below) == []
            killed.set()
            # The client carries on with the other two.
            until("calls on the survivors", lambda: sum(after_kill.values()) >= 200,
                  timeout=120)
            assert set(after_kill) <= {"a", "b"}, after_kill
            # The replica restarts on its port and state directory, and rejoins.
            fleet.start("c", port=victim.port)
            until("c serves again", lambda: after_kill["c"] > 0, timeout=REJOIN_TIMEOUT_S)
            stop.set()
            for w in workers:
                w.result(timeout=CALL_DEADLINE_S * 2)

    ran = collections.Counter(runs.read_text().split())
    failures = {tag: exc for tag, exc in outcomes.items() if isinstance(exc, BaseException)}
    for tag, outcome in outcomes.items():
        # every call ended within its deadline: none hung
        assert ended[tag] - started[tag] < CALL_DEADLINE_S + 5, tag
        if isinstance(outcome, InvocationResult):
            # OK only for a call that ran, and ran once
            assert outcome.unwrap() == tag and ran[tag] == 1, (tag, ran[tag])
        else:
            # the calls cut off by the kill: UNAVAILABLE, run at most once, never again
            assert isinstance(outcome, ShuttingDown), (tag, repr(outcome))
            assert ran[tag] <= 1, (tag, ran[tag])
    assert max(ran.values()) == 1, "a call ran twice"
    # Only calls in flight on the lost replica fail: one per load thread, and rarely one that
    # was picked for it just before the client saw the connection go.
    assert len(failures) <= 8, f"{len(failures)} calls failed: {failures}"

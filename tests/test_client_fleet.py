"""Clients for a fleet: one client over three real ``sandbox serve`` replicas.

Calls spread ``round_robin`` over the replicas (``stats.node`` says which served each); reads
and Deploy are retried on UNAVAILABLE by gRPC (the channel's service config) and Deploy makes
no duplicate version when its first attempt landed; an invocation cut off by a lost replica
fails and is never run again, unless the caller marks it idempotent; a draining server's
refusal (it ran nothing, and says so) is sent elsewhere.

Each replica has its own state directory (no shared store here), so every function is deployed
to each. The replicas run with ``--isolation off``: the functions append a line per run to a
file of the test, which is how the tests count runs across replicas; isolation has tests of its
own, these are about the client's behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_conftest import ROOT, ServerProcess, wait_gone

from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
from sandbox._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandbox.client import (
    RETRIED_METHODS,
    AsyncClient,
    Client,
    RetryPolicy,
    _refused,
    default_service_config,
    grpc_target,
)
from sandbox.errors import ConfigurationError, FunctionNotFound, ShuttingDown
from sandbox.limits import Limits
from sandbox.outcome import InvocationResult
from sandbox.server import create_server
from sandbox.wire import REFUSED_METADATA_KEY

FUNCS = '''
import os, time

def echo(event, context):
    return event

def record(event, context):
    # one line per run, in a file of the test's (the replicas run with --isolation off)
    with open(event["log"], "a") as f:
        f.write(f"{event['tag']} {os.getpid()}\\n")
    if "fifo" in event:  # and says so to the test waiting on the fifo
        fd = os.open(event["fifo"], os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, f"{event['tag']}\\n".encode())
        os.close(fd)
    time.sleep(event.get("seconds", 0))
    return event["tag"]
'''
NODES = ("a", "b", "c")
#: Deadlock guard only: a fresh replica is ready in well under a second.
CONNECT_TIMEOUT_S = 20.0


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Overrides the conftest guard: the module's replicas keep warm workers across tests by
    design; each is checked when it stops (or is killed)."""
    yield


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    root = tmp_path_factory.mktemp("fleet")
    replicas: list[ServerProcess] = []
    try:
        for node in NODES:
            srv = ServerProcess(root / node, "--node-name", node, "--isolation", "off",
                                "--min-idle", "1")
            srv.node = node  # type: ignore[attr-defined]
            replicas.append(srv)
            with Client(srv.target, timeout=30) as client:
                for handler in ("echo", "record"):
                    client.deploy(handler, FUNCS, handler=f"funcs:{handler}")
        yield replicas
    except BaseException:
        for srv in replicas:
            srv.kill()
        raise
    for srv in replicas:
        if srv.proc.poll() is None:
            assert srv.stop() == 0
        else:  # the replica a test killed
            srv.stop()


def _target(replicas: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(srv.target for srv in replicas)


def _alive(replicas: list[ServerProcess]) -> list[ServerProcess]:
    return [srv for srv in replicas if srv.proc.poll() is None]


def _connect_all(client: Client, nodes: set[str]) -> None:
    """Wait until round_robin has every replica ready: it picks only among connected ones, so
    the first calls of a new channel all go to whichever connected first."""
    seen: set[str] = set()
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while seen != nodes:
        assert time.monotonic() < deadline, f"only {seen} of {nodes} answered"
        seen.add(client.info()["node"])


def _even(counts: collections.Counter[str], nodes: set[str], calls: int) -> None:
    assert set(counts) == nodes, counts
    share = calls / len(nodes)
    for n in counts.values():
        assert 0.8 * share <= n <= 1.2 * share, counts


# ---------------------------------------------------------------------------------------------
# Targets and the service config

def test_targets() -> None:
    for target in ("localhost:50051", "dns:///sandbox.ns.svc:50051", "unix:/tmp/s.sock",
                   "ipv4:10.0.0.1:50051,10.0.0.2:50051", "ipv6:[::1]:1,[::1]:2",
                   "custom:a,b", "10.0.0.1:50051"):
        assert grpc_target(target) == target
    assert grpc_target("10.0.0.1:50051,10.0.0.2:50051") == "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert grpc_target("10.0.0.1:1, 10.0.0.2:2 ") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert grpc_target("[::1]:5001,[fe80::1]:5002") == "ipv6:[::1]:5001,[fe80::1]:5002"
    for bad in ("host-a:50051,host-b:50051", "10.0.0.1:1,[::1]:2", "10.0.0.1:1,sandbox:2"):
        with pytest.raises(ConfigurationError, match="dns:///"):
            grpc_target(bad)
    with pytest.raises(ConfigurationError):
        Client("a.example:1,b.example:1")
    assert Client("127.0.0.1:1,127.0.0.2:1").target == "ipv4:127.0.0.1:1,127.0.0.2:1"


def test_service_config() -> None:
    config = default_service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Sandbox"].methods}
    assert {"GetFunction", "ListFunctions", "GetInfo", "Deploy"} <= set(RETRIED_METHODS)
    assert set(RETRIED_METHODS) <= methods
    assert names == {("sandbox.v1.Sandbox", m) for m in RETRIED_METHODS}
    # never retried by gRPC: not idempotent, or the function may have run
    assert not {"DeleteFunction", "Invoke", "InvokeStream", "InvokeMany"} & set(RETRIED_METHODS)
    assert method_config["retryPolicy"] == {
        "maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
        "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE"]}
    assert default_service_config("pick_first", None) == {
        "loadBalancingConfig": [{"pick_first": {}}]}
    assert default_service_config(None, RetryPolicy(max_attempts=1)) == {}
    for bad in ({"max_attempts": 6}, {"max_attempts": 0}, {"initial_backoff_s": 0},
                {"backoff_multiplier": -1.0}):
        with pytest.raises(ConfigurationError):
            RetryPolicy(**bad)
    with pytest.raises(ConfigurationError, match="JSON"):
        Client("localhost:1", service_config="{not json")
    # gRPC accepts what we give it (a config it rejects would fail every call of the channel)
    Client("localhost:1", service_config=json.dumps(config)).close()


# ---------------------------------------------------------------------------------------------
# Spreading calls

def test_calls_spread_round_robin(fleet: list[ServerProcess]) -> None:
    with Client(_target(fleet), timeout=30) as client:
        _connect_all(client, set(NODES))
        counts = collections.Counter(client.invoke("echo", i).stats.node for i in range(300))
        _even(counts, set(NODES), 300)
        assert collections.Counter(client.info()["node"] for _ in range(30)) == {
            node: 10 for node in NODES}


def test_async_client_spreads_round_robin(fleet: list[ServerProcess]) -> None:
    async def main() -> collections.Counter[str]:
        async with AsyncClient(_target(fleet), timeout=30) as client:
            seen: set[str] = set()
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while seen != set(NODES):
                assert time.monotonic() < deadline, seen
                seen.add((await client.info())["node"])
            counts: collections.Counter[str] = collections.Counter()
            for _ in range(10):
                results = await asyncio.gather(*(client.invoke("echo", i, idempotent=True)
                                                 for i in range(30)))
                counts.update(r.stats.node for r in results)
            return counts

    _even(asyncio.run(asyncio.wait_for(main(), 120)), set(NODES), 300)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox.remote_cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_takes_a_fleet_target(fleet: list[ServerProcess]) -> None:
    plain = ",".join(srv.target for srv in fleet)
    out = _cli("invoke", "--target", plain, "--idempotent", "echo", '{"x": 1}')
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["result"] == {"x": 1} and result["stats"]["node"] in NODES
    out = _cli("info", "--target", _target(fleet))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node"] in NODES
    out = _cli("functions", "--target", "a.example:1,b.example:1")
    assert out.returncode == 2 and "dns:///" in out.stderr
    out = _cli("invoke", "--target", plain, "--idempotent", "--stream", "echo")
    assert out.returncode == 2 and "--stream" in out.stderr
    helped = _cli("invoke", "--help").stdout
    assert "round_robin" in helped and "--idempotent" in helped


# ---------------------------------------------------------------------------------------------
# Deploy is idempotent; what is retried and what is not

def test_deploy_is_idempotent(fleet: list[ServerProcess]) -> None:
    one, other = FUNCS, FUNCS + "\n# another\n"
    with Client(fleet[0].target, timeout=30) as client:
        first = client.deploy("same", one, handler="funcs:echo")
        assert client.deploy("same", one, handler="funcs:echo") == first  # the same version
        limited = client.deploy("same", one, handler="funcs:echo",
                                limits=Limits(wall_timeout_s=5.0))
        assert limited.version == first.version + 1
        assert client.deploy("same", one, handler="funcs:echo",
                             limits=Limits(wall_timeout_s=5.0)) == limited
        assert client.deploy("same", one, handler="funcs:echo", reuse=2).version == 3
        assert client.deploy("same", other, handler="funcs:echo", reuse=2).version == 4
        # back to an older deployment: a new version, so that it is the latest
        assert client.deploy("same", one, handler="funcs:echo").version == 5
        assert client.versions("same") == [1, 2, 3, 4, 5]
        assert client.delete("same") == [1, 2, 3, 4, 5]


class Front(pb_grpc.SandboxServicer):
    """A front for one replica that passes calls on, and fails some attempts UNAVAILABLE:
    ``lose[method]`` attempts after passing them on (they landed: a reply lost with its
    connection), ``refuse[method]`` before (with the server's draining refusal)."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pb_grpc.SandboxStub(self.channel)  # type: ignore[no-untyped-call]
        self.attempts: collections.Counter[str] = collections.Counter()
        self.lose: collections.Counter[str] = collections.Counter()
        self.refuse: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def _pass(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.attempts[method] += 1
            refuse = self.refuse[method] > 0
            self.refuse[method] -= refuse
        if refuse:
            context.set_trailing_metadata(((REFUSED_METADATA_KEY, "draining"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        try:
            response = getattr(self.stub, method)(request, timeout=30)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
        with self.lock:
            lose = self.lose[method] > 0
            self.lose[method] -= lose
        if lose:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (the test's)")
        return response

    def Deploy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pass("Deploy", request, context)

    def DeleteFunction(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pass("DeleteFunction", request, context)

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pass("GetInfo", request, context)

    def GetFunction(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pass("GetFunction", request, context)

    def Invoke(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pass("Invoke", request, context)


@pytest.fixture
def front(fleet: list[ServerProcess]) -> Iterator[Front]:
    servicer = Front(fleet[0].target)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_SandboxServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    servicer.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    server.start()
    try:
        yield servicer
    finally:
        server.stop(0).wait(10)
        servicer.channel.close()


def test_what_is_retried(front: Front, tmp_path: Path) -> None:
    target = f"127.0.0.1:{front.port}"  # type: ignore[attr-defined]
    runs = tmp_path / "runs.log"

    def record(tag: str, **kwargs: Any) -> InvocationResult:
        return client.invoke("record", {"log": str(runs), "tag": tag}, **kwargs)

    def ran(tag: str) -> int:
        return runs.read_text().split().count(tag) if runs.exists() else 0

    with Client(target, timeout=30) as client:
        # Deploy: the first attempt landed, its reply was lost; gRPC retried it, and the retry
        # made no second version.
        front.lose["Deploy"] = 1
        fn = client.deploy("retried", FUNCS, handler="funcs:echo")
        assert front.attempts["Deploy"] == 2
        assert client.versions("retried") == [fn.version] == [1]
        # ...however big: gRPC keeps the whole request to send it again (past its default
        # 256 KiB it would not retry)
        front.lose["Deploy"] = 1
        big = client.deploy("big", "def handler(e, c):\n    return 1\n#" + "x" * 2**22 + "\n")
        assert front.attempts["Deploy"] == 4 and client.versions("big") == [big.version] == [1]
        assert client.delete("big") == [1]

        # reads: retried
        front.lose["GetInfo"] = 1
        assert client.info()["node"] == "a" and front.attempts["GetInfo"] == 2

        # DeleteFunction: not idempotent, never retried (it did land)
        front.lose["DeleteFunction"] = 1
        with pytest.raises(ShuttingDown) as lost:
            client.delete("retried")
        assert front.attempts["DeleteFunction"] == 2  # "big" above, then this one
        assert lost.value.__cause__.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
        with pytest.raises(FunctionNotFound):
            client.function("retried")

        # an invocation that may have run: not retried, unless the caller says idempotent
        front.lose["Invoke"] = 1
        with pytest.raises(ShuttingDown):
            record("once")
        assert front.attempts["Invoke"] == 1 and ran("once") == 1
        front.lose["Invoke"] = 1
        assert record("twice", idempotent=True).unwrap() == "twice"
        assert front.attempts["Invoke"] == 3 and ran("twice") == 2

        # refused before it ran (draining): always sent again, idempotent or not
        front.refuse["Invoke"] = 2
        assert record("refused").unwrap() == "refused"
        assert front.attempts["Invoke"] == 6 and ran("refused") == 1

        # the attempts are bounded (RetryPolicy.max_attempts), and so is the time they take
        front.refuse["Invoke"] = 10
        start = time.monotonic()
        with pytest.raises(ShuttingDown) as refused:
            record("never")
        assert front.attempts["Invoke"] == 10 and ran("never") == 0
        assert time.monotonic() - start < 5
        assert _refused(refused.value.__cause__)  # type: ignore[arg-type]
        front.refuse["Invoke"] = 0

    with Client(target, timeout=30, retry=None) as client:  # no retries at all
        front.lose["GetInfo"] = 1
        with pytest.raises(ShuttingDown):
            client.info()
        assert front.attempts["GetInfo"] == 3
        front.refuse["Invoke"] = 1
        with pytest.raises(ShuttingDown):
            record("refused-once")
        assert front.attempts["Invoke"] == 11


def test_a_draining_server_refuses_and_the_call_goes_elsewhere(
        fleet: list[ServerProcess]) -> None:
    """A real servicer, draining: it refuses every call before running anything, with the
    trailing metadata that lets the client send even a non-idempotent invocation elsewhere."""
    calls: collections.Counter[str] = collections.Counter()

    class Count(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            calls[details.method.rsplit("/", 1)[1]] += 1
            return await continuation(details)

    async def main() -> None:
        # no runtime: a draining servicer never reaches it
        handle = create_server(None, node="draining", interceptors=[Count()])  # type: ignore[arg-type]
        handle.servicer.draining = True
        await handle.server.start()
        draining = f"127.0.0.1:{handle.port}"
        try:
            async with AsyncClient(draining, timeout=10) as client:
                with pytest.raises(ShuttingDown) as refused:
                    await client.invoke("echo", 1)
                cause = refused.value.__cause__
                assert cause.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
                assert (REFUSED_METADATA_KEY, "draining") in list(cause.trailing_metadata())  # type: ignore[union-attr]
                assert calls["Invoke"] == RetryPolicy().max_attempts  # bounded
            live = _alive(fleet)[:2]
            target = "ipv4:" + ",".join([draining, *(srv.target for srv in live)])
            async with AsyncClient(target, timeout=30) as client:
                await client.wait_ready()
                before, nodes = calls["Invoke"], collections.Counter[str]()
                for i in range(60):
                    result = await client.invoke("echo", i)
                    assert result.unwrap() == i
                    nodes[result.stats.node] += 1
                assert calls["Invoke"] > before, "the draining server was never tried"
                assert set(nodes) <= {srv.node for srv in live}  # type: ignore[attr-defined]
        finally:
            await handle.server.stop(0)

    asyncio.run(asyncio.wait_for(main(), 120))


# ---------------------------------------------------------------------------------------------
# Losing a replica (last: it kills one of the module's replicas)

def test_losing_a_replica(fleet: list[ServerProcess], tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    by_pid: dict[int, ServerProcess] = {}

    def lines() -> list[tuple[str, int]]:
        text = runs.read_text() if runs.exists() else ""
        return [(tag, int(pid)) for tag, pid in (line.split() for line in text.splitlines())]

    def replica(pid: int) -> ServerProcess:
        if pid not in by_pid:
            for srv in fleet:
                if pid in {p.pid for p in srv.descendants()}:
                    by_pid[pid] = srv
        return by_pid[pid]

    fifo = tmp_path / "runs.fifo"
    os.mkfifo(fifo)
    # Held open all along, so a run's non-blocking write always finds a reader; read-write, so
    # it never reads as end-of-file between two runs' writes (select would not wait then).
    announced = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    heard: set[str] = set()

    def wait_ran(tag: str, thread: threading.Thread) -> None:
        """Wait on the fifo until ``tag`` has run (deadlock guard: 20 s)."""
        deadline = time.monotonic() + 20
        pending = b""
        while tag not in heard:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and thread.is_alive(), outcomes
            if select.select([announced], [], [], remaining)[0]:
                try:
                    pending += os.read(announced, 4096)
                except BlockingIOError:  # woken for nothing: wait again
                    continue
                *done, pending = pending.split(b"\n")
                heard.update(line.decode() for line in done)

    with Client(_target(fleet), timeout=60) as client:
        _connect_all(client, set(NODES))
        outcomes: dict[str, InvocationResult | BaseException] = {}

        def call(tag: str, idempotent: bool) -> None:
            try:
                outcomes[tag] = client.invoke(
                    "record", {"log": str(runs), "tag": tag, "seconds": 4,
                               "fifo": str(fifo)},
                    idempotent=idempotent)
            except BaseException as exc:
                outcomes[tag] = exc

        # One call at a time, each running before the next starts, until some replica runs
        # both a plain call and an idempotent one (round_robin: after four calls).
        threads, where = [], collections.defaultdict(dict)
        victim = None
        for i in range(9):
            tag, idempotent = (f"idem{i}", True) if i % 2 else (f"plain{i}", False)
            thread = threading.Thread(target=call, args=(tag, idempotent))
            thread.start()
            threads.append(thread)
            wait_ran(tag, thread)
            srv = replica(dict(lines())[tag])
            where[srv.node][idempotent] = tag  # type: ignore[attr-defined]
            if len(where[srv.node]) == 2:  # type: ignore[attr-defined]
                victim = srv
                break
        assert victim is not None, where
        plain, idem = where[victim.node][False], where[victim.node][True]  # type: ignore[attr-defined]

        below = victim.descendants()
        victim.kill()  # SIGKILL, the server and everything below it
        assert victim.proc.poll() is not None and wait_gone(below) == []
        survivors = {srv.node for srv in _alive(fleet)}  # type: ignore[attr-defined]

        for thread in threads:
            thread.join(60)
        # the plain call was cut off: an error, never reported OK, and never run again
        lost = outcomes[plain]
        assert isinstance(lost, ShuttingDown), lost
        assert lost.__cause__.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
        # the idempotent one ran again on another replica, and succeeded there
        redone = outcomes[idem]
        assert isinstance(redone, InvocationResult) and redone.unwrap() == idem, redone
        assert redone.stats.node in survivors
        runs_of = collections.defaultdict(list)
        for tag, pid in lines():
            runs_of[tag].append(pid)
        assert len(runs_of[idem]) == 2 and runs_of[idem][1] == redone.stats.worker_pid
        # every other call ran once, on its replica, and succeeded
        for tag, outcome in outcomes.items():
            if tag not in (plain, idem):
                assert isinstance(outcome, InvocationResult) and outcome.ok, (tag, outcome)
                assert len(runs_of[tag]) == 1

        # reads go on (retried, or balanced away from the lost replica)
        for _ in range(10):
            assert client.info()["node"] in survivors
            assert {f.name for f in client.functions()} >= {"echo", "record"}
            assert client.function("echo").name == "echo"
        # and so do invocations, on the two that are left
        counts = collections.Counter(client.invoke("echo", i).stats.node for i in range(60))
        _even(counts, survivors, 60)
        # a deploy lands on a survivor (each replica has its own store here)
        assert client.deploy("after", FUNCS, handler="funcs:echo").version == 1

    assert len(runs_of[plain]) == 1 and [t for t, _ in lines()].count(plain) == 1
    os.close(announced)


# ---------------------------------------------------------------------------------------------
# TLS over a list of addresses

def test_tls_server_name_for_a_list_of_addresses(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True,
                       timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=sandbox")
    # the certificate names the service, not the replicas' addresses
    (tmp_path / "srv.ext").write_text("subjectAltName=DNS:sandbox.test\n"
                                      "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "srv.ext")
    srv = ServerProcess(tmp_path / "state", "--node-name", "tls", "--tls-cert",
                        str(tmp_path / "srv.pem"), "--tls-key", str(tmp_path / "srv.key"))
    try:
        target = f"{srv.target},{srv.target}"
        with Client(target, tls_ca=tmp_path / "ca.pem", tls_server_name="sandbox.test",
                    timeout=10) as client:
            assert client.info()["node"] == "tls"
        with Client(target, tls_ca=tmp_path / "ca.pem", timeout=3) as client, \
                pytest.raises(ShuttingDown):
            client.info()  # 127.0.0.1 is not the certificate's name
        out = _cli("info", "--target", target, "--tls-ca", str(tmp_path / "ca.pem"),
                   "--tls-server-name", "sandbox.test")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["node"] == "tls"
    finally:
        assert srv.stop() == 0

"""The gRPC server, end to end: a real ``sandbox serve`` subprocess per module (plus a few of
their own for overload, restart and drain), driven by the sync and asyncio clients.

The conftest's per-test leftover guard is replaced here by a per-server one: the module's
server keeps warm workers across tests by design, so "nothing left running" is checked when a
server stops (every process below it must be gone), and each test that kills a worker checks
that very process.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import psutil
import pytest
from grpc_conftest import ROOT, ServerProcess, wait_gone
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
from sandbox._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandbox.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    Invocation,
    InvocationRejected,
)
from sandbox.errors import FunctionNotFound, InvalidRequest, Overloaded, ShuttingDown
from sandbox.limits import Limits
from sandbox.outcome import InvocationResult, Outcome

FUNCS = '''
import ctypes, os, time

def echo(event, context):
    print("out:", event)
    return event

def fail(event, context):
    raise ValueError("bad value " + str(event))

def sleep(event, context):
    time.sleep(event)
    return event

def marked_sleep(event, context):
    # lets the test find this very worker (/proc is read-only inside the sandbox)
    ctypes.CDLL(None).prctl(15, event["mark"].encode(), 0, 0, 0)  # PR_SET_NAME
    time.sleep(event["seconds"])
    return "woke"

def spin(event, context):
    while True:
        pass

def hog(event, context):
    blocks = []
    while True:
        blocks.append(bytearray(16 * 1024 * 1024))

def big(event, context):
    return b"x" * event

def crash(event, context):
    os._exit(3)

def count(event, context):
    for i in range(event):
        yield {"i": i}

def tick(event, context):
    yield "running"            # tells the caller the function is running now
    time.sleep(event)

def size(event, context):
    return len(event)

def blob(event, context):
    return {"bytes": b"\\x00\\x01", "list": [1, 2.5, None, True]}
'''

HANDLERS = ["echo", "fail", "sleep", "marked_sleep", "spin", "hog", "big", "crash", "count",
            "size", "blob"]


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Overrides the conftest guard (see the module docstring)."""
    yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("grpc") / "state", "--min-idle", "2")
    try:
        with Client(srv.target, timeout=30) as client:
            for handler in HANDLERS:
                client.deploy(handler, FUNCS, handler=f"funcs:{handler}")
        yield srv
    except BaseException:
        srv.kill()
        raise
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=60) as c:
        yield c


def find_marked(server: ServerProcess, mark: str, timeout: float = 10.0) -> psutil.Process:
    """The worker that renamed itself ``mark`` (see ``marked_sleep``; at most 15 chars)."""
    assert len(mark) <= 15, "the kernel truncates a comm to 15 characters"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in server.descendants():
            try:
                if p.name() == mark:
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.02)  # polling the process table: there is no event to wait on
    raise AssertionError(f"no worker named {mark!r}")


def assert_killed(proc: psutil.Process) -> None:
    assert wait_gone([proc], timeout=10.0) == [], f"worker {proc.pid} still alive"


# ---------------------------------------------------------------------------------------------
# Health, reflection, info

def test_health_serving(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sandbox.v1.Sandbox"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="sandbox.v1.Sandbox")]
        replies = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"sandbox.v1.Sandbox", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


def test_info(client: Client) -> None:
    info = client.info()
    assert info["version"]
    assert info["profiles"]["default"] == []
    assert set(info["pools"]["default"]) >= {"idle", "busy", "starting", "queued"}
    assert info["isolation"], "the isolation layers are reported"
    for layer in info["isolation"].values():
        assert set(layer) == {"available", "enabled", "reason"}
    assert info["limits"]["wall_timeout_s"] is not None
    assert info["invoke_many_window"] >= 1


def test_node_identity_defaults_to_hostname_port(server: ServerProcess, client: Client) -> None:
    """Without --node-name the server is ``hostname:port``, in GetInfo and in every result's
    stats, unary, streamed and over InvokeMany."""
    node = f"{socket.gethostname()}:{server.port}"
    assert client.info()["node"] == node
    assert client.invoke("echo", {"x": 1}).stats.node == node
    assert client.stream("echo", {"x": 1}).result().stats.node == node
    many = list(client.invoke_many([Invocation("echo", 1, id="a"), Invocation("echo", 2, id="b")]))
    assert [r.stats.node for r in many if isinstance(r, InvocationResult)] == [node, node]


# ---------------------------------------------------------------------------------------------
# Functions

def test_deploy_versions_get_list_delete(client: Client) -> None:
    one = client.deploy("versioned", "def handler(event, context):\n    return 1\n")
    two = client.deploy("versioned", "def handler(event, context):\n    return 2\n",
                        limits=Limits(wall_timeout_s=5.0))
    assert (one.version, two.version) == (1, 2)
    assert one.digest != two.digest and len(one.digest) == 64
    assert (one.handler, one.source_format, one.profile) == ("main:handler", "python", "default")
    assert two.limits.wall_timeout_s == 5.0 and two.created is not None
    assert client.function("versioned") == two
    assert client.function("versioned", 1) == one
    assert client.versions("versioned") == [1, 2]
    assert client.invoke("versioned").unwrap() == 2
    assert client.invoke("versioned", version=1).unwrap() == 1
    latest = {f.name: f.version for f in client.functions()}
    assert latest["versioned"] == 2 and "echo" in latest
    every = [(f.name, f.version) for f in client.functions(all_versions=True)]
    assert ("versioned", 1) in every and ("versioned", 2) in every
    assert client.delete("versioned", 1) == [1]
    with pytest.raises(FunctionNotFound):
        client.invoke("versioned", version=1)
    assert client.delete("versioned") == [2]
    with pytest.raises(FunctionNotFound):
        client.function("versioned")


def test_deploy_zip_bundle(client: Client) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/helper.py", "def double(x):\n    return 2 * x\n")
        zf.writestr("pkg/main.py", "from pkg.helper import double\n"
                                   "def run(event, context):\n    return double(event)\n")
    fn = client.deploy("zipped", buf.getvalue(), handler="pkg.main:run")
    assert fn.source_format == "zip"
    assert client.invoke("zipped", 21).unwrap() == 42


def test_deploy_with_preload_makes_a_profile(client: Client) -> None:
    fn = client.deploy("preloaded", "import json\ndef handler(e, c):\n    return json.dumps(e)\n",
                       preload=["json"])
    assert fn.profile == "json" and fn.preload == ("json",)
    assert client.info()["profiles"]["json"] == ["json"]
    assert client.invoke("preloaded", [1]).unwrap() == "[1]"


def test_deploy_reuse_serves_calls_from_one_worker(server: ServerProcess,
                                                   client: Client) -> None:
    source = "def handler(event, context):\n    return event\n"
    reused = client.deploy("reused", source, reuse=100)
    assert reused.reuse == 100 and client.function("reused").reuse == 100
    results = [client.invoke("reused", i) for i in range(4)]
    assert [r.unwrap() for r in results] == [0, 1, 2, 3]
    assert len({r.stats.worker_pid for r in results}) == 1, [r.stats for r in results]
    assert [r.stats.worker_invocations for r in results] == [1, 2, 3, 4]

    single = client.deploy("single-use", source)
    assert single.reuse == 1
    pids = [client.invoke("single-use", i).stats.worker_pid for i in range(3)]
    assert len(set(pids)) == 3, pids

    async def via_async_client() -> int:
        async with AsyncClient(server.target) as aclient:
            fn = await aclient.deploy("reused-async", source, reuse=2)
            return fn.reuse

    assert asyncio.run(via_async_client()) == 2
    with pytest.raises(InvalidRequest, match="reuse"):
        client.deploy("bad-reuse", source, reuse=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "bad/name"}, "invalid function name"),
    ({"preload": ["no_such_module_for_sandbox_tests"]}, "no_such_module_for_sandbox_tests"),
    ({"source": b"PK\x03\x04junk", "handler": "m:f"}, "not a valid zip"),
    ({"handler": "not a handler"}, "handler"),
])
def test_deploy_rejects_bad_requests(client: Client, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"name": "rejected", "source": "def handler(e, c):\n    return 1\n",
                            **kwargs}
    with pytest.raises(InvalidRequest, match=match):
        client.deploy(args.pop("name"), args.pop("source"), **args)
    with pytest.raises(FunctionNotFound):
        client.function("rejected")


# ---------------------------------------------------------------------------------------------
# Invoke: outcomes over the wire

def test_invoke_ok_with_output(client: Client) -> None:
    res = client.invoke("echo", {"a": [1, 2]}, id="my-id")
    assert res.outcome is Outcome.OK and res.id == "my-id"
    assert res.result == {"a": [1, 2]}
    assert msgpack.unpackb(res.result_bytes) == {"a": [1, 2]}
    assert res.stdout == "out: {'a': [1, 2]}\n" and res.error is None
    assert res.stats.run_s > 0 and res.stats.worker_pid


def test_invoke_json_round_trip(client: Client) -> None:
    res = client.invoke("echo", {"k": "v"}, content_type="application/json")
    assert res.ok and json.loads(res.result_bytes) == {"k": "v"} and res.result == {"k": "v"}
    raw = client.invoke("echo", payload=b'{"raw": true}', content_type="application/json")
    assert raw.result == {"raw": True}


def test_invoke_binary_values(client: Client) -> None:
    assert client.invoke("blob").unwrap() == {"bytes": b"\x00\x01", "list": [1, 2.5, None, True]}


OUTCOME_CASES: list[tuple[str, Any, Limits | None, Outcome, str]] = [
    ("echo", 1, None, Outcome.OK, ""),
    ("fail", 7, None, Outcome.FUNCTION_ERROR, "ValueError"),
    ("sleep", 30, Limits(wall_timeout_s=0.5), Outcome.TIMEOUT, ""),
    ("spin", None, Limits(cpu_time_s=0.5), Outcome.CPU_LIMIT, ""),
    ("hog", None, Limits(memory_bytes=96 * 1024 * 1024), Outcome.MEMORY_LIMIT, ""),
    ("big", 100_000, Limits(max_result_bytes=10_000), Outcome.OUTPUT_LIMIT, ""),
    ("crash", None, None, Outcome.CRASHED, ""),
]


@pytest.mark.parametrize(("function", "event", "limits", "outcome", "error_type"), OUTCOME_CASES,
                         ids=[c[3].value for c in OUTCOME_CASES])
def test_every_outcome_over_the_wire(client: Client, function: str, event: Any,
                                     limits: Limits | None, outcome: Outcome,
                                     error_type: str) -> None:
    res = client.invoke(function, event, limits=limits)
    assert res.outcome is outcome, res
    if outcome is Outcome.OK:
        assert res.error is None
    else:
        assert res.error is not None and res.error.message
        assert res.result is None and res.result_bytes == b""
    if error_type:
        assert res.error is not None and res.error.type == error_type
        assert "bad value 7" in res.error.message and "Traceback" in res.error.traceback


def test_invoke_many_cancel_id(client: Client) -> None:
    started = threading.Event()

    def requests() -> Iterator[Invocation | str]:
        yield Invocation("sleep", 30, id="doomed")
        yield Invocation("echo", "fast", id="fast")
        started.wait(30)
        yield "doomed"

    seen: dict[str, InvocationResult | InvocationRejected] = {}
    for item in client.invoke_many(requests(), timeout=60):
        seen[item.id] = item
        if item.id == "fast":
            started.set()
    doomed = seen["doomed"]
    assert isinstance(doomed, InvocationResult) and doomed.outcome is Outcome.CANCELLED
    assert isinstance(seen["fast"], InvocationResult) and seen["fast"].result == "fast"


# ---------------------------------------------------------------------------------------------
# Call errors are statuses

def test_call_errors(client: Client, server: ServerProcess) -> None:
    with pytest.raises(FunctionNotFound, match="no function named 'missing'"):
        client.invoke("missing")
    with pytest.raises(FunctionNotFound, match="no version 99"):
        client.invoke("echo", version=99)
    with pytest.raises(InvalidRequest, match="content_type"):
        client.invoke("echo", payload=b"x", content_type="text/plain")
    with pytest.raises(InvalidRequest, match="not valid msgpack"):
        client.invoke("echo", payload=b"\xc1")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        client.invoke("echo", payload=b"{", content_type="application/json")
    # a raw request with a malformed limit, as another language could send it
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SandboxStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Invoke(pb.InvokeRequest(function="echo", limits=pb.Limits(memory_bytes=1)),
                        timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "memory_bytes" in info.value.details()


# ---------------------------------------------------------------------------------------------
# Streaming

def test_stream_chunks_in_order_then_result(client: Client) -> None:
    stream = client.stream("count", 50)
    assert list(stream) == [{"i": i} for i in range(50)]
    res = stream.result()
    assert res.outcome is Outcome.OK and res.chunks == 50


def test_stream_raw_messages_have_indexes(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SandboxStub(channel)
        replies = list(stub.InvokeStream(pb.InvokeStreamRequest(
            function="count", payload=msgpack.packb(5)), timeout=30))
    assert [r.WhichOneof("event") for r in replies] == ["chunk"] * 5 + ["result"]
    assert [r.chunk.index for r in replies[:5]] == list(range(5))
    assert replies[-1].result.outcome == pb.OUTCOME_OK


def test_stream_of_a_plain_function_is_just_the_result(client: Client) -> None:
    stream = client.stream("echo", 3)
    assert list(stream) == []
    assert stream.result().result == 3


def test_stream_unknown_function(client: Client) -> None:
    with pytest.raises(FunctionNotFound):
        list(client.stream("missing"))


# ---------------------------------------------------------------------------------------------
# InvokeMany

def test_invoke_many_hundreds_out_of_order(client: Client) -> None:
    n = 300
    # the first ones sleep longest, so they complete last
    invocations = [Invocation("sleep", round(0.3 * (n - i) / n, 3), id=f"call-{i}")
                   for i in range(n)]
    order: list[str] = []
    results: dict[str, InvocationResult] = {}
    for item in client.invoke_many(invocations, timeout=120):
        assert isinstance(item, InvocationResult), item
        order.append(item.id)
        results[item.id] = item
    assert sorted(order) == sorted(i.id for i in invocations)
    assert order != [i.id for i in invocations], "results come in completion order"
    for inv in invocations:
        assert results[inv.id].outcome is Outcome.OK
        assert results[inv.id].result == inv.event


def test_invoke_many_errors_do_not_end_the_stream(client: Client) -> None:
    items = list(client.invoke_many([
        Invocation("echo", 1, id="a"), Invocation("missing", id="b"),
        Invocation("echo", 2, id="c"), Invocation("echo", payload=b"\xc1", id="d"),
        Invocation("echo", 3)], timeout=60))
    by_id = {i.id: i for i in items}
    assert set(by_id) == {"a", "b", "c", "d", "4"}
    rejected = by_id["b"]
    assert isinstance(rejected, InvocationRejected)
    assert rejected.code is grpc.StatusCode.NOT_FOUND
    assert isinstance(rejected.exception(), FunctionNotFound)
    assert isinstance(by_id["d"], InvocationRejected)
    assert by_id["d"].code is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(by_id["4"], InvocationResult) and by_id["4"].result == 3


def test_invoke_many_flow_control_bounds_reading(client: Client) -> None:
    window = client.info()["invoke_many_window"]
    total, size = max(1500, 6 * window), 32 * 1024
    pulled = 0

    def requests() -> Iterator[Invocation]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield Invocation("size", b"\x00" * size, id=str(i))

    # Read one result, then nothing for a while: a server that ignored its window would read
    # the whole request stream (48 MiB) into memory. gRPC's transport buffers a few MiB on
    # each side, so the bound checked is loose but far from "everything".
    overread = threading.Event()

    def requests_watched() -> Iterator[Invocation]:
        for invocation in requests():
            if pulled >= total * 3 // 4:
                overread.set()
            yield invocation

    stream = client.invoke_many(requests_watched(), timeout=120)
    first = next(stream)
    assert isinstance(first, InvocationResult)
    # A server that ignored its window would read on until the end: wait for that (the
    # guard is how long we give it to misbehave), not for a time.
    assert not overread.wait(timeout=2.0), f"the sender was never pushed back ({pulled} sent)"
    rest = list(stream)
    assert len(rest) + 1 == total
    bad = [r for r in rest if not (isinstance(r, InvocationResult) and r.result == size)]
    assert bad == [], f"{len(bad)} failed, e.g. {bad[:2]}"


# ---------------------------------------------------------------------------------------------
# Cancellation and deadlines kill the worker

def test_client_deadline_kills_the_worker(client: Client, server: ServerProcess) -> None:
    mark = "sbx-deadline"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.invoke("marked_sleep", {"mark": mark, "seconds": 60}, timeout=1.0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    start = time.monotonic()
    thread.start()
    worker = find_marked(server, mark)
    thread.join(30)
    assert isinstance(errors[0], DeadlineExceeded)
    assert time.monotonic() - start < 10
    assert_killed(worker)


def test_client_cancel_kills_the_worker(server: ServerProcess) -> None:
    mark = "sbx-cancel"

    async def main() -> None:
        async with AsyncClient(server.target) as aclient:
            task = asyncio.create_task(
                aclient.invoke("marked_sleep", {"mark": mark, "seconds": 60}))
            worker = await asyncio.to_thread(find_marked, server, mark)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(assert_killed, worker)

    asyncio.run(main())


def test_stream_cancel_kills_the_worker(client: Client, server: ServerProcess) -> None:
    mark = "sbx-stream"
    stream = client.stream("marked_sleep", {"mark": mark, "seconds": 60})
    worker = find_marked(server, mark)
    stream.cancel()
    assert_killed(worker)


def test_disconnect_kills_the_worker(server: ServerProcess) -> None:
    mark = "sbx-disconn"
    code = (
        "import sys\n"
        "from sandbox.client import Client\n"
        f"Client({server.target!r}).invoke('marked_sleep', {{'mark': {mark!r}, "
        "'seconds': 60})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        worker = find_marked(server, mark)
    finally:
        proc.kill()
        proc.wait()
    assert_killed(worker)


# ---------------------------------------------------------------------------------------------
# The asyncio client

def test_async_client_covers_the_rpcs(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.target, timeout=60) as aclient:
            await aclient.wait_ready()
            fn = await aclient.deploy("async-echo", "def handler(e, c):\n    return e\n")
            assert (await aclient.function("async-echo")).version == fn.version
            assert fn.version in await aclient.versions("async-echo")
            assert any(f.name == "async-echo" for f in await aclient.functions())
            assert (await aclient.invoke("async-echo", {"x": 1})).result == {"x": 1}
            stream = aclient.stream("count", 3)
            assert [c async for c in stream] == [{"i": 0}, {"i": 1}, {"i": 2}]
            assert (await stream.result()).chunks == 3

            async def gen() -> Any:
                for i in range(20):
                    yield Invocation("async-echo", i, id=str(i))

            got = {r.id: r async for r in aclient.invoke_many(gen())}
            assert {k: v.result for k, v in got.items()  # type: ignore[union-attr]
                    } == {str(i): i for i in range(20)}
            assert (await aclient.info())["profiles"]
            assert await aclient.delete("async-echo") == [fn.version]
            with pytest.raises(FunctionNotFound):
                await aclient.invoke("async-echo")

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# The command line

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox.remote_cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_deploy_invoke_functions_info(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "adder.py"
    source.write_text("def handler(event, context):\n    return event['a'] + 1\n")
    target = ("--target", server.target)
    done = _cli("deploy", "cli-add", str(source), "--handler", "adder:handler", *target)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["handler"] == "adder:handler"
    done = _cli("deploy", "cli-reused", str(source), "--handler", "adder:handler",
                "--reuse", "5", *target)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reuse"] == 5
    pids = {json.loads(_cli("invoke", "cli-reused", '{"a": 1}', *target).stdout)["stats"]
            ["worker_pid"] for _ in range(2)}
    assert len(pids) == 1, pids
    done = _cli("invoke", "cli-add", '{"a": 41}', *target)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["outcome"] == "OK" and out["result"] == 42
    assert set(out) == set(InvocationResult("x", Outcome.OK).to_dict())
    done = _cli("invoke", "fail", "1", *target)
    assert done.returncode == 1 and json.loads(done.stdout)["outcome"] == "FUNCTION_ERROR"
    done = _cli("invoke", "missing", *target)
    assert done.returncode == 2 and "no function named" in done.stderr
    done = _cli("functions", *target)
    assert "cli-add" in [f["name"] for f in json.loads(done.stdout)]
    done = _cli("info", *target)
    assert json.loads(done.stdout)["profiles"]["default"] == []


# ---------------------------------------------------------------------------------------------
# Servers of their own: overload, oversized messages, restart, drain

def test_overload_is_resource_exhausted_and_memory_stays_bounded(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "state", "--workers", "1", "--max-queue", "2",
                        "--min-idle", "1", "--max-message-size", "1MiB")
    try:
        with Client(srv.target, timeout=60) as client:
            client.deploy("sleep", FUNCS, handler="funcs:sleep")
            with pytest.raises(Overloaded) as too_big:
                client.invoke("sleep", payload=b"\x00" * (2 * 1024 * 1024))
            cause = too_big.value.__cause__
            assert isinstance(cause, grpc.RpcError)
            assert cause.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

            def flood() -> tuple[int, int]:
                items = client.invoke_many(
                    (Invocation("sleep", 0.2, id=str(i)) for i in range(200)), timeout=120)
                rejected = ok = 0
                for item in items:
                    if isinstance(item, InvocationRejected):
                        assert item.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                        assert isinstance(item.exception(), Overloaded)
                        rejected += 1
                    else:
                        ok += 1
                return ok, rejected

            ok, rejected = flood()
            assert ok >= 1 and rejected >= 100
            rss_before = srv.psutil.memory_info().rss
            for _ in range(3):
                flood()
            grown = srv.psutil.memory_info().rss - rss_before
            assert grown < 64 * 1024 * 1024, f"server grew by {grown} bytes under overload"

            # unary calls see the status itself
            blockers = [threading.Thread(target=client.invoke, args=("sleep", 1.0))
                        for _ in range(3)]
            for t in blockers:
                t.start()
            deadline = time.monotonic() + 10
            while client.info()["queued"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(Overloaded):
                client.invoke("sleep", 0)
            for t in blockers:
                t.join(30)
    finally:
        assert srv.stop() == 0


def test_restart_keeps_deployed_functions(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ServerProcess(state)
    try:
        with Client(first.target, timeout=30) as client:
            client.deploy("kept", "def handler(e, c):\n    return 'v1'\n")
            client.deploy("kept", "def handler(e, c):\n    return 'v2'\n", preload=["json"])
            client.deploy("gone", "def handler(e, c):\n    return 0\n")
            client.deploy("reused", "def handler(e, c):\n    return 0\n", reuse=7)
            client.delete("gone")
    finally:
        assert first.stop() == 0
    second = ServerProcess(state)
    try:
        with Client(second.target, timeout=30) as client:
            assert client.versions("kept") == [1, 2]
            assert client.invoke("kept").unwrap() == "v2"
            assert client.invoke("kept", version=1).unwrap() == "v1"
            assert client.function("kept").profile == "json"
            assert client.function("reused").reuse == 7
            pids = {client.invoke("reused").stats.worker_pid for _ in range(2)}
            assert len(pids) == 1, pids
            with pytest.raises(FunctionNotFound):
                client.function("gone")
            assert client.deploy("kept", "def handler(e, c):\n    return 3\n").version == 3
    finally:
        assert second.stop() == 0


def test_sigterm_drains(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "state", grace_s=10.0)
    try:
        with Client(srv.target, timeout=60) as client:
            client.deploy("sleep", FUNCS, handler="funcs:sleep")
            client.deploy("marked_sleep", FUNCS, handler="funcs:marked_sleep")
            with grpc.insecure_channel(srv.target) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="sandbox.v1.Sandbox"), timeout=60)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                client.deploy("tick", FUNCS, handler="funcs:tick")
                running = client.stream("tick", 1.5)
                chunks = iter(running)
                assert next(chunks) == "running"  # in flight now
                in_flight: list[InvocationResult] = []

                def finish() -> None:
                    assert list(chunks) == []
                    in_flight.append(running.result())

                thread = threading.Thread(target=finish)
                thread.start()
                below = srv.descendants()
                srv.terminate()
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises((ShuttingDown, DeadlineExceeded)):
                    client.invoke("sleep", 0, timeout=5)
                thread.join(30)
        assert in_flight and in_flight[0].outcome is Outcome.OK, "in-flight calls finish"
        assert srv.wait() == 0
        assert wait_gone(below) == []
    finally:
        if srv.proc.poll() is None:
            srv.kill()
        srv.stop()


def test_sigterm_grace_expires_and_everything_is_killed(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "state", grace_s=0.5)
    try:
        with Client(srv.target, timeout=60) as client:
            client.deploy("marked_sleep", FUNCS, handler="funcs:marked_sleep")
            errors: list[BaseException] = []

            def call() -> None:
                try:
                    client.invoke("marked_sleep", {"mark": "sbx-grace", "seconds": 60})
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=call)
            thread.start()
            worker = find_marked(srv, "sbx-grace")
            below = srv.descendants()
            start = time.monotonic()
            srv.terminate()
            assert srv.wait() == 0
            assert time.monotonic() - start < 15
            thread.join(30)
            assert errors, "the call did not complete normally"
            assert_killed(worker)
            assert wait_gone(below) == []
    finally:
        if srv.proc.poll() is None:
            srv.kill()
        srv.stop()


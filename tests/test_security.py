"""Security of the API (issue 10): real TLS handshakes with certificates made here by the
`openssl` command (a plaintext client and a client trusting another CA are refused; mTLS
refuses clients without a certificate of the right CA), every bearer-token case (none,
unknown, `invoke` on each method, `admin`, `sha256:` tokens, the open health service,
reflection), SIGHUP reloads the tokens without dropping a call in flight, `unix:` sockets are
0600, and a non-loopback listen without TLS and tokens is refused.

Each server here is a real `sandbox serve` subprocess, stopped by its fixture, which checks
that nothing it started is left (the conftest's per-test guard is replaced, as in
test_grpc.py: a module's server keeps warm workers across tests by design).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
from sandbox._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandbox.client import Client, Invocation, RemoteError
from sandbox.errors import ConfigurationError, ShuttingDown
from sandbox.security import TokenTable, check_listen, is_local_address, load_tokens

FUNCS = '''
import time

def echo(event, context):
    return event

def tick(event, context):
    yield "running"
    time.sleep(event)
'''

ADMIN = "admin-token-0123456789abcdef"
INVOKER = "invoke-token-0123456789abcdef"
HASHED_INVOKER = "hashed-invoke-token-fedcba9876543210"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HEALTH_PORT = _free_port()


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Overrides the conftest guard (see the module docstring)."""
    yield


# ---------------------------------------------------------------------------------------------
# Certificates, made by openssl

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                              "extendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return d


def _tokens(path: Path, *lines: str) -> Path:
    path.write_text("# role token\n\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def secured(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """TLS and tokens (an admin, a plain invoke token, a sha256: invoke token), plus metrics."""
    d = tmp_path_factory.mktemp("secured")
    hashed = hashlib.sha256(HASHED_INVOKER.encode()).hexdigest()
    tokens = _tokens(d / "tokens.txt", f"admin {ADMIN}", f"invoke {INVOKER}",
                     f"invoke sha256:{hashed.upper()}")
    srv = ServerProcess(d / "state", "--tls-cert", str(pki / "server.pem"), "--tls-key",
                        str(pki / "server.key"), "--auth-tokens", str(tokens), "--min-idle",
                        "1", "--metrics-listen", "127.0.0.1:0", "--log-format", "json",
                        "--log-level", "info", "--health-listen", f"127.0.0.1:{HEALTH_PORT}",
                        stderr=d / "server.log")
    srv.tokens_file = tokens  # type: ignore[attr-defined]
    srv.log_file = d / "server.log"  # type: ignore[attr-defined]
    try:
        with Client(srv.target, tls_ca=pki / "ca.pem", token=ADMIN, timeout=30) as admin:
            admin.deploy("echo", FUNCS, handler="funcs:echo")
            admin.deploy("tick", FUNCS, handler="funcs:tick")
        yield srv
    except BaseException:
        srv.kill()
        raise
    assert srv.stop() == 0


def _code(exc: BaseException) -> Any:
    if isinstance(exc, RemoteError):
        return exc.code
    if isinstance(exc, grpc.RpcError):
        return exc.code()
    if isinstance(exc, ShuttingDown):  # the client maps UNAVAILABLE to ShuttingDown
        return grpc.StatusCode.UNAVAILABLE
    raise AssertionError(f"unexpected {exc!r}")


# ---------------------------------------------------------------------------------------------
# TLS

def test_tls_handshake_and_refusals(secured: ServerProcess, pki: Path) -> None:
    with Client(secured.target, tls_ca=pki / "ca.pem", token=INVOKER, timeout=30) as client:
        assert client.invoke("echo", "over tls").result == "over tls"
    with pytest.raises((RemoteError, ShuttingDown)) as plain, \
            Client(secured.target, token=INVOKER, timeout=10) as client:
        client.invoke("echo", 1)  # plaintext against a TLS port
    assert _code(plain.value) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((RemoteError, ShuttingDown)) as wrong_ca, \
            Client(secured.target, tls_ca=pki / "other-ca.pem", token=INVOKER,
                   timeout=10) as client:
        client.invoke("echo", 1)
    assert _code(wrong_ca.value) == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def mutual(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """mTLS: client certificates of `ca` required (loopback, no tokens)."""
    d = tmp_path_factory.mktemp("mutual")
    srv = ServerProcess(d / "state", "--tls-cert", str(pki / "server.pem"), "--tls-key",
                        str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
                        "--min-idle", "1")
    try:
        yield srv
    except BaseException:
        srv.kill()
        raise
    assert srv.stop() == 0


def test_mtls_requires_a_client_certificate_of_the_ca(mutual: ServerProcess, pki: Path) -> None:
    with Client(mutual.target, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                tls_key=pki / "client.key", timeout=30) as client:
        client.deploy("echo", FUNCS, handler="funcs:echo")
        assert client.invoke("echo", 7).result == 7
    for cert in (None, "stranger"):
        kwargs = {} if cert is None else {"tls_cert": pki / f"{cert}.pem",
                                          "tls_key": pki / f"{cert}.key"}
        with pytest.raises((RemoteError, ShuttingDown)) as refused, \
                Client(mutual.target, tls_ca=pki / "ca.pem", timeout=10, **kwargs) as client:
            client.functions()
        assert _code(refused.value) == grpc.StatusCode.UNAVAILABLE, cert


# ---------------------------------------------------------------------------------------------
# Tokens and roles

def _channel(srv: ServerProcess, pki: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    return grpc.secure_channel(srv.target, creds)


def _bearer(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", f"Bearer {token}")]


#: (method, request) of every RPC of sandbox.v1.Sandbox, and whether `invoke` may call it
RPCS: list[tuple[str, Any, bool]] = [
    ("Invoke", pb.InvokeRequest(function="echo"), True),
    ("InvokeStream", pb.InvokeStreamRequest(function="echo"), True),
    ("InvokeMany", [pb.InvokeManyRequest(invoke=pb.InvokeRequest(function="echo", id="a"))],
     True),
    ("GetFunction", pb.GetFunctionRequest(name="echo"), True),
    ("ListFunctions", pb.ListFunctionsRequest(), True),
    ("GetInfo", pb.GetInfoRequest(), True),
    ("Deploy", pb.DeployRequest(name="made", source=FUNCS.encode(), handler="funcs:echo"),
     False),
    ("DeleteFunction", pb.DeleteFunctionRequest(name="made"), False),
]


def _call(stub: Any, method: str, request: Any, token: str | None) -> Any:
    call = getattr(stub, method)
    metadata = _bearer(token)
    if method == "InvokeStream":
        return list(call(request, metadata=metadata, timeout=30))
    if method == "InvokeMany":
        return list(call(iter(request), metadata=metadata, timeout=30))
    return call(request, metadata=metadata, timeout=30)


@pytest.mark.parametrize("token", [None, "not-a-known-token-at-all"])
@pytest.mark.parametrize(("method", "request_", "_"), RPCS, ids=[r[0] for r in RPCS])
def test_no_or_unknown_token_is_unauthenticated(secured: ServerProcess, pki: Path,
                                                method: str, request_: Any, _: bool,
                                                token: str | None) -> None:
    with _channel(secured, pki) as channel:
        stub = pb_grpc.SandboxStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            _call(stub, method, request_, token)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("no token" if token is None else "unknown token") in denied.value.details()


@pytest.mark.parametrize("token", [INVOKER, HASHED_INVOKER], ids=["plain", "sha256"])
@pytest.mark.parametrize(("method", "request_", "allowed"), RPCS, ids=[r[0] for r in RPCS])
def test_invoke_role(secured: ServerProcess, pki: Path, method: str, request_: Any,
                     allowed: bool, token: str) -> None:
    with _channel(secured, pki) as channel:
        stub = pb_grpc.SandboxStub(channel)
        if allowed:
            _call(stub, method, request_, token)
            return
        with pytest.raises(grpc.RpcError) as denied:
            _call(stub, method, request_, token)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'invoke'" in denied.value.details() and "admin" in denied.value.details()


def test_admin_role_may_do_everything(secured: ServerProcess, pki: Path) -> None:
    with _channel(secured, pki) as channel:
        stub = pb_grpc.SandboxStub(channel)
        for method, request, _ in RPCS:
            _call(stub, method, request, ADMIN)


def test_health_alone_in_plaintext_on_the_health_port(secured: ServerProcess) -> None:
    """--health-listen: what a probe without TLS (Kubernetes' native gRPC probe) can reach,
    and nothing else."""
    with grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sandbox.v1.Sandbox"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.SandboxStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_is_open_reflection_needs_a_token(secured: ServerProcess, pki: Path) -> None:
    with _channel(secured, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as denied:
            list(reflect.ServerReflectionInfo(iter([request]), timeout=10))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(reflect.ServerReflectionInfo(iter([request]), timeout=10,
                                                    metadata=_bearer(INVOKER)))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "sandbox.v1.Sandbox" in names


def test_denials_are_counted_in_the_rpc_metrics(secured: ServerProcess, pki: Path) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def denied() -> float:
        assert secured.metrics_url is not None
        with urllib.request.urlopen(secured.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "grpc_server_handled_total"
                   and s.labels == {"grpc_type": "unary", "grpc_service": "sandbox.v1.Sandbox",
                                    "grpc_method": "GetInfo",
                                    "grpc_code": "UNAUTHENTICATED"})

    before = denied()
    with _channel(secured, pki) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.SandboxStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    assert denied() == before + 1


def test_client_and_cli_send_the_token(secured: ServerProcess, pki: Path) -> None:
    with Client(secured.target, tls_ca=pki / "ca.pem", token=INVOKER, timeout=30) as client:
        results = list(client.invoke_many([Invocation("echo", i, id=str(i)) for i in range(3)]))
        assert sorted(r.result for r in results) == [0, 1, 2]  # type: ignore[union-attr]
        with pytest.raises(RemoteError) as denied:
            client.deploy("nope", FUNCS, handler="funcs:echo")
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    cli = [sys.executable, "-m", "sandbox.remote_cli", "invoke", "echo", '"cli"', "--target",
           secured.target, "--tls-ca", str(pki / "ca.pem")]
    env = {k: v for k, v in os.environ.items() if k != "SANDBOX_TOKEN"}
    ok = subprocess.run([*cli, "--token", INVOKER], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["result"] == "cli"
    from_env = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**env, "SANDBOX_TOKEN": INVOKER})
    assert from_env.returncode == 0, from_env.stderr
    missing = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 2
    assert "UNAUTHENTICATED" in missing.stderr and "Traceback" not in missing.stderr


def test_sighup_reloads_tokens_without_dropping_a_call(secured: ServerProcess,
                                                       pki: Path) -> None:
    tokens: Path = secured.tokens_file  # type: ignore[attr-defined]
    original = tokens.read_text()
    fresh = "fresh-invoke-token-00112233445566"
    with Client(secured.target, tls_ca=pki / "ca.pem", token=INVOKER, timeout=60) as old:
        stream = old.stream("tick", 3)  # in flight across the reload
        chunks = iter(stream)
        assert next(chunks) == "running"
        try:
            _tokens(tokens, f"admin {ADMIN}", f"invoke {fresh}")
            secured.proc.send_signal(signal.SIGHUP)
            with Client(secured.target, tls_ca=pki / "ca.pem", token=fresh,
                        timeout=30) as new:
                _eventually_accepted(new)
            assert stream.result().ok  # the call that was in flight finished normally
            with pytest.raises(RemoteError) as gone:
                old.invoke("echo", 1)
            assert gone.value.code == grpc.StatusCode.UNAUTHENTICATED

            # A file that does not parse changes nothing (and the server says why).
            tokens.write_text("superuser x\n")
            secured.proc.send_signal(signal.SIGHUP)
            log: Path = secured.log_file  # type: ignore[attr-defined]
            _eventually(lambda: any(
                json.loads(line).get("event") == "auth_reload"
                and json.loads(line).get("ok") is False
                for line in log.read_text().splitlines()))
            with Client(secured.target, tls_ca=pki / "ca.pem", token=fresh,
                        timeout=30) as new:
                assert new.invoke("echo", 2).result == 2
        finally:
            tokens.write_text(original)
            secured.proc.send_signal(signal.SIGHUP)
            with Client(secured.target, tls_ca=pki / "ca.pem", token=INVOKER,
                        timeout=30) as back:
                _eventually_accepted(back)


def _eventually(check: Any, timeout: float = 30.0) -> None:
    """The server handles SIGHUP on its own time: poll (a deadline guard, not a sleep)."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the server did not reload its tokens"
        time.sleep(0.02)


def _eventually_accepted(client: Client) -> None:
    def accepted() -> bool:
        try:
            return bool(client.invoke("echo", 0).ok)
        except RemoteError as exc:
            assert exc.code == grpc.StatusCode.UNAUTHENTICATED
            return False

    _eventually(accepted)


# ---------------------------------------------------------------------------------------------
# Unix sockets and the listen policy

def test_unix_socket_is_owner_only(tmp_path: Path) -> None:
    sock = tmp_path / "sandbox.sock"
    srv = ServerProcess(tmp_path / "state", "--listen", f"unix:{sock}", "--min-idle", "1")
    try:
        assert srv.target == f"unix:{sock}"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with Client(srv.target, timeout=30) as client:
            client.deploy("echo", FUNCS, handler="funcs:echo")
            assert client.invoke("echo", "local").result == "local"
    except BaseException:
        srv.kill()
        raise
    assert srv.stop() == 0


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.0.1:50051", True), ("127.0.0.2:1", True), ("[::1]:50051", True),
    ("localhost:50051", True), ("unix:/run/sandbox.sock", True),
    ("unix:///run/sandbox.sock", True), ("0.0.0.0:50051", False), ("[::]:50051", False),
    (":50051", False), ("192.0.2.10:50051", False),
])
def test_local_addresses(address: str, local: bool) -> None:
    assert is_local_address(address) is local


def test_listen_policy() -> None:
    check_listen("127.0.0.1:1", tls=False, auth=False, insecure=False)
    check_listen("0.0.0.0:1", tls=True, auth=True, insecure=False)
    check_listen("0.0.0.0:1", tls=False, auth=False, insecure=True)
    for tls, auth, missing in ((False, False, "no TLS"), (True, False, "no authentication"),
                               (False, True, "no TLS")):
        with pytest.raises(ConfigurationError, match=missing):
            check_listen("0.0.0.0:1", tls=tls, auth=auth, insecure=False)


def test_serve_refuses_a_public_address_without_tls_and_tokens(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox.remote_cli", "serve", "--listen", "0.0.0.0:0",
         "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on '0.0.0.0:0'" in proc.stderr
    assert "--insecure" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


@pytest.mark.parametrize(("content", "match"), [
    ("", "no token in the file"),
    ("# only a comment\n", "no token in the file"),
    ("invoke\n", "line 1: expected ROLE TOKEN"),
    ("invoke a b\n", "line 1: expected ROLE TOKEN"),
    ("\nroot 0123456789abcdef0123\n", "line 2: unknown role 'root'"),
    ("invoke short\n", "line 1: the token is 5 characters; use at least 16"),
    ("admin sha256:abc\n", "line 1: sha256: must be followed by 64 hex digits"),
    (f"admin sha256:{'g' * 64}\n", "line 1: sha256: must be followed by 64 hex digits"),
    (f"admin {ADMIN}\ninvoke {ADMIN}\n", "line 2: this token is already given the role"),
])
def test_token_file_errors_name_the_line(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=match) as info:
        load_tokens(path)
    assert ADMIN not in str(info.value)  # a token never appears in a message


def test_token_table_roles(tmp_path: Path) -> None:
    digest = hashlib.sha256(HASHED_INVOKER.encode()).hexdigest()
    table = TokenTable(_tokens(tmp_path / "t", f"admin {ADMIN}", f"invoke sha256:{digest}"))
    assert (table.role(ADMIN), table.role(HASHED_INVOKER), table.role("x")) == \
        ("admin", "invoke", None)
    assert len(table) == 2


@pytest.mark.parametrize(("args", "match"), [
    (["--tls-cert", "x.pem"], "give --tls-cert and --tls-key together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
    (["--auth-tokens", "/nonexistent/tokens"], "cannot read it"),
])
def test_serve_rejects_bad_security_flags(tmp_path: Path, args: list[str], match: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox.remote_cli", "serve", "--listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path / "state"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert match in proc.stderr and "Traceback" not in proc.stderr


def test_mismatched_key_is_a_start_up_error(pki: Path) -> None:
    from sandbox.security import server_credentials

    with pytest.raises(ConfigurationError, match="--tls-cert"):
        server_credentials(pki / "server.pem", pki / "client.key")
    with pytest.raises(ConfigurationError, match="not a PEM file"):
        server_credentials(pki / "server.ext", pki / "server.key")

r"""The liveness probe of a `sandbox serve` pod: one grpc.health.v1 ``Check`` from inside the pod.

The kubelet's own gRPC probe cannot speak TLS, and the server's port is TLS; this probe can.
Exit status 0 when the server answers SERVING, 1 otherwise (the reason on stderr)::

    python healthcheck.py --addr=127.0.0.1:50051 --ca=/etc/sandbox/tls/ca.crt \
        --server-name=localhost

``--server-name`` is the name checked in the server's certificate (the probe dials 127.0.0.1);
without ``--ca`` the probe speaks plaintext. ``--cert``/``--key`` for a server that requires
client certificates (``--tls-client-ca``). The health service needs no token.

It needs nothing but grpcio and grpcio-health-checking (dependencies of the sandbox package),
so it is copied into the image on its own (deploy/Dockerfile).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check(addr: str, *, ca: str | None = None, server_name: str = "localhost",
          cert: str | None = None, key: str | None = None, service: str = "",
          timeout: float = 5.0) -> str:
    """The serving status of ``service`` at ``addr`` (``"SERVING"``, ``"NOT_SERVING"``...).

    Raises:
        grpc.RpcError: the call failed (unreachable, TLS handshake refused, deadline).
    """
    if ca is not None:
        credentials = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))
        channel = grpc.secure_channel(addr, credentials, options=[
            ("grpc.ssl_target_name_override", server_name),
            ("grpc.default_authority", server_name)])
    else:
        channel = grpc.insecure_channel(addr)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--ca", help="PEM of the CA the server's certificate chains to")
    parser.add_argument("--server-name", default="localhost",
                        help="the name to verify in the server's certificate")
    parser.add_argument("--cert", help="client certificate (PEM), for mTLS")
    parser.add_argument("--key", help="its key")
    parser.add_argument("--service", default="",
                        help="the health service name ('' is the server as a whole)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        status = check(args.addr, ca=args.ca, server_name=args.server_name, cert=args.cert,
                       key=args.key, service=args.service, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"health check of {args.addr} failed: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"health check of {args.addr}: {exc}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{args.addr}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

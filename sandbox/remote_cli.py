"""The gRPC subcommands of the ``sandbox`` command line: ``serve``, ``deploy``, ``invoke``,
``functions``, ``info``, and for asynchronous invocations ``invoke --async``, ``invocations``
and ``invocation ID`` (``--cancel``, ``--redrive``, ``--wait``).

:func:`add_subcommands` adds them to an argparse subparsers object (``sandbox.cli`` does);
each sets ``func=handler(args) -> int`` (the exit status). The client commands take
``--target`` (default ``$SANDBOX_TARGET`` or ``localhost:50051``; any gRPC target, or a list
``IP:PORT,IP:PORT`` of a fleet's replicas, balanced round_robin), ``--tls-ca`` (and
``--tls-cert``/``--tls-key`` for mTLS, ``--tls-server-name`` for a list of addresses) and
``--token`` (default ``$SANDBOX_TOKEN``), and print JSON: ``invoke`` prints the same object as
``sandbox run``; ``invoke --idempotent`` lets a call cut off by a lost replica run again on
another.

Exit status: 0 success (``invoke``: outcome OK); 1 ``invoke`` ended with another outcome; 2 the
call itself failed (unknown function, bad request, server unavailable...), message on stderr.

    sandbox serve --listen 127.0.0.1:50051 --state-dir ./state --preload json
    sandbox serve --listen 0.0.0.0:50051 --tls-cert srv.pem --tls-key srv.key \
                  --auth-tokens tokens.txt --metrics-listen 127.0.0.1:9464 --log-format json
    sandbox deploy --target localhost:50051 add add.py --handler add:handler
    sandbox invoke add '{"a": 1}'
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sandbox.errors import SandboxError
from sandbox.limits import DEFAULT_LIMITS, Limits, parse_size

__all__ = ["add_subcommands", "main", "parse_limits"]

DEFAULT_LISTEN = "127.0.0.1:50051"


def _default_target() -> str:
    return os.environ.get("SANDBOX_TARGET", "localhost:50051")


_SECONDS = {"wall_timeout_s", "cpu_time_s"}
_COUNTS = {"max_processes", "max_open_files"}
_SIZES = {"memory_bytes", "max_file_size_bytes", "max_result_bytes", "max_log_bytes"}


def parse_limits(items: Sequence[str] | None, base: Limits | None = None) -> Limits | None:
    """``["wall_timeout_s=2", "memory_bytes=256MiB", "network=true"]`` as Limits, the fields
    not given taken from ``base`` (unset when None). None if there are no items.

    Raises:
        ValueError: an unknown field or a bad value, named in the message.
    """
    if not items:
        return None
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(Limits)}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or key not in known:
            raise ValueError(f"--limit {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted(known))}")
        try:
            if key in _SECONDS:
                values[key] = float(text)
            elif key in _COUNTS:
                values[key] = int(text)
            elif key in _SIZES:
                values[key] = parse_size(text)
            else:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                values[key] = lowered in ("true", "1", "yes")
        except ValueError as exc:
            raise ValueError(f"--limit {item!r}: {exc}") from None
    return base.replace(**values) if base is not None else Limits(**values)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default), flush=True)


def _fail(exc: BaseException) -> int:
    print(f"sandbox: error: {exc}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# Handlers

def _serve(args: argparse.Namespace) -> int:
    if args.log_format == "json":
        # gRPC's C core writes its own (non-JSON) lines to stderr, e.g. for every failed TLS
        # handshake: silenced unless the operator asks for them. Before grpc is imported.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from sandbox.logs import configure
    from sandbox.server import Security, serve

    configure(args.log_format, args.log_level)
    security = Security(tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_client_ca=args.tls_client_ca, auth_tokens=args.auth_tokens,
                        insecure=args.insecure)
    try:
        defaults = parse_limits(args.limit, DEFAULT_LIMITS)
        max_limits = parse_limits(args.max_limit)
    except (ValueError, TypeError) as exc:
        return _fail(exc)
    preload = [[m.strip() for m in item.split(",") if m.strip()] for item in args.preload]

    def ready(host: str, port: int) -> None:
        print(f"sandbox listening on {host}:{port}" if port else f"sandbox listening on {host}",
              flush=True)

    def metrics_ready(url: str) -> None:
        print(f"sandbox metrics on {url}", flush=True)

    try:
        asyncio.run(serve(
            args.listen, args.state_dir, preload=preload, limits=defaults, max_limits=max_limits,
            min_idle=args.min_idle, max_idle=args.max_idle, idle_ttl_s=args.idle_ttl,
            max_concurrency=args.workers, max_queue=args.max_queue,
            grace_s=args.grace, invoke_many_window=args.invoke_many_window,
            max_message_bytes=args.max_message_size, ready=ready, isolation=args.isolation,
            security=security, metrics_listen=args.metrics_listen,
            metrics_ready=metrics_ready, node_name=args.node_name, store_url=args.store,
            health_listen=args.health_listen,
            async_concurrency=args.async_workers, async_max_queued=args.async_max_queue,
            async_max_queued_per_function=args.async_max_queue_per_function,
            async_lease_s=args.async_lease))
    except SandboxError as exc:
        return _fail(exc)
    return 0


def _client(args: argparse.Namespace) -> Any:
    from sandbox.client import Client

    return Client(args.target, timeout=args.timeout, tls_ca=args.tls_ca,
                  tls_cert=args.tls_cert, tls_key=args.tls_key, token=args.token or None,
                  tls_server_name=args.tls_server_name)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 1 and {2**32 - 1}, got {value}")
    return value


def _deploy(args: argparse.Namespace) -> int:
    try:
        limits = parse_limits(args.limit)
        preload = [m.strip() for item in args.preload for m in item.split(",") if m.strip()]
        with _client(args) as client:
            fn = client.deploy(args.name, Path(args.source), handler=args.handler,
                               preload=preload, limits=limits, reuse=args.reuse,
                               async_policy=parse_policy(args.async_policy))
    except (SandboxError, ValueError, OSError) as exc:
        return _fail(exc)
    _print_json(fn.to_dict())
    return 0


def _read_event(args: argparse.Namespace) -> Any:
    if args.event is not None and args.event_file is not None:
        raise ValueError("give the event as an argument or with --event-file, not both")
    if args.event_file is not None:
        text = sys.stdin.read() if args.event_file == "-" else Path(args.event_file).read_text()
    elif args.event is not None:
        text = args.event
    else:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the event is not JSON: {exc}") from None


def _invoke(args: argparse.Namespace) -> int:
    if args.async_:
        return _invoke_async(args)
    try:
        if args.stream and args.idempotent:
            raise ValueError("--idempotent applies to unary calls, not to --stream")
        event = _read_event(args)
        limits = parse_limits(args.limit)
        with _client(args) as client:
            kwargs: dict[str, Any] = {"version": args.version, "limits": limits, "id": args.id}
            if args.stream:
                stream = client.stream(args.function, event, **kwargs)
                for chunk in stream:
                    print(json.dumps({"chunk": chunk}, default=_json_default), flush=True)
                result = stream.result()
            else:
                result = client.invoke(args.function, event, idempotent=args.idempotent,
                                       **kwargs)
    except (SandboxError, ValueError, OSError) as exc:
        return _fail(exc)
    _print_json(result.to_dict())
    return 0 if result.ok else 1


def parse_policy(items: Sequence[str] | None) -> dict[str, Any] | None:
    """``["max_retries=0", "retry_on=TIMEOUT,CRASHED"]`` as the fields of an async policy
    (checked); None if there are no items.

    Raises:
        ValueError: an unknown field or a bad value, named in the message.
    """
    if not items:
        return None
    from sandbox.asyncq import AsyncPolicy

    fields: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep:
            raise ValueError(f"--async-policy {item!r}: expected FIELD=VALUE")
        try:
            if key == "retry_on":
                fields[key] = [o.strip().upper() for o in text.split(",") if o.strip()]
            elif key == "max_retries":
                fields[key] = int(text)
            else:
                fields[key] = float(text)
        except ValueError as exc:
            raise ValueError(f"--async-policy {item!r}: {exc}") from None
    AsyncPolicy.from_dict(fields)  # InvalidRequest (a ValueError) names what is wrong
    return fields


def _invoke_async(args: argparse.Namespace) -> int:
    try:
        if args.stream or args.id:
            raise ValueError("--async makes its own id and has no stream: drop --stream/--id")
        event = _read_event(args)
        limits = parse_limits(args.limit)
        policy = parse_policy(args.async_policy)
        with _client(args) as client:
            queued = client.invoke_async(args.function, event, version=args.version,
                                         limits=limits, idempotency_key=args.idempotency_key,
                                         policy=policy)
            if args.wait is None:
                _print_json({"id": queued.id, "state": queued.state.value,
                             "duplicate": queued.duplicate})
                return 0
            found = client.wait_invocation(queued.id, args.wait)
    except (SandboxError, ValueError, OSError, TimeoutError) as exc:
        return _fail(exc)
    _print_json(found.to_dict())
    return 0 if found.state.value == "SUCCEEDED" else 1


def _invocations(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            items, token = client.invocations(args.function, args.state,
                                              page_size=args.page_size,
                                              page_token=args.page_token)
    except SandboxError as exc:
        return _fail(exc)
    _print_json({"invocations": [_summary(i) for i in items], "next_page_token": token})
    return 0


def _summary(inv: Any) -> dict[str, Any]:
    last = inv.attempts[-1] if inv.attempts else None
    return {"id": inv.id, "function": inv.function, "version": inv.version,
            "state": inv.state.value, "attempts": len(inv.attempts),
            "last_outcome": None if last is None or last.outcome is None
            else last.outcome.value, "reason": inv.reason, "created": inv.created}


def _invocation(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            if args.cancel:
                found = client.cancel_invocation(args.id)
            elif args.redrive:
                found = client.redrive(args.id)
            elif args.wait is not None:
                found = client.wait_invocation(args.id, args.wait)
            else:
                found = client.invocation(args.id)
    except (SandboxError, TimeoutError) as exc:
        return _fail(exc)
    _print_json(found.to_dict())
    return 0


def _functions(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            if args.delete is not None:
                deleted = client.delete(args.delete, args.version)
                _print_json({"name": args.delete, "deleted_versions": deleted})
                return 0
            if args.name is not None:
                fns = [client.function(args.name, args.version)]
            else:
                fns = client.functions(all_versions=args.all)
    except SandboxError as exc:
        return _fail(exc)
    _print_json([fn.to_dict() for fn in fns])
    return 0


def _info(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            info = client.info()
    except SandboxError as exc:
        return _fail(exc)
    _print_json(info)
    return 0


# ---------------------------------------------------------------------------------------------
# Parsers

def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=_default_target(),
                        help="the server: host:port, or a fleet's replicas as any gRPC target "
                             "(dns:///NAME:PORT, ipv4:IP:PORT,IP:PORT, or simply "
                             "IP:PORT,IP:PORT), calls balanced round_robin over them; reads and "
                             "deploys that fail UNAVAILABLE are retried on another (default: "
                             "$SANDBOX_TARGET or %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="deadline of the call (caps the function's wall timeout)")
    parser.add_argument("--tls-ca", default=None, metavar="FILE",
                        help="connect over TLS, verifying the server with this CA (PEM)")
    parser.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="this client's certificate (PEM), for a server that requires one")
    parser.add_argument("--tls-key", default=None, metavar="FILE",
                        help="the key of --tls-cert (PEM)")
    parser.add_argument("--tls-server-name", default=None, metavar="NAME",
                        help="the name the server certificate must carry, when the target "
                             "does not say it (a list of addresses); implies TLS")
    parser.add_argument("--token", default=os.environ.get("SANDBOX_TOKEN"), metavar="TOKEN",
                        help="bearer token sent with every call (default: $SANDBOX_TOKEN)")


def _add_limit(parser: argparse.ArgumentParser, flag: str = "--limit", what: str = "") -> None:
    parser.add_argument(flag, action="append", default=[], metavar="FIELD=VALUE",
                        help=f"{what}a limit, e.g. wall_timeout_s=2, memory_bytes=256MiB, "
                             "network=true (repeatable)")


def add_subcommands(subparsers: Any) -> None:
    """Add ``serve``, ``deploy``, ``invoke``, ``functions``, ``info``, ``invocations`` and
    ``invocation`` to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    p = subparsers.add_parser("serve", help="run the gRPC server",
                              description="Run the gRPC server until SIGTERM/SIGINT, then "
                                          "drain.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR",
                   help="address to listen on, host:port (port 0 picks one) or unix:PATH "
                        "(mode 0600); a non-loopback address needs --tls-cert, --tls-key and "
                        "--auth-tokens, or --insecure (default: %(default)s)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where deployed functions persist (default: $SANDBOX_STATE_DIR, else "
                        "~/.local/state/sandbox)")
    p.add_argument("--isolation", choices=["strict", "best-effort", "off"], default=None,
                   help="isolation layers: strict refuses to start without every layer "
                        "(default as root), best-effort runs with what the kernel gives "
                        "(default otherwise); `sandbox doctor` shows what is there")
    p.add_argument("--preload", action="append", default=[], metavar="MOD[,MOD...]",
                   help="a preload profile to warm at start (repeatable)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="invocations running at once (default: 4 per CPU)")
    p.add_argument("--min-idle", type=int, default=2, metavar="N",
                   help="warm workers always kept per profile; 0 lets a silent profile scale "
                        "to zero (default: %(default)s)")
    p.add_argument("--max-idle", type=int, default=None, metavar="N",
                   help="most warm workers per profile; between the two the pool follows "
                        "demand (default: 4 per CPU, at least 8)")
    p.add_argument("--idle-ttl", type=float, default=60.0, metavar="SECONDS",
                   help="warm workers above the demand are let go after this long idle "
                        "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=4096, metavar="N",
                   help="invocations waiting before RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="how long in-flight calls may finish after SIGTERM (default: "
                        "%(default)s)")
    _add_limit(p, "--limit", "default ")
    _add_limit(p, "--max-limit", "maximum: ")
    p.add_argument("--invoke-many-window", type=int, default=256, metavar="N",
                   help="InvokeMany requests read ahead of their results, per stream")
    p.add_argument("--max-message-size", type=parse_size, default=64 * 1024 * 1024,
                   metavar="SIZE", help="largest request accepted (default: 64MiB)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="info includes one access-log line per invocation (default: "
                        "%(default)s)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="stderr lines for a terminal, or one JSON object per line (default: "
                        "%(default)s)")
    p.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (port 0 picks "
                        "one)")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="serve over TLS with this certificate (PEM; with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="the key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="FILE",
                   help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--auth-tokens", default=None, metavar="FILE",
                   help="require a bearer token: one 'ROLE TOKEN' per line, ROLE invoke or "
                        "admin, TOKEN the secret or sha256:HEX; reloaded on SIGHUP")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --listen without TLS and tokens")
    p.add_argument("--health-listen", default=None, metavar="HOST:PORT",
                   help="also serve the gRPC health service alone, in plaintext, on this "
                        "address: for probes that speak no TLS, such as Kubernetes' native "
                        "gRPC probes, when --listen has TLS")
    p.add_argument("--store", default=os.environ.get("SANDBOX_STORE") or None, metavar="URL",
                   help="a fleet's shared function store, postgresql://USER:PASSWORD@HOST/DB: "
                        "every server given the same URL serves the same functions, mirrored "
                        "in --state-dir (default: $SANDBOX_STORE, else --state-dir alone)")
    p.add_argument("--node-name", default=os.environ.get("SANDBOX_NODE_NAME") or None,
                   metavar="NAME",
                   help="this server's name in a fleet, reported by GetInfo, in every "
                        "result's stats.node and in the access log (default: "
                        "$SANDBOX_NODE_NAME, else hostname:port)")
    p.add_argument("--async-workers", type=int, default=None, metavar="N",
                   help="asynchronous attempts running at once (default: half of --workers), "
                        "so synchronous calls keep the rest")
    p.add_argument("--async-max-queue", type=int, default=100_000, metavar="N",
                   help="asynchronous invocations queued or running before InvokeAsync fails "
                        "RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--async-max-queue-per-function", type=int, default=10_000, metavar="N",
                   help="the same, per function (default: %(default)s)")
    p.add_argument("--async-lease", type=float, default=30.0, metavar="SECONDS",
                   help="an asynchronous attempt's lease, renewed every third of it while it "
                        "runs: a replica that dies mid-attempt has it retried this long after "
                        "(default: %(default)s)")
    p.set_defaults(func=_serve)

    p = subparsers.add_parser("deploy", help="deploy a function to a server")
    p.add_argument("name", help="the function's name")
    p.add_argument("source", help="a .py file or a .zip of modules")
    p.add_argument("--handler", default="",
                   help="module:function (for a .py: the module names the file; default "
                        "main:handler)")
    p.add_argument("--preload", action="append", default=[], metavar="MOD[,MOD...]",
                   help="modules to import in the zygote before forking")
    p.add_argument("--reuse", type=_positive_int, default=1, metavar="N",
                   help="invocations one worker serves before it is replaced (default 1: a "
                        "fresh process for every invocation)")
    _add_limit(p, what="default ")
    _add_target(p)
    p.add_argument("--async-policy", action="append", default=[], metavar="FIELD=VALUE",
                   help="the async policy: max_retries (default 2), max_event_age_s (21600), "
                        "retry_on (outcomes, comma-separated; default all but OK and "
                        "CANCELLED), backoff_initial_s, backoff_multiplier, backoff_max_s, "
                        "jitter, retention_s (86400) (repeatable)")
    p.set_defaults(func=_deploy)

    p = subparsers.add_parser("invoke", help="invoke a deployed function; print its result")
    p.add_argument("function")
    p.add_argument("event", nargs="?", default=None, help="the event, as JSON")
    p.add_argument("--event-file", default=None, metavar="PATH",
                   help="read the event (JSON) from a file, '-' for stdin")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--id", default=None, help="an invocation id of yours")
    p.add_argument("--stream", action="store_true",
                   help="print each chunk of a generator as a JSON line as it comes")
    p.add_argument("--idempotent", action="store_true",
                   help="running the function twice is harmless: a call cut off by a lost "
                        "replica (UNAVAILABLE) is retried on another; without it such a call "
                        "fails and is never run again (a draining server's refusal is always "
                        "retried: nothing ran); not with --stream")
    _add_limit(p)
    _add_target(p)
    p.add_argument("--async", dest="async_", action="store_true",
                   help="queue the invocation durably and print its id at once (see "
                        "`sandbox invocation ID`); retried and dead-lettered as the function's "
                        "async policy says")
    p.add_argument("--idempotency-key", default=None, metavar="KEY",
                   help="with --async: the same key returns the first invocation's id")
    p.add_argument("--async-policy", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --async: override a field of the function's async policy, e.g. "
                        "max_retries=0 (repeatable)")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="with --async: wait until it is terminal and print it")
    p.set_defaults(func=_invoke)

    p = subparsers.add_parser("functions", help="list (or show, or delete) deployed functions")
    p.add_argument("name", nargs="?", default=None, help="show this function only")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--all", action="store_true", help="every version, not only the latest")
    p.add_argument("--delete", default=None, metavar="NAME",
                   help="delete a function (every version, or --version)")
    _add_target(p)
    p.set_defaults(func=_functions)

    p = subparsers.add_parser("info", help="server version, profiles, pools, isolation")
    _add_target(p)
    p.set_defaults(func=_info)

    p = subparsers.add_parser("invocations", help="list asynchronous invocations")
    p.add_argument("--function", default=None, help="only this function's")
    p.add_argument("--state", default=None, type=str.upper,
                   choices=["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "DEAD_LETTERED",
                            "CANCELLED"], help="only those in this state")
    p.add_argument("--page-size", type=int, default=100, metavar="N")
    p.add_argument("--page-token", default="", metavar="TOKEN",
                   help="next_page_token of the previous page")
    _add_target(p)
    p.set_defaults(func=_invocations)

    p = subparsers.add_parser("invocation", help="show (or cancel, or redrive) one "
                                                 "asynchronous invocation")
    p.add_argument("id")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--cancel", action="store_true",
                        help="cancel it (QUEUED or RUNNING: it ends CANCELLED)")
    action.add_argument("--redrive", action="store_true",
                        help="queue a DEAD_LETTERED invocation again, with a fresh budget")
    action.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                        help="wait until it is terminal")
    _add_target(p)
    p.set_defaults(func=_invocation)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these subcommands on its own (``python -m sandbox.remote_cli``)."""
    parser = argparse.ArgumentParser(prog="sandbox")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())

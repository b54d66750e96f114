"""Clients of a ``sandbox serve`` server: :class:`Client` (blocking) and :class:`AsyncClient`.

Both cover every RPC of ``sandbox.v1.Sandbox`` and speak the embedded vocabulary: an invocation
returns a :class:`sandbox.outcome.InvocationResult` whatever its outcome, and a problem with the
*call* raises the exception the embedded runtime would::

    NOT_FOUND           -> FunctionNotFound       INVALID_ARGUMENT  -> InvalidRequest
    RESOURCE_EXHAUSTED  -> Overloaded             UNAVAILABLE       -> ShuttingDown
    DEADLINE_EXCEEDED   -> DeadlineExceeded       anything else     -> RemoteError

(each raised ``from`` the ``grpc.RpcError``). Events are encoded in the client (msgpack by
default, or JSON) and results decoded there, so the server never decodes a payload it only
passes through.

    with Client("localhost:50051") as client:
        client.deploy("add", "def handler(event, context):\\n    return event['a'] + 1\\n")
        client.invoke("add", {"a": 1}).unwrap()      # 2

A server with TLS and tokens (``sandbox serve --tls-cert ... --auth-tokens ...``)::

    Client("sandbox.example:50051", tls_ca="ca.pem", token="...")    # + tls_cert/tls_key: mTLS

A denied call raises :class:`RemoteError` with ``UNAUTHENTICATED`` or ``PERMISSION_DENIED``.

A fleet (several ``sandbox serve`` replicas): the target may be any gRPC target, and calls are
spread over its addresses ``round_robin``::

    Client("dns:///sandbox.ns.svc:50051")               # every address the name resolves to
    Client("ipv4:10.0.0.1:50051,10.0.0.2:50051")        # these replicas
    Client("10.0.0.1:50051,10.0.0.2:50051")             # the same, spelled as a plain list

Calls that failed ``UNAVAILABLE`` are tried again (on another replica, by round_robin) only
when that cannot run anything twice: the reads (``function``, ``versions``, ``functions``,
``info``) and ``deploy`` (idempotent: the server returns the latest version when it is this
very deployment already), by gRPC itself through the channel's service config; an invocation
the server refused before running it (it was draining, and said so); and an invocation whose
caller says ``invoke(..., idempotent=True)``. Nothing else is retried (``delete``, a
non-idempotent invocation that may have run, streams), except by gRPC's transparent retries,
which are on and only resend a call that never reached the server. See :class:`RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import msgpack

from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
from sandbox._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandbox.asyncq import AsyncPolicy, InvocationNotFound, InvocationState, QueuedInvocation
from sandbox.asyncq_wire import (
    invocation_from_proto,
    policy_fields_from_proto,
    policy_to_proto,
    state_from_proto,
    state_to_proto,
)
from sandbox.errors import (
    ConfigurationError,
    FunctionNotFound,
    InvalidRequest,
    Overloaded,
    SandboxError,
    ShuttingDown,
)
from sandbox.limits import Limits
from sandbox.outcome import InvocationResult
from sandbox.security import channel_credentials
from sandbox.wire import (
    CONTENT_TYPES,
    DEFAULT_MAX_MESSAGE_BYTES,
    REFUSED_METADATA_KEY,
    limits_from_proto,
    limits_to_proto,
    result_from_proto,
    source_format_from_proto,
    source_format_to_proto,
)

__all__ = [
    "DEFAULT_TARGET",
    "RETRIED_METHODS",
    "AsyncClient",
    "AsyncResultStream",
    "AsyncSubmission",
    "Client",
    "DeadlineExceeded",
    "Invocation",
    "InvocationRejected",
    "RemoteError",
    "RemoteFunction",
    "ResultStream",
    "RetryPolicy",
    "default_service_config",
    "grpc_target",
]

DEFAULT_TARGET = "localhost:50051"
MSGPACK, JSON = CONTENT_TYPES


class RemoteError(SandboxError):
    """The RPC failed with a status the embedded API has no exception for.

    Attributes:
        code: the ``grpc.StatusCode``.
        details: the server's message.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class DeadlineExceeded(RemoteError, TimeoutError):
    """The call's deadline (``timeout``) passed; the server killed the function's worker."""


_ERRORS: dict[grpc.StatusCode, type[SandboxError]] = {
    grpc.StatusCode.NOT_FOUND: FunctionNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: ShuttingDown,
}
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _error(code: grpc.StatusCode, details: str) -> SandboxError:
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(code, details)
    kind = _ERRORS.get(code)
    return kind(details) if kind is not None else RemoteError(code, details)


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN


def _translate(exc: grpc.RpcError) -> SandboxError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    return _error(code, details)


# ---------------------------------------------------------------------------------------------
# Fleets: targets, load balancing, retries

SERVICE = pb.DESCRIPTOR.services_by_name["Sandbox"].full_name
#: The methods gRPC retries on UNAVAILABLE: the reads (every ``Get*`` and ``List*``), and
#: ``Deploy`` (idempotent); never ``DeleteFunction``, never an invocation (see
#: :meth:`Client.invoke`'s ``idempotent``).
RETRIED_METHODS = (*sorted(m.name for m in pb.DESCRIPTOR.services_by_name["Sandbox"].methods
                           if m.name.startswith(("Get", "List"))), "Deploy")
#: gRPC's own default retry buffer per call (a call bigger than this is not retried).
_GRPC_RETRY_BUFFER = 256 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a call that failed ``UNAVAILABLE`` is tried again (gRPC's retry policy, used both in
    the channel's service config and by the client for invocations).

    Attributes:
        max_attempts: attempts in all, the first one included (1: no retries; gRPC allows at
            most 5).
        initial_backoff_s, max_backoff_s, backoff_multiplier: the pause before retry ``n``
            (1, 2, ...) is random in ``[0, min(initial_backoff_s * backoff_multiplier **
            (n - 1), max_backoff_s)]``, as gRPC does. The call's deadline (``timeout``) covers
            every attempt and pause: no retry starts once it would pass.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or not 1 <= self.max_attempts <= 5:
            raise ConfigurationError(f"RetryPolicy.max_attempts must be an int from 1 to 5, got "
                                     f"{self.max_attempts!r}")
        for name in ("initial_backoff_s", "max_backoff_s", "backoff_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
                    or value == float("inf"):
                raise ConfigurationError(f"RetryPolicy.{name} must be a positive number, got "
                                         f"{value!r}")

    def backoff(self, retry: int) -> float:
        """The pause before retry ``retry`` (1 for the first), seconds: random, as gRPC's."""
        ceiling = min(self.initial_backoff_s * self.backoff_multiplier ** (retry - 1),
                      self.max_backoff_s)
        return random.uniform(0.0, ceiling)

    def to_service_config(self) -> dict[str, Any]:
        """The ``retryPolicy`` of a gRPC service config, retrying ``UNAVAILABLE``."""
        return {"maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s:.9g}s",
                "maxBackoff": f"{self.max_backoff_s:.9g}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"]}


DEFAULT_RETRY = RetryPolicy()


def default_service_config(load_balancing: str | None = "round_robin",
                           retry: RetryPolicy | None = DEFAULT_RETRY) -> dict[str, Any]:
    """The gRPC service config a client's channel gets: ``load_balancing`` (None: gRPC's own
    default, ``pick_first``), and ``retry`` for :data:`RETRIED_METHODS` (None: no retries)."""
    config: dict[str, Any] = {}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retry is not None and retry.max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE, "method": method} for method in RETRIED_METHODS],
            "retryPolicy": retry.to_service_config(),
        }]
    return config


def _ip_family(address: str) -> str | None:
    """``ipv4``/``ipv6`` for ``IP:PORT`` (``[IPV6]:PORT``), ``name`` for ``NAME:PORT``, None
    for anything else."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            return None
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not host or ":" in host or "/" in host:
            return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        return "ipv6" if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address) \
            else "ipv4"
    except ValueError:
        return None if address.startswith("[") else "name"


def grpc_target(target: str) -> str:
    """``target`` as gRPC takes it. A comma-separated list of ``IP:PORT`` (``[IPV6]:PORT``)
    becomes gRPC's ``ipv4:``/``ipv6:`` target, balanced over every address; anything else
    (``host:port``, ``dns:///name:port``, ``ipv4:...``, ``unix:PATH``...) is left as it is.

    Raises:
        ConfigurationError: a list of ``HOST:PORT`` with a host name in it, or mixing IPv4 and
            IPv6 (gRPC has no such target: use ``dns:///NAME:PORT`` for a name that resolves to
            every replica).
    """
    items = [item.strip() for item in target.split(",")]
    if len(items) < 2:
        return target
    families = {_ip_family(item) for item in items}
    if None in families:
        return target  # not a list of addresses: some other scheme's business
    if families == {"ipv4"} or families == {"ipv6"}:
        return f"{families.pop()}:{','.join(items)}"
    raise ConfigurationError(
        f"target {target!r}: a list of addresses must be all IPv4 or all IPv6 literals with "
        "their ports; for host names use one name that resolves to every replica, "
        "dns:///NAME:PORT")


def _refused(exc: grpc.RpcError) -> bool:
    """Whether the server said it refused the call before running anything."""
    trailing = getattr(exc, "trailing_metadata", None)
    metadata = (trailing() if callable(trailing) else None) or ()
    return any(item[0] == REFUSED_METADATA_KEY for item in metadata)


def _retry_pause(retry: RetryPolicy | None, exc: grpc.RpcError, attempt: int,
                 idempotent: bool, deadline: float | None) -> float | None:
    """How long to wait before trying an invocation again after ``exc`` ended attempt
    ``attempt``; None: do not retry. Only UNAVAILABLE, and only when running it again cannot
    run it twice unasked: the server refused it before it ran, or the caller says it is
    idempotent."""
    if retry is None or attempt >= retry.max_attempts:
        return None
    if _code(exc) is not grpc.StatusCode.UNAVAILABLE or not (idempotent or _refused(exc)):
        return None
    pause = retry.backoff(attempt)
    if deadline is not None and time.monotonic() + pause >= deadline:
        return None
    return pause


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# ---------------------------------------------------------------------------------------------
# Values

@dataclasses.dataclass(frozen=True, slots=True)
class RemoteFunction:
    """A deployed function version, as the server describes it."""

    name: str
    version: int
    digest: str
    handler: str
    preload: tuple[str, ...]
    profile: str
    limits: Limits
    created: datetime.datetime | None
    source_format: str | None
    source_size_bytes: int
    #: invocations one worker serves before it is replaced (1: single-use)
    reuse: int = 1
    #: how ``invoke_async`` retries and keeps its invocations (None: a server without it)
    async_policy: AsyncPolicy | None = None

    @classmethod
    def from_proto(cls, msg: pb.Function) -> RemoteFunction:
        created = (msg.create_time.ToDatetime(tzinfo=datetime.UTC)
                   if msg.HasField("create_time") else None)
        return cls(name=msg.name, version=msg.version, digest=msg.digest, handler=msg.handler,
                   preload=tuple(msg.preload), profile=msg.profile,
                   limits=limits_from_proto(msg.limits) or Limits(), created=created,
                   source_format=source_format_from_proto(msg.source_format),
                   source_size_bytes=msg.source_size_bytes, reuse=max(1, msg.reuse),
                   async_policy=AsyncPolicy.from_dict(policy_fields_from_proto(msg.async_policy))
                   if msg.HasField("async_policy") else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "digest": self.digest,
            "handler": self.handler, "preload": list(self.preload), "profile": self.profile,
            "limits": {k: v for k, v in self.limits.to_dict().items() if v is not None},
            "created": None if self.created is None else self.created.isoformat(),
            "source_format": self.source_format, "source_size_bytes": self.source_size_bytes,
            "reuse": self.reuse,
            "async_policy": None if self.async_policy is None else self.async_policy.to_dict(),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Invocation:
    """One invocation for :meth:`Client.invoke_many`. ``payload`` (already encoded in
    ``content_type``) replaces ``event`` when given."""

    function: str
    event: Any = None
    id: str = ""
    version: int | None = None
    limits: Limits | None = None
    content_type: str = MSGPACK
    payload: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class InvocationRejected:
    """An invocation of an ``invoke_many`` stream that could not run (the stream goes on)."""

    id: str
    code: grpc.StatusCode
    message: str

    def exception(self) -> SandboxError:
        """The exception a single ``invoke`` would have raised."""
        return _error(self.code, self.message)


def encode(event: Any, content_type: str = MSGPACK) -> bytes:
    """``event`` in ``content_type``. Raises InvalidRequest when it cannot be encoded."""
    try:
        if content_type == MSGPACK:
            return msgpack.packb(event, use_bin_type=True)  # type: ignore[no-any-return]
        if content_type == JSON:
            return json.dumps(event, separators=(",", ":")).encode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"the event cannot be encoded as {content_type}: {exc}") from None
    raise InvalidRequest(f"unsupported content_type {content_type!r}; use one of "
                         f"{', '.join(CONTENT_TYPES)}")


def decode(data: bytes, content_type: str = MSGPACK) -> Any:
    """A value from ``content_type`` bytes (empty bytes are None)."""
    if not data:
        return None
    if content_type == JSON:
        return json.loads(data)
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _result(msg: pb.InvokeResponse) -> InvocationResult:
    return result_from_proto(msg, decode)


def _invoke_request(function: str, event: Any, *, version: int | None, limits: Limits | None,
                    id: str | None, content_type: str, payload: bytes | None
                    ) -> pb.InvokeRequest:
    msg = pb.InvokeRequest(
        function=function, content_type=content_type, id=id or "",
        payload=payload if payload is not None else
        (b"" if event is None and content_type == MSGPACK else encode(event, content_type)))
    if version is not None:
        msg.version = version
    converted = limits_to_proto(limits)
    if converted is not None:
        msg.limits.CopyFrom(converted)
    return msg


def _stream_request(req: pb.InvokeRequest) -> pb.InvokeStreamRequest:
    # Same fields, same numbers: the bytes are interchangeable.
    return pb.InvokeStreamRequest.FromString(req.SerializeToString())


def _many_request(item: Invocation | str) -> pb.InvokeManyRequest:
    if isinstance(item, str):
        return pb.InvokeManyRequest(cancel_id=item)
    return pb.InvokeManyRequest(invoke=_invoke_request(
        item.function, item.event, version=item.version, limits=item.limits, id=item.id,
        content_type=item.content_type, payload=item.payload))


def _many_response(msg: pb.InvokeManyResponse) -> InvocationResult | InvocationRejected:
    if msg.WhichOneof("response") == "error":
        code = _CODES_BY_VALUE.get(msg.error.code, grpc.StatusCode.UNKNOWN)
        return InvocationRejected(msg.error.id, code, msg.error.message)
    return _result(msg.result)


def _deploy_request(name: str, source: bytes | str | Path, *, handler: str,
                    preload: Sequence[str], limits: Limits | None, source_format: str | None,
                    reuse: int = 1,
                    async_policy: AsyncPolicy | Mapping[str, Any] | None = None
                    ) -> pb.DeployRequest:
    if isinstance(source, Path):
        if source_format is None:
            source_format = "zip" if source.suffix == ".zip" else None
        data = source.read_bytes()
    elif isinstance(source, str):
        data = source.encode()
    else:
        data = source
    if isinstance(reuse, bool) or not isinstance(reuse, int) or not 1 <= reuse < 2**32:
        raise InvalidRequest(f"reuse must be an int between 1 and 2**32 - 1, got {reuse!r}")
    msg = pb.DeployRequest(name=name, source=data, handler=handler, preload=list(preload),
                           source_format=source_format_to_proto(source_format), reuse=reuse)
    converted = limits_to_proto(limits)
    if converted is not None:
        msg.limits.CopyFrom(converted)
    if async_policy is not None:
        fields = (async_policy.to_dict() if isinstance(async_policy, AsyncPolicy)
                  else dict(async_policy))
        AsyncPolicy.from_dict(fields)  # InvalidRequest before the call
        msg.async_policy.CopyFrom(policy_to_proto(fields))
    return msg


@dataclasses.dataclass(frozen=True, slots=True)
class AsyncSubmission:
    """What ``invoke_async`` answers: the invocation's id, its state, and whether an
    invocation with the same idempotency key already existed (``id`` is then that one's)."""

    id: str
    state: InvocationState
    duplicate: bool = False

    @classmethod
    def from_proto(cls, msg: pb.InvokeAsyncResponse) -> AsyncSubmission:
        return cls(id=msg.id, state=state_from_proto(msg.state) or InvocationState.QUEUED,
                   duplicate=msg.duplicate)


def _invoke_async_request(function: str, event: Any, *, version: int | None,
                          limits: Limits | None, content_type: str, payload: bytes | None,
                          idempotency_key: str | None,
                          policy: AsyncPolicy | Mapping[str, Any] | None
                          ) -> pb.InvokeAsyncRequest:
    msg = pb.InvokeAsyncRequest(
        invoke=_invoke_request(function, event, version=version, limits=limits, id=None,
                               content_type=content_type, payload=payload),
        idempotency_key=idempotency_key or "")
    if policy is not None:
        fields = policy.to_dict() if isinstance(policy, AsyncPolicy) else dict(policy)
        AsyncPolicy.from_dict(fields)  # InvalidRequest before the call
        msg.policy.CopyFrom(policy_to_proto(fields))
    return msg


def _list_request(function: str | None, state: str | None, page_size: int, page_token: str
                  ) -> pb.ListInvocationsRequest:
    try:
        st = InvocationState(state) if state else None
    except ValueError:
        raise InvalidRequest(f"unknown state {state!r}; one of "
                             f"{[s.value for s in InvocationState]}") from None
    return pb.ListInvocationsRequest(function=function or "", state=state_to_proto(st),
                                     page_size=page_size, page_token=page_token)


def _queued(msg: pb.AsyncInvocation) -> QueuedInvocation:
    return invocation_from_proto(msg, decode)


@contextlib.contextmanager
def _invocation_lookup() -> Iterator[None]:
    """NOT_FOUND of a call naming an invocation id is InvocationNotFound."""
    try:
        yield
    except InvocationNotFound:
        raise
    except FunctionNotFound as exc:
        raise InvocationNotFound(str(exc)) from exc.__cause__


def _info(msg: pb.GetInfoResponse) -> dict[str, Any]:
    """The same shape as ``AsyncRuntime.info()``, plus the server's own settings."""
    return {
        "version": msg.version,
        "profiles": {p.name: list(p.modules) for p in msg.profiles},
        "pools": {p.profile: {"idle": p.idle, "busy": p.busy, "starting": p.starting,
                              "queued": p.queued, "waiting": p.waiting, "target": p.target,
                              "min_idle": p.min_idle, "max_idle": p.max_idle,
                              "idle_ttl_s": p.idle_ttl_s, "arrival_rate": p.arrival_rate,
                              "birth_ms": p.birth_ms} for p in msg.pools},
        "isolation": {layer.name: {"available": layer.available, "enabled": layer.enabled,
                                   "reason": layer.reason} for layer in msg.isolation},
        "view": {"minimal": msg.view.minimal, "read_only": msg.view.read_only,
                 "paths": list(msg.view.paths), "devices": list(msg.view.devices),
                 "hidden": list(msg.view.hidden), "private": list(msg.view.private)},
        "limits": (limits_from_proto(msg.default_limits) or Limits()).to_dict(),
        "max_limits": (limits_from_proto(msg.max_limits) or Limits()).to_dict()
        if msg.HasField("max_limits") else None,
        "running": msg.running,
        "queued": msg.queued,
        "max_concurrency": msg.max_concurrency,
        "max_queue": msg.max_queue,
        "invoke_many_window": msg.invoke_many_window,
        "max_message_bytes": msg.max_message_bytes,
        "node": msg.node,
    }


def _channel_options(max_message_bytes: int, service_config: dict[str, Any] | str | None,
                     load_balancing: str | None, retry: RetryPolicy | None,
                     tls_server_name: str | None) -> list[tuple[str, Any]]:
    if service_config is None:
        service_config = default_service_config(load_balancing, retry)
    elif isinstance(service_config, str):
        try:
            json.loads(service_config)
        except ValueError as exc:
            raise ConfigurationError(f"service_config is not JSON: {exc}") from None
    if not isinstance(service_config, str):
        service_config = json.dumps(service_config)
    # gRPC's retries, transparent ones included, are on by default ("grpc.enable_retries"):
    # never set it to 0 here. The retry buffer holds a whole Deploy, so it can be retried.
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", service_config),
        ("grpc.per_rpc_retry_buffer_size", max(max_message_bytes, _GRPC_RETRY_BUFFER)),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


_Pem = str | os.PathLike[str] | bytes | None
Metadata = tuple[tuple[str, str], ...]


def _security(tls: bool, tls_ca: _Pem, tls_cert: _Pem, tls_key: _Pem, token: str | None,
              tls_server_name: str | None = None
              ) -> tuple[grpc.ChannelCredentials | None, Metadata]:
    """The channel's TLS credentials (None: plaintext) and the metadata of every call."""
    credentials = None
    if (tls or tls_ca is not None or tls_cert is not None or tls_key is not None
            or tls_server_name):
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    metadata: Metadata = ()
    if token is not None:
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigurationError("token must be non-empty printable ASCII without spaces")
        metadata = (("authorization", f"Bearer {token}"),)
    return credentials, metadata


def _merge(base: Metadata, extra: Sequence[tuple[str, str]]) -> Metadata | None:
    merged = (*base, *extra) if extra else base
    return merged or None


# ---------------------------------------------------------------------------------------------
# Blocking client

class ResultStream:
    """The chunks of an ``InvokeStream`` call (decoded values), then :meth:`result`."""

    def __init__(self, call: Any, content_type: str) -> None:
        self._call = call
        self._content_type = content_type
        self._result: InvocationResult | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            for msg in self._call:
                if msg.WhichOneof("event") == "chunk":
                    yield decode(msg.chunk.payload, self._content_type)
                else:
                    self._result = _result(msg.result)
        except grpc.RpcError as exc:
            raise _translate(exc) from exc

    def result(self) -> InvocationResult:
        """The final result (reads the chunks that were not read)."""
        if self._result is None:
            for _ in self:
                pass
        if self._result is None:
            raise RemoteError(grpc.StatusCode.INTERNAL, "the stream ended without a result")
        return self._result

    def cancel(self) -> None:
        """Cancel the call; the server kills the worker."""
        self._call.cancel()


class Client:
    """Blocking client. ``timeout`` (seconds) is each call's default deadline.

    Args:
        target: ``host:port``, or any gRPC target: ``dns:///svc:50051`` (every address the
            name resolves to), ``ipv4:10.0.0.1:50051,10.0.0.2:50051``, ``unix:PATH``...; a
            plain list ``10.0.0.1:50051,10.0.0.2:50051`` of IP literals is taken as
            ``ipv4:``/``ipv6:`` (:func:`grpc_target`).
        channel: use this channel instead of making one (the client will not close it; the
            channel options below are then the caller's business).
        timeout: default deadline of every call, seconds (None: no deadline). With retries it
            covers every attempt.
        max_message_bytes: largest request this client sends.
        tls: connect over TLS (implied by any ``tls_*``); the server is verified against
            ``tls_ca`` (a PEM file or its bytes), else the system's roots.
        tls_cert, tls_key: this client's certificate and key, for a server that requires one
            (mTLS).
        tls_server_name: the name the servers' certificate must carry (and the calls'
            ``:authority``) when the target does not name it, e.g. a list of addresses of
            replicas whose certificate names the service.
        token: sent as ``authorization: Bearer TOKEN`` with every call.
        load_balancing: gRPC's load-balancing policy over the target's addresses:
            ``round_robin`` (the default: each call to the next ready replica), or
            ``pick_first`` (one connection, as gRPC does by default).
        retry: how calls failing ``UNAVAILABLE`` are retried: the reads and ``deploy`` by
            gRPC (the channel's service config), invocations by this client when they may
            (see :meth:`invoke`). None: no retries (gRPC's transparent ones stay on).
        service_config: a gRPC service config (a dict, or its JSON) that replaces the one made
            from ``load_balancing`` and ``retry`` (:func:`default_service_config`);
            ``retry`` still governs the retries of invocations.

    Raises:
        ConfigurationError: a TLS file cannot be read, only one of cert and key, a bad token,
            a bad target list, service config or retry policy.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, channel: grpc.Channel | None = None,
                 timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: bool = False,
                 tls_ca: _Pem = None, tls_cert: _Pem = None, tls_key: _Pem = None,
                 token: str | None = None, tls_server_name: str | None = None,
                 load_balancing: str | None = "round_robin",
                 retry: RetryPolicy | None = DEFAULT_RETRY,
                 service_config: dict[str, Any] | str | None = None) -> None:
        credentials, self._metadata = _security(tls, tls_ca, tls_cert, tls_key, token,
                                                tls_server_name)
        self._own = channel is None
        self.retry = retry
        self.target = target = grpc_target(target)
        options = _channel_options(max_message_bytes, service_config, load_balancing, retry,
                                   tls_server_name)
        if channel is not None:
            self.channel = channel
        elif credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.SandboxStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _unary(self, method: Any, request: Any, timeout: float | None,
               metadata: Sequence[tuple[str, str]] = ()) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout),
                          metadata=_merge(self._metadata, metadata))
        except grpc.RpcError as exc:
            raise _translate(exc) from exc

    # -- functions ---------------------------------------------------------------------------
    def deploy(self, name: str, source: bytes | str | Path, *, handler: str = "",
               preload: Sequence[str] = (), limits: Limits | None = None,
               source_format: str | None = None, reuse: int = 1,
               timeout: float | None = None,
               async_policy: AsyncPolicy | Mapping[str, Any] | None = None) -> RemoteFunction:
        """Deploy ``source`` (Python text, bytes of a ``.py`` or zip, or a path to either).

        ``reuse``: invocations one worker serves before it is replaced (1, the default: a fresh
        process for every invocation). ``async_policy``: how ``invoke_async`` retries and keeps
        this version's invocations (an AsyncPolicy, or some of its fields as a dict).

        Idempotent: when the latest version of ``name`` is this very deployment already (the
        same source, handler, preload, limits and reuse), the server returns it rather than
        making another; so a deploy cut off by a lost replica is safely retried.
        """
        request = _deploy_request(name, source, handler=handler, preload=preload,
                                  limits=limits, source_format=source_format, reuse=reuse,
                                  async_policy=async_policy)
        return RemoteFunction.from_proto(
            self._unary(self.stub.Deploy, request, timeout).function)

    def function(self, name: str, version: int | None = None, *,
                 timeout: float | None = None) -> RemoteFunction:
        request = pb.GetFunctionRequest(name=name, version=version)
        return RemoteFunction.from_proto(
            self._unary(self.stub.GetFunction, request, timeout).function)

    def versions(self, name: str, *, timeout: float | None = None) -> list[int]:
        response = self._unary(self.stub.GetFunction, pb.GetFunctionRequest(name=name), timeout)
        return list(response.versions)

    def functions(self, all_versions: bool = False, *,
                  timeout: float | None = None) -> list[RemoteFunction]:
        response = self._unary(self.stub.ListFunctions,
                               pb.ListFunctionsRequest(all_versions=all_versions), timeout)
        return [RemoteFunction.from_proto(f) for f in response.functions]

    def delete(self, name: str, version: int | None = None, *,
               timeout: float | None = None) -> list[int]:
        """Delete one version, or all; returns the versions deleted."""
        response = self._unary(self.stub.DeleteFunction,
                               pb.DeleteFunctionRequest(name=name, version=version), timeout)
        return list(response.versions)

    # -- invocations -------------------------------------------------------------------------
    def invoke(self, function: str, event: Any = None, *, version: int | None = None,
               limits: Limits | None = None, id: str | None = None,
               content_type: str = MSGPACK, payload: bytes | None = None,
               timeout: float | None = None,
               metadata: Sequence[tuple[str, str]] = (),
               idempotent: bool = False) -> InvocationResult:
        """Invoke once. ``timeout`` is the call's deadline and caps the wall timeout;
        ``metadata`` goes with the call (e.g. a W3C ``traceparent`` the server's trace
        continues).

        Retries (``UNAVAILABLE`` only, as the client's ``retry`` policy says, to the next
        replica): a call the server refused before running it (draining) is always sent
        again. A call cut off otherwise (a replica lost mid-call) may have run: it fails with
        :class:`ShuttingDown`, unless ``idempotent=True`` says running the function twice
        is harmless, and then it is retried.
        """
        request = _invoke_request(function, event, version=version, limits=limits, id=id,
                                  content_type=content_type, payload=payload)
        return _result(self._retried(self.stub.Invoke, request, timeout, metadata, idempotent))

    def _retried(self, method: Any, request: Any, timeout: float | None,
                 metadata: Sequence[tuple[str, str]], idempotent: bool) -> Any:
        """A unary call, tried again when :func:`_retry_pause` allows it."""
        timeout = self._timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        merged = _merge(self._metadata, metadata)
        attempt = 1
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=merged)
            except grpc.RpcError as exc:
                pause = _retry_pause(self.retry, exc, attempt, idempotent, deadline)
                if pause is None:
                    raise _translate(exc) from exc
            time.sleep(pause)
            attempt += 1

    def stream(self, function: str, event: Any = None, *, version: int | None = None,
               limits: Limits | None = None, id: str | None = None,
               content_type: str = MSGPACK, payload: bytes | None = None,
               timeout: float | None = None,
               metadata: Sequence[tuple[str, str]] = ()) -> ResultStream:
        """Invoke a generator function: iterate for its chunks, then ``.result()``."""
        request = _invoke_request(function, event, version=version, limits=limits, id=id,
                                  content_type=content_type, payload=payload)
        call = self.stub.InvokeStream(_stream_request(request), timeout=self._timeout(timeout),
                                      metadata=_merge(self._metadata, metadata))
        return ResultStream(call, content_type)

    def invoke_many(self, invocations: Iterable[Invocation | str], *,
                    timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()
                    ) -> Iterator[InvocationResult | InvocationRejected]:
        """Run many invocations over one stream; results in completion order.

        ``invocations`` is consumed lazily, as the server's window lets it (a ``str`` item
        cancels the in-flight invocation with that id). Give each invocation an ``id`` to
        match results (else the server numbers them from 0 in order).
        """
        call = self.stub.InvokeMany((_many_request(i) for i in invocations),
                                    timeout=self._timeout(timeout),
                                    metadata=_merge(self._metadata, metadata))
        try:
            for msg in call:
                yield _many_response(msg)
        except grpc.RpcError as exc:
            raise _translate(exc) from exc
        finally:
            call.cancel()

    # -- asynchronous invocations (sandbox.asyncq) -------------------------------------------
    def invoke_async(self, function: str, event: Any = None, *, version: int | None = None,
                     limits: Limits | None = None, content_type: str = MSGPACK,
                     payload: bytes | None = None, idempotency_key: str | None = None,
                     policy: AsyncPolicy | Mapping[str, Any] | None = None,
                     timeout: float | None = None,
                     metadata: Sequence[tuple[str, str]] = ()) -> AsyncSubmission:
        """Queue an invocation durably on the server; returns its id at once.

        The server checks what it can now (``FunctionNotFound``, ``InvalidRequest``; a full
        queue raises ``Overloaded``). With an ``idempotency_key`` the call is retried like an
        idempotent one (the same key returns the first id: ``duplicate``). ``policy``:
        overrides of the function's async policy (a dict of fields or an AsyncPolicy).
        """
        request = _invoke_async_request(function, event, version=version, limits=limits,
                                        content_type=content_type, payload=payload,
                                        idempotency_key=idempotency_key, policy=policy)
        return AsyncSubmission.from_proto(self._retried(
            self.stub.InvokeAsync, request, timeout, metadata, idempotency_key is not None))

    def invocation(self, invocation_id: str, *, timeout: float | None = None
                   ) -> QueuedInvocation:
        """An asynchronous invocation: state, attempts, result. Raises InvocationNotFound."""
        with _invocation_lookup():
            # A read: gRPC retries it itself (the service config's Get*/List* policy).
            return _queued(self._unary(self.stub.GetInvocation,
                                       pb.GetInvocationRequest(id=invocation_id), timeout))

    def invocations(self, function: str | None = None, state: str | None = None, *,
                    page_size: int = 100, page_token: str = "",
                    timeout: float | None = None) -> tuple[list[QueuedInvocation], str]:
        """A page of asynchronous invocations (submission order) and the next page's token
        (empty after the last)."""
        response = self._unary(self.stub.ListInvocations,
                               _list_request(function, state, page_size, page_token), timeout)
        return [_queued(m) for m in response.invocations], response.next_page_token

    def cancel_invocation(self, invocation_id: str, *, timeout: float | None = None
                          ) -> QueuedInvocation:
        """Cancel a QUEUED or RUNNING invocation (it ends CANCELLED)."""
        with _invocation_lookup():
            return _queued(self._retried(self.stub.CancelInvocation,
                                         pb.CancelInvocationRequest(id=invocation_id), timeout,
                                         (), True))

    def redrive(self, invocation_id: str, *, timeout: float | None = None) -> QueuedInvocation:
        """Queue a DEAD_LETTERED invocation again, with a fresh attempt budget."""
        with _invocation_lookup():
            return _queued(self._unary(self.stub.RedriveInvocation,
                                       pb.RedriveInvocationRequest(id=invocation_id), timeout))

    def wait_invocation(self, invocation_id: str, timeout: float | None = None, *,
                        poll_s: float = 0.2) -> QueuedInvocation:
        """Poll until the invocation is terminal (TimeoutError after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self.invocation(invocation_id)
            if found.done:
                return found
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"invocation {invocation_id} is still {found.state.value}")
            time.sleep(poll_s)

    # -- server ------------------------------------------------------------------------------
    def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Version, profiles, pools, isolation layers (the shape of ``AsyncRuntime.info()``)."""
        return _info(self._unary(self.stub.GetInfo, pb.GetInfoRequest(), timeout))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected (raises DeadlineExceeded after ``timeout``)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"server not ready after {timeout} s") from exc


# ---------------------------------------------------------------------------------------------
# asyncio client

class AsyncResultStream:
    """The chunks of an ``InvokeStream`` call (decoded values), then ``await result()``."""

    def __init__(self, call: Any, content_type: str) -> None:
        self._call = call
        self._content_type = content_type
        self._result: InvocationResult | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Any]:
        try:
            async for msg in self._call:
                if msg.WhichOneof("event") == "chunk":
                    yield decode(msg.chunk.payload, self._content_type)
                else:
                    self._result = _result(msg.result)
        except grpc.RpcError as exc:
            raise _translate(exc) from exc

    async def result(self) -> InvocationResult:
        if self._result is None:
            async for _ in self._chunks():
                pass
        if self._result is None:
            raise RemoteError(grpc.StatusCode.INTERNAL, "the stream ended without a result")
        return self._result

    def cancel(self) -> None:
        self._call.cancel()


class AsyncClient:
    """asyncio client, the same methods and arguments as :class:`Client`, awaitable. Create it
    inside the event loop that uses it."""

    def __init__(self, target: str = DEFAULT_TARGET, *, channel: grpc.aio.Channel | None = None,
                 timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: bool = False,
                 tls_ca: _Pem = None, tls_cert: _Pem = None, tls_key: _Pem = None,
                 token: str | None = None, tls_server_name: str | None = None,
                 load_balancing: str | None = "round_robin",
                 retry: RetryPolicy | None = DEFAULT_RETRY,
                 service_config: dict[str, Any] | str | None = None) -> None:
        credentials, self._metadata = _security(tls, tls_ca, tls_cert, tls_key, token,
                                                tls_server_name)
        self._own = channel is None
        self.retry = retry
        self.target = target = grpc_target(target)
        options = _channel_options(max_message_bytes, service_config, load_balancing, retry,
                                   tls_server_name)
        if channel is not None:
            self.channel = channel
        elif credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.SandboxStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None,
                     metadata: Sequence[tuple[str, str]] = ()) -> Any:
        try:
            return await method(request, timeout=self._timeout(timeout),
                                metadata=_merge(self._metadata, metadata))
        except grpc.RpcError as exc:
            raise _translate(exc) from exc

    async def deploy(self, name: str, source: bytes | str | Path, *, handler: str = "",
                     preload: Sequence[str] = (), limits: Limits | None = None,
                     source_format: str | None = None, reuse: int = 1,
                     timeout: float | None = None,
                     async_policy: AsyncPolicy | Mapping[str, Any] | None = None
                     ) -> RemoteFunction:
        request = _deploy_request(name, source, handler=handler, preload=preload,
                                  limits=limits, source_format=source_format, reuse=reuse,
                                  async_policy=async_policy)
        response = await self._unary(self.stub.Deploy, request, timeout)
        return RemoteFunction.from_proto(response.function)

    async def function(self, name: str, version: int | None = None, *,
                       timeout: float | None = None) -> RemoteFunction:
        response = await self._unary(self.stub.GetFunction,
                                     pb.GetFunctionRequest(name=name, version=version), timeout)
        return RemoteFunction.from_proto(response.function)

    async def versions(self, name: str, *, timeout: float | None = None) -> list[int]:
        response = await self._unary(self.stub.GetFunction, pb.GetFunctionRequest(name=name),
                                     timeout)
        return list(response.versions)

    async def functions(self, all_versions: bool = False, *,
                        timeout: float | None = None) -> list[RemoteFunction]:
        response = await self._unary(self.stub.ListFunctions,
                                     pb.ListFunctionsRequest(all_versions=all_versions), timeout)
        return [RemoteFunction.from_proto(f) for f in response.functions]

    async def delete(self, name: str, version: int | None = None, *,
                     timeout: float | None = None) -> list[int]:
        response = await self._unary(self.stub.DeleteFunction,
                                     pb.DeleteFunctionRequest(name=name, version=version),
                                     timeout)
        return list(response.versions)

    async def invoke(self, function: str, event: Any = None, *, version: int | None = None,
                     limits: Limits | None = None, id: str | None = None,
                     content_type: str = MSGPACK, payload: bytes | None = None,
                     timeout: float | None = None,
                     metadata: Sequence[tuple[str, str]] = (),
                     idempotent: bool = False) -> InvocationResult:
        """Invoke once; cancelling the awaiting task cancels the call and kills the worker.
        Retries as :meth:`Client.invoke` (``idempotent``)."""
        request = _invoke_request(function, event, version=version, limits=limits, id=id,
                                  content_type=content_type, payload=payload)
        return _result(await self._retried(self.stub.Invoke, request, timeout, metadata,
                                           idempotent))

    async def _retried(self, method: Any, request: Any, timeout: float | None,
                       metadata: Sequence[tuple[str, str]], idempotent: bool) -> Any:
        timeout = self._timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        merged = _merge(self._metadata, metadata)
        attempt = 1
        while True:
            try:
                return await method(request, timeout=_remaining(deadline), metadata=merged)
            except grpc.RpcError as exc:
                pause = _retry_pause(self.retry, exc, attempt, idempotent, deadline)
                if pause is None:
                    raise _translate(exc) from exc
            await asyncio.sleep(pause)
            attempt += 1

    def stream(self, function: str, event: Any = None, *, version: int | None = None,
               limits: Limits | None = None, id: str | None = None,
               content_type: str = MSGPACK, payload: bytes | None = None,
               timeout: float | None = None,
               metadata: Sequence[tuple[str, str]] = ()) -> AsyncResultStream:
        request = _invoke_request(function, event, version=version, limits=limits, id=id,
                                  content_type=content_type, payload=payload)
        call = self.stub.InvokeStream(_stream_request(request), timeout=self._timeout(timeout),
                                      metadata=_merge(self._metadata, metadata))
        return AsyncResultStream(call, content_type)

    async def invoke_many(self, invocations: Iterable[Invocation | str]
                          | AsyncIterable[Invocation | str], *, timeout: float | None = None,
                          metadata: Sequence[tuple[str, str]] = ()
                          ) -> AsyncIterator[InvocationResult | InvocationRejected]:
        """Like :meth:`Client.invoke_many`; ``invocations`` may be an async iterable."""
        async def requests() -> AsyncIterator[pb.InvokeManyRequest]:
            if isinstance(invocations, AsyncIterable):
                async for item in invocations:
                    yield _many_request(item)
            else:
                for item in invocations:
                    yield _many_request(item)

        call = self.stub.InvokeMany(requests(), timeout=self._timeout(timeout),
                                    metadata=_merge(self._metadata, metadata))
        try:
            async for msg in call:
                yield _many_response(msg)
        except grpc.RpcError as exc:
            raise _translate(exc) from exc
        finally:
            call.cancel()

    # -- asynchronous invocations (sandbox.asyncq) -------------------------------------------
    async def invoke_async(self, function: str, event: Any = None, *,
                           version: int | None = None, limits: Limits | None = None,
                           content_type: str = MSGPACK, payload: bytes | None = None,
                           idempotency_key: str | None = None,
                           policy: AsyncPolicy | Mapping[str, Any] | None = None,
                           timeout: float | None = None,
                           metadata: Sequence[tuple[str, str]] = ()) -> AsyncSubmission:
        """See :meth:`Client.invoke_async`."""
        request = _invoke_async_request(function, event, version=version, limits=limits,
                                        content_type=content_type, payload=payload,
                                        idempotency_key=idempotency_key, policy=policy)
        return AsyncSubmission.from_proto(await self._retried(
            self.stub.InvokeAsync, request, timeout, metadata, idempotency_key is not None))

    async def invocation(self, invocation_id: str, *, timeout: float | None = None
                         ) -> QueuedInvocation:
        with _invocation_lookup():
            return _queued(await self._unary(self.stub.GetInvocation,
                                             pb.GetInvocationRequest(id=invocation_id),
                                             timeout))

    async def invocations(self, function: str | None = None, state: str | None = None, *,
                          page_size: int = 100, page_token: str = "",
                          timeout: float | None = None) -> tuple[list[QueuedInvocation], str]:
        response = await self._unary(self.stub.ListInvocations,
                                     _list_request(function, state, page_size, page_token),
                                     timeout)
        return [_queued(m) for m in response.invocations], response.next_page_token

    async def cancel_invocation(self, invocation_id: str, *, timeout: float | None = None
                                ) -> QueuedInvocation:
        with _invocation_lookup():
            return _queued(await self._retried(self.stub.CancelInvocation,
                                               pb.CancelInvocationRequest(id=invocation_id),
                                               timeout, (), True))

    async def redrive(self, invocation_id: str, *, timeout: float | None = None
                      ) -> QueuedInvocation:
        with _invocation_lookup():
            return _queued(await self._unary(self.stub.RedriveInvocation,
                                             pb.RedriveInvocationRequest(id=invocation_id),
                                             timeout))

    async def wait_invocation(self, invocation_id: str, timeout: float | None = None, *,
                              poll_s: float = 0.2) -> QueuedInvocation:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = await self.invocation(invocation_id)
            if found.done:
                return found
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"invocation {invocation_id} is still {found.state.value}")
            await asyncio.sleep(poll_s)

    async def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return _info(await self._unary(self.stub.GetInfo, pb.GetInfoRequest(), timeout))

    async def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError as exc:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"server not ready after {timeout} s") from exc



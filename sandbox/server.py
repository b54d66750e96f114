"""The gRPC server: translation between the wire and the runtime, nothing else.

::

    client ──▶ grpc.aio server ──▶ SandboxServicer ──▶ AsyncRuntime (pools, zygotes, workers)
                  │ Health, Reflection        │ FunctionStore (bundles + index on disk)
                  ▼                           ▼
             STATUS_TABLE: the one place an exception becomes a status code

- :class:`SandboxServicer` converts requests to runtime calls and results to messages. How a
  function ended is a result (``Outcome``), never a status; the status is about the call, and
  :data:`STATUS_TABLE` is the only place that maps exceptions to codes.
- The client's deadline becomes the invocation's ``deadline`` (capping its wall timeout); a
  cancelled or disconnected call cancels the handler task, and cancelling the runtime call kills
  the worker.
- Asynchronous invocations (``InvokeAsync``, ``GetInvocation``, ``ListInvocations``,
  ``CancelInvocation``, ``RedriveInvocation``) are the runtime's (:mod:`sandbox.asyncq`); the
  queue is SQLite in the state directory, or the fleet's PostgreSQL beside its store.
- :func:`create_server` builds a ``grpc.aio`` server around a started runtime (tests bind port 0).
- :func:`serve` is ``sandbox serve``: the runtime (and its zygotes) start before any gRPC
  object exists; deployed functions are reloaded from the state directory; SIGTERM or SIGINT
  drains (health NOT_SERVING, new calls refused, in-flight calls get a grace period, then
  everything below the supervisor is killed).
- Operating it (:func:`serve`'s options): TLS and bearer tokens (:mod:`sandbox.security`, the
  tokens file reloaded on SIGHUP), a listen policy (no non-local address without both, unless
  ``insecure``), Prometheus metrics on their own HTTP port (:mod:`sandbox.metrics`), one
  access-log record per invocation (:mod:`sandbox.logs`), and OpenTelemetry traces when the
  environment asks for them and the ``otel`` extra is installed (:mod:`sandbox.tracing`). The
  servicer tells the runtime where each call came from (peer, ``traceparent``) through
  :data:`sandbox.observe.CALL_ORIGIN`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sandbox._logging import get_logger
from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
from sandbox._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandbox.asyncq import AsyncPolicy, open_queue
from sandbox.asyncq_wire import (
    invocation_to_proto,
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
    ProfileError,
    SandboxError,
    ShuttingDown,
    StoreUnavailable,
)
from sandbox.limits import Limits
from sandbox.observe import CALL_ORIGIN, Origin, otel_requested
from sandbox.outcome import InvocationResult, Outcome
from sandbox.security import (
    AuthInterceptor,
    TokenTable,
    check_listen,
    server_credentials,
    unix_socket_path,
)
from sandbox.store import (
    FunctionStore,
    SourceFormat,
    Store,
    StoredFunction,
    check_name,
    detect_format,
    normalize_handler,
    profile_name,
)
from sandbox.wire import (
    CONTENT_TYPES,
    DEFAULT_MAX_MESSAGE_BYTES,
    REFUSED_METADATA_KEY,
    limits_from_proto,
    limits_to_proto,
    result_from_proto,
    result_to_proto,
    source_format_from_proto,
    source_format_to_proto,
)

if TYPE_CHECKING:
    from sandbox.functions import FunctionInfo
    from sandbox.logs import AccessLog
    from sandbox.runtime import AsyncInvocation, AsyncRuntime

__all__ = [
    "CONTENT_TYPES",
    "SERVICE_NAME",
    "STATUS_TABLE",
    "SandboxServicer",
    "Security",
    "create_server",
    "limits_from_proto",
    "limits_to_proto",
    "result_from_proto",
    "result_to_proto",
    "serve",
    "status_for",
]

log = get_logger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Sandbox"].full_name
DEFAULT_INVOKE_MANY_WINDOW = 256

#: The one table from exception to status code; the first matching row wins. Outcomes of the
#: function (timeouts, crashes, its own exceptions) are results and never reach it.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (FunctionNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ProfileError, grpc.StatusCode.INVALID_ARGUMENT),  # a deployment's preload cannot import
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ConfigurationError, grpc.StatusCode.FAILED_PRECONDITION),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


#: The metadata keys of the W3C trace context, passed on to the runtime's observers.
TRACE_HEADERS = ("traceparent", "tracestate")


def _origin(context: grpc.aio.ServicerContext) -> Origin:
    """Where a call comes from: the peer, and the trace context of its metadata."""
    headers = {key: value for key, value in context.invocation_metadata() or ()
               if key in TRACE_HEADERS and isinstance(value, str)}
    return Origin(peer=context.peer() or "", trace_headers=headers)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details for an exception (``INTERNAL`` when it is not in the table)."""
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code, str(exc) or kind.__name__
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _function_to_proto(info: FunctionInfo, stored: StoredFunction | None,
                       modules: Sequence[str]) -> pb.Function:
    msg = pb.Function(name=info.name, version=info.version, digest=info.digest,
                      handler=stored.handler if stored is not None else info.handler,
                      preload=list(stored.preload if stored is not None else modules),
                      profile=info.profile,
                      reuse=max(1, stored.reuse if stored is not None else info.reuse))
    limits = limits_to_proto(info.limits)
    if limits is not None:
        msg.limits.CopyFrom(limits)
    if stored is not None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(stored.created * 1e9))
        msg.create_time.CopyFrom(stamp)
        msg.source_format = source_format_to_proto(stored.source_format)
        msg.source_size_bytes = stored.source_size_bytes
    return msg


# ---------------------------------------------------------------------------------------------
# The servicer

class _Draining(ShuttingDown):
    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class SandboxServicer(pb_grpc.SandboxServicer):
    """``sandbox.v1.Sandbox`` over an :class:`AsyncRuntime` and a :class:`FunctionStore`.

    Args:
        runtime: a started runtime.
        store: where deployments persist; without one, Deploy fails FAILED_PRECONDITION and
            only the runtime's own registrations are served.
        invoke_many_window: how many InvokeMany requests are read ahead of their results.
        max_message_bytes: reported by GetInfo (the server enforces it).
        node: this server's name in a fleet, reported by GetInfo and in every result's
            ``stats.node`` (default: the host's name).
    """

    def __init__(self, runtime: AsyncRuntime, store: Store | None = None, *,
                 invoke_many_window: int = DEFAULT_INVOKE_MANY_WINDOW,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 node: str | None = None) -> None:
        if invoke_many_window < 1:
            raise ConfigurationError("invoke_many_window must be >= 1")
        self.runtime = runtime
        self.store = store
        self.invoke_many_window = invoke_many_window
        self.max_message_bytes = max_message_bytes
        self.node = node if node else socket.gethostname()
        self.draining = False
        self._deploy_lock = asyncio.Lock()
        self._following: set[asyncio.Task[None]] = set()

    # -- the one place errors become status codes ---------------------------------------------
    @contextlib.asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Refuse calls while draining; abort with the table's status on a call error."""
        try:
            if self.draining:
                raise _Draining()
            yield
        except (SandboxError, TimeoutError) as exc:
            code, details = status_for(exc)
            # Refused before anything ran: the client may send it again, even an invocation
            # that is not idempotent (sandbox.client does, to another replica).
            refused = ((REFUSED_METADATA_KEY, "draining"),) if isinstance(exc, _Draining) else ()
            await context.abort(code, details, trailing_metadata=refused)

    # -- functions ---------------------------------------------------------------------------
    async def Deploy(self, request: pb.DeployRequest,
                     context: grpc.aio.ServicerContext) -> pb.DeployResponse:
        async with self._call(context):
            if self.store is None:
                raise ConfigurationError("this server has no state directory to deploy into")
            check_name(request.name)
            fmt = source_format_from_proto(request.source_format)
            if request.source_format and fmt is None:
                raise InvalidRequest(f"unknown source_format {request.source_format}")
            limits = limits_from_proto(request.limits, request.HasField("limits"))
            async_policy = _deploy_async_policy(request)
            modules = sorted(set(request.preload))
            async with self._deploy_lock:  # one deployment at a time keeps store and runtime
                # in step (a new profile's zygote must start before the function is stored)
                if isinstance(self.store, FunctionStore):
                    # This node's own store: idempotent here. A shared store answers that
                    # itself, from the database (a mirror may be a moment behind).
                    latest = await asyncio.to_thread(_latest_if_same, self.store, request,
                                                     fmt, limits)
                    if latest is not None:  # this deployment is the latest already
                        return pb.DeployResponse(function=self._function(
                            await self._registered(latest)))
                await self._ensure_profile(modules)
                stored = await asyncio.to_thread(
                    self.store.deploy, request.name, request.source, handler=request.handler,
                    preload=list(request.preload), limits=limits,
                    source_format=fmt, reuse=request.reuse, async_policy=async_policy)
                with contextlib.suppress(FunctionNotFound):
                    # Served here already: the latest version, this same deployment, which
                    # the shared store returned (never deleted for a failure of ours).
                    info = self.runtime.function(stored.name, stored.version)
                    return pb.DeployResponse(function=self._function(info))
                try:
                    info = self._register(stored)
                except BaseException:
                    await asyncio.to_thread(self.store.delete, stored.name, stored.version)
                    raise
            return pb.DeployResponse(function=self._function(info))

    async def GetFunction(self, request: pb.GetFunctionRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetFunctionResponse:
        async with self._call(context):
            version = request.version if request.HasField("version") else None
            info = self.runtime.function(request.name, version)
            versions = sorted(f.version for f in self.runtime.functions()
                              if f.name == request.name)
            return pb.GetFunctionResponse(function=self._function(info), versions=versions)

    async def ListFunctions(self, request: pb.ListFunctionsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListFunctionsResponse:
        async with self._call(context):
            infos = sorted(self.runtime.functions(), key=lambda f: (f.name, f.version))
            if not request.all_versions:
                latest: dict[str, FunctionInfo] = {}
                for info in infos:
                    latest[info.name] = info
                infos = list(latest.values())
            return pb.ListFunctionsResponse(functions=[self._function(i) for i in infos])

    async def DeleteFunction(self, request: pb.DeleteFunctionRequest,
                             context: grpc.aio.ServicerContext) -> pb.DeleteFunctionResponse:
        async with self._call(context):
            version = request.version if request.HasField("version") else None
            self.runtime.function(request.name, version)  # FunctionNotFound
            doomed = sorted(f.version for f in self.runtime.functions()
                            if f.name == request.name and version in (None, f.version))
            async with self._deploy_lock:
                if self.store is not None and self.store.versions(request.name):
                    with contextlib.suppress(FunctionNotFound):
                        await asyncio.to_thread(self.store.delete, request.name, version)
                self.runtime.unregister(request.name, version)
            return pb.DeleteFunctionResponse(versions=doomed)

    # -- invocations -------------------------------------------------------------------------
    async def Invoke(self, request: pb.InvokeRequest,
                     context: grpc.aio.ServicerContext) -> pb.InvokeResponse:
        async with self._call(context):
            deadline = _deadline(context)
            kwargs = _invoke_kwargs(request, deadline)
            CALL_ORIGIN.set(_origin(context))  # this handler's task only
            result = await self.runtime.invoke(request.function, **kwargs)
            _check_deadline(result, deadline)
            return result_to_proto(result, kwargs["content_type"], self.node)

    async def InvokeStream(self, request: pb.InvokeStreamRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.InvokeStreamResponse]:
        async with self._call(context):
            deadline = _deadline(context)
            kwargs = _invoke_kwargs(request, deadline)
            CALL_ORIGIN.set(_origin(context))
            stream = self.runtime.stream(request.function, raw=True, **kwargs)
            finished = False
            try:
                index = 0
                async for chunk in stream:
                    yield pb.InvokeStreamResponse(chunk=pb.Chunk(index=index, payload=chunk))
                    index += 1
                result = await stream.result()
                finished = True
            finally:
                if not finished:  # the call was cancelled or broke: kill the worker now
                    stream.cancel()
            _check_deadline(result, deadline)
            yield pb.InvokeStreamResponse(
                result=result_to_proto(result, kwargs["content_type"], self.node))

    async def InvokeMany(self, request_iterator: AsyncIterator[pb.InvokeManyRequest],
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.InvokeManyResponse]:
        async with self._call(context):
            pass  # refuse the stream while draining
        CALL_ORIGIN.set(_origin(context))  # the stream's reader task inherits it
        many = _InvokeMany(self, request_iterator, _deadline(context))
        async for response in many.run():
            yield response

    # -- server ------------------------------------------------------------------------------
    async def GetInfo(self, request: pb.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        async with self._call(context):
            info = self.runtime.info()
            msg = pb.GetInfoResponse(
                version=str(info.get("version", "")),
                profiles=[pb.Profile(name=name, modules=list(mods))
                          for name, mods in sorted(info.get("profiles", {}).items())],
                pools=[pb.Pool(profile=name, idle=p.get("idle", 0), busy=p.get("busy", 0),
                               starting=p.get("starting", 0), queued=p.get("queued", 0),
                               target=p.get("target", 0), min_idle=p.get("min_idle", 0),
                               max_idle=p.get("max_idle", 0),
                               idle_ttl_s=p.get("idle_ttl_s", 0.0),
                               arrival_rate=p.get("arrival_rate", 0.0),
                               birth_ms=p.get("birth_ms", 0.0), waiting=p.get("waiting", 0))
                       for name, p in sorted(info.get("pools", {}).items())],
                isolation=[pb.IsolationLayer(name=name, available=bool(layer.get("available")),
                                             enabled=bool(layer.get("enabled")),
                                             reason=str(layer.get("reason", "")))
                           for name, layer in sorted(
                               info.get("isolation", {}).get("layers", {}).items())],
                isolation_mode=str(info.get("isolation", {}).get("mode", "")),
                view=pb.FilesystemView(**info.get("isolation", {}).get("view", {})),
                invoke_many_window=self.invoke_many_window,
                max_message_bytes=self.max_message_bytes,
                running=int(info.get("running", 0)), queued=int(info.get("queued", 0)),
                max_concurrency=int(info.get("max_concurrency", 0)),
                max_queue=int(info.get("max_queue", 0)), node=self.node)
            for field, key in (("default_limits", "limits"), ("max_limits", "max_limits")):
                limits = _runtime_limits(self.runtime, info, key)
                converted = limits_to_proto(limits)
                if converted is not None:
                    getattr(msg, field).CopyFrom(converted)
            return msg

    # -- asynchronous invocations (sandbox.asyncq) ---------------------------------------------
    async def InvokeAsync(self, request: pb.InvokeAsyncRequest,
                          context: grpc.aio.ServicerContext) -> pb.InvokeAsyncResponse:
        async with self._call(context):
            invoke = request.invoke
            if invoke.id:
                raise InvalidRequest("InvokeAsync makes the invocation's id: leave invoke.id "
                                     "empty")
            kwargs = _invoke_kwargs(invoke, None)
            queued = await self.runtime.invoke_async(
                invoke.function, version=kwargs["version"], limits=kwargs["limits"],
                payload=kwargs["payload"], content_type=kwargs["content_type"],
                idempotency_key=request.idempotency_key or None,
                policy=policy_fields_from_proto(request.policy)
                if request.HasField("policy") else None)
            return pb.InvokeAsyncResponse(id=queued.id, state=state_to_proto(queued.state),
                                          duplicate=queued.duplicate)

    async def GetInvocation(self, request: pb.GetInvocationRequest,
                            context: grpc.aio.ServicerContext) -> pb.AsyncInvocation:
        async with self._call(context):
            return invocation_to_proto(await self.runtime.invocation(request.id))

    async def ListInvocations(self, request: pb.ListInvocationsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ListInvocationsResponse:
        async with self._call(context):
            items, token = await self.runtime.invocations(
                request.function or None, state_from_proto(request.state),
                page_size=request.page_size or 100, page_token=request.page_token)
            return pb.ListInvocationsResponse(invocations=[invocation_to_proto(i) for i in items],
                                              next_page_token=token)

    async def CancelInvocation(self, request: pb.CancelInvocationRequest,
                               context: grpc.aio.ServicerContext) -> pb.AsyncInvocation:
        async with self._call(context):
            return invocation_to_proto(await self.runtime.cancel_invocation(request.id))

    async def RedriveInvocation(self, request: pb.RedriveInvocationRequest,
                                context: grpc.aio.ServicerContext) -> pb.AsyncInvocation:
        async with self._call(context):
            return invocation_to_proto(await self.runtime.redrive_invocation(request.id))

    # -- helpers -----------------------------------------------------------------------------
    async def load_store(self) -> None:
        """Register every stored function version with the runtime (at start), then follow
        the changes other nodes make to a shared store."""
        if self.store is None:
            return
        loop = asyncio.get_running_loop()

        def changed(added: list[StoredFunction], removed: list[StoredFunction]) -> None:
            # The store's listener thread: hand the change to the loop.
            loop.call_soon_threadsafe(self._follow, added, removed)

        # Followed before the snapshot is taken, so a change made while the snapshot is
        # registered is not lost; it is applied after (it waits for the lock), and what the
        # snapshot registered already is skipped.
        self.store.watch(changed)
        async with self._deploy_lock:
            registered = {(f.name, f.version) for f in self.runtime.functions()}
            for stored in self.store.functions(all_versions=True):
                if (stored.name, stored.version) in registered:
                    continue
                await self._ensure_profile(sorted(set(stored.preload)))
                self._register(stored)

    def _follow(self, added: list[StoredFunction], removed: list[StoredFunction]) -> None:
        task = asyncio.get_running_loop().create_task(self._follow_store(added, removed))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow_store(self, added: list[StoredFunction],
                            removed: list[StoredFunction]) -> None:
        """Serve what another node deployed, stop serving what it deleted."""
        async with self._deploy_lock:
            registered = {(f.name, f.version) for f in self.runtime.functions()}
            for stored in removed:
                if (stored.name, stored.version) in registered:
                    with contextlib.suppress(FunctionNotFound):
                        self.runtime.unregister(stored.name, stored.version)
            for stored in added:
                if (stored.name, stored.version) in registered:
                    continue
                try:
                    await self._ensure_profile(sorted(set(stored.preload)))
                    self._register(stored)
                except (SandboxError, OSError) as exc:
                    log.error("cannot serve %s version %d deployed by another node: %s",
                              stored.name, stored.version, exc,
                              extra={"event": "store_sync_failed", "fields": {
                                  "function": stored.name, "version": stored.version,
                                  "error": str(exc)}})

    async def _ensure_profile(self, modules: Sequence[str]) -> None:
        name = profile_name(modules)
        if name != "default":
            await self.runtime.add_profile(name, list(modules))

    async def _registered(self, stored: StoredFunction) -> FunctionInfo:
        """The runtime's version of ``stored``, registered now if it was not yet (a shared
        store's version another node deployed, not followed here yet)."""
        with contextlib.suppress(FunctionNotFound):
            return self.runtime.function(stored.name, stored.version)
        await self._ensure_profile(sorted(set(stored.preload)))
        return self._register(stored)

    def _register(self, stored: StoredFunction) -> FunctionInfo:
        assert self.store is not None
        return self.runtime.register(
            stored.name, path=self.store.bundle_path(stored), handler=stored.runtime_handler,
            profile=stored.profile, limits=stored.limits, reuse=stored.reuse,
            version=stored.version, digest=stored.digest, async_policy=stored.async_policy)

    def _function(self, info: FunctionInfo) -> pb.Function:
        stored = None
        if self.store is not None:
            with contextlib.suppress(FunctionNotFound):
                stored = self.store.get(info.name, info.version)
        modules = self.runtime.info().get("profiles", {}).get(info.profile, [])
        msg = _function_to_proto(info, stored, modules)
        msg.async_policy.CopyFrom(policy_to_proto(self.runtime.async_policy(info.name,
                                                                            info.version)))
        return msg


class _InvokeMany:
    """One InvokeMany stream: a reader that starts invocations while the window has room, and
    the handler's loop that writes results as they complete.

    A permit of the window is taken before each request is read and given back once its
    response is written, so at most ``window`` invocations (or their unsent results) exist per
    stream; past that the server stops reading and HTTP/2 flow control stops the sender.
    """

    def __init__(self, servicer: SandboxServicer,
                 requests: AsyncIterator[pb.InvokeManyRequest], deadline: float | None) -> None:
        self.servicer = servicer
        self.requests = requests
        self.deadline = deadline
        self.window = asyncio.Semaphore(servicer.invoke_many_window)
        self.out: asyncio.Queue[pb.InvokeManyResponse | None] = asyncio.Queue()
        self.handles: dict[str, AsyncInvocation] = {}
        self.tasks: set[asyncio.Task[InvocationResult]] = set()

    async def run(self) -> AsyncIterator[pb.InvokeManyResponse]:
        reader = asyncio.create_task(self._read())
        try:
            while (response := await self.out.get()) is not None:
                yield response
                self.window.release()
            await reader  # re-raise what ended the reader
        finally:
            reader.cancel()
            for handle in self.handles.values():
                handle.cancel()  # kills the workers
            await asyncio.gather(reader, *self.tasks, return_exceptions=True)

    async def _read(self) -> None:
        try:
            index = 0
            iterator = aiter(self.requests)
            while True:
                await self.window.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    self.window.release()
                    break
                kind = request.WhichOneof("request")
                if kind == "cancel_id":
                    self.window.release()
                    handle = self.handles.get(request.cancel_id)
                    if handle is not None:
                        handle.cancel()
                    continue
                ident = request.invoke.id or str(index)
                index += 1
                if kind != "invoke":
                    self._error(ident, InvalidRequest("an InvokeManyRequest must set invoke or "
                                                      "cancel_id"))
                elif ident in self.handles:
                    self._error(ident, InvalidRequest(f"id {ident!r} is already in flight on "
                                                      "this stream"))
                else:
                    self._start(ident, request.invoke)
            while self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            self.out.put_nowait(None)

    def _start(self, ident: str, request: pb.InvokeRequest) -> None:
        try:
            if self.servicer.draining:
                raise _Draining()
            kwargs = _invoke_kwargs(request, self.deadline)
            kwargs["id"] = ident
            handle = self.servicer.runtime.submit(request.function, **kwargs)
        except (SandboxError, TimeoutError) as exc:
            self._error(ident, exc)
            return
        self.handles[ident] = handle
        # A callback, not a task per invocation: one hop less between result and response.
        task = handle.task
        self.tasks.add(task)
        content_type = kwargs["content_type"]
        task.add_done_callback(lambda done: self._done(ident, done, content_type))

    def _done(self, ident: str, task: asyncio.Task[InvocationResult], content_type: str) -> None:
        self.tasks.discard(task)
        self.handles.pop(ident, None)
        if task.cancelled():
            self._error(ident, ShuttingDown("the invocation was cancelled"))
            return
        exc = task.exception()
        if exc is None:
            self.out.put_nowait(pb.InvokeManyResponse(
                result=result_to_proto(task.result(), content_type,
                                       self.servicer.node)))
        elif isinstance(exc, SandboxError | TimeoutError):
            self._error(ident, exc)
        else:
            self._error(ident, SandboxError(f"internal error: {type(exc).__name__}: {exc}"))

    def _error(self, ident: str, exc: BaseException) -> None:
        code, details = status_for(exc)
        self.out.put_nowait(pb.InvokeManyResponse(
            error=pb.InvokeError(id=ident, code=code.value[0], message=details)))


def _deploy_async_policy(request: pb.DeployRequest) -> dict[str, Any] | None:
    """The fields of the deployment's async policy (checked), or None when it gave none."""
    if not request.HasField("async_policy"):
        return None
    fields = policy_fields_from_proto(request.async_policy)
    AsyncPolicy.from_dict(fields)  # InvalidRequest
    return fields


def _latest_if_same(store: Store, request: pb.DeployRequest, fmt: SourceFormat | None,
                    limits: Limits | None) -> StoredFunction | None:
    """The latest version of ``request.name`` when it is already exactly this deployment (the
    same source digest, source format, handler, preload, limits and reuse), else None: Deploy
    is idempotent, so a retried Deploy whose first attempt landed makes no second version."""
    try:
        latest = store.get(request.name)
    except FunctionNotFound:
        return None
    if latest.digest != hashlib.sha256(request.source).hexdigest():
        return None
    source_format = fmt or detect_format(request.source)
    try:
        handler = normalize_handler(request.handler, source_format)
    except InvalidRequest:
        return None  # the store's deploy says what is wrong
    same = (latest.source_format == source_format and latest.handler == handler
            and latest.preload == tuple(dict.fromkeys(request.preload))
            and latest.limits == (limits if limits is not None else Limits())
            and latest.reuse == max(1, request.reuse)
            and latest.async_policy == _deploy_async_policy(request))
    return latest if same else None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining)


def _invoke_kwargs(request: pb.InvokeRequest | pb.InvokeStreamRequest,
                   deadline: float | None) -> dict[str, Any]:
    """The runtime's keyword arguments for an invocation request (validated)."""
    if not request.function:
        raise InvalidRequest("no function named in the request")
    content_type = request.content_type or CONTENT_TYPES[0]
    if content_type not in CONTENT_TYPES:
        raise InvalidRequest(f"unsupported content_type {content_type!r}; use one of "
                             f"{', '.join(CONTENT_TYPES)}")
    return {
        "version": request.version if request.HasField("version") else None,
        "limits": limits_from_proto(request.limits, request.HasField("limits")),
        "id": request.id or uuid.uuid4().hex,
        "payload": request.payload or None,
        "content_type": content_type,
        "deadline": deadline,
    }


def _check_deadline(result: InvocationResult, deadline: float | None) -> None:
    """A wall timeout that the client's deadline imposed is the call's DEADLINE_EXCEEDED."""
    if (deadline is not None and result.outcome is Outcome.TIMEOUT
            and time.monotonic() >= deadline - 0.005):
        raise TimeoutError("the client's deadline passed; the function was killed")


def _runtime_limits(runtime: AsyncRuntime, info: Mapping[str, Any], key: str) -> Limits | None:
    value = info.get(key, getattr(runtime, key, None))
    if isinstance(value, Limits):
        return value
    if isinstance(value, Mapping):
        return Limits.from_dict(value)
    return None


# ---------------------------------------------------------------------------------------------
# Building and running the server

@dataclasses.dataclass(slots=True)
class ServerHandle:
    """What :func:`create_server` made: the server, its servicers, and the bound port (0 for
    a unix socket)."""

    server: grpc.aio.Server
    port: int
    servicer: SandboxServicer
    health: Any

    def __iter__(self) -> Iterator[Any]:  # so `server, port = create_server(...)` works
        return iter((self.server, self.port))

    async def drain(self, grace_s: float) -> None:
        """Health NOT_SERVING, refuse new calls, give in-flight calls ``grace_s``, stop."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


#: How long a client's connection lasts before the server asks it to reconnect (see above).
MAX_CONNECTION_AGE_S = 300


def create_server(runtime: AsyncRuntime, address: str = "127.0.0.1:0", *,
                  store: Store | None = None,
                  invoke_many_window: int = DEFAULT_INVOKE_MANY_WINDOW,
                  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  credentials: grpc.ServerCredentials | None = None,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                  node: str | None = None) -> ServerHandle:
    """A ``grpc.aio`` server (not started) serving ``sandbox.v1.Sandbox``, Health and
    Reflection on ``address``. Unpacks as ``server, port``; port 0 binds an ephemeral one.

    Args:
        address: ``host:port``, or ``unix:PATH`` (the socket is made mode 0600).
        credentials: TLS (:func:`sandbox.security.server_credentials`); None: plaintext.
        interceptors: server interceptors, the first outermost (metrics, then auth).
        node: the server's name in a fleet (GetInfo, ``stats.node``); default
            ``hostname:port`` once the port is bound (``hostname:unix:PATH`` on a socket).

    Raises:
        ConfigurationError: the address cannot be bound.
    """
    server = grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),  # results are bounded by max_result_bytes
        ("grpc.so_reuseport", 0),
        # A fleet's clients resolve a DNS name (a headless Service) again only when a
        # connection closes: ending each connection after a while (GOAWAY: calls in flight,
        # streams included, finish undisturbed) lets new replicas get their share of calls.
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_S * 1000),
    ])
    servicer = SandboxServicer(runtime, store, invoke_many_window=invoke_many_window,
                               max_message_bytes=max_message_bytes, node=node)
    pb_grpc.add_SandboxServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    socket_path = unix_socket_path(address)
    # A unix socket is created owner-only (no window with the umask's mode), then checked.
    umask = os.umask(0o177) if socket_path is not None else None
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigurationError(f"cannot listen on {address!r}: {exc}") from exc
    finally:
        if umask is not None:
            os.umask(umask)
    if port == 0:
        raise ConfigurationError(f"cannot listen on {address!r}")
    if socket_path is not None:
        os.chmod(socket_path, 0o600)
        port = 0
    if not node:
        servicer.node = f"{socket.gethostname()}:{port if socket_path is None else address}"
    return ServerHandle(server, port, servicer, health_servicer)


async def _set_serving(handle: ServerHandle) -> None:
    for service in ("", SERVICE_NAME):
        await handle.health.set(service, health_pb2.HealthCheckResponse.SERVING)


def default_state_dir() -> Path:
    """``$SANDBOX_STATE_DIR``, else ``$XDG_STATE_HOME/sandbox``, else
    ``~/.local/state/sandbox``."""
    explicit = os.environ.get("SANDBOX_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return Path(base) / "sandbox"


@dataclasses.dataclass(frozen=True, slots=True)
class Security:
    """How ``sandbox serve`` guards its API (see :mod:`sandbox.security`)."""

    tls_cert: str | None = None
    tls_key: str | None = None
    #: clients must present a certificate this CA signed (mTLS)
    tls_client_ca: str | None = None
    #: the tokens file (``ROLE TOKEN`` lines), reloaded on SIGHUP
    auth_tokens: str | None = None
    #: allow a non-local address without TLS and tokens
    insecure: bool = False

    def check(self, address: str) -> tuple[grpc.ServerCredentials | None, TokenTable | None]:
        """Load the credentials and the tokens, and apply the listen policy.

        Raises:
            ConfigurationError: a flag without its partner, a file that does not load, or a
                non-local address without TLS and tokens (and not ``insecure``).
        """
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigurationError("give --tls-cert and --tls-key together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key")
        credentials = None
        if self.tls_cert is not None and self.tls_key is not None:
            credentials = server_credentials(self.tls_cert, self.tls_key, self.tls_client_ca)
        tokens = TokenTable(self.auth_tokens) if self.auth_tokens is not None else None
        check_listen(address, tls=credentials is not None, auth=tokens is not None,
                     insecure=self.insecure)
        return credentials, tokens


async def serve(
    address: str = "127.0.0.1:50051",
    state_dir: str | Path | None = None,
    *,
    preload: Sequence[Sequence[str]] = (),
    limits: Limits | None = None,
    max_limits: Limits | None = None,
    min_idle: int = 2,
    max_idle: int | None = None,
    idle_ttl_s: float = 60.0,
    max_concurrency: int | None = None,
    max_queue: int = 4096,
    grace_s: float = 10.0,
    invoke_many_window: int = DEFAULT_INVOKE_MANY_WINDOW,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ready: Callable[[str, int], None] | None = None,
    stop: asyncio.Event | None = None,
    isolation: str | None = None,
    security: Security | None = None,
    metrics_listen: str | None = None,
    metrics_ready: Callable[[str], None] | None = None,
    node_name: str | None = None,
    store_url: str | None = None,
    async_concurrency: int | None = None,
    async_max_queued: int = 100_000,
    async_max_queued_per_function: int = 10_000,
    async_lease_s: float = 30.0,
    health_listen: str | None = None,
) -> None:
    """Run ``sandbox serve`` until SIGTERM/SIGINT (or ``stop`` is set), then drain.

    The runtime's zygotes start before any gRPC object exists. ``preload`` lists the profiles
    to warm at start (each a list of modules), besides those the stored functions need.
    ``ready(host, port)`` is called once the server accepts calls (``ready("unix:PATH", 0)``
    on a unix socket); ``metrics_ready(url)`` once ``/metrics`` is served on
    ``metrics_listen``. ``security`` is checked before anything starts. ``node_name`` names
    this server in a fleet (GetInfo, every result's ``stats.node``, the access log); default
    ``hostname:port``. ``store_url``: a ``postgresql://`` URL makes the function store a fleet's
    shared one (:mod:`sandbox.pgstore`), mirrored in ``state_dir``; None keeps functions in
    ``state_dir`` alone. Asynchronous invocations queue beside the functions (SQLite in
    ``state_dir``, or the fleet's PostgreSQL): ``async_concurrency`` attempts at once (default
    half of ``max_concurrency``), at most ``async_max_queued`` queued or running (and
    ``async_max_queued_per_function`` per function) before RESOURCE_EXHAUSTED; an attempt's
    lease lasts ``async_lease_s`` (a replica that dies mid-attempt has it retried after that).
    ``health_listen``: also serve the health service alone, in plaintext, there (for probes
    that speak no TLS, such as Kubernetes' native gRPC probes).

    Raises:
        ConfigurationError: bad security settings, an address that cannot be bound, or a
            listen policy refusal (nothing was started).
    """
    from sandbox.logs import AccessLog
    from sandbox.runtime import AsyncRuntime  # the runtime pulls in the process machinery

    credentials, tokens = (security or Security()).check(address)
    store = open_store(store_url, default_state_dir() if state_dir is None else state_dir,
                       node=node_name or socket.gethostname())
    try:
        profiles: dict[str, list[str]] = {}
        for modules in [*preload, *(fn.preload for fn in store.functions(all_versions=True))]:
            unique = sorted(set(modules))
            if unique:
                profiles[profile_name(unique)] = unique
        runtime_kwargs: dict[str, Any] = {"profiles": profiles, "max_limits": max_limits,
                                          "min_idle": min_idle, "max_idle": max_idle,
                                          "idle_ttl_s": idle_ttl_s,
                                          "max_concurrency": max_concurrency,
                                          "max_queue": max_queue, "isolation": isolation,
                                          "hide": [str(store.root)]}
        if limits is not None:
            runtime_kwargs["limits"] = limits
        runtime_kwargs["async_queue"] = open_queue(
            store, max_queued=async_max_queued,
            max_queued_per_function=async_max_queued_per_function)
        runtime_kwargs["async_concurrency"] = async_concurrency
        runtime_kwargs["async_lease_s"] = async_lease_s
        runtime = AsyncRuntime(**runtime_kwargs)
        access_log = AccessLog()
        runtime.add_observer(access_log)
        async with contextlib.AsyncExitStack() as stack:
            interceptors: list[grpc.aio.ServerInterceptor] = []
            if metrics_listen is not None:
                interceptor, url = _start_metrics(runtime, metrics_listen, stack)
                interceptors.append(interceptor)
                ready = _then(ready, metrics_ready, url)
            _start_tracing(runtime, stack)
            if tokens is not None:
                interceptors.append(AuthInterceptor(tokens))
            await runtime.start()
            try:
                await _serve_runtime(runtime, store, address, grace_s=grace_s,
                                     invoke_many_window=invoke_many_window,
                                     max_message_bytes=max_message_bytes, ready=ready,
                                     stop=stop, credentials=credentials,
                                     interceptors=interceptors, tokens=tokens,
                                     node_name=node_name, access_log=access_log,
                                     health_listen=health_listen)
            finally:
                await runtime.aclose(grace_s=min(grace_s, 1.0))
    finally:
        store.close()
    log.info("stopped", extra={"event": "stop", "fields": {}})


def _then(ready: Callable[[str, int], None] | None, metrics_ready: Callable[[str], None] | None,
          url: str) -> Callable[[str, int], None]:
    """``ready``, then ``metrics_ready(url)``: the server's address is announced first."""
    def both(host: str, port: int) -> None:
        if ready is not None:
            ready(host, port)
        if metrics_ready is not None:
            metrics_ready(url)
    return both


def _start_metrics(runtime: AsyncRuntime, address: str, stack: contextlib.AsyncExitStack
                   ) -> tuple[grpc.aio.ServerInterceptor, str]:
    """Metrics of ``runtime`` (and of the process) served on ``address``; returns the gRPC
    interceptor that counts RPCs, and the URL."""
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )

    from sandbox.metrics import Metrics, serve_metrics

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    metrics = Metrics(runtime, registry)
    http = serve_metrics(address, registry)
    stack.callback(http.close)
    log.info("metrics on %s", http.url, extra={"event": "metrics", "fields": {"url": http.url}})
    return metrics.interceptor(), http.url


def _start_tracing(runtime: AsyncRuntime, stack: contextlib.AsyncExitStack) -> None:
    """Traces when the environment asks for them and the ``otel`` extra is installed."""
    if not otel_requested():
        return
    import importlib.util

    if importlib.util.find_spec("opentelemetry.sdk") is None:
        log.warning("OTEL_* variables ask for traces, but the otel extra is not installed "
                    "(pip install 'sandbox[otel]'): no traces",
                    extra={"event": "tracing_unavailable", "fields": {}})
        return
    from sandbox.tracing import Tracing, provider_from_environment

    provider = provider_from_environment()
    stack.callback(provider.shutdown)  # flushes the spans not exported yet
    Tracing(runtime, provider)
    log.info("tracing: OpenTelemetry, exporters %s", os.environ.get("OTEL_TRACES_EXPORTER",
                                                                    "otlp"),
             extra={"event": "tracing", "fields": {
                 "exporters": os.environ.get("OTEL_TRACES_EXPORTER", "otlp")}})


def open_store(url: str | None, state_dir: str | Path, *, node: str = "") -> Store:
    """The function store ``sandbox serve --store`` names: None (or a path) is the state
    directory itself; ``postgresql://...`` a fleet's shared store mirrored in it.

    Raises:
        ConfigurationError: an unknown kind of store, a state directory in use, a schema
            newer than this version.
    """
    if url is None or not url.strip():
        return FunctionStore(state_dir)
    from sandbox.pgstore import PostgresStore, is_postgres_url

    if is_postgres_url(url):
        return PostgresStore(url, state_dir, node=node)
    raise ConfigurationError(f"--store {url.split('://')[0]}://...: only postgresql:// URLs "
                             "are known (without --store, functions stay in --state-dir)")


async def _serve_runtime(runtime: AsyncRuntime, store: Store, address: str, *,
                         grace_s: float, invoke_many_window: int, max_message_bytes: int,
                         ready: Callable[[str, int], None] | None,
                         stop: asyncio.Event | None,
                         credentials: grpc.ServerCredentials | None = None,
                         interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                         tokens: TokenTable | None = None, node_name: str | None = None,
                         access_log: AccessLog | None = None,
                         health_listen: str | None = None) -> None:
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = [signal.SIGTERM, signal.SIGINT]
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if tokens is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_tokens, tokens)
        signals.append(signal.SIGHUP)
    handle: ServerHandle | None = None
    health_server: grpc.aio.Server | None = None
    try:
        handle = create_server(runtime, address, store=store,
                               invoke_many_window=invoke_many_window,
                               max_message_bytes=max_message_bytes, credentials=credentials,
                               interceptors=interceptors, node=node_name)
        if access_log is not None:
            access_log.node = handle.servicer.node
        runtime.set_node(handle.servicer.node)  # recorded with each async attempt
        await handle.servicer.load_store()
        await handle.server.start()
        if health_listen is not None:
            health_server = await _start_health_server(handle.health, health_listen)
        await _set_serving(handle)
        host = address if handle.port == 0 else address.rsplit(":", 1)[0]
        shown = host if handle.port == 0 else f"{host}:{handle.port}"
        log.info("sandbox serving %s on %s as %s (tls %s, auth %s)", SERVICE_NAME, shown,
                 handle.servicer.node, "on" if credentials is not None else "off",
                 "on" if tokens is not None else "off",
                 extra={"event": "listening", "fields": {
                     "address": shown, "node": handle.servicer.node,
                     "tls": credentials is not None,
                     "auth": tokens is not None}})
        if ready is not None:
            ready(host, handle.port)
        await stop.wait()
        log.info("draining: %.1f s grace for in-flight calls", grace_s,
                 extra={"event": "drain", "fields": {"grace_s": grace_s}})
        await handle.drain(grace_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if handle is not None:
            await handle.server.stop(0)
        if health_server is not None:
            await health_server.stop(0)
        sys.stdout.flush()


async def _start_health_server(health_servicer: Any, address: str) -> grpc.aio.Server:
    """The health service alone, in plaintext, on ``address``: what Kubernetes' native gRPC
    probes can reach when the API's port has TLS (they speak no TLS). It says what the API's
    own health service says (one servicer), NOT_SERVING from the first moment of a drain.
    Nothing else is served there, so it needs neither TLS nor tokens.

    Raises:
        ConfigurationError: the address cannot be bound.
    """
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigurationError(f"--health-listen: cannot listen on {address!r}: {exc}") from exc
    if port == 0:
        raise ConfigurationError(f"--health-listen: cannot listen on {address!r}")
    await server.start()
    shown = f"{address.rsplit(':', 1)[0]}:{port}"
    log.info("health service on %s (plaintext, health only)", shown,
             extra={"event": "health_listening", "fields": {"address": shown}})
    return server


def _reload_tokens(tokens: TokenTable) -> None:
    """SIGHUP: read the tokens file again; calls in flight go on, a bad file changes nothing."""
    try:
        count = tokens.reload()
    except ConfigurationError as exc:
        log.error("tokens not reloaded, the previous ones stay in force: %s", exc,
                  extra={"event": "auth_reload", "fields": {"ok": False, "error": str(exc)}})
        return
    log.info("tokens reloaded from %s: %d", tokens.path, count,
             extra={"event": "auth_reload", "fields": {"ok": True, "tokens": count}})

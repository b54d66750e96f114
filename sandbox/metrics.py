"""Prometheus metrics of a runtime and of its gRPC server.

::

    AsyncRuntime ──events──▶ Metrics (an Observer) ──▶ counters, histograms ─┐
         └──gauges() at scrape time ◀── _RuntimeCollector ◀──────────────────┤ CollectorRegistry
    grpc.aio server ──▶ GrpcMetricsInterceptor ──▶ grpc_server_* ────────────┘      │
                                                       serve_metrics(): GET /metrics ┘

``sandbox serve --metrics-listen HOST:PORT`` serves ``/metrics``; embedded, put the same
collectors into your own registry::

    from prometheus_client import CollectorRegistry, generate_latest
    from sandbox.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(runtime, registry)     # a Runtime or an AsyncRuntime
    ...
    generate_latest(registry)

The metrics (names are the interface):

======================================================  ===========  ==========================
``sandbox_invocations_total{function,outcome}``         counter      invocations ended, by
                                                                     outcome (``OK``, ...)
``sandbox_invocation_duration_seconds{function}``       histogram    admitted → result
``sandbox_invocation_queue_seconds{function}``          histogram    waiting for a slot
``sandbox_invocation_startup_seconds{function}``        histogram    waiting for a ready worker
``sandbox_cold_starts_total{function}``                 counter      calls that waited for a
                                                                     zygote to start
``sandbox_worker_births_total{profile}``                counter      workers born
``sandbox_worker_birth_seconds{profile}``               histogram    birth: request → ready
``sandbox_worker_birth_failures_total{profile}``        counter      births that failed
``sandbox_zygote_restarts_total{profile}``              counter      zygotes replaced after one
                                                                     died
``sandbox_rejected_total{reason}``                      counter      calls refused before
                                                                     admission: overloaded,
                                                                     shutting_down, not_found,
                                                                     invalid_request
``sandbox_invocation_errors_total{function}``           counter      admitted calls that ended
                                                                     without a result
``sandbox_pool_workers{profile,state}``                 gauge        idle, busy, starting
``sandbox_queue_depth``                                 gauge        calls waiting for a slot
``sandbox_running_invocations``                         gauge        calls running
``sandbox_async_invocations_total{function,event}``     counter      asynchronous invocations'
                                                                     events: queued, started,
                                                                     retried, succeeded, failed,
                                                                     dead_lettered, cancelled,
                                                                     redriven, crashed
``sandbox_async_queued``                                gauge        asynchronous invocations
                                                                     queued (the whole queue's)
``sandbox_async_running``                               gauge        asynchronous attempts
                                                                     running here
``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``    RPCs started
``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``  RPCs finished
``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}``  histogram of their time
======================================================  ===========  ==========================

The ``grpc_server_*`` names and labels are those of the Go and Java gRPC Prometheus
interceptors. Counters are updated before the caller gets its result, so a client that saw N
results sees the counters moved by N. Histograms have sub-millisecond buckets.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from sandbox.errors import ConfigurationError
from sandbox.observe import REJECTION_REASONS, InvocationRecord, Observer

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from sandbox.outcome import InvocationResult

__all__ = ["BUCKETS", "GrpcMetricsInterceptor", "Metrics", "MetricsServer", "serve_metrics"]

#: Histogram buckets, seconds: sub-millisecond to five minutes.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WORKER_STATES = ("idle", "busy", "starting")


class _Observed(Protocol):
    """What :class:`Metrics` needs of a runtime (``Runtime`` and ``AsyncRuntime`` have it)."""

    def add_observer(self, observer: Observer) -> None: ...

    def remove_observer(self, observer: Observer) -> None: ...

    def gauges(self) -> dict[str, Any]: ...


class _RuntimeCollector(Collector):
    """The gauges, read from the runtime when the registry is scraped."""

    def __init__(self, runtime: _Observed) -> None:
        self.runtime = runtime

    def describe(self) -> Iterable[Metric]:
        return self._families({"pools": {}, "queued": 0, "running": 0})

    def collect(self) -> Iterable[Metric]:
        return self._families(self.runtime.gauges())

    @staticmethod
    def _families(gauges: dict[str, Any]) -> list[Metric]:
        workers = GaugeMetricFamily("sandbox_pool_workers",
                                    "Workers of each profile's pool, by state.",
                                    labels=["profile", "state"])
        for profile, counts in sorted(gauges["pools"].items()):
            for state in WORKER_STATES:
                workers.add_metric([profile, state], counts.get(state, 0))
        families: list[Metric] = [
            workers,
            GaugeMetricFamily("sandbox_queue_depth", "Invocations waiting for a running slot.",
                              value=gauges["queued"]),
            GaugeMetricFamily("sandbox_running_invocations", "Invocations running now.",
                              value=gauges["running"]),
        ]
        queue = gauges.get("async")
        if queue is not None:
            families.append(GaugeMetricFamily(
                "sandbox_async_queued", "Asynchronous invocations queued (waiting for an "
                "attempt or a retry), in the whole queue.", value=queue.get("queued", 0)))
            families.append(GaugeMetricFamily(
                "sandbox_async_running", "Asynchronous attempts running on this server.",
                value=queue.get("running", 0)))
        return families


class Metrics(Observer):
    """The sandbox's metrics for one runtime, registered into ``registry`` (default: the
    ``prometheus_client`` global one) and fed by the runtime's events.

    Raises:
        ConfigurationError: ``registry`` already holds sandbox metrics (one runtime per
            registry).
    """

    def __init__(self, runtime: _Observed, registry: CollectorRegistry | None = None) -> None:
        self.runtime = runtime
        self.registry = REGISTRY if registry is None else registry
        fn, prof = ["function"], ["profile"]
        self.invocations = Counter("sandbox_invocations", "Invocations ended, by outcome.",
                                   ["function", "outcome"], registry=None)
        self.duration = Histogram("sandbox_invocation_duration_seconds",
                                  "Time from admission to result.", fn, buckets=BUCKETS,
                                  registry=None)
        self.queue = Histogram("sandbox_invocation_queue_seconds",
                               "Time waiting for a running slot.", fn, buckets=BUCKETS,
                               registry=None)
        self.startup = Histogram("sandbox_invocation_startup_seconds",
                                 "Time waiting for a ready worker (0 when one was idle).", fn,
                                 buckets=BUCKETS, registry=None)
        self.cold_starts = Counter("sandbox_cold_starts", "Invocations that waited for a "
                                   "zygote to start.", fn, registry=None)
        self.errors = Counter("sandbox_invocation_errors", "Admitted invocations that ended "
                              "without a result (an error of the call).", fn, registry=None)
        self.births = Counter("sandbox_worker_births", "Workers born.", prof, registry=None)
        self.birth_seconds = Histogram("sandbox_worker_birth_seconds",
                                       "Worker births, from request to ready.", prof,
                                       buckets=BUCKETS, registry=None)
        self.birth_failures = Counter("sandbox_worker_birth_failures",
                                      "Worker births that failed.", prof, registry=None)
        self.zygote_restarts = Counter("sandbox_zygote_restarts",
                                       "Zygotes started to replace one that died.", prof,
                                       registry=None)
        self.rejected_calls = Counter("sandbox_rejected", "Invocations refused before "
                                      "admission, by reason.", ["reason"], registry=None)
        for reason in REJECTION_REASONS:
            self.rejected_calls.labels(reason)
        self.async_events = Counter("sandbox_async_invocations", "Events of asynchronous "
                                    "invocations: queued, started, retried, succeeded, "
                                    "failed, dead_lettered, cancelled, redriven, crashed.",
                                    ["function", "event"], registry=None)
        self.grpc = GrpcMetricsInterceptor(registry=None)
        self._collectors: list[Collector] = [
            self.invocations, self.duration, self.queue, self.startup, self.cold_starts,
            self.errors, self.births, self.birth_seconds, self.birth_failures,
            self.zygote_restarts, self.rejected_calls, self.async_events,
            *self.grpc.collectors,
            _RuntimeCollector(runtime)]
        registered: list[Collector] = []
        try:
            for collector in self._collectors:
                self.registry.register(collector)
                registered.append(collector)
        except ValueError as exc:
            for collector in registered:
                self.registry.unregister(collector)
            raise ConfigurationError(f"this registry already has sandbox metrics ({exc}); "
                                     "use one registry per runtime") from None
        #: per function: (duration, queue, startup) histograms' children, made once
        self._per_function: dict[str, tuple[Any, Any, Any]] = {}
        self._outcomes: dict[tuple[str, str], Any] = {}
        runtime.add_observer(self)

    def close(self) -> None:
        """Stop observing the runtime and take the metrics out of the registry."""
        self.runtime.remove_observer(self)
        for collector in self._collectors:
            self.registry.unregister(collector)

    def interceptor(self) -> GrpcMetricsInterceptor:
        """The server interceptor that feeds the ``grpc_server_*`` metrics."""
        return self.grpc

    # Observer -----------------------------------------------------------------------------
    def invocation_finished(self, record: InvocationRecord, result: InvocationResult) -> None:
        function = record.function
        key = (function, result.outcome.value)
        counter = self._outcomes.get(key)
        if counter is None:
            counter = self._outcomes[key] = self.invocations.labels(*key)
        counter.inc()
        children = self._per_function.get(function)
        if children is None:
            children = self._per_function[function] = (
                self.duration.labels(function), self.queue.labels(function),
                self.startup.labels(function))
        s = result.stats
        children[0].observe(s.queue_s + s.startup_s + s.run_s)
        children[1].observe(s.queue_s)
        children[2].observe(s.startup_s)
        if s.cold_start:
            self.cold_starts.labels(function).inc()

    def invocation_failed(self, record: InvocationRecord, error: BaseException) -> None:
        self.errors.labels(record.function).inc()

    def rejected(self, reason: str, function: str) -> None:
        self.rejected_calls.labels(reason).inc()

    def async_event(self, event: str, function: str) -> None:
        self.async_events.labels(function, event).inc()

    def worker_born(self, profile: str, seconds: float) -> None:
        self.births.labels(profile).inc()
        self.birth_seconds.labels(profile).observe(seconds)

    def birth_failed(self, profile: str, error: BaseException) -> None:
        self.birth_failures.labels(profile).inc()

    def zygote_started(self, profile: str, pid: int, replacement: bool) -> None:
        if replacement:
            self.zygote_restarts.labels(profile).inc()
        else:
            self.zygote_restarts.labels(profile)  # the series exists from the start, at 0


# ---------------------------------------------------------------------------------------------
# Per-RPC metrics

_Behavior = Callable[..., Any]


def _split_method(full: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``)."""
    _, _, rest = full.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def _code_name(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(default.name)


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """``grpc_server_started_total``, ``grpc_server_handled_total`` and
    ``grpc_server_handling_seconds`` for every RPC (health and reflection included)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server.", labels,
                               registry=registry)
        self.handled = Counter("grpc_server_handled", "RPCs completed on the server, "
                               "regardless of success or failure.", [*labels, "grpc_code"],
                               registry=registry)
        self.seconds = Histogram("grpc_server_handling_seconds", "Time the server took to "
                                 "handle RPCs (to the last response message).", labels,
                                 buckets=BUCKETS, registry=registry)
        #: per method, its handlers seen so far (the service's, an auth denial...) and their
        #: wrapped versions, made once rather than per call; a few per method at most
        self._wrapped: dict[str, list[tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]] = {}

    @property
    def collectors(self) -> list[Collector]:
        return [self.started, self.handled, self.seconds]

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full: str = handler_call_details.method
        known = self._wrapped.setdefault(full, [])
        for seen, wrapped_handler in known:
            if seen is handler:
                return wrapped_handler
        wrapped_handler = self._wrap_handler(full, handler)
        if len(known) < 8:
            known.append((handler, wrapped_handler))
        return wrapped_handler

    def _wrap_handler(self, full: str, handler: grpc.RpcMethodHandler
                      ) -> grpc.RpcMethodHandler:
        service, method = _split_method(full)
        if handler.request_streaming and handler.response_streaming:
            kind, behavior, make = "bidi_stream", handler.stream_stream, \
                grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            kind, behavior, make = "client_stream", handler.stream_unary, \
                grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            kind, behavior, make = "server_stream", handler.unary_stream, \
                grpc.unary_stream_rpc_method_handler
        else:
            kind, behavior, make = "unary", handler.unary_unary, \
                grpc.unary_unary_rpc_method_handler
        labels = (kind, service, method)
        wrapped = self._wrap(behavior, labels)
        if wrapped is None:
            return handler
        return make(wrapped, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _wrap(self, behavior: _Behavior | None, labels: tuple[str, str, str]
              ) -> _Behavior | None:
        if behavior is None:
            return None
        started = self.started.labels(*labels)
        seconds = self.seconds.labels(*labels)
        handled: dict[str, Any] = {}

        def finish(code: str, t0: float) -> None:
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = self.handled.labels(*labels, code)
            counter.inc()
            seconds.observe(time.perf_counter() - t0)

        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[Any]:
                started.inc()
                counted = _CountingContext(context, finish)
                code = "OK"
                try:
                    async for response in behavior(request, counted):
                        yield response
                    code = _code_name(context, grpc.StatusCode.OK)
                except BaseException as exc:
                    code = _failure(context, exc)
                    raise
                finally:
                    counted.count(code)
            return stream
        if inspect.iscoroutinefunction(behavior):
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                counted = _CountingContext(context, finish)
                code = "OK"
                try:
                    response = await behavior(request, counted)
                    code = _code_name(context, grpc.StatusCode.OK)
                    return response
                except BaseException as exc:
                    code = _failure(context, exc)
                    raise
                finally:
                    counted.count(code)
            return unary
        return None  # a synchronous handler (none of ours): left as it is


class _CountingContext:
    """The servicer's context, counting an RPC's status once, before the client can see it.

    ``grpc.aio``'s ``abort`` sends the status at once and only then raises, so an RPC counted
    after its handler raised would let a caller see NOT_FOUND, scrape, and not find it counted.
    Everything but ``abort`` is the context's own.
    """

    __slots__ = ("_context", "_counted", "_finish", "_t0")

    def __init__(self, context: grpc.aio.ServicerContext,
                 finish: Callable[[str, float], None]) -> None:
        self._context = context
        self._finish = finish
        self._t0 = time.perf_counter()
        self._counted = False

    def count(self, code: str) -> None:
        if not self._counted:
            self._counted = True
            self._finish(code, self._t0)

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        self.count(code.name)
        await self._context.abort(code, details, trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _failure(context: grpc.aio.ServicerContext, exc: BaseException) -> str:
    """The status an RPC that raised ends with."""
    import asyncio

    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return _code_name(context, grpc.StatusCode.CANCELLED)
    return _code_name(context, grpc.StatusCode.UNKNOWN)


# ---------------------------------------------------------------------------------------------
# The /metrics endpoint

class MetricsServer:
    """An HTTP server of ``/metrics`` (prometheus_client's, on a thread of its own)."""

    def __init__(self, httpd: WSGIServer, thread: Any) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host: str = str(httpd.server_address[0])
        self.port: int = int(httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def parse_address(address: str, what: str = "--metrics-listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``; an empty host is every interface) as (host, port).

    Raises:
        ConfigurationError: not HOST:PORT, or the port is not 0..65535.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigurationError(f"{what} {address!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


def serve_metrics(address: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``http://address/metrics`` (port 0 picks one).

    Raises:
        ConfigurationError: a bad address, or it cannot be bound.
    """
    host, port = parse_address(address)
    try:
        httpd, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {address!r}: {exc.strerror or exc}"
                                 ) from None
    return MetricsServer(httpd, thread)


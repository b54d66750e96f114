"""OpenTelemetry traces of invocations (the ``otel`` extra: ``pip install 'sandbox[otel]'``).

This module imports the OpenTelemetry SDK; nothing else in the package imports it, and
``sandbox serve`` imports this module only when the environment asks for traces
(:func:`sandbox.observe.otel_requested`: ``OTEL_TRACES_EXPORTER``, an OTLP endpoint).

One span per invocation, named after the function, kind SERVER, with the FaaS semantic
conventions (``faas.invocation_id``, ``faas.invoked_name``, ``faas.version``,
``faas.coldstart``, ``faas.max_memory`` in bytes when limited, ``faas.trigger``) and
``sandbox.outcome``; its status is ERROR when the outcome is not ``OK``. Three children,
one after the other: ``queue`` (waiting for a running slot), ``startup`` (waiting for a
ready worker) and ``run`` (the event sent to the outcome known). When the call's gRPC metadata
carries a W3C ``traceparent`` (and ``tracestate``), the span continues that trace; the function
sees the trace id as ``context.trace_id``.

Configuration is the standard environment (:func:`provider_from_environment`):
``OTEL_TRACES_EXPORTER`` (``otlp``, the default when an endpoint is set; ``console``;
``none``; several separated by commas), ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` (``grpc``
or ``http/protobuf``), ``OTEL_SERVICE_NAME`` (default ``sandbox``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and the batch processor's
``OTEL_BSP_*``. Embedded::

    from sandbox.tracing import Tracing
    tracing = Tracing(runtime)              # the global tracer provider, or tracer_provider=
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sandbox import __version__
from sandbox.errors import ConfigurationError
from sandbox.observe import InvocationRecord, Observer
from sandbox.outcome import Outcome

if TYPE_CHECKING:
    from sandbox.outcome import InvocationResult

__all__ = ["EXPORTERS", "Tracing", "provider_from_environment"]

EXPORTERS = ("otlp", "console", "none")
_PROPAGATOR = TraceContextTextMapPropagator()
_KEY = "otel"


class _Observed(Protocol):
    def add_observer(self, observer: Observer) -> None: ...

    def remove_observer(self, observer: Observer) -> None: ...


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
        try:
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
                return OTLPSpanExporter()
            if protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter as HttpExporter,
                )
                return HttpExporter()
        except ImportError as exc:
            raise ConfigurationError(f"OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter "
                                     f"(pip install 'sandbox[otel]'): {exc}") from None
        raise ConfigurationError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: this server "
                                 "speaks grpc or http/protobuf")
    raise ConfigurationError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; expected "
                             f"{', '.join(EXPORTERS)}")


def provider_from_environment(environ: Mapping[str, str] | None = None) -> TracerProvider:
    """A tracer provider with the exporters, resource and sampler the ``OTEL_*`` variables
    name (see the module docstring); the caller shuts it down.

    Raises:
        ConfigurationError: an unknown exporter or protocol.
    """
    env = os.environ if environ is None else environ
    names = [n.strip().lower() for n in
             (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",") if n.strip()]
    exporters = [e for e in (_exporter(n, env) for n in names) if e is not None]
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": "sandbox"}
    attributes["service.version"] = __version__
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing(Observer):
    """Spans of a runtime's invocations (see the module docstring).

    Args:
        runtime: a ``Runtime`` or ``AsyncRuntime`` to observe (or None: add it yourself).
        tracer_provider: where spans go (default: the global one).
    """

    def __init__(self, runtime: _Observed | None = None,
                 tracer_provider: trace.TracerProvider | None = None) -> None:
        provider = tracer_provider if tracer_provider is not None \
            else trace.get_tracer_provider()
        self.provider = provider
        self.tracer = provider.get_tracer("sandbox", __version__)
        self.runtime = runtime
        if runtime is not None:
            runtime.add_observer(self)

    def close(self) -> None:
        """Stop observing the runtime (the provider is the caller's to shut down)."""
        if self.runtime is not None:
            self.runtime.remove_observer(self)
            self.runtime = None

    def invocation_started(self, record: InvocationRecord) -> None:
        parent = None
        if record.origin is not None and record.origin.trace_headers:
            parent = _PROPAGATOR.extract(dict(record.origin.trace_headers))
        attributes: dict[str, Any] = {
            "faas.invocation_id": record.id, "faas.invoked_name": record.function,
            "faas.version": str(record.version), "faas.trigger": "other",
            "sandbox.profile": record.profile,
        }
        if record.memory_bytes is not None:
            attributes["faas.max_memory"] = record.memory_bytes
        if record.origin is not None and record.origin.peer:
            attributes["sandbox.peer"] = record.origin.peer
        span = self.tracer.start_span(record.function, context=parent, kind=SpanKind.SERVER,
                                      start_time=record.start_ns, attributes=attributes)
        record.scratch[_KEY] = span
        ctx = span.get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")

    def invocation_finished(self, record: InvocationRecord, result: InvocationResult) -> None:
        span = record.scratch.pop(_KEY, None)
        if span is None:
            return
        s = result.stats
        span.set_attribute("faas.coldstart", bool(s.cold_start))
        span.set_attribute("sandbox.outcome", result.outcome.value)
        if result.outcome is not Outcome.OK:
            span.set_status(Status(StatusCode.ERROR, result.outcome.value))
        if span.is_recording():
            inside = trace.set_span_in_context(span)
            t = record.start_ns
            for name, seconds in (("queue", s.queue_s), ("startup", s.startup_s),
                                  ("run", s.run_s)):
                end = t + max(0, int(seconds * 1e9))
                child = self.tracer.start_span(name, context=inside, start_time=t)
                child.end(end_time=end)
                t = end
        span.end()

    def invocation_failed(self, record: InvocationRecord, error: BaseException) -> None:
        span = record.scratch.pop(_KEY, None)
        if span is None:
            return
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

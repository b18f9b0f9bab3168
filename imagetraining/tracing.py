"""OpenTelemetry traces: off unless the standard OTEL_* variables configure an exporter.

On when `OTEL_TRACES_EXPORTER` names one (`otlp`, `console`; a comma-separated list) or, with it
unset, when `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the OTLP
exporter then reads its own variables: endpoint, headers, protocol, timeout). `OTEL_SDK_DISABLED=true`
or `OTEL_TRACES_EXPORTER=none` keep it off. `OTEL_SERVICE_NAME` overrides the service name.

What is traced:
- a span per RPC on both servers and on their clients (the control service's relay dials workers),
  from `opentelemetry-instrumentation-grpc`, with the W3C `traceparent` carried in the metadata;
- a span per database statement (`opentelemetry-instrumentation-asyncpg`);
- a session's path: every client transition (StartSession, RestartSession, ResumeSession...) stores
  the caller's trace context in the session row (`training_sessions.trace_context`,
  `transitions.Transition.params`), and the worker that claims the session starts its
  `session.run` span as a child of it, with `session.discovery` and `session.training` inside: one
  trace shows the request, the claim, the walk and the training.

Without an exporter nothing is patched and every helper here is a no-op on the API's default
(non-recording) tracer, so the cost when off is a function call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_instrumented = False
tracer = trace.get_tracer("imagetraining")


def exporters_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The exporters the OTEL_* variables ask for; [] means tracing stays off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if names:
        return [n for n in names if n != "none"]
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def configure(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Install a tracer provider with the configured exporters and instrument gRPC and asyncpg.

    Returns False (and changes nothing) when no exporter is configured. Raises ValueError for an
    exporter name it does not know (the caller names the variable).
    """
    names = exporters_from_env(env)
    if not names:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(f"{name!r} is not a trace exporter this service has (otlp, console, none)")
    source = os.environ if env is None else env
    resource = Resource.create({"service.name": source.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    instrument()
    log.info("tracing on: %s, exporters %s", service_name, ", ".join(names))
    return True


def instrument() -> None:
    """Patch gRPC (aio servers and clients) and asyncpg to make spans; call before servers start."""
    global _instrumented
    if _instrumented:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    GrpcAioInstrumentorServer().instrument()  # type: ignore[no-untyped-call]
    GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]
    AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call]
    _instrumented = True


def uninstrument() -> None:
    """Undo `instrument` (tests)."""
    global _instrumented
    if not _instrumented:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    GrpcAioInstrumentorServer().uninstrument()  # type: ignore[no-untyped-call]
    GrpcAioInstrumentorClient().uninstrument()  # type: ignore[no-untyped-call]
    AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    _instrumented = False


def traceparent() -> str:
    """The current span's W3C traceparent ("" when no span records): stored with a transition."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


@contextmanager
def session_span(name: str, parent: str | None, **attributes: Any) -> Iterator[trace.Span]:
    """A span of a session's path, child of the stored `parent` traceparent when there is one."""
    ctx = _PROPAGATOR.extract({"traceparent": parent}) if parent else None
    with tracer.start_as_current_span(name, context=ctx, attributes=attributes) as span:
        yield span

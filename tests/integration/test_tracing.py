"""OpenTelemetry traces (#14): a span per RPC on servers and clients, database spans, and one trace
from StartSession through the worker's claim to its discovery and training (the SDK's in-memory
exporter, real servers, real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from control_service.server import serve
from discovery_worker.worker import run_worker
from imagetraining import tracing
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests.conftest import wait_for
from tests.images import write_jpeg

_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this test; gRPC and asyncpg instrumented for its duration only.

    The tracer provider is process-wide and can be set once: the first test sets one with the
    in-memory exporter and it stays (the API refuses a second), emptied around each test.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "imagetraining-tests"}))
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    tracing.instrument()
    try:
        yield _exporter
    finally:
        tracing.uninstrument()
        _exporter.clear()


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_one_trace_from_start_session_to_the_workers_training(
    spans: InMemorySpanExporter, clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    for i in range(6):
        write_jpeg(library / "a" / f"{i}.jpg", 40, 30, seed=i)
    control = await serve(make_settings(), database=clean_db)
    worker = await run_worker(make_settings(pool_size=1), migrate=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
            stub = api_grpc.TrainingSessionServiceStub(channel)
            created = await stub.CreateSession(
                api.CreateSessionRequest(root_path=str(library), subdirectories=[str(library / "a")])
            )
            await stub.StartSession(api.StartSessionRequest(name=created.session.name))

            async def ran() -> list[ReadableSpan]:
                return _named(list(spans.get_finished_spans()), "session.run")

            await wait_for(ran, timeout=60, what="the worker's session.run span to end")
    finally:
        await worker.stop()
        await control.stop()

    finished = list(spans.get_finished_spans())
    method = "/imagetraining.v1.TrainingSessionService/StartSession"
    server = [s for s in _named(finished, method) if s.kind == trace.SpanKind.SERVER]
    client = [s for s in _named(finished, method) if s.kind == trace.SpanKind.CLIENT]
    assert len(server) == 1 and len(client) == 1
    start = server[0]
    assert start.parent is not None and start.parent.span_id == client[0].context.span_id  # traceparent sent
    (run,) = _named(finished, "session.run")
    assert run.context.trace_id == start.context.trace_id  # the worker's run is in the caller's trace
    assert run.parent is not None and run.parent.span_id == start.context.span_id
    assert run.attributes is not None and run.attributes["imagetraining.session"] == created.session.name
    for phase in ("session.discovery", "session.training"):
        (span,) = _named(finished, phase)
        assert span.parent is not None and span.parent.span_id == run.context.span_id
    # Database statements of the run are spans of the same trace (asyncpg instrumentation).
    in_trace = [s for s in finished if s.context.trace_id == run.context.trace_id]
    assert any((s.attributes or {}).get("db.system") == "postgresql" for s in in_trace)


def test_tracing_is_off_without_otel_variables() -> None:
    assert tracing.exporters_from_env({}) == []
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters_from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) == []
    assert tracing.exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == ["otlp"]
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ["console", "otlp"]
    assert tracing.configure("x", {}) is False
    with pytest.raises(ValueError, match="'zipkin' is not a trace exporter"):
        tracing.configure("x", {"OTEL_TRACES_EXPORTER": "zipkin"})

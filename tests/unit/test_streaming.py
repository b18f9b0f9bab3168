"""Stream writing: one serialization per shared event, the write watchdog, WatchSession's registration.

The server tests run a real grpc.aio server on loopback with the project's ErrorInterceptor.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc
import pytest

from control_service.server import GC_YOUNG_THRESHOLD, SERVICE, method_handlers, tune_gc
from control_service.servicer import TrainingSessionServicer, watch_response
from imagetraining.errors import ResourceExhausted
from imagetraining.rpc import ErrorInterceptor
from imagetraining.streaming import StreamWriter, WireCache, pass_bytes, start_stream
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api

METHOD = "/test.Stream/Watch"


def event(sequence: int, reason: str = "", kind: int = pb.EVENT_KIND_TRAINING_PROGRESS) -> pb.SessionEvent:
    return pb.SessionEvent(
        name="sessions/1",
        sequence=sequence,
        kind=kind,  # type: ignore[arg-type]
        state=pb.SESSION_STATE_RUNNING,
        state_reason=reason,
        training=pb.TrainingProgress(processed_images=sequence, total_images=100),
    )


def test_wire_cache_bytes_are_what_serialize_to_string_gives_and_decode_back() -> None:
    cache = WireCache(watch_response)
    first = event(5)
    data = cache(first)
    assert data == api.WatchSessionResponse(event=first).SerializeToString()
    assert api.WatchSessionResponse.FromString(data).event == first
    assert cache(first) is data  # every later subscriber of the same event: no serialization
    # Another object with the same sequence (a subscriber's own snapshot) is serialized on its own.
    snapshot = event(5, kind=pb.EVENT_KIND_SNAPSHOT)
    assert api.WatchSessionResponse.FromString(cache(snapshot)).event.kind == pb.EVENT_KIND_SNAPSHOT


def test_wire_cache_is_bounded() -> None:
    cache = WireCache(watch_response, size=4)
    events = [event(i) for i in range(10)]
    for e in events:
        cache(e)
    assert len(cache._entries) == 4
    assert api.WatchSessionResponse.FromString(cache(events[0])).event == events[0]  # a miss re-serializes


def test_pass_bytes_passes_bytes_and_serializes_messages() -> None:
    message = api.WatchSessionResponse(event=event(1))
    assert pass_bytes(b"\x0a\x00") == b"\x0a\x00"
    assert pass_bytes(message) == message.SerializeToString()


def test_watch_session_registration_matches_the_generated_one() -> None:
    servicer = TrainingSessionServicer(sessions=None, watcher=None)  # type: ignore[arg-type]
    handlers = method_handlers(servicer)
    assert set(handlers) == {m.name for m in SERVICE.methods}
    for method in SERVICE.methods:
        handler = handlers[method.name]
        assert handler.response_streaming == method.server_streaming
        assert not handler.request_streaming
        request = getattr(api, method.input_type.name)()
        assert type(handler.request_deserializer(request.SerializeToString())) is type(request)
        response = getattr(api, method.output_type.name)()
        assert handler.response_serializer(response) == response.SerializeToString()
    assert handlers["WatchSession"].response_serializer is pass_bytes


async def start_test_server(handler: Any) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Stream",
                {
                    "Watch": grpc.unary_stream_rpc_method_handler(
                        handler,
                        request_deserializer=api.WatchSessionRequest.FromString,
                        response_serializer=pass_bytes,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def watch_call(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        METHOD,
        request_serializer=api.WatchSessionRequest.SerializeToString,
        response_deserializer=api.WatchSessionResponse.FromString,
    )(api.WatchSessionRequest(name="sessions/1"))


async def test_pre_serialized_and_plain_messages_reach_a_client_unchanged() -> None:
    sent = [event(1), event(2, kind=pb.EVENT_KIND_STATE_CHANGE), event(3)]
    cache = WireCache(watch_response)

    async def handler(request: api.WatchSessionRequest, context: grpc.aio.ServicerContext) -> None:
        await start_stream(context)
        writer = StreamWriter(context, 5.0)
        await writer.write(cache(sent[0]), 0)
        await writer.write(api.WatchSessionResponse(event=sent[1]), 1)  # a message, not bytes
        await writer.write(cache(sent[2]), 2)

    server, port = await start_test_server(handler)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            received = [r.event async for r in watch_call(channel)]
        assert received == sent
    finally:
        await server.stop(None)


async def test_a_client_that_stops_reading_is_ended_with_its_last_sequence() -> None:
    evicted: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    big = "x" * 200_000  # a few of these fill the flow-control windows of a client that reads nothing

    async def handler(request: api.WatchSessionRequest, context: grpc.aio.ServicerContext) -> None:
        await start_stream(context)
        writer = StreamWriter(context, 0.2)
        sequence = 0
        try:
            while True:
                sequence += 1
                await writer.write(watch_response(event(sequence, big)), sequence - 1)
        except ResourceExhausted as exc:
            evicted.set_result(sequence - 1)
            assert exc.metadata == {"last_sequence": str(sequence - 1)}
            raise

    server, port = await start_test_server(handler)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = watch_call(channel)
            await call.initial_metadata()
            last = await asyncio.wait_for(evicted, 30)
            received: list[int] = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in call:
                    received.append(response.event.sequence)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"after_sequence={last}" in (info.value.details() or "")
            # Every message up to the last one it was given, in order; the one whose write timed out
            # may still arrive from the transport's buffers (the reconnect then repeats it, never skips).
            assert received[:last] == list(range(1, last + 1))
            assert received[last:] in ([], [last + 1])
    finally:
        await server.stop(None)


async def test_a_cancelled_write_stays_a_cancellation() -> None:
    """A client going away cancels the handler: that is not turned into an eviction."""
    started = asyncio.get_running_loop().create_future()
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(request: api.WatchSessionRequest, context: grpc.aio.ServicerContext) -> None:
        await start_stream(context)
        writer = StreamWriter(context, 60.0)
        try:
            while True:
                if not started.done():
                    started.set_result(None)
                await writer.write(watch_response(event(1, "y" * 200_000)), 0)
        except asyncio.CancelledError:
            outcome.set_result("cancelled")
            raise
        except BaseException as exc:
            outcome.set_result(type(exc).__name__)
            raise

    server, port = await start_test_server(handler)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = watch_call(channel)
            await call.initial_metadata()
            await started
            call.cancel()
            assert await asyncio.wait_for(outcome, 30) == "cancelled"
    finally:
        await server.stop(None)


def test_tune_gc_raises_the_young_threshold_and_never_lowers_it() -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 20, 10)
        gc.set_threshold(GC_YOUNG_THRESHOLD * 2, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD * 2, 10, 10)
    finally:
        gc.set_threshold(*saved)

"""Hostile bytes and headers on the wire, against both real servers over loopback (issue #9, C and D).

- Bytes that are not the method's request message were answered UNKNOWN "Unexpected <class
  'google.protobuf.message.DecodeError'>" (gRPC's asyncio server, when a deserializer raises): now
  INVALID_ARGUMENT naming the expected message, with a BadRequest, on every method of both servers,
  unary and streaming.
- Of two `authorization` headers the last one won, so a proxy that appends its own header, or a
  client that sends a stale one first, decided by accident: now two values are UNAUTHENTICATED. The
  token is compared in constant time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from control_service.server import SERVICE, ControlServer, serve
from discovery_worker.worker import WorkerHandle, run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import discovery_worker_service_pb2 as wpb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc

TOKEN = "s3cret-T0ken"
# Not a protobuf message: a field tag whose varint never ends.
GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
# Field 1 (`name`, a string) holding bytes that are not UTF-8: also undecodable.
NOT_UTF8_NAME = b"\x0a\x02\xc3\x28"


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[ControlServer]:
    server = await serve(make_settings(auth_token=TOKEN))
    yield server
    await server.stop()


@pytest.fixture
async def worker(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[WorkerHandle]:
    handle = await run_worker(make_settings(pool_size=1, auth_token=TOKEN), migrate=False)
    yield handle
    await handle.stop()


def bearer(token: str = TOKEN) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def assert_invalid_request(err: grpc.aio.AioRpcError, expected_type: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()} {err.details()}"
    message = err.details() or ""
    assert expected_type in message, message
    assert "<class" not in message and "DecodeError" not in message and "Unexpected" not in message, message
    status = rpc_status.from_call(err)
    assert status is not None
    kinds = [d.type_url.rsplit("/", 1)[-1] for d in status.details]
    assert "google.rpc.BadRequest" in kinds and "google.rpc.ErrorInfo" in kinds, kinds
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            assert expected_type in bad.field_violations[0].description


def first_field_is_a_string(message: Any) -> bool:
    """Is field 1 of this message type a string (so NOT_UTF8_NAME is undecodable, not an unknown field)?"""
    field = message.fields_by_number.get(1)
    return field is not None and field.type == field.TYPE_STRING


async def call_raw(channel: grpc.aio.Channel, method: str, payload: bytes, *, streaming: bool) -> None:
    """Send `payload` as the request bytes, with no serializer in between; read the answer to the end."""
    metadata = (bearer(),)
    if streaming:
        call = channel.unary_stream(method)(payload, metadata=metadata, timeout=10)
        async for _ in call:
            pass
    else:
        await channel.unary_unary(method)(payload, metadata=metadata, timeout=10)


@pytest.mark.parametrize("payload", [GARBAGE, NOT_UTF8_NAME], ids=["garbage", "not-utf8"])
async def test_undecodable_request_to_every_control_method_is_invalid_argument(
    control: ControlServer, payload: bytes, library: Path
) -> None:
    methods = [m for m in SERVICE.methods if payload == GARBAGE or first_field_is_a_string(m.input_type)]
    assert len(methods) >= 10
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        for method in methods:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call_raw(
                    channel, f"/{SERVICE.full_name}/{method.name}", payload, streaming=method.server_streaming
                )
            assert_invalid_request(info.value, method.input_type.full_name)
        # The tolerant deserializer changes nothing for a valid message (the bytes a stub would send).
        payload = api.CreateSessionRequest(root_path=str(library)).SerializeToString()
        raw = await channel.unary_unary(f"/{SERVICE.full_name}/CreateSession")(
            payload, metadata=(bearer(),), timeout=10
        )
        assert api.CreateSessionResponse.FromString(raw).session.root_path == str(library)


async def test_undecodable_request_to_the_worker_stream_is_invalid_argument(worker: WorkerHandle) -> None:
    service = wpb.DESCRIPTOR.services_by_name["DiscoveryWorkerService"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.server.port}") as channel:
        for payload in (GARBAGE, NOT_UTF8_NAME):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call_raw(channel, f"/{service.full_name}/StreamSessionEvents", payload, streaming=True)
            assert_invalid_request(info.value, "imagetraining.v1.StreamSessionEventsRequest")


async def test_undecodable_request_to_health_and_reflection_on_both_servers_is_invalid_argument(
    control: ControlServer, worker: WorkerHandle
) -> None:
    async def garbage_stream() -> AsyncIterator[bytes]:
        yield GARBAGE

    for port in (control.port, worker.server.port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name, streaming in (("Check", False), ("Watch", True)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call_raw(channel, f"/grpc.health.v1.Health/{name}", GARBAGE, streaming=streaming)
                assert_invalid_request(info.value, "grpc.health.v1.HealthCheckRequest")
            # Reflection reads a client stream: the bad message is found as it is read.
            reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in reflect(garbage_stream(), timeout=10):
                    pass
            assert_invalid_request(info.value, "grpc.reflection.v1alpha.ServerReflectionRequest")


# --- authorization -----------------------------------------------------------------------------


async def test_two_authorization_headers_are_unauthenticated(control: ControlServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        request = api.ListSessionsRequest()
        await stub.ListSessions(request, metadata=(bearer(),), timeout=10)  # one right token: fine
        for metadata in (
            (bearer("wrong"), bearer()),  # the last one was the one checked
            (bearer(), bearer("wrong")),
            (bearer(), bearer()),  # even twice the right one: exactly one is the rule
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListSessions(request, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "exactly one" in (info.value.details() or "")
            # A stream too.
            watch = stub.WatchSession(api.WatchSessionRequest(name="sessions/1"), metadata=metadata, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in watch:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open, whatever the headers.
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=(bearer("wrong"), bearer()), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_two_authorization_headers_are_unauthenticated_on_the_worker(worker: WorkerHandle) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.server.port}") as channel:
        method = channel.unary_stream(
            "/imagetraining.v1.DiscoveryWorkerService/StreamSessionEvents",
            request_serializer=wpb.StreamSessionEventsRequest.SerializeToString,
            response_deserializer=wpb.StreamSessionEventsResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in method(
                wpb.StreamSessionEventsRequest(name="sessions/1"), metadata=(bearer("wrong"), bearer()), timeout=10
            ):
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_token_is_compared_in_constant_time(control: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest on bytes: the time a refusal takes says nothing about how much of a guess was right."""
    import hmac

    from imagetraining import rpc

    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(rpc.hmac, "compare_digest", spy)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        await stub.ListSessions(api.ListSessionsRequest(), metadata=(bearer(),), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ListSessions(api.ListSessionsRequest(), metadata=(bearer("s3cret-T0kem"),), timeout=10)
    assert compared == [
        (b"Bearer s3cret-T0ken", b"Bearer s3cret-T0ken"),
        (b"Bearer s3cret-T0kem", b"Bearer s3cret-T0ken"),
    ]

"""One access-log line per RPC, with the request id the client sent (or one made for it)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from control_service.server import ControlServer, serve
from imagetraining.db.engine import Database
from imagetraining.logs import RequestIdFilter
from imagetraining.settings import Settings
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[ControlServer]:
    server = await serve(make_settings(), database=clean_db)
    try:
        yield server
    finally:
        await server.stop()


async def test_each_call_is_one_line_with_method_session_code_duration_and_request_id(
    control: ControlServer, library: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (library / "a").mkdir()
    caplog.set_level(logging.INFO, logger="imagetraining.access")
    caplog.handler.addFilter(RequestIdFilter())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        created = await stub.CreateSession(api.CreateSessionRequest(root_path=str(library)))
        name = created.session.name
        await stub.GetSession(api.GetSessionRequest(name=name), metadata=(("x-request-id", "req-42"),))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetSession(api.GetSessionRequest(name="sessions/999"), metadata=(("x-request-id", "req-43"),))
        call = stub.WatchSession(api.WatchSessionRequest(name=name))
        await call.read()
        call.cancel()

    def lines(method: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "imagetraining.access" and r.getMessage().startswith(method)]

    ok = next(r for r in lines("GetSession") if getattr(r, "request", "") == " [req-42]")
    assert ok.getMessage().startswith(f"GetSession {name} OK ") and ok.getMessage().endswith(" ms")
    missing = next(r for r in lines("GetSession") if getattr(r, "request", "") == " [req-43]")
    assert missing.getMessage().startswith("GetSession sessions/999 NOT_FOUND ")
    # Without a request id from the client, one is made: every call still has one.
    (create,) = lines("CreateSession")
    assert len(getattr(create, "request", "").strip(" []")) == 12
    # A stream's line comes when it ends: here the client went away.
    await _until(lambda: bool(lines("WatchSession")))
    watch = lines("WatchSession")[0].getMessage()
    assert watch.startswith(f"WatchSession {name} CANCELLED ") and " ms" in watch, watch


async def _until(predicate: Callable[[], bool]) -> None:
    from tests.conftest import wait_for

    async def check() -> bool:
        return predicate()

    await wait_for(check, timeout=10, what="the access-log line")

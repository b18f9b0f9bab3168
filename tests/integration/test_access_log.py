"""One access-log line per RPC, with the request id the client sent (or one made for it).

With IMAGETRAINING_LOG_FORMAT=json (issue #14) that line, like every other, is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

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


async def test_json_format_the_access_line_is_an_object_with_method_code_request_id_and_session(
    db_url: str, library: Path, tmp_path: Path
) -> None:
    """A real control service with IMAGETRAINING_LOG_FORMAT=json: every stderr line is a JSON object."""
    from tests.conftest import subprocess_env, wait_for

    env = subprocess_env(
        db_url,
        library,
        IMAGETRAINING_CONTROL_ADDRESS="127.0.0.1:0",
        IMAGETRAINING_GRACE_SECONDS="1",
        IMAGETRAINING_DATA_DIR=str(tmp_path / "data"),
        IMAGETRAINING_LOG_FORMAT="json",
    )
    log_path = tmp_path / "control.log"
    proc = _spawn_control(env, log_path)

    def records() -> list[dict[str, Any]]:
        text = log_path.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]  # a line being written is read on the next round
        rows = [json.loads(line) for line in complete.splitlines()]
        assert all(isinstance(row, dict) for row in rows), text
        return rows

    try:

        async def port() -> int:
            assert proc.poll() is None, log_path.read_text()
            for row in records():
                if row["message"].startswith("control service listening on 127.0.0.1:"):
                    return int(row["message"].rpartition(":")[2])
            return 0

        listening = await wait_for(port, timeout=60, interval=0.1, what="the control service to listen")
        (library / "a").mkdir()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listening}") as channel:
            stub = api_grpc.TrainingSessionServiceStub(channel)
            created = await stub.CreateSession(api.CreateSessionRequest(root_path=str(library)))
            name = created.session.name
            await stub.GetSession(api.GetSessionRequest(name=name), metadata=(("x-request-id", "req-json-1"),))

        async def access_line() -> dict[str, Any] | None:
            return next((r for r in records() if r.get("request_id") == "req-json-1"), None)

        line = await wait_for(access_line, timeout=10, what="the access-log line of GetSession")
        assert line["logger"] == "imagetraining.access" and line["level"] == "INFO", line
        assert line["method"] == "/imagetraining.v1.TrainingSessionService/GetSession", line
        assert line["session"] == name, line
        assert line["code"] == "OK", line
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0, line
        assert line["message"].startswith(f"GetSession {name} OK "), line
        assert line["time"].endswith("Z"), line
        # CreateSession's request names no session: its line has a request id and method, no session.
        create = next(r for r in records() if r.get("method", "").endswith("/CreateSession"))
        assert create["code"] == "OK" and len(create["request_id"]) == 12 and "session" not in create, create
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log_path.read_text()
        records()  # the lines written while stopping are JSON too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _spawn_control(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m control_service` in the background, its stderr in `log_path`."""
    from tests.conftest import PYTHON, ROOT

    with open(log_path, "wb") as log_file:
        return subprocess.Popen([PYTHON, "-m", "control_service"], env=env, cwd=ROOT, stderr=log_file)


async def _until(predicate: Callable[[], bool]) -> None:
    from tests.conftest import wait_for

    async def check() -> bool:
        return predicate()

    await wait_for(check, timeout=10, what="the access-log line")

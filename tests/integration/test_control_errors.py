"""Status codes that are not about input or state: ABORTED, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL,
plus health, reflection and WatchSession's seam."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import text

from control_service.inputs import MAX_SUBDIRECTORIES_PER_SESSION
from control_service.server import serve
from control_service.sessions import SessionUseCases
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests.integration.test_control_helpers import Control, details, make_tree, running_control


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[Control]:
    async with running_control(make_settings()) as c:
        yield c


async def test_an_edit_that_meets_a_concurrent_change_is_aborted(
    control: Control, library: Path, clean_db: Database
) -> None:
    make_tree(library, {"a/": ""})
    session = await control.create(library)
    calls: list[Callable[[], Any]] = [
        lambda: control.stub.UpdateSubdirectories(
            api.UpdateSubdirectoriesRequest(
                name=session.name, selections=[api.SubdirectorySelection(path="a", selected=True)]
            )
        ),
        lambda: control.stub.UpdateSession(api.UpdateSessionRequest(name=session.name, config=pb.SessionConfig())),
    ]
    # Another transaction (a concurrent call) holds the session row while these arrive.
    async with clean_db.engine.connect() as conn:
        transaction = await conn.begin()
        await conn.execute(text("SELECT id FROM training_sessions WHERE id = 1 FOR UPDATE"))
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            d = details(info.value)
            assert d.code == grpc.StatusCode.ABORTED
            assert "concurrent call" in d.message and "GetSession" in d.message
        await transaction.rollback()
    # Once it is gone the same calls succeed: ABORTED means "retry".
    for call in calls:
        await call()


async def test_too_many_subdirectories_in_a_session_is_resource_exhausted(
    control: Control, library: Path, clean_db: Database
) -> None:
    make_tree(library, {"a/": ""})
    session = await control.create(library)
    async with clean_db.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO session_subdirectories (session_id, path)"
                " SELECT 1, :root || '/gen' || g FROM generate_series(1, :n) AS g"
            ),
            {"root": str(library), "n": MAX_SUBDIRECTORIES_PER_SESSION - 1},  # plus 'a' already there
        )
    request = api.UpdateSubdirectoriesRequest(
        name=session.name, selections=[api.SubdirectorySelection(path="b", selected=False)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.UpdateSubdirectories(request)
    d = details(info.value)
    assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MAX_SUBDIRECTORIES_PER_SESSION) in d.message
    async with clean_db.engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM session_subdirectories"))).scalar_one()
    assert count == MAX_SUBDIRECTORIES_PER_SESSION  # nothing was added
    # Changing a row that is already there is no growth.
    await control.stub.UpdateSubdirectories(
        api.UpdateSubdirectoriesRequest(
            name=session.name, selections=[api.SubdirectorySelection(path="a", selected=True)]
        )
    )


async def test_database_down_is_unavailable(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    settings = make_settings(database_url="postgresql://postgres@127.0.0.1:1/nothing")
    async with running_control(settings) as control:
        for call in (
            control.stub.GetSession(api.GetSessionRequest(name="sessions/1")),
            control.stub.ListSessions(api.ListSessionsRequest()),
            control.stub.StartSession(api.StartSessionRequest(name="sessions/1")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            d = details(info.value)
            assert d.code == grpc.StatusCode.UNAVAILABLE and "retry" in d.message


async def test_an_unexpected_exception_is_internal_without_a_stack_trace(
    control: Control, library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: SessionUseCases, session_id: int) -> pb.Session:
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(SessionUseCases, "get", broken)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.GetSession(api.GetSessionRequest(name="sessions/1"))
    d = details(info.value)
    assert d.code == grpc.StatusCode.INTERNAL
    assert "Traceback" not in d.message and "secret detail" not in d.message
    assert "Traceback" not in str(info.value.debug_error_string())


async def test_watch_session_with_a_bad_name_is_invalid_argument(control: Control) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in control.stub.WatchSession(api.WatchSessionRequest(name="nope")):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(info.value).fields == ["name"]


async def test_health_and_reflection(control: Control) -> None:
    health = health_pb2_grpc.HealthStub(control.channel)
    for service in ("", "imagetraining.v1.TrainingSessionService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(control.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = set()
    async for response in call:
        services |= {s.name for s in response.list_services_response.service}
        break
    call.cancel()
    assert {"imagetraining.v1.TrainingSessionService", "grpc.health.v1.Health"} <= services


async def test_watch_session_seam_streams_what_the_watcher_yields(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    """The relay plugs in through `serve(watcher=...)`: the servicer checks the name and relays."""
    seen: list[tuple[int, int]] = []

    async def watcher(session_id: int, after_sequence: int) -> AsyncIterator[pb.SessionEvent]:
        seen.append((session_id, after_sequence))
        yield pb.SessionEvent(name=f"sessions/{session_id}", sequence=after_sequence + 1, kind=pb.EVENT_KIND_SNAPSHOT)

    server = await serve(make_settings(), watcher=watcher)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = api_grpc.TrainingSessionServiceStub(channel)
            created = await stub.CreateSession(api.CreateSessionRequest(root_path=str(library)))
            name = created.session.name
            events = [r.event async for r in stub.WatchSession(api.WatchSessionRequest(name=name, after_sequence=7))]
            assert [(e.name, e.sequence) for e in events] == [(name, 8)]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.WatchSession(api.WatchSessionRequest(name="sessions/999")):
                    pass
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop()
    assert seen == [(1, 7)]


async def test_control_service_plans_every_statement_afresh(
    clean_db: Database, make_settings: Callable[..., Settings]
) -> None:
    """The control service's own connections never reuse a generic plan made while the tables were
    small: GetSession's stale-image count, planned that way on small sessions, took 2 s on a
    just-completed 100,000-image session (case 7; imagetraining/db/engine.py)."""
    server = await serve(make_settings())  # connects as the process does, not with the test's Database
    try:
        assert server.db is not clean_db
        for engine in (server.db.engine, server.db.reads):
            async with engine.connect() as conn:
                assert (await conn.execute(text("SHOW plan_cache_mode"))).scalar_one() == "force_custom_plan"
    finally:
        await server.stop()

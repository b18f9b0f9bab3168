"""A database that is down, starting up or shutting down is UNAVAILABLE with a retry hint (issue #9, item A).

The control service is served in-process against a PostgreSQL of the test's own (tests/pg_instance.py),
which the test stops, crashes, restarts or holds in recovery. Every call a client makes meanwhile must
answer UNAVAILABLE with a `google.rpc.RetryInfo` (and the usual ErrorInfo), never INTERNAL or
UNKNOWN; once the server is back the same calls succeed with no restart of the control service.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from control_service.server import ControlServer, serve
from imagetraining.db.engine import Database
from imagetraining.db.migrate import upgrade
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests.conftest import wait_for
from tests.pg_instance import PgInstance


@dataclass
class Outage:
    pg: PgInstance
    server: ControlServer
    stub: api_grpc.TrainingSessionServiceStub
    library: Path
    session: pb.Session

    def calls(self) -> dict[str, Callable[[], Awaitable[Any]]]:
        """GetSession, ListSessions and CreateSession: a read by name, a list, a write."""
        return {
            "GetSession": lambda: self.stub.GetSession(api.GetSessionRequest(name=self.session.name), timeout=20),
            "ListSessions": lambda: self.stub.ListSessions(api.ListSessionsRequest(), timeout=20),
            "CreateSession": lambda: self.stub.CreateSession(
                api.CreateSessionRequest(root_path=str(self.library)), timeout=20
            ),
        }

    async def all_unavailable(self, why: str) -> None:
        for method, call in self.calls().items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert_unavailable_with_retry(info.value, f"{method} {why}")

    async def all_succeed(self) -> None:
        for call in self.calls().values():
            await call()


def assert_unavailable_with_retry(err: grpc.aio.AioRpcError, what: str) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{what}: {err.code()} {err.details()}"
    status = rpc_status.from_call(err)
    assert status is not None, f"{what}: no google.rpc.Status"
    retry = info = None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
    assert retry is not None, f"{what}: no RetryInfo in {status}"
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 10, retry
    assert info is not None and info.reason == "UNAVAILABLE" and info.domain == "imagetraining.v1", status
    assert "retry" in (err.details() or "").lower(), err.details()
    assert "Traceback" not in (err.details() or "") and "<class" not in (err.details() or "")


@pytest.fixture
async def outage(
    request: pytest.FixtureRequest, pg_instance: PgInstance, make_settings: Callable[..., Settings], library: Path
) -> AsyncIterator[Outage]:
    """The control service with pooled connections to its own PostgreSQL, over TCP or (param "unix") its socket."""
    await asyncio.to_thread(pg_instance.start)
    url = pg_instance.url
    if getattr(request, "param", "tcp") == "unix":  # as the embedded server is reached
        url = f"postgresql://postgres@/postgres?host={pg_instance.socket_dir}&port={pg_instance.port}"
    db = Database.connect(url)
    await upgrade(db.engine)
    server = await serve(make_settings(database_url=url), database=db)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        created = await stub.CreateSession(api.CreateSessionRequest(root_path=str(library)), timeout=20)
        outage = Outage(pg_instance, server, stub, library, created.session)
        await outage.all_succeed()  # the pools hold connections from now on
        yield outage
    finally:
        await channel.close()
        await server.stop()
        await db.dispose()


async def test_while_the_database_is_down_calls_are_unavailable_then_succeed_when_it_is_back(outage: Outage) -> None:
    await asyncio.to_thread(outage.pg.kill9)
    await outage.all_unavailable("while PostgreSQL is down after kill -9")
    await asyncio.to_thread(outage.pg.start)
    await outage.all_succeed()


@pytest.mark.parametrize("outage", ["unix"], indirect=True)
async def test_a_stopped_server_reached_through_its_socket_is_unavailable(outage: Outage) -> None:
    """As the embedded server is reached: once stopped it has no socket file, and connecting raises
    FileNotFoundError, which was INTERNAL (a missing file looked like a bug, not an outage)."""
    await asyncio.to_thread(outage.pg.stop)
    assert not list(outage.pg.socket_dir.glob(".s.PGSQL.*[0-9]"))
    await outage.all_unavailable("while PostgreSQL is stopped (no socket file)")
    await asyncio.to_thread(outage.pg.start)
    await outage.all_succeed()


async def test_while_the_database_is_starting_up_calls_are_unavailable_not_internal(outage: Outage) -> None:
    """SQLSTATE 57P03 ("the database system is starting up" / "not accepting connections")."""
    await asyncio.to_thread(outage.pg.make_standby_unavailable)
    with pytest.raises(asyncpg.CannotConnectNowError):  # the condition under test, as a client sees it
        await asyncpg.connect(outage.pg.url, timeout=10)
    await outage.all_unavailable("while PostgreSQL refuses connections with 57P03")
    await asyncio.to_thread(outage.pg.stop)
    await asyncio.to_thread(outage.pg.start)
    await outage.all_succeed()


async def test_right_after_a_fast_shutdown_calls_are_unavailable_including_one_in_flight(outage: Outage) -> None:
    """A fast shutdown ends every session with SQLSTATE 57P01, the pooled ones and one mid-statement."""
    # A call in flight when the shutdown comes: CancelSession waits (up to 5 s) for the session's row
    # lock, which this test's own transaction holds.
    holder = await asyncpg.connect(outage.pg.url)
    await holder.execute("BEGIN; SELECT id FROM training_sessions WHERE id = 1 FOR UPDATE")
    in_flight = asyncio.ensure_future(
        outage.stub.CancelSession(api.CancelSessionRequest(name=outage.session.name), timeout=30)
    )

    async def waiting_for_the_lock() -> bool:
        waiting = await holder.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        return bool(waiting)

    await wait_for(waiting_for_the_lock, timeout=4, what="CancelSession to wait for the row lock")
    await asyncio.to_thread(outage.pg.stop, "fast")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await in_flight
    assert_unavailable_with_retry(info.value, "CancelSession in flight during a fast shutdown")
    holder.terminate()

    await outage.all_unavailable("right after a fast shutdown")
    await asyncio.to_thread(outage.pg.start)
    await outage.all_succeed()

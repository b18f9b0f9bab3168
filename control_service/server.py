"""Assemble and start the control service: database, use cases, servicer, health, reflection.

`serve()` is what both `python -m control_service` and the tests call (tests with address
"127.0.0.1:0"), so the process and the tests run exactly the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc

from control_service.relay import Relay, Snapshot, SnapshotLoader
from control_service.servicer import TrainingSessionServicer, Watcher
from control_service.sessions import Sessions
from imagetraining.db.engine import Database, resolve_url
from imagetraining.notifications import listen_forever
from imagetraining.rpc import ServerHandle, channel_credentials, start_server
from imagetraining.settings import Settings
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

SERVICE = api.DESCRIPTOR.services_by_name["TrainingSessionService"]


@dataclass
class ControlServer:
    """A running control service: its gRPC handle, its database, its use cases and its relay."""

    handle: ServerHandle
    db: Database
    sessions: Sessions
    owns_db: bool
    relay: Relay | None = None
    listener: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.handle.port

    async def stop(self) -> None:
        """Health NOT_SERVING, in-flight calls finish within the grace period, then the pool closes."""
        await self.handle.stop()
        await self.close()

    async def wait(self) -> None:
        await self.handle.wait()

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.listener
        if self.relay is not None:
            await self.relay.close()
        if self.owns_db:
            await self.db.dispose()


async def serve(
    settings: Settings,
    *,
    address: str | None = None,
    database: Database | None = None,
    watcher: Watcher | None = None,
) -> ControlServer:
    """Start the control service on `address` (default `settings.control_address`).

    Migrations are not applied here (the process entry point does that once at start), so tests and
    embedders decide. Without `database`, one is connected from the settings (embedded if unset).
    """
    db = database or Database.connect(await resolve_url(settings))
    sessions = Sessions(db, settings)
    relay: Relay | None = None
    if watcher is None:
        relay = Relay(
            db,
            _snapshot_loader(sessions),
            max_subscribers=settings.max_subscribers,
            idle_seconds=settings.subscriber_idle_seconds,
            # NOTIFY makes changes immediate; the poll only bounds the delay of a lost notification.
            poll_seconds=settings.poll_seconds,
            channel_credentials=channel_credentials(settings),
            auth_token=settings.auth_token,
        )
        watcher = relay.watch
    servicer = TrainingSessionServicer(sessions, watcher, write_timeout=settings.subscriber_idle_seconds)

    def add(server: grpc.aio.Server) -> None:
        api_grpc.add_TrainingSessionServiceServicer_to_server(servicer, server)

    try:
        handle = await start_server(address or settings.control_address, settings, add, [SERVICE])
    except BaseException:
        if database is None:
            await db.dispose()
        raise
    listener = None
    if relay is not None:
        live = relay

        def on_session(session_id: int | None) -> None:
            live.notify(session_id)

        listener = asyncio.create_task(
            listen_forever(db.url, on_session, retry_seconds=settings.poll_seconds), name="control-listen"
        )

        async def end_streams() -> None:
            # Before the grace period: subscribers are told to reconnect (UNAVAILABLE with their last
            # sequence) instead of holding the shutdown for `grace_seconds`.
            await live.close()

        handle.on_shutdown.append(end_streams)
    return ControlServer(
        handle=handle, db=db, sessions=sessions, owns_db=database is None, relay=relay, listener=listener
    )


def _snapshot_loader(sessions: Sessions) -> SnapshotLoader:
    async def load(session_id: int) -> Snapshot:
        session, sequence = await sessions.get_with_sequence(session_id)
        return Snapshot(session=session, event_sequence=sequence)

    return load

"""Assemble and start the control service: database, use cases, servicer, health, reflection.

`serve()` is what both `python -m control_service` and the tests call (tests with address
"127.0.0.1:0"), so the process and the tests run exactly the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from sqlalchemy import text

from control_service.relay import Relay, Snapshot, SnapshotLoader
from control_service.search import Search
from control_service.servicer import Admission, Encoder, EventSource, TrainingSessionServicer, watch_response
from control_service.sessions import SessionUseCases
from imagetraining import metrics
from imagetraining.db.engine import Database, resolve_url
from imagetraining.notifications import listen_forever
from imagetraining.rpc import ServerHandle, channel_credentials, start_server
from imagetraining.settings import Settings
from imagetraining.states import SessionState
from imagetraining.streaming import WireCache, pass_bytes
from imagetraining.v1 import training_session_service_pb2 as api

log = logging.getLogger(__name__)

SERVICE = api.DESCRIPTOR.services_by_name["TrainingSessionService"]
# Young-generation collection threshold (CPython's default: 700). Each progress event makes every
# WatchSession call allocate a few objects that live until its write completes; with a thousand
# subscribers the default threshold promotes them by the thousand, and the full collections that
# follow (hundreds of ms over every subscriber's objects) stalled delivery for everyone.
GC_YOUNG_THRESHOLD = 50_000


@dataclass
class ControlServer:
    """A running control service: its gRPC handle, its database, its use cases and its relay."""

    handle: ServerHandle
    db: Database
    sessions: SessionUseCases
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
    watcher: EventSource | None = None,
) -> ControlServer:
    """Start the control service on `address` (default `settings.control_address`).

    Migrations are not applied here (the process entry point does that once at start), so tests and
    embedders decide. Without `database`, one is connected from the settings (embedded if unset).
    """
    db = database or Database.connect(await resolve_url(settings), custom_plans=True)
    sessions = SessionUseCases(db, settings)
    relay: Relay | None = None
    encode: Encoder = watch_response
    admit: Admission | None = None
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
        # The relay never changes an event once published: serialize it once for all its subscribers.
        encode = WireCache(watch_response)
        admit = relay.budget.check
    servicer = TrainingSessionServicer(
        sessions,
        watcher,
        write_timeout=settings.subscriber_idle_seconds,
        encode=encode,
        admit=admit,
        search=Search(db, settings.library_roots),
    )

    def add(server: grpc.aio.Server) -> None:
        add_servicer(servicer, server)

    try:
        handle = await start_server(address or settings.control_address, settings, add, [SERVICE])
    except BaseException:
        if database is None:
            await db.dispose()
        raise
    listener = None
    metrics.watch_engines([("writes", lambda: db.engine.pool), ("reads", lambda: db.reads.pool)])
    if settings.metrics_address:
        counting = asyncio.create_task(_count_sessions(db, settings.poll_seconds), name="count-sessions")
        handle.on_shutdown.append(lambda: _cancel(counting))
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


_SESSIONS_BY_STATE = text("SELECT state, count(*) AS n FROM training_sessions GROUP BY state")


async def _count_sessions(db: Database, every: float) -> None:
    """The sessions-by-state gauge, read every poll (one small aggregate, on the read pool)."""
    while True:
        try:
            async with db.reads.connect() as conn:
                counts = {str(r.state): int(r.n) for r in await conn.execute(_SESSIONS_BY_STATE)}
            for state in SessionState:
                metrics.SESSIONS.labels(state=state.value).set(counts.get(state.value, 0))
        except Exception as exc:  # database away: the gauge keeps its last values; the error is counted
            metrics.database_error(exc)
        await asyncio.sleep(max(every, 1.0))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def tune_gc() -> None:
    """Raise the process's young-generation GC threshold to GC_YOUNG_THRESHOLD (never lowers it).

    Process-wide, so the entry point (`python -m control_service`) calls it, not `serve`.
    """
    young, middle, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, max(middle, 20), old)


def method_handlers(servicer: TrainingSessionServicer) -> dict[str, grpc.RpcMethodHandler]:
    """What `add_TrainingSessionServiceServicer_to_server` registers, but WatchSession writes bytes too.

    The generated code fixes every response serializer to `SerializeToString`; WatchSession's
    accepts the pre-serialized `WatchSessionResponse` its encoder returns (`pass_bytes`), so an
    event shared by a thousand subscribers is serialized once, not a thousand times.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        serializer: Any = pass_bytes if method.name == "WatchSession" else response.SerializeToString
        if method.client_streaming or (method.server_streaming and method.name != "WatchSession"):
            raise NotImplementedError(f"{method.full_name}: only unary methods and WatchSession are registered")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=request.FromString, response_serializer=serializer)
    return handlers


def add_servicer(servicer: TrainingSessionServicer, server: grpc.aio.Server) -> None:
    """Register the service on `server` as the generated `add_..._to_server` does."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _snapshot_loader(sessions: SessionUseCases) -> SnapshotLoader:
    async def load(session_id: int) -> Snapshot:
        session, sequence = await sessions.get_with_sequence(session_id)
        return Snapshot(session=session, event_sequence=sequence)

    return load

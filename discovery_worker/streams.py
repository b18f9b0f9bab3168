"""StreamSessionEvents: the live event streams of the sessions this worker owns right now.

Each claim gets a `StreamObserver` (the runner's `RunObserver`): it turns the rows the runner
commits into `DiscoveryProgress` / `TrainingProgress` / state-change events through
`SessionEvents` (sequence block, rate limit, heartbeats) and registers them in `SessionStreams`,
where the servicer finds them. When the runner lets the session go (finished, paused, cancelled,
lease lost, shutdown) the observer closes: every subscriber's stream ends with OK and the registry
forgets the session, so the next caller is told to look the owner up again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from discovery_worker import claims
from discovery_worker.claims import Claim
from discovery_worker.events import SessionEvents
from imagetraining import convert
from imagetraining.db.engine import Database
from imagetraining.errors import FailedPrecondition, PreconditionViolation, Unavailable
from imagetraining.fanout import Fanout, SubscriberBudget
from imagetraining.names import parse_session_name
from imagetraining.streaming import pump
from imagetraining.transitions import SEQUENCE_BLOCK
from imagetraining.v1 import discovery_worker_service_pb2 as wpb
from imagetraining.v1 import discovery_worker_service_pb2_grpc as wgrpc
from imagetraining.v1 import resources_pb2 as pb


class SessionStreams:
    """Registry of the owned sessions' event sources, shared by the runners and the servicer."""

    def __init__(
        self,
        db: Database,
        *,
        max_subscribers: int,
        idle_seconds: float,
        min_interval: float = 0.1,
        heartbeat_interval: float = 5.0,
    ) -> None:
        self.db = db
        self.budget = SubscriberBudget(max_subscribers)
        self.idle_seconds = idle_seconds
        self.min_interval = min_interval
        self.heartbeat_interval = heartbeat_interval
        self._sources: dict[int, SessionEvents] = {}
        self.closing = False

    def observe(self, claim: Claim) -> StreamObserver:
        """The worker's `observe` seam: called once per claim, on the event loop."""
        return StreamObserver(self, claim)

    def register(self, session_id: int, source: SessionEvents) -> None:
        self._sources[session_id] = source

    def unregister(self, session_id: int, source: SessionEvents) -> None:
        if self._sources.get(session_id) is source:
            del self._sources[session_id]

    def get(self, session_id: int) -> SessionEvents | None:
        return self._sources.get(session_id)


class StreamObserver:
    """Publishes one claimed session's committed rows as events (see claims.RunObserver)."""

    def __init__(self, streams: SessionStreams, claim: Claim) -> None:
        self.streams = streams
        self.claim = claim
        first = max(claim.event_ceiling - SEQUENCE_BLOCK + 1, 1)
        self.events = SessionEvents(
            claim.session_id,
            Fanout(streams.budget, idle_seconds=streams.idle_seconds),
            first_sequence=first,
            ceiling=max(claim.event_ceiling, first),
            reserve=self._reserve,
            state=convert.SESSION_STATE_TO_PROTO.get(claim.state, pb.SESSION_STATE_DISCOVERING),
            min_interval=streams.min_interval,
            heartbeat_interval=streams.heartbeat_interval,
        )
        if claim.row:
            self._load(claim.row)
        streams.register(claim.session_id, self.events)
        self.events.start()

    async def _reserve(self) -> int:
        return await claims.reserve_sequences(self.streams.db, self.claim)

    def _load(self, row: Mapping[str, Any]) -> None:
        """Take the row's counters without publishing (the first message, at start, carries them)."""
        self.events.discovery_progress = convert.discovery_progress(row)
        self.events.training_progress = convert.training_progress(row)
        if row.get("state") == "running":
            self.events.discovery_progress.current_directory = ""

    def progress(self, row: Mapping[str, Any]) -> None:
        if row.get("state") == "discovering":
            self.events.discovery(convert.discovery_progress(row))
        else:
            self.events.training(convert.training_progress(row))

    def state(self, state: str, reason: str, row: Mapping[str, Any]) -> None:
        self._load(row)
        self.events.set_state(convert.SESSION_STATE_TO_PROTO[state], reason)

    def acknowledge(self, event_sequence: int) -> None:
        self.events.acknowledge(event_sequence)

    def sequence_seen(self, value: int) -> None:
        self.events.note_row_sequence(value)

    async def close(self) -> None:
        self.streams.unregister(self.claim.session_id, self.events)
        await self.events.close()


class DiscoveryWorkerServicer(wgrpc.DiscoveryWorkerServiceServicer):
    """Thin: finds the owned session's source and streams its fan-out."""

    def __init__(self, streams: SessionStreams, *, write_timeout: float) -> None:
        self.streams = streams
        self.write_timeout = write_timeout

    async def StreamSessionEvents(  # type: ignore[override]  # written with context.write, not yield
        self, request: wpb.StreamSessionEventsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        session_id = parse_session_name(request.name)
        if self.streams.closing:
            raise Unavailable("this worker is shutting down; look up the session's owner again")
        source = self.streams.get(session_id)
        if source is None:
            raise FailedPrecondition(
                f"{request.name} is not owned by this worker: look up owner_address again",
                [PreconditionViolation("OWNER", request.name, "this worker does not own the session")],
            )
        sub = source.fanout.subscribe(request.after_sequence)
        try:
            current = source.current()
            first = [current] if current.sequence > request.after_sequence else []
            await pump(
                context,
                sub,
                lambda event: wpb.StreamSessionEventsResponse(event=event),
                first=first,
                write_timeout=self.write_timeout,
            )
        finally:
            source.fanout.unsubscribe(sub)

"""WatchSession: relay one worker stream per session to any number of subscribers.

One `Feed` per session with at least one subscriber in this process. The feed finds the owning
worker from the lease row (`owner_address`), reads its StreamSessionEvents, and republishes every
message to the session's `Fanout`; when the owner changes (crash, lease taken over, pause and
resume) the upstream ends or fails and the feed resolves the owner again. While no worker owns
the session (pending, paused, queued) the feed watches the row itself and publishes state changes
numbered by the row's `event_sequence`, which the control service bumps on every transition it
makes and which every worker's sequence block lies below.

The database is the only shared state, so a restarted control process loses nothing: a client
reconnects with `after_sequence` and gets a snapshot only if the state moved on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text

from imagetraining import convert
from imagetraining.db.engine import Database
from imagetraining.errors import NotFound, Unavailable
from imagetraining.fanout import Evicted, Fanout, SubscriberBudget
from imagetraining.streaming import evicted_error
from imagetraining.v1 import discovery_worker_service_pb2 as wpb
from imagetraining.v1 import discovery_worker_service_pb2_grpc as wgrpc
from imagetraining.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

TERMINAL = frozenset({pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_CANCELLED, pb.SESSION_STATE_FAILED})
_OWNER_SQL = text(
    """
    SELECT state, state_reason, event_sequence, owner_address,
           (owner_id IS NOT NULL AND lease_expires_at > now()) AS leased
      FROM training_sessions
     WHERE id = :id
    """
)


@dataclass(frozen=True)
class Snapshot:
    """What the servicer loads for a session: the full resource and its cumulative event fields."""

    session: pb.Session
    event_sequence: int


SnapshotLoader = Callable[[int], Awaitable[Snapshot]]


@dataclass(frozen=True)
class _Row:
    state: int
    state_reason: str
    event_sequence: int
    owner_address: str | None
    leased: bool


class Feed:
    """The upstream side of one session: resolves the owner, relays, publishes to the fan-out."""

    def __init__(self, relay: Relay, session_id: int) -> None:
        self.relay = relay
        self.session_id = session_id
        self.name = f"sessions/{session_id}"
        self.fanout = Fanout(relay.budget, idle_seconds=relay.idle_seconds)
        self.first_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.deleted = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"relay-{self.name}")

    async def stop(self) -> None:
        self.fanout.end()
        self.first_event.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def wake(self) -> None:
        self._wake.set()

    @property
    def last_sequence(self) -> int:
        return self.fanout.latest.sequence if self.fanout.latest is not None else 0

    def _publish(self, event: pb.SessionEvent) -> None:
        self.fanout.publish(event)
        self.first_event.set()

    def _publish_row(self, row: _Row, kind: int) -> None:
        """A state change observed in the database (no worker owns the session)."""
        latest = self.fanout.latest
        if latest is not None and latest.state == row.state and latest.state_reason == row.state_reason:
            return
        if row.event_sequence <= self.last_sequence:
            return
        now = Timestamp()
        now.GetCurrentTime()
        event = pb.SessionEvent(
            name=self.name,
            sequence=row.event_sequence,
            event_time=now,
            kind=kind,  # type: ignore[arg-type]
            state=row.state,  # type: ignore[arg-type]
            state_reason=row.state_reason,
        )
        if latest is not None:
            event.discovery.CopyFrom(latest.discovery)
            event.training.CopyFrom(latest.training)
        self._publish(event)

    async def _read(self) -> _Row | None:
        async with self.relay.db.reads.connect() as conn:
            r = (await conn.execute(_OWNER_SQL, {"id": self.session_id})).first()
        if r is None:
            return None
        state = convert.SESSION_STATE_TO_PROTO[r.state]
        return _Row(state, r.state_reason, r.event_sequence, r.owner_address, bool(r.leased))

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                row = await self._read()
            except Exception as exc:  # database unavailable: keep subscribers, retry
                log.warning("%s: relay cannot read the session: %s", self.name, exc)
                await self._pause(min(backoff := backoff * 2, 2.0))
                continue
            if row is None:
                self.deleted = True
                self.fanout.end()
                self.first_event.set()
                return
            if row.state in TERMINAL:
                self._publish_row(row, pb.EVENT_KIND_STATE_CHANGE)
                self.fanout.end()
                self.first_event.set()
                return
            active = row.state in (pb.SESSION_STATE_DISCOVERING, pb.SESSION_STATE_RUNNING)
            if active and row.leased and row.owner_address:
                relayed = await self._relay_from(row.owner_address)
                if relayed:
                    backoff = 0.05
                    continue
                await self._pause(min(backoff := backoff * 2, 1.0))
                continue
            self._publish_row(row, pb.EVENT_KIND_STATE_CHANGE)
            # Pending, paused or waiting for a worker: the row changes when a client or a worker acts.
            await self._pause(self.relay.poll_seconds)

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _relay_from(self, address: str) -> bool:
        """Relay until the upstream ends; True if it delivered anything (so no back-off)."""
        stub = wgrpc.DiscoveryWorkerServiceStub(self.relay.channel(address))
        delivered = False
        call = stub.StreamSessionEvents(
            wpb.StreamSessionEventsRequest(name=self.name, after_sequence=self.last_sequence),
            metadata=self.relay.metadata,
        )
        try:
            async for response in call:
                delivered = True
                self._publish(response.event)
                if response.event.state in TERMINAL:
                    break
        except grpc.aio.AioRpcError as err:
            log.info("%s: upstream %s ended: %s %s", self.name, address, err.code().name, err.details())
        finally:
            call.cancel()
        return delivered


class Relay:
    """All feeds of this control process, and the channels to workers they share."""

    def __init__(
        self,
        db: Database,
        load_snapshot: SnapshotLoader,
        *,
        max_subscribers: int,
        idle_seconds: float,
        poll_seconds: float = 0.5,
        channel_credentials: grpc.ChannelCredentials | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.db = db
        self.load_snapshot = load_snapshot
        self.budget = SubscriberBudget(max_subscribers)
        self.idle_seconds = idle_seconds
        self.poll_seconds = poll_seconds
        self._credentials = channel_credentials
        self.metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._feeds: dict[int, Feed] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing = False

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self._credentials is not None:
                ch = grpc.aio.secure_channel(address, self._credentials)
            else:
                ch = grpc.aio.insecure_channel(address)
            self._channels[address] = ch
        return ch

    def notify(self, session_id: int | None) -> None:
        """A NOTIFY: look at the row now instead of at the next poll (None: look at every session)."""
        feeds = list(self._feeds.values()) if session_id is None else [self._feeds.get(session_id)]
        for feed in feeds:
            if feed is not None:
                feed.wake()

    async def watch(self, session_id: int, after_sequence: int) -> AsyncGenerator[pb.SessionEvent, None]:
        """Snapshot (when the client is behind), then live events, until a terminal state.

        Raises NotFound when the session is deleted mid-stream, ResourceExhausted when this
        subscriber is evicted, Unavailable when this process shuts down (reconnect elsewhere with
        `after_sequence`).
        """
        if self._closing:
            raise _shutting_down(after_sequence)
        feed = self._feeds.get(session_id)
        if feed is None:
            feed = Feed(self, session_id)
            self._feeds[session_id] = feed
            feed.start()
        sub = feed.fanout.subscribe(after_sequence)
        try:
            # The feed's first message numbers the snapshot: the owner's current state, or the row's
            # when nobody owns the session. A number of our own could collide with the owner's.
            await feed.first_event.wait()
            if feed.deleted:
                raise NotFound(feed.name)
            snapshot = await self.load_snapshot(session_id)
            latest = feed.fanout.latest
            if latest is not None and latest.sequence > after_sequence:
                yield _snapshot_event(snapshot, latest)
                sub.skip_to(latest.sequence)
                if latest.state in TERMINAL:
                    return
            while True:
                try:
                    event = await sub.get()
                except Evicted as exc:
                    if self._closing:
                        raise _shutting_down(exc.last_sequence) from None
                    raise evicted_error(exc.last_sequence, exc.reason) from None
                if event is None:
                    break
                yield event
                sub.delivered()
            if feed.deleted:
                raise NotFound(feed.name)
            if self._closing:
                raise _shutting_down(sub.last_sequence)
        finally:
            feed.fanout.unsubscribe(sub)
            if len(feed.fanout) == 0 and self._feeds.get(session_id) is feed:
                del self._feeds[session_id]
                await feed.stop()

    def subscription_of(self, session_id: int) -> Fanout | None:
        feed = self._feeds.get(session_id)
        return feed.fanout if feed is not None else None

    async def close(self) -> None:
        """Shutdown: end every stream (subscribers get what is queued, then OK) and close channels."""
        self._closing = True
        for feed in list(self._feeds.values()):
            feed.fanout.evict_all("shutdown")
            await feed.stop()
        self._feeds.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def _shutting_down(last_sequence: int) -> Unavailable:
    return Unavailable(
        f"the control service is shutting down; reconnect with after_sequence={last_sequence}",
        metadata={"last_sequence": str(last_sequence)},
    )


def _snapshot_event(snapshot: Snapshot, latest: pb.SessionEvent) -> pb.SessionEvent:
    """The stored session, numbered and stated as the stream's latest message.

    State and counters come from the stream (they are what later messages continue from); the
    `session` field carries the resource as GetSession shows it.
    """
    now = Timestamp()
    now.GetCurrentTime()
    event = pb.SessionEvent(
        name=snapshot.session.name,
        sequence=latest.sequence,
        event_time=now,
        kind=pb.EVENT_KIND_SNAPSHOT,
        state=latest.state,
        state_reason=latest.state_reason,
        session=snapshot.session,
    )
    event.discovery.CopyFrom(latest.discovery)
    event.training.CopyFrom(latest.training)
    return event

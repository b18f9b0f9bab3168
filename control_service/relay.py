"""WatchSession: relay one worker stream per session to any number of subscribers.

One `Feed` per session with at least one subscriber in this process. The feed finds the owning
worker from the lease row (`owner_address`), reads its StreamSessionEvents, and republishes every
message to the session's `Fanout`. While it relays it keeps an eye on the row (at every NOTIFY and
every poll): when the owner changes (crash, takeover, pause and resume), the lease runs out, or the
upstream stays silent for `SILENCE_SECONDS` (a frozen or partitioned worker sends not even its
heartbeat), the feed drops the upstream and looks the owner up again. A new owner's claim sends a
NOTIFY, so subscribers follow a takeover at once.

Whenever the worker's stream is not what subscribers get (no owner: pending, paused, queued, ended;
or an owner the control service cannot reach: TLS name mismatch, partition, frozen), the feed
publishes the session row itself, every message built from the committed row (`convert.session_event`):
state, reason and counters are those GetSession shows at that moment, never a copy of an older
message. A row message is numbered by the row's `event_sequence` when that is new (every committed
transition raises it); otherwise the feed takes a fresh number from the row (`transitions.MINT_SEQUENCE`, one
UPDATE), so sequences stay strictly increasing for every subscriber of every control replica, across
restarts. An owner that sees the row's counter pass its reserved block moves its own numbering above
it (discovery_worker/streams.py), so its next messages are newer still.

The database is the only shared state, so a restarted control process loses nothing: a client
reconnects with `after_sequence` and gets a snapshot only if the state moved on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import text

from imagetraining import convert, transitions
from imagetraining.db import faults
from imagetraining.db.engine import Database
from imagetraining.errors import NotFound, Unavailable
from imagetraining.fanout import Evicted, Fanout, SubscriberBudget
from imagetraining.streaming import evicted_error
from imagetraining.v1 import discovery_worker_service_pb2 as wpb
from imagetraining.v1 import discovery_worker_service_pb2_grpc as wgrpc
from imagetraining.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

TERMINAL = convert.TERMINAL_PROTO
ACTIVE = convert.ACTIVE_PROTO
# A worker sends a heartbeat at least every 5 s (discovery_worker/events.py); an upstream silent for
# about two of those is frozen, partitioned or gone.
WORKER_HEARTBEAT_SECONDS = 5.0
SILENCE_SECONDS = 2 * WORKER_HEARTBEAT_SECONDS + 1.0
# When no upstream delivers (no owner, or one that cannot be reached), a heartbeat built from the row
# this often when nothing changes: every stream shows it is alive, owned or not.
HEARTBEAT_SECONDS = WORKER_HEARTBEAT_SECONDS
# Backoff before dialling an owner that could not be reached again.
REDIAL_MAX_SECONDS = 5.0
# The same upstream failure is logged at WARNING at most this often per address.
WARN_EVERY_SECONDS = 60.0

_ROW_SQL = text(
    """
    SELECT *, (owner_id IS NOT NULL AND lease_expires_at > now()) AS leased
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


def _state(row: Mapping[str, Any]) -> int:
    return convert.SESSION_STATE_TO_PROTO[row["state"]]


def _same_news(a: pb.SessionEvent, b: pb.SessionEvent) -> bool:
    """Would `b` tell a subscriber nothing that `a` did not (state, reason, counters)?"""
    return (
        a.state == b.state
        and a.state_reason == b.state_reason
        and a.training.processed_images == b.training.processed_images
        and a.training.failed_images == b.training.failed_images
        and a.training.skipped_images == b.training.skipped_images
        and a.training.total_images == b.training.total_images
        and a.training.indeterminate == b.training.indeterminate
        and a.discovery.images_found == b.discovery.images_found
        and a.discovery.files_seen == b.discovery.files_seen
        and a.discovery.directories_scanned == b.discovery.directories_scanned
    )


class _UpstreamWarnings:
    """Log an upstream failure at WARNING with what to do, once per address and kind per minute."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, str], float] = {}

    def report(self, name: str, address: str, err: grpc.aio.AioRpcError) -> None:
        details = err.details() or ""
        lowered = details.lower()
        if "hostname verification" in lowered or "certificate" in lowered or "ssl" in lowered or "tls" in lowered:
            kind = "tls"
            advice = (
                "the worker's TLS certificate does not match the address it advertises, or is not trusted: put that "
                "address (host name or IP) in the certificate's subjectAltName, or set the worker's "
                "IMAGETRAINING_WORKER_ADVERTISE_ADDRESS to a name the certificate carries, and make "
                "IMAGETRAINING_TLS_CA_FILE trust it; meanwhile subscribers get the session's progress from the "
                "database every few seconds"
            )
        elif err.code() == grpc.StatusCode.UNAUTHENTICATED:
            kind = "auth"
            advice = "the worker refused this service's token: give both the same IMAGETRAINING_AUTH_TOKEN"
        elif err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            kind = "unreachable"
            advice = (
                "check that IMAGETRAINING_WORKER_ADVERTISE_ADDRESS is reachable from the control service; "
                "meanwhile subscribers get the session's progress from the database"
            )
        else:
            log.info("%s: upstream %s ended: %s %s", name, address, err.code().name, details)
            return
        key = (address, kind)
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            log.debug("%s: upstream %s failed again: %s %s", name, address, err.code().name, details)
            return
        self._next[key] = now + WARN_EVERY_SECONDS
        log.warning("%s: cannot relay from worker %s: %s %s. %s", name, address, err.code().name, details, advice)


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
        # When the feed last published anything (row heartbeats while no upstream delivers).
        self._last_publish = 0.0

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
        self._last_publish = time.monotonic()
        self.first_event.set()

    async def _read(self) -> Mapping[str, Any] | None:
        async with self.relay.db.reads.connect() as conn:
            row = (await conn.execute(_ROW_SQL, {"id": self.session_id})).mappings().first()
        return None if row is None else dict(row)

    async def _mint(self) -> Mapping[str, Any] | None:
        """The row with a fresh event_sequence, or None when the row is locked right now (try later)."""
        async with self.relay.db.engine.begin() as conn:
            row = (await conn.execute(transitions.MINT_SEQUENCE, {"id": self.session_id})).mappings().first()
        return None if row is None else dict(row)

    async def _publish_row(self, row: Mapping[str, Any], *, heartbeat: bool = False) -> None:
        """Publish the committed row when it tells subscribers something new (or a heartbeat is due)."""
        latest = self.fanout.latest
        kind = pb.EVENT_KIND_STATE_CHANGE
        if latest is not None and latest.state == _state(row) and latest.state_reason == (row["state_reason"] or ""):
            kind = (
                pb.EVENT_KIND_DISCOVERY_PROGRESS if row["state"] == "discovering" else pb.EVENT_KIND_TRAINING_PROGRESS
            )
        candidate = convert.session_event(row, int(row["event_sequence"]), kind)
        if latest is not None and _same_news(latest, candidate):
            if not heartbeat:
                return
            candidate.kind = pb.EVENT_KIND_HEARTBEAT
        if candidate.sequence <= self.last_sequence:
            minted = await self._mint()
            if minted is None:
                return
            row = minted
            candidate = convert.session_event(row, int(row["event_sequence"]), candidate.kind)
        self._publish(candidate)

    def _restated(self, event: pb.SessionEvent) -> pb.SessionEvent:
        """An owner's event, kind set by what subscribers were told, so each transition is announced
        exactly once whoever saw it first: a STATE_CHANGE they were already told (from the row, or by
        the owner before a takeover) becomes a progress message, and a progress message in a state
        they were not told becomes the STATE_CHANGE. The second case: a worker that claims a session
        just resumed by a client starts its stream in RUNNING with progress, and when it claims
        before the relay has read the row, the row's STATE_CHANGE is never published."""
        latest = self.fanout.latest
        if latest is None:
            return event
        told = latest.state == event.state and latest.state_reason == event.state_reason
        progress = (pb.EVENT_KIND_DISCOVERY_PROGRESS, pb.EVENT_KIND_TRAINING_PROGRESS)
        if event.kind == pb.EVENT_KIND_STATE_CHANGE and told:
            event.kind = (
                pb.EVENT_KIND_DISCOVERY_PROGRESS
                if event.state == pb.SESSION_STATE_DISCOVERING
                else pb.EVENT_KIND_TRAINING_PROGRESS
            )
        elif event.kind in progress and not told:
            event.kind = pb.EVENT_KIND_STATE_CHANGE
        return event

    def _heartbeat_due(self) -> bool:
        return time.monotonic() - self._last_publish >= HEARTBEAT_SECONDS - 0.05

    def _until_next_look(self) -> float:
        """The poll interval, or less when a heartbeat falls due sooner."""
        heartbeat_in = HEARTBEAT_SECONDS - (time.monotonic() - self._last_publish)
        return max(0.05, min(self.relay.poll_seconds, heartbeat_in))

    async def _run(self) -> None:
        backoff = 0.05
        redial = 0.2
        while True:
            try:
                row = await self._read()
                if row is None:
                    self.deleted = True
                    self.fanout.end()
                    self.first_event.set()
                    return
                state = _state(row)
                if state in TERMINAL:
                    await self._publish_row(row)
                    self.fanout.end()
                    self.first_event.set()
                    return
                if state in ACTIVE and row["leased"] and row["owner_address"]:
                    if await self._follow(row):
                        redial = 0.2
                        continue
                    # Unreachable or silent: subscribers get the row until it is time to dial again.
                    await self._from_row_until(row, time.monotonic() + redial)
                    redial = min(redial * 2, REDIAL_MAX_SECONDS)
                    continue
                # Pending, paused or waiting for a worker: the row changes when a client or a worker acts.
                await self._publish_row(row, heartbeat=self._heartbeat_due())
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # database unavailable: keep subscribers, retry
                log.warning("%s: relay cannot read the session: %s", self.name, faults.describe(exc))
                await self._pause(min(backoff := backoff * 2, 2.0))
                continue
            await self._pause(self._until_next_look())

    async def _from_row_until(self, followed: Mapping[str, Any], deadline: float) -> None:
        """Publish the row at the poll cadence until `deadline`, or until the owner changes or the session ends."""
        while True:
            row = await self._read()
            if not self._still_followed(row, followed):
                return
            assert row is not None
            await self._publish_row(row, heartbeat=self._heartbeat_due())
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await self._pause(min(self._until_next_look(), left))

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _still_followed(self, row: Mapping[str, Any] | None, followed: Mapping[str, Any]) -> bool:
        """Is the owner we relay from still the session's owner, with a live lease, in an active state?"""
        return (
            row is not None
            and _state(row) in ACTIVE
            and bool(row["leased"])
            and row["epoch"] == followed["epoch"]
            and row["owner_address"] == followed["owner_address"]
        )

    async def _follow(self, row: Mapping[str, Any]) -> bool:
        """Relay from the row's owner until it ends, another owner (or none) holds the session, or the
        upstream goes silent; True if it delivered anything (so no back-off)."""
        address = str(row["owner_address"])
        stub = wgrpc.DiscoveryWorkerServiceStub(self.relay.channel(address))
        delivered = False
        call = stub.StreamSessionEvents(
            wpb.StreamSessionEventsRequest(name=self.name, after_sequence=self.last_sequence),
            metadata=self.relay.metadata,
        )
        reader: asyncio.Task[Any] = asyncio.ensure_future(call.read())
        heard = time.monotonic()
        try:
            while True:
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                silence_left = SILENCE_SECONDS - (time.monotonic() - heard)
                try:
                    done, _ = await asyncio.wait(
                        {reader, waker},
                        timeout=max(0.0, min(self.relay.poll_seconds, silence_left)),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waker.cancel()
                if reader in done:
                    response = reader.result()  # raises AioRpcError
                    if response is grpc.aio.EOF:
                        return delivered
                    delivered = True
                    heard = time.monotonic()
                    self._publish(self._restated(response.event))
                    if response.event.state in TERMINAL:
                        return delivered
                    reader = asyncio.ensure_future(call.read())
                    continue
                # A NOTIFY or the poll: is this upstream still the one to follow?
                current = await self._read()
                if not self._still_followed(current, row):
                    return True  # re-resolve at once: a new owner, no owner, or an ended session
                if time.monotonic() - heard >= SILENCE_SECONDS:
                    log.warning(
                        "%s: worker %s sent nothing for %.0f s (not even a heartbeat): looking the owner up again",
                        self.name,
                        address,
                        time.monotonic() - heard,
                    )
                    return False
        except grpc.aio.AioRpcError as err:
            self.relay.upstream_warnings.report(self.name, address, err)
            return delivered
        finally:
            reader.cancel()
            call.cancel()


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
        self.upstream_warnings = _UpstreamWarnings()

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
    return convert.event(
        snapshot.session.name,
        latest.sequence,
        pb.EVENT_KIND_SNAPSHOT,
        latest.state,
        latest.state_reason,
        latest.discovery,
        latest.training,
        session=snapshot.session,
    )

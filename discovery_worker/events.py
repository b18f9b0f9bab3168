"""The progress stream of one session owned by this worker.

The runner reports what it does (`discovery`, `training`, `state`); this turns those reports into
`SessionEvent`s at a bounded rate and publishes them to the session's fan-out, which the
StreamSessionEvents servicer reads.

Sequences: a claim reserves a block of sequence numbers in the session row
(`event_sequence = event_sequence + SEQUENCE_BLOCK`), so the row always holds a ceiling above every
sequence this owner has used. A new owner (after a crash or a lease takeover) starts above that
ceiling, and the control service numbers its own state changes above it too, so a subscriber never
sees a sequence twice or going backwards. When an owner nears its ceiling it reserves another block.

A control service that cannot reach this owner (control_service/relay.py) numbers the messages it
builds from the session row by raising the row's counter above this owner's block. The runner's
watcher reports the row's counter (`note_row_sequence`); when it is above the block, this owner
reserves a new block above it and numbers from there, so its messages are newer again.

Rate: a message at most every `min_interval` while counters change, one at once for every state
change, and a heartbeat every `heartbeat_interval` when nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from imagetraining import convert
from imagetraining.fanout import Fanout
from imagetraining.transitions import SEQUENCE_BLOCK
from imagetraining.v1 import resources_pb2 as pb

__all__ = ["SEQUENCE_BLOCK", "SessionEvents"]
# Reserve the next block when fewer than this many sequences are left.
SEQUENCE_LOW_WATER = 10_000


class SessionEvents:
    """Sequence numbering, rate limiting and publishing for one owned session."""

    def __init__(
        self,
        session_id: int,
        fanout: Fanout,
        *,
        first_sequence: int,
        ceiling: int,
        reserve: Callable[[], Awaitable[int]] | None = None,
        state: int = pb.SESSION_STATE_DISCOVERING,
        min_interval: float = 0.1,
        heartbeat_interval: float = 5.0,
    ) -> None:
        self.name = f"sessions/{session_id}"
        self.fanout = fanout
        self._next = first_sequence
        self._ceiling = ceiling
        self._reserve = reserve
        self._reserving: asyncio.Task[None] | None = None
        self._own_row_sequence = ceiling
        self.state = state
        self.state_reason = ""
        self.discovery_progress = pb.DiscoveryProgress()
        self.training_progress = pb.TrainingProgress(indeterminate=True)
        self._kind = pb.EVENT_KIND_DISCOVERY_PROGRESS
        self._dirty = False
        self._last_emit = 0.0
        self._min_interval = min_interval
        self._heartbeat_interval = heartbeat_interval
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick(), name=f"events-{self.name}")
        self._emit(pb.EVENT_KIND_STATE_CHANGE)

    async def close(self) -> None:
        """Flush pending progress, end the stream for every subscriber and stop the ticker."""
        if self._dirty:
            self._emit(self._kind)
        self.fanout.end()
        for task in (self._ticker, self._reserving):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def discovery(self, progress: pb.DiscoveryProgress) -> None:
        self.discovery_progress = progress
        self.training_progress.discovered_images = progress.images_found
        self._kind = pb.EVENT_KIND_DISCOVERY_PROGRESS
        self._changed()

    def training(self, progress: pb.TrainingProgress) -> None:
        self.training_progress = progress
        self._kind = pb.EVENT_KIND_TRAINING_PROGRESS
        self._changed()

    def set_state(self, state: int, reason: str = "") -> None:
        """A state change is published at once, never conflated away by the fan-out."""
        if state == self.state and reason == self.state_reason:
            return
        self.state = state
        self.state_reason = reason
        self._emit(pb.EVENT_KIND_STATE_CHANGE)

    def current(self) -> pb.SessionEvent:
        """The cumulative state now, as an event with the latest sequence (for a new subscriber)."""
        latest = self.fanout.latest
        if latest is not None and not self._dirty:
            return latest
        return self._emit(self._kind)

    def _changed(self) -> None:
        self._dirty = True
        if time.monotonic() - self._last_emit >= self._min_interval:
            self._emit(self._kind)

    def _take_sequence(self) -> int:
        seq = self._next
        self._next += 1
        if (
            self._reserve is not None
            and self._ceiling - self._next < SEQUENCE_LOW_WATER
            and (self._reserving is None or self._reserving.done())
        ):
            self._reserving = asyncio.create_task(self._extend())
        if seq > self._ceiling:
            # The reservation did not keep up (database slow): never reuse a number; the next
            # owner starts above the stored ceiling, which the pending reservation raises.
            self._ceiling = seq
        return seq

    def acknowledge(self, value: int) -> None:
        """The row's event_sequence as this owner's own write left it (its transitions raise it by one)."""
        self._own_row_sequence = max(self._own_row_sequence, value)

    def note_row_sequence(self, value: int) -> None:
        """The session row's event_sequence now: above our block (and our own writes) means another
        process numbered messages above ours."""
        if (
            value > max(self._ceiling, self._own_row_sequence)
            and self._reserve is not None
            and (self._reserving is None or self._reserving.done())
        ):
            self._reserving = asyncio.create_task(self._extend())

    async def _extend(self) -> None:
        """Reserve the next block; when it does not follow ours (numbers were taken in between), jump to it."""
        assert self._reserve is not None
        ceiling = await self._reserve()
        start = ceiling - SEQUENCE_BLOCK + 1
        if start > self._ceiling + 1:
            self._next = max(self._next, start)
        self._ceiling = ceiling

    def _emit(self, kind: int) -> pb.SessionEvent:
        event = convert.event(
            self.name,
            self._take_sequence(),
            kind,
            self.state,
            self.state_reason,
            self.discovery_progress,
            self.training_progress,
        )
        self._dirty = False
        self._last_emit = time.monotonic()
        self.fanout.publish(event)
        return event

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._min_interval)
            idle = time.monotonic() - self._last_emit
            if self._dirty and idle >= self._min_interval:
                self._emit(self._kind)
            elif idle >= self._heartbeat_interval:
                self._emit(pb.EVENT_KIND_HEARTBEAT)
            self.fanout.sweep()

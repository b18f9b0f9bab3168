"""Fan-out of one session's event stream to many subscribers, with bounded memory per subscriber.

Used on both sides of the stream: the worker publishes its session's events to its
StreamSessionEvents callers, and the control relay republishes one upstream stream to every
WatchSession subscriber. The rules that make many (and slow) subscribers safe:

- `publish` never blocks and costs O(subscribers): it only appends to per-subscriber queues.
- Progress and heartbeat messages carry cumulative state, so a newer one replaces an older one
  still waiting at the tail of a queue (conflation). State changes and snapshots are never dropped.
  A queue therefore holds at most about two entries per undelivered state change.
- A subscriber whose oldest waiting message is older than `idle_seconds` (it stopped reading, or
  its connection stopped draining) is evicted: its `get` raises `Evicted` with the last sequence it
  was given, so it can reconnect with `after_sequence`. The others never wait for it.
- Sequences delivered to one subscriber strictly increase: anything at or below the last one
  offered is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import NoReturn

from imagetraining import metrics
from imagetraining.errors import ResourceExhausted
from imagetraining.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

_CONFLATABLE = frozenset({pb.EVENT_KIND_DISCOVERY_PROGRESS, pb.EVENT_KIND_TRAINING_PROGRESS, pb.EVENT_KIND_HEARTBEAT})
# Refusals at the cap are logged at WARNING at most this often (a burst refuses thousands at once).
REFUSAL_WARN_EVERY_SECONDS = 60.0


class Evicted(Exception):
    """The subscriber fell too far behind; reconnect with after_sequence=last_sequence."""

    def __init__(self, last_sequence: int, reason: str) -> None:
        super().__init__(reason)
        self.last_sequence = last_sequence
        self.reason = reason


class SubscriberBudget:
    """A cap on subscribers shared by every fan-out of one process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.refused = 0
        self._next_warning = 0.0

    def check(self) -> None:
        """Raise ResourceExhausted if the cap is reached, without taking a place.

        A cheap early answer for a request that would be refused anyway (before any database work):
        in a burst of stream starts, every refusal that costs less lets the process accept the
        calls queued behind it sooner. `acquire` still decides.
        """
        if self.count >= self.limit:
            self._refuse()

    def acquire(self) -> None:
        if self.count >= self.limit:
            self._refuse()
        self.count += 1
        metrics.WATCH_SUBSCRIBERS.set(self.count)

    def _refuse(self) -> NoReturn:
        self.refused += 1
        metrics.WATCH_EVICTIONS.labels(reason="cap").inc()
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + REFUSAL_WARN_EVERY_SECONDS
            log.warning(
                "refusing progress subscribers with RESOURCE_EXHAUSTED: %d served, the cap "
                "IMAGETRAINING_MAX_SUBSCRIBERS=%d is reached (%d refused so far; logged at most every %.0f s)",
                self.count,
                self.limit,
                self.refused,
                REFUSAL_WARN_EVERY_SECONDS,
            )
        raise ResourceExhausted(
            f"this server already serves {self.limit} progress subscribers "
            "(IMAGETRAINING_MAX_SUBSCRIBERS); retry later or watch through another replica"
        )

    def release(self) -> None:
        self.count = max(0, self.count - 1)
        metrics.WATCH_SUBSCRIBERS.set(self.count)


class Subscription:
    """One subscriber's bounded queue. Read with `get()`; close with `Fanout.unsubscribe`."""

    def __init__(self, after_sequence: int, max_queue: int) -> None:
        self._queue: deque[pb.SessionEvent] = deque()
        # The reader's wake-up while it waits in `get` (a bare future: one per wait, set at most once).
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_queue = max_queue
        self._last_offered = after_sequence
        self._closed = False
        self._evicted: Evicted | None = None
        self.evicted_event = asyncio.Event()
        self.last_sequence = after_sequence
        self.waiting_since: float | None = None

    def offer(self, event: pb.SessionEvent) -> None:
        if self._closed or self._evicted is not None or event.sequence <= self._last_offered:
            return
        self._last_offered = event.sequence
        if self._queue and event.kind in _CONFLATABLE and self._queue[-1].kind in _CONFLATABLE:
            self._queue[-1] = event
        else:
            if len(self._queue) >= self._max_queue:
                self.evict("too many undelivered state changes")
                return
            self._queue.append(event)
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def skip_to(self, sequence: int) -> None:
        """The consumer was given `sequence` out of band (a snapshot): drop anything not newer."""
        if sequence > self._last_offered:
            self._last_offered = sequence
        self.last_sequence = max(self.last_sequence, sequence)
        while self._queue and self._queue[0].sequence <= sequence:
            self._queue.popleft()
        if not self._queue:
            self.waiting_since = None

    def evict(self, reason: str) -> None:
        if self._evicted is None:
            self._evicted = Evicted(self.last_sequence, reason)
            self._queue.clear()
            self.evicted_event.set()
            self._wake()

    def end(self) -> None:
        """No more messages will come: `get` returns None once the queue is drained."""
        self._closed = True
        self._wake()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def get(self) -> pb.SessionEvent | None:
        """The next message, None at the end of the stream; raises Evicted."""
        while True:
            if self._evicted is not None:
                raise self._evicted
            if self._queue:
                event = self._queue.popleft()
                self.last_sequence = event.sequence
                self.waiting_since = time.monotonic() if self._queue else None
                return event
            if self._closed:
                return None
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            await self._waiter

    def delivered(self) -> None:
        """The consumer finished writing the last message: nothing it holds is waiting any more."""
        if not self._queue:
            self.waiting_since = None


class Fanout:
    """Publishes one session's events to its subscribers; remembers the latest for newcomers."""

    def __init__(self, budget: SubscriberBudget, *, idle_seconds: float, max_queue: int = 64) -> None:
        self._budget = budget
        self._idle_seconds = idle_seconds
        self._max_queue = max_queue
        self._subscribers: set[Subscription] = set()
        self.latest: pb.SessionEvent | None = None
        self.ended = False

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, after_sequence: int) -> Subscription:
        """A new subscription; raises ResourceExhausted when the process-wide cap is reached."""
        self._budget.acquire()
        sub = Subscription(after_sequence, self._max_queue)
        self._subscribers.add(sub)
        if self.ended:
            sub.end()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.discard(sub)
            self._budget.release()

    def publish(self, event: pb.SessionEvent) -> None:
        if self.latest is None or event.sequence > self.latest.sequence:
            self.latest = event
        for sub in self._subscribers:
            sub.offer(event)

    def end(self) -> None:
        """The stream is over (terminal state, hand-over, shutdown): subscribers drain and stop."""
        self.ended = True
        for sub in self._subscribers:
            sub.end()

    def evict_all(self, reason: str) -> None:
        """Every subscriber stops now with the last sequence it was given (shutdown)."""
        for sub in self._subscribers:
            sub.evict(reason)

    def sweep(self, now: float | None = None) -> int:
        """Evict subscribers that have not taken a message for idle_seconds; return how many."""
        now = time.monotonic() if now is None else now
        evicted = 0
        for sub in list(self._subscribers):
            if sub.waiting_since is not None and now - sub.waiting_since > self._idle_seconds:
                sub.evict(f"no message read for {self._idle_seconds:g} s")
                evicted += 1
        return evicted

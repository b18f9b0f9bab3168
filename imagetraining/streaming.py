"""Writing a subscription to a server-streaming RPC without letting a slow client hold anything.

Handlers use `context.write` (not `yield`) so that a write the client does not drain can be timed
out: a client that stops reading is ended with RESOURCE_EXHAUSTED carrying the last sequence it was
given, instead of pinning a coroutine and its buffers forever.

Cost per message matters here: one event goes to every subscriber, so whatever a write costs is paid
a thousand times per event with a thousand subscribers. Hence no timer per write (one watchdog per
event loop checks every write in flight a few times per timeout instead), and `WireCache`, which
serializes a message shared by every subscriber once instead of once per subscriber.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from imagetraining import metrics
from imagetraining.errors import ResourceExhausted
from imagetraining.fanout import Evicted, Subscription
from imagetraining.v1 import resources_pb2 as pb

# How often the watchdog looks at the writes in flight, as a fraction of the shortest timeout: a
# write is ended between `timeout` and `timeout * (1 + 1/WATCHDOG_CHECKS)` after it started.
WATCHDOG_CHECKS = 8
WATCHDOG_MAX_PERIOD = 1.0


def evicted_error(last_sequence: int, why: str) -> ResourceExhausted:
    metrics.WATCH_EVICTIONS.labels(reason="idle").inc()
    return ResourceExhausted(
        f"subscriber too slow ({why}): reconnect with after_sequence={last_sequence}",
        metadata={"last_sequence": str(last_sequence)},
    )


async def start_stream(context: grpc.aio.ServicerContext) -> None:
    """Send the headers on their own, before any message.

    A first message stuck behind flow control must not hold them: grpc refuses a second
    initial-metadata operation, so the eviction's status could not be sent at all.
    """
    await context.send_initial_metadata(())


class _Watchdog:
    """Cancels the writes of one event loop that are still in flight after their deadline.

    A timer per write (`asyncio.timeout`) costs a handle, a heap entry and, once cancelled, heap
    clean-up on every message; this costs a dict entry. Its one timer is armed only while writes
    are in flight. It holds no reference to its loop (the registry's weak key).
    """

    def __init__(self) -> None:
        self.deadlines: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.period = WATCHDOG_MAX_PERIOD
        self.armed = False

    def begin(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], timeout: float) -> None:
        self.deadlines[task] = loop.time() + timeout
        if timeout < self.period * WATCHDOG_CHECKS:
            self.period = timeout / WATCHDOG_CHECKS
        if not self.armed:
            self.armed = True
            loop.call_later(self.period, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self.deadlines.items()):
            if deadline <= now and task not in self.expired:
                self.expired.add(task)
                task.cancel()
        self.armed = bool(self.deadlines)
        if self.armed:
            loop.call_later(self.period, self._check, loop)


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = weakref.WeakKeyDictionary()


def _watchdog(loop: asyncio.AbstractEventLoop) -> _Watchdog:
    dog = _watchdogs.get(loop)
    if dog is None:
        dog = _watchdogs[loop] = _Watchdog()
    return dog


class StreamWriter:
    """Timed writes for one server-streaming call, made from the call's own task.

    A client that has not drained a message within `timeout` is ended with ResourceExhausted
    carrying the last sequence it was given, which it reconnects with. The task, loop and watchdog
    are looked up once per call, not once per message.
    """

    def __init__(self, context: grpc.aio.ServicerContext, timeout: float) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("StreamWriter must be created inside the call's task")
        self._context = context
        self._timeout = timeout
        self._task = task
        self._loop = task.get_loop()
        self._dog = _watchdog(self._loop)

    async def write(self, message: Any, last_sequence: int) -> None:
        task, dog = self._task, self._dog
        dog.begin(self._loop, task, self._timeout)
        try:
            await self._context.write(message)
        except asyncio.CancelledError:
            if task in dog.expired and task.uncancel() == 0:
                raise evicted_error(last_sequence, f"a message waited {self._timeout:g} s to be read") from None
            raise
        finally:
            del dog.deadlines[task]
            dog.expired.discard(task)


class WireCache:
    """Serializes `wrap(event)` once per event for every subscriber that writes it.

    Keyed by the event object itself (identity, held alive by the entry), so only for events that
    are not changed once published, as the fan-out's are. Holds the `size` most recent ones; a miss
    only costs the serialization a subscriber would have done anyway.
    """

    def __init__(self, wrap: Callable[[pb.SessionEvent], Any], size: int = 64) -> None:
        self._wrap = wrap
        self._size = size
        self._entries: dict[int, tuple[pb.SessionEvent, bytes]] = {}

    def __call__(self, event: pb.SessionEvent) -> bytes:
        entry = self._entries.get(id(event))
        if entry is not None and entry[0] is event:
            return entry[1]
        data: bytes = self._wrap(event).SerializeToString()
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]
        self._entries[id(event)] = (event, data)
        return data


def pass_bytes(message: Any) -> bytes:
    """A response serializer for handlers that write pre-serialized messages (and messages too)."""
    if isinstance(message, bytes):
        return message
    data: bytes = message.SerializeToString()
    return data


async def pump(
    context: grpc.aio.ServicerContext,
    sub: Subscription,
    wrap: Callable[[pb.SessionEvent], Any],
    *,
    first: Iterable[pb.SessionEvent] = (),
    write_timeout: float,
) -> None:
    """Write `first`, then the subscription until it ends; raise ResourceExhausted on eviction."""

    writer = StreamWriter(context, write_timeout)

    async def send(event: pb.SessionEvent) -> None:
        await writer.write(wrap(event), sub.last_sequence)
        sub.delivered()

    await start_stream(context)
    for event in first:
        await send(event)
        sub.skip_to(event.sequence)
    while True:
        try:
            item = await sub.get()
        except Evicted as exc:
            raise evicted_error(exc.last_sequence, exc.reason) from None
        if item is None:
            return
        await send(item)

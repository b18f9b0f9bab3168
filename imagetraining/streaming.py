"""Writing a subscription to a server-streaming RPC without letting a slow client hold anything.

Handlers use `context.write` (not `yield`) so that a write the client does not drain can be timed
out: a client that stops reading is ended with RESOURCE_EXHAUSTED carrying the last sequence it was
given, instead of pinning a coroutine and its buffers forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from imagetraining.errors import ResourceExhausted
from imagetraining.fanout import Evicted, Subscription
from imagetraining.v1 import resources_pb2 as pb


def evicted_error(last_sequence: int, why: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"subscriber too slow ({why}): reconnect with after_sequence={last_sequence}",
        metadata={"last_sequence": str(last_sequence)},
    )


async def pump(
    context: grpc.aio.ServicerContext,
    sub: Subscription,
    wrap: Callable[[pb.SessionEvent], Any],
    *,
    first: Iterable[pb.SessionEvent] = (),
    write_timeout: float,
) -> None:
    """Write `first`, then the subscription until it ends; raise ResourceExhausted on eviction."""

    async def send(event: pb.SessionEvent) -> None:
        try:
            async with asyncio.timeout(write_timeout):  # no extra task per message, unlike wait_for
                await context.write(wrap(event))
        except TimeoutError:
            raise evicted_error(sub.last_sequence, f"a message waited {write_timeout:g} s to be read") from None
        sub.delivered()

    # Headers go out on their own: a first message stuck behind flow control must not hold them,
    # or the eviction's status could not be sent (grpc refuses a second initial-metadata op).
    await context.send_initial_metadata(())
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

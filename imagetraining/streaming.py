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


async def start_stream(context: grpc.aio.ServicerContext) -> None:
    """Send the headers on their own, before any message.

    A first message stuck behind flow control must not hold them: grpc refuses a second
    initial-metadata operation, so the eviction's status could not be sent at all.
    """
    await context.send_initial_metadata(())


async def write_or_evict(context: grpc.aio.ServicerContext, message: Any, timeout: float, last_sequence: int) -> None:
    """Write one message; a client that has not drained it within `timeout` is ended (ResourceExhausted).

    `last_sequence`: the last sequence the client was given, which it reconnects with.
    """
    try:
        async with asyncio.timeout(timeout):  # no extra task per message, unlike wait_for
            await context.write(message)
    except TimeoutError:
        raise evicted_error(last_sequence, f"a message waited {timeout:g} s to be read") from None


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
        await write_or_evict(context, wrap(event), write_timeout, sub.last_sequence)
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

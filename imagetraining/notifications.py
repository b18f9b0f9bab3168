"""NOTIFY / LISTEN on the sessions channel as a wake-up only: a dedicated asyncpg connection, reconnected.

Both services use it: the worker to claim a newly started session at once, the control service's
relay to notice a new owner or a transition at once. A notification carries only the session id and
may be lost (the connection drops, the process restarts), so every user also polls; this only makes
the common case immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "imagetraining_sessions"

_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


async def notify(conn: AsyncConnection, session_id: int) -> None:
    """Queue the wake-up for `session_id`; PostgreSQL delivers it when the transaction commits."""
    await conn.execute(_NOTIFY, {"channel": NOTIFY_CHANNEL, "payload": str(session_id)})


MAX_RETRY_SECONDS = 5.0


async def listen_forever(
    url: str,
    on_session: Callable[[int | None], None],
    *,
    retry_seconds: float,
    channel: str = NOTIFY_CHANNEL,
) -> None:
    """Call `on_session(id)` per notification until cancelled; `on_session(None)` after each (re)connect.

    The None call means "anything may have happened while we were not listening": look at everything.
    Failed connects back off (doubling up to MAX_RETRY_SECONDS) so that a database that is down for
    a minute costs a handful of log lines, not one every `retry_seconds`.
    """

    def deliver(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            session_id: int | None = int(payload)
        except ValueError:
            session_id = None
        on_session(session_id)

    delay = retry_seconds
    while True:
        conn: asyncpg.Connection | None = None
        pause = retry_seconds
        try:
            conn = await asyncpg.connect(url, timeout=10)
            closed = asyncio.Event()
            conn.add_termination_listener(lambda _c, done=closed: done.set())
            await conn.add_listener(channel, deliver)
            delay = retry_seconds
            on_session(None)
            await closed.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("LISTEN %s failed (%s); retrying in %.1fs, polling meanwhile", channel, exc, delay)
            pause, delay = delay, min(max(retry_seconds, MAX_RETRY_SECONDS), delay * 2)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1.0)
        await asyncio.sleep(pause)

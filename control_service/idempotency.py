"""Retry-safe writes: `request_id` makes CreateSession, StartSession and RestartSession idempotent.

The first answer is stored in `idempotency_keys` in the same transaction as the change it reports,
so a retry (after a lost answer, a deadline, a dropped connection) gets that answer again and
changes nothing; a concurrent call with the same id that loses the race replays the winner's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from imagetraining.db.engine import Database
from imagetraining.errors import ApiError, InvalidArgument
from imagetraining.v1 import resources_pb2 as pb

MAX_REQUEST_ID = 128

_STORED = text("SELECT session_id, response FROM idempotency_keys WHERE method = :method AND request_id = :request_id")
_STORE = text(
    """
    INSERT INTO idempotency_keys (method, request_id, session_id, response)
    VALUES (:method, :request_id, :session_id, :response)
    ON CONFLICT DO NOTHING
    RETURNING request_id
    """
)

Begin = Callable[[str, "int | None"], contextlib.AbstractAsyncContextManager[AsyncConnection]]


class _Replay(Exception):
    """Another call with the same request_id committed first: answer with what it stored."""


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument.field("request_id", f"is longer than {MAX_REQUEST_ID} characters; use a UUID")


def _id_of(name: str) -> int:
    """The id of a "sessions/{id}" name."""
    return int(name.rsplit("/", 1)[1])


class Idempotency:
    """Runs a use case's transaction once per (method, request_id)."""

    def __init__(self, db: Database, begin: Begin) -> None:
        self.db = db
        self.begin = begin

    async def stored(self, method: str, request_id: str, session_id: int | None) -> pb.Session | None:
        """The answer stored for this request_id, or None (checks the id's form first)."""
        check_request_id(request_id)
        async with self.db.reads.connect() as conn:
            row = (await conn.execute(_STORED, {"method": method, "request_id": request_id})).first()
        if row is None:
            return None
        if session_id is not None and row.session_id != session_id:
            raise InvalidArgument.field(
                "request_id", f"was already used for {method} on sessions/{row.session_id}; use a fresh one"
            )
        return pb.Session.FromString(row.response)

    async def run(
        self,
        method: str,
        request_id: str,
        session_id: int | None,
        work: Callable[[AsyncConnection], Awaitable[pb.Session]],
    ) -> pb.Session:
        """Run `work` in one transaction; with a request_id, store its answer there or replay the first."""
        if not request_id:
            async with self.begin(method, session_id) as conn:
                return await work(conn)
        stored = await self.stored(method, request_id, session_id)
        if stored is not None:
            return stored
        try:
            async with self.begin(method, session_id) as conn:
                session = await work(conn)
                params = {
                    "method": method,
                    "request_id": request_id,
                    "session_id": _id_of(session.name),
                    "response": session.SerializeToString(),
                }
                if (await conn.execute(_STORE, params)).first() is None:
                    raise _Replay
                return session
        except (_Replay, ApiError, IntegrityError):
            # A concurrent call with the same request_id may have won: its answer is the answer.
            stored = await self.stored(method, request_id, session_id)
            if stored is not None:
                return stored
            raise

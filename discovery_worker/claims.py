"""Claim, heartbeat and release of training sessions, with epoch fencing.

The session row is the lease (see docs/architecture.md). A claim bumps `epoch`; every later write of
this worker about the session starts with `fence()`, a guarded UPDATE of the session row on
`epoch = :epoch AND owner_id = :owner AND state = :state` in the same transaction as the data it
protects. When another worker has claimed the session since (our lease expired), or a client
paused, cancelled or deleted it, the fence matches no row, the caller rolls back, and nothing of the
stale worker reaches the database. Lease times use the database clock only (`now()`), so worker
clocks never matter. The statements themselves are in `imagetraining.transitions` with every other
write of a session's state, lease or counters.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from imagetraining import transitions
from imagetraining.db.engine import Database
from imagetraining.notifications import notify
from imagetraining.vectors import Provenance

if TYPE_CHECKING:
    from imagetraining.settings import Settings

ACTIVE = ("discovering", "running")


class FenceLost(Exception):
    """The session is no longer ours in the expected state: roll back, write nothing more."""


# ---- claims ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """What this worker holds: the session and the fencing epoch of its claim."""

    session_id: int
    owner_id: str
    epoch: int
    state: str
    attempts: int
    # The session's event_sequence after this claim reserved its block: this owner's stream numbers
    # its messages in (event_ceiling - SEQUENCE_BLOCK, event_ceiling].
    event_ceiling: int = 0
    # The session row as this claim left it: the progress stream's first message carries its counters.
    row: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


_WATCH = text("SELECT * FROM training_sessions WHERE id = :id")


async def fail_exhausted(db: Database, max_attempts: int) -> list[tuple[int, int]]:
    """Sessions whose workers died `max_attempts` times end `failed`; returns (id, attempts) of each."""
    async with db.engine.begin() as conn:
        rows = (await conn.execute(transitions.FAIL_EXHAUSTED, {"max_attempts": max_attempts})).all()
        for row in rows:
            await notify(conn, row.id)
    return [(int(r.id), int(r.attempts)) for r in rows]


async def claim_one(
    db: Database, owner_id: str, address: str, lease_seconds: float, busy: Sequence[int] = ()
) -> Claim | None:
    """Claim the lowest-id claimable session, or None. One statement: two workers never get the same one.

    `busy`: sessions this worker still has a runner for (one whose lease lapsed and has not noticed
    yet); they are left to other workers, so one process never runs a session twice.
    """
    params = {
        "owner": owner_id,
        "address": address,
        "lease": lease_seconds,
        "busy": list(busy),
    }
    async with db.engine.begin() as conn:
        row = (await conn.execute(transitions.CLAIM, params)).first()
        if row is not None:
            # Subscribers' relays learn the new owner now, not at their next poll.
            await notify(conn, int(row.id))
    if row is None:
        return None
    return Claim(
        int(row.id),
        owner_id,
        int(row.epoch),
        str(row.state),
        int(row.attempts),
        int(row.event_sequence),
        dict(row._mapping),
    )


async def reserve_sequences(db: Database, claim: Claim) -> int:
    """Raise the session's sequence ceiling by one more block (fenced); returns the new ceiling."""
    async with db.engine.begin() as conn:
        row = (
            await conn.execute(
                transitions.RESERVE_SEQUENCES,
                {"id": claim.session_id, "epoch": claim.epoch, "owner": claim.owner_id},
            )
        ).first()
    if row is None:
        raise LookupError("lease lost: no more sequences reserved")
    return int(row.event_sequence)


def worker_idle_timeout(settings: Settings) -> float:
    """How long PostgreSQL lets one of this worker's transactions sit idle before ending it.

    Half the lease (at least 2 s): a worker frozen inside a fenced write loses its row lock before
    its lease runs out, so another worker can take the session over at lease expiry.
    """
    return max(2.0, settings.lease_seconds / 2)


# The application_name of the workers' connections, so that one worker can find another's.
WORKER_APPLICATION = "imagetraining-worker"

# A worker frozen (SIGSTOP, a stalled VM) inside a transaction usually leaves its backend idle in
# that transaction, and idle_in_transaction_session_timeout ends it. But asyncpg prepares a statement
# with Parse/Describe/Flush, no Sync: frozen between that and the Bind that follows, the backend
# stays `active` in ClientRead without having said ReadyForQuery, so no timeout of PostgreSQL's
# applies (15 and 16 have no transaction_timeout) and the transaction's row locks stay for as long
# as the worker is frozen. Seen in CI: a frozen helper held the session row for two minutes, and
# every heartbeat and chunk of the session failed on its lock timeout. This ends such a backend of a
# worker once it has waited for its client longer than the idle timeout would have allowed.
_REAP_STUCK = text(
    """
    SELECT pid, pg_terminate_backend(pid) AS ended FROM pg_stat_activity
     WHERE datname = current_database() AND application_name = :app AND pid <> pg_backend_pid()
       AND state = 'active' AND wait_event = 'ClientRead' AND xact_start IS NOT NULL
       AND state_change < clock_timestamp() - make_interval(secs => :seconds)
    """
)


async def reap_stuck_clients(db: Database, seconds: float) -> list[int]:
    """End the backends of workers stuck mid-statement in a transaction for over `seconds` (see
    _REAP_STUCK); the pids ended. Run when a lease statement fails on its lock timeout."""
    async with db.reads.connect() as conn:
        rows = (await conn.execute(_REAP_STUCK, {"app": WORKER_APPLICATION, "seconds": seconds})).all()
    return [int(r.pid) for r in rows if r.ended]


async def heartbeat(db: Database, claim: Claim, lease_seconds: float) -> bool:
    """Extend the lease; False means it is lost (another owner, or the session is gone)."""
    async with db.engine.begin() as conn:
        row = (
            await conn.execute(
                transitions.HEARTBEAT,
                {"id": claim.session_id, "epoch": claim.epoch, "owner": claim.owner_id, "lease": lease_seconds},
            )
        ).first()
    return row is not None


async def release(db: Database, claim: Claim, *, graceful: bool) -> bool:
    """Hand the session back (owner cleared) so any worker can resume it at once. Never touches state.

    `graceful` (pause, cancel, shutdown) gives the attempt back; after an unexpected error it stays
    counted, so a session that keeps breaking workers reaches IMAGETRAINING_MAX_ATTEMPTS.
    """
    async with db.engine.begin() as conn:
        row = (
            await conn.execute(
                transitions.RELEASE,
                {"id": claim.session_id, "epoch": claim.epoch, "owner": claim.owner_id, "give_back": int(graceful)},
            )
        ).first()
    return row is not None


async def fence(conn: AsyncConnection, claim: Claim, state: str) -> dict[str, Any] | None:
    """Lock the session row for this transaction if we still own it in `state`.

    Returns the row's discovery checkpoint ({} when unset) or None when the fence failed: the caller
    must roll back and stop. Always the first statement of a worker transaction, so the session row
    is locked before job or asset rows (the same order as the control service's transitions).
    """
    row = (
        await conn.execute(
            transitions.FENCE, {"id": claim.session_id, "epoch": claim.epoch, "owner": claim.owner_id, "state": state}
        )
    ).first()
    if row is None:
        return None
    checkpoint: dict[str, Any] = dict(row.discovery_checkpoint or {})
    return checkpoint


async def pause_offline(db: Database, claim: Claim, reason: str) -> dict[str, Any] | None:
    """Fenced: pause the session because its library is offline; the committed row, or None if not ours."""
    async with db.engine.begin() as conn:
        row = (
            (
                await conn.execute(
                    transitions.PAUSE_OFFLINE,
                    {"id": claim.session_id, "epoch": claim.epoch, "owner": claim.owner_id, "reason": reason[:2000]},
                )
            )
            .mappings()
            .first()
        )
        if row is not None:
            await conn.execute(transitions.RELEASE_CHUNKS, {"id": claim.session_id})
            await notify(conn, claim.session_id)
    return None if row is None else dict(row)


async def watch_row(db: Database, claim: Claim) -> tuple[bool, str, int, dict[str, Any]]:
    """One primary-key read: do we still own the session in an active state?

    Returns (ok, state or 'deleted' or 'lease lost', the row's event_sequence, the row): the row
    carries the counters other workers' chunks committed, which the owner streams.
    """
    async with db.engine.connect() as conn:
        row = (await conn.execute(_WATCH, {"id": claim.session_id})).mappings().first()
    if row is None:
        return False, "deleted", 0, {}
    sequence = int(row["event_sequence"])
    if row["epoch"] != claim.epoch or row["owner_id"] != claim.owner_id:
        return False, "lease lost", sequence, dict(row)
    if row["state"] not in ACTIVE:
        return False, str(row["state"]), sequence, dict(row)
    return True, str(row["state"]), sequence, dict(row)


async def still_owned(db: Database, claim: Claim) -> tuple[bool, str]:
    """Do we still own the session in an active state? (ok, state or 'deleted' or 'lease lost')."""
    owned, state, _sequence, _row = await watch_row(db, claim)
    return owned, state


class RunObserver(Protocol):
    """What a runner reports, for the progress streams (issue #4 plugs its SessionEvents in here).

    Every call carries the session row as committed (`RETURNING *` of the worker's own write), so an
    observer publishes counters that are in the database, never ahead of it. Called on the event
    loop; must not block.
    """

    def progress(self, row: Mapping[str, Any]) -> None:
        """Counters changed (after each committed discovery batch or training chunk)."""

    def state(self, state: str, reason: str, row: Mapping[str, Any]) -> None:
        """The worker committed a state change (discovering -> running / failed, running -> completed / failed)."""

    def acknowledge(self, event_sequence: int) -> None:
        """This runner is about to commit a transition that leaves the row's event_sequence at this
        value (called inside the transaction, before the commit, so the watcher never mistakes the
        runner's own bump for another process's numbers)."""

    def sequence_seen(self, value: int) -> None:
        """The row's event_sequence as the runner's watcher read it (a control service may have taken
        numbers above this owner's block for messages it built from the row)."""

    async def close(self) -> None:
        """The runner ends (finished, stopped, lease lost); the session is no longer owned here."""


class StopSignal:
    """Why and whether a session runner must stop, readable from the event loop and the walk thread.

    Set by the runner's watcher (paused, cancelled, deleted, lease lost) or by shutdown; the walk
    thread polls `threading_event` through `Walk.should_stop`, coroutines wait on `event`.
    """

    def __init__(self) -> None:
        self.threading_event = threading.Event()
        self.event = asyncio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if self.threading_event.is_set():
            return
        self.reason = reason
        self.threading_event.set()
        self.event.set()

    def is_set(self) -> bool:
        return self.threading_event.is_set()


@dataclass(frozen=True, slots=True)
class RunContext:
    """Everything a phase of one claimed session needs."""

    db: Database
    claim: Claim
    stop: StopSignal
    roots: tuple[Path, ...]
    batch_size: int
    observer: RunObserver | None = None
    # The trainer of the worker's pool: images another trainer made are trained again.
    trainer: Provenance | None = None

    def progress(self, row: Mapping[str, Any]) -> None:
        if self.observer is not None:
            self.observer.progress(row)

    def state(self, row: Mapping[str, Any]) -> None:
        if self.observer is not None:
            self.observer.state(str(row["state"]), str(row["state_reason"]), row)

    def acknowledge(self, row: Mapping[str, Any]) -> None:
        if self.observer is not None:
            self.observer.acknowledge(int(row["event_sequence"]))

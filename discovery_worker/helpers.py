"""Helping: this worker trains chunks of running sessions that other workers own.

A session's owner walks it, makes its transitions, numbers its events and finishes it; its training
jobs, though, are claimable by any worker in leased chunks (discovery_worker/training.py). With the
capacity its owned sessions leave (fewer runners than IMAGETRAINING_MAX_SESSIONS_PER_WORKER), a
worker helps: it picks a running session with pending jobs that it does not own, round-robin after
the one it helped last (so one huge session does not starve a small one started later), and trains
its chunks for at most HELP_SLICE_SECONDS before picking again. IMAGETRAINING_HELP_OTHER_SESSIONS=false
turns helping off.

A helper writes nothing a fence does not allow: each chunk commit checks that the session is still
running and that the chunk is still its own (a pause releases every chunk; a lapsed lease lets
another worker take it). A small watcher stops the helper within WATCH_SECONDS of a pause or
cancel, so its pool turns to other work at once. The owner streams the helpers' progress from the
committed counters (discovery_worker/runner.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import text

from discovery_worker.claims import Claim, FenceLost, RunContext, StopSignal
from discovery_worker.library import LibraryOffline
from discovery_worker.runner import WATCH_SECONDS, ThrottledLog
from discovery_worker.training import TrainingRun
from imagetraining import transitions
from imagetraining.db import faults

if TYPE_CHECKING:
    from discovery_worker.worker import Worker

log = logging.getLogger(__name__)

# A helper trains one session this long at most before it looks for another (fairness).
HELP_SLICE_SECONDS = 5.0
# A session whose library looked offline to a helper is left alone this long (its owner pauses it).
OFFLINE_BACKOFF_SECONDS = 10.0

# The next running session with pending jobs this worker does not own, trained by this worker's
# trainer: round-robin by id after the one it helped last.
_NEXT = text(
    f"""
    SELECT s.id FROM training_sessions s
     WHERE s.state = 'running' AND s.id <> ALL(CAST(:mine AS bigint[])) AND {transitions.SAME_TRAINER}
       AND EXISTS (SELECT 1 FROM training_jobs j WHERE j.session_id = s.id AND j.state = 'pending')
     ORDER BY (s.id <= :last), s.id
     LIMIT 1
    """
)
_STATE = text("SELECT state FROM training_sessions WHERE id = :id")


class Helper:
    """The helping loop of one worker: one helped session at a time, sharing the worker's pool."""

    def __init__(self, worker: Worker, wake: asyncio.Event) -> None:
        self.worker = worker
        self.wake = wake
        self.last = 0  # the session helped last (round-robin)
        self.images = 0  # images this worker trained for other owners (tests, logs)
        self._away: dict[int, float] = {}  # session id -> loop time until which it is left alone
        self._warnings = ThrottledLog()
        self.current: StopSignal | None = None
        self._stopped = False

    def _excluded(self) -> list[int]:
        now = asyncio.get_running_loop().time()
        self._away = {sid: until for sid, until in self._away.items() if until > now}
        return sorted({*self.worker.runners, *self._away, *self.worker.cooling_down()})

    async def _next_session(self) -> int | None:
        async with self.worker.db.engine.connect() as conn:
            p = self.worker.pool.provenance
            if p is None:
                return None
            params = {"trainer_name": p.name, "trainer_version": p.version, "model_digest": p.model_digest}
            row = (await conn.execute(_NEXT, {"mine": self._excluded(), "last": self.last, **params})).first()
        return None if row is None else int(row.id)

    async def run(self, room: Callable[[], bool]) -> None:
        """Help while `room()` says the worker has capacity; sleep until woken (NOTIFY) or the poll."""
        while not self._stopped:
            session_id = None
            if room():
                try:
                    session_id = await self._next_session()
                    self._warnings.clear()
                except Exception as exc:
                    self._warnings.warn("looking for sessions to help failed: %s", faults.describe(exc))
            if session_id is None:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.worker.settings.poll_seconds)
                continue
            self.last = session_id
            if not self._stopped:
                await self.help(session_id)

    async def _watch(self, session_id: int, stop: StopSignal) -> None:
        """Stop helping within WATCH_SECONDS of the session leaving `running` (pause, cancel, end)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.event.wait(), WATCH_SECONDS)
            try:
                async with self.worker.db.engine.connect() as conn:
                    row = (await conn.execute(_STATE, {"id": session_id})).first()
            except Exception:
                continue  # the fences hold meanwhile
            if row is None or row.state != "running" or session_id in self.worker.runners:
                stop.set("no longer running" if row is None or row.state != "running" else "owned here now")

    async def help(self, session_id: int) -> None:
        """Train chunks of one session for a slice; every error stays with this session."""
        worker = self.worker
        settings = worker.settings
        stop = StopSignal()
        self.current = stop
        claim = Claim(session_id, worker.worker_id, 0, "running", 0)  # not a claim of the session: chunks only
        ctx = RunContext(worker.db, claim, stop, settings.library_roots, settings.batch_size)
        run = TrainingRun(
            ctx,
            worker.pool,
            owner=False,
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            slice_seconds=HELP_SLICE_SECONDS,
        )
        watcher = asyncio.create_task(self._watch(session_id, stop), name=f"help-watch-{session_id}")
        log.info("session %d: helping", session_id)
        try:
            await run.run()
        except FenceLost:
            pass  # paused, cancelled or finished meanwhile: nothing of the chunk was written
        except LibraryOffline as offline:
            # The owner meets the same and pauses the session; meanwhile this worker keeps away.
            log.info("session %d: not helping for now: %s", session_id, offline.reason)
            self._away[session_id] = asyncio.get_running_loop().time() + OFFLINE_BACKOFF_SECONDS
        except Exception as exc:
            self._warnings.warn("session %d: helping failed: %s", session_id, faults.describe(exc))
            self._away[session_id] = asyncio.get_running_loop().time() + OFFLINE_BACKOFF_SECONDS
        finally:
            why = stop.reason or "slice over or nothing left to claim"
            stop.set("slice over")
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.current = None
            self.images += run.images_written
            log.info("session %d: left after %d images (%s)", session_id, run.images_written, why)

    def stop(self) -> None:
        """Shutdown: the slice in progress ends at its next checkpoint, and no other begins."""
        self._stopped = True
        self.wake.set()
        if self.current is not None:
            self.current.set("shutdown")

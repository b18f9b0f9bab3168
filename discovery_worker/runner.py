"""The per-session runner: one claimed session, run phase by phase until it ends or must stop.

A runner holds one claim. Beside its phase (discovery, then training) run two small tasks:
- the heartbeat extends the lease every `heartbeat_seconds`; a heartbeat that matches no row means
  the lease is lost, and the runner stops at once;
- the watcher reads the session row (one primary-key select) every `WATCH_SECONDS`, and at once when
  a notification names the session, and stops the runner when the session is paused, cancelled,
  deleted or owned by someone else.
Stopping is cooperative and bounded: the walk thread polls the stop flag on a time cadence, the
batch loop and the training loop check it between transactions and while the pool works. Every
write is fenced anyway (claims.fence), so a runner that is slow to notice cannot commit anything.
On a stop the runner writes nothing about the state; it hands the lease back (fenced) so that, on
resume or after a shutdown, any worker picks the session up at once.

Faults a runner tells apart (docs/architecture.md, "Failure behaviour"):
- the database briefly unavailable, full, restarting, or a lost race (`imagetraining.db.faults`):
  the phase is retried with backoff under the same claim (heartbeats keep the lease, the walk
  resumes from its checkpoint); not a crash, no attempt counted;
- the library offline (`discovery_worker.library.LibraryOffline`: a root, a selected directory or a
  mount point under them missing, unreadable or replaced): the session is paused with the path in
  its reason, nothing of the interrupted batch or chunk is written, and ResumeSession finishes it;
- anything else is a crash: the attempt stays counted, the session is handed back, and this worker
  leaves it to others for a growing cool-down so it never re-claims it in a tight loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from discovery_worker import claims
from discovery_worker.claims import Claim, FenceLost, RunContext, StopSignal
from discovery_worker.discovery import run_discovery
from discovery_worker.faultpoints import fault_point
from discovery_worker.library import LibraryOffline
from discovery_worker.training import TrainingRun
from imagetraining import metrics, tracing
from imagetraining.db import faults
from imagetraining.logs import session_name
from imagetraining.names import session_name as name_of

if TYPE_CHECKING:
    from discovery_worker.worker import Worker

log = logging.getLogger(__name__)

# How often a runner re-reads its session row (pause / cancel / delete / takeover are seen this fast).
WATCH_SECONDS = 0.25
# Backoff of a phase retried after a transient database error: first wait, then doubled up to the cap.
RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
# The counters other workers' chunks move; the watcher streams them when they change.
_TRAINING_COUNTERS = ("processed_images", "failed_images", "skipped_images")
# A repeated warning (database away) is logged once, then at most this often.
WARN_EVERY_SECONDS = 30.0


class ThrottledLog:
    """Log a repeating warning once, then at most every WARN_EVERY_SECONDS (a database outage would
    otherwise write four lines a second per session)."""

    def __init__(self) -> None:
        self._next = 0.0
        self.suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} similar since)"
        log.warning(message, *args)
        self._next = now + WARN_EVERY_SECONDS
        self.suppressed = 0

    def clear(self) -> None:
        self._next = 0.0
        self.suppressed = 0


class SessionRunner:
    """Runs one claimed session to completed / failed, or until it must stop."""

    def __init__(self, worker: Worker, claim: Claim) -> None:
        self.worker = worker
        self.claim = claim
        self.stop = StopSignal()
        self._poke = asyncio.Event()
        self._counters_seen: tuple[object, ...] = ()
        self._hb_warnings = ThrottledLog()
        self._watch_warnings = ThrottledLog()
        self._db_warnings = ThrottledLog()
        # Set when the runner ended by a crash (not a stop, not a finish): the worker cools down.
        self.crashed = False
        # False once the runner wrote the session's end itself (finished, failed, paused offline).
        self._hand_back_at_end = True
        self.ctx = RunContext(
            db=worker.db,
            claim=claim,
            stop=self.stop,
            roots=worker.settings.library_roots,
            batch_size=worker.settings.batch_size,
            observer=worker.observe(claim) if worker.observe is not None else None,
            trainer=worker.pool.provenance,
        )

    @property
    def name(self) -> str:
        return f"session {self.claim.session_id}"

    def poke(self) -> None:
        """A notification named this session: re-read its row now."""
        self._poke.set()

    async def _heartbeat(self) -> None:
        settings = self.worker.settings
        while True:
            await asyncio.sleep(settings.heartbeat_seconds)
            if self.worker.heartbeats_held:
                continue
            try:
                alive = await claims.heartbeat(self.worker.db, self.claim, settings.lease_seconds)
            except Exception as exc:  # database away: keep trying; the lease lapses if it stays away
                metrics.database_error(exc)
                self._hb_warnings.warn("%s: heartbeat failed: %s", self.name, faults.describe(exc))
                if faults.sqlstate(exc) == "55P03":  # behind a row lock: maybe a frozen worker's (claims.py)
                    await self._reap_stuck_clients()
                continue
            self._hb_warnings.clear()
            if not alive:
                metrics.LEASE_LOSSES.labels(lease="session").inc()
                self.stop.set("lease lost")
                return

    async def _reap_stuck_clients(self) -> None:
        try:
            ended = await claims.reap_stuck_clients(self.worker.db, claims.worker_idle_timeout(self.worker.settings))
        except Exception as exc:  # e.g. not allowed to end another role's backend: the lease logic goes on
            log.debug("%s: could not look for stuck workers: %s", self.name, faults.describe(exc))
            return
        if ended:
            log.warning(
                "%s: ended %d database connection(s) of a worker frozen mid-statement, holding this session's row: %s",
                self.name,
                len(ended),
                ended,
            )

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), WATCH_SECONDS)
            self._poke.clear()
            try:
                owned, state, sequence, row = await claims.watch_row(self.worker.db, self.claim)
            except Exception as exc:
                self._watch_warnings.warn("%s: state check failed: %s", self.name, faults.describe(exc))
                continue
            self._watch_warnings.clear()
            if self.ctx.observer is not None:
                self.ctx.observer.sequence_seen(sequence)
                counters = tuple(row.get(k) for k in _TRAINING_COUNTERS)
                if owned and state == "running" and counters != self._counters_seen:
                    # Helpers' chunks (other workers) moved the committed counters: stream them.
                    self._counters_seen = counters
                    self.ctx.observer.progress(row)
            if not owned:
                self.stop.set(state)
                return

    async def run(self) -> None:
        # Every line this task and the tasks it starts log is about this session (a task of its own:
        # worker.py starts one per runner, so nothing outside it sees the value).
        session_name.set(name_of(self.claim.session_id))
        started = time.monotonic()
        helpers = [
            asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.claim.session_id}"),
            asyncio.create_task(self._watch(), name=f"watch-{self.claim.session_id}"),
        ]
        try:
            fault_point("after_claim")
            with tracing.session_span(
                "session.run",
                str(self.claim.row.get("trace_context") or ""),
                **{
                    "imagetraining.session": name_of(self.claim.session_id),
                    "imagetraining.attempt": self.claim.attempts,
                },
            ):
                await self._run_phases(started)
        except FenceLost:
            try:
                _owned, why = await claims.still_owned(self.worker.db, self.claim)
            except Exception:
                why = "the session changed under this worker"
            self.stop.set(why)
        except Exception:
            # Not a stop: the attempt stays counted, so a session that keeps breaking its workers ends
            # `failed` after IMAGETRAINING_MAX_ATTEMPTS claims.
            log.exception("%s: runner failed; handing the session back", self.name)
            self.crashed = True
            self._hand_back_at_end = False
            with contextlib.suppress(Exception):
                await claims.release(self.worker.db, self.claim, graceful=False)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self._hand_back_at_end:
                await self._hand_back()
            if self.ctx.observer is not None:
                try:
                    await self.ctx.observer.close()
                except Exception:
                    log.exception("%s: progress observer failed to close", self.name)

    async def _run_phases(self, started: float) -> None:
        """Run phases until the session ends or the runner must stop; retry transient database errors.

        A retry starts the phase again from what is committed (the walk from its checkpoint, training
        from the pending jobs): nothing of the failed transaction was written, so nothing is counted
        twice. The claim is kept meanwhile: heartbeats extend the lease while the database answers,
        and if it stays away longer than the lease, fencing makes sure this runner writes nothing.
        """
        backoff = RETRY_FIRST_SECONDS
        while not self.stop.is_set():
            try:
                if await self._phase(started):
                    return
                backoff = RETRY_FIRST_SECONDS
                self._db_warnings.clear()
            except LibraryOffline as offline:
                await self._pause_offline(offline)
                return
            except Exception as exc:
                if not faults.is_transient(exc):
                    raise
                self._db_warnings.warn(
                    "%s: database unavailable (%s); retrying with backoff, not counted as a crash",
                    self.name,
                    faults.describe(exc),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.event.wait(), backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS)

    async def _phase(self, started: float) -> bool:
        """Run the phase the session is in now; True when the runner is done (finished or stopped)."""
        owned, state = await claims.still_owned(self.worker.db, self.claim)
        if not owned:
            self.stop.set(state)
            return True
        if state == "discovering":
            with tracing.tracer.start_as_current_span("session.discovery"):
                result, total, totals, last = await run_discovery(self.ctx)
            if result == "stopped":
                return True
            counts = (
                f"{last.directories_scanned} directories, {last.files_seen} files, "
                f"{last.images_found} images, {last.unreadable} unreadable"
                if last is not None
                else ""
            )
            if result == "failed":
                self._hand_back_at_end = False
                log.info("%s: discovery found no images (%s) -> failed", self.name, counts)
                return True
            log.info(
                "%s: discovery done in %.1fs: %s (this pass: %d new, %d changed, %d unchanged) -> running, %d jobs",
                self.name,
                time.monotonic() - started,
                counts,
                totals.new,
                totals.changed,
                totals.unchanged,
                total,
            )
            return False
        settings = self.worker.settings
        with tracing.tracer.start_as_current_span("session.training"):
            final = await TrainingRun(
                self.ctx,
                self.worker.pool,
                lease_seconds=settings.lease_seconds,
                heartbeat_seconds=settings.heartbeat_seconds,
            ).run()
        if final is None:
            return True
        self._hand_back_at_end = False
        failures = ", ".join(f"{k or 'unknown'} {v}" for k, v in final["failures"].items()) or "none"
        log.info(
            "%s: %s in %.1fs: %d processed, %d failed (%s), %d skipped of %d",
            self.name,
            final["state"],
            time.monotonic() - started,
            final["processed_images"],
            final["failed_images"],
            failures,
            final["skipped_images"],
            final["total_images"],
        )
        return True

    async def _pause_offline(self, offline: LibraryOffline) -> None:
        """The library went away: pause the session with the path in its reason (fenced), retrying
        while the database is away. Nothing of the interrupted batch or chunk was written."""
        backoff = RETRY_FIRST_SECONDS
        while not self.stop.is_set():
            try:
                row = await claims.pause_offline(self.worker.db, self.claim, offline.reason)
            except Exception as exc:
                if not faults.is_transient(exc):
                    raise
                self._db_warnings.warn("%s: cannot record the pause (%s); retrying", self.name, faults.describe(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.event.wait(), backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS)
                continue
            if row is None:
                raise FenceLost
            self._hand_back_at_end = False
            log.warning("%s: %s", self.name, offline.reason)
            self.ctx.state(row)
            return

    async def _hand_back(self) -> None:
        reason = self.stop.reason or "stopped"
        try:
            released = await claims.release(self.worker.db, self.claim, graceful=True)
        except Exception as exc:
            log.warning("%s: %s; could not release the lease (%s): it expires by itself", self.name, reason, exc)
            return
        log.info(
            "%s: stopped (%s); %s",
            self.name,
            reason,
            "lease released" if released else "lease already gone: nothing written",
        )

"""The claim loop and the per-session runner.

One `Worker` per process: it claims up to `max_sessions_per_worker` sessions (claims.claim_one), runs
each in a `SessionRunner` task and shares one `TrainingPool` among them. It wakes up on
`NOTIFY imagetraining_sessions` (a raw asyncpg LISTEN connection) and polls every `poll_seconds` as
the fallback, so a lost notification delays a session by at most the poll interval.

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
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from discovery_worker import claims
from discovery_worker.claims import Claim, FenceLost, RunContext, RunObserver, StopSignal
from discovery_worker.discovery import run_discovery
from discovery_worker.faultpoints import fault_point
from discovery_worker.library import LibraryOffline
from discovery_worker.pool import TrainingPool
from discovery_worker.training import TrainingRun
from imagetraining.db import faults
from imagetraining.db.engine import Database
from imagetraining.notifications import listen_forever
from imagetraining.settings import Settings

log = logging.getLogger(__name__)

# How often a runner re-reads its session row (pause / cancel / delete / takeover are seen this fast).
WATCH_SECONDS = 0.25
# How long shutdown waits for runners to reach a checkpoint and hand their sessions back.
STOP_TIMEOUT_SECONDS = 10.0
# Backoff of a phase retried after a transient database error: first wait, then doubled up to the cap.
RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
# A session whose runner crashed here is left to other workers for this long, doubled per crash.
COOLDOWN_FIRST_SECONDS = 1.0
COOLDOWN_MAX_SECONDS = 60.0
# A repeated warning (database away) is logged once, then at most this often.
WARN_EVERY_SECONDS = 30.0


class _Warnings:
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


def worker_idle_timeout(settings: Settings) -> float:
    """How long PostgreSQL lets one of this worker's transactions sit idle before ending it.

    Half the lease (at least 2 s): a worker frozen inside a fenced write loses its row lock before
    its lease runs out, so another worker can take the session over at lease expiry.
    """
    return max(2.0, settings.lease_seconds / 2)


def worker_lock_timeout(settings: Settings) -> float:
    """How long a worker statement waits for a row lock: a third of the lease (at least 1 s), so a
    heartbeat stuck behind a long batch fails and is retried well before the lease runs out."""
    return max(1.0, settings.lease_seconds / 3)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SessionRunner:
    """Runs one claimed session to completed / failed, or until it must stop."""

    def __init__(self, worker: Worker, claim: Claim) -> None:
        self.worker = worker
        self.claim = claim
        self.stop = StopSignal()
        self._poke = asyncio.Event()
        self._hb_warnings = _Warnings()
        self._watch_warnings = _Warnings()
        self._db_warnings = _Warnings()
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
                self._hb_warnings.warn("%s: heartbeat failed: %s", self.name, faults.describe(exc))
                continue
            self._hb_warnings.clear()
            if not alive:
                self.stop.set("lease lost")
                return

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), WATCH_SECONDS)
            self._poke.clear()
            try:
                owned, state, sequence = await claims.watch_row(self.worker.db, self.claim)
            except Exception as exc:
                self._watch_warnings.warn("%s: state check failed: %s", self.name, faults.describe(exc))
                continue
            self._watch_warnings.clear()
            if self.ctx.observer is not None:
                self.ctx.observer.sequence_seen(sequence)
            if not owned:
                self.stop.set(state)
                return

    async def run(self) -> None:
        started = time.monotonic()
        helpers = [
            asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.claim.session_id}"),
            asyncio.create_task(self._watch(), name=f"watch-{self.claim.session_id}"),
        ]
        try:
            fault_point("after_claim")
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
        final = await TrainingRun(self.ctx, self.worker.pool).run()
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


class Worker:
    """The claim loop of one worker process."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        pool: TrainingPool,
        *,
        address: str,
        observe: Callable[[Claim], RunObserver] | None = None,
    ) -> None:
        self.settings = settings
        # Seam for the progress streams: called once per claim; the runner reports to what it returns.
        self.observe = observe
        self.db = db
        self.pool = pool
        self.address = address
        self.worker_id = settings.worker_id or default_worker_id()
        self.runners: dict[int, SessionRunner] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # session id -> (monotonic time until which this worker leaves it alone, crashes in a row here)
        self._cooldown: dict[int, tuple[float, int]] = {}
        self._claim_warnings = _Warnings()
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        # Test hook: hold heartbeats back so that the lease expires while the runner keeps working.
        self.heartbeats_held = False

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="claim-loop")
        self._listen_task = asyncio.create_task(self._listen(), name="listen")
        log.info("worker %s started at %s (up to %d sessions)", self.worker_id, self.address, self.max_sessions)

    @property
    def max_sessions(self) -> int:
        return self.settings.max_sessions_per_worker

    def _on_notify(self, session_id: int | None) -> None:
        self._wake.set()
        runner = self.runners.get(session_id) if session_id is not None else None
        if runner is not None:
            runner.poke()

    async def _listen(self) -> None:
        """Wake-ups only; the poll in `_loop` covers lost notifications and a lost connection."""
        await listen_forever(self.db.url, self._on_notify, retry_seconds=self.settings.poll_seconds)

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._fill()
                self._claim_warnings.clear()
            except Exception as exc:
                self._claim_warnings.warn("claiming failed: %s", faults.describe(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    async def _fill(self) -> None:
        while not self._stopping and len(self.runners) < self.max_sessions:
            for session_id, attempts in await claims.fail_exhausted(self.db, self.settings.max_attempts):
                log.warning("session %d: worker crashed %d times on this session -> failed", session_id, attempts)
            claim = await claims.claim_one(
                self.db, self.worker_id, self.address, self.settings.lease_seconds, busy=self._busy()
            )
            if claim is None:
                return
            if self._stopping:  # shutdown began while claiming: give it straight back
                await claims.release(self.db, claim, graceful=True)
                return
            log.info(
                "session %d: claimed (%s, epoch %d, attempt %d)",
                claim.session_id,
                claim.state,
                claim.epoch,
                claim.attempts,
            )
            runner = SessionRunner(self, claim)
            self.runners[claim.session_id] = runner
            task = asyncio.create_task(runner.run(), name=f"session-{claim.session_id}")
            self._tasks[claim.session_id] = task
            task.add_done_callback(self._on_done(claim.session_id, runner))

    def _busy(self) -> list[int]:
        """Sessions not to claim now: those with a runner here, and those cooling down after a crash."""
        now = time.monotonic()
        for sid in [sid for sid, (until, _n) in self._cooldown.items() if until <= now and sid not in self.runners]:
            # Expired: claimable again, but the crash count stays until the session runs cleanly here.
            self._cooldown[sid] = (0.0, self._cooldown[sid][1])
        return sorted({*self.runners, *(sid for sid, (until, _n) in self._cooldown.items() if until > now)})

    def _on_done(self, session_id: int, runner: SessionRunner) -> Any:
        def finished(_task: asyncio.Task[None]) -> None:
            if self.runners.get(session_id) is runner:
                del self.runners[session_id]
                self._tasks.pop(session_id, None)
            if runner.crashed:
                crashes = self._cooldown.get(session_id, (0.0, 0))[1] + 1
                delay = min(COOLDOWN_FIRST_SECONDS * 2 ** (crashes - 1), COOLDOWN_MAX_SECONDS)
                self._cooldown[session_id] = (time.monotonic() + delay, crashes)
                log.info(
                    "session %d: left to other workers for %.0f s after %d crash(es) here", session_id, delay, crashes
                )
            else:
                self._cooldown.pop(session_id, None)
            self._wake.set()

        return finished

    async def stop(self) -> None:
        """Stop claiming, stop every runner at its next checkpoint, hand the leases back."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        for runner in list(self.runners.values()):
            runner.stop.set("shutdown")
        tasks = list(self._tasks.values())
        if tasks:
            _done, slow = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECONDS)
            for task in slow:
                task.cancel()
        for background in (self._loop_task, self._listen_task):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await background
        log.info("worker %s stopped", self.worker_id)


@dataclass
class WorkerHandle:
    """A running worker process's parts (in-process use: tests, devrun); `stop()` shuts all down."""

    settings: Settings
    db: Database
    pool: TrainingPool
    server: Any  # imagetraining.rpc.ServerHandle
    worker: Worker

    @property
    def port(self) -> int:
        return int(self.server.port)

    async def stop(self) -> None:
        await self.server.stop()  # health NOT_SERVING, then worker.stop (a shutdown hook), then the server
        await self.pool.close()
        await self.db.dispose()


async def run_worker(
    settings: Settings,
    *,
    migrate: bool = True,
    servicer: Any = None,
    observe: Callable[[Claim], RunObserver] | None = None,
) -> WorkerHandle:
    """Start everything a worker process runs: database, migrations, pool, gRPC server, claim loop.

    By default the worker serves its sessions' progress streams (discovery_worker.streams); `servicer`
    (a DiscoveryWorkerServiceServicer) and `observe` replace them (tests).
    """
    from discovery_worker.server import advertised_address, start_worker_server
    from discovery_worker.streams import DiscoveryWorkerServicer, SessionStreams
    from imagetraining.db.engine import resolve_url
    from imagetraining.db.migrate import upgrade

    settings.validate_worker()
    url = await resolve_url(settings)
    db = Database.connect(
        url,
        pool_size=max(4, 2 * settings.max_sessions_per_worker + 2),
        custom_plans=True,
        lock_timeout=worker_lock_timeout(settings),
        idle_in_transaction_timeout=worker_idle_timeout(settings),
    )
    try:
        if migrate:
            await upgrade(db.engine)
        pool = TrainingPool(
            settings.pool_size,
            max_file_bytes=settings.max_file_bytes,
            max_image_pixels=settings.max_image_pixels,
            trainer_spec=settings.trainer,
            roots=settings.library_roots,
        )
        await pool.start()
    except BaseException:
        await db.dispose()
        raise
    streams: SessionStreams | None = None
    if servicer is None:
        # With a custom `observe` (tests) the registry stays empty: every caller is told the session
        # is not owned here, as the contract says for a worker that serves no stream of it.
        streams = SessionStreams(
            db, max_subscribers=settings.max_subscribers, idle_seconds=settings.subscriber_idle_seconds
        )
        servicer = DiscoveryWorkerServicer(streams, write_timeout=settings.subscriber_idle_seconds)
        if observe is None:
            observe = streams.observe
    try:
        server = await start_worker_server(settings, servicer)
    except BaseException:
        await pool.close()
        await db.dispose()
        raise
    worker = Worker(settings, db, pool, address=advertised_address(settings, server.port), observe=observe)
    if streams is not None:

        async def refuse_new_streams() -> None:
            streams.closing = True

        server.on_shutdown.append(refuse_new_streams)
    server.on_shutdown.append(worker.stop)
    worker.start()
    return WorkerHandle(settings=settings, db=db, pool=pool, server=server, worker=worker)

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
from discovery_worker.claims import Claim, RunContext, RunObserver, StopSignal, fault_point
from discovery_worker.discovery import FenceLost, run_discovery
from discovery_worker.pool import TrainingPool
from discovery_worker.training import Trainer
from imagetraining.db.engine import Database
from imagetraining.notifications import listen_forever
from imagetraining.settings import Settings

log = logging.getLogger("discovery_worker")

# How often a runner re-reads its session row (pause / cancel / delete / takeover are seen this fast).
WATCH_SECONDS = 0.25
# How long shutdown waits for runners to reach a checkpoint and hand their sessions back.
STOP_TIMEOUT_SECONDS = 10.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SessionRunner:
    """Runs one claimed session to completed / failed, or until it must stop."""

    def __init__(self, worker: Worker, claim: Claim) -> None:
        self.worker = worker
        self.claim = claim
        self.stop = StopSignal()
        self._poke = asyncio.Event()
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
                log.warning("%s: heartbeat failed: %s", self.name, exc)
                continue
            if not alive:
                self.stop.set("lease lost")
                return

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), WATCH_SECONDS)
            self._poke.clear()
            try:
                owned, state = await claims.still_owned(self.worker.db, self.claim)
            except Exception as exc:
                log.warning("%s: state check failed: %s", self.name, exc)
                continue
            if not owned:
                self.stop.set(state)
                return

    async def run(self) -> None:
        started = time.monotonic()
        helpers = [
            asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.claim.session_id}"),
            asyncio.create_task(self._watch(), name=f"watch-{self.claim.session_id}"),
        ]
        handed_back = True
        try:
            fault_point("after_claim")
            if self.claim.state == "discovering":
                state, total, totals, last = await run_discovery(self.ctx)
                if state == "stopped":
                    return
                counts = (
                    f"{last.directories_scanned} directories, {last.files_seen} files, "
                    f"{last.images_found} images, {last.unreadable} unreadable"
                    if last is not None
                    else ""
                )
                if state == "failed":
                    handed_back = False
                    log.info("%s: discovery found no images (%s) -> failed", self.name, counts)
                    return
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
            final = await Trainer(self.ctx, self.worker.pool).run()
            if final is None:
                return
            handed_back = False
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
        except FenceLost:
            try:
                _owned, why = await claims.still_owned(self.worker.db, self.claim)
            except Exception:
                why = "the session changed under this worker"
            self.stop.set(why)
        except Exception:
            # Not a stop: the attempt stays counted, so a session that keeps breaking its worker ends
            # `failed` after IMAGETRAINING_MAX_ATTEMPTS claims.
            log.exception("%s: runner failed; handing the session back", self.name)
            handed_back = False
            with contextlib.suppress(Exception):
                await claims.release(self.worker.db, self.claim, graceful=False)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if handed_back:
                await self._hand_back()
            if self.ctx.observer is not None:
                try:
                    await self.ctx.observer.close()
                except Exception:
                    log.exception("%s: progress observer failed to close", self.name)

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
            except Exception as exc:
                log.warning("claiming failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    async def _fill(self) -> None:
        while not self._stopping and len(self.runners) < self.max_sessions:
            for session_id, attempts in await claims.fail_exhausted(self.db, self.settings.max_attempts):
                log.warning("session %d: worker crashed %d times on this session -> failed", session_id, attempts)
            claim = await claims.claim_one(
                self.db, self.worker_id, self.address, self.settings.lease_seconds, busy=list(self.runners)
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

    def _on_done(self, session_id: int, runner: SessionRunner) -> Any:
        def finished(_task: asyncio.Task[None]) -> None:
            if self.runners.get(session_id) is runner:
                del self.runners[session_id]
                self._tasks.pop(session_id, None)
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
    db = Database.connect(url, pool_size=max(4, 2 * settings.max_sessions_per_worker + 2), custom_plans=True)
    try:
        if migrate:
            await upgrade(db.engine)
        pool = TrainingPool(
            settings.pool_size,
            max_file_bytes=settings.max_file_bytes,
            max_image_pixels=settings.max_image_pixels,
            trainer_spec=settings.trainer,
        )
        await pool.start()
    except BaseException:
        await db.dispose()
        raise
    streams: SessionStreams | None = None
    if servicer is None and observe is None:
        streams = SessionStreams(
            db, max_subscribers=settings.max_subscribers, idle_seconds=settings.subscriber_idle_seconds
        )
        servicer = DiscoveryWorkerServicer(streams, write_timeout=settings.subscriber_idle_seconds)
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

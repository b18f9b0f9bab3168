"""The claim loop: one `Worker` per process.

It claims up to `max_sessions_per_worker` sessions (claims.claim_one), runs each in a
`SessionRunner` task (discovery_worker/runner.py) and shares one `TrainingPool` among them. It wakes
up on `NOTIFY imagetraining_sessions` (a raw asyncpg LISTEN connection) and polls every
`poll_seconds` as the fallback, so a lost notification delays a session by at most the poll
interval. A runner that crashed makes this worker leave its session to others for a growing
cool-down, so it never re-claims it in a tight loop.
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

import asyncpg
from sqlalchemy import text

from discovery_worker import claims
from discovery_worker.claims import Claim, RunObserver, worker_idle_timeout
from discovery_worker.helpers import Helper
from discovery_worker.pool import TrainingPool
from discovery_worker.runner import SessionRunner, ThrottledLog
from imagetraining import metrics
from imagetraining.db import faults
from imagetraining.db.engine import Database, to_libpq_url
from imagetraining.notifications import listen_forever
from imagetraining.settings import Settings
from imagetraining.vectors import build_hnsw_index, hnsw_index_name

log = logging.getLogger(__name__)

# How long shutdown waits for runners to reach a checkpoint and hand their sessions back.
STOP_TIMEOUT_SECONDS = 10.0
# A session whose runner crashed here is left to other workers for this long, doubled per crash.
COOLDOWN_FIRST_SECONDS = 1.0
COOLDOWN_MAX_SECONDS = 60.0


_ANNOUNCE_TRAINER = text(
    """
    INSERT INTO worker_trainers (worker_id, trainer_name, trainer_version, model_digest, embedding_dimension)
    VALUES (:worker, :name, :version, :digest, :dimension)
    ON CONFLICT (worker_id) DO UPDATE
       SET trainer_name = excluded.trainer_name, trainer_version = excluded.trainer_version,
           model_digest = excluded.model_digest, embedding_dimension = excluded.embedding_dimension,
           announced_at = now()
    """
)


def worker_lock_timeout(settings: Settings) -> float:
    """How long a worker statement waits for a row lock: a third of the lease (at least 1 s), so a
    heartbeat stuck behind a long batch fails and is retried well before the lease runs out."""
    return max(1.0, settings.lease_seconds / 3)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
        self._claim_warnings = ThrottledLog()
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        # Test hook: hold heartbeats back so that the lease expires while the runner keeps working.
        self.heartbeats_held = False
        self._help_wake = asyncio.Event()
        self.helper = Helper(self, self._help_wake)
        self._help_task: asyncio.Task[None] | None = None
        self._index_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="claim-loop")
        self._listen_task = asyncio.create_task(self._listen(), name="listen")
        if self.settings.help_other_sessions:
            self._help_task = asyncio.create_task(self.helper.run(self._has_room), name="help-loop")
        log.info(
            "worker %s started at %s (up to %d sessions%s)",
            self.worker_id,
            self.address,
            self.max_sessions,
            ", helping others with the room left" if self.settings.help_other_sessions else "",
        )

    async def announce_trainer(self) -> None:
        """Record which trainer this worker runs: the newest announcement is the configured trainer
        that GetSession counts stale images against. A database away now only costs the record."""
        p = self.pool.provenance
        if p is None:
            return
        try:
            async with self.db.engine.begin() as conn:
                await conn.execute(
                    _ANNOUNCE_TRAINER,
                    {
                        "worker": self.worker_id,
                        "name": p.name,
                        "version": p.version,
                        "digest": p.model_digest,
                        "dimension": p.dimension,
                    },
                )
        except Exception as exc:
            log.warning("worker %s: could not record its trainer: %s", self.worker_id, exc)
        if p.dimension:
            self._index_task = asyncio.create_task(self._index_embeddings(p.dimension), name="embedding-index")

    async def _index_embeddings(self, dimension: int) -> None:
        """Where pgvector is installed, the HNSW index FindSimilarImages uses for this dimension's
        searches over every image (control_service/search.py). Built CONCURRENTLY in the background:
        discovery and training writes go on meanwhile; a failure costs only the index (search is exact
        without it) and is tried again at the next start."""
        name = hnsw_index_name(dimension)
        try:
            conn = await asyncpg.connect(to_libpq_url(self.db.url), timeout=10)
            try:
                if await build_hnsw_index(conn, dimension):
                    log.info("worker %s: built the HNSW index %s for similarity search", self.worker_id, name)
            finally:
                await conn.close()
        except Exception as exc:
            log.warning(
                "worker %s: the HNSW index %s was not built (search stays exact): %s", self.worker_id, name, exc
            )

    def _has_room(self) -> bool:
        """Capacity for helping: fewer owned sessions than the worker may run."""
        return not self._stopping and len(self.runners) < self.max_sessions

    def cooling_down(self) -> list[int]:
        """Sessions this worker leaves alone for now after a crash here."""
        now = time.monotonic()
        return [sid for sid, (until, _n) in self._cooldown.items() if until > now]

    @property
    def max_sessions(self) -> int:
        return self.settings.max_sessions_per_worker

    def _on_notify(self, session_id: int | None) -> None:
        self._wake.set()
        self._help_wake.set()
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
            metrics.SESSION_CLAIMS.labels(kind="new" if claim.attempts <= 1 else "takeover").inc()
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
        self.helper.stop()
        tasks = list(self._tasks.values())
        if self._help_task is not None:
            tasks.append(self._help_task)
        if tasks:
            _done, slow = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECONDS)
            for task in slow:
                task.cancel()
        for background in (self._loop_task, self._listen_task, self._help_task, self._index_task):
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
        application_name=claims.WORKER_APPLICATION,
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
            batch_size=settings.train_batch_size,
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
    metrics.watch_engines([("writes", lambda: db.engine.pool), ("reads", lambda: db.reads.pool)])
    worker = Worker(settings, db, pool, address=advertised_address(settings, server.port), observe=observe)
    if streams is not None:

        async def refuse_new_streams() -> None:
            streams.closing = True

        server.on_shutdown.append(refuse_new_streams)
    server.on_shutdown.append(worker.stop)
    await worker.announce_trainer()
    worker.start()
    return WorkerHandle(settings=settings, db=db, pool=pool, server=server, worker=worker)

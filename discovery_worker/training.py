"""Training (state `running`): pending jobs in leased chunks -> process pool -> fenced result writes.

Any worker with pool capacity trains a running session, whether it owns the session or helps
(discovery_worker/helpers.py); the owner alone finishes it. Per chunk:
- claim: up to `chunk_size` pending jobs go `running` under a fresh token and a lease
  (`transitions.CLAIM_CHUNK`, `FOR UPDATE SKIP LOCKED`: two workers never take the same job); jobs of
  chunks whose lease lapsed go back to pending first (`RECLAIM_EXPIRED_CHUNKS`). The run's chunks in
  flight are kept alive by a heartbeat (`EXTEND_CHUNKS`);
- evaluate: jobs whose asset already has a `dhash-64` and a digest computed from its current (size,
  mtime_ns) are not decoded again; the others go to `TrainingPool.process` (never raises for an
  image);
- write, one transaction: the session still running (`TRAINING_FENCE`, which also serialises every
  chunk commit of the session on its row), the chunk still ours (`CHUNK_FENCE`: a pause released it,
  or its lease lapsed and another worker took it: then nothing is written), then the assets (hash,
  digest, size, format, features), the jobs (completed / failed), the counters and per-subdirectory
  trained counts in one set-based statement (`RECORD_OUTCOMES`).

Chunks are sized to about CHUNK_SECONDS of the pool's work, at least IMAGES_PER_PROCESS images per
pool process, so a pause is noticed within a fraction of a second and a chunk lost to a crash costs
little; two chunks are in flight per run (one decoded while the previous one is written).

Duplicates are decided once training has ended, from every worker's results, by the owner
(`imagetraining.duplicates.resolve`, applied with `APPLY_DUPLICATE_LABELS` in the transaction that
finishes the session): the same library gives the same kept copies whatever the number of workers
and the order of their commits. Until then an exact or near duplicate counts as processed.

A chunk with images that vanished or could not be read is only written after the library check
(discovery_worker/library.py) finds every anchor on their way in place; otherwise the chunk is
dropped unwritten and `LibraryOffline` pauses the session: a NAS that drops never marks thousands
of jobs `vanished`, and they are trained when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from discovery_worker.claims import FenceLost, RunContext, fence
from discovery_worker.faultpoints import fault_point
from discovery_worker.hashing import HASH_ALGORITHM, ImageResult
from discovery_worker.library import SUSPECT_ERROR_CLASSES, Anchor, Anchors
from discovery_worker.plan import Plan, load_plan, nested_ids
from discovery_worker.pool import TrainingPool
from imagetraining import metrics, transitions
from imagetraining.duplicates import Label, Trained, resolve
from imagetraining.notifications import notify
from imagetraining.vectors import Provenance

log = logging.getLogger(__name__)

# Chunk sizing: at least this many images per pool process, and as many more as the pool finishes in
# about CHUNK_SECONDS (fast images: fewer, larger transactions; slow ones: small chunks). A stop never
# waits for a chunk: the pool call is cancelled at once and the chunk is released or expires.
IMAGES_PER_PROCESS = 4
CHUNK_SECONDS = 0.25
MAX_CHUNK = 1000
# How often the owner looks again while the last chunks are held by other workers.
WAIT_FOR_HELPERS_SECONDS = 0.25
# Duplicate labels are applied this many jobs per statement.
LABELS_PER_STATEMENT = 10_000


def _array_literal(vector: Sequence[float] | None) -> str | None:
    """A float4[] literal ('{0.1,...}'): one text per image, so unnest keeps the vectors apart."""
    if vector is None:
        return None
    return "{" + ",".join(f"{x:.9g}" for x in vector) + "}"


class _ChunkLost(Exception):
    """The chunk's jobs are no longer ours: roll back, write nothing of it."""


class _NotFinished(Exception):
    """FINISH found a job not done: roll the duplicate labels back too."""


@dataclass(frozen=True, slots=True)
class PendingJob:
    job_id: int
    asset_id: int
    path: str
    size_bytes: int
    mtime_ns: int
    stored: ImageResult | None  # a still-valid stored hash and training (same file, same trainer): no decode


@dataclass(slots=True)
class Chunk:
    """Jobs this run holds under one token until their results are written (or the lease lapses)."""

    token: str
    jobs: list[PendingJob]
    claimed_at: float = field(default_factory=time.monotonic)

    @property
    def job_ids(self) -> list[int]:
        return [job.job_id for job in self.jobs]


_WRITE_ASSETS = text(
    """
    UPDATE image_assets a
       SET perceptual_hash = r.perceptual_hash, hash_algorithm = :algorithm, content_digest = r.digest,
           width = r.width, height = r.height, format = r.format,
           features = CAST(r.features AS jsonb), embedding = CAST(r.embedding AS real[]),
           trainer_name = :trainer_name, trainer_version = :trainer_version, model_digest = :model_digest,
           hashed_size_bytes = r.size_bytes, hashed_mtime_ns = r.mtime_ns, update_time = now()
      FROM unnest(CAST(:asset_ids AS bigint[]), CAST(:hashes AS text[]), CAST(:digests AS text[]),
                  CAST(:widths AS int[]), CAST(:heights AS int[]), CAST(:formats AS text[]),
                  CAST(:features AS text[]), CAST(:embeddings AS text[]), CAST(:sizes AS bigint[]),
                  CAST(:mtimes AS bigint[]))
           AS r(asset_id, perceptual_hash, digest, width, height, format, features, embedding, size_bytes, mtime_ns)
     WHERE a.id = r.asset_id
    """
)

_UNFINISHED = text(
    """
    SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'running') AS running
      FROM training_jobs WHERE session_id = :id AND state IN ('pending', 'running')
    """
)

# What duplicate resolution reads: every trained job of the session with its asset's hash and size.
_TRAINED = text(
    """
    SELECT j.id AS job_id, j.asset_id, j.state, j.skip_reason, j.duplicate_of_asset_id,
           j.near_duplicate_of_asset_id, j.near_duplicate_distance,
           a.content_digest, a.perceptual_hash, coalesce(a.width, 0) AS width, coalesce(a.height, 0) AS height,
           a.size_bytes, a.path
      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
     WHERE j.session_id = :id AND j.state IN ('completed', 'skipped')
       AND a.perceptual_hash IS NOT NULL AND a.content_digest IS NOT NULL
    """
)

_FAILURES_BY_CLASS = text(
    """
    SELECT error_class, count(*) AS n FROM training_jobs
     WHERE session_id = :id AND state = 'failed'
     GROUP BY error_class ORDER BY n DESC, error_class
    """
)


def _changed_labels(rows: Sequence[Any], labels: dict[int, Label]) -> list[tuple[int, Label]]:
    """The labels that differ from what the jobs hold now (usually few: a rerun changes nothing)."""
    out = []
    for r in rows:
        label = labels.get(int(r.job_id))
        if label is None:
            continue
        current = (
            str(r.state),
            str(r.skip_reason or ""),
            r.duplicate_of_asset_id,
            r.near_duplicate_of_asset_id,
            r.near_duplicate_distance,
        )
        wanted = (label.state, label.skip_reason, label.duplicate_of, label.near_of, label.near_distance)
        if current != wanted:
            out.append((int(r.job_id), label))
    return out


class TrainingRun:
    """One session's training on this worker: its pending jobs, chunk by chunk, through the worker's
    shared pool (the plug-in that turns an image into features is `trainer.Trainer`).

    `owner`: this worker owns the session; it finishes the session once no job is left. A helper
    returns when no chunk is left to claim, or after `slice_seconds` so its pool turns to other
    sessions (fairness).
    """

    def __init__(
        self,
        ctx: RunContext,
        pool: TrainingPool,
        *,
        owner: bool = True,
        lease_seconds: float = 10.0,
        heartbeat_seconds: float = 2.0,
        slice_seconds: float | None = None,
    ) -> None:
        self.ctx = ctx
        self.pool = pool
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.slice_seconds = slice_seconds
        self.chunk_size = max(4, pool.size * IMAGES_PER_PROCESS)
        self._plan: Plan | None = None
        self._nested: list[int] = []
        self._anchors = Anchors()
        self._held: dict[str, Chunk] = {}  # chunks in flight, by token
        self.images_written = 0  # images this run committed (completed or failed)

    @property
    def provenance(self) -> Provenance:
        assert self.pool.provenance is not None, "the pool is started before any run"
        return self.pool.provenance

    def _trainer_params(self) -> dict[str, Any]:
        p = self.provenance
        return {"trainer_name": p.name, "trainer_version": p.version, "model_digest": p.model_digest}

    async def _prepare(self) -> None:
        sid = self.ctx.claim.session_id
        if self.pool.provenance is None:
            await self.pool.start()
        if self.owner:
            claim = self.ctx.claim
            async with self.ctx.db.engine.begin() as conn:
                stamped = await conn.execute(
                    transitions.STAMP_TRAINER,
                    {
                        "id": sid,
                        "epoch": claim.epoch,
                        "owner": claim.owner_id,
                        "dimension": self.provenance.dimension,
                        **self._trainer_params(),
                    },
                )
                if stamped.first() is None:
                    raise FenceLost
                # Helpers look for sessions stamped with their trainer: wake them now, not at their poll.
                await notify(conn, sid)
        self._plan = await load_plan(self.ctx)
        self._nested = nested_ids(self._plan.subdirectories)
        async with self.ctx.db.engine.connect() as conn:
            anchors = (
                await conn.execute(
                    text("SELECT path, inode, device FROM library_anchors WHERE session_id = :id"), {"id": sid}
                )
            ).all()
        self._anchors = Anchors(Anchor(str(r.path), int(r.inode), int(r.device)) for r in anchors)

    async def _claim_chunk(self, after: int) -> Chunk | None:
        token = str(uuid.uuid4())
        params = {
            "id": self.ctx.claim.session_id,
            "after": after,
            "limit": self.chunk_size,
            "token": token,
            "worker": self.ctx.claim.owner_id,
            "lease": self.lease_seconds,
            "algorithm": HASH_ALGORITHM,
            **self._trainer_params(),
        }
        async with self.ctx.db.engine.begin() as conn:
            locked = await conn.execute(
                transitions.LOCK_RUNNING_SESSION, {"id": self.ctx.claim.session_id, **self._trainer_params()}
            )
            if locked.first() is None:
                return None  # paused, cancelled, ended, or now trained by another trainer: this run stops
            reclaimed = await conn.execute(transitions.RECLAIM_EXPIRED_CHUNKS, {"id": self.ctx.claim.session_id})
            if reclaimed.rowcount:  # jobs behind the cursor are pending again: take them first
                params["after"] = 0
            rows = (await conn.execute(transitions.CLAIM_CHUNK, params)).all()
        if not rows:
            return None
        jobs: list[PendingJob] = []
        for r in rows:
            stored = None
            if r.trained_valid:
                stored = ImageResult(
                    ok=True,
                    perceptual_hash=r.perceptual_hash,
                    width=r.width or 0,
                    height=r.height or 0,
                    format=r.format or "",
                    content_digest=r.content_digest,
                )
            jobs.append(
                PendingJob(int(r.job_id), int(r.asset_id), str(r.path), int(r.size_bytes), int(r.mtime_ns), stored)
            )
        chunk = Chunk(token, jobs)
        self._held[token] = chunk
        metrics.CHUNK_CLAIMS.labels(role="owner" if self.owner else "helper").inc()
        return chunk

    async def _heartbeat(self) -> None:
        """Extend the leases of this run's chunks in flight, so a slow chunk is never taken from a live worker."""
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            chunks = list(self._held.values())
            if not chunks:
                continue
            try:
                async with self.ctx.db.engine.begin() as conn:
                    await conn.execute(
                        transitions.EXTEND_CHUNKS,
                        {
                            "lease": self.lease_seconds,
                            "job_ids": [i for c in chunks for i in c.job_ids],
                            "tokens": [c.token for c in chunks],
                        },
                    )
            except Exception as exc:  # database away: the leases lapse if it stays away; fencing holds
                log.warning("session %d: chunk heartbeat failed: %s", self.ctx.claim.session_id, exc)

    async def _evaluate(self, chunk: Chunk) -> dict[int, ImageResult]:
        results = {job.job_id: job.stored for job in chunk.jobs if job.stored is not None}
        todo = [(job.job_id, job.path) for job in chunk.jobs if job.stored is None]
        started = time.monotonic()
        for job_id, result in await self.pool.process(todo):
            results[job_id] = result
        if todo:
            per_second = len(todo) / max(time.monotonic() - started, 1e-3)
            smallest = max(4, self.pool.size * IMAGES_PER_PROCESS)
            self.chunk_size = int(min(MAX_CHUNK, max(smallest, per_second * CHUNK_SECONDS)))
        return results

    async def _check_library(self, chunk: Chunk, results: dict[int, ImageResult]) -> None:
        """Raise LibraryOffline when the chunk's vanished or unreadable images are the library's doing."""
        suspects = [
            job.path
            for job in chunk.jobs
            if job.stored is None
            and not results[job.job_id].ok
            and results[job.job_id].error_class in SUSPECT_ERROR_CLASSES
        ]
        if suspects and len(self._anchors):
            offline = await asyncio.to_thread(self._anchors.check, suspects)
            if offline is not None:
                raise offline

    async def _write(self, chunk: Chunk, results: dict[int, ImageResult]) -> None:
        """One fenced transaction; FenceLost when the session stopped running. A chunk no longer ours
        (its lease lapsed and another worker took it, or a pause released it) is dropped unwritten."""
        sid = self.ctx.claim.session_id
        await self._check_library(chunk, results)
        seconds = time.monotonic() - chunk.claimed_at
        try:
            row = await self._commit(chunk, results, seconds)
        except _ChunkLost:
            metrics.LEASE_LOSSES.labels(lease="chunk").inc()
            self._held.pop(chunk.token, None)
            log.warning(
                "session %d: a chunk of %d images was taken back (its lease lapsed); nothing of it written",
                sid,
                len(chunk.jobs),
            )
            return
        fault_point("training_chunk_after_commit")
        self._held.pop(chunk.token, None)
        self.images_written += len(chunk.jobs)
        completed = sum(1 for job in chunk.jobs if results[job.job_id].ok and results[job.job_id].perceptual_hash)
        metrics.IMAGES.labels(outcome="completed").inc(completed)
        metrics.IMAGES.labels(outcome="failed").inc(len(chunk.jobs) - completed)
        self.ctx.progress(row)

    async def _commit(self, chunk: Chunk, results: dict[int, ImageResult], seconds: float) -> dict[str, Any]:
        sid = self.ctx.claim.session_id
        async with self.ctx.db.engine.begin() as conn:
            if (await conn.execute(transitions.TRAINING_FENCE, {"id": sid})).first() is None:
                raise FenceLost
            held = (await conn.execute(transitions.CHUNK_FENCE, {"job_ids": chunk.job_ids, "token": chunk.token})).all()
            if len(held) != len(chunk.jobs):
                raise _ChunkLost
            fresh = [(job, results[job.job_id]) for job in chunk.jobs if job.stored is None]
            fresh = [(j, r) for j, r in fresh if r.ok and r.perceptual_hash is not None]
            if fresh:
                await conn.execute(
                    _WRITE_ASSETS,
                    {
                        "algorithm": HASH_ALGORITHM,
                        "asset_ids": [j.asset_id for j, _r in fresh],
                        "hashes": [r.perceptual_hash for _j, r in fresh],
                        "digests": [r.content_digest for _j, r in fresh],
                        "widths": [r.width for _j, r in fresh],
                        "heights": [r.height for _j, r in fresh],
                        "formats": [r.format[:16] for _j, r in fresh],
                        "features": [None if r.features is None else json.dumps(r.features) for _j, r in fresh],
                        "embeddings": [_array_literal(r.embedding) for _j, r in fresh],
                        **self._trainer_params(),
                        "sizes": [j.size_bytes for j, _r in fresh],
                        "mtimes": [j.mtime_ns for j, _r in fresh],
                    },
                )
            ok = [results[job.job_id].ok and results[job.job_id].perceptual_hash is not None for job in chunk.jobs]
            committed = await conn.execute(
                transitions.RECORD_OUTCOMES,
                {
                    "id": sid,
                    "token": chunk.token,
                    "worker": self.ctx.claim.owner_id,
                    "seconds": seconds,
                    "nested_ids": self._nested,
                    "job_ids": chunk.job_ids,
                    "states": ["completed" if good else "failed" for good in ok],
                    "error_classes": [
                        "" if good else results[job.job_id].error_class[:32]
                        for job, good in zip(chunk.jobs, ok, strict=True)
                    ],
                    "error_messages": [
                        "" if good else results[job.job_id].error_message
                        for job, good in zip(chunk.jobs, ok, strict=True)
                    ],
                    "skip_reasons": [""] * len(chunk.jobs),
                    "duplicate_of": [None] * len(chunk.jobs),
                    "near_of": [None] * len(chunk.jobs),
                    "near_distances": [None] * len(chunk.jobs),
                },
            )
            row = dict(committed.mappings().one())
            fault_point("training_chunk_before_commit")
        return row

    async def _unfinished(self) -> tuple[int, int]:
        async with self.ctx.db.engine.connect() as conn:
            row = (await conn.execute(_UNFINISHED, {"id": self.ctx.claim.session_id})).one()
        return int(row.pending), int(row.running)

    async def _labels(self) -> list[tuple[int, Label]]:
        """Duplicate resolution over every trained job of the session (read once, decided in a thread)."""
        assert self._plan is not None
        async with self.ctx.db.engine.connect() as conn:
            rows = (await conn.execute(_TRAINED, {"id": self.ctx.claim.session_id})).all()
        plan = self._plan

        def decide() -> list[tuple[int, Label]]:
            trained = [
                Trained(
                    int(r.job_id),
                    int(r.asset_id),
                    str(r.content_digest),
                    str(r.perceptual_hash),
                    int(r.width),
                    int(r.height),
                    int(r.size_bytes),
                    str(r.path),
                )
                for r in rows
            ]
            labels = resolve(trained, plan.near_duplicate_distance, skip_near=plan.skip_near_duplicates)
            return _changed_labels(rows, labels)

        return await asyncio.to_thread(decide)

    async def _finish(self) -> dict[str, Any] | None:
        """Owner only: duplicates resolved and running -> completed | failed, in one fenced transaction,
        once no job is pending or held; None when some still are."""
        changes = await self._labels()
        fault_point("before_completed_transition")
        try:
            out = await self._commit_finish(changes)
        except _NotFinished:  # a job became pending again meanwhile: labels are decided next time
            return None
        # Duplicates skipped now were counted as completed when their chunk was written.
        metrics.IMAGES.labels(outcome="skipped").inc(sum(1 for _j, label in changes if label.state == "skipped"))
        self.ctx.state(out)
        return out

    async def _commit_finish(self, changes: list[tuple[int, Label]]) -> dict[str, Any]:
        sid = self.ctx.claim.session_id
        async with self.ctx.db.engine.begin() as conn:
            if await fence(conn, self.ctx.claim, "running") is None:
                raise FenceLost
            for start in range(0, len(changes), LABELS_PER_STATEMENT):
                part = changes[start : start + LABELS_PER_STATEMENT]
                await conn.execute(
                    transitions.APPLY_DUPLICATE_LABELS,
                    {
                        "id": sid,
                        "job_ids": [job_id for job_id, _l in part],
                        "states": [label.state for _j, label in part],
                        "skip_reasons": [label.skip_reason for _j, label in part],
                        "duplicate_of": [label.duplicate_of for _j, label in part],
                        "near_of": [label.near_of for _j, label in part],
                        "near_distances": [label.near_distance for _j, label in part],
                    },
                )
            row = (await conn.execute(transitions.FINISH, {"id": sid})).mappings().first()
            if row is None:
                raise _NotFinished
            out = dict(row)
            out["failures"] = {
                str(r.error_class): int(r.n) for r in (await conn.execute(_FAILURES_BY_CLASS, {"id": sid})).all()
            }
            await notify(conn, sid)
        return out

    async def _until_done_or_stopped(self, task: asyncio.Future[dict[int, ImageResult]]) -> bool:
        """Wait for `task`; False (and the task cancelled) when the run must stop first."""
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self.ctx.stop.event.wait())
        try:
            await asyncio.wait([task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if self.ctx.stop.is_set() and not task.done():
            task.cancel()
            return False
        return True

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds` unless the run is stopped first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ctx.stop.event.wait(), seconds)

    async def run(self) -> dict[str, Any] | None:
        """Train until the session is finished (owner: returns the final row) or there is nothing left
        to claim (helper: None), or the run is stopped (None). Raises FenceLost."""
        await self._prepare()
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"chunks-{self.ctx.claim.session_id}")
        started = time.monotonic()
        after = 0
        inflight: tuple[Chunk, asyncio.Future[dict[int, ImageResult]]] | None = None
        nxt: tuple[Chunk, asyncio.Future[dict[int, ImageResult]]] | None = None
        try:
            while not self.ctx.stop.is_set():
                sliced = self.slice_seconds is not None and time.monotonic() - started >= self.slice_seconds
                chunk = None if sliced else await self._claim_chunk(after)
                nxt = None
                if chunk is not None:
                    after = chunk.jobs[-1].job_id
                    nxt = (chunk, asyncio.ensure_future(self._evaluate(chunk)))
                if inflight is not None:
                    done_chunk, task = inflight
                    if not await self._until_done_or_stopped(task) or self.ctx.stop.is_set():
                        return None
                    await self._write(done_chunk, task.result())
                inflight, nxt = nxt, None
                if inflight is not None:
                    continue
                if after != 0 and not sliced:
                    after = 0  # a job may have become pending behind the cursor: look once more from the start
                    continue
                if not self.owner:
                    return None
                pending, running = await self._unfinished()
                if pending == 0 and running == 0:
                    final = await self._finish()
                    if final is not None:
                        return final
                # The last chunks are other workers' (or being claimed right now): look again shortly.
                await self._pause(WAIT_FOR_HELPERS_SECONDS)
            return None
        finally:
            # Chunks still being decoded are abandoned: nothing of them was written; their jobs stay
            # `running` until a pause releases them or their lease lapses and any worker takes them.
            for pair in (inflight, nxt):
                if pair is not None and not pair[1].done():
                    pair[1].cancel()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._release_held()

    async def _release_held(self) -> None:
        """Give back the chunks this run still holds (stopped, lease lost, shut down): any worker can
        take them at once instead of after their lease. Best effort: unreleased, they expire."""
        chunks = list(self._held.values())
        self._held.clear()
        if not chunks:
            return
        try:
            async with self.ctx.db.engine.begin() as conn:
                await conn.execute(
                    transitions.RELEASE_HELD_CHUNKS,
                    {"job_ids": [i for c in chunks for i in c.job_ids], "tokens": [c.token for c in chunks]},
                )
        except Exception as exc:
            log.info("session %d: chunks not released (%s): they expire", self.ctx.claim.session_id, exc)

"""Training (state `running`): pending jobs -> process pool -> set-based, fenced result writes.

Jobs are taken in id order in small chunks (about four images per pool process), so that a pause or
cancel is noticed between chunks within a fraction of a second, and one chunk is decoded while the
previous one is written. Nothing marks a job `running`: a chunk's results are written in one
transaction that also advances the counters, so a crash loses at most the work of the chunks in
flight, never counts anything twice, and leaves no job stuck.

Per chunk:
- jobs whose asset already has a `dhash-64` computed from its current (size, mtime_ns) are not
  decoded again; they complete with the stored hash;
- the others go to `TrainingPool.process` (never raises for an image);
- one transaction: fence on the session row, find earlier assets of this session with the same
  hashes (one query), then the assets (hash, size, format, features), the jobs (completed / failed /
  skipped "duplicate of asset N"), the session counters and the per-subdirectory trained counts,
  each one set-based statement.

The counters change in the same statement as the job rows they count, so they always equal the
jobs table (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from discovery_worker.claims import RunContext, fault_point, fence
from discovery_worker.discovery import FenceLost, load_plan, nested_ids
from discovery_worker.hashing import HASH_ALGORITHM, ImageResult
from discovery_worker.pool import TrainingPool
from imagetraining.notifications import notify

log = logging.getLogger(__name__)

# Chunk sizing: at least this many images per pool process, and as many more as the pool finishes in
# about CHUNK_SECONDS (fast images: fewer, larger transactions; slow ones: small chunks). A stop never
# waits for a chunk: the pool call is cancelled at once and the chunk stays pending.
IMAGES_PER_PROCESS = 4
CHUNK_SECONDS = 0.25
MAX_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class PendingJob:
    job_id: int
    asset_id: int
    path: str
    size_bytes: int
    mtime_ns: int
    stored: ImageResult | None  # a still-valid stored hash: no decode needed


_NEXT_CHUNK = text(
    """
    SELECT j.id AS job_id, j.asset_id, a.path, a.size_bytes, a.mtime_ns,
           a.perceptual_hash, a.width, a.height, a.format,
           (a.perceptual_hash IS NOT NULL AND a.hash_algorithm = :algorithm
            AND a.hashed_size_bytes = a.size_bytes AND a.hashed_mtime_ns = a.mtime_ns) AS hash_valid
      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
     WHERE j.session_id = :id AND j.state = 'pending' AND j.id > :after
     ORDER BY j.id
     LIMIT :limit
    """
)

# The originals of this session's hashes, read once per claim (one pass over the session's jobs) and
# then kept up to date in memory: only this owner writes the session's jobs while it holds the claim.
_ORIGINALS = text(
    """
    SELECT a.perceptual_hash, min(a.id) AS asset_id
      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
     WHERE j.session_id = :id AND j.state = 'completed'
       AND a.hash_algorithm = :algorithm AND a.perceptual_hash IS NOT NULL
       AND a.hashed_size_bytes = a.size_bytes AND a.hashed_mtime_ns = a.mtime_ns
     GROUP BY a.perceptual_hash
    """
)

_WRITE_ASSETS = text(
    """
    UPDATE image_assets a
       SET perceptual_hash = r.perceptual_hash, hash_algorithm = :algorithm,
           width = r.width, height = r.height, format = r.format,
           features = CAST(r.features AS jsonb),
           hashed_size_bytes = r.size_bytes, hashed_mtime_ns = r.mtime_ns, update_time = now()
      FROM unnest(CAST(:asset_ids AS bigint[]), CAST(:hashes AS text[]), CAST(:widths AS int[]),
                  CAST(:heights AS int[]), CAST(:formats AS text[]), CAST(:features AS text[]),
                  CAST(:sizes AS bigint[]), CAST(:mtimes AS bigint[]))
           AS r(asset_id, perceptual_hash, width, height, format, features, size_bytes, mtime_ns)
     WHERE a.id = r.asset_id
    """
)

# Jobs, counters and per-subdirectory trained counts in one statement: they cannot disagree.
_WRITE_JOBS = text(
    """
    WITH r AS (
        SELECT * FROM unnest(CAST(:job_ids AS bigint[]), CAST(:states AS text[]), CAST(:error_classes AS text[]),
                             CAST(:error_messages AS text[]), CAST(:skip_reasons AS text[]),
                             CAST(:duplicate_of AS bigint[]))
                 AS t(job_id, state, error_class, error_message, skip_reason, duplicate_of)
    ),
    target AS (
        -- One primary-key probe per job of the chunk (LIMIT 1: unique). Filtering the UPDATE on
        -- session and state let the planner hash every pending job of the session for every chunk
        -- (stale statistics after the bulk insert of jobs), which made training quadratic.
        SELECT r.*
          FROM r
          CROSS JOIN LATERAL (
                SELECT x.id FROM training_jobs x
                 WHERE x.id = r.job_id AND x.session_id = :id AND x.state = 'pending'
                 LIMIT 1) x
    ),
    done AS (
        UPDATE training_jobs j
           SET state = t.state, error_class = t.error_class, error_message = t.error_message,
               skip_reason = t.skip_reason, duplicate_of_asset_id = t.duplicate_of,
               attempts = j.attempts + 1, update_time = now()
          FROM target t
         WHERE j.id = t.job_id
        RETURNING j.asset_id, j.subdirectory_id, j.state
    ),
    credited AS (  -- the selected directory that found the image, and selected directories nested in it
        SELECT subdirectory_id AS id FROM done WHERE state IN ('completed', 'skipped')
        UNION ALL
        SELECT s2.id
          FROM done
          JOIN image_assets a ON a.id = done.asset_id
          JOIN session_subdirectories s2
            ON s2.id = ANY(CAST(:nested_ids AS bigint[])) AND starts_with(a.path, rtrim(s2.path, '/') || '/')
         WHERE done.state IN ('completed', 'skipped')
    ),
    trained AS (
        UPDATE session_subdirectories s
           SET trained_count = s.trained_count + d.n
          FROM (SELECT id, count(*) AS n FROM credited WHERE id IS NOT NULL GROUP BY id) d
         WHERE s.id = d.id
    )
    UPDATE training_sessions
       SET processed_images = processed_images + (SELECT count(*) FROM done WHERE state = 'completed'),
           failed_images = failed_images + (SELECT count(*) FROM done WHERE state = 'failed'),
           skipped_images = skipped_images + (SELECT count(*) FROM done WHERE state = 'skipped'),
           training_seconds = training_seconds + :seconds
     WHERE id = :id
    RETURNING *
    """
)

_FINISH = text(
    """
    WITH counts AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE state = 'failed') AS failed,
               count(*) FILTER (WHERE state = 'pending') AS pending
          FROM training_jobs WHERE session_id = :id
    )
    UPDATE training_sessions
       SET state = CASE WHEN counts.total > 0 AND counts.failed = counts.total THEN 'failed' ELSE 'completed' END,
           state_reason = CASE WHEN counts.total > 0 AND counts.failed = counts.total
                               THEN 'all ' || counts.total || ' images failed: see ListJobs' ELSE '' END,
           end_time = now(), update_time = now(), current_directory = '',
           owner_id = NULL, owner_address = NULL, lease_expires_at = NULL,
           event_sequence = event_sequence + 1
      FROM counts
     WHERE id = :id AND counts.pending = 0
    RETURNING training_sessions.*
    """
)

_FAILURES_BY_CLASS = text(
    """
    SELECT error_class, count(*) AS n FROM training_jobs
     WHERE session_id = :id AND state = 'failed'
     GROUP BY error_class ORDER BY n DESC, error_class
    """
)


def _classify(
    chunk: Sequence[PendingJob], results: dict[int, ImageResult], originals: dict[str, int]
) -> list[tuple[PendingJob, ImageResult, str, int | None]]:
    """(job, result, new state, duplicate-of asset id) for each job of the chunk.

    The original of a hash is the lowest asset id among completed jobs of this session, else the
    lowest asset id of the chunk; every other asset with that exact hash is a skipped duplicate.
    """
    first_in_chunk: dict[str, int] = {}
    for job in chunk:
        result = results[job.job_id]
        if result.ok and result.perceptual_hash is not None:
            h = result.perceptual_hash
            first_in_chunk[h] = min(first_in_chunk.get(h, job.asset_id), job.asset_id)
    out: list[tuple[PendingJob, ImageResult, str, int | None]] = []
    for job in chunk:
        result = results[job.job_id]
        if not result.ok or result.perceptual_hash is None:
            out.append((job, result, "failed", None))
            continue
        original = originals.get(result.perceptual_hash, first_in_chunk[result.perceptual_hash])
        if original != job.asset_id:
            out.append((job, result, "skipped", original))
        else:
            out.append((job, result, "completed", None))
    return out


class Trainer:
    """Trains the pending jobs of one claimed session with the worker's shared pool."""

    def __init__(self, ctx: RunContext, pool: TrainingPool) -> None:
        self.ctx = ctx
        self.pool = pool
        self.chunk_size = max(4, pool.size * IMAGES_PER_PROCESS)
        self._mark = time.monotonic()
        self._originals: dict[str, int] = {}
        self._nested: list[int] = []

    async def _prepare(self) -> None:
        sid = self.ctx.claim.session_id
        plan = await load_plan(self.ctx)
        self._nested = nested_ids(plan.subdirectories)
        async with self.ctx.db.engine.connect() as conn:
            rows = (await conn.execute(_ORIGINALS, {"id": sid, "algorithm": HASH_ALGORITHM})).all()
        self._originals = {str(r.perceptual_hash): int(r.asset_id) for r in rows}

    async def _next_chunk(self, after: int) -> list[PendingJob]:
        async with self.ctx.db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    _NEXT_CHUNK,
                    {
                        "id": self.ctx.claim.session_id,
                        "after": after,
                        "limit": self.chunk_size,
                        "algorithm": HASH_ALGORITHM,
                    },
                )
            ).all()
        out: list[PendingJob] = []
        for r in rows:
            stored = None
            if r.hash_valid:
                stored = ImageResult(
                    ok=True,
                    perceptual_hash=r.perceptual_hash,
                    width=r.width or 0,
                    height=r.height or 0,
                    format=r.format or "",
                )
            out.append(
                PendingJob(int(r.job_id), int(r.asset_id), str(r.path), int(r.size_bytes), int(r.mtime_ns), stored)
            )
        return out

    async def _evaluate(self, chunk: list[PendingJob]) -> dict[int, ImageResult]:
        results = {job.job_id: job.stored for job in chunk if job.stored is not None}
        todo = [(job.job_id, job.path) for job in chunk if job.stored is None]
        started = time.monotonic()
        for job_id, result in await self.pool.process(todo):
            results[job_id] = result
        if todo:
            per_second = len(todo) / max(time.monotonic() - started, 1e-3)
            smallest = max(4, self.pool.size * IMAGES_PER_PROCESS)
            self.chunk_size = int(min(MAX_CHUNK, max(smallest, per_second * CHUNK_SECONDS)))
        return results

    async def _write(self, chunk: list[PendingJob], results: dict[int, ImageResult]) -> None:
        sid = self.ctx.claim.session_id
        now = time.monotonic()
        seconds, self._mark = now - self._mark, now
        async with self.ctx.db.engine.begin() as conn:
            if await fence(conn, self.ctx.claim, "running") is None:
                raise FenceLost
            decided = _classify(chunk, results, self._originals)
            fresh = [(job, res) for job, res, _s, _d in decided if res.ok and job.stored is None]
            if fresh:
                await conn.execute(
                    _WRITE_ASSETS,
                    {
                        "algorithm": HASH_ALGORITHM,
                        "asset_ids": [j.asset_id for j, _r in fresh],
                        "hashes": [r.perceptual_hash for _j, r in fresh],
                        "widths": [r.width for _j, r in fresh],
                        "heights": [r.height for _j, r in fresh],
                        "formats": [r.format[:16] for _j, r in fresh],
                        "features": [None if r.features is None else json.dumps(r.features) for _j, r in fresh],
                        "sizes": [j.size_bytes for j, _r in fresh],
                        "mtimes": [j.mtime_ns for j, _r in fresh],
                    },
                )
            committed = await conn.execute(
                _WRITE_JOBS,
                {
                    "id": sid,
                    "seconds": seconds,
                    "nested_ids": self._nested,
                    "job_ids": [j.job_id for j, _r, _s, _d in decided],
                    "states": [s for _j, _r, s, _d in decided],
                    "error_classes": [r.error_class[:32] if s == "failed" else "" for _j, r, s, _d in decided],
                    "error_messages": [r.error_message if s == "failed" else "" for _j, r, s, _d in decided],
                    "skip_reasons": [f"duplicate of asset {d}" if d is not None else "" for _j, _r, _s, d in decided],
                    "duplicate_of": [d for _j, _r, _s, d in decided],
                },
            )
            row = dict(committed.mappings().one())
            fault_point("training_chunk_before_commit")
        fault_point("training_chunk_after_commit")
        self.ctx.progress(row)
        for job, result, new_state, _dup in decided:  # committed: later chunks see these originals
            if new_state == "completed" and result.perceptual_hash is not None:
                known = self._originals.get(result.perceptual_hash)
                self._originals[result.perceptual_hash] = job.asset_id if known is None else min(known, job.asset_id)

    async def _finish(self) -> dict[str, Any] | None:
        """Fenced running -> completed | failed when no job is pending; None when some still are."""
        sid = self.ctx.claim.session_id
        fault_point("before_completed_transition")
        async with self.ctx.db.engine.begin() as conn:
            if await fence(conn, self.ctx.claim, "running") is None:
                raise FenceLost
            row = (await conn.execute(_FINISH, {"id": sid})).mappings().first()
            if row is None:
                return None
            out = dict(row)
            out["failures"] = {
                str(r.error_class): int(r.n) for r in (await conn.execute(_FAILURES_BY_CLASS, {"id": sid})).all()
            }
            await notify(conn, sid)
        self.ctx.state(out)
        return out

    async def _until_done_or_stopped(self, task: asyncio.Future[dict[int, ImageResult]]) -> bool:
        """Wait for `task`; False (and the task cancelled) when the runner must stop first."""
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self.ctx.stop.event.wait())
        try:
            await asyncio.wait([task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if self.ctx.stop.is_set() and not task.done():
            task.cancel()
            return False
        return True

    async def run(self) -> dict[str, Any] | None:
        """Train until no job is pending (returns the final row) or the runner is stopped (None).

        Two chunks in flight at most: chunk N+1 is decoded while chunk N is written. Raises FenceLost.
        """
        await self._prepare()
        self._mark = time.monotonic()
        after = 0
        inflight: tuple[list[PendingJob], asyncio.Future[dict[int, ImageResult]]] | None = None
        nxt: tuple[list[PendingJob], asyncio.Future[dict[int, ImageResult]]] | None = None
        try:
            while not self.ctx.stop.is_set():
                chunk = await self._next_chunk(after)
                nxt = None
                if chunk:
                    after = chunk[-1].job_id
                    nxt = (chunk, asyncio.ensure_future(self._evaluate(chunk)))
                if inflight is not None:
                    done_chunk, task = inflight
                    if not await self._until_done_or_stopped(task) or self.ctx.stop.is_set():
                        return None
                    await self._write(done_chunk, task.result())
                inflight, nxt = nxt, None
                if inflight is None:
                    final = await self._finish()
                    if final is not None:
                        return final
                    after = 0  # a job became pending again behind the cursor: go round once more
            return None
        finally:
            # Chunks still being decoded are abandoned: nothing of them was written, they stay pending.
            for pair in (inflight, nxt):
                if pair is not None and not pair[1].done():
                    pair[1].cancel()

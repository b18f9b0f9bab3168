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
- duplicates are decided in memory against the session's completed images (read once per claim,
  then kept up to date): the same content digest as a kept image is an exact duplicate, skipped
  `exact_duplicate` (the lowest asset id is the copy kept); a dHash within the session's
  `near_duplicate_distance` of a kept image's makes a near duplicate, trained and reported on its
  job (imagetraining/duplicates.py);
- one transaction: fence on the session row, then the assets (hash, digest, size, format,
  features), the jobs (completed / failed / skipped), the session counters and the
  per-subdirectory trained counts, each one set-based statement.

The counters change in the same statement as the job rows they count, so they always equal the
jobs table (docs/architecture.md).

A chunk with images that vanished or could not be read is only written after the library check
(discovery_worker/library.py) finds every anchor on their way in place; otherwise the chunk is
dropped unwritten and `LibraryOffline` pauses the session: a NAS that drops never marks thousands
of jobs `vanished`, and they are trained when it is back.
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

from discovery_worker.claims import FenceLost, RunContext, fence
from discovery_worker.faultpoints import fault_point
from discovery_worker.hashing import HASH_ALGORITHM, ImageResult
from discovery_worker.library import SUSPECT_ERROR_CLASSES, Anchor, Anchors
from discovery_worker.plan import load_plan, nested_ids
from discovery_worker.pool import TrainingPool
from imagetraining import transitions
from imagetraining.duplicates import (
    SKIP_EXACT_DUPLICATE,
    SKIP_NEAR_DUPLICATE,
    NearIndex,
    distance,
    hash_bits,
    quality_key,
)
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
           a.perceptual_hash, a.width, a.height, a.format, a.content_digest,
           (a.perceptual_hash IS NOT NULL AND a.hash_algorithm = :algorithm AND a.content_digest IS NOT NULL
            AND a.hashed_size_bytes = a.size_bytes AND a.hashed_mtime_ns = a.mtime_ns) AS hash_valid
      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
     WHERE j.session_id = :id AND j.state = 'pending' AND j.id > :after
     ORDER BY j.id
     LIMIT :limit
    """
)

# The session's kept images (completed jobs), read once per claim (one pass over the session's jobs)
# and then kept up to date in memory: only this owner writes the session's jobs while it holds the
# claim.
_KEPT = text(
    """
    SELECT a.id AS asset_id, a.perceptual_hash, a.content_digest, a.path, a.size_bytes,
           coalesce(a.width, 0) AS width, coalesce(a.height, 0) AS height
      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
     WHERE j.session_id = :id AND j.state = 'completed'
       AND a.hash_algorithm = :algorithm AND a.perceptual_hash IS NOT NULL AND a.content_digest IS NOT NULL
       AND a.hashed_size_bytes = a.size_bytes AND a.hashed_mtime_ns = a.mtime_ns
    """
)

_WRITE_ASSETS = text(
    """
    UPDATE image_assets a
       SET perceptual_hash = r.perceptual_hash, hash_algorithm = :algorithm, content_digest = r.digest,
           width = r.width, height = r.height, format = r.format,
           features = CAST(r.features AS jsonb),
           hashed_size_bytes = r.size_bytes, hashed_mtime_ns = r.mtime_ns, update_time = now()
      FROM unnest(CAST(:asset_ids AS bigint[]), CAST(:hashes AS text[]), CAST(:digests AS text[]),
                  CAST(:widths AS int[]), CAST(:heights AS int[]), CAST(:formats AS text[]),
                  CAST(:features AS text[]), CAST(:sizes AS bigint[]), CAST(:mtimes AS bigint[]))
           AS r(asset_id, perceptual_hash, digest, width, height, format, features, size_bytes, mtime_ns)
     WHERE a.id = r.asset_id
    """
)

_FAILURES_BY_CLASS = text(
    """
    SELECT error_class, count(*) AS n FROM training_jobs
     WHERE session_id = :id AND state = 'failed'
     GROUP BY error_class ORDER BY n DESC, error_class
    """
)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a chunk's job becomes: its state, and the image it duplicates or resembles."""

    job: PendingJob
    result: ImageResult
    state: str  # completed | failed | skipped
    duplicate_of: int | None = None  # exact duplicate: the kept asset
    near_of: int | None = None  # near duplicate: the closest kept asset
    near_distance: int | None = None


class KeptImages:
    """The session's kept images: content digests (exact duplicates) and dHashes (near ones), with
    each near candidate's hash and quality (for `skip_near_duplicates`)."""

    def __init__(self, near_distance: int, *, skip_near: bool = False) -> None:
        self.by_digest: dict[str, int] = {}
        self.near = NearIndex(near_distance)
        self.skip_near = skip_near
        self.hashes: dict[int, int] = {}
        self.quality: dict[int, tuple[int, int, str]] = {}

    def keep(self, asset_id: int, perceptual_hash: str, digest: str, quality: tuple[int, int, str]) -> None:
        known = self.by_digest.get(digest)
        self.by_digest[digest] = asset_id if known is None else min(known, asset_id)
        value = hash_bits(perceptual_hash)
        self.near.add(value, asset_id)
        self.hashes[asset_id] = value
        self.quality[asset_id] = quality

    def drop(self, asset_id: int) -> None:
        """A kept image replaced by a better look-alike (skip_near_duplicates)."""
        value = self.hashes.pop(asset_id, None)
        if value is not None:
            self.near.remove(value, asset_id)
        self.quality.pop(asset_id, None)


@dataclass(frozen=True, slots=True)
class Demotion:
    """A kept image of an earlier chunk that a better look-alike replaces: completed -> skipped."""

    asset_id: int
    near_of: int
    distance: int


def _distance_of(a: ImageResult, b: ImageResult) -> int:
    return distance(hash_bits(str(a.perceptual_hash)), hash_bits(str(b.perceptual_hash)))


def _quality(job: PendingJob, result: ImageResult) -> tuple[int, int, str]:
    return quality_key(result.width, result.height, job.size_bytes, job.path)


def _classify(
    chunk: Sequence[PendingJob], results: dict[int, ImageResult], kept: KeptImages
) -> tuple[list[Decision], list[Demotion]]:
    """A decision for each job of the chunk, and the kept images of earlier chunks it replaces.

    Exact duplicates: the kept copy of a digest is the lowest asset id among the session's completed
    images, else the chunk's lowest. Near duplicates: the closest kept image within the distance
    (earlier chunks, or lower asset ids in this chunk); equal distances go to the lower asset id.
    Reported and trained; with `skip_near`, the better of the two (`quality_key`) is kept and the
    other skipped, so the best of a group of look-alikes is the one trained whatever the order.
    `kept` is not changed here: the caller applies the decisions once they are committed.
    """
    first_of_digest: dict[str, int] = {}
    for job in chunk:
        result = results[job.job_id]
        if result.ok and result.perceptual_hash is not None:
            d = result.content_digest
            first_of_digest[d] = min(first_of_digest.get(d, job.asset_id), job.asset_id)
    decisions: dict[int, Decision] = {}
    local = NearIndex(kept.near.max_distance)
    local_jobs: dict[int, tuple[PendingJob, ImageResult]] = {}  # asset id -> the chunk's kept image
    replaced: set[int] = set()  # kept images of earlier chunks replaced in this chunk
    demotions: list[Demotion] = []
    # Ascending asset ids: within a chunk, the lower id is the earlier image for "near duplicate of".
    for job in sorted(chunk, key=lambda j: j.asset_id):
        result = results[job.job_id]
        if not result.ok or result.perceptual_hash is None:
            decisions[job.job_id] = Decision(job, result, "failed")
            continue
        original = kept.by_digest.get(result.content_digest, first_of_digest[result.content_digest])
        if original != job.asset_id:
            decisions[job.job_id] = Decision(job, result, "skipped", duplicate_of=original)
            continue
        value = hash_bits(result.perceptual_hash)
        candidates = [c for c in (kept.near.nearest(value, excluding=replaced), local.nearest(value)) if c is not None]
        near = min(candidates, key=lambda c: (c[1], c[0])) if candidates else None
        if near is not None and kept.skip_near:
            other, apart = near
            if other in local_jobs:
                other_job, other_result = local_jobs[other]
                other_quality = _quality(other_job, other_result)
            else:
                other_quality = kept.quality[other]
            if _quality(job, result) < other_quality:
                # This one is better: it is kept, the other gives way.
                if other in local_jobs:
                    other_job, other_result = local_jobs.pop(other)
                    local.remove(hash_bits(str(other_result.perceptual_hash)), other)
                    decisions[other_job.job_id] = Decision(
                        other_job, other_result, "skipped", near_of=job.asset_id, near_distance=apart
                    )
                else:
                    replaced.add(other)
                    demotions.append(Demotion(other, job.asset_id, apart))
                # Skipped in favour of the one replaced: they name the one kept now.
                for job_id, earlier in list(decisions.items()):
                    if earlier.state == "skipped" and earlier.duplicate_of is None and earlier.near_of == other:
                        gap = _distance_of(earlier.result, result)
                        decisions[job_id] = Decision(
                            earlier.job, earlier.result, "skipped", near_of=job.asset_id, near_distance=gap
                        )
            else:
                decisions[job.job_id] = Decision(job, result, "skipped", near_of=other, near_distance=apart)
                continue
        local.add(value, job.asset_id)
        local_jobs[job.asset_id] = (job, result)
        decisions[job.job_id] = Decision(
            job,
            result,
            "completed",
            near_of=None if near is None else near[0],
            near_distance=None if near is None else near[1],
        )
    return [decisions[job.job_id] for job in chunk], demotions


def _skip_reason(d: Decision) -> str:
    if d.state != "skipped":
        return ""
    return SKIP_EXACT_DUPLICATE if d.duplicate_of is not None else SKIP_NEAR_DUPLICATE


class TrainingRun:
    """One claimed session's training: its pending jobs through the worker's shared pool (the plug-in that turns
    an image into features is `trainer.Trainer`)."""

    def __init__(self, ctx: RunContext, pool: TrainingPool) -> None:
        self.ctx = ctx
        self.pool = pool
        self.chunk_size = max(4, pool.size * IMAGES_PER_PROCESS)
        self._mark = time.monotonic()
        self._kept = KeptImages(0)
        self._nested: list[int] = []
        self._anchors = Anchors()

    async def _prepare(self) -> None:
        sid = self.ctx.claim.session_id
        plan = await load_plan(self.ctx)
        self._nested = nested_ids(plan.subdirectories)
        async with self.ctx.db.engine.connect() as conn:
            rows = (await conn.execute(_KEPT, {"id": sid, "algorithm": HASH_ALGORITHM})).all()
            anchors = (
                await conn.execute(
                    text("SELECT path, inode, device FROM library_anchors WHERE session_id = :id"), {"id": sid}
                )
            ).all()
        self._kept = KeptImages(plan.near_duplicate_distance, skip_near=plan.skip_near_duplicates)
        for r in sorted(rows, key=lambda r: int(r.asset_id)):
            quality = quality_key(int(r.width), int(r.height), int(r.size_bytes), str(r.path))
            self._kept.keep(int(r.asset_id), str(r.perceptual_hash), str(r.content_digest), quality)
        self._anchors = Anchors(Anchor(str(r.path), int(r.inode), int(r.device)) for r in anchors)

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
                    content_digest=r.content_digest,
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

    async def _check_library(self, chunk: list[PendingJob], results: dict[int, ImageResult]) -> None:
        """Raise LibraryOffline when the chunk's vanished or unreadable images are the library's doing."""
        suspects = [
            job.path
            for job in chunk
            if job.stored is None
            and not results[job.job_id].ok
            and results[job.job_id].error_class in SUSPECT_ERROR_CLASSES
        ]
        if suspects and len(self._anchors):
            offline = await asyncio.to_thread(self._anchors.check, suspects)
            if offline is not None:
                raise offline

    async def _write(self, chunk: list[PendingJob], results: dict[int, ImageResult]) -> None:
        sid = self.ctx.claim.session_id
        await self._check_library(chunk, results)
        now = time.monotonic()
        seconds, self._mark = now - self._mark, now
        async with self.ctx.db.engine.begin() as conn:
            if await fence(conn, self.ctx.claim, "running") is None:
                raise FenceLost
            decided, demotions = _classify(chunk, results, self._kept)
            if demotions:
                # Before the jobs' statement, whose RETURNING row then carries these counts too.
                await conn.execute(
                    transitions.DEMOTE_NEAR_DUPLICATES,
                    {
                        "id": sid,
                        "asset_ids": [d.asset_id for d in demotions],
                        "near_of": [d.near_of for d in demotions],
                        "distances": [d.distance for d in demotions],
                    },
                )
            fresh = [(d.job, d.result) for d in decided if d.result.ok and d.job.stored is None]
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
                        "sizes": [j.size_bytes for j, _r in fresh],
                        "mtimes": [j.mtime_ns for j, _r in fresh],
                    },
                )
            committed = await conn.execute(
                transitions.RECORD_OUTCOMES,
                {
                    "id": sid,
                    "seconds": seconds,
                    "nested_ids": self._nested,
                    "job_ids": [d.job.job_id for d in decided],
                    "states": [d.state for d in decided],
                    "error_classes": [d.result.error_class[:32] if d.state == "failed" else "" for d in decided],
                    "error_messages": [d.result.error_message if d.state == "failed" else "" for d in decided],
                    "skip_reasons": [_skip_reason(d) for d in decided],
                    "duplicate_of": [d.duplicate_of for d in decided],
                    "near_of": [d.near_of for d in decided],
                    "near_distances": [d.near_distance for d in decided],
                },
            )
            row = dict(committed.mappings().one())
            fault_point("training_chunk_before_commit")
        fault_point("training_chunk_after_commit")
        self.ctx.progress(row)
        for demoted in demotions:  # committed: later chunks compare with what is kept now
            self._kept.drop(demoted.asset_id)
        for d in sorted(decided, key=lambda d: d.job.asset_id):
            if d.state == "completed" and d.result.perceptual_hash is not None:
                self._kept.keep(
                    d.job.asset_id, d.result.perceptual_hash, d.result.content_digest, _quality(d.job, d.result)
                )

    async def _finish(self) -> dict[str, Any] | None:
        """Fenced running -> completed | failed when no job is pending; None when some still are."""
        sid = self.ctx.claim.session_id
        fault_point("before_completed_transition")
        async with self.ctx.db.engine.begin() as conn:
            if await fence(conn, self.ctx.claim, "running") is None:
                raise FenceLost
            row = (await conn.execute(transitions.FINISH, {"id": sid})).mappings().first()
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

"""Discovery's writes: one fenced transaction per walk batch, and the run's library anchors.

Each batch is ONE transaction, fenced on the session row (`claims.fence`):
- one read of the batch's files as recorded (`_PROBE`: one probe of the path key per file, read
  ahead while the previous batch writes: `probe`), classified in Python as new / changed /
  unchanged by (size, mtime_ns); an unchanged asset keeps its hash;
- then only the writes the batch needs: new assets inserted (`unnest`, `ON CONFLICT DO NOTHING`),
  changed ones updated, the session's jobs inserted `ON CONFLICT DO NOTHING` (a rescan inserts
  none), and, only when the batch has changed (or stale) files, their finished jobs sent back to
  `pending` with the training counters down by as many (`transitions.REOPEN_CHANGED_JOBS`);
- the fingerprints of the directories whose last image is in the batch (discovery_worker/walker.py);
- unreadable paths recorded in `discovery_issues` (`ON CONFLICT DO NOTHING`);
- mount points the walk met recorded as library anchors (`library_anchors`);
- counters and the checkpoint advanced (`transitions.ADVANCE_DISCOVERY`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncConnection

from discovery_worker.claims import FenceLost, RunContext, fence
from discovery_worker.faultpoints import fault_point
from discovery_worker.library import Anchor, Anchors, initial_anchors
from discovery_worker.plan import Plan
from discovery_worker.walker import WalkBatch
from imagetraining import metrics, transitions
from imagetraining.walk import FoundFile


@dataclass(slots=True)
class DiscoveryTotals:
    """Assets counted by this runner (for the log line)."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0


# The batch's files as recorded: one probe of the path key per file (LATERAL ... LIMIT 1 keeps it a
# per-file probe whatever the statistics say; `path = ANY(...)` let the planner scan every asset for
# every batch). Everything the batch needs to know about a known file (changed? hash stale?) is in
# this one read, so a rescan of unchanged files writes no asset.
_PROBE = text(
    """
    SELECT a.id, a.path, a.size_bytes, a.mtime_ns, a.hashed_size_bytes, a.hashed_mtime_ns
      FROM unnest(CAST(:paths AS text[])) AS p(path)
      CROSS JOIN LATERAL (
            SELECT x.id, x.path, x.size_bytes, x.mtime_ns, x.hashed_size_bytes, x.hashed_mtime_ns
              FROM image_assets x WHERE x.path = p.path LIMIT 1) a
    """
)

# Files never seen before. A row another transaction inserted meanwhile (two sessions over the same
# files) is not returned; the caller looks it up and counts it as unchanged.
_INSERT_ASSETS = text(
    """
    INSERT INTO image_assets (path, size_bytes, mtime_ns)
    SELECT * FROM unnest(CAST(:paths AS text[]), CAST(:sizes AS bigint[]), CAST(:mtimes AS bigint[]))
     ORDER BY 1
    ON CONFLICT (path) DO NOTHING
    RETURNING id, path
    """
)

_LOOKUP_ASSETS = text("SELECT id, path FROM image_assets WHERE path = ANY(CAST(:paths AS text[]))")

_UPDATE_CHANGED_ASSETS = text(
    """
    UPDATE image_assets a
       SET size_bytes = t.size_bytes, mtime_ns = t.mtime_ns, update_time = now()
      FROM unnest(CAST(:ids AS bigint[]), CAST(:sizes AS bigint[]), CAST(:mtimes AS bigint[]))
           AS t(id, size_bytes, mtime_ns)
     WHERE a.id = t.id AND (a.size_bytes, a.mtime_ns) IS DISTINCT FROM (t.size_bytes, t.mtime_ns)
    """
)

_INSERT_JOBS = text(
    """
    INSERT INTO training_jobs (session_id, asset_id, subdirectory_id)
    SELECT :id, t.asset_id, t.subdirectory_id
      FROM unnest(CAST(:asset_ids AS bigint[]), CAST(:subdirectory_ids AS bigint[])) AS t(asset_id, subdirectory_id)
     ORDER BY t.asset_id
    ON CONFLICT (session_id, asset_id) DO NOTHING
    """
)

_SAVE_FINGERPRINTS = text(
    """
    INSERT INTO directory_fingerprints (session_id, path, digest)
    SELECT :id, t.path, t.digest FROM unnest(CAST(:paths AS text[]), CAST(:digests AS text[])) AS t(path, digest)
    ON CONFLICT (session_id, path) DO UPDATE SET digest = EXCLUDED.digest
    """
)

_SAVE_ANCHORS = text(
    """
    INSERT INTO library_anchors (session_id, path, inode, device)
    SELECT :id, t.path, t.inode, t.device
      FROM unnest(CAST(:paths AS text[]), CAST(:inodes AS bigint[]), CAST(:devices AS bigint[]))
           AS t(path, inode, device)
    ON CONFLICT (session_id, path) DO NOTHING
    """
)

_FORGET_ANCHORS = text("DELETE FROM library_anchors WHERE session_id = :id")


async def save_anchors(conn: AsyncConnection, session_id: int, anchors: Sequence[Anchor]) -> None:
    """Record anchors; one already recorded for a path keeps its first identity (that of the run's start)."""
    await conn.execute(
        _SAVE_ANCHORS,
        {
            "id": session_id,
            "paths": [a.path for a in anchors],
            "inodes": [a.inode for a in anchors],
            "devices": [a.device for a in anchors],
        },
    )


async def anchor_library(ctx: RunContext, plan: Plan, tops: Sequence[str]) -> Anchors:
    """The run's anchors before the walk starts: recorded for a new run, verified for a resumed one.

    Raises LibraryOffline when a root or a selected directory is not there (fenced writes: FenceLost).
    """
    known = {} if plan.fresh else {a.path: a for a in plan.anchors}
    added = await asyncio.to_thread(initial_anchors, tops, ctx.roots, known)
    if plan.fresh or added:
        async with ctx.db.engine.begin() as conn:
            if await fence(conn, ctx.claim, "discovering") is None:
                raise FenceLost
            if plan.fresh:
                await conn.execute(_FORGET_ANCHORS, {"id": ctx.claim.session_id})
            if added:
                await save_anchors(conn, ctx.claim.session_id, added)
    anchors = Anchors(known.values())
    for anchor in added:
        anchors.add(anchor)
    if not plan.fresh:
        # Mount points recorded by the interrupted pass of this run: still mounted?
        offline = await asyncio.to_thread(anchors.check)
        if offline is not None:
            raise offline
    return anchors


_INSERT_ISSUES = text(
    """
    INSERT INTO discovery_issues (session_id, path, reason)
    SELECT :id, t.path, t.reason FROM unnest(CAST(:paths AS text[]), CAST(:reasons AS text[])) AS t(path, reason)
    ON CONFLICT (session_id, path) DO NOTHING
    """
)


@dataclass(slots=True)
class _Asset:
    """One file of the batch as recorded: its asset id and what discovery found about it."""

    id: int
    kind: str  # 'new' | 'changed' | 'unchanged'
    stale: bool = False  # an unchanged file whose recorded hash is of another version of it


async def probe(ctx: RunContext, batch: WalkBatch) -> Sequence[Row[Any]]:
    """The batch's `_PROBE` rows, read on a connection of its own.

    Run for batch k+1 while batch k's transaction writes (`run_discovery`), so on a rescan, where
    the read is much of the work, the database reads and writes on two cores at once. Reading
    outside the batch's transaction is safe: paths are unique within a walk, so no earlier batch of
    this walk writes the rows it reads, and what another session inserts meanwhile is caught by
    `ON CONFLICT` and looked up again.
    """
    files = _unique(batch.files)
    if not files:
        return []
    async with ctx.db.engine.connect() as conn:
        return (await conn.execute(_PROBE, {"paths": [f.path for f in files]})).all()


def _unique(files: list[FoundFile]) -> list[FoundFile]:
    # Paths are unique within a walk; a duplicate would count one file twice.
    return list({f.path: f for f in files}.values())


async def _record(
    conn: AsyncConnection, session_id: int, files: list[FoundFile], rows: Sequence[Row[Any]] | None = None
) -> dict[str, _Asset]:
    """path -> _Asset for every file of the batch, after writing what the batch changes.

    Classified in Python from one read (`_PROBE`), so each write touches only the rows that change:
    new files get an asset, changed ones are updated, files without a job in the session get one,
    and finished jobs of changed (or stale) files go back to pending.
    """
    out: dict[str, _Asset] = {}
    changed: list[tuple[int, FoundFile]] = []
    if rows is None:
        rows = (await conn.execute(_PROBE, {"paths": [f.path for f in files]})).all()
    found = {str(r.path): r for r in rows}
    new = []
    for f in files:
        r = found.get(f.path)
        if r is None:
            new.append(f)
            continue
        if (r.size_bytes, r.mtime_ns) != (f.size, f.mtime_ns):
            out[f.path] = _Asset(int(r.id), "changed")
            changed.append((int(r.id), f))
        else:
            stale = (r.hashed_size_bytes, r.hashed_mtime_ns) != (r.size_bytes, r.mtime_ns)
            out[f.path] = _Asset(int(r.id), "unchanged", stale)
    if changed:
        await conn.execute(
            _UPDATE_CHANGED_ASSETS,
            {
                "ids": [i for i, _f in changed],
                "sizes": [f.size for _i, f in changed],
                "mtimes": [f.mtime_ns for _i, f in changed],
            },
        )
    if new:
        params = {"paths": [f.path for f in new], "sizes": [f.size for f in new], "mtimes": [f.mtime_ns for f in new]}
        for r in (await conn.execute(_INSERT_ASSETS, params)).all():
            out[str(r.path)] = _Asset(int(r.id), "new")
        raced = [f.path for f in new if f.path not in out]
        if raced:  # inserted by another transaction since our read
            for r in (await conn.execute(_LOOKUP_ASSETS, {"paths": raced})).all():
                out[str(r.path)] = _Asset(int(r.id), "unchanged")
    # Every file gets its job; the arbiter (session_id, asset_id) probe skips those that exist, so a
    # rescan inserts nothing.
    await conn.execute(
        _INSERT_JOBS,
        {"id": session_id, "asset_ids": [out[f.path].id for f in files], "subdirectory_ids": [f.top for f in files]},
    )
    outdated = [a.id for a in out.values() if a.kind == "changed" or a.stale]
    if outdated:
        changed_ids = [a.id for a in out.values() if a.kind == "changed"]
        await conn.execute(
            transitions.REOPEN_CHANGED_JOBS, {"id": session_id, "asset_ids": outdated, "changed_ids": changed_ids}
        )
    return out


async def write_batch(
    ctx: RunContext, batch: WalkBatch, totals: DiscoveryTotals, probed: Sequence[Row[Any]] | None = None
) -> None:
    """One fenced transaction per batch; raises FenceLost (after rolling back) when the session is not ours.

    `probed`: the batch's `probe` rows, read ahead; None reads them in this transaction.
    """
    sid = ctx.claim.session_id
    files = _unique(batch.files)
    async with ctx.db.engine.begin() as conn:
        checkpoint = await fence(conn, ctx.claim, "discovering")
        if checkpoint is None:
            raise FenceLost
        counted_from = int(checkpoint.get("images", 0))
        assets = await _record(conn, sid, files, probed) if files else {}
        if batch.issues:
            await conn.execute(
                _INSERT_ISSUES,
                {
                    "id": sid,
                    "paths": [i.path for i in batch.issues],
                    "reasons": [i.reason[:1000] for i in batch.issues],
                },
            )
        if batch.anchors:
            await save_anchors(conn, sid, batch.anchors)
        if batch.fingerprints:
            await conn.execute(
                _SAVE_FINGERPRINTS,
                {
                    "id": sid,
                    "paths": [p for p, _d in batch.fingerprints],
                    "digests": [d for _p, d in batch.fingerprints],
                },
            )
        # Images before position `counted_from` were counted by a pass that crashed or was paused.
        kinds = {"new": 0, "changed": 0, "unchanged": 0}
        positions = batch.positions or range(batch.start_index, batch.start_index + len(batch.files))
        for position, f in zip(positions, batch.files, strict=True):
            if position >= counted_from:
                kinds[assets[f.path].kind] += 1
        for first, count in batch.skipped:  # unchanged directories: every image unchanged
            kinds["unchanged"] += max(0, first + count - max(first, counted_from))
        end = batch.end_index if batch.end_index is not None else batch.start_index + len(batch.files)
        covered = max(counted_from, end)
        committed = await conn.execute(
            transitions.ADVANCE_DISCOVERY,
            {
                "id": sid,
                "directories_scanned": batch.directories_scanned,
                "files_seen": batch.files_seen,
                "images_found": batch.images_found,
                "unreadable": batch.unreadable,
                "current_directory": batch.current_directory,
                **kinds,
                "checkpoint": json.dumps({"images": covered}),
            },
        )
        row = dict(committed.mappings().one())
        fault_point("discovery_batch_before_commit")
    fault_point("discovery_batch_after_commit")
    metrics.FILES_DISCOVERED.inc(len(files) + sum(count for _first, count in batch.skipped))
    ctx.progress(row)
    totals.new += kinds["new"]
    totals.changed += kinds["changed"]
    totals.unchanged += kinds["unchanged"]


# Recursive per-subdirectory counts. Jobs name the selected directory whose walk found them, which
# is the outermost selected one (tops are walked in path order and a directory is walked once), so a
# GROUP BY gives the recursive counts; a selected directory nested in another selected one is counted
# by path prefix (rare, and only for those).
SUBDIRECTORY_COUNTS = text(
    """
    WITH direct AS (
        SELECT subdirectory_id AS id, count(*) AS images,
               count(*) FILTER (WHERE state IN ('completed', 'skipped')) AS trained
          FROM training_jobs WHERE session_id = :id
         GROUP BY subdirectory_id
    ),
    nested AS (
        SELECT s2.id, count(*) AS images,
               count(*) FILTER (WHERE j.state IN ('completed', 'skipped')) AS trained
          FROM session_subdirectories s2
          JOIN training_jobs j ON j.session_id = s2.session_id
          JOIN image_assets a ON a.id = j.asset_id AND starts_with(a.path, rtrim(s2.path, '/') || '/')
         WHERE s2.id = ANY(CAST(:nested_ids AS bigint[]))
         GROUP BY s2.id
    )
    UPDATE session_subdirectories s
       SET image_count = COALESCE(n.images, d.images, 0), trained_count = COALESCE(n.trained, d.trained, 0)
      FROM session_subdirectories s3
      LEFT JOIN direct d ON d.id = s3.id
      LEFT JOIN nested n ON n.id = s3.id
     WHERE s.id = s3.id AND s3.session_id = :id AND s3.selected
    """
)

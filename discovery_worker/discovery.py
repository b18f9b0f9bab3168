"""Discovery (state `discovering`): walk the selected subdirectories and record assets and jobs.

The walk (`imagetraining.walk.Walk`, blocking `os.scandir`) runs in a thread and hands batches to the
event loop through a small bounded queue, so walking the next directories overlaps with writing the
previous batch, and a slow database slows the walk down instead of filling memory.

Each batch is ONE transaction, fenced on the session row (`claims.fence`):
- one read of the batch's files as recorded (`_PROBE`: one probe of the path key per file, read
  ahead while the previous batch writes), classified in Python as new / changed / unchanged by
  (size, mtime_ns); an unchanged asset keeps its hash;
- then only the writes the batch needs: new assets inserted (`unnest`, `ON CONFLICT DO NOTHING`),
  changed ones updated, the session's jobs inserted `ON CONFLICT DO NOTHING` (a rescan inserts
  none), and, only when the batch has changed (or stale) files, their finished jobs sent back to
  `pending` with the training counters down by as many;
- the fingerprints of the directories whose last image is in the batch (`fingerprint`): on a rescan,
  a directory whose fingerprint equals the stored one is only counted, never read or written per file;
- unreadable paths recorded in `discovery_issues` (`ON CONFLICT DO NOTHING`);
- mount points the walk met recorded as library anchors (`library_anchors`);
- counters and the checkpoint advanced.

A library that goes away is not a library that shrank (discovery_worker/library.py): the roots and
selected directories are recorded as anchors when a run's discovery starts and checked when a
claim resumes it; whenever a directory or file fails with an error that could mean "offline", and
once more before the walk is declared complete, the anchors on its way are checked. One missing,
unreadable or replaced raises `LibraryOffline`: the batch in hand is not written, the total is never
finalised from a cut-short walk, and the runner pauses the session with the path in its reason.

Exact counters after a crash (the walk restarts from the beginning; it is deterministic):
- the walk's own counters (directories, files, images, unreadable) count the current pass from
  zero, so they are written as `GREATEST(stored, walk's)`: they never go backwards and end equal to
  the true counts of a full pass;
- new / changed / unchanged cannot be re-derived by a second pass (what the crashed pass upserted
  now looks unchanged). The checkpoint stores how many images of the walk order the committed
  batches covered (`{"images": K}`, in the same transaction as the counters), and a re-walk counts
  only images from position K on. Every image is still upserted (idempotent), so a file added in
  the meantime is never missed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncConnection

from discovery_worker.claims import FenceLost, RunContext, fence
from discovery_worker.faultpoints import fault_point
from discovery_worker.library import SUSPECT_ERRNOS, Anchor, Anchors, initial_anchors
from imagetraining.duplicates import NEAR_DUPLICATE_DISTANCE_DEFAULT, NEAR_DUPLICATE_DISTANCE_MAX
from imagetraining.formats import describe, normalize_extensions
from imagetraining.notifications import notify
from imagetraining.paths import is_within
from imagetraining.walk import FoundFile, Issue, Walk

log = logging.getLogger(__name__)

# A batch is written at least this often while images are found, so progress stays live.
FLUSH_SECONDS = 1.0
# Batches waiting for the writer; the walk blocks beyond this (memory bound, back-pressure).
QUEUE_BATCHES = 2
# Images of one directory held back until the directory is complete (to fingerprint it); a larger
# directory goes on without a fingerprint, as it comes, so memory stays bounded.
MAX_HELD = 10_000


@dataclass(slots=True)
class Plan:
    """What to walk: selected subdirectories (id, path) and the session's walk configuration."""

    subdirectories: list[tuple[int, str]]
    extensions: tuple[str, ...]
    recursive: bool
    batch_size: int
    # directory path -> digest this session recorded (`fingerprint`); equal on a rescan: skipped.
    fingerprints: dict[str, str] = field(default_factory=dict)
    # The run's library anchors recorded so far (library_anchors), and whether this is a new run
    # (no checkpoint yet: anchors of an earlier run are replaced).
    anchors: list[Anchor] = field(default_factory=list)
    fresh: bool = True
    near_duplicate_distance: int = NEAR_DUPLICATE_DISTANCE_DEFAULT
    skip_near_duplicates: bool = False


@dataclass(slots=True)
class WalkBatch:
    files: list[FoundFile] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    start_index: int = 0  # position of files[0] among all images of this walk, in walk order
    # Position of each file when they are not contiguous (directories skipped in between); else None.
    positions: list[int] | None = None
    # Images of directories found unchanged (same fingerprint): (first position, count), not written.
    skipped: list[tuple[int, int]] = field(default_factory=list)
    # (directory, digest) of directories whose last image is in this batch.
    fingerprints: list[tuple[str, str]] = field(default_factory=list)
    # Mount points the walk met since the previous batch: library anchors to record.
    anchors: list[Anchor] = field(default_factory=list)
    end_index: int | None = None  # position after the batch's last image; None: start_index + len(files)
    directories_scanned: int = 0
    files_seen: int = 0
    images_found: int = 0
    unreadable: int = 0
    current_directory: str = ""
    done: bool = False
    error: BaseException | None = None


@dataclass(slots=True)
class DiscoveryTotals:
    """Assets counted by this runner (for the log line)."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0


async def load_plan(ctx: RunContext) -> Plan:
    async with ctx.db.engine.connect() as conn:
        head = (
            await conn.execute(
                text("SELECT config, discovery_checkpoint IS NULL AS fresh FROM training_sessions WHERE id = :id"),
                {"id": ctx.claim.session_id},
            )
        ).one()
        config = head.config
        rows = (
            await conn.execute(
                text(
                    """
                    SELECT id, path FROM session_subdirectories
                     WHERE session_id = :id AND selected
                     ORDER BY path
                    """
                ),
                {"id": ctx.claim.session_id},
            )
        ).all()
        fingerprints = {
            str(r.path): str(r.digest)
            for r in await conn.execute(
                text("SELECT path, digest FROM directory_fingerprints WHERE session_id = :id"),
                {"id": ctx.claim.session_id},
            )
        }
        anchors = [
            Anchor(str(r.path), int(r.inode), int(r.device))
            for r in await conn.execute(
                text("SELECT path, inode, device FROM library_anchors WHERE session_id = :id"),
                {"id": ctx.claim.session_id},
            )
        ]
    config = dict(config or {})
    try:
        extensions = normalize_extensions(config.get("extensions") or ())
    except ValueError:
        extensions = normalize_extensions(())
    batch_size = int(config.get("batch_size") or 0) or ctx.batch_size
    return Plan(
        subdirectories=[(int(r.id), str(r.path)) for r in rows],
        extensions=extensions,
        recursive=bool(config.get("recursive", True)),
        batch_size=max(1, batch_size),
        fingerprints=fingerprints,
        anchors=anchors,
        fresh=bool(head.fresh),
        near_duplicate_distance=min(
            max(int(config.get("near_duplicate_distance", NEAR_DUPLICATE_DISTANCE_DEFAULT)), 0),
            NEAR_DUPLICATE_DISTANCE_MAX,
        ),
        skip_near_duplicates=bool(config.get("skip_near_duplicates", False)),
    )


def _tops_within_roots(plan: Plan, roots: Sequence[Any]) -> list[str]:
    """The selected directories that (still) resolve inside the roots (blocking: realpath)."""
    return [path for _sid, path in plan.subdirectories if is_within(os.path.realpath(path), roots)]


def fingerprint(extensions: tuple[str, ...], files: list[FoundFile]) -> str:
    """Digest of one directory's images as the walk found them: names (in walk order), sizes, mtimes.

    Any file added, removed, renamed, resized or rewritten (a new mtime) changes it, and so does the
    session's extension filter. A file restored with its old size and mtime does not: the same limit
    as comparing (size, mtime) per file, which discovery does anyway.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(",".join(extensions).encode())
    for f in files:
        h.update(f"\n{os.path.basename(f.path)}\0{f.size}\0{f.mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _walk_thread(
    ctx: RunContext,
    plan: Plan,
    anchors: Anchors,
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[WalkBatch],
    abort: threading.Event,
) -> None:
    """Runs in a thread: walk, cut batches, hand them to the loop. Returns when done or stopped.

    Ends with a batch carrying `LibraryOffline` as its error when an anchor goes missing.
    """

    def stopping() -> bool:
        return ctx.stop.is_set() or abort.is_set()

    def put(batch: WalkBatch) -> bool:
        future = asyncio.run_coroutine_threadsafe(queue.put(batch), loop)
        while True:
            try:
                future.result(timeout=0.1)
                return True
            except concurrent.futures.TimeoutError:
                if stopping():
                    future.cancel()
                    return False

    pre_issues: list[Issue] = []
    tops: list[str] = []
    for _sid, path in plan.subdirectories:
        # Control validated the selection; a root changed since (or a path swapped for a symlink) is refused here.
        if is_within(os.path.realpath(path), ctx.roots):
            tops.append(path)
        else:
            tops.append("")
            pre_issues.append(Issue(path, "outside the configured library roots; not walked"))
    walk = Walk(
        [t for t in tops if t],
        plan.extensions,
        ctx.roots,
        recursive=plan.recursive,
        should_stop=stopping,
    )
    # Walk.top indexes the walked list; map it back to the subdirectory row.
    walked_ids = [sid for (sid, _p), t in zip(plan.subdirectories, tops, strict=True) if t]
    index = 0  # position of the next image in walk order
    batch = WalkBatch(issues=list(pre_issues), positions=[])
    last_flush = time.monotonic()

    def cut(done: bool) -> WalkBatch:
        c = walk.counters
        batch.start_index = batch.positions[0] if batch.positions else index
        batch.end_index = index
        batch.directories_scanned = c.directories_scanned
        batch.files_seen = c.files_seen
        # Images handed over so far (a directory being fingerprinted is held back until complete).
        batch.images_found = c.images_found if done else min(index, c.images_found)
        batch.unreadable = c.issues + len(pre_issues)
        batch.current_directory = "" if done else c.current_directory
        batch.done = done
        return batch

    def images(b: WalkBatch) -> int:
        return len(b.files) + sum(n for _start, n in b.skipped)

    def maybe_send() -> bool:
        """Cut and hand over the batch when full or due; False when the run is stopping."""
        nonlocal batch, last_flush
        full = images(batch) >= plan.batch_size or len(batch.issues) >= plan.batch_size
        if full or time.monotonic() - last_flush >= FLUSH_SECONDS:
            if not put(cut(False)):
                return False
            batch = WalkBatch(positions=[])
            last_flush = time.monotonic()
        return True

    # A directory's images come from the walk one after another; they are held until the directory
    # is complete, then either skipped (same fingerprint as this session recorded) or added.
    held: list[FoundFile] = []
    held_dir: str | None = None
    overflowed = False  # more than MAX_HELD images: added as they come, no fingerprint

    def add(files: list[FoundFile]) -> bool:
        """Append images to the batch, handing it over whenever it fills; never after the last one
        (the caller may still attach that directory's fingerprint to its batch)."""
        nonlocal index
        for f in files:
            if not maybe_send():
                return False
            batch.files.append(f)
            assert batch.positions is not None
            batch.positions.append(index)
            index += 1
        return True

    def release() -> bool:
        nonlocal index, held, held_dir, overflowed
        if held_dir is None:
            return True
        digest = None if overflowed else fingerprint(plan.extensions, held)
        if digest is not None and plan.fingerprints.get(held_dir) == digest:
            batch.skipped.append((index, len(held)))
            index += len(held)
        else:
            if not add(held):
                return False
            if digest is not None:
                batch.fingerprints.append((held_dir, digest))
        held, held_dir, overflowed = [], None, False
        return maybe_send()

    mounts_seen = 0

    def take_mounts() -> None:
        """Mount points met since the last call become anchors (checked from now on, recorded with the batch)."""
        nonlocal mounts_seen
        for path, inode, device in walk.mounts[mounts_seen:]:
            anchor = Anchor(path, inode, device)
            if anchors.add(anchor):
                batch.anchors.append(anchor)
        mounts_seen = len(walk.mounts)

    try:
        for item in walk:
            if len(walk.mounts) > mounts_seen:
                take_mounts()
            if isinstance(item, FoundFile):
                item.top = walked_ids[item.top]  # from here on: the subdirectory id
                directory = os.path.dirname(item.path)
                if directory != held_dir:
                    if not release():
                        return
                    held_dir = directory
                held.append(item)
                if len(held) > MAX_HELD:
                    overflowed = True
                    if not add(held):
                        return
                    held = []
                    if not maybe_send():
                        return
            else:
                if item.errno in SUSPECT_ERRNOS:
                    # Gone or unreadable: one directory, or the whole library (an unmount, a rename)?
                    offline = anchors.check([item.path])
                    if offline is not None:
                        put(WalkBatch(done=True, error=offline))
                        return
                batch.issues.append(item)
                if not maybe_send():
                    return
        if walk.stopped or stopping():
            return
        take_mounts()
        # A walk that ran to the end may still have been cut short by a library that went away
        # between two directories: the total is only final if every anchor is still there.
        offline = anchors.check()
        if offline is not None:
            put(WalkBatch(done=True, error=offline))
            return
        if not release():
            return
        put(cut(True))
    except BaseException as exc:  # reported to the loop, which fails the runner with it
        put(WalkBatch(done=True, error=exc))


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

# Finished jobs whose file changed (or whose hash is stale: another session saw the change first)
# go back to pending; the counters that counted them go down in the same statement. Only run for a
# batch that has such files. One pass over the session's job key for the batch, never one per file:
# the jobs are not probed per file anywhere, because right after a new session's first batches the
# statistics say it has no jobs and the planner may then walk all of them through
# (session_id, state, id) for every probe (seen: 100,000 files taking 100 s).
_RESET_JOBS = text(
    """
    WITH old AS (
        SELECT id, state FROM training_jobs
         WHERE session_id = :id AND asset_id = ANY(CAST(:asset_ids AS bigint[]))
           AND CASE WHEN asset_id = ANY(CAST(:changed_ids AS bigint[]))
                    THEN state IN ('completed', 'failed', 'skipped')
                    ELSE state IN ('completed', 'skipped')
               END
           FOR UPDATE
    ),
    reset AS (
        UPDATE training_jobs j
           SET state = 'pending', error_class = '', error_message = '', skip_reason = '',
               duplicate_of_asset_id = NULL, near_duplicate_of_asset_id = NULL, near_duplicate_distance = NULL,
               update_time = now()
          FROM old WHERE j.id = old.id
        RETURNING old.state AS old_state
    )
    UPDATE training_sessions
       SET processed_images = processed_images - (SELECT count(*) FROM reset WHERE old_state = 'completed'),
           failed_images = failed_images - (SELECT count(*) FROM reset WHERE old_state = 'failed'),
           skipped_images = skipped_images - (SELECT count(*) FROM reset WHERE old_state = 'skipped')
     WHERE id = :id
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

_ADVANCE = text(
    """
    UPDATE training_sessions
       SET directories_scanned = GREATEST(directories_scanned, :directories_scanned),
           files_seen = GREATEST(files_seen, :files_seen),
           images_found = GREATEST(images_found, :images_found),
           unreadable_paths = GREATEST(unreadable_paths, :unreadable),
           current_directory = :current_directory,
           assets_new = assets_new + :new,
           assets_changed = assets_changed + :changed,
           assets_unchanged = assets_unchanged + :unchanged,
           discovery_checkpoint = CAST(:checkpoint AS jsonb)
     WHERE id = :id
    RETURNING *
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
        await conn.execute(_RESET_JOBS, {"id": session_id, "asset_ids": outdated, "changed_ids": changed_ids})
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
            _ADVANCE,
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
    ctx.progress(row)
    totals.new += kinds["new"]
    totals.changed += kinds["changed"]
    totals.unchanged += kinds["unchanged"]


_TO_RUNNING = text(
    """
    UPDATE training_sessions
       SET state = 'running', total_final = true,
           total_images = (SELECT count(*) FROM training_jobs WHERE session_id = :id),
           discovery_finished_at = now(), current_directory = '',
           update_time = now(), event_sequence = event_sequence + 1
     WHERE id = :id
    RETURNING *
    """
)

_NO_IMAGES = text(
    """
    UPDATE training_sessions
       SET state = 'failed', state_reason = :reason, total_final = true, total_images = 0,
           discovery_finished_at = now(), end_time = now(), current_directory = '',
           owner_id = NULL, owner_address = NULL, lease_expires_at = NULL,
           update_time = now(), event_sequence = event_sequence + 1
     WHERE id = :id
    RETURNING *
    """
)

# Recursive per-subdirectory counts. Jobs name the selected directory whose walk found them, which
# is the outermost selected one (tops are walked in path order and a directory is walked once), so a
# GROUP BY gives the recursive counts; a selected directory nested in another selected one is counted
# by path prefix (rare, and only for those).
_SUBDIRECTORY_COUNTS = text(
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


def nested_ids(subdirectories: list[tuple[int, str]]) -> list[int]:
    """Selected directories that lie inside another selected directory."""
    prefixes = [p.rstrip("/") + "/" for _i, p in subdirectories]
    return [sid for sid, path in subdirectories if any(path.startswith(q) and path + "/" != q for q in prefixes)]


def no_images_reason(plan: Plan) -> str:
    searched = ", ".join(p for _i, p in plan.subdirectories) or "(no subdirectory selected)"
    return (
        "Selected subdirectories contain no image files. "
        f"Supported formats: {describe(plan.extensions)}. Searched: {searched}"
    )


async def finish(ctx: RunContext, plan: Plan, final: WalkBatch) -> tuple[str, int]:
    """Fenced end of the walk: -> running with the final total, or -> failed when nothing was found.

    Returns (new state, total images). Raises FenceLost.
    """
    sid = ctx.claim.session_id
    fault_point("before_running_transition")
    async with ctx.db.engine.begin() as conn:
        if await fence(conn, ctx.claim, "discovering") is None:
            raise FenceLost
        if final.images_found == 0:
            row = dict((await conn.execute(_NO_IMAGES, {"id": sid, "reason": no_images_reason(plan)})).mappings().one())
        else:
            row = dict((await conn.execute(_TO_RUNNING, {"id": sid})).mappings().one())
        ctx.acknowledge(row)
        await conn.execute(_SUBDIRECTORY_COUNTS, {"id": sid, "nested_ids": nested_ids(plan.subdirectories)})
        await notify(conn, sid)
    ctx.state(row)
    return str(row["state"]), int(row["total_images"])


async def run_discovery(ctx: RunContext) -> tuple[str, int, DiscoveryTotals, WalkBatch | None]:
    """Walk and write until done; returns (state reached: 'running' | 'failed' | 'stopped', total, totals, last batch).

    Raises FenceLost when a write found the session no longer ours.
    """
    plan = await load_plan(ctx)
    tops = await asyncio.to_thread(_tops_within_roots, plan, ctx.roots)
    anchors = await anchor_library(ctx, plan, tops)
    totals = DiscoveryTotals()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[WalkBatch] = asyncio.Queue(maxsize=QUEUE_BATCHES)
    abort = threading.Event()
    walker = loop.run_in_executor(None, _walk_thread, ctx, plan, anchors, loop, queue, abort)
    stop_wait = asyncio.ensure_future(ctx.stop.event.wait())
    final: WalkBatch | None = None
    ahead: tuple[WalkBatch, asyncio.Task[Sequence[Row[Any]]] | None] | None = None
    try:
        while True:
            if ahead is None:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if ctx.stop.is_set():
                    getter.cancel()
                    return "stopped", 0, totals, final
                batch = getter.result()
                if batch.error is not None:
                    raise batch.error
                probed = None
            else:
                batch, reading = ahead
                ahead = None
                if batch.error is not None:
                    raise batch.error
                probed = None if reading is None else await reading
            if not batch.done and not queue.empty():
                # Read the next batch's rows while this one writes (see `probe`).
                following = queue.get_nowait()
                reading = None if following.error is not None else asyncio.create_task(probe(ctx, following))
                ahead = (following, reading)
            await write_batch(ctx, batch, totals, probed)
            final = batch
            if batch.done:
                break
            if ctx.stop.is_set():
                return "stopped", 0, totals, final
        state, total = await finish(ctx, plan, batch)
        return state, total, totals, final
    finally:
        stop_wait.cancel()
        if ahead is not None and ahead[1] is not None:
            ahead[1].cancel()
            await asyncio.gather(ahead[1], return_exceptions=True)
        # The thread has finished, or returns within ~0.2 s of this (its walk and its put poll `abort`).
        abort.set()
        await asyncio.wait({walker}, timeout=5.0)

"""The discovery walk's thread: walk the selected directories and cut what it finds into batches.

`imagetraining.walk.Walk` (blocking `os.scandir`) runs in a thread of its own, never on the event
loop; a `Batcher` turns its stream of files and issues into `WalkBatch`es and hands each to the
loop through a small bounded queue (`discovery_worker.discovery` writes them), so walking the next
directories overlaps with writing the previous batch, and a slow database slows the walk down
instead of filling memory.

A directory's images are held until the directory is complete, then fingerprinted
(`fingerprint`): on a rescan, a directory whose fingerprint equals the one this session recorded is
only counted, never read or written per file. A directory of more than `MAX_HELD` images goes on
without a fingerprint, as it comes, so memory stays bounded.

Batches carry positions in walk order (the walk is deterministic), which the writer uses to count
new / changed / unchanged exactly once across crashes (see discovery_worker/discovery.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from discovery_worker.claims import RunContext
from discovery_worker.library import SUSPECT_ERRNOS, Anchor, Anchors
from discovery_worker.plan import Plan
from imagetraining.paths import is_within
from imagetraining.walk import FoundFile, Issue, Walk

# A batch is handed over at least this often while images are found, so progress stays live.
FLUSH_SECONDS = 1.0
# Images of one directory held back until the directory is complete (to fingerprint it); a larger
# directory goes on without a fingerprint, as it comes, so memory stays bounded.
MAX_HELD = 10_000


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


class Batcher:
    """Cuts one walk into batches: full (`batch_size` images or issues) or due (`FLUSH_SECONDS`).

    `put` hands a batch over and returns False when the run is stopping; every method that may hand
    one over returns that answer, and the walk ends at the first False.
    """

    def __init__(self, walk: Walk, plan: Plan, anchors: Anchors, put: Callable[[WalkBatch], bool], pre_issues: int):
        self.walk = walk
        self.plan = plan
        self.anchors = anchors
        self.put = put
        self.pre_issues = pre_issues  # issues found before the walk (tops refused), counted as unreadable
        self.index = 0  # position of the next image in walk order
        self.batch = WalkBatch(positions=[])
        self.last_flush = time.monotonic()
        # The directory whose images are held until it is complete.
        self.held: list[FoundFile] = []
        self.held_dir: str | None = None
        self.overflowed = False  # more than MAX_HELD images: added as they come, no fingerprint
        self.mounts_seen = 0

    def cut(self, done: bool) -> WalkBatch:
        """The batch in hand, with the walk's counters as of now."""
        batch, c = self.batch, self.walk.counters
        batch.start_index = batch.positions[0] if batch.positions else self.index
        batch.end_index = self.index
        batch.directories_scanned = c.directories_scanned
        batch.files_seen = c.files_seen
        # Images handed over so far (a directory being fingerprinted is held back until complete).
        batch.images_found = c.images_found if done else min(self.index, c.images_found)
        batch.unreadable = c.issues + self.pre_issues
        batch.current_directory = "" if done else c.current_directory
        batch.done = done
        return batch

    def send_if_due(self) -> bool:
        """Cut and hand over the batch when full or due."""
        batch, size = self.batch, self.plan.batch_size
        images = len(batch.files) + sum(n for _start, n in batch.skipped)
        if images >= size or len(batch.issues) >= size or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            if not self.put(self.cut(False)):
                return False
            self.batch = WalkBatch(positions=[])
            self.last_flush = time.monotonic()
        return True

    def add(self, files: list[FoundFile]) -> bool:
        """Append images, handing the batch over whenever it fills; never after the last one (the
        caller may still attach that directory's fingerprint to its batch)."""
        for f in files:
            if not self.send_if_due():
                return False
            self.batch.files.append(f)
            assert self.batch.positions is not None
            self.batch.positions.append(self.index)
            self.index += 1
        return True

    def hold(self, item: FoundFile) -> bool:
        """An image of the walk: held with its directory's other images, or streamed past MAX_HELD."""
        directory = os.path.dirname(item.path)
        if directory != self.held_dir:
            if not self.release():
                return False
            self.held_dir = directory
        self.held.append(item)
        if len(self.held) > MAX_HELD:
            self.overflowed = True
            if not self.add(self.held):
                return False
            self.held = []
            return self.send_if_due()
        return True

    def release(self) -> bool:
        """The held directory is complete: skipped (same fingerprint as recorded) or added."""
        if self.held_dir is None:
            return True
        digest = None if self.overflowed else fingerprint(self.plan.extensions, self.held)
        if digest is not None and self.plan.fingerprints.get(self.held_dir) == digest:
            self.batch.skipped.append((self.index, len(self.held)))
            self.index += len(self.held)
        else:
            if not self.add(self.held):
                return False
            if digest is not None:
                self.batch.fingerprints.append((self.held_dir, digest))
        self.held, self.held_dir, self.overflowed = [], None, False
        return self.send_if_due()

    def issue(self, item: Issue) -> bool:
        self.batch.issues.append(item)
        return self.send_if_due()

    def take_mounts(self) -> None:
        """Mount points met since the last call become anchors (checked from now on, recorded with the batch)."""
        for path, inode, device in self.walk.mounts[self.mounts_seen :]:
            anchor = Anchor(path, inode, device)
            if self.anchors.add(anchor):
                self.batch.anchors.append(anchor)
        self.mounts_seen = len(self.walk.mounts)


def walk_thread(
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
    walk = Walk([t for t in tops if t], plan.extensions, ctx.roots, recursive=plan.recursive, should_stop=stopping)
    # Walk.top indexes the walked list; map it back to the subdirectory row.
    walked_ids = [sid for (sid, _p), t in zip(plan.subdirectories, tops, strict=True) if t]
    batcher = Batcher(walk, plan, anchors, put, len(pre_issues))
    batcher.batch.issues.extend(pre_issues)
    try:
        for item in walk:
            if len(walk.mounts) > batcher.mounts_seen:
                batcher.take_mounts()
            if isinstance(item, FoundFile):
                item.top = walked_ids[item.top]  # from here on: the subdirectory id
                if not batcher.hold(item):
                    return
                continue
            if item.errno in SUSPECT_ERRNOS:
                # Gone or unreadable: one directory, or the whole library (an unmount, a rename)?
                offline = anchors.check([item.path])
                if offline is not None:
                    put(WalkBatch(done=True, error=offline))
                    return
            if not batcher.issue(item):
                return
        if walk.stopped or stopping():
            return
        batcher.take_mounts()
        # A walk that ran to the end may still have been cut short by a library that went away
        # between two directories: the total is only final if every anchor is still there.
        offline = anchors.check()
        if offline is not None:
            put(WalkBatch(done=True, error=offline))
            return
        if not batcher.release():
            return
        put(batcher.cut(True))
    except BaseException as exc:  # reported to the loop, which fails the runner with it
        put(WalkBatch(done=True, error=exc))

"""Is the library there? A session's anchors, and the check that tells "offline" from "one file gone".

Photo libraries live on NAS shares and external disks. When a share drops, every file under it
"vanishes" at once; the worst thing photo software can do then is believe it (mark the images
deleted, shrink the total, call the run complete). So a file that is gone or unreadable is only
counted as such after this check says the library itself is there.

Anchors are the directories whose absence means "the library is offline", not "a file is gone":
- the configured library root that holds each selected directory,
- each selected directory,
- each mount point the walk meets under them (a directory on another device than its parent).

Each is recorded with its inode (`library_anchors`): roots and selected directories when a run's
discovery starts, mount points as the walk meets them. An anchor is there when it exists, is a
directory that can be listed, and has the recorded inode. The inode and not the device: a network
share mounted again may get a new device number but keeps its inodes, while the empty directory an
unmount leaves behind (or a directory renamed away and replaced) is another inode.

Everything here touches the filesystem: call it from a thread or a pool process, never the loop.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from imagetraining.paths import is_within

# Errors that may mean "the library is gone" rather than "this file is bad": worth an anchor check.
SUSPECT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.ENOTCONN,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENODEV,
        errno.ENXIO,
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.ENOMEDIUM,
    }
)
# Job failure classes that may be the library's fault rather than the file's.
SUSPECT_ERROR_CLASSES = frozenset({"vanished", "unreadable"})


@dataclass(frozen=True, slots=True)
class Anchor:
    path: str
    inode: int
    device: int


class LibraryOffline(Exception):
    """An anchor is missing, unreadable or replaced: the session must stop, not mark files gone."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        return (
            f"library offline: {self.path} {self.problem}. Nothing was marked missing and the total was "
            "kept. Bring it back (mount it, rename it back, fix its permissions), then ResumeSession; "
            "if the library moved for good, CancelSession and RestartSession(ALL) walk it afresh"
        )


def identify(path: str) -> Anchor:
    """The anchor of `path` as it is now; raises LibraryOffline when it cannot be used."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise LibraryOffline(path, f"is missing or unreachable ({err.strerror or err})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise LibraryOffline(path, "is no longer a directory")
    _listable(path)
    return Anchor(path, st.st_ino, st.st_dev)


def _listable(path: str) -> None:
    try:
        with os.scandir(path) as it:
            next(it, None)
    except OSError as err:
        raise LibraryOffline(path, f"cannot be read ({err.strerror or err})") from None


def verify(anchor: Anchor) -> LibraryOffline | None:
    """None when the anchor is there as recorded, else why not."""
    try:
        st = os.stat(anchor.path)
    except OSError as err:
        return LibraryOffline(anchor.path, f"is missing or unreachable ({err.strerror or err})")
    if not stat.S_ISDIR(st.st_mode):
        return LibraryOffline(anchor.path, "is no longer a directory")
    if st.st_ino != anchor.inode:
        return LibraryOffline(
            anchor.path, "is not the directory this session walked (unmounted, or replaced by another directory)"
        )
    try:
        _listable(anchor.path)
    except LibraryOffline as offline:
        return offline
    return None


class Anchors:
    """A session's anchors by path, with the lookups the checks need."""

    def __init__(self, anchors: Iterable[Anchor] = ()) -> None:
        self.by_path: dict[str, Anchor] = {a.path: a for a in anchors}

    def __len__(self) -> int:
        return len(self.by_path)

    def add(self, anchor: Anchor) -> bool:
        """Record an anchor unless one is known for that path; True when it is new."""
        if anchor.path in self.by_path:
            return False
        self.by_path[anchor.path] = anchor
        return True

    def on_the_way(self, path: str) -> list[Anchor]:
        """The anchors that `path` lies at or under, outermost first."""
        out: list[Anchor] = []
        current = path.rstrip("/") or "/"
        while True:
            anchor = self.by_path.get(current)
            if anchor is not None:
                out.append(anchor)
            if current == "/":
                break
            current = os.path.dirname(current)
        out.reverse()
        return out

    def check(self, paths: Iterable[str] | None = None) -> LibraryOffline | None:
        """The first anchor (outermost first) on the way to any of `paths` (all when None) that is not there."""
        if paths is None:
            todo = sorted(self.by_path.values(), key=lambda a: (a.path.count("/"), a.path))
        else:
            seen: dict[str, Anchor] = {}
            for p in paths:
                for a in self.on_the_way(p):
                    seen.setdefault(a.path, a)
            todo = sorted(seen.values(), key=lambda a: (a.path.count("/"), a.path))
        for anchor in todo:
            offline = verify(anchor)
            if offline is not None:
                return offline
        return None


def root_of(path: str, roots: Iterable[Path]) -> str | None:
    """The configured library root that holds `path` (the innermost, if roots nest)."""
    best: str | None = None
    for root in roots:
        r = str(root)
        if is_within(path, [root]) and (best is None or len(r) > len(best)):
            best = r
    return best


def initial_anchors(tops: Iterable[str], roots: Iterable[Path], known: Mapping[str, Anchor]) -> list[Anchor]:
    """Anchors for the roots and selected directories not yet recorded (blocking).

    Raises LibraryOffline naming the outermost one that is missing or unreadable: a selected
    directory that is not there at the start of a run is a library that is not there.
    """
    roots = list(roots)
    wanted: list[str] = []
    for top in tops:
        root = root_of(os.path.realpath(top), roots)
        if root is not None and root not in wanted:
            wanted.append(root)
    for top in tops:
        if top not in wanted:
            wanted.append(top)
    wanted.sort(key=lambda p: (p.count("/"), p))
    out: list[Anchor] = []
    for path in wanted:
        recorded = known.get(path)
        if recorded is not None:
            offline = verify(recorded)
            if offline is not None:
                raise offline
            continue
        out.append(identify(path))
    return out

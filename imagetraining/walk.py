"""Directory walking: `os.scandir` recursion shared by discovery (worker) and counting (control).

Blocking by nature: run it in a thread, never on an event loop. Properties every caller relies on:
- deterministic order (entries sorted by name, depth first, pre-order);
- extensions matched case-insensitively;
- symlinks followed only when their target lies inside a library root; a directory reached twice
  (symlink loop, or a link to an ancestor) is walked once;
- unreadable directories and files are reported as `Issue`s (with the errno, so the caller can ask
  whether the library itself went away) and the walk goes on;
- a name that is not valid UTF-8 (PostgreSQL text and protobuf strings cannot carry it) costs only
  its own entry: an `Issue` whose path shows the bad bytes as `\\xNN`; such a directory is not entered;
- every directory is resolved before it is listed: one swapped for a symlink out of the roots since
  it was found is reported, not listed;
- mount points met under the tops (a directory on another device than its parent) are collected in
  `mounts`, for the worker's library-offline check (discovery_worker/library.py);
- `should_stop` is polled on a time cadence (also inside huge directories) so that pause and
  cancel, a file cap or a deadline end the walk promptly.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagetraining.formats import suffix_set
from imagetraining.paths import is_utf8, is_within, printable

_CHECK_EVERY_ENTRIES = 256


@dataclass(slots=True)
class FoundFile:
    """An image file: path as found (not resolved), size and mtime for change detection."""

    path: str
    size: int
    mtime_ns: int
    top: int  # index of the walked top directory it was found under


@dataclass(slots=True)
class Issue:
    """A path the walk could not read or refused to follow, with the reason (and the errno, if any).

    `path` is always valid UTF-8 (a name that is not is shown with `\\xNN` escapes).
    """

    path: str
    reason: str
    errno: int | None = None


NOT_UTF8 = "name is not valid UTF-8 (shown with \\x escapes); rename it to include it"


@dataclass(slots=True)
class WalkCounters:
    directories_scanned: int = 0
    files_seen: int = 0
    images_found: int = 0
    issues: int = 0
    current_directory: str = ""


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


@dataclass
class Walk:
    """Iterate over `FoundFile`s and `Issue`s under `tops`; read `counters` at any time.

    `stopped` says that `should_stop` ended the walk; `truncated` that `max_files` or `deadline`
    (a `time.monotonic()` value) did.
    """

    tops: Sequence[str]
    extensions: Iterable[str]
    roots: Sequence[Path]
    recursive: bool = True
    with_stat: bool = True
    should_stop: Callable[[], bool] | None = None
    check_interval: float = 0.2
    max_files: int | None = None
    deadline: float | None = None
    visited: set[tuple[int, int]] = field(default_factory=set)
    counters: WalkCounters = field(default_factory=WalkCounters)
    stopped: bool = False
    truncated: bool = False
    # (path, inode, device) of each mount point met below a top, in walk order.
    mounts: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._suffixes = suffix_set(self.extensions)
        self._next_check = 0.0
        self._entries_since_check = 0

    def _halt(self) -> bool:
        """True when the walk must end now; cheap enough to call per entry."""
        if self.stopped or self.truncated:
            return True
        if self.max_files is not None and self.counters.files_seen >= self.max_files:
            self.truncated = True
            return True
        self._entries_since_check += 1
        if self._entries_since_check < _CHECK_EVERY_ENTRIES and self._next_check:
            return False
        self._entries_since_check = 0
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            self.truncated = True
            return True
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            if self.should_stop is not None and self.should_stop():
                self.stopped = True
                return True
        return False

    def _matches(self, name: str) -> bool:
        dot = name.rfind(".")
        return dot > 0 and name[dot:].lower() in self._suffixes

    def __iter__(self) -> Iterator[FoundFile | Issue]:
        for index, top in enumerate(self.tops):
            yield from self._walk_top(top, index)
            if self.stopped or self.truncated:
                return

    def _issue(self, path: str, reason: str, err: OSError | None = None) -> Issue:
        self.counters.issues += 1
        return Issue(path if is_utf8(path) else printable(path), reason, None if err is None else err.errno)

    def _walk_top(self, top: str, index: int) -> Iterator[FoundFile | Issue]:
        c = self.counters
        # (directory, device of the directory it was found in; None for the top)
        stack: list[tuple[str, int | None]] = [(top, None)]
        while stack:
            if self._halt():
                return
            directory, parent_device = stack.pop()
            try:
                # Found as a directory inside the roots, but it may have been swapped for a symlink
                # since: resolve before listing, so nothing outside the roots is ever listed.
                if not is_within(os.path.realpath(directory), self.roots):
                    yield self._issue(directory, "now leads outside the library roots (a symlink?); not walked")
                    continue
                st = os.stat(directory)
            except OSError as err:
                yield self._issue(directory, _reason(err), err)
                continue
            key = (st.st_dev, st.st_ino)
            if key in self.visited:
                continue
            self.visited.add(key)
            if parent_device is not None and st.st_dev != parent_device:
                self.mounts.append((directory, st.st_ino, st.st_dev))
            try:
                with os.scandir(directory) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as err:
                yield self._issue(directory, _reason(err), err)
                continue
            c.directories_scanned += 1
            c.current_directory = directory
            subdirs: list[str] = []
            for entry in entries:
                if self._halt():
                    return
                name = entry.name
                if not name.isascii() and not is_utf8(name):
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        c.files_seen += 1
                    if is_dir or self._matches(name):
                        yield self._issue(entry.path, NOT_UTF8)
                    continue
                try:
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if not is_within(target, self.roots):
                            yield self._issue(entry.path, "symlink points outside the library roots; not followed")
                            continue
                        if os.path.isdir(target):
                            if self.recursive:
                                subdirs.append(entry.path)
                            continue
                        if not os.path.isfile(target):
                            yield self._issue(entry.path, "broken symlink or symlink loop")
                            continue
                        c.files_seen += 1
                        if not self._matches(entry.name):
                            continue
                        fst = os.stat(entry.path) if self.with_stat else None
                    else:
                        if entry.is_dir(follow_symlinks=False):
                            if self.recursive:
                                subdirs.append(entry.path)
                            continue
                        if not entry.is_file(follow_symlinks=False):
                            continue  # fifo, socket, device: not a file
                        c.files_seen += 1
                        if not self._matches(entry.name):
                            continue
                        fst = entry.stat(follow_symlinks=False) if self.with_stat else None
                except OSError as err:
                    yield self._issue(entry.path, _reason(err), err)
                    continue
                c.images_found += 1
                if fst is None:
                    yield FoundFile(entry.path, 0, 0, index)
                else:
                    yield FoundFile(entry.path, fst.st_size, fst.st_mtime_ns, index)
            stack.extend((d, st.st_dev) for d in reversed(subdirs))
        c.current_directory = ""


@dataclass(slots=True)
class DirectoryCount:
    path: str
    image_count: int
    truncated: bool


def count_images(
    directories: Sequence[str],
    extensions: Iterable[str],
    roots: Sequence[Path],
    *,
    recursive: bool = True,
    max_files: int,
    deadline: float,
) -> tuple[list[DirectoryCount], bool]:
    """Recursive image counts per directory within one shared file budget and deadline.

    Returns the counts and whether any was cut short. No stat per file: names and types only.
    """
    extensions = tuple(extensions)
    out: list[DirectoryCount] = []
    seen = 0
    any_truncated = False
    for directory in directories:
        walk = Walk(
            [directory],
            extensions,
            roots,
            recursive=recursive,
            with_stat=False,
            max_files=max(max_files - seen, 0),
            deadline=deadline,
        )
        images = sum(1 for item in walk if isinstance(item, FoundFile))
        seen += walk.counters.files_seen
        truncated = walk.truncated
        any_truncated |= truncated
        out.append(DirectoryCount(directory, images, truncated))
    return out, any_truncated


def list_subdirectories(
    path: str, roots: Sequence[Path], limit: int, unusable: list[str] | None = None
) -> tuple[list[str], bool]:
    """Immediate subdirectories of `path`, sorted by name, symlinks only if they stay in the roots.

    Returns at most `limit` paths and whether there were more. A subdirectory whose name is not valid
    UTF-8 cannot be stored or sent: it is left out, and appended to `unusable` (escaped) if given.
    """
    out: list[str] = []
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if not entry.name.isascii() and not is_utf8(entry.name):
            with contextlib.suppress(OSError):
                if unusable is not None and entry.is_dir():
                    unusable.append(printable(entry.path))
            continue
        try:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not (is_within(target, roots) and os.path.isdir(target)):
                    continue
            elif not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        if len(out) >= limit:
            return out, True
        out.append(entry.path)
    return out, False


def has_direct_images(
    path: str, extensions: Iterable[str], roots: Sequence[Path], *, max_files: int, deadline: float
) -> bool:
    """Does `path` itself hold at least one image (not counting subdirectories)? Stops at the first."""
    direct = Walk(
        [path], tuple(extensions), roots, recursive=False, with_stat=False, max_files=max_files, deadline=deadline
    )
    return any(isinstance(item, FoundFile) for item in direct)


@dataclass(slots=True)
class ScanResult:
    path: str
    subdirectories: list[DirectoryCount]
    direct_image_count: int
    truncated: bool
    # Subdirectories left out because their names are not valid UTF-8 (escaped with \xNN).
    unusable: list[str] = field(default_factory=list)


def scan_directory(
    path: str,
    extensions: Iterable[str],
    roots: Sequence[Path],
    *,
    max_files: int,
    deadline: float,
    max_subdirectories: int = 1000,
) -> ScanResult:
    """Immediate subdirectories of `path` with recursive image counts, plus images directly in it."""
    extensions = tuple(extensions)
    unusable: list[str] = []
    subdirs, more = list_subdirectories(path, roots, max_subdirectories, unusable)
    direct = Walk([path], extensions, roots, recursive=False, with_stat=False, max_files=max_files, deadline=deadline)
    direct_count = sum(1 for item in direct if isinstance(item, FoundFile))
    counts, truncated = count_images(
        subdirs,
        extensions,
        roots,
        max_files=max(max_files - direct.counters.files_seen, 0),
        deadline=deadline,
    )
    return ScanResult(path, counts, direct_count, truncated or more or direct.truncated, unusable)

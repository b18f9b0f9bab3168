"""The file-system counts of ScanDirectory and ValidateSession: bounded, off the event loop.

Both count image files with the same walk as discovery (imagetraining/walk.py) within
IMAGETRAINING_SCAN_MAX_FILES and the earlier of IMAGETRAINING_SCAN_MAX_SECONDS and the caller's
deadline; a count cut short says so (`truncated`) instead of failing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagetraining import walk
from imagetraining.errors import InvalidArgument, PreconditionViolation
from imagetraining.formats import normalize_extensions
from imagetraining.paths import is_within, resolve_directory
from imagetraining.settings import Settings
from imagetraining.states import SessionState

# Counting stops this long before the caller's deadline so that the answer still reaches it.
DEADLINE_MARGIN_SECONDS = 0.5


@dataclass(frozen=True)
class ScanOutcome:
    path: str
    subdirectories: list[walk.DirectoryCount]
    direct_image_count: int
    truncated: bool
    extensions: tuple[str, ...]
    unusable: list[str]


@dataclass(frozen=True)
class Validation:
    valid: bool
    problems: list[PreconditionViolation]
    state: SessionState
    image_count: int
    truncated: bool
    selected: list[walk.DirectoryCount]
    subdirectories_total: int
    subdirectories_selected: int
    supported_formats: tuple[str, ...]


class Counting:
    """Bounded image counts for one control process's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.roots = settings.library_roots

    def deadline(self, time_remaining: float | None) -> float:
        """A monotonic deadline: the configured cap, or sooner if the caller's deadline is nearer."""
        budget = self.settings.scan_max_seconds
        if time_remaining is not None:
            budget = min(budget, time_remaining - DEADLINE_MARGIN_SECONDS)
        return time.monotonic() + max(budget, 0.0)

    def max_files(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument.field("max_files", "must not be negative")
        cap = self.settings.scan_max_files
        return min(requested or cap, cap)

    async def scan_directory(
        self, path: str, extensions: Sequence[str], max_files: int, time_remaining: float | None
    ) -> ScanOutcome:
        """ScanDirectory: immediate subdirectories with recursive image counts, within a cap and deadline."""
        try:
            exts = normalize_extensions(extensions)
        except ValueError as err:
            raise InvalidArgument.field("extensions", str(err)) from None
        limit = self.max_files(max_files)
        deadline = self.deadline(time_remaining)

        def scan() -> walk.ScanResult:
            resolved = resolve_directory(path, self.roots, "path")
            try:
                return walk.scan_directory(str(resolved), exts, self.roots, max_files=limit, deadline=deadline)
            except OSError as err:
                raise InvalidArgument.field("path", f"cannot be read: {err.strerror or err}") from None

        result = await asyncio.to_thread(scan)
        return ScanOutcome(
            result.path, result.subdirectories, result.direct_image_count, result.truncated, exts, result.unusable
        )

    async def count_selected(
        self, selected: Sequence[str], extensions: tuple[str, ...], recursive: bool, time_remaining: float | None
    ) -> tuple[list[PreconditionViolation], list[walk.DirectoryCount], bool, int]:
        """ValidateSession's count: (unreadable selections, per-directory counts, cut short, images).

        A selected directory inside another selected one (the root and a subfolder, say) is walked
        once, as part of the outer one when the walk is recursive: its images count once too.
        """
        deadline = self.deadline(time_remaining)
        max_files = self.settings.scan_max_files

        def count() -> tuple[list[PreconditionViolation], list[walk.DirectoryCount], bool]:
            unreadable: list[PreconditionViolation] = []
            readable: list[str] = []
            for path in selected:
                problem = _unreadable(path, self.roots)
                if problem is None:
                    readable.append(path)
                else:
                    unreadable.append(PreconditionViolation("UNREADABLE", path, problem))
            counts, truncated = walk.count_images(
                readable, extensions, self.roots, recursive=recursive, max_files=max_files, deadline=deadline
            )
            return unreadable, counts, truncated

        unreadable, counts, truncated = await asyncio.to_thread(count)
        outer = [c.path for c in counts]
        image_count = sum(
            c.image_count
            for c in counts
            if not (recursive and any(o != c.path and is_within(c.path, [Path(o)]) for o in outer))
        )
        return unreadable, counts, truncated, image_count


def _unreadable(path: str, roots: Sequence[Path]) -> str | None:
    """Blocking: why a selected directory cannot be walked, or None. Opens the directory once."""
    resolved = os.path.realpath(path)
    if not is_within(resolved, roots):
        return f"{path} now leads outside the library roots; unselect it with UpdateSubdirectories"
    try:
        with os.scandir(resolved):
            pass
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}; fix it or unselect it with UpdateSubdirectories"
    return None

"""Checks of a request's fields that need no I/O, and the limits they enforce.

Each failure is INVALID_ARGUMENT naming the field (`InvalidArgument.field`), before any row is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagetraining.duplicates import NEAR_DUPLICATE_DISTANCE_DEFAULT, NEAR_DUPLICATE_DISTANCE_MAX
from imagetraining.errors import InvalidArgument
from imagetraining.formats import normalize_extensions

MAX_DISPLAY_NAME = 200
MAX_PATHS_PER_REQUEST = 1000
# A session holds at most this many subdirectory rows in all (a quota: RESOURCE_EXHAUSTED).
MAX_SUBDIRECTORIES_PER_SESSION = 10_000
BATCH_SIZE_MIN, BATCH_SIZE_MAX = 100, 10_000


def validate_config(
    extensions: Sequence[str],
    recursive: bool | None,
    batch_size: int,
    field: str = "config",
    near_duplicate_distance: int | None = None,
    skip_near_duplicates: bool = False,
) -> dict[str, Any]:
    """A SessionConfig as stored: {"extensions": [...], "recursive": bool, "batch_size": int,
    "near_duplicate_distance": int}."""
    try:
        exts = normalize_extensions(extensions)
    except ValueError as err:
        raise InvalidArgument.field(f"{field}.extensions", str(err)) from None
    if batch_size != 0 and not BATCH_SIZE_MIN <= batch_size <= BATCH_SIZE_MAX:
        raise InvalidArgument.field(
            f"{field}.batch_size", f"{batch_size} is not 0 (the default) or {BATCH_SIZE_MIN}..{BATCH_SIZE_MAX}"
        )
    distance = NEAR_DUPLICATE_DISTANCE_DEFAULT if near_duplicate_distance is None else near_duplicate_distance
    if not 0 <= distance <= NEAR_DUPLICATE_DISTANCE_MAX:
        raise InvalidArgument.field(
            f"{field}.near_duplicate_distance", f"{distance} is not in 0..{NEAR_DUPLICATE_DISTANCE_MAX} (bits of dHash)"
        )
    return {
        "extensions": list(exts),
        "recursive": True if recursive is None else recursive,
        "batch_size": batch_size,
        "near_duplicate_distance": distance,
        "skip_near_duplicates": skip_near_duplicates,
    }


def check_display_name(display_name: str) -> None:
    if len(display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument.field("display_name", f"is longer than {MAX_DISPLAY_NAME} characters")

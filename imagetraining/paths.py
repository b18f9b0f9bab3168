"""Library-root containment: the only way a client-supplied path becomes a filesystem path.

A path is checked for form first (absolute, no `..`, no NUL or control characters, bounded
length), then resolved (symlinks followed) and checked for containment in a configured root.
Containment is decided before existence, so a path outside the roots gets the same answer
whether or not it exists: the service does not reveal what lies outside its libraries.
These functions touch the filesystem (realpath, stat): call them off the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from imagetraining.errors import FieldViolation, InvalidArgument

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255


def is_within(path: str, roots: Sequence[Path]) -> bool:
    """True when the (already resolved) path is a root or lies under one."""
    for root in roots:
        r = str(root)
        if path == r or path.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {description}", [FieldViolation(field, description)])


def check_form(raw: str, field: str, *, allow_relative: bool = False) -> None:
    """Reject malformed paths without touching the filesystem."""
    if raw == "":
        raise _invalid(field, "required: an absolute directory path inside a library root")
    if "\x00" in raw:
        raise _invalid(field, "contains a NUL byte")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise _invalid(field, "contains a control character")
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(field, "is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise _invalid(field, f"is longer than {MAX_PATH_BYTES} bytes")
    parts = raw.split("/")
    if any(len(p.encode("utf-8")) > MAX_COMPONENT_BYTES for p in parts):
        raise _invalid(field, f"has a path component longer than {MAX_COMPONENT_BYTES} bytes")
    if ".." in parts:
        raise _invalid(field, "must not contain '..'")
    if not allow_relative and not raw.startswith("/"):
        raise _invalid(field, "must be an absolute path")


def resolve_directory(
    raw: str,
    roots: Sequence[Path],
    field: str,
    *,
    base: Path | None = None,
    must_exist: bool = True,
) -> Path:
    """Validate and resolve a client path to a directory inside the roots (and under `base`).

    With `base`, relative paths are taken relative to it and the result must lie under it.
    Raises InvalidArgument with a BadRequest field violation on any problem.
    """
    check_form(raw, field, allow_relative=base is not None)
    joined = raw if raw.startswith("/") else os.path.join(str(base), raw)
    resolved = os.path.realpath(joined)
    if not is_within(resolved, roots):
        raise _invalid(
            field,
            "is outside the configured library roots (IMAGETRAINING_LIBRARY_ROOTS); symlinks are resolved first",
        )
    if base is not None and not is_within(resolved, [base]):
        raise _invalid(field, f"is not under the session's root_path {base}")
    if must_exist and not os.path.isdir(resolved):
        raise _invalid(field, "is not an existing directory")
    return Path(resolved)

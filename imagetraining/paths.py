"""Library-root containment: the only way a client-supplied path becomes a filesystem path.

A path is checked for form first (absolute, no `..`, no NUL or control characters, bounded
length), then resolved (symlinks followed) and checked for containment in a configured root.
Containment is decided before existence, so a path outside the roots gets the same answer
whether or not it exists: the service does not reveal what lies outside its libraries.
These functions touch the filesystem (realpath, stat): call them off the event loop.
"""

from __future__ import annotations

import errno
import os
import stat
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


def is_utf8(path: str) -> bool:
    """True when `path` holds no undecodable bytes (Python keeps those as lone surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """`path` with bytes that are not valid UTF-8 shown as `\\xNN`: storable, sendable, readable.

    One-way: for messages and discovery issues, never to open a file with.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
    if not is_utf8(resolved):
        raise _invalid(field, f"resolves to {printable(resolved)!r}, which is not valid UTF-8: rename it")
    if base is not None and not is_within(resolved, [base]):
        raise _invalid(field, f"is not under the session's root_path {base}")
    if must_exist and not os.path.isdir(resolved):
        raise _invalid(field, "is not an existing directory")
    return Path(resolved)


class OutsideRoots(PermissionError):
    """The path resolves outside every library root: refused before anything is opened."""


class NotRegularFile(OSError):
    """A directory, FIFO, socket or device where an image file was expected."""


class PathChanged(OSError):
    """A component of the path was replaced (by a symlink, say) between resolving and opening it."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in must not block the open; O_NOCTTY: a terminal device never becomes ours.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_within(path: str, roots: Sequence[Path]) -> int:
    """Open a file for reading without ever following a symlink out of the roots; returns the fd.

    Whatever changed on disk since the path was recorded (a file or a directory on its way swapped for
    a symlink to /etc, say): the path is resolved, the resolved path must lie in a root, and then it is
    opened one component at a time from that root with O_NOFOLLOW (`openat`), so the file opened is
    the one that was checked. Symlinks that stay inside the roots keep working (they are resolved
    first). Raises OutsideRoots or PathChanged (before anything outside is opened), or the OSError of
    the open (FileNotFoundError, PermissionError...). Blocking.
    """
    real = os.path.realpath(path)
    root = ""
    for candidate in roots:
        r = str(candidate)
        if is_within(real, [candidate]) and len(r) > len(root):
            root = r
    if not root:
        raise OutsideRoots(errno.EACCES, "resolves outside the library roots (a symlink?); not opened", path)
    rest = real[len(root) :].strip(os.sep)
    parts = rest.split(os.sep) if rest else []
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "is a library root, not a file", path)
    # Not authoritative (the fstat of the opened file is), but a device node or a FIFO is never even
    # opened: opening some devices has side effects.
    if not stat.S_ISREG(os.lstat(real).st_mode):
        raise NotRegularFile(errno.EINVAL, "is not a regular file", path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            inner = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathChanged(
                err.errno, "changed while it was opened (a component is now a symlink or a file); not opened", path
            ) from None
        raise
    finally:
        os.close(fd)

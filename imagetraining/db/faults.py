"""What a database error means for the caller: retry later, a lost race, or a real failure.

Decided by SQLSTATE class first (PostgreSQL's own classification, whatever driver or wrapper raised
it), then by the exception types of a connection that could not be made or was lost, which carry no
SQLSTATE. Both services use this one table: the control service to answer UNAVAILABLE (retry)
instead of INTERNAL, the worker to retry with backoff instead of counting a crash.

- unavailable: the server cannot be reached or cannot do it now: connection errors (class 08, or
  an OSError raised by the driver, such as the missing socket file of a stopped embedded server),
  insufficient resources such as a full disk (53), operator intervention such as a shutdown, a
  crash restart or "the database system is starting up" (57P01-57P03, 57P05), system and I/O errors
  (58000, 58030), a statement or lock that timed out (57014, 55P03), a session ended for idling in
  a transaction (25P03). The same call retried later can succeed.
- conflict: serialization failure or deadlock (40001, 40P01): a concurrent transaction won.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

_UNAVAILABLE_CLASSES = ("08", "53")
_UNAVAILABLE_CODES = frozenset({"57P01", "57P02", "57P03", "57P05", "57014", "58000", "58030", "55P03", "25P03"})
_CONFLICT_CODES = frozenset({"40001", "40P01"})
# Exception classes (by name, so no driver import is needed) of a connection lost or never made.
_CONNECTION_ERRORS = frozenset(
    {
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "InterfaceError",  # asyncpg: "connection is closed"; SQLAlchemy's InterfaceError wraps it
        "InternalClientError",
        "CannotConnectNowError",
        "TooManyConnectionsError",
    }
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what SQLAlchemy wrapped (`orig`) and the causes, each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend((getattr(e, "orig", None), e.__cause__, e.__context__))


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the first error in the chain that has one."""
    for e in _chain(exc):
        code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def is_conflict(exc: BaseException) -> bool:
    return sqlstate(exc) in _CONFLICT_CODES


def is_unavailable(exc: BaseException) -> bool:
    """The database is unreachable, starting, stopping, full or timed out: a plain retry later can work."""
    code = sqlstate(exc)
    if code is not None:
        return code.startswith(_UNAVAILABLE_CLASSES) or code in _UNAVAILABLE_CODES
    for e in _chain(exc):
        if getattr(e, "connection_invalidated", False):
            return True
        name = type(e).__name__
        if name in _CONNECTION_ERRORS:
            return True
        if name == "TimeoutError" and type(e).__module__.startswith("sqlalchemy"):
            return True  # the connection pool had no connection to give in time
        if isinstance(e, ConnectionError | asyncio.TimeoutError | TimeoutError):
            return True
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            return True
        if isinstance(e, OSError) and _raised_by_driver(e):
            # Connecting to a unix socket (the embedded server's) that is not there: the server is down.
            return True
    return False


def _raised_by_driver(exc: BaseException) -> bool:
    """Was `exc` raised inside the database driver (asyncpg)? Then it is about the connection, not a file.

    A server reached through a unix socket (the embedded one, `?host=/dir`) that is down has no
    socket file: connecting raises FileNotFoundError, which elsewhere means a missing library file.
    """
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("asyncpg"):
            return True
        tb = tb.tb_next
    return False


def is_transient(exc: BaseException) -> bool:
    """Worth retrying the same work later: unavailable, or a lost race."""
    return is_unavailable(exc) or is_conflict(exc)


def describe(exc: BaseException) -> str:
    """One line for a log: the SQLSTATE when there is one, and the first line of the message."""
    code = sqlstate(exc)
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{code}: {text}" if code else f"{type(exc).__name__}: {text}"

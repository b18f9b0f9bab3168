"""Where the database is: `DATABASE_URL`, or an embedded PostgreSQL started from `pgserver`.

One dialect everywhere: the embedded default is a real PostgreSQL (from the pgserver wheel) in a
local data directory, so tests, laptops and production run the same SQL. Several processes given
the same data directory share one server; pgserver stops it when the last one exits.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from imagetraining.settings import Settings

log = logging.getLogger(__name__)

_embedded: dict[Path, Any] = {}


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server in data_dir; return its postgresql:// URL. Blocking.

    pgserver keeps its lock file in the user's runtime directory; where XDG_RUNTIME_DIR is unset
    (containers, CI, su) platformdirs falls back to /tmp/runtime-<uid> and warns on stderr, an
    extra line at every start that says nothing the operator can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver

    data_dir = data_dir.expanduser().resolve()
    if data_dir not in _embedded:
        data_dir.mkdir(parents=True, exist_ok=True)
        _embedded[data_dir] = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    uri: str = _embedded[data_dir].get_uri()
    return uri


def to_asyncpg_url(url: str) -> str:
    """postgres://, postgresql:// -> postgresql+asyncpg:// (SQLAlchemy's asyncpg dialect)."""
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+asyncpg"
    return f"{scheme}://{rest}"


def to_libpq_url(url: str) -> str:
    """The plain postgresql:// form that asyncpg.connect() takes (for LISTEN connections)."""
    _scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}"


def with_database(url: str, database: str) -> str:
    """The same server, another database name."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


async def resolve_url(settings: Settings) -> str:
    """The postgresql:// URL to use; starts the embedded server (in a thread) when none is set."""
    if settings.database_url:
        return to_libpq_url(settings.database_url)
    url = await asyncio.to_thread(start_embedded, settings.data_dir / "pgdata")
    log.info("embedded PostgreSQL in %s", settings.data_dir / "pgdata")
    return url


@dataclass
class Database:
    """The async engines (writes; autocommit reads) plus the plain URL (for raw asyncpg LISTEN connections).

    Statements are SQL text (`imagetraining.transitions` and the modules' own reads), so there is
    no ORM session factory: "session" in this code base means a training session.
    """

    url: str
    engine: AsyncEngine
    # Autocommit connections for read-only requests (GetSession, ListJobs...): no BEGIN and no
    # ROLLBACK around the SELECTs, and SQLAlchemy's pre-ping is one round trip (";") instead of three
    # (it wraps its ping in BEGIN/ROLLBACK on transactional connections). GetSession went from seven
    # round trips to three. Shares nothing with `engine` but the server.
    reads: AsyncEngine

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 20,
        custom_plans: bool = False,
        lock_timeout: float | None = None,
        idle_in_transaction_timeout: float | None = None,
        application_name: str | None = None,
    ) -> Database:
        """A pool of connections with the server-side limits of the process that uses them.

        `lock_timeout` (seconds): a statement waiting longer for a row lock fails with SQLSTATE
        55P03 instead of waiting for ever (the worker's heartbeat behind a long batch of its own
        fails and is retried at the next beat). The control service bounds its waits per request
        instead, by the request's deadline (control_service/sessions.py).

        `idle_in_transaction_timeout` (seconds): PostgreSQL ends a connection that sits inside a
        transaction doing nothing for this long, rolling it back and releasing its locks. For the
        worker: a worker frozen (SIGSTOP, a stalled VM, a network partition) in the middle of a
        fenced write would otherwise hold its session row locked, so no other worker could take the
        session over when the lease expires (`FOR UPDATE SKIP LOCKED` skips a locked row) and every
        client transition would queue behind it. A live worker never idles inside a transaction: its
        transactions are a few statements sent back to back.

        `custom_plans`: plan every execution with its parameters and the tables' current size (both
        services set it; tests and benchmarks that only read and write rows leave it off).

        asyncpg prepares each statement once per connection, and after five executions PostgreSQL may
        keep a generic plan made while a table was still small, whatever the tables grow to later:
        - in the worker, whose batch statements run while the tables grow from empty to millions of
          rows, a sequential scan inside a per-file probe: 22,000 scans reading a billion asset rows,
          100,000 files discovered in 169 s instead of 4 (case 3);
        - in the control service, GetSession's count of stale images planned on small sessions: the
          first GetSession of a just-completed 100,000-image session took 2.0 s instead of 29 ms
          (case 7; the benchmark now prints that call).
        Planning costs well under a millisecond for these statements.
        """
        server_settings: dict[str, str] = {}
        if application_name:  # pg_stat_activity tells the worker's connections apart (claims.reap_stuck_clients)
            server_settings["application_name"] = application_name
        if custom_plans:
            server_settings["plan_cache_mode"] = "force_custom_plan"
        if lock_timeout is not None:
            server_settings["lock_timeout"] = f"{max(1, round(lock_timeout * 1000))}ms"
        if idle_in_transaction_timeout is not None:
            server_settings["idle_in_transaction_session_timeout"] = (
                f"{max(1, round(idle_in_transaction_timeout * 1000))}ms"
            )
        connect_args = {"server_settings": server_settings} if server_settings else {}

        def make(size: int, **options: Any) -> AsyncEngine:
            return create_async_engine(
                to_asyncpg_url(url),
                pool_size=size,
                max_overflow=max_overflow,
                pool_pre_ping=True,
                pool_recycle=1800,
                connect_args=connect_args,
                **options,
            )

        engine = make(pool_size)
        reads = make(max(2, pool_size // 2), isolation_level="AUTOCOMMIT")
        return cls(
            url=to_libpq_url(url),
            engine=engine,
            reads=reads,
        )

    async def dispose(self) -> None:
        await self.engine.dispose()
        await self.reads.dispose()


class DatabaseUnreachable(Exception):
    """PostgreSQL did not accept a connection within the wait, or refused it for a reason a wait cannot fix."""


def describe_server(url: str) -> str:
    """Where a postgresql:// URL points, for a log line: host:port or the socket directory, never the password."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "localhost"
    port = query.get("port") or (str(parts.port) if parts.port else "5432")
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_failure(exc: BaseException) -> str:
    """Why a connection attempt failed, in a few words ("connection refused", "the database system is starting up")."""
    import socket

    import asyncpg

    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, ConnectionRefusedError) or "[Errno 111]" in text:
        return "connection refused"
    if isinstance(exc, FileNotFoundError):
        return "no server socket there"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return "no answer"
    if isinstance(exc, asyncpg.PostgresError):
        return text or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return text or type(exc).__name__


async def wait_for_database(url: str, seconds: float, log: logging.Logger) -> None:
    """Return once PostgreSQL at `url` accepts a connection; wait at most `seconds` while it cannot yet.

    A process started together with its database (compose, a reboot, a restart after a crash) finds
    it refusing connections or "starting up" for a while: that is waited out, with one log line
    saying so, instead of failing with a stack trace. What no wait can fix (a wrong password, a
    database that does not exist) fails at once. Raises DatabaseUnreachable with a one-line reason.
    """
    import asyncpg

    from imagetraining.db import faults

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    where = describe_server(url)
    announced: str | None = None
    pause = 0.1
    while True:
        remaining = deadline - loop.time()
        try:
            conn = await asyncpg.connect(to_libpq_url(url), timeout=min(10.0, max(1.0, remaining)))
        except Exception as exc:
            reason = connect_failure(exc)
            if not faults.is_unavailable(exc):
                raise DatabaseUnreachable(f"PostgreSQL at {where} refused the connection: {reason}") from exc
            remaining = deadline - loop.time()
            if remaining <= 0:
                waited = f" within {seconds:g} s (IMAGETRAINING_DATABASE_WAIT_SECONDS)" if seconds else ""
                problem = f"PostgreSQL at {where} did not accept a connection{waited}: {reason}"
                raise DatabaseUnreachable(problem) from exc
            if reason != announced:
                log.warning("waiting up to %g s for PostgreSQL at %s (%s)", seconds, where, reason)
                announced = reason
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 1.0)
            continue
        await conn.close()
        if announced is not None:
            log.info("PostgreSQL at %s accepts connections", where)
        return

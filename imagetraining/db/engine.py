"""Where the database is: `DATABASE_URL`, or an embedded PostgreSQL started from `pgserver`.

One dialect everywhere: the embedded default is a real PostgreSQL (from the pgserver wheel) in a
local data directory, so tests, laptops and production run the same SQL. Several processes given
the same data directory share one server; pgserver stops it when the last one exits.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from imagetraining.settings import Settings

log = logging.getLogger(__name__)

_embedded: dict[Path, Any] = {}


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server in data_dir; return its postgresql:// URL. Blocking."""
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
    """An async engine and session factory plus the plain URL (for raw asyncpg LISTEN connections)."""

    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # Autocommit connections for read-only requests (GetSession, ListJobs...): no BEGIN and no
    # ROLLBACK around the SELECTs, and SQLAlchemy's pre-ping is one round trip (";") instead of three
    # (it wraps its ping in BEGIN/ROLLBACK on transactional connections). GetSession went from seven
    # round trips to three. Shares nothing with `engine` but the server.
    reads: AsyncEngine

    @classmethod
    def connect(cls, url: str, *, pool_size: int = 10, max_overflow: int = 20, custom_plans: bool = False) -> Database:
        """`custom_plans`: plan every execution with its parameters and the tables' current size.

        For the worker, whose batch statements (2,000 rows each) run while the tables they read grow
        from empty to millions of rows. asyncpg prepares each statement once per connection, and after
        five executions PostgreSQL may keep a generic plan made while a table was still small: a
        sequential scan inside a per-file probe. Seen in the discovery benchmark: 22,000 scans
        reading a billion asset rows, 100,000 files taking 169 s instead of 4. Planning a batch
        statement costs well under a millisecond; the control service's small queries keep the cache.
        """
        connect_args = {"server_settings": {"plan_cache_mode": "force_custom_plan"}} if custom_plans else {}

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
            sessions=async_sessionmaker(engine, expire_on_commit=False),
            reads=reads,
        )

    async def dispose(self) -> None:
        await self.engine.dispose()
        await self.reads.dispose()

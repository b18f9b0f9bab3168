"""Shared fixtures: a fresh PostgreSQL database per test session, real servers over loopback.

Which PostgreSQL: `IMAGETRAINING_TEST_DATABASE_URL` (any server; e.g. the machine's PostgreSQL 15)
or, when unset, the embedded pgserver started in a temporary directory. `make test` runs the suite
against both. Either way the tests create their own database and drop it at the end.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagetraining.db.engine import Database, start_embedded, with_database
from imagetraining.db.migrate import upgrade
from imagetraining.db.models import Base
from imagetraining.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# Every table of the schema (the models equal the migrations: tests/integration/test_database.py),
# so a new table is emptied between tests without anyone remembering to list it.
TABLES = tuple(sorted(Base.metadata.tables))


def pytest_report_header(config: pytest.Config) -> str:
    url = os.environ.get("IMAGETRAINING_TEST_DATABASE_URL")
    return f"imagetraining database: {url or 'embedded pgserver'}"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of the PostgreSQL server used for this test session (admin database)."""
    url = os.environ.get("IMAGETRAINING_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="imagetraining-pg-") as tmp:
        yield start_embedded(Path(tmp) / "pgdata")


@pytest.fixture(scope="session")
def db_url(server_url: str) -> Iterator[str]:
    """A fresh database, migrated to head, dropped at the end of the session."""
    name = f"imagetraining_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = with_database(server_url, name)

    async def migrate() -> None:
        db = Database.connect(url)
        try:
            await upgrade(db.engine)
        finally:
            await db.dispose()

    asyncio.run(migrate())
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
async def database(db_url: str) -> AsyncIterator[Database]:
    db = Database.connect(db_url)
    yield db
    await db.dispose()


@pytest.fixture
async def clean_db(database: Database) -> AsyncIterator[Database]:
    """The session database with every table emptied before the test."""
    async with database.engine.begin() as conn:
        await conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    yield database


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """An empty library root for one test."""
    root = tmp_path / "library"
    root.mkdir()
    return root.resolve()


@pytest.fixture
def make_settings(db_url: str, library: Path) -> Callable[..., Settings]:
    """Settings for servers in this test: the test database, the test library, ports chosen by the OS."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "library_roots": (library,),
            "database_url": db_url,
            "control_address": "127.0.0.1:0",
            "worker_address": "127.0.0.1:0",
            "grace_seconds": 1.0,
            "poll_seconds": 0.2,
            "heartbeat_seconds": 0.5,
            "lease_seconds": 3.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll an async predicate until it returns a truthy value; fail after `timeout` seconds.

    This is the only way tests wait: on a condition with a deadline, never a bare sleep.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last value: {last!r}")


def subprocess_env(db_url: str, library: Path, **extra: str) -> dict[str, str]:
    """Environment for running a service as a real subprocess in tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETRAINING_")}
    env.update(
        DATABASE_URL=db_url,
        IMAGETRAINING_LIBRARY_ROOTS=str(library),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


PYTHON = sys.executable


@pytest.fixture
def pg_instance(tmp_path: Path) -> Iterator[Any]:
    """A PostgreSQL of this test's own (tests.pg_instance.PgInstance), initialised, not started.

    For tests that crash, stop or restart the database; the finaliser stops it whatever its state.
    """
    from tests.pg_instance import PgInstance

    pg = PgInstance(tmp_path / "pg")
    try:
        pg.init()
        yield pg
    finally:
        pg.close()


@pytest.fixture
def worker_processes() -> Iterator[list[Any]]:
    """Worker processes a test starts (tests.worker_support.WorkerProcess): woken and killed at the end."""
    import signal

    started: list[Any] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            os.kill(worker.proc.pid, signal.SIGCONT)
        worker.kill()


@pytest.fixture
async def slow_worker(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[Any]:
    """An in-process worker training 0.2 s per image on one process: a test can pause it early in training."""
    from discovery_worker.worker import run_worker

    handle = await run_worker(
        make_settings(pool_size=1, batch_size=100, trainer="tests.trainers:SlowTrainer"), migrate=False
    )
    yield handle
    await handle.stop()

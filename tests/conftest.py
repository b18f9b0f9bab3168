"""Shared fixtures: a fresh PostgreSQL database per test, real servers over loopback.

Which PostgreSQL: `IMAGETRAINING_TEST_DATABASE_URL` (any server; e.g. the machine's PostgreSQL 15)
or, when unset, the embedded pgserver started in a temporary directory. `make test` runs the suite
against both. Either way each test gets a database of its own, cloned from a migrated template
(DatabaseFactory), and the suite drops them all.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import make_url

from imagetraining.db.engine import Database, start_embedded, to_asyncpg_url, with_database
from imagetraining.db.migrate import upgrade
from imagetraining.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


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


class DatabaseFactory:
    """Fresh databases cloned from one migrated template (`CREATE DATABASE ... TEMPLATE`).

    Every test gets a database of its own, so no test can see another's rows, whatever tables a
    migration adds. A clone costs about 50 ms on an idle server and is made AHEAD on a thread of its
    own while tests run. A drop forces a checkpoint, which slowed the clones made meanwhile (setups
    of 0.5-1 s), so the used databases are all dropped at the end of the test session instead (a few
    seconds; a crashed run leaves them to `DROP DATABASE` by their `imagetraining_test_` prefix).
    """

    AHEAD = 2

    def __init__(self, server_url: str, *, drop: bool = True) -> None:
        self.admin_url = server_url.replace("postgresql+asyncpg://", "postgresql://")
        self.server_url = server_url
        self.prefix = f"imagetraining_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.template = f"{self.prefix}_template"
        self.count = 0
        self.cloner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-db-clone")
        self.used: list[str] = []
        # False for a server of the test session's own (the embedded one): it goes with its directory.
        self.drop = drop
        self._admin(f'CREATE DATABASE "{self.template}"')
        asyncio.run(self._migrate(with_database(server_url, self.template)))
        self.ready: deque[Future[str]] = deque(self.cloner.submit(self._clone) for _ in range(self.AHEAD))

    def _admin(self, *statements: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                for sql in statements:
                    await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    @staticmethod
    async def _migrate(url: str) -> None:
        db = Database.connect(url)
        try:
            await upgrade(db.engine)
        finally:
            await db.dispose()

    def _clone(self) -> str:
        self.count += 1
        name = f"{self.prefix}_{self.count}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def take(self) -> str:
        """A fresh database's URL (made ahead); another is started at once."""
        name = self.ready.popleft().result()
        self.ready.append(self.cloner.submit(self._clone))
        return with_database(self.server_url, name)

    def give_back(self, url: str) -> None:
        """A used database, dropped at the end (`close`)."""
        name = make_url(to_asyncpg_url(url)).database
        if name:
            self.used.append(name)

    def close(self) -> None:
        spares = [f.result() for f in self.ready]
        self.cloner.shutdown()
        if not self.drop:
            return
        # FORCE: connections a crashed test left behind do not hold a database.
        names = [*self.used, *spares, self.template]
        self._admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names))


@pytest.fixture(scope="session")
def databases(server_url: str) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(server_url, drop=bool(os.environ.get("IMAGETRAINING_TEST_DATABASE_URL")))
    yield factory
    factory.close()


@pytest.fixture
def db_url(databases: DatabaseFactory) -> Iterator[str]:
    """This test's own database, migrated to head and empty; dropped after the test."""
    url = databases.take()
    yield url
    databases.give_back(url)


@pytest.fixture(scope="module")
def module_db_url(databases: DatabaseFactory) -> Iterator[str]:
    """A database shared by one module's tests (for module-scoped servers); dropped after the module."""
    url = databases.take()
    yield url
    databases.give_back(url)


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    """An engine on this test's own database."""
    db = Database.connect(db_url)
    yield db
    await db.dispose()


@pytest.fixture
async def clean_db(database: Database) -> Database:
    """This test's own database (fresh from the template, so nothing needs emptying)."""
    return database


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

"""The database in trouble is not a crash (issue #9, item 6).

Errors are raised by the real PostgreSQL, injected with a trigger on the table the worker writes
(`RAISE ... USING ERRCODE`): a full disk (53100) or a serialization failure (40001) while training,
and a real internal error (XX000) that does crash the runner. Transient ones are retried with
backoff under the same claim: the session completes exactly, with one claim and no attempt
counted. A real crash is counted, and the worker leaves the session to others for a while instead
of re-claiming it in a tight loop.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from discovery_worker.worker import WorkerHandle, run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import photo_folders

IMAGES = 2 * 100


@pytest.fixture
async def worker(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[WorkerHandle]:
    handle = await run_worker(
        make_settings(pool_size=1, batch_size=100, trainer="tests.trainers:PacedTrainer"), migrate=False
    )
    yield handle
    await handle.stop()


async def inject(db: Database, table: str, event: str, errcode: str, *, times: int | None = None) -> None:
    """From now on every `event` on `table` fails with SQLSTATE `errcode` (the first `times` only, if given)."""
    limit = "" if times is None else f"IF nextval('fault_hits') > {times} THEN RETURN NEW; END IF;"
    count = "" if times is not None else "PERFORM nextval('fault_hits');"
    async with db.engine.begin() as conn:
        await conn.execute(text("CREATE SEQUENCE IF NOT EXISTS fault_hits"))
        await conn.execute(
            text(
                f"""
                CREATE OR REPLACE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    {limit}
                    {count}
                    RAISE EXCEPTION 'injected fault' USING ERRCODE = '{errcode}';
                END $$
                """
            )
        )
        await conn.execute(
            text(f"CREATE TRIGGER inject_fault BEFORE {event} ON {table} FOR EACH ROW EXECUTE FUNCTION inject_fault()")
        )


async def heal(db: Database, table: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(f"DROP TRIGGER IF EXISTS inject_fault ON {table}"))
        await conn.execute(text("DROP SEQUENCE IF EXISTS fault_hits"))


async def hits(db: Database) -> int:
    return int(await ws.scalar(db, "SELECT last_value FROM fault_hits"))


async def finished(db: Database, sid: int) -> dict[str, object]:
    async def done() -> dict[str, object] | None:
        row = await ws.session(db, sid)
        return row if row["state"] in ("completed", "failed", "cancelled") else None

    row: dict[str, object] = await wait_for(done, timeout=60, what="the session to finish")
    return row


@pytest.mark.parametrize(("errcode", "what"), [("53100", "disk full"), ("40001", "serialization failure")])
async def test_a_transient_database_error_while_training_is_retried_not_counted(
    clean_db: Database, worker: WorkerHandle, library: Path, caplog: pytest.LogCaptureFixture, errcode: str, what: str
) -> None:
    caplog.set_level(logging.INFO, logger="discovery_worker")
    folders = photo_folders(library, folders=2, per_folder=100)
    sid = await ws.start_session(clean_db, library, folders)

    async def discovered() -> bool:
        return (await ws.session(clean_db, sid))["state"] == "running"

    await wait_for(discovered, timeout=30, what="discovery to finish")
    await inject(clean_db, "training_jobs", "UPDATE", errcode)
    try:
        # Several failed writes in a row (each one PostgreSQL's own error), with backoff in between.
        await wait_for(lambda: _at_least(clean_db, 4), timeout=30, what=f"the worker to retry through a {what}")
        assert (await ws.session(clean_db, sid))["state"] == "running"
    finally:
        await heal(clean_db, "training_jobs")
    row = await finished(clean_db, sid)
    assert row["state"] == "completed", row["state_reason"]
    assert (row["processed_images"], row["failed_images"], row["total_images"]) == (IMAGES, 0, IMAGES)
    assert (row["attempts"], row["epoch"]) == (1, 1)  # one claim, kept throughout
    messages = [r.getMessage() for r in caplog.records]
    assert any("database unavailable" in m and errcode in m for m in messages), messages
    assert not any("runner failed" in m for m in messages)


async def _at_least(db: Database, n: int) -> bool:
    return await hits(db) >= n


async def test_a_real_crash_is_counted_and_not_reclaimed_in_a_tight_loop(
    clean_db: Database, worker: WorkerHandle, library: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="discovery_worker")
    folders = photo_folders(library, folders=2, per_folder=100)
    # internal_error is not transient: the first two claims crash their runner, the third completes.
    await inject(clean_db, "training_jobs", "INSERT", "XX000", times=2)
    try:
        sid = await ws.start_session(clean_db, library, folders)
        row = await finished(clean_db, sid)
    finally:
        await heal(clean_db, "training_jobs")
    assert row["state"] == "completed", row["state_reason"]
    assert (row["attempts"], row["epoch"]) == (3, 3)
    assert row["processed_images"] == IMAGES
    claims = [r.created for r in caplog.records if f"session {sid}: claimed" in r.getMessage()]
    assert len(claims) == 3
    # A growing cool-down (1 s, then 2 s) between the claims of a session that crashed here.
    gaps = [b - a for a, b in itertools.pairwise(claims)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps
    assert sum("left to other workers" in r.getMessage() for r in caplog.records) == 2

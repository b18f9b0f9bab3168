"""PostgreSQL killed -9 and restarted under a training worker (issue #9, item 6: "connection lost,
server restarting").

The worker's pooled connections all die with the server; while it is down every write fails with a
refused connection, and right after it starts, with "the database system is starting up" (57P03).
All of it is transient: the runner keeps its claim, retries with backoff, and the session completes
with every image counted once and no attempt spent. The lease is longer than the outage so that
"kept its claim" is the only right answer (a shorter lease would let the worker lose and re-claim it,
which is correct too, but counts an attempt).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_worker.worker import run_worker
from imagetraining.db.engine import Database
from imagetraining.db.migrate import upgrade
from imagetraining.settings import Settings
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import photo_folders
from tests.pg_instance import PgInstance

IMAGES = 2 * 20  # SlowTrainer: 0.2 s an image, so the restart lands in the middle of training


@pytest.mark.slow
async def test_postgresql_killed_and_restarted_while_training_is_retried_under_the_same_claim(
    pg_instance: PgInstance, make_settings: Callable[..., Settings], library: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="discovery_worker")
    await asyncio.to_thread(pg_instance.start)
    db = Database.connect(pg_instance.url)
    await upgrade(db.engine)
    worker = await run_worker(
        make_settings(
            database_url=pg_instance.url,
            pool_size=1,
            batch_size=4,
            lease_seconds=30.0,
            trainer="tests.trainers:SlowTrainer",
        ),
        migrate=False,
    )
    try:
        folders = photo_folders(library, folders=2, per_folder=IMAGES // 2)
        sid = await ws.start_session(db, library, folders)

        async def training() -> bool:
            row = await ws.session(db, sid)
            return row["state"] == "running" and row["processed_images"] >= 4

        await wait_for(training, timeout=60, what="training to start")
        await asyncio.to_thread(pg_instance.kill9)
        await asyncio.to_thread(pg_instance.start)

        async def finished() -> dict[str, object] | None:
            try:
                row = await ws.session(db, sid)
            except Exception:  # the test's own pool reconnecting after the restart
                return None
            return row if row["state"] in ("completed", "failed", "cancelled") else None

        row = await wait_for(finished, timeout=120, what="the session to finish after the restart")
        assert row["state"] == "completed", row["state_reason"]
        assert (row["processed_images"], row["failed_images"], row["total_images"]) == (IMAGES, 0, IMAGES)
        assert (row["attempts"], row["epoch"]) == (1, 1)  # one claim, kept through the outage
        jobs = await ws.jobs(db, sid)
        assert sorted(j["state"] for j in jobs) == ["completed"] * IMAGES
        assert len({j["path"] for j in jobs}) == IMAGES
        messages = [r.getMessage() for r in caplog.records]
        assert any("database unavailable" in m for m in messages), messages
        assert not any("runner failed" in m for m in messages)
    finally:
        await worker.stop()
        await db.dispose()

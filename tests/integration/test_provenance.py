"""Trainer provenance (#13): every asset records the trainer that made its features; a changed trainer
retrains exactly the images another trainer made, decoding only those, and GetSession counts them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from control_service.sessions import SessionUseCases
from discovery_worker.worker import run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import write_jpeg
from tests.trainers import trained_log


async def _finished(db: Database, sid: int) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        row = await ws.session(db, sid)
        return row if row["state"] in ("completed", "failed", "cancelled") else None

    row: dict[str, Any] = await wait_for(done, timeout=60, what=f"session {sid} to finish")
    assert row["state"] == "completed", row["state_reason"]
    return row


async def _train(db: Database, settings: Settings, sid: int, *, restart: bool = False) -> dict[str, Any]:
    handle = await run_worker(settings, migrate=False)
    try:
        if restart:
            assert await ws.restart_all(db, sid)
        return await _finished(db, sid)
    finally:
        await handle.stop()


async def _provenance(db: Database, directory: Path) -> set[tuple[str, str, int]]:
    async with db.reads.connect() as conn:
        rows = await conn.exec_driver_sql(
            "SELECT trainer_name, trainer_version, cardinality(embedding) FROM image_assets WHERE path LIKE $1",
            (f"{directory}/%",),
        )
        return {(r[0], r[1], r[2]) for r in rows}


async def test_a_new_trainer_retrains_exactly_the_images_another_trainer_made(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    a, b = library / "a", library / "b"
    for i in range(4):
        write_jpeg(a / f"{i}.jpg", 40, 30, seed=i)
    for i in range(3):
        write_jpeg(b / f"{i}.jpg", 40, 30, seed=10 + i)
    trainer_a = make_settings(pool_size=1, trainer="tests.trainers:BatchTrainer")
    trainer_b = make_settings(pool_size=1, trainer="tests.trainers:BatchTrainerB")
    control = SessionUseCases(clean_db, trainer_a)

    # Trainer A trains session S over a and b.
    s = await ws.start_session(clean_db, library, [a, b], name="S")
    row = await _train(clean_db, trainer_a, s)
    assert row["processed_images"] == 7
    assert (len(trained_log(a)), len(trained_log(b))) == (4, 3)
    assert await _provenance(clean_db, a) == await _provenance(clean_db, b) == {("batch-test", "A", 3)}
    got = await control.get(s)
    assert (got.trainer.name, got.trainer.version, got.trainer.embedding_dimension) == ("batch-test", "A", 3)
    assert (got.configured_trainer.version, got.stale_images) == ("A", 0)

    # The workers switch to B; a session T over a alone retrains a with B.
    t = await ws.start_session(clean_db, library, [a], name="T")
    await _train(clean_db, trainer_b, t)
    assert (len(trained_log(a)), len(trained_log(b))) == (8, 3)
    assert await _provenance(clean_db, a) == {("batch-test", "B", 3)}
    # S is now half A (b), half B (a): GetSession counts b as stale for the configured trainer B.
    got = await control.get(s)
    assert (got.trainer.version, got.configured_trainer.version, got.stale_images) == ("A", "B", 3)

    # RestartSession(ALL) on S with B decodes and trains exactly b; a keeps its B features undecoded.
    row = await _train(clean_db, trainer_b, s, restart=True)
    assert row["processed_images"] == 7
    assert (len(trained_log(a)), len(trained_log(b))) == (8, 6)
    assert await _provenance(clean_db, b) == {("batch-test", "B", 3)}
    got = await control.get(s)
    assert (got.trainer.version, got.stale_images) == ("B", 0)


async def test_a_helper_with_another_trainer_does_not_train_the_session(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    """One run never mixes two models: chunks are claimed only by workers running the trainer the
    owner stamped on the session (both workers have room to help; 12 images in chunks of 4)."""
    for i in range(12):
        write_jpeg(library / "a" / f"{i:02d}.jpg", 40, 30, seed=i)
    owner = await run_worker(
        make_settings(pool_size=1, trainer="tests.trainers:BatchTrainer", worker_id="owner"), migrate=False
    )
    other = await run_worker(
        make_settings(pool_size=1, trainer="tests.trainers:BatchTrainerB", worker_id="other"), migrate=False
    )
    try:
        sid = await ws.start_session(clean_db, library, [library / "a"])
        await _finished(clean_db, sid)
    finally:
        await other.stop()
        await owner.stop()
    jobs = await ws.jobs(clean_db, sid)
    (trainer,) = {j["trained_by"] for j in jobs}  # whichever claimed it trained it all
    version = {"owner": "A", "other": "B"}[trainer]
    assert await _provenance(clean_db, library / "a") == {("batch-test", version, 3)}
    row = await ws.session(clean_db, sid)
    assert (row["owner_id"], row["trainer_version"]) == (None, version)


async def test_a_helper_joins_when_the_owner_stamps_its_trainer_not_at_its_next_poll(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    """Helpers take chunks only of sessions stamped with their trainer, so the owner's stamp must
    wake them (NOTIFY in the stamp's transaction). With a 10-minute poll, a helper that waited for it
    would train nothing of a session of a few seconds (case 8 found it: 0 of 40 images)."""
    for i in range(24):
        write_jpeg(library / "a" / f"{i:02d}.jpg", 40, 30, seed=i)
    slow = {"pool_size": 1, "trainer": "tests.trainers:SlowTrainer", "poll_seconds": 600.0}
    owner = await run_worker(make_settings(**slow, worker_id="owner"), migrate=False)
    helper = await run_worker(make_settings(**slow, worker_id="helper"), migrate=False)
    try:
        sid = await ws.start_session(clean_db, library, [library / "a"])
        await _finished(clean_db, sid)
    finally:
        await helper.stop()
        await owner.stop()
    trained_by = [j["trained_by"] for j in await ws.jobs(clean_db, sid)]
    assert len(trained_by) == 24 and set(trained_by) == {"owner", "helper"}, trained_by

"""Claims, leases and fencing: never two owners, and a worker that lost its lease commits nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text as sql

from discovery_worker import claims
from discovery_worker.claims import FenceLost, RunContext, StopSignal
from discovery_worker.recorder import DiscoveryTotals, write_batch
from discovery_worker.walker import WalkBatch
from discovery_worker.worker import run_worker
from imagetraining.db.engine import Database, to_libpq_url
from imagetraining.settings import Settings
from imagetraining.walk import FoundFile
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import write_jpeg


async def lease_expired(db: Database, sid: int) -> bool:
    return bool(await ws.scalar(db, "SELECT lease_expires_at < now() FROM training_sessions WHERE id = :id", id=sid))


def batch_of(paths: list[Path], subdirectory_id: int) -> WalkBatch:
    files = [FoundFile(str(p), p.stat().st_size, p.stat().st_mtime_ns, subdirectory_id) for p in paths]
    return WalkBatch(files=files, directories_scanned=1, files_seen=len(files), images_found=len(files))


async def test_a_worker_whose_lease_expired_cannot_commit(clean_db: Database, library: Path) -> None:
    paths = [write_jpeg(library / "a" / f"{i}.jpg", 16, 16, seed=i) for i in range(3)]
    sid = await ws.start_session(clean_db, library, [library / "a"])
    subdirectory_id = int(next(iter((await ws.subdirectories(clean_db, sid)).values()))["id"])

    stale = await claims.claim_one(clean_db, "worker-a", "a:1", lease_seconds=0.2)
    assert stale is not None and stale.epoch == 1
    # While the lease runs nobody else gets the session.
    assert await claims.claim_one(clean_db, "worker-b", "b:1", lease_seconds=30) is None
    await wait_for(lambda: lease_expired(clean_db, sid), timeout=5, what="the lease to expire")
    fresh = await claims.claim_one(clean_db, "worker-b", "b:1", lease_seconds=30)
    assert fresh is not None and fresh.epoch == 2 and fresh.session_id == sid

    ctx = RunContext(clean_db, stale, StopSignal(), (library,), 100)
    try:
        await write_batch(ctx, batch_of(paths, subdirectory_id), DiscoveryTotals())
        raise AssertionError("a stale epoch committed a batch")
    except FenceLost:
        pass
    assert await ws.scalar(clean_db, "SELECT count(*) FROM image_assets") == 0
    assert await ws.scalar(clean_db, "SELECT count(*) FROM training_jobs") == 0
    row = await ws.session(clean_db, sid)
    assert (row["images_found"], row["owner_id"], row["epoch"]) == (0, "worker-b", 2)
    assert not await claims.heartbeat(clean_db, stale, 30)
    assert not await claims.release(clean_db, stale, graceful=True)
    assert (await ws.session(clean_db, sid))["owner_id"] == "worker-b"

    # The new owner's write goes through.
    await write_batch(
        RunContext(clean_db, fresh, StopSignal(), (library,), 100), batch_of(paths, subdirectory_id), DiscoveryTotals()
    )
    assert await ws.scalar(clean_db, "SELECT count(*) FROM training_jobs WHERE session_id = :id", id=sid) == 3


async def test_too_many_attempts_fail_the_session(clean_db: Database, library: Path) -> None:
    sid = await ws.start_session(clean_db, library, [library])
    # Five crashed claims, as their attempts counter records them.
    await ws.execute(clean_db, "UPDATE training_sessions SET attempts = 5 WHERE id = :id", id=sid)
    assert await claims.fail_exhausted(clean_db, 5) == [(sid, 5)]
    row = await ws.session(clean_db, sid)
    assert (row["state"], row["state_reason"]) == ("failed", "worker crashed 5 times on this session")
    assert await claims.claim_one(clean_db, "w", "w:1", 10) is None


async def test_heartbeats_held_back_another_worker_takes_over(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    """Worker A stops heart-beating while it trains; B claims after the lease expires; A stops, B finishes exactly."""
    count = 20
    for i in range(count):
        write_jpeg(library / "photos" / f"{i:02d}.jpg", 48, 32, seed=i)
    # 0.2 s per image on one process: A is still busy when its 1 s lease runs out.
    settings = make_settings(
        pool_size=1, lease_seconds=1.0, heartbeat_seconds=0.2, trainer="tests.trainers:SlowTrainer"
    )
    a = await run_worker(settings, migrate=False)
    b = None
    try:
        a.worker.heartbeats_held = True
        sid = await ws.start_session(clean_db, library, [library / "photos"])

        async def claimed_by_a() -> bool:
            return (await ws.session(clean_db, sid))["owner_id"] == a.worker.worker_id

        await wait_for(claimed_by_a, timeout=10, what="A to claim")
        assert (await ws.session(clean_db, sid))["owner_address"] == f"127.0.0.1:{a.port}"
        # B's own lease is long: only A's expiry is under test, not B's heartbeats on a loaded machine.
        b = await run_worker(replace(settings, lease_seconds=10.0, heartbeat_seconds=0.5), migrate=False)

        async def taken_over() -> bool:
            row = await ws.session(clean_db, sid)
            return row["owner_id"] == b.worker.worker_id  # type: ignore[union-attr]

        await wait_for(taken_over, timeout=10, what="B to take over")
        taken = await ws.session(clean_db, sid)
        assert taken["state"] == "running" and int(taken["processed_images"]) < count
        await wait_for(lambda: _no_runners(a), timeout=5, what="A's runner to stop")

        async def done() -> dict[str, object] | None:
            row = await ws.session(clean_db, sid)
            return row if row["state"] in ("completed", "failed") else None

        row = await wait_for(done, timeout=60, what="the session to finish")
        assert row["state"] == "completed" and row["epoch"] == 2
        assert (row["images_found"], row["assets_new"], row["total_images"], row["processed_images"]) == (count,) * 4
        jobs = await ws.jobs(clean_db, sid)
        assert len(jobs) == count and {j["attempts"] for j in jobs} == {1}
    finally:
        await a.stop()
        if b is not None:
            await b.stop()


async def _no_runners(handle: object) -> bool:
    return not handle.worker.runners  # type: ignore[attr-defined]


async def test_two_workers_share_sessions_each_processed_once(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    per_session, sessions = 25, 4
    sids = []
    for s in range(sessions):
        for i in range(per_session):
            write_jpeg(library / f"s{s}" / f"{i:02d}.jpg", 48, 32, seed=s * 100 + i)
        sids.append(await ws.start_session(clean_db, library, [library / f"s{s}"], name=f"s{s}"))
    settings = make_settings(pool_size=1, max_sessions_per_worker=2)
    workers = [await run_worker(settings, migrate=False), await run_worker(settings, migrate=False)]
    try:

        async def all_done() -> bool:
            return all([await ws.state(clean_db, sid) == "completed" for sid in sids])

        await wait_for(all_done, timeout=60, what="every session to complete")
    finally:
        for w in workers:
            await w.stop()
    for sid in sids:
        row = await ws.session(clean_db, sid)
        assert (row["epoch"], row["attempts"]) == (1, 1)  # claimed once, by one worker
        assert (row["processed_images"], row["total_images"], row["assets_new"]) == (per_session,) * 3
        jobs = await ws.jobs(clean_db, sid)
        assert len(jobs) == per_session and {j["attempts"] for j in jobs} == {1}
    owners = await ws.scalar(clean_db, "SELECT count(DISTINCT owner_address) FROM training_sessions")
    assert owners == 0  # every lease handed back


async def test_a_worker_frozen_between_prepare_and_bind_does_not_hold_the_session_for_ever(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    """asyncpg prepares with Parse/Describe/Flush (no Sync): a worker frozen right after it, inside a
    transaction, leaves its backend `active` in ClientRead, where PostgreSQL's idle-in-transaction
    timeout never fires, holding the session row (CI saw a frozen helper hold it for two minutes).
    The owner's heartbeat, failing on that lock, ends such a backend (claims.reap_stuck_clients) and
    the session finishes."""
    for i in range(30):
        write_jpeg(library / "a" / f"{i:02d}.jpg", 40, 30, seed=i)
    settings = make_settings(pool_size=1, trainer="tests.trainers:SlowTrainer")
    handle = await run_worker(settings, migrate=False)
    frozen = await asyncpg.connect(
        to_libpq_url(clean_db.url),
        server_settings={
            "application_name": claims.WORKER_APPLICATION,
            "idle_in_transaction_session_timeout": "2s",  # what a worker's connections have
        },
    )
    try:
        sid = await ws.start_session(clean_db, library, [library / "a"])

        async def training() -> bool:
            row = await ws.session(clean_db, sid)
            return row["state"] == "running" and row["processed_images"] > 0

        await wait_for(training, timeout=60, what="training to start")
        pid = await frozen.fetchval("SELECT pg_backend_pid()")
        transaction = frozen.transaction()
        await transaction.start()
        await frozen.execute("SELECT 1 FROM training_sessions WHERE id = $1 FOR UPDATE", sid)
        await frozen.prepare("SELECT 2")  # Parse/Describe/Flush; the Bind that would follow never comes

        async def activity() -> tuple[str, str] | None:
            async with clean_db.reads.connect() as conn:
                row = (
                    await conn.execute(
                        sql("SELECT state, wait_event FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
                    )
                ).first()
            return None if row is None else (str(row.state), str(row.wait_event))

        assert await activity() == ("active", "ClientRead")  # not idle: PostgreSQL's timeout cannot end it

        async def ended() -> bool:
            return await activity() is None

        await wait_for(ended, timeout=30, what="the frozen connection to be ended by the owner")
        row = await wait_for(
            lambda: _state_in(clean_db, sid, ("completed", "failed")), timeout=60, what="the session to finish"
        )
        assert row["state"] == "completed" and row["processed_images"] == 30
    finally:
        frozen.terminate()
        await handle.stop()


async def _state_in(db: Database, sid: int, states: tuple[str, ...]) -> dict[str, Any] | None:
    row = await ws.session(db, sid)
    return row if row["state"] in states else None

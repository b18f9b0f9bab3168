"""One session over many workers: leased chunks, helpers, duplicates decided in the database.

Real worker processes (`python -m discovery_worker`) with one pool process each and the PacedTrainer
(5 ms an image), so that every worker has time to take part whatever the machine.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagetraining.db.engine import Database
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import write_jpeg

UNIQUE = 2960
EXACT_COPIES = 20
LOOKALIKES = 20
IMAGES = UNIQUE + EXACT_COPIES + LOOKALIKES


def _build(root: Path) -> None:
    for i in range(UNIQUE):
        write_jpeg(root / f"d{i // 200:02d}" / f"img{i:04d}.jpg", 32, 24, seed=10_000 + i)
    for i in range(EXACT_COPIES):  # byte-identical copies, in another folder (walked later)
        source = root / f"d{i // 200:02d}" / f"img{i:04d}.jpg"
        target = root / "zz-copies" / f"copy{i:02d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for i in range(LOOKALIKES):  # the same pictures at twice the size: near duplicates, found first
        write_jpeg(root / "aa-large" / f"large{i:02d}.jpg", 64, 48, seed=10_000 + 100 + i)


@pytest.fixture(scope="module")
def two_libraries() -> Iterator[tuple[Path, Path]]:
    """The same library twice, under two paths (so neither run reuses the other's stored hashes)."""
    with tempfile.TemporaryDirectory(prefix="imagetraining-many-", dir=ws.fast_tmp_parent()) as tmp:
        base = Path(tmp).resolve()
        _build(base / "one")
        shutil.copytree(base / "one", base / "three", copy_function=shutil.copy2)
        yield base / "one", base / "three"


def _env(db_url: str, root: Path, scratch: Path, **extra: str) -> dict[str, str]:
    return ws.paced_env(db_url, root, scratch, IMAGETRAINING_LIBRARY_ROOTS=str(root), **extra)


async def _finished(db: Database, sid: int, timeout: float) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        row = await ws.session(db, sid)
        return row if row["state"] in ("completed", "failed", "cancelled") else None

    return await wait_for(done, timeout=timeout, what="the session to finish")


async def _labels(db: Database, sid: int, root: Path) -> dict[str, tuple[Any, ...]]:
    """Each job's outcome by path relative to the root, with the paths it duplicates."""
    async with db.engine.connect() as conn:
        from sqlalchemy import text

        rows = (
            await conn.execute(
                text(
                    """
                    SELECT a.path, j.state, j.skip_reason, dup.path AS dup, near.path AS near,
                           j.near_duplicate_distance
                      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
                      LEFT JOIN image_assets dup ON dup.id = j.duplicate_of_asset_id
                      LEFT JOIN image_assets near ON near.id = j.near_duplicate_of_asset_id
                     WHERE j.session_id = :id
                    """
                ),
                {"id": sid},
            )
        ).all()

    def rel(path: str | None) -> str | None:
        return None if path is None else str(Path(path).relative_to(root))

    return {
        rel(r.path) or "": (r.state, r.skip_reason, rel(r.dup), rel(r.near), r.near_duplicate_distance) for r in rows
    }


async def _shares(db: Database, sid: int) -> dict[str, int]:
    async with db.engine.connect() as conn:
        from sqlalchemy import text

        rows = (
            await conn.execute(
                text(
                    "SELECT trained_by, count(*) AS n FROM training_jobs WHERE session_id = :id"
                    " AND state IN ('completed', 'failed', 'skipped') GROUP BY trained_by"
                ),
                {"id": sid},
            )
        ).all()
    return {str(r.trained_by): int(r.n) for r in rows}


@pytest.mark.slow
async def test_three_workers_share_one_session_and_decide_duplicates_as_one_does(
    clean_db: Database, db_url: str, two_libraries: tuple[Path, Path], tmp_path: Path
) -> None:
    one, three = two_libraries

    solo_sid = await ws.start_session(clean_db, one, [one])
    solo = ws.WorkerProcess(_env(db_url, one, tmp_path / "solo"), tmp_path / "solo.log")
    try:
        solo_row = await _finished(clean_db, solo_sid, 180)
    finally:
        solo.terminate()
        await solo.exited(15)
    assert solo_row["state"] == "completed", solo.log()[-3000:]

    workers = [
        ws.WorkerProcess(
            _env(db_url, three, tmp_path / f"w{i}", IMAGETRAINING_WORKER_ID=f"worker-{i}"), tmp_path / f"w{i}.log"
        )
        for i in range(3)
    ]
    try:

        async def all_started() -> bool:
            return all(f"worker worker-{i} started" in w.log() for i, w in enumerate(workers))

        # The shares measure sharing, not which process finished starting first on a busy machine.
        await wait_for(all_started, timeout=120, what="the three workers to start")
        sid = await ws.start_session(clean_db, three, [three])
        row = await _finished(clean_db, sid, 180)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            await w.exited(15)
    logs = "\n".join(w.log()[-2000:] for w in workers)
    assert row["state"] == "completed", logs

    # Counters exact, one outcome per job.
    assert row["total_images"] == IMAGES
    assert (row["processed_images"], row["skipped_images"], row["failed_images"]) == (
        IMAGES - EXACT_COPIES,
        EXACT_COPIES,
        0,
    )
    assert (solo_row["processed_images"], solo_row["skipped_images"]) == (IMAGES - EXACT_COPIES, EXACT_COPIES)
    assert await ws.scalar(clean_db, "SELECT count(*) FROM training_jobs WHERE session_id = :id", id=sid) == IMAGES
    assert (
        await ws.scalar(
            clean_db,
            "SELECT count(*) FROM training_jobs WHERE session_id = :id AND state IN ('pending', 'running')",
            id=sid,
        )
        == 0
    )

    # Every worker trained a share.
    shares = await _shares(clean_db, sid)
    assert set(shares) == {"worker-0", "worker-1", "worker-2"}, shares
    assert sum(shares.values()) == IMAGES
    assert all(n >= 0.15 * IMAGES for n in shares.values()), shares

    # The kept copies, the skipped ones and the look-alikes named are those of the one-worker run.
    solo_labels = await _labels(clean_db, solo_sid, one)
    many_labels = await _labels(clean_db, sid, three)
    assert many_labels == solo_labels
    copies = {k: v for k, v in many_labels.items() if k.startswith("zz-copies/")}
    assert len(copies) == EXACT_COPIES
    assert all(v[0:2] == ("skipped", "exact_duplicate") and v[2].startswith("d00/") for v in copies.values())
    named = [v for k, v in many_labels.items() if k.startswith("d00/img01") and v[3] is not None]
    assert named, "the originals of the large look-alikes name them as near duplicates"
    assert all(v[3].startswith("aa-large/") for v in named)


async def _job_states(db: Database, sid: int) -> dict[int, tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        from sqlalchemy import text

        rows = (
            await conn.execute(
                text("SELECT id, state, trained_by, update_time FROM training_jobs WHERE session_id = :id"), {"id": sid}
            )
        ).all()
    return {int(r.id): (r.state, r.trained_by, r.update_time) for r in rows}


async def _held_by(db: Database, sid: int, worker: str) -> list[int]:
    async with db.engine.connect() as conn:
        from sqlalchemy import text

        rows = (
            await conn.execute(
                text("SELECT id FROM training_jobs WHERE session_id = :id AND state = 'running' AND trained_by = :w"),
                {"id": sid, "w": worker},
            )
        ).all()
    return [int(r.id) for r in rows]


@pytest.mark.slow
async def test_a_helper_killed_or_frozen_loses_only_its_chunk(
    clean_db: Database, db_url: str, two_libraries: tuple[Path, Path], tmp_path: Path
) -> None:
    """kill -9 one helper mid-chunk and freeze another past its chunk lease: the session completes
    with exact counters, and the chunks they held are trained by the others; the frozen one, woken
    while the session still runs, writes nothing of its old chunk."""
    _one, three = two_libraries
    sid = await ws.start_session(clean_db, three, [three])
    env = {name: _env(db_url, three, tmp_path / name, IMAGETRAINING_WORKER_ID=name) for name in ("owner", "k", "f")}
    owner = ws.WorkerProcess(env["owner"], tmp_path / "owner.log")

    async def owned() -> bool:
        return (await ws.session(clean_db, sid))["owner_id"] == "owner"

    await wait_for(owned, timeout=60, what="the owner to claim the session")
    doomed = ws.WorkerProcess(env["k"], tmp_path / "k.log")
    frozen = ws.WorkerProcess(env["f"], tmp_path / "f.log")
    workers = [owner, doomed, frozen]
    try:
        doomed_chunk = await wait_for(
            lambda: _held_by(clean_db, sid, "k"), timeout=120, what="the first helper to hold a chunk"
        )
        doomed.kill()
        frozen_chunk = await wait_for(
            lambda: _held_by(clean_db, sid, "f"), timeout=120, what="the second helper to hold a chunk"
        )
        frozen.proc.send_signal(signal.SIGSTOP)

        async def taken_over() -> bool:
            trained = await ws.scalar(
                clean_db,
                "SELECT count(*) FROM training_jobs WHERE id = ANY(CAST(:ids AS bigint[]))"
                " AND state IN ('completed', 'skipped') AND trained_by IS DISTINCT FROM 'f'",
                ids=frozen_chunk,
            )
            return bool(trained == len(frozen_chunk))

        await wait_for(taken_over, timeout=120, what="the frozen helper's chunk to lapse and be trained by another")
        frozen.proc.send_signal(signal.SIGCONT)  # woken (while the session may still run)
        row = await _finished(clean_db, sid, 180)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
                w.terminate()
        for w in workers:
            if w.proc.poll() is None:
                await w.exited(15)
    assert row["state"] == "completed", owner.log()[-3000:]
    assert (row["processed_images"], row["skipped_images"], row["failed_images"]) == (
        IMAGES - EXACT_COPIES,
        EXACT_COPIES,
        0,
    )
    assert await ws.scalar(clean_db, "SELECT count(*) FROM training_jobs WHERE session_id = :id", id=sid) == IMAGES
    for name, chunk in (("k", doomed_chunk), ("f", frozen_chunk)):
        outcomes = await ws.scalar(
            clean_db,
            "SELECT count(*) FROM training_jobs WHERE id = ANY(CAST(:ids AS bigint[]))"
            " AND state IN ('completed', 'skipped') AND trained_by IS DISTINCT FROM :w",
            ids=chunk,
            w=name,
        )
        assert outcomes == len(chunk), (name, chunk)


@pytest.mark.slow
async def test_pause_with_three_workers_stops_every_chunk_and_resume_finishes_exactly(
    clean_db: Database, db_url: str, two_libraries: tuple[Path, Path], tmp_path: Path
) -> None:
    _one, three = two_libraries
    sid = await ws.start_session(clean_db, three, [three])
    names = [f"worker-{i}" for i in range(3)]
    workers = {
        name: ws.WorkerProcess(_env(db_url, three, tmp_path / name, IMAGETRAINING_WORKER_ID=name), tmp_path / name)
        for name in names
    }
    try:

        async def everyone_trains() -> bool:
            shares = await _shares(clean_db, sid)
            return all(shares.get(name, 0) > 0 for name in names)

        await wait_for(everyone_trains, timeout=120, what="all three workers to train")
        owner = str((await ws.session(clean_db, sid))["owner_id"])
        assert await ws.pause(clean_db, sid)
        assert (
            await ws.scalar(
                clean_db, "SELECT count(*) FROM training_jobs WHERE session_id = :id AND state = 'running'", id=sid
            )
            == 0
        )
        at_pause = await _job_states(clean_db, sid)

        async def everyone_stopped() -> bool:
            row = await ws.session(clean_db, sid)
            # Every slice of help is logged "helping" when it begins and "left after" when it ends.
            helpers_stopped = all(
                workers[name].log().count(f"session {sid}: helping")
                == workers[name].log().count(f"session {sid}: left after")
                for name in names
                if name != owner
            )
            return row["owner_id"] is None and helpers_stopped

        await wait_for(everyone_stopped, timeout=30, what="the owner to hand back and the helpers to stop")
        # Not one job changed after the pause returned (state, outcome, the worker, the time written).
        assert await _job_states(clean_db, sid) == at_pause
        paused = await ws.session(clean_db, sid)
        done = paused["processed_images"] + paused["failed_images"] + paused["skipped_images"]
        assert done == await ws.scalar(
            clean_db,
            "SELECT count(*) FROM training_jobs WHERE session_id = :id AND state IN ('completed', 'failed', 'skipped')",
            id=sid,
        )
        assert 0 < done < IMAGES

        assert await ws.resume(clean_db, sid)
        row = await _finished(clean_db, sid, 180)
    finally:
        for w in workers.values():
            w.terminate()
        for w in workers.values():
            await w.exited(15)
    assert row["state"] == "completed"
    assert (row["processed_images"], row["skipped_images"], row["failed_images"]) == (
        IMAGES - EXACT_COPIES,
        EXACT_COPIES,
        0,
    )


@pytest.mark.slow
async def test_a_small_session_started_later_is_not_starved_by_a_huge_one(
    clean_db: Database, db_url: str, two_libraries: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two workers owning one session each at most: both train the huge session until a small one is
    started; the small one is claimed and finished while the huge one still runs."""
    one, three = two_libraries
    base = one.parent
    huge = await ws.start_session(clean_db, three, [three])
    workers = [
        ws.WorkerProcess(
            _env(
                db_url,
                base,
                tmp_path / f"w{i}",
                IMAGETRAINING_WORKER_ID=f"worker-{i}",
                IMAGETRAINING_MAX_SESSIONS_PER_WORKER="1",
            ),
            tmp_path / f"w{i}.log",
        )
        for i in range(2)
    ]
    try:

        async def both_train_the_huge_one() -> bool:
            shares = await _shares(clean_db, huge)
            return len(shares) == 2

        await wait_for(both_train_the_huge_one, timeout=120, what="both workers to train the huge session")
        small = await ws.start_session(clean_db, one, [one / "d01"])
        row = await _finished(clean_db, small, 60)
        assert row["state"] == "completed" and row["processed_images"] == 200
        assert (await ws.session(clean_db, huge))["state"] == "running"
        await _finished(clean_db, huge, 180)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            await w.exited(15)

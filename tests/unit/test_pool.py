"""TrainingPool: results in order, off the event loop, and one dying process fails one item only.

The test trainers live in tests/trainers.py (light to import in every new pool process) and are
re-exported here, so "tests.unit.test_pool:CrashingTrainer" works as a spec too; pool processes get
the test run's sys.path.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from discovery_worker.hashing import process_image
from discovery_worker.pool import PoolClosedError, TrainerLoadError, TrainingPool
from discovery_worker.trainer import DefaultTrainer
from tests import images
from tests.trainers import BrokenInitTrainer, CrashingTrainer, SlowTrainer

__all__ = ["BrokenInitTrainer", "CrashingTrainer", "SlowTrainer"]

ROOT = Path(__file__).resolve().parents[2]
LIMITS: dict[str, int] = {"max_file_bytes": 50 * 1024 * 1024, "max_image_pixels": 100_000_000}


def make_pool(trainer: str, size: int = 2) -> TrainingPool:
    return TrainingPool(size, trainer_spec=trainer, **LIMITS)


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[TrainingPool]:
    p = make_pool("tests.trainers:CrashingTrainer")
    yield p
    await p.close()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> images.Library:
    return images.build_library(tmp_path_factory.mktemp("pool") / "lib", good=8)


async def test_results_in_order_and_equal_to_in_process(pool: TrainingPool, library: images.Library) -> None:
    paths = [str(p) for p in library.image_files] * 2
    job_ids = [1000 - 7 * i for i in range(len(paths))]  # not sorted: order comes from the input
    results = await pool.process(list(zip(job_ids, paths, strict=True)))
    assert [job_id for job_id, _ in results] == job_ids
    for (_, result), path in zip(results, paths, strict=True):
        expected = process_image(path, trainer=DefaultTrainer(), **LIMITS)
        assert (result.ok, result.error_class, result.perceptual_hash) == (
            expected.ok,
            expected.error_class,
            expected.perceptual_hash,
        ), path
        assert (result.width, result.height, result.format) == (expected.width, expected.height, expected.format)
        if result.ok:
            assert result.features is not None
            assert result.features["pid"] != os.getpid()  # computed in a pool process
            assert {k: v for k, v in result.features.items() if k != "pid"} == expected.features
    assert await pool.process([]) == []


async def test_crash_fails_only_that_item_and_pool_recovers(pool: TrainingPool, tmp_path: Path) -> None:
    paths = [images.write_jpeg(tmp_path / f"img{i}.jpg", 64, 48, seed=i) for i in range(12)]
    paths.insert(5, images.write_jpeg(tmp_path / "crash_me.jpg", 64, 48, seed=99))
    crashes = pool.crashes
    results = await pool.process([(i, str(p)) for i, p in enumerate(paths)])
    assert [job_id for job_id, _ in results] == list(range(len(paths)))
    outcomes = {Path(paths[i]).name: r.error_class for i, r in results if not r.ok}
    assert outcomes == {"crash_me.jpg": "decoder_crash"}
    assert all(r.ok and r.perceptual_hash for i, r in results if i != 5)
    assert pool.crashes > crashes
    # The replaced pool works normally, with new processes.
    again = await pool.process([(1, str(paths[0])), (2, str(paths[1]))])
    assert all(r.ok for _, r in again)


async def test_two_crashing_items_in_one_batch(pool: TrainingPool, tmp_path: Path) -> None:
    paths = [str(images.write_jpeg(tmp_path / f"img{i}.jpg", 48, 32, seed=i)) for i in range(6)]
    paths[1] = str(images.write_jpeg(tmp_path / "crash1.jpg", 48, 32))
    paths[4] = str(images.write_jpeg(tmp_path / "crash2.jpg", 48, 32))
    results = await pool.process(list(enumerate(paths)))
    assert [r.error_class for _, r in results] == ["", "decoder_crash", "", "", "decoder_crash", ""]


async def test_small_images_go_in_groups_and_a_crash_in_a_group_fails_only_its_item(tmp_path: Path) -> None:
    """Small images are sent several per task; a crash still costs exactly the one image that caused it."""
    pool = make_pool("tests.trainers:CrashingTrainer")
    try:
        paths = [str(images.write_jpeg(tmp_path / f"small{i:03d}.jpg", 16, 16, seed=i)) for i in range(120)]
        await pool.process(list(enumerate(paths[:40])))  # measures the per-image time: tiny
        assert pool._group_size() > 1
        paths[70] = str(images.write_jpeg(tmp_path / "crash_in_a_group.jpg", 16, 16, seed=7))
        crashes = pool.crashes
        results = await pool.process(list(enumerate(paths)))
        assert [job_id for job_id, _ in results] == list(range(len(paths)))
        assert {i: r.error_class for i, r in results if not r.ok} == {70: "decoder_crash"}
        for i, r in results:
            if i != 70:
                assert r.ok and r.perceptual_hash == process_image(paths[i], **LIMITS).perceptual_hash, i
        assert pool.crashes > crashes
    finally:
        await pool.close()


async def test_concurrent_calls_share_the_pool(pool: TrainingPool, tmp_path: Path) -> None:
    # Two sessions' batches at once, each with a crasher: a crash in one call hits the other
    # call's items in flight too; every innocent item still succeeds.
    a = [str(images.write_jpeg(tmp_path / f"a{i}.jpg", 48, 32, seed=i)) for i in range(8)]
    b = [str(images.write_png(tmp_path / f"b{i}.png", 48, 32, seed=10 + i)) for i in range(8)]
    c = [str(images.write_webp(tmp_path / f"c{i}.webp", 48, 32, seed=20 + i)) for i in range(8)]
    a[2] = str(images.write_jpeg(tmp_path / "crash_a.jpg", 48, 32))
    b[5] = str(images.write_png(tmp_path / "crash_b.png", 48, 32))
    ra, rb, rc = await asyncio.gather(*(pool.process(list(enumerate(x))) for x in (a, b, c)))
    assert [i for i, r in ra if not r.ok] == [2] and ra[2][1].error_class == "decoder_crash"
    assert [i for i, r in rb if not r.ok] == [5] and rb[5][1].error_class == "decoder_crash"
    assert all(r.ok for _, r in rc)


async def test_hanging_item_is_timed_out_alone(tmp_path: Path) -> None:
    paths = [str(images.write_jpeg(tmp_path / f"h{i}.jpg", 48, 32, seed=i)) for i in range(5)]
    paths.insert(2, str(images.write_jpeg(tmp_path / "hang.jpg", 48, 32)))
    async with TrainingPool(2, trainer_spec="tests.trainers:HangingTrainer", item_timeout=0.5, **LIMITS) as p:
        start = time.perf_counter()
        results = await p.process(list(enumerate(paths)))
        assert time.perf_counter() - start < 10
    assert [i for i, r in results if not r.ok] == [2]
    assert results[2][1].error_class == "decoder_crash"
    assert "did not finish within 0.5s" in results[2][1].error_message


async def test_event_loop_stays_responsive(pool: TrainingPool, tmp_path: Path) -> None:
    paths = [str(images.write_jpeg(tmp_path / f"p{i}.jpg", 1600, 1200, seed=i)) for i in range(6)]
    paths.append(str(images.write_jpeg(tmp_path / "crash.jpg", 64, 48)))
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - start - 0.01)

    tick = asyncio.create_task(ticker())
    try:
        results = await pool.process(list(enumerate(paths)))
    finally:
        tick.cancel()
    assert [r.ok for _, r in results] == [True] * 6 + [False]
    # Generous for a shared 2-core CI machine; decoding on the loop would stall it for 100+ ms.
    assert max(lags) < 0.25, sorted(lags)[-5:]


async def test_cancel_returns_promptly_and_pool_survives(tmp_path: Path) -> None:
    paths = [str(images.write_jpeg(tmp_path / f"s{i}.jpg", 32, 32, seed=i)) for i in range(40)]
    async with make_pool("tests.trainers:SlowTrainer") as slow:
        await slow.start()
        task = asyncio.create_task(slow.process(list(enumerate(paths))))
        await asyncio.sleep(0.3)
        start = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.perf_counter() - start < 0.5
        # At most one item per process was still running; the rest were never started.
        t0 = time.perf_counter()
        results = await slow.process([(1, paths[0]), (2, paths[1])])
        assert all(r.ok for _, r in results)
        assert time.perf_counter() - t0 < 1.0


async def test_trainer_that_cannot_load() -> None:
    broken = make_pool("tests.unit.test_pool:BrokenInitTrainer")
    with pytest.raises(TrainerLoadError, match="weights not found") as info:
        await broken.process([(1, "/nonexistent.jpg")])
    assert isinstance(info.value, ValueError)
    # Remembered: no new processes are started for every batch.
    generations = broken.generations
    with pytest.raises(TrainerLoadError):
        await broken.start()
    assert broken.generations == generations
    await broken.close()


async def test_bad_spec_and_size() -> None:
    with pytest.raises(ValueError, match=r"module\.path:ClassName"):
        make_pool("discovery_worker.trainer.DefaultTrainer")
    with pytest.raises(ValueError, match="size"):
        TrainingPool(-1, trainer_spec="discovery_worker.trainer:DefaultTrainer", **LIMITS)
    assert TrainingPool(0, trainer_spec="discovery_worker.trainer:DefaultTrainer", **LIMITS).size == (
        os.cpu_count() or 1
    )


async def test_closed_pool_refuses_work(tmp_path: Path) -> None:
    p = make_pool("discovery_worker.trainer:DefaultTrainer", size=1)
    path = str(images.write_jpeg(tmp_path / "a.jpg", 32, 32))
    assert (await p.process([(1, path)]))[0][1].ok
    await p.close()
    with pytest.raises(PoolClosedError):
        await p.process([(1, path)])
    await p.close()  # idempotent


CHILD_SCRIPT = """
import asyncio, json, sys
from discovery_worker.pool import TrainingPool

async def main():
    pool = TrainingPool(2, max_file_bytes=10**8, max_image_pixels=10**8,
                        trainer_spec="tests.trainers:SlowTrainer")
    results = await pool.process([(i, sys.argv[1]) for i in range(4)])
    print(json.dumps(sorted({r.features["pid"] for _, r in results})), flush=True)
    await asyncio.sleep(60)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_pool_processes_exit_when_the_worker_is_killed(tmp_path: Path) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg", 32, 32)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(path)], stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the child did not report its pool processes"
        pids = json.loads(proc.stdout.readline())
        assert pids and all(psutil.pid_exists(pid) for pid in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False

"""Trainer batches (#13): formed by the pool, the model set up once per process, a bad image failing alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from discovery_worker.hashing import process_batch, process_image
from discovery_worker.pool import TrainingPool
from imagetraining.vectors import Provenance
from tests import images
from tests.trainers import BatchTrainer, trained_log

LIMITS: dict[str, int] = {"max_file_bytes": 50 * 1024 * 1024, "max_image_pixels": 100_000_000}


def _photos(root: Path, n: int) -> list[str]:
    return [str(images.write_jpeg(root / f"{i:02d}.jpg", 48, 32, seed=100 + i)) for i in range(n)]


def test_a_batch_gives_what_batches_of_one_give(tmp_path: Path) -> None:
    paths = _photos(tmp_path, 5)
    together = process_batch(paths, trainer=BatchTrainer(), **LIMITS)
    alone = [process_image(p, trainer=BatchTrainer(), **LIMITS) for p in paths]
    assert [r.ok for r in together] == [True] * 5
    assert together == alone
    for result in together:
        assert result.embedding is not None and len(result.embedding) == 3
        assert float(np.linalg.norm(result.embedding)) == pytest.approx(1.0, abs=1e-6)
    assert [n for _pid, _s, n, _p in trained_log(tmp_path)[:5]] == [5] * 5  # one call for the five


def test_a_bad_image_in_a_batch_fails_alone(tmp_path: Path) -> None:
    """A file that does not decode, a trainer exception in one slot, and a batch call that raises
    because of one image: each fails its own image only."""
    good = _photos(tmp_path, 3)
    corrupt = str(images.write_corrupt_jpeg(tmp_path / "corrupt.jpg"))
    refused = str(images.write_jpeg(tmp_path / "refuse.jpg", 40, 30, seed=7))
    poison = str(images.write_jpeg(tmp_path / "poison.jpg", 40, 30, seed=8))
    paths = [good[0], corrupt, good[1], refused, poison, good[2]]
    results = process_batch(paths, trainer=BatchTrainer(), **LIMITS)
    outcome = {Path(p).name: (r.ok, r.error_class) for p, r in zip(paths, results, strict=True)}
    assert outcome == {
        "00.jpg": (True, ""),
        "corrupt.jpg": (False, "corrupt"),
        "01.jpg": (True, ""),
        "refuse.jpg": (False, "trainer_error"),
        "poison.jpg": (False, "trainer_error"),
        "02.jpg": (True, ""),
    }
    assert "poisoned batch" in results[4].error_message and results[4].perceptual_hash  # hashed, not trained
    assert results[0] == process_image(good[0], trainer=BatchTrainer(), **LIMITS)


def test_an_embedding_of_the_wrong_length_fails_its_image(tmp_path: Path) -> None:
    class Wrong(BatchTrainer):
        dimension = 4  # returns 3

    (result,) = process_batch(_photos(tmp_path, 1), trainer=Wrong(), **LIMITS)
    assert (result.ok, result.error_class) == (False, "trainer_error")
    assert "3 values; the trainer declares 4" in result.error_message


async def test_the_pool_forms_batches_and_sets_the_model_up_once_per_process(tmp_path: Path) -> None:
    paths = _photos(tmp_path, 16)
    pool = TrainingPool(2, trainer_spec="tests.trainers:BatchTrainer", **LIMITS)
    try:
        results = await pool.process(list(enumerate(paths)))
        again = await pool.process(list(enumerate(paths)))
    finally:
        await pool.close()
    assert pool.provenance == Provenance("batch-test", "A", "", 3)
    assert pool.batch_size == 4  # the trainer's own
    assert all(r.ok and r.embedding is not None for _i, r in [*results, *again])
    trained = trained_log(tmp_path)
    assert len(trained) == 32
    assert {setups for _pid, setups, _n, _p in trained} == {1}  # set up once, before its first batch
    assert len({pid for pid, _s, _n, _p in trained}) <= 2
    assert {n for _pid, _s, n, _p in trained} == {4}  # 32 images in batches of 4


async def test_the_batch_size_setting_overrides_the_trainers(tmp_path: Path) -> None:
    paths = _photos(tmp_path, 6)
    pool = TrainingPool(1, trainer_spec="tests.trainers:BatchTrainer", batch_size=3, **LIMITS)
    try:
        await pool.process(list(enumerate(paths)))
    finally:
        await pool.close()
    assert {n for _pid, _s, n, _p in trained_log(tmp_path)} == {3}

"""NearIndex: the closest hash within the distance, as a comparison with every hash would find it."""

from __future__ import annotations

import random

import pytest

from imagetraining.duplicates import NEAR_DUPLICATE_DISTANCE_MAX, NearIndex, distance


@pytest.mark.parametrize("max_distance", range(NEAR_DUPLICATE_DISTANCE_MAX + 1))
def test_nearest_equals_brute_force(max_distance: int) -> None:
    rng = random.Random(max_distance)
    base = [rng.getrandbits(64) for _ in range(300)]
    stored: list[tuple[int, int]] = []
    for i, value in enumerate(base):
        stored.append((value, 2 * i))
        # A look-alike of each: a few bits flipped.
        flipped = value
        for bit in rng.sample(range(64), rng.randint(0, max_distance + 2)):
            flipped ^= 1 << bit
        stored.append((flipped, 2 * i + 1))
    index = NearIndex(max_distance)
    for value, asset_id in stored:
        index.add(value, asset_id)
    for value, asset_id in stored:
        found = index.nearest(value, exclude=asset_id)
        brute = min(
            ((distance(value, v), a) for v, a in stored if a != asset_id and distance(value, v) <= max_distance),
            default=None,
        )
        assert found == (None if brute is None else (brute[1], brute[0]))


def test_distance_limits() -> None:
    with pytest.raises(ValueError):
        NearIndex(NEAR_DUPLICATE_DISTANCE_MAX + 1)
    index = NearIndex(0)
    index.add(0xFF, 7)
    assert index.nearest(0xFF) == (7, 0)
    assert index.nearest(0xFE) is None


def test_skip_near_duplicates_keeps_the_best_in_every_order() -> None:
    """_classify with skip_near, chunk by chunk as the trainer commits them: whatever the order of a
    group of look-alikes, the one kept is the one with the most pixels (then bytes, then path)."""
    import itertools

    from discovery_worker.hashing import ImageResult
    from discovery_worker.training import KeptImages, PendingJob, _classify, _quality

    images = {  # asset id: (path, width, height, size, dhash)
        1: ("/l/a/thumb.jpg", 256, 192, 20_000, "ff00ff00ff00ff00"),
        2: ("/l/b/medium.jpg", 640, 480, 90_000, "ff00ff00ff00ff01"),
        3: ("/l/c/original.jpg", 1600, 1200, 900_000, "ff00ff00ff00ff03"),
        4: ("/l/d/same-pixels-smaller-file.jpg", 1600, 1200, 800_000, "ff00ff00ff00ff00"),
    }
    for order in itertools.permutations(images):
        kept = KeptImages(4, skip_near=True)
        states: dict[int, str] = {}
        for job_id, asset_id in enumerate(order, start=1):
            path, width, height, size, dhash = images[asset_id]
            job = PendingJob(job_id, asset_id, path, size, 0, None)
            result = ImageResult(
                ok=True, perceptual_hash=dhash, width=width, height=height, content_digest=f"digest{asset_id}"
            )
            decisions, demotions = _classify([job], {job_id: result}, kept)
            for demoted in demotions:
                states[demoted.asset_id] = "skipped"
                kept.drop(demoted.asset_id)
            for d in decisions:
                states[d.job.asset_id] = d.state
                if d.state == "completed":
                    kept.keep(asset_id, dhash, result.content_digest, _quality(job, result))
        assert states == {1: "skipped", 2: "skipped", 3: "completed", 4: "skipped"}, order

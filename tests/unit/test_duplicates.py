"""NearIndex: the closest hash within the distance, as a comparison with every hash would find it."""

from __future__ import annotations

import random

import pytest

from imagetraining.duplicates import (
    NEAR_DUPLICATE_DISTANCE_MAX,
    SKIP_EXACT_DUPLICATE,
    SKIP_NEAR_DUPLICATE,
    Label,
    NearIndex,
    Trained,
    distance,
    resolve,
)


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


_LOOKALIKES = {  # asset id: (path, width, height, size, dhash, digest)
    1: ("/l/a/thumb.jpg", 256, 192, 20_000, "ff00ff00ff00ff00", "d1"),
    2: ("/l/b/medium.jpg", 640, 480, 90_000, "ff00ff00ff00ff01", "d2"),
    3: ("/l/c/original.jpg", 1600, 1200, 900_000, "ff00ff00ff00ff03", "d3"),
    4: ("/l/d/same-pixels-smaller-file.jpg", 1600, 1200, 800_000, "ff00ff00ff00ff00", "d4"),
    5: ("/l/e/copy-of-original.jpg", 1600, 1200, 900_000, "ff00ff00ff00ff03", "d3"),  # same bytes as 3
    6: ("/l/f/unrelated.jpg", 800, 600, 100_000, "0123456789abcdef", "d6"),
}


def _trained(order: tuple[int, ...]) -> list[Trained]:
    return [
        Trained(10 + asset_id, asset_id, digest, dhash, width, height, size, path)
        for asset_id in order
        for path, width, height, size, dhash, digest in [_LOOKALIKES[asset_id]]
    ]


def test_skip_near_duplicates_keeps_the_best_in_every_order() -> None:
    """Whatever order the jobs come in (how many workers trained them, in which order they committed),
    the kept copy of a group of look-alikes is the one with the most pixels (then bytes, then path),
    and an exact copy is skipped in favour of the lowest asset id."""
    import itertools

    first = None
    for order in itertools.permutations(_LOOKALIKES):
        labels = resolve(_trained(order), 4, skip_near=True)
        states = {job_id - 10: (label.state, label.skip_reason) for job_id, label in labels.items()}
        assert states == {
            1: ("skipped", SKIP_NEAR_DUPLICATE),
            2: ("skipped", SKIP_NEAR_DUPLICATE),
            3: ("completed", ""),
            4: ("skipped", SKIP_NEAR_DUPLICATE),
            5: ("skipped", SKIP_EXACT_DUPLICATE),
            6: ("completed", ""),
        }, order
        assert labels[15].duplicate_of == 3
        assert {labels[10 + i].near_of for i in (1, 2, 4)} == {3}
        first = first or labels
        assert labels == first, order


def test_near_duplicates_are_reported_against_a_lower_asset_id_in_every_order() -> None:
    """Without skip_near, every look-alike is trained, and names its closest look-alike among the
    lower asset ids (then the lowest id), whatever the order."""
    import itertools

    first = None
    for order in itertools.permutations(_LOOKALIKES):
        labels = resolve(_trained(order), 4, skip_near=False)
        assert labels[11].near_of is None
        assert (labels[12].near_of, labels[12].near_distance) == (1, 1)
        assert (labels[13].near_of, labels[13].near_distance) == (2, 1)
        assert (labels[14].near_of, labels[14].near_distance) == (1, 0)
        assert (labels[15].state, labels[15].duplicate_of) == ("skipped", 3)
        assert labels[16] == Label("completed")
        first = first or labels
        assert labels == first, order

"""Exact and near duplicates: what each is, and how near ones are found among millions of hashes.

Two kinds, never confused (README "Duplicates"):
- an *exact duplicate* has the same bytes as another image of the session (equal BLAKE2b-128
  content digests, computed from the bytes the decoder reads): it is skipped, `exact_duplicate`,
  naming the copy that is trained;
- a *near duplicate* looks like another image (their 64-bit dHashes differ in at most the session's
  `near_duplicate_distance` bits: a thumbnail, a re-encoded or lightly edited copy) but is another
  file: it is trained like any image, and its job names the look-alike and the distance. A 256 px
  thumbnail and its 12 MP original are near duplicates, so both are kept. With the session's
  `skip_near_duplicates`, only the best of look-alikes is kept (`quality_key`: the most pixels,
  then the largest file, then the first path); the others end skipped `near_duplicate`.

`resolve` decides both from the session's trained jobs alone, once training has ended (the owner
applies the labels in the transaction that completes the session): many workers commit chunks in
any order, and the same set of images must give the same kept copies whatever that order.

`NearIndex` finds, for a new hash, the closest stored one within the distance without comparing it
with every stored hash: the 64 bits are cut into `distance + 1` bands, and two hashes at most
`distance` bits apart agree on at least one whole band (pigeonhole), so only the hashes that share a
band value are compared.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SKIP_EXACT_DUPLICATE = "exact_duplicate"
SKIP_NEAR_DUPLICATE = "near_duplicate"
NEAR_DUPLICATE_DISTANCE_DEFAULT = 4
NEAR_DUPLICATE_DISTANCE_MAX = 8
HASH_BITS = 64


def hash_bits(hex_hash: str) -> int:
    """A dHash as stored (16 hex digits) as an integer."""
    return int(hex_hash, 16)


def distance(a: int, b: int) -> int:
    """Bits in which two 64-bit hashes differ."""
    return (a ^ b).bit_count()


class NearIndex:
    """Hashes with the asset that holds each; `nearest` finds the closest within `max_distance`."""

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance <= NEAR_DUPLICATE_DISTANCE_MAX:
            raise ValueError(f"max_distance {max_distance} is not in 0..{NEAR_DUPLICATE_DISTANCE_MAX}")
        self.max_distance = max_distance
        bands = max_distance + 1
        widths = [HASH_BITS // bands + (1 if i < HASH_BITS % bands else 0) for i in range(bands)]
        self._bands: list[tuple[int, int]] = []  # (shift, mask)
        shift = 0
        for width in widths:
            self._bands.append((shift, (1 << width) - 1))
            shift += width
        self._tables: list[dict[int, list[tuple[int, int]]]] = [{} for _ in self._bands]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, value: int, asset_id: int) -> None:
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            table.setdefault((value >> shift) & mask, []).append((value, asset_id))
        self._size += 1

    def remove(self, value: int, asset_id: int) -> None:
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            bucket = table.get((value >> shift) & mask)
            if bucket is not None and (value, asset_id) in bucket:
                bucket.remove((value, asset_id))
        self._size -= 1

    def nearest(
        self, value: int, *, exclude: int | None = None, excluding: frozenset[int] | set[int] = frozenset()
    ) -> tuple[int, int] | None:
        """(asset_id, distance) of the closest stored hash within the distance (then the lowest asset
        id, so the answer does not depend on the order of adding), or None."""
        best: tuple[int, int] | None = None  # (distance, asset_id)
        for table, (shift, mask) in zip(self._tables, self._bands, strict=True):
            for other, asset_id in table.get((value >> shift) & mask, ()):
                if asset_id == exclude or asset_id in excluding:
                    continue
                d = distance(value, other)
                if d <= self.max_distance and (best is None or (d, asset_id) < best):
                    best = (d, asset_id)
        return None if best is None else (best[1], best[0])


def quality_key(width: int, height: int, size_bytes: int, path: str) -> tuple[int, int, str]:
    """Smaller is better: the most pixels, then the largest file, then the first path."""
    return (-(width * height), -size_bytes, path)


@dataclass(frozen=True, slots=True)
class Trained:
    """A job of the session that trained (completed or skipped as a duplicate): what resolution reads."""

    job_id: int
    asset_id: int
    content_digest: str
    perceptual_hash: str
    width: int
    height: int
    size_bytes: int
    path: str


@dataclass(frozen=True, slots=True)
class Label:
    """What resolution decides for one job: kept (completed) or skipped, and what it duplicates."""

    state: str  # 'completed' | 'skipped'
    skip_reason: str = ""
    duplicate_of: int | None = None
    near_of: int | None = None
    near_distance: int | None = None


def resolve(jobs: Iterable[Trained], max_distance: int, *, skip_near: bool) -> dict[int, Label]:
    """Every trained job's label, from the set of jobs alone: the same set gives the same labels
    whatever the order it was trained or committed in, by however many workers.

    - Exact duplicates (equal content digests): the lowest asset id is kept; the others are skipped
      `exact_duplicate` of it.
    - Near duplicates among the kept (dHashes at most `max_distance` bits apart), reported: each
      names its closest look-alike with a lower asset id (then the lowest id), and stays trained.
    - With `skip_near`: the kept look-alikes are taken best first (`quality_key`); one within the
      distance of an image already kept is skipped `near_duplicate` of the closest such (then the
      lowest id); the best of every group of look-alikes is the one that stays.

    Blocking (CPU): run it in a thread.
    """
    by_digest: dict[str, Trained] = {}
    everyone = list(jobs)
    for job in everyone:
        known = by_digest.get(job.content_digest)
        if known is None or job.asset_id < known.asset_id:
            by_digest[job.content_digest] = job
    labels: dict[int, Label] = {}
    keepers: list[Trained] = []
    for job in everyone:
        keeper = by_digest[job.content_digest]
        if keeper.asset_id != job.asset_id:
            labels[job.job_id] = Label("skipped", SKIP_EXACT_DUPLICATE, duplicate_of=keeper.asset_id)
        elif keeper.job_id == job.job_id:
            keepers.append(job)
        else:  # the same asset twice (cannot happen: one job per asset per session); keep one
            labels[job.job_id] = Label("skipped", SKIP_EXACT_DUPLICATE, duplicate_of=keeper.asset_id)
    index = NearIndex(max_distance)
    if skip_near:
        order = sorted(keepers, key=lambda j: (quality_key(j.width, j.height, j.size_bytes, j.path), j.asset_id))
    else:
        order = sorted(keepers, key=lambda j: j.asset_id)
    for job in order:
        value = hash_bits(job.perceptual_hash)
        near = index.nearest(value)
        if near is not None and skip_near:
            labels[job.job_id] = Label("skipped", SKIP_NEAR_DUPLICATE, near_of=near[0], near_distance=near[1])
            continue
        index.add(value, job.asset_id)
        if near is None:
            labels[job.job_id] = Label("completed")
        else:
            labels[job.job_id] = Label("completed", near_of=near[0], near_distance=near[1])
    return labels

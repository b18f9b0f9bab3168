"""Exact and near duplicates: what each is, and how near ones are found among millions of hashes.

Two kinds, never confused (README "Duplicates"):
- an *exact duplicate* has the same bytes as another image of the session (equal BLAKE2b-128
  content digests, computed from the bytes the decoder reads): it is skipped, `exact_duplicate`,
  naming the copy that is trained;
- a *near duplicate* looks like another image (their 64-bit dHashes differ in at most the session's
  `near_duplicate_distance` bits: a thumbnail, a re-encoded or lightly edited copy) but is another
  file: it is trained like any image, and its job names the look-alike and the distance. A 256 px
  thumbnail and its 12 MP original are near duplicates, so both are kept. With the session's
  `skip_near_duplicates`, only the best of look-alikes is trained (`quality_key`: the most pixels,
  then the largest file, then the first path), whatever order they are found in: a better one found
  later takes the place of the one kept so far, which becomes skipped `near_duplicate`.

`NearIndex` finds, for a new hash, the closest stored one within the distance without comparing it
with every stored hash: the 64 bits are cut into `distance + 1` bands, and two hashes at most
`distance` bits apart agree on at least one whole band (pigeonhole), so only the hashes that share a
band value are compared.
"""

from __future__ import annotations

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

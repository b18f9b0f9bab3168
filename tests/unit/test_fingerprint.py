"""walker.fingerprint: what makes a directory's digest change (and so its files looked at again)."""

from __future__ import annotations

from discovery_worker.walker import fingerprint
from imagetraining.walk import FoundFile

EXTS = (".jpg", ".png")


def files(*entries: tuple[str, int, int]) -> list[FoundFile]:
    return [FoundFile(f"/lib/d/{name}", size, mtime, 1) for name, size, mtime in entries]


def test_the_same_listing_gives_the_same_digest() -> None:
    listing = files(("a.jpg", 10, 1), ("b.jpg", 20, 2))
    assert fingerprint(EXTS, listing) == fingerprint(EXTS, files(("a.jpg", 10, 1), ("b.jpg", 20, 2)))


def test_any_change_to_a_file_or_the_filter_changes_it() -> None:
    base = fingerprint(EXTS, files(("a.jpg", 10, 1), ("b.jpg", 20, 2)))
    variants = [
        files(("a.jpg", 11, 1), ("b.jpg", 20, 2)),  # size
        files(("a.jpg", 10, 5), ("b.jpg", 20, 2)),  # rewritten: new mtime
        files(("a.jpg", 10, 1), ("c.jpg", 20, 2)),  # renamed
        files(("a.jpg", 10, 1)),  # removed
        files(("a.jpg", 10, 1), ("b.jpg", 20, 2), ("c.jpg", 1, 1)),  # added
        files(("a.jpg", 10, 12), ("b.jpg", 0, 2)),  # fields shifted between files
    ]
    digests = {fingerprint(EXTS, v) for v in variants}
    assert base not in digests and len(digests) == len(variants)
    assert fingerprint((".jpg",), files(("a.jpg", 10, 1), ("b.jpg", 20, 2))) != base

"""The directory walk shared by discovery and counting, on real directories.

These are the properties the worker and ScanDirectory/ValidateSession rely on: a deterministic
order (re-runs and checkpoints), case-insensitive extensions (the seed missed `.JPG`), no escape
through symlinks, termination on loops, prompt stops for pause/cancel, and bounded counting.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from imagetraining.walk import FoundFile, Issue, Walk, count_images, list_subdirectories, scan_directory

EXT = ("jpg", "jpeg", "png")


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files(walk: Walk) -> list[str]:
    return [item.path for item in walk if isinstance(item, FoundFile)]


def rel(paths: list[str], root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def far_deadline() -> float:
    return time.monotonic() + 60


def test_order_is_sorted_depth_first_preorder(library: Path) -> None:
    for name in ("b/2.jpg", "b/1.jpg", "a/z/9.png", "a/0.jpg", "c.jpg", "a/b.jpg"):
        touch(library / name)
    found = files(Walk([str(library)], EXT, [library]))
    assert rel(found, library) == ["c.jpg", "a/0.jpg", "a/b.jpg", "a/z/9.png", "b/1.jpg", "b/2.jpg"]
    # The same again: order is a property, not an accident of the file system.
    assert files(Walk([str(library)], EXT, [library])) == found


def test_extensions_case_insensitive_and_only_images(library: Path) -> None:
    for name in ("a.JPG", "b.Jpeg", "c.png", "d.PNG", "e.txt", "f.jpg.txt", ".jpg", "noext", "g.gif"):
        touch(library / name)
    walk = Walk([str(library)], EXT, [library])
    assert sorted(rel(files(walk), library)) == ["a.JPG", "b.Jpeg", "c.png", "d.PNG"]
    assert walk.counters.files_seen == 9
    assert walk.counters.images_found == 4
    assert walk.counters.directories_scanned == 1


def test_found_file_has_size_mtime_and_top_index(library: Path) -> None:
    one = touch(library / "one" / "a.jpg", b"12345")
    two = touch(library / "two" / "b.jpg", b"1")
    walk = Walk([str(library / "one"), str(library / "two")], EXT, [library])
    items = [i for i in walk if isinstance(i, FoundFile)]
    assert [(i.path, i.size, i.mtime_ns, i.top) for i in items] == [
        (str(one), 5, one.stat().st_mtime_ns, 0),
        (str(two), 1, two.stat().st_mtime_ns, 1),
    ]
    # Counting needs no stat: sizes are zero there.
    quick = [i for i in Walk([str(library / "one")], EXT, [library], with_stat=False) if isinstance(i, FoundFile)]
    assert (quick[0].size, quick[0].mtime_ns) == (0, 0)


def test_symlink_out_of_root_is_refused(library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch(outside / "secret.jpg")
    touch(tmp_path / "secret2.jpg")
    (library / "escape-dir").symlink_to(outside)
    (library / "escape-file.jpg").symlink_to(tmp_path / "secret2.jpg")
    touch(library / "ok.jpg")
    items = list(Walk([str(library)], EXT, [library]))
    found = [i.path for i in items if isinstance(i, FoundFile)]
    issues = {os.path.basename(i.path): i.reason for i in items if isinstance(i, Issue)}
    assert rel(found, library) == ["ok.jpg"]
    assert set(issues) == {"escape-dir", "escape-file.jpg"}
    assert all("outside the library roots" in r for r in issues.values())


def test_symlink_inside_roots_is_followed(library: Path, tmp_path: Path) -> None:
    other_root = tmp_path / "other"
    touch(other_root / "x.jpg")
    (library / "link").symlink_to(other_root)
    (library / "alias.jpg").symlink_to(other_root / "x.jpg")
    found = files(Walk([str(library)], EXT, [library, other_root.resolve()]))
    assert rel(found, library) == ["alias.jpg", "link/x.jpg"]


def test_broken_symlink_is_an_issue(library: Path) -> None:
    (library / "dangling.jpg").symlink_to(library / "gone.jpg")
    items = list(Walk([str(library)], EXT, [library]))
    assert [type(i) for i in items] == [Issue]


def test_symlink_loop_terminates(library: Path) -> None:
    touch(library / "a" / "img.jpg")
    (library / "a" / "back-to-root").symlink_to(library)
    (library / "a" / "self").symlink_to(library / "a")
    (library / "loop1").symlink_to(library / "loop2")
    (library / "loop2").symlink_to(library / "loop1")
    items = list(Walk([str(library)], EXT, [library]))
    found = [i for i in items if isinstance(i, FoundFile)]
    assert rel([f.path for f in found], library) == ["a/img.jpg"]
    # loop1 -> loop2 -> loop1 resolves to no target inside the roots... or to nothing: never hangs.
    assert all(isinstance(i, Issue) for i in items if i not in found)


def test_directory_reached_twice_is_walked_once(library: Path) -> None:
    touch(library / "real" / "deep" / "one.jpg")
    (library / "a-link").symlink_to(library / "real" / "deep")
    walk = Walk([str(library)], EXT, [library])
    found = files(walk)
    # "a-link" sorts first, so the directory is visited through it and not again via real/deep.
    assert rel(found, library) == ["a-link/one.jpg"]
    assert walk.counters.images_found == 1


def test_same_top_twice_counts_once(library: Path) -> None:
    touch(library / "s" / "a.jpg")
    assert len(files(Walk([str(library / "s"), str(library / "s")], EXT, [library]))) == 1


def test_non_recursive(library: Path) -> None:
    touch(library / "top.jpg")
    touch(library / "sub" / "inner.jpg")
    (library / "linked").symlink_to(library / "sub")
    walk = Walk([str(library)], EXT, [library], recursive=False)
    assert rel(files(walk), library) == ["top.jpg"]
    assert walk.counters.directories_scanned == 1


def test_unreadable_directory_is_recorded_and_skipped(library: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every directory; permissions cannot make one unreadable")
    touch(library / "a" / "1.jpg")
    touch(library / "b" / "2.jpg")
    (library / "a").chmod(0)
    try:
        items = list(Walk([str(library)], EXT, [library]))
    finally:
        (library / "a").chmod(0o755)
    assert [i.path for i in items if isinstance(i, FoundFile)] == [str(library / "b" / "2.jpg")]
    assert [i.path for i in items if isinstance(i, Issue)] == [str(library / "a")]


def test_missing_top_is_an_issue(library: Path) -> None:
    items = list(Walk([str(library / "nope")], EXT, [library]))
    assert len(items) == 1 and isinstance(items[0], Issue)


@pytest.fixture
def big_flat(library: Path) -> Path:
    """A directory with over a thousand files: stops must work inside one directory too."""
    d = library / "big"
    d.mkdir()
    for i in range(1200):
        (d / f"{i:05}.jpg").write_bytes(b"")
    return d


def test_should_stop_ends_the_walk_promptly(big_flat: Path, library: Path) -> None:
    stop = threading.Event()
    seen = 0

    def should_stop() -> bool:
        return stop.is_set()

    walk = Walk([str(library)], EXT, [library], should_stop=should_stop, check_interval=0.0)
    for _item in walk:
        seen += 1
        if seen == 10:
            stop.set()
    assert walk.stopped and not walk.truncated
    # Polled at least every 256 entries: the walk ends long before the 1200 files.
    assert seen < 10 + 300


def test_max_files_truncates(big_flat: Path, library: Path) -> None:
    walk = Walk([str(library)], EXT, [library], max_files=100)
    found = files(walk)
    assert walk.truncated and not walk.stopped
    assert len(found) == 100
    assert walk.counters.files_seen == 100


def test_deadline_truncates(big_flat: Path, library: Path) -> None:
    walk = Walk([str(library)], EXT, [library], deadline=time.monotonic() - 1)
    found = files(walk)
    assert walk.truncated
    assert len(found) < 300


def test_count_images_per_directory_with_shared_budget(library: Path) -> None:
    for i in range(5):
        touch(library / "a" / f"{i}.jpg")
    touch(library / "a" / "notes.txt")
    for i in range(3):
        touch(library / "b" / "deep" / f"{i}.PNG")
    dirs = [str(library / "a"), str(library / "b")]
    counts, truncated = count_images(dirs, EXT, [library], max_files=1000, deadline=far_deadline())
    assert [(c.path, c.image_count, c.truncated) for c in counts] == [(dirs[0], 5, False), (dirs[1], 3, False)]
    assert not truncated
    # Six files seen in "a" use up the budget: "b" gets none and is marked cut short.
    counts, truncated = count_images(dirs, EXT, [library], max_files=6, deadline=far_deadline())
    assert [(c.image_count, c.truncated) for c in counts] == [(5, False), (0, True)]
    assert truncated
    counts, truncated = count_images(dirs, EXT, [library], recursive=False, max_files=1000, deadline=far_deadline())
    assert [c.image_count for c in counts] == [5, 0]


def test_list_subdirectories(library: Path, tmp_path: Path) -> None:
    for name in ("c", "a", "b"):
        (library / name).mkdir()
    touch(library / "file.jpg")
    (library / "inside-link").symlink_to(library / "a")
    (tmp_path / "out").mkdir()
    (library / "outside-link").symlink_to(tmp_path / "out")
    subdirs, more = list_subdirectories(str(library), [library], limit=10)
    assert rel(subdirs, library) == ["a", "b", "c", "inside-link"]
    assert not more
    subdirs, more = list_subdirectories(str(library), [library], limit=2)
    assert rel(subdirs, library) == ["a", "b"]
    assert more


def test_scan_directory(library: Path) -> None:
    touch(library / "direct.jpg")
    touch(library / "direct.txt")
    for i in range(4):
        touch(library / "x" / "y" / f"{i}.jpeg")
    (library / "empty").mkdir()
    result = scan_directory(str(library), EXT, [library], max_files=1000, deadline=far_deadline())
    assert result.path == str(library)
    assert result.direct_image_count == 1
    assert [(os.path.basename(d.path), d.image_count) for d in result.subdirectories] == [("empty", 0), ("x", 4)]
    assert not result.truncated
    cut = scan_directory(str(library), EXT, [library], max_files=1000, deadline=far_deadline(), max_subdirectories=1)
    assert cut.truncated
    assert len(cut.subdirectories) == 1

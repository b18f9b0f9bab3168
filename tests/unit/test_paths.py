"""Library-root containment: every client path is checked here before it touches anything.

A refusal is INVALID_ARGUMENT with a BadRequest field violation naming the request field, and a
path outside the roots gets the same answer whether or not it exists (no probing of the disk).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagetraining.errors import InvalidArgument
from imagetraining.paths import MAX_COMPONENT_BYTES, MAX_PATH_BYTES, check_form, is_within, resolve_directory


def refused(raw: str, roots: list[Path], *, field: str = "root_path", **kw: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        resolve_directory(raw, roots, field, **kw)  # type: ignore[arg-type]
    err = info.value
    assert [v.field for v in err.violations] == [field]
    assert err.message.startswith(f"{field}: ")
    return err


def test_good_path_is_resolved(library: Path) -> None:
    (library / "a" / "b").mkdir(parents=True)
    assert resolve_directory(str(library / "a" / "b"), [library], "root_path") == library / "a" / "b"
    assert resolve_directory(str(library), [library], "root_path") == library
    assert resolve_directory(str(library / "a") + "/", [library], "root_path") == library / "a"
    assert resolve_directory(str(library / "a" / "." / "b"), [library], "root_path") == library / "a" / "b"


def test_symlink_inside_root_resolves_to_its_target(library: Path) -> None:
    (library / "real").mkdir()
    (library / "alias").symlink_to(library / "real")
    assert resolve_directory(str(library / "alias"), [library], "root_path") == library / "real"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("", "required"),
        ("relative/dir", "absolute"),
        ("./dir", "absolute"),
        ("/lib/../etc", "'..'"),
        ("/lib/..", "'..'"),
        ("/lib/a\x00b", "NUL"),
        ("/lib/a\nb", "control character"),
        ("/lib/a\tb", "control character"),
        ("/lib/a\x7fb", "control character"),
        ("/lib/\udcff", "UTF-8"),
    ],
)
def test_malformed_paths(library: Path, raw: str, words: str) -> None:
    err = refused(raw, [library])
    assert words in err.message
    # Form is checked before anything touches the file system.
    with pytest.raises(InvalidArgument):
        check_form(raw, "root_path")


def test_length_limits(library: Path) -> None:
    too_long = "/" + "/".join(["d" * 200] * 21)
    assert len(too_long.encode()) > MAX_PATH_BYTES
    assert f"{MAX_PATH_BYTES} bytes" in refused(too_long, [library]).message
    long_component = str(library / ("x" * (MAX_COMPONENT_BYTES + 1)))
    assert f"{MAX_COMPONENT_BYTES} bytes" in refused(long_component, [library]).message
    # Multi-byte characters count as bytes, not characters.
    assert "bytes" in refused(str(library / ("é" * 128)), [library]).message
    check_form(str(library / ("x" * MAX_COMPONENT_BYTES)), "root_path")


def test_outside_roots_same_answer_whether_or_not_it_exists(library: Path, tmp_path: Path) -> None:
    existing = tmp_path / "elsewhere"
    existing.mkdir()
    a = refused(str(existing), [library])
    b = refused(str(tmp_path / "does-not-exist"), [library])
    c = refused("/etc", [library])
    assert a.message == b.message == c.message
    assert [v.description for v in a.violations] == [v.description for v in b.violations]
    assert "IMAGETRAINING_LIBRARY_ROOTS" in a.message


def test_prefix_of_a_root_is_not_inside_it(library: Path) -> None:
    sibling = library.parent / (library.name + "-other")
    sibling.mkdir()
    refused(str(sibling), [library])
    assert not is_within(str(sibling), [library])
    assert is_within(str(library), [library])
    assert is_within(str(library / "x"), [library])


def test_symlink_escaping_the_root(library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (library / "escape").symlink_to(outside)
    (library / "escape-missing").symlink_to(tmp_path / "missing")
    a = refused(str(library / "escape"), [library])
    b = refused(str(library / "escape-missing"), [library])
    assert a.message == b.message
    assert "outside the configured library roots" in a.message


def test_not_a_directory(library: Path) -> None:
    (library / "file.jpg").write_bytes(b"x")
    assert "not an existing directory" in refused(str(library / "file.jpg"), [library]).message
    assert "not an existing directory" in refused(str(library / "missing"), [library]).message
    assert resolve_directory(str(library / "missing"), [library], "root_path", must_exist=False) == library / "missing"


def test_several_roots(library: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    second.mkdir()
    roots = [library, second.resolve()]
    assert resolve_directory(str(second), roots, "root_path") == second.resolve()
    assert resolve_directory(str(library), roots, "root_path") == library


def test_base_containment(library: Path) -> None:
    base = library / "session-root"
    (base / "child").mkdir(parents=True)
    (library / "sibling").mkdir()
    field = "selections[0].path"
    assert resolve_directory("child", [library], field, base=base) == base / "child"
    assert resolve_directory(str(base / "child"), [library], field, base=base) == base / "child"
    err = refused(str(library / "sibling"), [library], field=field, base=base)
    assert "not under the session's root_path" in err.message
    (base / "up").symlink_to(library / "sibling")
    refused("up", [library], field=field, base=base)
    refused("../sibling", [library], field=field, base=base)
    refused("child/\x00", [library], field=field, base=base)

"""Which files are images: one definition, shared by the control service and the workers."""

from __future__ import annotations

import pytest

from imagetraining.formats import (
    ALLOWED_EXTENSIONS,
    DEFAULT_EXTENSIONS,
    PILLOW_FORMATS,
    describe,
    normalize_extensions,
    suffix_set,
)


def test_defaults_are_allowed_and_every_allowed_has_decoders() -> None:
    assert set(DEFAULT_EXTENSIONS) <= set(ALLOWED_EXTENSIONS)
    assert set(PILLOW_FORMATS) == set(ALLOWED_EXTENSIONS)
    assert all(PILLOW_FORMATS[e] for e in ALLOWED_EXTENSIONS)


def test_normalize_lowercases_strips_dots_and_deduplicates() -> None:
    assert normalize_extensions([".JPG", "jpg", " Png ", "jpeg"]) == ("jpg", "png", "jpeg")


def test_normalize_empty_means_defaults() -> None:
    assert normalize_extensions([]) == DEFAULT_EXTENSIONS


@pytest.mark.parametrize("bad", ["exe", "svg", "", "j pg", "*.jpg"])
def test_normalize_refuses_unknown_extensions_naming_them(bad: str) -> None:
    with pytest.raises(ValueError, match="unsupported extension") as info:
        normalize_extensions(["jpg", bad])
    assert repr(bad) in str(info.value)
    assert "allowed: jpg" in str(info.value)


def test_suffix_set_and_describe() -> None:
    assert suffix_set(["jpg", "png"]) == frozenset({".jpg", ".png"})
    assert describe(["jpg", "png"]) == ".jpg, .png"

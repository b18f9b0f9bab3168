"""Which files are images: one definition shared by the control service and the workers."""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
ALLOWED_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

# Pillow format names the decoder may open for each extension; anything else is refused, so a
# file named .jpg that is really some exotic format never reaches a rarely used decoder.
PILLOW_FORMATS: dict[str, tuple[str, ...]] = {
    "jpg": ("JPEG", "MPO"),
    "jpeg": ("JPEG", "MPO"),
    "png": ("PNG",),
    "webp": ("WEBP",),
    "gif": ("GIF",),
    "bmp": ("BMP",),
    "tif": ("TIFF",),
    "tiff": ("TIFF",),
}


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Lower-case, strip dots, drop duplicates, keep order; empty means the defaults.

    Raises ValueError naming the first extension that is not allowed.
    """
    out: list[str] = []
    for ext in extensions:
        e = ext.strip().lower().lstrip(".")
        if e not in ALLOWED_EXTENSIONS:
            raise ValueError(f"unsupported extension {ext!r}; allowed: {', '.join(ALLOWED_EXTENSIONS)}")
        if e not in out:
            out.append(e)
    return tuple(out) or DEFAULT_EXTENSIONS


def suffix_set(extensions: Iterable[str]) -> frozenset[str]:
    """Dotted, lower-case suffixes for fast matching of `os.path.splitext(name)[1].lower()`."""
    return frozenset("." + e for e in extensions)


def describe(extensions: Iterable[str]) -> str:
    """'.jpg, .jpeg, .png, .webp' for messages people read."""
    return ", ".join("." + e for e in extensions)

"""Decode one image once, hash it, train on it, and classify every way that can fail.

This is the CPU side of the training step and it runs inside the worker's process pool
(`discovery_worker.pool`), never on an event loop. The input is untrusted: any file a user dropped
into a library root. So:

- the file is stat-ed first: not a regular file, empty, or larger than `max_file_bytes` is refused
  before a single byte is decoded (a FIFO would block `open` forever; a 5 GB file would fill memory);
- Pillow only gets the formats allowed for the file's extension (`imagetraining.formats`), so a
  `.jpg` that is really some rarely used format never reaches that format's decoder;
- the decompression-bomb limit is `max_image_pixels`, Pillow's warning is made an error, and the
  declared size is checked before decoding;
- `ImageFile.LOAD_TRUNCATED_IMAGES` stays off (and is switched back off if a trainer turned it on):
  a cut-off file fails as `truncated` instead of producing a half-grey image with a plausible but
  wrong hash.

Speed: JPEG is decoded in draft mode (libjpeg's DCT scaling, 1/2 to 1/8) to at least `DRAFT_SIZE`
pixels per side. On 12 MP photo-like JPEGs that is 3-4x faster than a full decode
(benchmarks/hashing_bench.py) and gives the same 64-bit dHash (tests/unit/test_hashing.py checks
equality on generated photos of several sizes), because dHash only looks at a 9x8 downscale.
Width and height are the original dimensions, recorded before the draft shrinks the image. EXIF
orientation is not applied: the hash and the size are those of the stored pixels.

`process_image` never raises for anything an image can do: every failure is an `ImageResult` with
`ok=False` and an `error_class` the worker stores and counts.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import imagehash
from PIL import Image, ImageFile, UnidentifiedImageError

from imagetraining.formats import ALLOWED_EXTENSIONS, PILLOW_FORMATS

if TYPE_CHECKING:
    from discovery_worker.trainer import Trainer

HASH_ALGORITHM = "dhash-64"
HASH_SIZE = 8  # 8x8 = 64 bits, 16 hex characters
# Smallest side the JPEG draft decode keeps (when the original is larger). dHash needs 9x8; the
# margin gives trainers a usable image and keeps the hash identical to a full decode.
DRAFT_SIZE = 256
# Trainer output larger than this (as JSON) is refused: features are stored in a database row.
MAX_FEATURES_BYTES = 64 * 1024

# Every error_class value, for code that counts or validates them.
ERROR_CLASSES = (
    "corrupt",
    "truncated",
    "unsupported_format",
    "decompression_bomb",
    "too_large",
    "vanished",
    "unreadable",
    "empty",
    "decoder_crash",
    "trainer_error",
    "internal",
)

# Messages of Pillow's ImageFile.load when the data ends early (LOAD_TRUNCATED_IMAGES is off).
_TRUNCATED_MESSAGES = ("image file is truncated", "broken data stream")
# Errors Pillow's decoders and plugin parsers raise on malformed or hostile data.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    struct.error,
    zlib.error,
)


@dataclass(frozen=True, slots=True)
class ImageResult:
    """The outcome of one image: hash, size, format and features, or a classified failure."""

    ok: bool
    perceptual_hash: str | None = None  # hex, 16 chars for 64-bit dhash
    hash_algorithm: str = HASH_ALGORITHM
    width: int = 0
    height: int = 0
    format: str = ""  # Pillow format name: JPEG, PNG, WEBP...
    features: dict[str, Any] | None = None  # what the trainer returned (JSON-serialisable, small)
    error_class: str = ""  # one of ERROR_CLASSES when not ok
    error_message: str = ""


def _fail(
    error_class: str,
    message: str,
    *,
    perceptual_hash: str | None = None,
    width: int = 0,
    height: int = 0,
    format: str = "",
) -> ImageResult:
    return ImageResult(
        ok=False,
        perceptual_hash=perceptual_hash,
        width=width,
        height=height,
        format=format,
        error_class=error_class,
        error_message=message[:500],
    )


_configured_pixels: int | None = None


def configure_pillow(max_image_pixels: int) -> None:
    """Apply the process-wide Pillow policy: bomb limit, bomb warning as error, no truncated images.

    Called by the pool initializer and (cheaply) by every `process_image`, so a direct call in a test
    or benchmark gets the same protection as the pool, and so a trainer module that relaxes Pillow
    at import time (`ImageFile.LOAD_TRUNCATED_IMAGES = True` and `Image.MAX_IMAGE_PIXELS = None` are
    common snippets in ML code) cannot switch the protection off. Process-global on purpose: Pillow's
    limits are module attributes.
    """
    global _configured_pixels
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    if _configured_pixels == max_image_pixels == Image.MAX_IMAGE_PIXELS:
        return
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    Image.init()  # every plugin registered once, so format sniffing and `formats=` see them all
    _configured_pixels = max_image_pixels


def allowed_formats(path: str) -> tuple[str, ...]:
    """Pillow formats that may open `path`, by its extension; an unknown extension gets the union."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    names = PILLOW_FORMATS.get(ext)
    if names is None:
        names = tuple(dict.fromkeys(f for e in ALLOWED_EXTENSIONS for f in PILLOW_FORMATS[e]))
    # Pillow registers some names only as results (MPO opens through the JPEG plugin).
    return tuple(f for f in names if f in Image.OPEN) or names


def _sniff_format(path: str, expected: tuple[str, ...]) -> str | None:
    """Which registered format claims the file's first bytes (magic numbers only, nothing parsed).

    The expected formats are asked first: a file that starts like a JPEG but fails to open is a
    corrupt JPEG, even if some loosely checked format (TGA, say) would also accept those bytes.
    """
    try:
        with open(path, "rb") as f:
            prefix = f.read(16)
    except OSError:
        return None
    for name in (*expected, *(n for n in Image.ID if n not in expected)):
        if name not in Image.OPEN:
            continue
        _factory, accept = Image.OPEN[name]
        try:
            claimed = accept is not None and accept(prefix)
        except Exception:
            continue
        if claimed and not isinstance(claimed, str):  # a str is Pillow's "maybe, with a warning"
            return name
    return None


def _classify_decode_error(exc: BaseException, stage: str) -> ImageResult:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return _fail("decompression_bomb", str(exc))
    text = str(exc)
    if isinstance(exc, ValueError) and "decompressed data too large" in text.lower():
        # Pillow's cap on compressed metadata chunks (PNG text/ICC): a bomb of another kind.
        return _fail("decompression_bomb", text)
    if isinstance(exc, EOFError) or any(m in text for m in _TRUNCATED_MESSAGES):
        return _fail("truncated", f"{stage}: {text or type(exc).__name__}")
    if isinstance(exc, FileNotFoundError):
        return _fail("vanished", f"file disappeared while {stage}")
    if isinstance(exc, PermissionError):
        return _fail("unreadable", f"permission denied while {stage}: {text}")
    return _fail("corrupt", f"{stage}: {type(exc).__name__}: {text}")


def process_image(
    path: str, *, max_file_bytes: int, max_image_pixels: int, trainer: Trainer | None = None
) -> ImageResult:
    """Decode `path` once and return its dHash, original size, format and trainer features.

    Never raises for anything the file can do (only KeyboardInterrupt / SystemExit pass through);
    every failure is `ImageResult(ok=False, error_class=...)`. Meant to run in a pool process.
    """
    try:
        return _process(path, max_file_bytes, max_image_pixels, trainer)
    except Exception as exc:  # last resort: a bug here must fail one image, not the pool
        return _fail("internal", f"{type(exc).__name__}: {exc}")


def _process(path: str, max_file_bytes: int, max_image_pixels: int, trainer: Trainer | None) -> ImageResult:
    configure_pillow(max_image_pixels)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _fail("vanished", "file no longer exists")
    except PermissionError as exc:
        return _fail("unreadable", f"permission denied: {exc.strerror}")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return _fail("unreadable", f"cannot stat: {getattr(exc, 'strerror', None) or exc}")
    if not stat.S_ISREG(st.st_mode):
        return _fail("unreadable", "not a regular file")
    if st.st_size == 0:
        return _fail("empty", "file is empty (0 bytes)")
    if st.st_size > max_file_bytes:
        return _fail("too_large", f"file is {st.st_size} bytes; the limit is {max_file_bytes}")

    formats = allowed_formats(path)
    try:
        image = Image.open(path, formats=formats)
    except FileNotFoundError:
        return _fail("vanished", "file no longer exists")
    except PermissionError as exc:
        return _fail("unreadable", f"permission denied: {exc.strerror}")
    except UnidentifiedImageError:
        found = _sniff_format(path, formats)
        ext = os.path.splitext(path)[1].lower() or "(no extension)"
        if found is not None and found not in formats:
            return _fail(
                "unsupported_format",
                f"file content is {found}, which is not allowed for {ext} files (allowed: {', '.join(formats)})",
            )
        return _fail("corrupt", f"not a valid {'/'.join(formats)} image: the content is not recognisable")
    except _DECODE_ERRORS as exc:
        return _classify_decode_error(exc, "reading the header")

    with image:
        width, height = image.size  # the original size: draft() below shrinks image.size
        fmt = image.format or ""
        if width * height > max_image_pixels:
            return _fail(
                "decompression_bomb",
                f"image declares {width}x{height} = {width * height} pixels; the limit is {max_image_pixels}",
                width=width,
                height=height,
                format=fmt,
            )
        stage = "decoding"
        try:
            if fmt in ("JPEG", "MPO"):
                image.draft("RGB", (DRAFT_SIZE, DRAFT_SIZE))
            image.load()
            stage = "hashing"
            digest = str(imagehash.dhash(image, hash_size=HASH_SIZE))
        except MemoryError:
            return _fail("too_large", f"out of memory while {stage}", width=width, height=height, format=fmt)
        except _DECODE_ERRORS as exc:
            failed = _classify_decode_error(exc, stage)
            return _fail(failed.error_class, failed.error_message, width=width, height=height, format=fmt)
        features = None
        if trainer is not None:
            try:
                features = _train(trainer, image, path)
            except _TrainerError as exc:
                return _fail("trainer_error", str(exc), perceptual_hash=digest, width=width, height=height, format=fmt)
        return ImageResult(ok=True, perceptual_hash=digest, width=width, height=height, format=fmt, features=features)


class _TrainerError(Exception):
    pass


def _train(trainer: Trainer, image: Image.Image, path: str) -> dict[str, Any]:
    """Run the trainer and return its features as they will be stored (a JSON round trip).

    The round trip proves the features are JSON-serialisable (no NaN, no numpy scalars) here, in the
    pool process, where a failure is one image's `trainer_error`, instead of in the database write.
    """
    try:
        features = trainer.train(image, path)
    except Exception as exc:
        raise _TrainerError(f"{getattr(trainer, 'name', type(trainer).__name__)}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(features, dict):
        raise _TrainerError(f"trainer returned {type(features).__name__}, not a dict")
    try:
        encoded = json.dumps(features, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise _TrainerError(f"trainer features are not JSON-serialisable: {exc}") from exc
    if len(encoded) > MAX_FEATURES_BYTES:
        raise _TrainerError(f"trainer features are {len(encoded)} bytes as JSON; the limit is {MAX_FEATURES_BYTES}")
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded

"""Decode one image once, hash it, train on it, and classify every way that can fail.

This is the CPU side of the training step and it runs inside the worker's process pool
(`discovery_worker.pool`), never on an event loop. The input is untrusted: any file a user dropped
into a library root. So:

- the file is opened without following any symlink out of the library roots
  (`imagetraining.paths.open_within`: resolved, checked, then opened component by component with
  O_NOFOLLOW), whatever was swapped on disk since discovery; refused paths fail as `unreadable`
  before anything outside the roots is opened;
- the opened file is fstat-ed: not a regular file, empty, or larger than `max_file_bytes` is
  refused before a single byte is decoded (a 5 GB file would fill memory);
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

import dataclasses
import errno
import hashlib
import io
import json
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import imagehash
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from discovery_worker.trainer import OneImageTrainer, Trained
from imagetraining.formats import ALLOWED_EXTENSIONS, PILLOW_FORMATS
from imagetraining.paths import NotRegularFile, OutsideRoots, PathChanged, open_within

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import BinaryIO

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

# Errors of the storage under a file (a disk, a network share), not of the image in it.
_IO_ERRNOS = frozenset(
    {errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.ENXIO, errno.ENODEV}
)
# Messages of Pillow when the data ends early: ImageFile.load with LOAD_TRUNCATED_IMAGES off, and
# ImageFile._safe_read for a header cut short. ("broken data stream" is not one: it is what a
# scrambled compressed stream gives; a cut one is told apart by `_container_cut_off`.)
_TRUNCATED_MESSAGES = ("image file is truncated", "Truncated File Read")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    embedding: tuple[float, ...] | None = None  # the trainer's vector, L2-normalised
    error_class: str = ""  # one of ERROR_CLASSES when not ok
    error_message: str = ""
    # BLAKE2b-128 of the file's bytes (hex), computed from the bytes the decoder reads: files with
    # equal digests are exact duplicates. Empty when the file could not be read.
    content_digest: str = ""


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


def _sniff_format(fp: BinaryIO, expected: tuple[str, ...]) -> str | None:
    """Which registered format claims the file's first bytes (magic numbers only, nothing parsed).

    The expected formats are asked first: a file that starts like a JPEG but fails to open is a
    corrupt JPEG, even if some loosely checked format (TGA, say) would also accept those bytes.
    """
    try:
        fp.seek(0)
        prefix = fp.read(16)
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


def _container_cut_off(fp: BinaryIO | None) -> bool | None:
    """Does the file's container end before its own structure says it should?

    True: cut off (a PNG whose chunks run past the end of the file or stop before IEND; a WebP whose
    RIFF size is larger than the file; a JPEG whose well-formed header segments run past the end).
    False: the container is whole (every PNG chunk's CRC checks and IEND is there; the RIFF size
    fits) or its structure is garbage, so a decode failure is damaged content, not a short file.
    None: unknown (another format, or a JPEG's scan data, which has no length: Pillow's messages
    decide).
    """
    if fp is None:
        return None
    try:
        fp.seek(0, os.SEEK_END)
        size = fp.tell()
        fp.seek(0)
        head = fp.read(12)
        if head[:8] == _PNG_SIGNATURE:
            pos = 8
            while True:
                fp.seek(pos)
                header = fp.read(8)
                if len(header) < 8:
                    return True  # the file ends before IEND
                length, kind = struct.unpack(">I4s", header)
                if not kind.isalpha() or length > 0x7FFF_FFFF:
                    return False  # not a chunk: garbage, not a short file
                if pos + 12 + length > size:
                    return True
                payload = fp.read(length)
                (crc,) = struct.unpack(">I", fp.read(4))
                if zlib.crc32(kind + payload) != crc:
                    return False  # whole but damaged
                if kind == b"IEND":
                    return False
                pos += 12 + length
        if head[:3] == b"\xff\xd8\xff":
            return _jpeg_headers_cut_off(fp, size)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            (riff_size,) = struct.unpack("<I", head[4:8])
            return bool(riff_size + 8 > size)
    except (OSError, struct.error):
        return None
    return None


# JPEG APPn segments whose payload starts with a known identifier (a prefix of it if the file ends
# first); random bytes after an SOI marker rarely pass, a real header cut short does.
_JPEG_APP_IDS = {0xE0: (b"JFIF\0", b"JFXX\0"), 0xE1: (b"Exif\0", b"http:"), 0xE2: (b"ICC_PROFILE\0", b"MPF\0")}


def _jpeg_headers_cut_off(fp: BinaryIO, size: int) -> bool | None:
    """Walk a JPEG's marker segments up to its scan: True if one runs past the end of the file."""
    pos = 2
    while True:
        fp.seek(pos)
        marker = fp.read(4)
        if len(marker) < 4:
            return True  # the file ends between segments, before any scan
        if marker[0] != 0xFF or not 0xC0 <= marker[1] <= 0xFE:
            return False
        code = marker[1]
        if code == 0xDA:
            return None  # the scan: Pillow's messages decide
        if code == 0xD9:
            return False
        length = (marker[2] << 8) | marker[3]
        if length < 2:
            return False
        ids = _JPEG_APP_IDS.get(code)
        if ids is not None:
            start = fp.read(min(length - 2, 12))
            if not any(ident.startswith(start[: len(ident)]) for ident in ids):
                return False
        if pos + 2 + length > size:
            return True
        pos += 2 + length


def _classify_decode_error(exc: BaseException, stage: str, fp: BinaryIO | None = None) -> ImageResult:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return _fail("decompression_bomb", str(exc))
    text = str(exc)
    if isinstance(exc, ValueError) and "decompressed data too large" in text.lower():
        # Pillow's cap on compressed metadata chunks (PNG text/ICC): a bomb of another kind.
        return _fail("decompression_bomb", text)
    # An OSError with an errno is the storage (below); Pillow's own OSErrors carry none.
    storage = isinstance(exc, OSError) and exc.errno is not None
    cut_off = None if storage else _container_cut_off(fp)
    if cut_off is True:
        return _fail("truncated", f"{stage}: the file ends before its image data does ({text or type(exc).__name__})")
    if cut_off is None and (isinstance(exc, EOFError) or any(m in text for m in _TRUNCATED_MESSAGES)):
        return _fail("truncated", f"{stage}: {text or type(exc).__name__}")
    if isinstance(exc, FileNotFoundError):
        return _fail("vanished", f"file disappeared while {stage}")
    if isinstance(exc, PermissionError):
        return _fail("unreadable", f"permission denied while {stage}: {text}")
    if isinstance(exc, OSError) and exc.errno in _IO_ERRNOS:
        # The storage failed, not the image: the worker's library check decides whether it is offline.
        return _fail("unreadable", f"I/O error while {stage}: {exc.strerror or text}")
    return _fail("corrupt", f"{stage}: {type(exc).__name__}: {text}")


def process_image(
    path: str,
    *,
    max_file_bytes: int,
    max_image_pixels: int,
    trainer: Trainer | None = None,
    roots: Sequence[Path] | None = None,
) -> ImageResult:
    """Decode `path` once and return its dHash, original size, format and trainer output.

    `roots`: the library roots the file must be opened within (the pool always passes them); None
    opens the path as given (direct calls in tests and benchmarks).

    Never raises for anything the file can do (only KeyboardInterrupt / SystemExit pass through);
    every failure is `ImageResult(ok=False, error_class=...)`. Meant to run in a pool process.
    """
    return process_batch(
        [path], max_file_bytes=max_file_bytes, max_image_pixels=max_image_pixels, trainer=trainer, roots=roots
    )[0]


def process_batch(
    paths: Sequence[str],
    *,
    max_file_bytes: int,
    max_image_pixels: int,
    trainer: Trainer | None = None,
    roots: Sequence[Path] | None = None,
) -> list[ImageResult]:
    """`process_image` for several files, with one `train_batch` call for the ones that decoded.

    Every image is decoded and hashed first (its decoded pixels kept until the batch is trained), so
    a file that fails to decode fails alone and the trainer sees only good images.
    """
    prepared: list[ImageResult | tuple[Image.Image, ImageResult]] = []
    try:
        for path in paths:
            try:
                prepared.append(_prepare(path, max_file_bytes, max_image_pixels, roots))
            except Exception as exc:  # last resort: a bug here must fail one image, not the pool
                prepared.append(_fail("internal", f"{type(exc).__name__}: {exc}"))
        decoded = [(i, item) for i, item in enumerate(prepared) if isinstance(item, tuple)]
        results = [item if isinstance(item, ImageResult) else item[1] for item in prepared]
        if trainer is not None and decoded:
            if not callable(getattr(trainer, "train_batch", None)):  # a first-contract trainer, given directly
                trainer = OneImageTrainer(trainer)
            trained = _train_batch(trainer, [item for _i, item in decoded], [paths[i] for i, _item in decoded])
            for (i, _item), result in zip(decoded, trained, strict=True):
                results[i] = result
        return results
    finally:
        for item in prepared:
            if isinstance(item, tuple):
                item[0].close()


def _open(path: str, roots: Sequence[Path] | None) -> int | ImageResult:
    """The opened file's descriptor, or the failure that kept it closed."""
    try:
        if roots is None:
            return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        return open_within(path, roots)
    except FileNotFoundError:
        return _fail("vanished", "file no longer exists")
    except (OutsideRoots, PathChanged, NotRegularFile) as exc:
        return _fail("unreadable", str(exc.strerror))
    except PermissionError as exc:
        return _fail("unreadable", f"permission denied: {exc.strerror}")
    except IsADirectoryError:
        return _fail("unreadable", "not a regular file")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return _fail("unreadable", f"cannot open: {getattr(exc, 'strerror', None) or exc}")


def _prepare(
    path: str, max_file_bytes: int, max_image_pixels: int, roots: Sequence[Path] | None
) -> ImageResult | tuple[Image.Image, ImageResult]:
    """The decoded image and its result so far (hash, size, format, digest), or the failure."""
    configure_pillow(max_image_pixels)
    opened = _open(path, roots)
    if isinstance(opened, ImageResult):
        return opened
    try:
        st = os.fstat(opened)
    except OSError as exc:
        os.close(opened)
        return _fail("unreadable", f"cannot stat: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        os.close(opened)
        return _fail("unreadable", "not a regular file")
    with os.fdopen(opened, "rb") as fp:
        if st.st_size == 0:
            return _fail("empty", "file is empty (0 bytes)")
        if st.st_size > max_file_bytes:
            return _fail("too_large", f"file is {st.st_size} bytes; the limit is {max_file_bytes}")
        # The whole file once: the digest and the decoder read the same bytes (a decode reads them
        # all anyway), so a file that changes meanwhile cannot get one's hash and the other's digest.
        try:
            data = fp.read(max_file_bytes + 1)
        except OSError as exc:
            return _classify_decode_error(exc, "reading the file")
        if len(data) > max_file_bytes:
            return _fail("too_large", f"file grew past the limit of {max_file_bytes} bytes while it was read")
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        decoded = _decode(io.BytesIO(data), path, max_image_pixels)
        if isinstance(decoded, ImageResult):
            return decoded
        image, result = decoded
        return image, dataclasses.replace(result, content_digest=digest)


def _decode(fp: BinaryIO, path: str, max_image_pixels: int) -> ImageResult | tuple[Image.Image, ImageResult]:
    formats = allowed_formats(path)
    try:
        image = Image.open(fp, formats=formats)
    except UnidentifiedImageError:
        if _container_cut_off(fp):
            return _fail("truncated", "reading the header: the file ends before its header does")
        found = _sniff_format(fp, formats)
        ext = os.path.splitext(path)[1].lower() or "(no extension)"
        if found is not None and found not in formats:
            return _fail(
                "unsupported_format",
                f"file content is {found}, which is not allowed for {ext} files (allowed: {', '.join(formats)})",
            )
        return _fail("corrupt", f"not a valid {'/'.join(formats)} image: the content is not recognisable")
    except _DECODE_ERRORS as exc:
        return _classify_decode_error(exc, "reading the header", fp)

    keep = False
    try:
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
            failed = _classify_decode_error(exc, stage, fp)
            return _fail(failed.error_class, failed.error_message, width=width, height=height, format=fmt)
        keep = True
        return image, ImageResult(ok=True, perceptual_hash=digest, width=width, height=height, format=fmt)
    finally:
        if not keep:
            image.close()


class _TrainerError(Exception):
    pass


def _train_batch(trainer: Trainer, items: list[tuple[Image.Image, ImageResult]], paths: list[str]) -> list[ImageResult]:
    """Run the trainer on decoded images; each image's result, a failure only for its own image.

    If the batch call itself raises (a trainer that does not isolate its images), every image is
    tried again alone, so the one bad image fails and the others get their output.
    """
    images = [image for image, _result in items]
    try:
        outputs = list(trainer.train_batch(images, paths))
        if len(outputs) != len(images):
            raise _TrainerError(f"train_batch returned {len(outputs)} results for {len(images)} images")
    except Exception as exc:
        if len(images) == 1:
            outputs = [exc]
        else:
            return [_train_batch(trainer, [item], [path])[0] for item, path in zip(items, paths, strict=True)]
    return [_trained(trainer, result, output) for (_image, result), output in zip(items, outputs, strict=True)]


def _trained(trainer: Trainer, result: ImageResult, output: object) -> ImageResult:
    def failed(message: str) -> ImageResult:
        return _fail(
            "trainer_error",
            f"{trainer.name}: {message}",
            perceptual_hash=result.perceptual_hash,
            width=result.width,
            height=result.height,
            format=result.format,
        )

    if isinstance(output, BaseException):
        return failed(f"{type(output).__name__}: {output}")
    if not isinstance(output, Trained):
        return failed(f"train_batch returned {type(output).__name__}, not Trained")
    try:
        features = _checked_features(output.features)
        embedding = _checked_embedding(output.embedding, trainer.dimension)
    except _TrainerError as exc:
        return failed(str(exc))
    return dataclasses.replace(result, features=features, embedding=embedding)


def _checked_features(features: object) -> dict[str, Any] | None:
    """The features as they will be stored (a JSON round trip).

    The round trip proves the features are JSON-serialisable (no NaN, no numpy scalars) here, in the
    pool process, where a failure is one image's `trainer_error`, instead of in the database write.
    """
    if features is None:
        return None
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


def _checked_embedding(embedding: object, dimension: int) -> tuple[float, ...] | None:
    """The embedding as float32 values, L2-normalised; its length must be the trainer's `dimension`."""
    if embedding is None:
        return None
    if dimension == 0:
        raise _TrainerError("the trainer declares dimension 0 but returned an embedding")
    try:
        vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise _TrainerError(f"the embedding is not a vector of numbers: {exc}") from exc
    if vector.shape[0] != dimension:
        raise _TrainerError(f"the embedding has {vector.shape[0]} values; the trainer declares {dimension}")
    if not np.all(np.isfinite(vector)):
        raise _TrainerError("the embedding has a NaN or infinite value")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise _TrainerError("the embedding is all zeros (it has no direction to compare)")
    return tuple(float(x) for x in (vector / norm).astype(np.float32))

"""Test images written on demand: photo-like pictures and every kind of bad input the worker must survive.

Why generate instead of committing fixtures: sizes matter (a 12 MP JPEG exercises draft decoding, a
decompression bomb must declare huge dimensions while staying tiny on disk) and each test wants its
own files in its own temporary directory. Everything here uses only Pillow and numpy and is fast:
a 640x480 JPEG takes a few milliseconds, a 12 MP one well under a second.

"Photo-like" matters for two reasons: JPEG sizes and decode times are realistic (flat synthetic
colours compress to nothing and decode unrealistically fast), and the dHash of a smooth random
scene is stable under draft (DCT-scaled) decoding the way real photographs are, while adjacent
pixels still differ enough that distinct seeds give distinct hashes.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

# Formats Pillow can write that are not allowed for a .jpg file (see imagetraining.formats).
MISLABELED_FORMATS = ("GIF", "BMP", "TIFF")


def photo_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 array (height, width, 3) that looks like a photograph to a codec."""
    return np.asarray(photo_image(width, height, seed))


def photo_image(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """An RGB image that looks like a photograph to a codec.

    Three scales of structure: a smooth colour field (sky, walls), mid-size blobs (objects) and
    fine grain (texture, sensor noise). Everything is generated small and combined by Pillow's C
    code, so a 12 MP frame costs about half a second instead of seconds of per-pixel numpy work.
    """
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    base = base.resize((width, height), Image.Resampling.BICUBIC)
    bw, bh = max(2, width // 48), max(2, height // 48)
    blobs = Image.fromarray(rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8), "RGB")
    blobs = blobs.resize((width, height), Image.Resampling.BILINEAR)
    picture = Image.blend(base, blobs, 0.25)
    # Grain: one small noise tile repeated; cheap, and still costly to entropy-code, like real texture.
    tile = rng.integers(0, 21, (64, 64, 1), dtype=np.uint8)
    grain = np.tile(tile, (-(-height // 64), -(-width // 64), 3))[:height, :width]
    return ImageChops.add(picture, Image.fromarray(np.ascontiguousarray(grain), "RGB"), offset=-10)


def _prepare(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def write_jpeg(path: str | Path, width: int = 640, height: int = 480, seed: int = 0, quality: int = 90) -> Path:
    """A baseline JPEG like a camera writes (4:2:0 chroma subsampling)."""
    p = _prepare(path)
    photo_image(width, height, seed).save(p, format="JPEG", quality=quality)
    return p


def write_png(path: str | Path, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    p = _prepare(path)
    photo_image(width, height, seed).save(p, format="PNG", compress_level=1)
    return p


def write_webp(path: str | Path, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    p = _prepare(path)
    photo_image(width, height, seed).save(p, format="WEBP", quality=80, method=0)
    return p


def write_corrupt_jpeg(path: str | Path, seed: int = 0) -> Path:
    """Starts like a JPEG (SOI marker) but the headers are garbage: Pillow cannot identify it."""
    p = _prepare(path)
    rng = np.random.default_rng(seed)
    p.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def write_truncated_jpeg(path: str | Path, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """A valid JPEG cut in the middle of its scan data (an interrupted copy or download)."""
    p = _prepare(path)
    write_jpeg(p, width, height, seed)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def write_truncated_png(path: str | Path, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """A valid PNG cut in the middle of its pixel data: the header still opens, decoding fails."""
    p = _prepare(path)
    write_png(p, width, height, seed)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def write_scrambled_png(path: str | Path, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """A PNG of full length whose pixel data is random bytes (CRCs made valid): damaged, not short."""
    p = _prepare(path)
    write_png(p, width, height, seed)
    data = bytearray(p.read_bytes())
    at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    noise = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    data[at + 4 : at + 4 + length] = noise
    data[at + 4 + length : at + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + noise))
    p.write_bytes(bytes(data))
    return p


def write_jpeg_head(path: str | Path, keep: int = 600, seed: int = 0) -> Path:
    """The first `keep` bytes of a real JPEG: its headers begin, the file ends (an aborted copy)."""
    p = _prepare(path)
    write_jpeg(p, 640, 480, seed)
    p.write_bytes(p.read_bytes()[:keep])
    return p


def write_truncated_webp(path: str | Path, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """A WebP cut in half: its RIFF header promises more bytes than the file has."""
    p = _prepare(path)
    write_webp(p, width, height, seed)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def write_empty(path: str | Path) -> Path:
    p = _prepare(path)
    p.write_bytes(b"")
    return p


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_decompression_bomb(path: str | Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG whose header declares width x height pixels (10 gigapixels by default) in ~100 bytes.

    Decoding it would allocate tens of gigabytes; a safe decoder refuses it after reading the header.
    The pixel data is a few zero rows: nothing past the header may ever be read.
    """
    p = _prepare(path)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    idat = zlib.compress(b"\x00" * (1 + min(width, 1024)) * 4)
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    return p


def write_mislabeled(
    path: str | Path, real_format: str = "GIF", width: int = 64, height: int = 48, seed: int = 0
) -> Path:
    """A valid GIF/BMP/TIFF saved under the given name (e.g. photo.jpg): not allowed for that extension."""
    if real_format not in MISLABELED_FORMATS:
        raise ValueError(f"real_format must be one of {MISLABELED_FORMATS}")
    p = _prepare(path)
    photo_image(width, height, seed).save(p, format=real_format)
    return p


def write_text(path: str | Path, text: str = "not an image\n") -> Path:
    p = _prepare(path)
    p.write_text(text)
    return p


def write_duplicate(source: str | Path, path: str | Path) -> Path:
    """A byte-for-byte copy: same content, different path (the duplicate detector's input)."""
    p = _prepare(path)
    shutil.copyfile(source, p)
    return p


@dataclass
class Library:
    """What `build_library` wrote and what the worker should make of it.

    `good` are decodable images with distinct content; `duplicates` maps each copy to its original
    (the worker skips the later one); `failures` maps a path to the expected error class;
    `non_images` are files discovery must ignore (extension not selected).
    """

    root: Path
    good: list[Path] = field(default_factory=list)
    duplicates: dict[Path, Path] = field(default_factory=dict)
    failures: dict[Path, str] = field(default_factory=dict)
    non_images: list[Path] = field(default_factory=list)

    @property
    def image_files(self) -> list[Path]:
        """Every file with an image extension: what discovery should count."""
        return sorted([*self.good, *self.duplicates, *self.failures])


def build_library(root: str | Path, *, good: int = 6, seed: int = 0) -> Library:
    """A small mixed library: nested folders, mixed-case extensions, duplicates and each kind of bad file.

    Default extensions only (jpg, jpeg, png, webp); every failure is one whose class is certain.
    Generation takes well under a second.
    """
    r = Path(root)
    lib = Library(root=r)
    writers = (
        lambda p, s: write_jpeg(p.with_suffix(".jpg"), 160, 120, s),
        lambda p, s: write_jpeg(p.with_suffix(".JPG"), 120, 160, s),
        lambda p, s: write_png(p.with_suffix(".png"), 96, 64, s),
        lambda p, s: write_webp(p.with_suffix(".WebP"), 64, 96, s),
        lambda p, s: write_jpeg(p.with_suffix(".jpeg"), 100, 100, s),
    )
    for i in range(good):
        folder = r / f"album{i % 3}" / (f"sub{i % 2}" if i % 2 else "")
        lib.good.append(writers[i % len(writers)](folder / f"img{i:03d}", seed + 1000 + i))
    if lib.good:
        lib.duplicates[write_duplicate(lib.good[0], r / "copies" / ("copy_of_" + lib.good[0].name))] = lib.good[0]
    lib.failures[write_corrupt_jpeg(r / "bad" / "corrupt.jpg", seed)] = "corrupt"
    lib.failures[write_truncated_png(r / "bad" / "truncated.png", 96, 64, seed)] = "truncated"
    lib.failures[write_empty(r / "bad" / "empty.jpeg")] = "empty"
    lib.failures[write_decompression_bomb(r / "bad" / "bomb.png")] = "decompression_bomb"
    lib.failures[write_mislabeled(r / "bad" / "really_a_gif.jpg", "GIF", seed=seed)] = "unsupported_format"
    lib.non_images.append(write_text(r / "album0" / "notes.txt"))
    lib.non_images.append(write_text(r / "album1" / "thumbs.db", "x"))
    return lib


def photo_folders(root: str | Path, folders: int, per_folder: int, *, size: tuple[int, int] = (24, 24)) -> list[Path]:
    """`folders` folders of `per_folder` small distinct JPEGs under root (album00/img0000.jpg...); the folders."""
    r = Path(root)
    for f in range(folders):
        for i in range(per_folder):
            write_jpeg(r / f"album{f:02d}" / f"img{i:04d}.jpg", size[0], size[1], seed=f * 10_000 + i, quality=70)
    return [r / f"album{f:02d}" for f in range(folders)]

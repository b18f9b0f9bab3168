"""process_image on real generated files: every error class, hashes, sizes and the draft-decode shortcut."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import imagehash
import pytest
from PIL import Image

from discovery_worker import hashing
from discovery_worker.hashing import HASH_ALGORITHM, ImageResult, allowed_formats, process_image
from discovery_worker.trainer import DefaultTrainer
from imagetraining.formats import PILLOW_FORMATS
from tests import images

LIMITS: dict[str, int] = {"max_file_bytes": 50 * 1024 * 1024, "max_image_pixels": 100_000_000}


def run(path: Path | str, **kwargs: Any) -> ImageResult:
    return process_image(str(path), **{**LIMITS, **kwargs})


def full_decode_dhash(path: Path) -> str:
    """The seed's way: let imagehash decode the whole image."""
    with Image.open(path) as img:
        return str(imagehash.dhash(img, hash_size=8))


class RecordingTrainer:
    name = "recording"

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, int], str]] = []

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        self.seen.append((image.size, image.mode))
        return {"size": list(image.size)}


@pytest.mark.parametrize(
    ("name", "writer", "fmt", "size"),
    [
        ("a.jpg", images.write_jpeg, "JPEG", (640, 480)),
        ("b.JPEG", images.write_jpeg, "JPEG", (300, 500)),
        ("c.png", images.write_png, "PNG", (320, 240)),
        ("d.webp", images.write_webp, "WEBP", (200, 150)),
    ],
)
def test_good_images(tmp_path: Path, name: str, writer: Any, fmt: str, size: tuple[int, int]) -> None:
    path = writer(tmp_path / name, *size)
    result = run(path, trainer=DefaultTrainer())
    assert result.ok, result
    assert (result.width, result.height) == size
    assert result.format == fmt
    assert result.hash_algorithm == HASH_ALGORITHM == "dhash-64"
    assert result.perceptual_hash is not None and len(result.perceptual_hash) == 16
    int(result.perceptual_hash, 16)
    assert result.features is not None and "mean_rgb" in result.features
    assert result.error_class == "" and result.error_message == ""


def test_without_trainer_features_are_none(tmp_path: Path) -> None:
    result = run(images.write_jpeg(tmp_path / "a.jpg", 64, 48))
    assert result.ok and result.features is None


def test_duplicates_hash_equal_and_distinct_images_differ(tmp_path: Path) -> None:
    original = images.write_jpeg(tmp_path / "a.jpg", seed=1)
    copy = images.write_duplicate(original, tmp_path / "sub" / "copy.jpg")
    other = images.write_jpeg(tmp_path / "b.jpg", seed=2)
    png = images.write_png(tmp_path / "c.png", seed=3)
    png_copy = images.write_duplicate(png, tmp_path / "c_copy.PNG")
    a, b, c, d, e = (run(p) for p in (original, copy, other, png, png_copy))
    assert a.perceptual_hash == b.perceptual_hash
    assert d.perceptual_hash == e.perceptual_hash
    assert len({a.perceptual_hash, c.perceptual_hash, d.perceptual_hash}) == 3


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1600, 1200), (1024, 768), (1200, 1600), (2048, 1536)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draft_decode_gives_the_full_decode_dhash(tmp_path: Path, width: int, height: int, seed: int) -> None:
    path = images.write_jpeg(tmp_path / "p.jpg", width, height, seed)
    result = run(path)
    assert result.perceptual_hash == full_decode_dhash(path)
    assert (result.width, result.height) == (width, height)


def test_12mp_jpeg_draft_hash_and_original_size(tmp_path: Path) -> None:
    path = images.write_jpeg(tmp_path / "big.jpg", 4000, 3000, seed=7)
    trainer = RecordingTrainer()
    result = run(path, trainer=trainer)
    assert result.ok
    assert (result.width, result.height) == (4000, 3000)  # the original, not the draft size
    assert result.perceptual_hash == full_decode_dhash(path)
    # The trainer got the DCT-scaled draft (1/8 here), in colour.
    assert trainer.seen == [((500, 375), "RGB")]


def test_trainer_gets_at_least_draft_size(tmp_path: Path) -> None:
    trainer = RecordingTrainer()
    run(images.write_jpeg(tmp_path / "a.jpg", 2048, 1536), trainer=trainer)
    run(images.write_jpeg(tmp_path / "b.jpg", 200, 100), trainer=trainer)
    (big, _), (small, _) = trainer.seen
    assert big == (512, 384) and min(big) >= hashing.DRAFT_SIZE
    assert small == (200, 100)  # smaller than the draft size: decoded as is


# ---- every error class from a real file ----


def test_corrupt_jpeg(tmp_path: Path) -> None:
    result = run(images.write_corrupt_jpeg(tmp_path / "bad.jpg"))
    assert (result.ok, result.error_class) == (False, "corrupt")
    assert result.error_message
    assert result.perceptual_hash is None


def test_text_named_jpg_is_corrupt(tmp_path: Path) -> None:
    result = run(images.write_text(tmp_path / "notes.jpg", "hello\n" * 10))
    assert result.error_class == "corrupt"


@pytest.mark.parametrize("writer", [images.write_truncated_png, images.write_truncated_jpeg])
def test_truncated(tmp_path: Path, writer: Any) -> None:
    suffix = ".png" if writer is images.write_truncated_png else ".jpg"
    result = run(writer(tmp_path / f"cut{suffix}", 320, 240))
    assert (result.ok, result.error_class) == (False, "truncated"), result
    assert "truncated" in result.error_message
    # The header was readable, so the size and format are known even though decoding failed.
    assert (result.width, result.height) == (320, 240)


@pytest.mark.parametrize(
    ("name", "writer", "expected"),
    [
        # Full length, random pixel data: damaged content, not a short file (was `truncated`).
        ("scrambled.png", lambda p: images.write_scrambled_png(p, 96, 64, seed=3), "corrupt"),
        # A real JPEG's first 600 or 200 bytes: an aborted copy (600 bytes was `corrupt`).
        ("head600.jpg", lambda p: images.write_jpeg_head(p, 600), "truncated"),
        ("head200.jpg", lambda p: images.write_jpeg_head(p, 200), "truncated"),
        # A PNG cut inside its first chunks, and a WebP cut in half (was `corrupt`).
        ("head40.png", lambda p: p.write_bytes(images.write_png(p, 96, 64).read_bytes()[:40]) and p, "truncated"),
        ("cut.webp", lambda p: images.write_truncated_webp(p, 96, 64), "truncated"),
        # Random bytes after a JPEG marker, and a PNG whose pixel chunk fails its CRC: corrupt.
        ("garbage.jpg", images.write_corrupt_jpeg, "corrupt"),
    ],
)
def test_each_failure_class_matches_its_cause(tmp_path: Path, name: str, writer: Any, expected: str) -> None:
    path = tmp_path / name
    writer(path)
    result = run(path)
    assert (result.ok, result.error_class) == (False, expected), result.error_message


def test_a_png_whose_chunk_fails_its_crc_is_corrupt(tmp_path: Path) -> None:
    path = images.write_png(tmp_path / "crc.png", 96, 64)
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 4
    data[at + 10] ^= 0xFF  # one flipped byte inside the pixel data, CRC left as it was
    path.write_bytes(bytes(data))
    result = run(path)
    assert (result.ok, result.error_class) == (False, "corrupt"), result.error_message


def test_empty(tmp_path: Path) -> None:
    result = run(images.write_empty(tmp_path / "zero.jpeg"))
    assert result.error_class == "empty"


def test_decompression_bomb_over_twice_the_limit(tmp_path: Path) -> None:
    path = images.write_decompression_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 1000
    result = run(path)
    assert result.error_class == "decompression_bomb"


def test_decompression_bomb_warning_is_an_error(tmp_path: Path) -> None:
    # 2000x1000 = 2 M pixels: above a 1.5 M limit but below twice it, where Pillow only warns.
    path = images.write_decompression_bomb(tmp_path / "bomb.png", 2000, 1000)
    result = run(path, max_image_pixels=1_500_000)
    assert result.error_class == "decompression_bomb"
    assert "pixels" in result.error_message


def test_a_trainer_cannot_relax_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Common snippets in ML code; a trainer module imported into the pool process may run them.
    from PIL import ImageFile

    truncated = images.write_truncated_png(tmp_path / "cut.png")
    bomb = images.write_decompression_bomb(tmp_path / "bomb.png", 2000, 1000)
    run(truncated)  # configure once
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert run(truncated).error_class == "truncated"
    assert run(bomb, max_image_pixels=1_500_000).error_class == "decompression_bomb"


def test_too_large(tmp_path: Path) -> None:
    path = images.write_jpeg(tmp_path / "a.jpg")
    result = run(path, max_file_bytes=path.stat().st_size - 1)
    assert result.error_class == "too_large"
    assert str(path.stat().st_size) in result.error_message
    assert run(path, max_file_bytes=path.stat().st_size).ok


def test_vanished(tmp_path: Path) -> None:
    result = run(tmp_path / "gone.jpg")
    assert result.error_class == "vanished"


def test_unreadable_directory_and_fifo(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    assert run(tmp_path / "dir.jpg").error_class == "unreadable"
    os.mkfifo(tmp_path / "pipe.jpg")
    assert run(tmp_path / "pipe.jpg").error_class == "unreadable"  # and does not block on open
    assert run("bad\0path.jpg").error_class == "unreadable"


def test_unreadable_permission(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    path = images.write_jpeg(tmp_path / "a.jpg")
    path.chmod(0)
    assert run(path).error_class == "unreadable"


@pytest.mark.parametrize("real_format", images.MISLABELED_FORMATS)
def test_unsupported_format_for_extension(tmp_path: Path, real_format: str) -> None:
    path = images.write_mislabeled(tmp_path / "photo.jpg", real_format)
    result = run(path)
    assert result.error_class == "unsupported_format"
    assert real_format in result.error_message and ".jpg" in result.error_message
    # The same bytes under their own extension are fine: the restriction is per extension.
    own = {"GIF": "gif", "BMP": "bmp", "TIFF": "tif"}[real_format]
    renamed = path.rename(tmp_path / f"photo.{own}")
    assert run(renamed).ok


def test_jpeg_named_png_is_unsupported(tmp_path: Path) -> None:
    path = images.write_jpeg(tmp_path / "a.png", 64, 48)
    assert run(path).error_class == "unsupported_format"


def test_unknown_extension_gets_every_allowed_format(tmp_path: Path) -> None:
    everything = {f for names in PILLOW_FORMATS.values() for f in names if f in Image.OPEN}
    assert set(allowed_formats("x.unknown")) == everything
    assert set(allowed_formats("X.JPG")) <= set(PILLOW_FORMATS["jpg"])
    assert run(images.write_png(tmp_path / "a.img", 32, 32)).format == "PNG"


class FailingTrainer:
    name = "failing"

    def __init__(self, features: Any = None, error: Exception | None = None) -> None:
        self.features, self.error = features, error

    def train(self, image: Image.Image, path: str) -> Any:
        if self.error is not None:
            raise self.error
        return self.features


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        (FailingTrainer(error=RuntimeError("model exploded")), "model exploded"),
        (FailingTrainer(features=[1, 2]), "not a dict"),
        (FailingTrainer(features={"x": float("nan")}), "JSON"),
        (FailingTrainer(features={"x": object()}), "JSON"),
        (FailingTrainer(features={"x": "y" * 70_000}), "limit"),
    ],
)
def test_trainer_error(tmp_path: Path, trainer: FailingTrainer, message: str) -> None:
    result = run(images.write_jpeg(tmp_path / "a.jpg", 64, 48), trainer=trainer)
    assert result.error_class == "trainer_error"
    assert message in result.error_message
    # The decode succeeded: the hash and size are still reported.
    assert result.perceptual_hash is not None and result.width == 64


def test_features_are_stored_as_json(tmp_path: Path) -> None:
    result = run(images.write_jpeg(tmp_path / "a.jpg", 64, 48), trainer=FailingTrainer(features={"t": (1, 2)}))
    assert result.ok and result.features == {"t": [1, 2]}


def test_internal_errors_are_classified_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("bug")

    monkeypatch.setattr(hashing, "allowed_formats", boom)
    result = run(images.write_jpeg(tmp_path / "a.jpg", 64, 48))
    assert result.error_class == "internal" and "bug" in result.error_message


def test_every_failure_uses_a_known_error_class(tmp_path: Path) -> None:
    lib = images.build_library(tmp_path / "lib", good=5)
    for path, expected in lib.failures.items():
        result = run(path)
        assert result.error_class == expected, (path, result)
        assert result.error_class in hashing.ERROR_CLASSES
    for path in lib.good:
        assert run(path).ok, path
    for copy, original in lib.duplicates.items():
        assert run(copy).perceptual_hash == run(original).perceptual_hash


def test_result_pickles(tmp_path: Path) -> None:
    result = run(images.write_jpeg(tmp_path / "a.jpg", 64, 48), trainer=DefaultTrainer())
    assert pickle.loads(pickle.dumps(result)) == result

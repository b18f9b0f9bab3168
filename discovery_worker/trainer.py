"""The pluggable training step: a trainer turns a batch of decoded images into features and vectors.

Which trainer runs is a setting (`IMAGETRAINING_TRAINER`, "module.path:ClassName"), loaded once per
pool process by `load_trainer`, so a real model can be plugged in without touching the worker. The
contract (`Trainer`):

- `name` and `version` (and `model_digest`, the SHA-256 of the model file, where there is one) say
  which trainer produced an asset's features: every asset records them (its provenance), a changed
  trainer retrains exactly the assets whose provenance differs, and search never mixes two models'
  vectors;
- `setup()` runs once per pool process, after the process started and before the first batch: load
  the model and set thread counts there, not in `__init__` (which also runs in the worker's main
  process, to check the setting at start);
- `train_batch(images, paths)` gets up to `batch_size` decoded images (the worker forms the batches,
  `IMAGETRAINING_TRAIN_BATCH_SIZE` overrides the size) and returns one `Trained` per image, or the
  exception that image raised: a bad image fails its own job only;
- `Trained` holds small JSON features and/or an embedding of exactly `dimension` floats (0: the
  trainer makes none), stored L2-normalised.

A trainer of the first contract (`name` and `train(image, path) -> dict`) still works: `load_trainer`
wraps it in `OneImageTrainer` (version "1", no embedding, batches of one).

The default is deliberately cheap and offline: it needs no download, no GPU and no extra package, so
a fresh checkout trains a folder end to end, and its 24-bin colour histogram is an embedding, so
similarity search works on the demo library. `discovery_worker.onnx_trainer` runs a real image
encoder (an optional extra).

Trainers run inside the worker's process pool on untrusted images. They receive the image already
decoded once by `discovery_worker.hashing` (for JPEG a DCT-scaled draft, at least
`DRAFT_SIZE` pixels on each side when the original is that large), never a path to open again.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageStat

# The largest embedding stored (floats); CLIP ViT-L/14 is 768, most image encoders are below.
MAX_DIMENSION = 4096
# The largest batch a trainer may ask for.
MAX_BATCH_SIZE = 256


@dataclass(frozen=True, slots=True)
class Trained:
    """One image's output: small JSON features and/or an embedding of the trainer's `dimension`."""

    features: dict[str, Any] | None = None
    embedding: Sequence[float] | np.ndarray[Any, Any] | None = None


@runtime_checkable
class Trainer(Protocol):
    """What the worker needs from a trainer (see the module doc)."""

    name: str
    version: str
    model_digest: str
    dimension: int
    batch_size: int

    def setup(self) -> None:
        """Once per pool process, before the first batch: load the model, set thread counts."""
        ...

    def train_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> Sequence[Trained | BaseException]:
        """One `Trained` (or the exception of that image) per image, in order."""
        ...


class OneImageTrainer:
    """A trainer of the first contract (`name`, `train(image, path) -> dict`) as a `Trainer`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.version: str = str(getattr(inner, "version", "1"))
        self.model_digest = ""
        self.dimension = 0
        self.batch_size = 1

    def setup(self) -> None:
        setup = getattr(self.inner, "setup", None)
        if callable(setup):
            setup()

    def train_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> list[Trained | BaseException]:
        out: list[Trained | BaseException] = []
        for image, path in zip(images, paths, strict=True):
            try:
                out.append(Trained(features=self.inner.train(image, path)))
            except Exception as exc:
                out.append(exc)
        return out


class DefaultTrainer:
    """Colour and shape statistics of a 64x64 thumbnail: fast (well under 1 ms), offline, deterministic.

    The features are what a library browser or a later model can use without decoding the image
    again: mean colour, brightness and contrast, a colourfulness score, an 8-bin histogram per channel
    and the aspect ratio.
    """

    name: str = "default-colour-stats"
    version: str = "2"  # 1 had no embedding
    model_digest = ""
    dimension = 24  # the 3 x 8-bin colour histogram, L2-normalised
    batch_size = 1  # nothing to gain from batches: no model, one image at a time
    THUMBNAIL = (64, 64)
    BINS = 8

    def setup(self) -> None:
        pass

    def train_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> list[Trained | BaseException]:
        out: list[Trained | BaseException] = []
        for image, path in zip(images, paths, strict=True):
            try:
                features = self.train(image, path)
                histogram = np.asarray(features["histogram_rgb"], dtype=np.float64).reshape(-1)
                norm = float(np.linalg.norm(histogram))
                out.append(Trained(features=features, embedding=histogram / norm if norm else histogram))
            except Exception as exc:
                out.append(exc)
        return out

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        width, height = image.size
        thumb = image.convert("RGB") if image.mode != "RGB" else image
        # reducing_gap makes large (non-JPEG) inputs cheap: an integer box reduction first, then a resample.
        thumb = thumb.resize(self.THUMBNAIL, Image.Resampling.BILINEAR, reducing_gap=2.0)
        stat = ImageStat.Stat(thumb)
        luma = ImageStat.Stat(thumb.convert("L"))
        # Hasler & Suesstrunk colourfulness: spread and mean of the opponent channels rg and yb.
        rgb = np.asarray(thumb, dtype=np.float32)
        rg = rgb[..., 0] - rgb[..., 1]
        yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
        colourfulness = math.hypot(float(rg.std()), float(yb.std())) + 0.3 * math.hypot(
            float(rg.mean()), float(yb.mean())
        )
        counts = thumb.histogram()  # 3 x 256 counts
        per_bin = 256 // self.BINS
        pixels = self.THUMBNAIL[0] * self.THUMBNAIL[1]
        histogram = [
            [
                round(sum(counts[c * 256 + i * per_bin : c * 256 + (i + 1) * per_bin]) / pixels, 4)
                for i in range(self.BINS)
            ]
            for c in range(3)
        ]
        return {
            "mean_rgb": [round(v, 2) for v in stat.mean],
            "brightness": round(luma.mean[0], 2),
            "contrast": round(luma.stddev[0], 2),
            "colourfulness": round(colourfulness, 2),
            "histogram_rgb": histogram,
            "aspect_ratio": round(width / height, 4) if height else 0.0,
        }


class DemoTrainer(DefaultTrainer):
    """The default features at a walking pace (0.2 s per image), for `make run`'s demo library only.

    The demo's 30 images would otherwise train in about 0.15 s: over before a WatchSession started
    by hand shows anything. At this pace the README's walkthrough shows the live stream on the demo
    (imagetraining/devrun/app.py picks it only when it generates the demo and IMAGETRAINING_TRAINER is
    unset).
    """

    name = "demo-paced"
    SECONDS_PER_IMAGE = 0.2

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        time.sleep(self.SECONDS_PER_IMAGE)  # the demo's pace, nothing waits on it
        return super().train(image, path)


def load_trainer(spec: str) -> Trainer:
    """Import and instantiate "module.path:ClassName" (any zero-argument callable returning a trainer).

    Raises ValueError with a message naming the spec and what is wrong, so a bad setting stops the
    worker at start with one readable line instead of failing every image later.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"trainer {spec!r} is not of the form 'module.path:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"trainer {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"trainer {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"trainer {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"trainer {spec!r}: {attr!r} is not a class or factory")
    try:
        trainer = obj()
    except Exception as exc:
        raise ValueError(f"trainer {spec!r}: creating it failed: {type(exc).__name__}: {exc}") from exc
    return checked(spec, trainer)


def checked(spec: str, trainer: Any) -> Trainer:
    """`trainer` as a `Trainer` (a first-contract one wrapped), its attributes checked."""
    if not callable(getattr(trainer, "train_batch", None)):
        if not callable(getattr(trainer, "train", None)):
            raise ValueError(
                f"trainer {spec!r}: the object has neither train_batch(images, paths) nor train(image, path)"
            )
        name = getattr(trainer, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"trainer {spec!r}: the object has no non-empty string attribute 'name'")
        return OneImageTrainer(trainer)
    for attr in ("name", "version"):
        value = getattr(trainer, attr, None)
        if not isinstance(value, str) or not value or len(value) > 100:
            raise ValueError(f"trainer {spec!r}: {attr!r} must be a non-empty string of at most 100 characters")
    if not isinstance(getattr(trainer, "model_digest", None), str):
        raise ValueError(f"trainer {spec!r}: 'model_digest' must be a string ('' when there is no model file)")
    dimension = getattr(trainer, "dimension", None)
    if not isinstance(dimension, int) or not 0 <= dimension <= MAX_DIMENSION:
        raise ValueError(
            f"trainer {spec!r}: 'dimension' must be an integer from 0 to {MAX_DIMENSION}, not {dimension!r}"
        )
    batch = getattr(trainer, "batch_size", None)
    if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH_SIZE:
        raise ValueError(f"trainer {spec!r}: 'batch_size' must be an integer from 1 to {MAX_BATCH_SIZE}, not {batch!r}")
    if not callable(getattr(trainer, "setup", None)):
        raise ValueError(f"trainer {spec!r}: the object has no setup() method")
    return trainer  # type: ignore[no-any-return]

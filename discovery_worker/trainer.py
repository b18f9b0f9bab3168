"""The pluggable per-image training step.

A trainer turns one decoded image into a small JSON-serialisable dict of features that the worker
stores with the asset. Which trainer runs is a setting (`IMAGETRAINING_TRAINER`,
"module.path:ClassName"), loaded once per pool process by `load_trainer`, so a real model can be
plugged in without touching the worker. The default is deliberately cheap and offline: it needs no
download, no GPU and no extra package, so a fresh checkout trains a folder end to end.

Trainers run inside the worker's process pool on untrusted images. They receive the image already
decoded once by `discovery_worker.hashing` (for JPEG a DCT-scaled draft, at least
`DRAFT_SIZE` pixels on each side when the original is that large), never a path to open again.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageStat


class Trainer(Protocol):
    """What the worker needs from a trainer: a `name` (for logs and errors; no column stores it yet),
    and `train`."""

    name: str

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        """Features of one image: JSON-serialisable and small (the worker caps them at 64 KiB)."""
        ...


class DefaultTrainer:
    """Colour and shape statistics of a 64x64 thumbnail: fast (well under 1 ms), offline, deterministic.

    The features are what a library browser or a later model can use without decoding the image
    again: mean colour, brightness and contrast, a colourfulness score, an 8-bin histogram per channel
    and the aspect ratio.
    """

    name: str = "default-colour-stats-v1"
    THUMBNAIL = (64, 64)
    BINS = 8

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
    if not callable(getattr(trainer, "train", None)):
        raise ValueError(f"trainer {spec!r}: the object has no train(image, path) method")
    name = getattr(trainer, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"trainer {spec!r}: the object has no non-empty string attribute 'name'")
    return trainer  # type: ignore[no-any-return]

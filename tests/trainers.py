"""Trainers for tests, loadable by spec in pool processes ("tests.trainers:CrashingTrainer").

Kept in their own light module (Pillow and the default trainer only, no pytest) because every pool
process imports the trainer's module when it starts, and the crash tests start many processes.
Worker and end-to-end tests can select them with IMAGETRAINING_TRAINER.
"""

from __future__ import annotations

import os
import time
from typing import Any

from PIL import Image

from discovery_worker.trainer import DefaultTrainer


class CrashingTrainer(DefaultTrainer):
    """The default features plus the process id; kills its process for files named *crash*."""

    name = "crashing"

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        if "crash" in os.path.basename(path):
            os._exit(1)  # like a segfault in a decoder: no exception, no cleanup, the process is gone
        return {**super().train(image, path), "pid": os.getpid()}


class SlowTrainer:
    """0.2 s per image: long enough to cancel a batch in the middle."""

    name = "slow"

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        time.sleep(0.2)
        return {"pid": os.getpid()}


class BrokenInitTrainer:
    """A trainer whose model cannot be loaded."""

    name = "broken"

    def __init__(self) -> None:
        raise RuntimeError("weights not found")


class HangingTrainer(DefaultTrainer):
    """Never finishes (well, 60 s) for files named *hang*: a decoder stuck in a loop."""

    name = "hanging"

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        if "hang" in os.path.basename(path):
            time.sleep(60)
        return super().train(image, path)


class PacedTrainer(DefaultTrainer):
    """The default features, 5 ms per image: a run long enough to watch, short enough for a test."""

    name = "paced"

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        time.sleep(0.005)
        return super().train(image, path)

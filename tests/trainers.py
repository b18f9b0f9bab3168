"""Trainers for tests, loadable by spec in pool processes ("tests.trainers:CrashingTrainer").

Kept in their own light module (Pillow and the default trainer only, no pytest) because every pool
process imports the trainer's module when it starts, and the crash tests start many processes.
Worker and end-to-end tests can select them with IMAGETRAINING_TRAINER.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageStat

from discovery_worker.trainer import DefaultTrainer, Trained


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


class BatchTrainer:
    """A trainer of the batch contract that records what it does, for the batching and provenance tests.

    Every trained path is logged to `train.log` in the directory of the batch's first image (not
    through the environment: pool processes fork from a forkserver that keeps the environment of
    the first test that started it), one line each: "pid<TAB>setups<TAB>batch size<TAB>path", where
    setups counts this process's setup() calls. The embedding is the image's mean colour (3 floats).
    A path containing "poison" makes the whole batch call raise (a trainer that does not isolate its
    images); one containing "refuse" gets an exception in its own slot.
    """

    name = "batch-test"
    version = "A"
    model_digest = ""
    dimension = 3
    batch_size = 4
    setups = 0

    def setup(self) -> None:
        self.setups += 1

    def train_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> list[Trained | BaseException]:
        if any("poison" in os.path.basename(p) for p in paths):
            raise RuntimeError("poisoned batch")
        log = os.path.join(os.path.dirname(paths[0]), "train.log")
        with open(log, "a") as f:
            f.write("".join(f"{os.getpid()}\t{self.setups}\t{len(paths)}\t{p}\n" for p in paths))
        out: list[Trained | BaseException] = []
        for image, path in zip(images, paths, strict=True):
            if "refuse" in os.path.basename(path):
                out.append(ValueError("refused"))
                continue
            mean = ImageStat.Stat(image.convert("RGB")).mean
            out.append(Trained(features={"version": self.version}, embedding=[m + 1.0 for m in mean]))
        return out


class BatchTrainerB(BatchTrainer):
    """The same trainer in a new version: every asset trained by version A is stale for it."""

    version = "B"


def trained_log(directory: str | os.PathLike[str]) -> list[tuple[int, int, int, str]]:
    """BatchTrainer's log of one directory: (pid, setups, batch size, path) per trained image."""
    path = os.path.join(directory, "train.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    return [(int(pid), int(setups), int(n), p) for pid, setups, n, p in rows]


class NoEmbeddingTrainer:
    """A first-contract trainer: features only, no embedding (search refuses its sessions)."""

    name = "no-embedding"

    def train(self, image: Image.Image, path: str) -> dict[str, Any]:
        return {"width": image.size[0]}

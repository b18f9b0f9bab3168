"""The default trainer's features and the trainer loader's error messages."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from discovery_worker.trainer import DefaultTrainer, OneImageTrainer, Trained, Trainer, load_trainer
from imagetraining.vectors import Provenance
from tests import images


def check_features(features: dict[str, object]) -> None:
    json.dumps(features, allow_nan=False)
    assert set(features) == {"mean_rgb", "brightness", "contrast", "colourfulness", "histogram_rgb", "aspect_ratio"}
    histogram = features["histogram_rgb"]
    assert isinstance(histogram, list) and len(histogram) == 3
    for channel in histogram:
        assert len(channel) == DefaultTrainer.BINS
        assert sum(channel) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_default_trainer_any_mode(mode: str) -> None:
    image = images.photo_image(96, 64, seed=3).convert(mode if mode != "I;16" else "I").convert(mode)
    features = DefaultTrainer().train(image, "x.png")
    check_features(features)
    assert features["aspect_ratio"] == 1.5


def test_default_trainer_is_deterministic_and_discriminates() -> None:
    a = DefaultTrainer().train(images.photo_image(64, 64, seed=1), "a")
    assert a == DefaultTrainer().train(images.photo_image(64, 64, seed=1), "a")
    assert a != DefaultTrainer().train(images.photo_image(64, 64, seed=2), "b")
    grey = DefaultTrainer().train(Image.new("RGB", (10, 10), (128, 128, 128)), "g")
    assert grey["colourfulness"] == 0 and grey["contrast"] == 0 and grey["mean_rgb"] == [128, 128, 128]


def test_load_default_trainer() -> None:
    trainer: Trainer = load_trainer("discovery_worker.trainer:DefaultTrainer")
    assert isinstance(trainer, DefaultTrainer)
    assert trainer.name


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "exploding_trainer_mod.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "odd_trainers_mod.py").write_text(
        "NOT_CALLABLE = 3\n"
        "class NoTrain:\n    name = 'x'\n"
        "class NoName:\n    def train(self, image, path):\n        return {}\n"
        "class NeedsArgs:\n    name = 'n'\n    def __init__(self, model):\n        pass\n"
        "    def train(self, image, path):\n        return {}\n"
        "class Fine:\n    name = 'fine'\n    def train(self, image, path):\n        return {'ok': 1}\n"
        "class Batched:\n    name = 'b'\n    version = '3'\n    model_digest = ''\n    dimension = 2\n"
        "    batch_size = 8\n    def setup(self):\n        pass\n"
        "    def train_batch(self, images, paths):\n        return []\n"
        "class BadDimension(Batched):\n    dimension = -1\n"
        "class BadBatch(Batched):\n    batch_size = 0\n"
        "class NoVersion(Batched):\n    version = ''\n"
    )
    yield tmp_path
    for name in ("exploding_trainer_mod", "odd_trainers_mod"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("discovery_worker.trainer.DefaultTrainer", "module.path:ClassName"),
        ("discovery_worker.trainer:", "module.path:ClassName"),
        (":DefaultTrainer", "module.path:ClassName"),
        ("no_such_module_xyz:Trainer", "cannot import module 'no_such_module_xyz'"),
        ("discovery_worker.trainer:Missing", "has no attribute 'Missing'"),
        ("exploding_trainer_mod:T", "RuntimeError: no GPU here"),
        ("odd_trainers_mod:NOT_CALLABLE", "not a class or factory"),
        ("odd_trainers_mod:NoTrain", "neither train_batch(images, paths) nor train(image, path)"),
        ("odd_trainers_mod:BadDimension", "'dimension' must be an integer from 0 to 4096"),
        ("odd_trainers_mod:BadBatch", "'batch_size' must be an integer from 1 to 256"),
        ("odd_trainers_mod:NoVersion", "'version' must be a non-empty string"),
        ("odd_trainers_mod:NoName", "'name'"),
        ("odd_trainers_mod:NeedsArgs", "creating it failed"),
    ],
)
def test_load_trainer_errors(plugin_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="trainer") as info:
        load_trainer(spec)
    assert message in str(info.value)
    assert repr(spec) in str(info.value)


def test_a_first_contract_trainer_is_adapted(plugin_dir: Path) -> None:
    """A trainer with only `name` and `train(image, path)` keeps working: version "1", no embedding,
    batches of one."""
    trainer = load_trainer("odd_trainers_mod:Fine")
    assert isinstance(trainer, OneImageTrainer)
    assert (trainer.name, trainer.version, trainer.dimension, trainer.batch_size) == ("fine", "1", 0, 1)
    assert trainer.train_batch([Image.new("RGB", (1, 1))], ["p"]) == [Trained(features={"ok": 1})]


def test_a_batch_trainer_is_taken_as_it_is(plugin_dir: Path) -> None:
    trainer = load_trainer("odd_trainers_mod:Batched")
    assert type(trainer).__name__ == "Batched"
    assert Provenance.of(trainer) == Provenance("b", "3", "", 2)


def test_the_default_trainer_embeds_its_colour_histogram() -> None:
    """Search works out of the box: the default trainer's 24 histogram bins, L2-normalised."""
    trainer = DefaultTrainer()
    image = images.photo_image(64, 48, seed=3)
    (out,) = trainer.train_batch([image], ["a.jpg"])
    assert isinstance(out, Trained) and out.features is not None and out.embedding is not None
    vector = np.asarray(out.embedding)
    assert vector.shape == (trainer.dimension,) == (24,)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0)
    bins = np.asarray(out.features["histogram_rgb"]).reshape(-1)
    assert np.allclose(vector, bins / np.linalg.norm(bins))

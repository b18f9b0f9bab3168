"""The ONNX embedding trainer (#13) on a tiny image encoder built at test time (tests/onnx_models.py).

Its embedding equals the same network computed by hand in numpy after the same preprocessing; a batch
gives the vectors batches of one give; a bad image fails alone; the model is loaded once per pool
process; and a model file that is missing, not ONNX or not an image encoder stops the worker at start
with one line naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from discovery_worker.hashing import process_image
from discovery_worker.onnx_trainer import CLIP_MEAN, CLIP_STD, OnnxTrainer
from discovery_worker.trainer import Trained, checked, load_trainer
from imagetraining.vectors import Provenance
from tests import images
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.onnx_models import SETUP_LOG_VARIABLE, TinyEncoder, build_encoder

SPEC = "discovery_worker.onnx_trainer:OnnxTrainer"
LIMITS: dict[str, Any] = {"max_file_bytes": 50 * 1024 * 1024, "max_image_pixels": 100_000_000}


@pytest.fixture
def encoder(tmp_path: Path) -> TinyEncoder:
    return build_encoder(tmp_path / "models" / "tiny.onnx")


def trainer_for(model: Path | TinyEncoder, **settings: str) -> OnnxTrainer:
    path = model.path if isinstance(model, TinyEncoder) else model
    return OnnxTrainer({"IMAGETRAINING_ONNX_MODEL": str(path), **settings})


def reference_input(image: Image.Image, side: int = 32) -> np.ndarray:
    """CLIP's preprocessing, written out again: RGB, shorter side to `side` (bicubic), centre crop, scale, normalise."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = round((size[0] - side) / 2), round((size[1] - side) / 2)
    return normalise_pixels(rgb.crop((left, top, left + side, top + side)))


def normalise_pixels(rgb: Image.Image, mean: Any = CLIP_MEAN, std: Any = CLIP_STD) -> np.ndarray:
    """An RGB crop as a (3, H, W) float64 array: scaled to [0, 1], minus mean, over std."""
    pixels = np.asarray(rgb, dtype=np.float64) / 255.0
    result: np.ndarray = ((pixels - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)
    return result


def normalised(rows: np.ndarray) -> np.ndarray:
    result: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return result


def embeddings(results: list[Trained | BaseException]) -> np.ndarray:
    rows = []
    for result in results:
        assert isinstance(result, Trained), result
        assert result.embedding is not None
        rows.append(np.asarray(result.embedding, dtype=np.float64))
    return np.stack(rows)


class CountingSession:
    """Wraps an onnxruntime session and records the batch size of each run() call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.calls.extend(len(v) for v in feeds.values())
        return self.inner.run(outputs, feeds)


def counted(trainer: OnnxTrainer) -> CountingSession:
    trainer.setup()
    session = CountingSession(trainer._session)
    trainer._session = session
    return session


def sample_images() -> list[Image.Image]:
    """Landscape, portrait, square, greyscale and RGBA pictures of different sizes."""
    return [
        images.photo_image(50, 40, seed=1),
        images.photo_image(30, 70, seed=2),
        images.photo_image(32, 32, seed=3),
        images.photo_image(120, 90, seed=4).convert("L"),
        images.photo_image(45, 64, seed=5).convert("RGBA"),
    ]


# ---- the embedding -----------------------------------------------------------------------------


def test_the_embedding_equals_the_network_computed_by_hand(encoder: TinyEncoder) -> None:
    trainer = trainer_for(encoder)
    pictures = sample_images()
    results = trainer.train_batch(pictures, [f"/lib/{i}.jpg" for i in range(len(pictures))])
    expected = normalised(encoder.forward(np.stack([reference_input(p) for p in pictures])))
    got = embeddings(results)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    features = {"model": "onnx-image-encoder", "model_file": "tiny.onnx", "input_size": [32, 32]}
    assert [r.features for r in results if isinstance(r, Trained)] == [features] * len(pictures)


def test_the_trainer_declares_its_provenance_and_settings(encoder: TinyEncoder) -> None:
    trainer = checked(SPEC, trainer_for(encoder))
    digest = hashlib.sha256(encoder.path.read_bytes()).hexdigest()
    assert Provenance.of(trainer) == Provenance("onnx-image-encoder", "1", digest, 8)
    assert trainer.batch_size == 16
    trainer.setup()
    options = trainer._session.get_session_options()  # type: ignore[attr-defined]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert str(options.execution_mode) == "ExecutionMode.ORT_SEQUENTIAL"
    two = trainer_for(encoder, IMAGETRAINING_ONNX_THREADS="2", IMAGETRAINING_ONNX_BATCH_SIZE="5")
    two.setup()
    assert two._session.get_session_options().intra_op_num_threads == 2
    assert two.batch_size == 5 and two.version == "1"  # neither changes a vector


def test_a_symbolic_embedding_length_is_found_by_shape_inference(tmp_path: Path) -> None:
    trainer = trainer_for(build_encoder(tmp_path / "symbolic.onnx", output_shape=("N", "D")))
    assert trainer.dimension == 8
    assert embeddings(trainer.train_batch(sample_images()[:2], ["a", "b"])).shape == (2, 8)


def test_other_preprocessing_is_another_version(encoder: TinyEncoder) -> None:
    """Mean, std and resize change every vector: the trainer's version says so (stale assets retrain)."""
    same = trainer_for(encoder, IMAGETRAINING_ONNX_RESIZE="32", IMAGETRAINING_ONNX_MEAN=",".join(map(str, CLIP_MEAN)))
    assert same.version == "1"
    other = trainer_for(encoder, IMAGETRAINING_ONNX_MEAN="0.5,0.5,0.5", IMAGETRAINING_ONNX_STD="0.5, 0.5, 0.5")
    bigger = trainer_for(encoder, IMAGETRAINING_ONNX_RESIZE="40")
    assert len({other.version, bigger.version, "1"}) == 3
    assert other.version.startswith("1+pre.")
    picture = images.photo_image(50, 40, seed=1)
    # 50x40: shorter side to 32 gives 40x32, whose centre 32x32 starts at x = 4.
    crop = picture.resize((40, 32), Image.Resampling.BICUBIC).crop((4, 0, 36, 32))
    expected = normalised(encoder.forward(normalise_pixels(crop, (0.5,) * 3, (0.5,) * 3)[None]))
    np.testing.assert_allclose(embeddings(other.train_batch([picture], ["p"])), expected, atol=1e-5, rtol=0)
    # Shorter side to 40: no resize at all; the centre 32x32 of 50x40 starts at (9, 4).
    expected = normalised(encoder.forward(normalise_pixels(picture.crop((9, 4, 41, 36)))[None]))
    np.testing.assert_allclose(embeddings(bigger.train_batch([picture], ["p"])), expected, atol=1e-5, rtol=0)


def test_a_batch_gives_the_vectors_of_batches_of_one(encoder: TinyEncoder) -> None:
    trainer = trainer_for(encoder)
    session = counted(trainer)
    pictures = sample_images()
    paths = [f"/lib/{i}.jpg" for i in range(5)]
    together = embeddings(trainer.train_batch(pictures, paths))
    assert session.calls == [5]  # one inference call for the five
    alone = np.concatenate(
        [embeddings(trainer.train_batch([p], [path])) for p, path in zip(pictures, paths, strict=True)]
    )
    assert session.calls == [5, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(together, alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_with_a_fixed_batch_dimension(tmp_path: Path, batch: int) -> None:
    """Batch fixed at 1: one image per call; fixed at 4: calls of 4, the last one padded."""
    fixed = trainer_for(build_encoder(tmp_path / "fixed.onnx", input_shape=(batch, 3, 32, 32)))
    dynamic = trainer_for(build_encoder(tmp_path / "dynamic.onnx"))
    assert fixed.batch_size == batch
    session = counted(fixed)
    pictures = sample_images()
    got = embeddings(fixed.train_batch(pictures, ["p"] * 5))
    assert session.calls == ([1] * 5 if batch == 1 else [4, 4])
    np.testing.assert_allclose(got, embeddings(dynamic.train_batch(pictures, ["p"] * 5)), atol=1e-6, rtol=0)


def test_a_bad_image_in_a_batch_fails_alone(
    encoder: TinyEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    trainer = trainer_for(encoder)
    session = counted(trainer)
    good = sample_images()[:3]
    # A truncated JPEG opened lazily: its pixels are read, and fail, in convert().
    truncated = Image.open(images.write_truncated_jpeg(tmp_path / "cut.jpg", 160, 120))
    request.addfinalizer(truncated.close)
    empty = Image.new("RGB", (0, 0))
    broken = images.photo_image(40, 40).convert("L")

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise OSError("broken data stream when reading image file")

    monkeypatch.setattr(broken, "convert", refuse)
    batch = [truncated, good[0], empty, good[1], broken, good[2]]
    results = trainer.train_batch(batch, [f"/lib/{i}" for i in range(len(batch))])
    assert isinstance(results[0], OSError) and "truncated" in str(results[0])
    assert isinstance(results[2], ValueError) and "empty" in str(results[2])
    assert isinstance(results[4], OSError) and "broken data stream" in str(results[4])
    assert session.calls == [3]  # the three good ones still inferred together
    expected = normalised(encoder.forward(np.stack([reference_input(p) for p in good])))
    np.testing.assert_allclose(embeddings([results[1], results[3], results[5]]), expected, atol=1e-5, rtol=0)
    # A batch with nothing that preprocesses runs no inference.
    assert all(isinstance(r, BaseException) for r in trainer.train_batch([empty, broken], ["a", "b"]))
    assert session.calls == [3]
    assert trainer.train_batch([], []) == []


def test_through_the_worker_decoder_the_embedding_is_stored_normalised(encoder: TinyEncoder, tmp_path: Path) -> None:
    """process_image (what a pool process runs) decodes the file and keeps the trainer's vector."""
    path = images.write_png(tmp_path / "photo.png", 64, 48, seed=9)
    result = process_image(str(path), trainer=trainer_for(encoder), **LIMITS)
    assert result.ok and result.embedding is not None and len(result.embedding) == 8
    with Image.open(path) as picture:
        expected = normalised(encoder.forward(reference_input(picture)[None]))[0]
    np.testing.assert_allclose(result.embedding, expected, atol=1e-5, rtol=0)


# ---- once per pool process ---------------------------------------------------------------------

# Run in a fresh interpreter: pool processes fork from a forkserver that keeps the environment of the
# process that started it, so the variables of this test must be set before it starts.
POOL_SCRIPT = """
import asyncio, json, sys
from discovery_worker.pool import TrainingPool

async def main() -> None:
    paths = json.loads(sys.argv[1])
    pool = TrainingPool(2, trainer_spec="tests.onnx_models:CountingOnnxTrainer", **json.loads(sys.argv[2]))
    try:
        first = await pool.process(list(enumerate(paths)))
        again = await pool.process(list(enumerate(paths)))
    finally:
        await pool.close()
    rows = [[r.ok, r.error_class, r.embedding, (r.features or {}).get("pid")] for _i, r in first + again]
    provenance = pool.provenance and pool.provenance.describe()
    print(json.dumps({"provenance": provenance, "batch_size": pool.batch_size, "results": rows}))

asyncio.run(main())
"""


def test_the_model_is_loaded_once_per_pool_process(encoder: TinyEncoder, tmp_path: Path) -> None:
    paths = [str(images.write_jpeg(tmp_path / "lib" / f"{i:02d}.jpg", 64, 48, seed=40 + i)) for i in range(10)]
    setup_log = tmp_path / "setups.log"
    settings = {"IMAGETRAINING_ONNX_MODEL": str(encoder.path), "IMAGETRAINING_ONNX_BATCH_SIZE": "2"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETRAINING_")}
    env.update(settings, PYTHONPATH=str(ROOT), **{SETUP_LOG_VARIABLE: str(setup_log)})
    done = subprocess.run(
        [PYTHON, "-c", POOL_SCRIPT, json.dumps(paths), json.dumps(LIMITS)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    setups = [int(line) for line in setup_log.read_text().split()]
    assert len(setups) == 2 and len(set(setups)) == 2, setups  # each of the two processes exactly once
    digest = hashlib.sha256(encoder.path.read_bytes()).hexdigest()
    assert report["provenance"] == f"onnx-image-encoder 1, model {digest[:12]}"
    assert report["batch_size"] == 2
    rows = report["results"]
    assert [(ok, error) for ok, error, _e, _pid in rows] == [(True, "")] * 20
    assert {pid for _ok, _error, _e, pid in rows} <= set(setups)
    local = trainer_for(encoder, **settings)
    for (_ok, _error, vector, _pid), path in zip(rows, paths * 2, strict=True):
        expected = process_image(path, trainer=local, **LIMITS).embedding
        assert expected is not None
        np.testing.assert_allclose(vector, expected, atol=1e-6, rtol=0)


# ---- start-up errors ---------------------------------------------------------------------------


def not_an_encoder(tmp_path: Path, kind: str) -> Path:
    """A model file that the trainer must refuse, of the given kind."""
    path = tmp_path / f"{kind}.onnx"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("this is not an ONNX model\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "one_channel":
        build_encoder(path, input_shape=("N", 1, 32, 32))
    elif kind == "rank_2":
        build_encoder(path, input_shape=("N", 12))
    elif kind == "dynamic_side":
        build_encoder(path, input_shape=("N", 3, "H", "W"))
    elif kind == "output_rank_3":
        build_encoder(path, output_shape=("N", 8, 1))
    elif kind == "two_outputs":  # an export that also returns a hidden state
        build_encoder(path)
        model = onnx.load(str(path))
        model.graph.output.append(onnx.helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, ["N", 4, 1, 1]))
        onnx.save(model, str(path))
    return path


REFUSALS = {
    "missing": "does not exist",
    "directory": "is not a file",
    "text": "is not an ONNX model",
    "empty": "is not a valid ONNX model",
    "one_channel": "has shape [N, 1, 32, 32]; an image encoder takes [N, 3, H, W]",
    "rank_2": "has shape [N, 12]; an image encoder takes [N, 3, H, W]",
    "dynamic_side": "has shape [N, 3, H, W]; an image encoder takes [N, 3, H, W] (N fixed or dynamic, H and W fixed",
    "two_outputs": "has 2 outputs ['image_embeds', 'pooled']; export only the image embedding",
    "output_rank_3": "output 'image_embeds' has shape [N, 8, 1]; an image encoder returns [N, D], one embedding",
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_a_file_that_is_not_an_image_encoder_is_refused_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    path = not_an_encoder(tmp_path, kind)
    monkeypatch.setenv("IMAGETRAINING_ONNX_MODEL", str(path))
    with pytest.raises(ValueError) as raised:
        load_trainer(SPEC)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"trainer {SPEC!r}: creating it failed: ValueError: IMAGETRAINING_ONNX_MODEL: "), message
    assert str(path) in message and REFUSALS[kind] in message, message


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("IMAGETRAINING_ONNX_MODEL", "", "IMAGETRAINING_ONNX_MODEL is not set"),
        ("IMAGETRAINING_ONNX_THREADS", "0", "IMAGETRAINING_ONNX_THREADS: 0 is out of range (1..256)"),
        ("IMAGETRAINING_ONNX_THREADS", "two", "IMAGETRAINING_ONNX_THREADS: 'two' is not an integer"),
        ("IMAGETRAINING_ONNX_BATCH_SIZE", "257", "IMAGETRAINING_ONNX_BATCH_SIZE: 257 is out of range (1..256)"),
        ("IMAGETRAINING_ONNX_MEAN", "0.5,0.5", "IMAGETRAINING_ONNX_MEAN: '0.5,0.5' is not three"),
        ("IMAGETRAINING_ONNX_MEAN", "a,b,c", "IMAGETRAINING_ONNX_MEAN: 'a,b,c' is not three"),
        ("IMAGETRAINING_ONNX_STD", "0.2,0,0.2", "IMAGETRAINING_ONNX_STD: '0.2,0,0.2': every value must be greater"),
        ("IMAGETRAINING_ONNX_STD", "nan,1,1", "IMAGETRAINING_ONNX_STD: 'nan,1,1' is not three"),
        ("IMAGETRAINING_ONNX_RESIZE", "16", "IMAGETRAINING_ONNX_RESIZE: 16 is smaller than the model's input 32x32"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(encoder: TinyEncoder, variable: str, value: str, says: str) -> None:
    with pytest.raises(ValueError) as raised:
        OnnxTrainer({"IMAGETRAINING_ONNX_MODEL": str(encoder.path), variable: value})
    assert says in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("kind", ["missing", "one_channel"])
def test_the_worker_stops_at_start_with_one_line(db_url: str, tmp_path: Path, kind: str) -> None:
    """`python -m discovery_worker` with the ONNX trainer and a bad model file: one line, exit status 2."""
    library = tmp_path / "library"
    library.mkdir()
    model = not_an_encoder(tmp_path, kind)
    env = subprocess_env(
        db_url,
        library,
        IMAGETRAINING_WORKER_ADDRESS="127.0.0.1:0",
        IMAGETRAINING_POOL_SIZE="1",
        IMAGETRAINING_DATA_DIR=str(tmp_path / "data"),
        IMAGETRAINING_TRAINER=SPEC,
        IMAGETRAINING_ONNX_MODEL=str(model),
    )
    done = subprocess.run(
        [PYTHON, "-m", "discovery_worker"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("imagetraining: ")]
    assert line.startswith("imagetraining: IMAGETRAINING_TRAINER: "), done.stderr
    assert f"IMAGETRAINING_ONNX_MODEL: {model}" in line and REFUSALS[kind] in line, line


def test_the_trainer_is_importable_without_onnxruntime_loaded() -> None:
    """Loading the module (as the forkserver does for trainers) imports neither onnx nor onnxruntime."""
    code = (
        "import sys, discovery_worker.onnx_trainer; "
        "print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    )
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

"""An image-encoder model in ONNX as a trainer: batched inference with onnxruntime, L2-normalised embeddings.

Select it with `IMAGETRAINING_TRAINER=discovery_worker.onnx_trainer:OnnxTrainer` (it needs the `onnx`
extra: `pip install -e '.[onnx]'`; `make` installs it). The model is a file on disk, never downloaded
at run time; README.md ("A real model") says how to export an OpenCLIP or CLIP ViT-B/32 image encoder.

Settings (environment variables, read by the trainer itself; README.md lists them too):

- `IMAGETRAINING_ONNX_MODEL` (required): the model file, with one float32 input `[N, 3, H, W]` (N
  fixed or dynamic, H and W fixed) and one float output `[N, D]` (D fixed: the embedding's dimension);
- `IMAGETRAINING_ONNX_THREADS` (1): onnxruntime intra-op threads per pool process (1..256); inter-op
  threads are 1 and execution is sequential;
- `IMAGETRAINING_ONNX_BATCH_SIZE` (16): images per inference call the trainer asks for (1..256);
  `IMAGETRAINING_TRAIN_BATCH_SIZE` overrides it; a model whose batch dimension is fixed gets that;
- `IMAGETRAINING_ONNX_MEAN` (CLIP's `0.48145466,0.4578275,0.40821073`) and `IMAGETRAINING_ONNX_STD`
  (CLIP's `0.26862954,0.26130258,0.27577711`): per channel (R,G,B), subtracted from and then dividing
  the pixels scaled to [0, 1]; std values must be > 0;
- `IMAGETRAINING_ONNX_RESIZE` (the model's input side, max(H, W)): the shorter side is resized to
  this before the centre crop to H x W; at least max(H, W).

Preprocessing is CLIP's: convert to RGB, resize the shorter side (bicubic, Pillow's, as CLIP's own
torchvision pipeline on PIL images does), centre crop to the model's H x W, scale to [0, 1],
normalise with mean and std, NCHW float32.

What runs where (see discovery_worker/trainer.py for the contract):

- `__init__` runs wherever the trainer is loaded (each pool process at start, and anywhere a check of
  the settings is wanted) and validates cheaply but thoroughly, without creating an inference
  session: the variables parse, the file exists and is readable, `onnx.checker` accepts it, and its
  one input and one output have an image encoder's shapes. Any failure is a ValueError of one line
  naming the variable, which the worker reports at start (exit status 2).
- `setup()` runs once per pool process: it creates the onnxruntime session (CPU, `intra_op` threads
  from the setting, one inter-op thread, sequential execution, no spinning between operators, so
  that pool processes do not fight over the cores).
- `train_batch` preprocesses each image (an image whose preprocessing raises gets that exception in
  its own slot), runs the others in one inference call (one at a time when the model's batch
  dimension is fixed at 1; padded when it is fixed at another size) and L2-normalises each row.

Provenance: `name` is "onnx-image-encoder", `model_digest` the SHA-256 of the model file, `version`
"1" with the default preprocessing; preprocessing settings that differ from the defaults (which
change every vector) give version "1+pre.<digest of resize, mean and std>", so that changing them
retrains the library instead of mixing vectors made two ways.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image

from discovery_worker.trainer import MAX_BATCH_SIZE, MAX_DIMENSION, Trained

MODEL_VARIABLE: Final = "IMAGETRAINING_ONNX_MODEL"
THREADS_VARIABLE: Final = "IMAGETRAINING_ONNX_THREADS"
BATCH_VARIABLE: Final = "IMAGETRAINING_ONNX_BATCH_SIZE"
MEAN_VARIABLE: Final = "IMAGETRAINING_ONNX_MEAN"
STD_VARIABLE: Final = "IMAGETRAINING_ONNX_STD"
RESIZE_VARIABLE: Final = "IMAGETRAINING_ONNX_RESIZE"

CLIP_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Final = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_THREADS: Final = 1
DEFAULT_BATCH_SIZE: Final = 16
MAX_THREADS: Final = 256
MAX_SIDE: Final = 4096  # the largest model input side or resize accepted

# ONNX TensorProto element types (onnx.TensorProto.FLOAT, ...), without importing onnx for them.
_FLOAT: Final = 1
_FLOAT_TYPES: Final = {1: "float", 10: "float16", 11: "double", 16: "bfloat16"}

# SHA-256 of model files already hashed by this process: (path, size, mtime_ns, inode) -> digest.
_digests: dict[tuple[str, int, int, int], str] = {}
_digests_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the trainer needs to know about an image encoder's graph."""

    input_name: str
    output_name: str
    batch: int  # the fixed batch dimension, or 0 when it is dynamic
    height: int
    width: int
    dimension: int


class OnnxTrainer:
    """An ONNX image encoder as a trainer (see the module doc)."""

    name: str = "onnx-image-encoder"
    version: str = "1"
    model_digest: str = ""
    dimension: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = _model_path(env)
        self.threads = _integer(env, THREADS_VARIABLE, DEFAULT_THREADS, 1, MAX_THREADS)
        batch_size = _integer(env, BATCH_VARIABLE, DEFAULT_BATCH_SIZE, 1, MAX_BATCH_SIZE)
        self.mean = _triple(env, MEAN_VARIABLE, CLIP_MEAN, positive=False)
        self.std = _triple(env, STD_VARIABLE, CLIP_STD, positive=True)
        self.model_path = path
        self.model_digest = _file_digest(path)
        self.shape = inspect_model(path)
        side = max(self.shape.height, self.shape.width)
        self.resize = _integer(env, RESIZE_VARIABLE, side, 1, MAX_SIDE)
        if self.resize < side:
            raise ValueError(
                f"{RESIZE_VARIABLE}: {self.resize} is smaller than the model's input "
                f"{self.shape.height}x{self.shape.width}: the shorter side must be at least {side} to crop it"
            )
        self.dimension = self.shape.dimension
        # A model whose batch dimension is fixed is run with exactly that many images per call.
        self.batch_size = self.shape.batch or batch_size
        self.version = _version(self.resize, self.mean, self.std, default=(side, CLIP_MEAN, CLIP_STD))
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        self._features: dict[str, Any] = {
            "model": self.name,
            "model_file": path.name,
            "input_size": [self.shape.height, self.shape.width],
        }
        self._session: Any = None

    # -- once per pool process --

    def setup(self) -> None:
        """Create the inference session: CPU, `threads` intra-op threads, one inter-op thread, sequential."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ValueError(
                f"{MODEL_VARIABLE}: the ONNX trainer needs onnxruntime (install the 'onnx' extra): {exc}"
            ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: warnings about the graph would repeat per process
        # Pool processes share the cores: a thread that busy-waits between operators steals them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ValueError(
                f"{MODEL_VARIABLE}: onnxruntime cannot load {_show(self.model_path)}: {_first_line(exc)}"
            ) from None
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != ([self.shape.input_name], [self.shape.output_name]):
            raise ValueError(
                f"{MODEL_VARIABLE}: onnxruntime sees inputs and outputs {names} in {_show(self.model_path)}"
            )
        self._session = session

    # -- the work --

    def preprocess(self, image: Image.Image) -> np.ndarray[Any, np.dtype[np.float32]]:
        """One image as the model's input: a (3, H, W) float32 array (see the module doc)."""
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ValueError(f"the image is empty ({width}x{height} pixels)")
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        # The shorter side becomes `resize`; the longer one keeps the aspect ratio (truncated, as torchvision does).
        if width <= height:
            size = (self.resize, max(self.resize, int(self.resize * height / width)))
        else:
            size = (max(self.resize, int(self.resize * width / height)), self.resize)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        crop_h, crop_w = self.shape.height, self.shape.width
        left = round((size[0] - crop_w) / 2.0)
        top = round((size[1] - crop_h) / 2.0)
        rgb = rgb.crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return np.ascontiguousarray((pixels - self._mean) / self._std, dtype=np.float32)

    def train_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> list[Trained | BaseException]:
        """One `Trained` per image; an image that cannot be preprocessed or inferred gets its exception."""
        if len(images) != len(paths):
            raise ValueError(f"train_batch got {len(images)} images and {len(paths)} paths")
        if self._session is None:
            self.setup()  # used outside a pool (a test, a benchmark, a script)
        out: list[Trained | BaseException | None] = [None] * len(images)
        ready: list[tuple[int, np.ndarray[Any, np.dtype[np.float32]]]] = []
        for i, image in enumerate(images):
            try:
                ready.append((i, self.preprocess(image)))
            except Exception as exc:
                out[i] = exc
        step = self.shape.batch or max(len(ready), 1)
        for start in range(0, len(ready), step):
            chunk = ready[start : start + step]
            for (i, _tensor), result in zip(chunk, self._infer_chunk([t for _i, t in chunk]), strict=True):
                out[i] = result
        assert all(item is not None for item in out)
        return [item for item in out if item is not None]

    def _infer_chunk(self, tensors: list[np.ndarray[Any, np.dtype[np.float32]]]) -> list[Trained | BaseException]:
        """One inference call for the chunk; if it fails, each image alone, so one bad input fails alone."""
        try:
            rows = self._infer(np.stack(tensors))
        except Exception as exc:
            if len(tensors) == 1:
                return [exc]
            return [self._infer_chunk([t])[0] for t in tensors]
        return [self._trained(row) for row in rows]

    def _infer(self, batch: np.ndarray[Any, np.dtype[np.float32]]) -> np.ndarray[Any, np.dtype[np.float64]]:
        count = batch.shape[0]
        if self.shape.batch and count < self.shape.batch:  # a fixed batch dimension: pad with zeros
            padding = np.zeros((self.shape.batch - count, *batch.shape[1:]), dtype=np.float32)
            batch = np.concatenate([batch, padding])
        (output,) = self._session.run([self.shape.output_name], {self.shape.input_name: batch})
        rows = np.asarray(output, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] != batch.shape[0] or rows.shape[1] != self.dimension:
            raise RuntimeError(
                f"the model returned shape {list(rows.shape)} for {batch.shape[0]} images; "
                f"expected [{batch.shape[0]}, {self.dimension}]"
            )
        return rows[:count]

    def _trained(self, row: np.ndarray[Any, np.dtype[np.float64]]) -> Trained | BaseException:
        if not np.all(np.isfinite(row)):
            return ValueError("the model's output has a NaN or infinite value")
        norm = float(np.linalg.norm(row))
        if norm == 0.0:
            return ValueError("the model's output is all zeros (it has no direction)")
        return Trained(features=dict(self._features), embedding=(row / norm).astype(np.float32))


# ---- checks at load ----------------------------------------------------------------------------


def inspect_model(path: Path) -> ModelShape:
    """The input and output of the image encoder in `path`, checked; ValueError naming the setting otherwise."""
    try:
        import onnx
        import onnx.checker
        import onnx.shape_inference
    except ImportError as exc:
        raise ValueError(f"{MODEL_VARIABLE}: the ONNX trainer needs onnx (install the 'onnx' extra): {exc}") from None
    where = f"{MODEL_VARIABLE}: {_show(path)}"
    try:
        # The weights of a model with external data stay on disk: only the graph is needed here.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{where} is not an ONNX model: {_first_line(exc)}") from None
    try:
        onnx.checker.check_model(str(path))  # by path: also for models larger than 2 GiB
    except Exception as exc:
        raise ValueError(f"{where} is not a valid ONNX model: {_first_line(exc)}") from None
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]  # IR < 4 lists weights as inputs too
    if len(inputs) != 1:
        raise ValueError(f"{where} has {len(inputs)} inputs {[i.name for i in inputs]}; an image encoder has one")
    if len(graph.output) != 1:
        names = [o.name for o in graph.output]
        raise ValueError(f"{where} has {len(graph.output)} outputs {names}; export only the image embedding")
    (inp,) = inputs
    output = graph.output[0]
    declared = _dims(output.type)
    if declared is None or not all(isinstance(d, int) for d in declared[1:]):
        # An export may leave the embedding's length symbolic ([N, "D"]): shape inference knows it.
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            output = next(o for o in inferred.graph.output if o.name == output.name)
        except Exception:
            pass  # the declared shape is refused below
    in_type = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or in_type.elem_type != _FLOAT:
        raise ValueError(f"{where}: input {inp.name!r} must be a float32 tensor, not {_type_name(inp.type)}")
    in_dims = _dims(inp.type)
    if (
        in_dims is None
        or len(in_dims) != 4
        or in_dims[1] != 3
        or not all(isinstance(d, int) and 0 < d <= MAX_SIDE for d in in_dims[2:])
    ):
        raise ValueError(
            f"{where}: input {inp.name!r} has shape {_show_dims(in_dims)}; an image encoder takes [N, 3, H, W] "
            f"(N fixed or dynamic, H and W fixed, at most {MAX_SIDE})"
        )
    batch = in_dims[0] if isinstance(in_dims[0], int) and in_dims[0] > 0 else 0
    if batch > MAX_BATCH_SIZE:
        raise ValueError(f"{where}: input {inp.name!r} has a fixed batch of {batch}; at most {MAX_BATCH_SIZE}")
    if not output.type.HasField("tensor_type") or output.type.tensor_type.elem_type not in _FLOAT_TYPES:
        raise ValueError(f"{where}: output {output.name!r} must be a float tensor, not {_type_name(output.type)}")
    out_dims = _dims(output.type)
    if out_dims is None or len(out_dims) != 2 or not isinstance(out_dims[1], int) or out_dims[1] <= 0:
        raise ValueError(
            f"{where}: output {output.name!r} has shape {_show_dims(out_dims)}; an image encoder returns [N, D], "
            "one embedding of a fixed length D per image"
        )
    out_batch = out_dims[0] if isinstance(out_dims[0], int) and out_dims[0] > 0 else 0
    if out_batch and out_batch != batch:
        raise ValueError(
            f"{where}: output {output.name!r} has shape {_show_dims(out_dims)} for input {_show_dims(in_dims)}: "
            "one embedding per image is expected"
        )
    dimension = out_dims[1]
    if dimension > MAX_DIMENSION:
        raise ValueError(f"{where}: the embedding has {dimension} values; at most {MAX_DIMENSION} are stored")
    return ModelShape(
        input_name=inp.name,
        output_name=output.name,
        batch=batch,
        height=int(in_dims[2]),
        width=int(in_dims[3]),
        dimension=dimension,
    )


def _dims(value_type: Any) -> list[int | str] | None:
    """The dimensions of a tensor type: an int when fixed, the parameter name (or "?") when dynamic."""
    tensor = value_type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]


def _show_dims(dims: list[int | str] | None) -> str:
    return "unknown" if dims is None else "[" + ", ".join(str(d) for d in dims) + "]"


def _type_name(value_type: Any) -> str:
    if value_type.HasField("tensor_type"):
        elem = value_type.tensor_type.elem_type
        return f"a tensor of {_FLOAT_TYPES.get(elem, f'element type {elem}')}"
    return f"a {value_type.WhichOneof('value') or 'value of unknown type'}"


def _model_path(env: Mapping[str, str]) -> Path:
    raw = env.get(MODEL_VARIABLE, "").strip()
    if not raw:
        raise ValueError(f"{MODEL_VARIABLE} is not set: the ONNX trainer needs the path of an image-encoder model")
    path = Path(raw).expanduser()
    if not path.exists():
        raise ValueError(f"{MODEL_VARIABLE}: {_show(path)} does not exist")
    if not path.is_file():
        raise ValueError(f"{MODEL_VARIABLE}: {_show(path)} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"{MODEL_VARIABLE}: {_show(path)} cannot be read: {exc.strerror or exc}") from None
    return path


def _file_digest(path: Path) -> str:
    """SHA-256 hex of the file, remembered per process while its size, mtime and inode stay the same."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        with _digests_lock:
            known = _digests.get(key)
        if known is not None:
            return known
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise ValueError(f"{MODEL_VARIABLE}: {_show(path)} cannot be read: {exc.strerror or exc}") from None
    with _digests_lock:
        _digests[key] = digest.hexdigest()
    return digest.hexdigest()


def _integer(env: Mapping[str, str], variable: str, default: int, low: int, high: int) -> int:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{variable}: {raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{variable}: {value} is out of range ({low}..{high})")
    return value


def _triple(
    env: Mapping[str, str], variable: str, default: tuple[float, float, float], *, positive: bool
) -> tuple[float, float, float]:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    parts = [p.strip() for p in raw.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{variable}: {raw!r} is not three comma-separated numbers (R,G,B)") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{variable}: {raw!r} is not three comma-separated finite numbers (R,G,B)")
    if positive and not all(v > 0 for v in values):
        raise ValueError(f"{variable}: {raw!r}: every value must be greater than 0")
    return values[0], values[1], values[2]


def _version(
    resize: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    default: tuple[int, tuple[float, float, float], tuple[float, float, float]],
) -> str:
    """ "1", or "1+pre.<digest>" when resize, mean or std differ from the defaults (every vector changes)."""
    if (resize, mean, std) == default:
        return "1"
    spec = json.dumps({"resize": resize, "mean": mean, "std": std}, sort_keys=True)
    return "1+pre." + hashlib.sha256(spec.encode()).hexdigest()[:12]


def _show(path: Path) -> str:
    """A path on one line: as is when printable, else its repr."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:300]

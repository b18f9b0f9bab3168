"""Tiny ONNX image encoders built at test time with `onnx.helper`, for the ONNX trainer's tests and benchmarks.

`build_encoder` writes a model of known weights: Conv (3 -> 4 channels, 3x3, padding 1), GlobalAveragePool,
Flatten and a MatMul projection to `dimension` values, input [N, 3, 32, 32] with a dynamic batch by
default. `TinyEncoder.forward` is the same network written by hand in numpy, so a test can check the
trainer's embedding against an independent computation. Shapes that are not an image encoder's (one
channel, rank 2) can be built too, for the start-up errors.

`CountingOnnxTrainer` is the ONNX trainer that also appends its process id to the file named by
`ONNX_TEST_SETUP_LOG` each time its `setup()` runs, and adds the pid to its features; it is loadable
by spec in pool processes ("tests.onnx_models:CountingOnnxTrainer"). Pool processes see the
environment of the process that started the forkserver, so a test that sets these variables runs its
pool in a fresh interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from discovery_worker.onnx_trainer import OnnxTrainer
from discovery_worker.trainer import Trained

SETUP_LOG_VARIABLE = "ONNX_TEST_SETUP_LOG"
# Opset 17 with IR version 8: what torch.onnx.export writes for it, and what every onnxruntime >= 1.14 reads.
OPSET = 17
IR_VERSION = 8


@dataclass(frozen=True)
class TinyEncoder:
    """A model written by `build_encoder`: its file and its weights."""

    path: Path
    conv_weight: np.ndarray  # (4, C, 3, 3)
    conv_bias: np.ndarray  # (4,)
    projection: np.ndarray  # (4, D), or (features, D) for a rank-2 model

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """The network in plain numpy (float64): (N, 3, H, W) -> (N, D), not normalised."""
        x = np.asarray(batch, dtype=np.float64)
        n, channels, height, width = x.shape
        w = self.conv_weight.astype(np.float64)
        padded = np.zeros((n, channels, height + 2, width + 2))
        padded[:, :, 1:-1, 1:-1] = x
        conv = np.zeros((n, w.shape[0], height, width))
        for o in range(w.shape[0]):
            for c in range(channels):
                for dy in range(3):
                    for dx in range(3):
                        conv[:, o] += w[o, c, dy, dx] * padded[:, c, dy : dy + height, dx : dx + width]
            conv[:, o] += float(self.conv_bias[o])
        pooled = conv.mean(axis=(2, 3))  # GlobalAveragePool + Flatten: (N, 4)
        result: np.ndarray = pooled @ self.projection.astype(np.float64)
        return result


def build_encoder(
    path: str | os.PathLike[str],
    *,
    input_shape: Sequence[int | str] = ("N", 3, 32, 32),
    dimension: int = 8,
    seed: int = 0,
    output_shape: Sequence[int | str] | None = None,
) -> TinyEncoder:
    """Write a tiny image encoder to `path` (see the module doc); a str dimension is dynamic.

    A rank-4 `input_shape` gives Conv -> GlobalAveragePool -> Flatten -> MatMul with input_shape[1]
    input channels; a rank-2 one, a single MatMul (not an image encoder). `output_shape` overrides the
    declared output shape (default [N, dimension]).
    """
    rng = np.random.default_rng(seed)
    batch = input_shape[0]
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info(
        "image_embeds", TensorProto.FLOAT, list(output_shape) if output_shape is not None else [batch, dimension]
    )
    if len(input_shape) == 4:
        channels = int(input_shape[1])
        conv_weight = rng.normal(0.0, 0.5, (4, channels, 3, 3)).astype(np.float32)
        conv_bias = rng.normal(0.0, 0.1, (4,)).astype(np.float32)
        projection = rng.normal(0.0, 0.5, (4, dimension)).astype(np.float32)
        nodes = [
            helper.make_node("Conv", ["pixel_values", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1] * 4),
            helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "proj"], ["image_embeds"]),
        ]
        initializers = [
            numpy_helper.from_array(conv_weight, "conv_w"),
            numpy_helper.from_array(conv_bias, "conv_b"),
            numpy_helper.from_array(projection, "proj"),
        ]
    else:
        conv_weight = np.zeros((0,), dtype=np.float32)
        conv_bias = np.zeros((0,), dtype=np.float32)
        projection = rng.normal(0.0, 0.5, (int(input_shape[-1]), dimension)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["pixel_values", "proj"], ["image_embeds"])]
        initializers = [numpy_helper.from_array(projection, "proj")]
    graph = helper.make_graph(nodes, "tiny_image_encoder", [x], [y], initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="imagetraining-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return TinyEncoder(target, conv_weight, conv_bias, projection)


class CountingOnnxTrainer(OnnxTrainer):
    """The ONNX trainer, logging each setup() (one pid per line) to the file named by ONNX_TEST_SETUP_LOG."""

    def setup(self) -> None:
        super().setup()
        log = os.environ.get(SETUP_LOG_VARIABLE)
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    def train_batch(self, images: Sequence[Image.Image], paths: Sequence[str]) -> list[Trained | BaseException]:
        out: list[Trained | BaseException] = []
        for result in super().train_batch(images, paths):
            if isinstance(result, Trained):
                features: dict[str, Any] = {**(result.features or {}), "pid": os.getpid()}
                result = Trained(features=features, embedding=result.embedding)
            out.append(result)
        return out

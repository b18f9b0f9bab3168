"""Case 10, the ONNX embedding trainer: the pipeline's images/s against onnxruntime alone (issue #13).

    .venv/bin/python -m benchmarks.onnx_bench [--quick] [--repeats 3]
    .venv/bin/python -m benchmarks --cases 10 [--quick]      (the same, as a case of the suite: `run_case`)

At benchmark time it builds, with `onnx.helper` and numpy, an image encoder shaped like CLIP's
ViT-B/32 with random weights (speed depends on the shape, not the weights): input [N, 3, 224, 224],
patch embedding Conv 3 -> 768 (kernel and stride 32: 49 tokens) plus a class token and position
embedding, LayerNorm, `blocks` transformer blocks (LayerNorm, 12-head self-attention written as
MatMul/Reshape/Transpose/Softmax, LayerNorm, MLP 768 -> 3072 -> 768 with CLIP's QuickGELU
x * sigmoid(1.702 x)), a final LayerNorm on the class token and a projection 768 -> 512; opset 17.
The full run has CLIP's 12 blocks; `--quick` has 2 (about a sixth of the FLOPs, so decoding weighs
far more there: the quick ratios are not the aim's).

It then writes photo-like 12 MP and 2 MP JPEGs (as case 5 does; a few distinct files, each listed
several times per measurement) and times, for each model (float32, then the int8 variant that
`onnxruntime.quantization.quantize_dynamic` makes of it, when it can):

  ORT alone   onnxruntime only, on tensors already decoded and preprocessed by the trainer's own
              code: one InferenceSession per process created by `OnnxTrainer.setup()` (1 intra-op
              thread, sequential, no spinning: the trainer's settings), the same batch sizes; for
              the pool of 2, two such processes at once (both started on a barrier, the rate is all
              images over the slower one's time); they run at the pool processes' niceness
  pipeline    `TrainingPool(size, trainer_spec=OnnxTrainer, batch_size=b)`: read, decode (JPEG
              draft), dHash, preprocess, batch, infer, L2-normalise, the round trip to the parent;
              pool start and a warm-up call excluded

Then, in the benchmark's own process, the CPU per image of each step the pipeline adds (read +
BLAKE2b, the JPEG draft decode, dHash, the trainer's preprocess) on each set, and the floor they put
under the CPU ratio: (ORT alone's CPU per image + the steps) / ORT alone's. No overlap of decoding
with inference lowers that floor when every core is inferring (a pool as large as the cores).

Each figure is the median of the repeats; the ratio of a pipeline row is its images/s over ORT
alone's with the same processes and batch size in the same run (0.87x faster = 1.15x slower = the
aim's limit). A "CPU per image" row follows each: the pool processes' CPU (from /proc) plus their
parent's, against the ORT processes' own, which another load on a shared machine changes far less
than it changes images/s. Measurements run in a subprocess per model, because pool processes fork from a
forkserver that keeps the environment (IMAGETRAINING_ONNX_MODEL) of whatever started it first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Row, log, median, scratch_dir  # noqa: E402

CASE = "10 ONNX trainer"
TRAINER = "discovery_worker.onnx_trainer:OnnxTrainer"
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000
AIM_RATIO = 1.15  # the pipeline's time over inference alone
OPSET = 17
IR_VERSION = 8
SETS = {"JPEG 12MP": ("big", 4000, 3000), "JPEG 2MP": ("mid", 1600, 1200)}


@dataclass(frozen=True)
class Plan:
    blocks: int
    distinct: int  # distinct files per set (each listed several times per measurement)
    images: int  # images per measurement, rounded up to a multiple of batch x pool size
    pools: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int
    int8_batches: tuple[int, ...]  # batch sizes measured for the int8 model

    @staticmethod
    def of(fields: dict[str, Any]) -> Plan:
        return Plan(
            blocks=int(fields["blocks"]),
            distinct=int(fields["distinct"]),
            images=int(fields["images"]),
            pools=tuple(fields["pools"]),
            batches=tuple(fields["batches"]),
            repeats=int(fields["repeats"]),
            int8_batches=tuple(fields["int8_batches"]),
        )


QUICK = Plan(blocks=2, distinct=2, images=16, pools=(1, 2), batches=(1, 8), repeats=2, int8_batches=(8,))
FULL = Plan(blocks=12, distinct=4, images=32, pools=(1, 2), batches=(1, 8, 32), repeats=3, int8_batches=(1, 8, 32))


def images_for(plan: Plan, batch: int, pool: int) -> int:
    step = batch * pool
    return step * max(1, math.ceil(plan.images / step))


# ---------------------------------------------------------------- the model


def build_vit(
    path: Path,
    *,
    blocks: int = 12,
    width: int = 768,
    heads: int = 12,
    mlp: int = 3072,
    patch: int = 32,
    side: int = 224,
    dimension: int = 512,
    seed: int = 0,
) -> int:
    """Write a ViT-B/32-shaped image encoder with random weights to `path`; returns its parameter count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    tokens = (side // patch) ** 2 + 1
    head = width // heads
    nodes: list[Any] = []
    weights: list[Any] = []

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.02) -> str:
        weights.append(numpy_helper.from_array((rng.standard_normal(shape, dtype=np.float32) * scale), name))
        return name

    def const(name: str, values: Any, dtype: Any = np.int64) -> str:
        weights.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def layer_norm(x: str, name: str) -> str:
        gamma = const(f"{name}.g", np.ones(width), np.float32)
        beta = const(f"{name}.b", np.zeros(width), np.float32)
        return node("LayerNormalization", [x, gamma, beta], f"{name}.out", axis=-1, epsilon=1e-5)

    def linear(x: str, name: str, fan_in: int, fan_out: int) -> str:
        y = node("MatMul", [x, weight(f"{name}.w", (fan_in, fan_out))], f"{name}.mm")
        return node("Add", [y, const(f"{name}.b", np.zeros(fan_out), np.float32)], f"{name}.out")

    # Patch embedding (no bias, as CLIP's conv1) -> [N, 49, width]
    conv = node(
        "Conv",
        ["pixel_values", weight("patch.w", (width, 3, patch, patch))],
        "patch",
        kernel_shape=[patch] * 2,
        strides=[patch] * 2,
    )
    flat = node("Reshape", [conv, const("shape.flat", [0, width, -1])], "patch.flat")
    x = node("Transpose", [flat], "patch.tokens", perm=[0, 2, 1])
    # The class token, expanded to the batch: shape [N, 1, width] from the input's own N.
    batch = node("Slice", [node("Shape", ["pixel_values"], "in.shape"), const("s0", [0]), const("s1", [1])], "in.n")
    cls_shape = node("Concat", [batch, const("one_width", [1, width])], "cls.shape", axis=0)
    cls = node("Expand", [weight("cls", (1, 1, width)), cls_shape], "cls.tokens")
    x = node("Concat", [cls, x], "tokens", axis=1)
    x = node("Add", [x, weight("pos", (tokens, width))], "tokens.pos")
    x = layer_norm(x, "ln_pre")
    split = const("qkv.split", [width] * 3)
    heads_shape = const("shape.heads", [0, 0, heads, head])
    merge_shape = const("shape.merge", [0, 0, width])
    scale = const("attn.scale", 1.0 / math.sqrt(head), np.float32)
    quick_gelu = const("gelu.k", 1.702, np.float32)
    for i in range(blocks):
        b = f"b{i}"
        h = layer_norm(x, f"{b}.ln1")
        qkv = linear(h, f"{b}.qkv", width, 3 * width)
        names = [f"{b}.q", f"{b}.k", f"{b}.v"]
        nodes.append(helper.make_node("Split", [qkv, split], names, axis=2))
        q = node("Transpose", [node("Reshape", [names[0], heads_shape], f"{b}.q4")], f"{b}.qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [names[1], heads_shape], f"{b}.k4")], f"{b}.kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [names[2], heads_shape], f"{b}.v4")], f"{b}.vt", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{b}.qk"), scale], f"{b}.scores")
        probs = node("Softmax", [scores], f"{b}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{b}.ctx4")], f"{b}.ctxt", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"{b}.ctx")
        x = node("Add", [x, linear(ctx, f"{b}.attn_out", width, width)], f"{b}.res1")
        h = layer_norm(x, f"{b}.ln2")
        h = linear(h, f"{b}.fc", width, mlp)
        h = node("Mul", [h, node("Sigmoid", [node("Mul", [h, quick_gelu], f"{b}.gk")], f"{b}.gs")], f"{b}.gelu")
        x = node("Add", [x, linear(h, f"{b}.proj", mlp, width)], f"{b}.res2")
    cls_out = node("Gather", [x, const("zero", 0)], "cls.out", axis=1)  # [N, width]
    cls_out = layer_norm(cls_out, "ln_post")
    node("MatMul", [cls_out, weight("proj", (width, dimension))], "image_embeds")
    graph = helper.make_graph(
        nodes,
        f"vit_b32_shaped_{blocks}_blocks",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["N", dimension])],
        initializer=weights,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="imagetraining-bench"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return int(sum(int(np.prod(t.dims)) for t in weights))


def quantize(source: Path, target: Path) -> str | None:
    """Write the int8 variant (`quantize_dynamic`, int8 weights); None when it worked, else why not."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        from discovery_worker.onnx_trainer import OnnxTrainer

        OnnxTrainer({"IMAGETRAINING_ONNX_MODEL": str(target)}).setup()  # the trainer accepts and loads it
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        root.setLevel(level)
    return None


# ---------------------------------------------------------------- data


def generate(root: Path, distinct: int) -> dict[str, list[str]]:
    """Photo-like JPEGs as case 5 writes them: `distinct` of 12 MP and of 2 MP."""
    from benchmarks.hashing_bench import write

    root.mkdir(parents=True, exist_ok=True)
    return {
        name: [
            write(root / f"{prefix}{i}.jpg", w, h, seed=i + (0 if prefix == "big" else 100)) for i in range(distinct)
        ]
        for name, (prefix, w, h) in SETS.items()
    }


def preprocessed(paths: list[str], model: Path) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The files decoded as the worker decodes them (JPEG draft) and preprocessed by the trainer's own code."""
    from PIL import Image

    from discovery_worker.hashing import DRAFT_SIZE
    from discovery_worker.onnx_trainer import OnnxTrainer

    trainer = OnnxTrainer({"IMAGETRAINING_ONNX_MODEL": str(model)})
    out = []
    for p in paths:
        with Image.open(p) as image:
            image.draft("RGB", (DRAFT_SIZE, DRAFT_SIZE))
            image.load()
            out.append(trainer.preprocess(image))
    return np.stack(out)


def parts(paths: list[str], model: Path, rounds: int = 5) -> dict[str, float]:
    """CPU milliseconds per image of each step the pipeline adds to inference, in this process (medians
    over `rounds` passes of `paths`): what no overlap can remove when every core is inferring."""
    import hashlib
    import io

    import imagehash
    from PIL import Image

    from discovery_worker.hashing import DRAFT_SIZE, HASH_SIZE, process_batch
    from discovery_worker.onnx_trainer import OnnxTrainer

    trainer = OnnxTrainer({"IMAGETRAINING_ONNX_MODEL": str(model)})
    samples: dict[str, list[float]] = {
        k: [] for k in ("read + BLAKE2b", "JPEG draft decode", "dHash", "preprocess", "decode step (process_batch)")
    }
    for _ in range(rounds):
        for p in paths:
            c = time.process_time()
            with open(p, "rb") as f:
                data = f.read()
            hashlib.blake2b(data, digest_size=16).hexdigest()
            samples["read + BLAKE2b"].append(time.process_time() - c)
            c = time.process_time()
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (DRAFT_SIZE, DRAFT_SIZE))
            image.load()
            samples["JPEG draft decode"].append(time.process_time() - c)
            c = time.process_time()
            imagehash.dhash(image, hash_size=HASH_SIZE)
            samples["dHash"].append(time.process_time() - c)
            c = time.process_time()
            trainer.preprocess(image)
            samples["preprocess"].append(time.process_time() - c)
            c = time.process_time()
            process_batch([p], max_file_bytes=MAX_FILE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS)
            samples["decode step (process_batch)"].append(time.process_time() - c)
    return {k: round(median(v) * 1000, 2) for k, v in samples.items()}


# ---------------------------------------------------------------- measurements (in a subprocess per model)


def _ort_worker(
    model: str, tensors: str, work: list[tuple[int, int]], repeats: int, barrier: Any, results: Any
) -> None:
    """onnxruntime alone in one process: for each (batch, images), `repeats` timed passes, each after a barrier."""
    from discovery_worker.onnx_trainer import OnnxTrainer
    from discovery_worker.pool import PROCESS_NICENESS

    os.nice(PROCESS_NICENESS)  # as the pool's processes
    trainer = OnnxTrainer({"IMAGETRAINING_ONNX_MODEL": model})
    trainer.setup()  # the trainer's session: its threads and options
    session, shape = trainer._session, trainer.shape
    data = np.load(tensors)
    for batch, count in work:
        chunks = [np.ascontiguousarray(data[np.arange(i, i + batch) % len(data)]) for i in range(0, count, batch)]
        session.run([shape.output_name], {shape.input_name: chunks[0]})  # warm this batch shape
        for r in range(repeats):
            barrier.wait()
            started, cpu = time.perf_counter(), time.process_time()
            for chunk in chunks:
                session.run([shape.output_name], {shape.input_name: chunk})
            results.put((batch, r, time.perf_counter() - started, time.process_time() - cpu))


def ort_alone(
    model: str, tensors: str, processes: int, plan: Plan, batches: tuple[int, ...]
) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """(images/s, CPU ms per image) of onnxruntime alone in `processes` processes at once, per batch size."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    work = [(b, images_for(plan, b, processes) // processes) for b in batches]
    procs = [
        ctx.Process(target=_ort_worker, args=(model, tensors, work, plan.repeats, barrier, results))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        times: dict[tuple[int, int], list[float]] = {}
        cpus: dict[tuple[int, int], list[float]] = {}
        for _ in range(processes * len(work) * plan.repeats):
            batch, r, seconds, cpu = results.get(timeout=900)
            times.setdefault((batch, r), []).append(seconds)
            cpus.setdefault((batch, r), []).append(cpu)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    rates = {b: [images_for(plan, b, processes) / max(times[(b, r)]) for r in range(plan.repeats)] for b in batches}
    cpu_ms = {
        b: [1000 * sum(cpus[(b, r)]) / images_for(plan, b, processes) for r in range(plan.repeats)] for b in batches
    }
    return rates, cpu_ms


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (/proc; 0 where unreadable)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


async def pipeline(
    size: int, batch: int, sets: dict[str, list[str]], plan: Plan
) -> tuple[float, dict[str, list[float]], dict[str, list[float]]]:
    """(pool start seconds, images/s, CPU ms per image) per set per repeat of a TrainingPool with the ONNX trainer.

    The CPU is the pool processes' (from /proc) plus this process's (the pool's parent).
    """
    from discovery_worker.pool import TrainingPool

    pool = TrainingPool(
        size, trainer_spec=TRAINER, batch_size=batch, max_file_bytes=MAX_FILE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS
    )
    started = time.perf_counter()
    await pool.start()
    startup = time.perf_counter() - started
    out: dict[str, list[float]] = {}
    cpu_ms: dict[str, list[float]] = {}
    executor: Any = getattr(pool._gen, "executor", None)
    pids = list(getattr(executor, "_processes", None) or {})
    try:
        count = images_for(plan, batch, size)
        for name, paths in sets.items():
            items = [(i, paths[i % len(paths)]) for i in range(count)]
            await pool.process(items[: batch * size])  # warm: every process, this batch shape
            out[name], cpu_ms[name] = [], []
            for _ in range(plan.repeats):
                t0, cpu0 = time.perf_counter(), _cpu_seconds(pids) + time.process_time()
                results = await pool.process(items)
                out[name].append(count / (time.perf_counter() - t0))
                cpu_ms[name].append(1000 * (_cpu_seconds(pids) + time.process_time() - cpu0) / count)
                bad = [r for _i, r in results if not r.ok or r.embedding is None]
                if bad:
                    raise RuntimeError(f"the pipeline failed {len(bad)} of {count} images: {bad[0]}")
    finally:
        await pool.close()
    return startup, out, cpu_ms


async def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One model: for each pool size, ORT alone in that many processes, then the pools at each batch size."""
    plan = Plan.of(spec["plan"])
    batches = tuple(spec["batches"])
    sets: dict[str, list[str]] = spec["sets"]
    out: dict[str, Any] = {"ort": {}, "pipeline": {}, "startup": {}, "ort_cpu_ms": {}, "pipeline_cpu_ms": {}}
    for size in plan.pools:
        log(f"case 10 ({spec['label']}): onnxruntime alone, {size} process(es), batches {list(batches)}")
        ort, ort_cpu = await asyncio.to_thread(ort_alone, spec["model"], spec["tensors"], size, plan, batches)
        out["ort"][str(size)] = {str(b): v for b, v in ort.items()}
        out["ort_cpu_ms"][str(size)] = {str(b): v for b, v in ort_cpu.items()}
        for batch in batches:
            log(f"case 10 ({spec['label']}): pool of {size}, batch {batch}")
            startup, rates, cpu_ms = await pipeline(size, batch, sets, plan)
            out["pipeline"][f"{size}/{batch}"] = rates
            out["pipeline_cpu_ms"][f"{size}/{batch}"] = cpu_ms
            out["startup"][f"{size}/{batch}"] = round(startup, 2)
    return out


# ---------------------------------------------------------------- the case


def _variant_rows(label: str, result: dict[str, Any], plan: Plan, batches: tuple[int, ...], full: bool) -> list[Row]:
    rows: list[Row] = []
    for size in plan.pools:
        procs = "1 process" if size == 1 else f"{size} processes at once"
        for batch in batches:
            ort = result["ort"][str(size)][str(batch)]
            base = median(ort)
            rows.append(Row(CASE, f"{label}: ORT alone, {procs}, batch {batch}", base, "img/s", ort))
            for name, rates in result["pipeline"][f"{size}/{batch}"].items():
                value = median(rates)
                ratio = value / base
                count = images_for(plan, batch, size)
                rows.append(
                    Row(
                        CASE,
                        f"{label}: {name} ({count} images), pool of {size}, batch {batch}",
                        value,
                        "img/s",
                        rates,
                        baseline=f"ORT alone, {size} proc.",
                        baseline_value=base,
                        ratio=ratio,
                        ratio_kind="faster",
                        aim=f"<= {AIM_RATIO:.2f}x ORT's time" if full else "",
                        met=(1 / ratio <= AIM_RATIO) if full else None,
                    )
                )
                # The same cost in CPU time, which another load on the machine does not change.
                cpu = result["pipeline_cpu_ms"][f"{size}/{batch}"][name]
                cpu_base = median(result["ort_cpu_ms"][str(size)][str(batch)])
                rows.append(
                    Row(
                        CASE,
                        f"{label}: {name}, pool of {size}, batch {batch}: CPU per image",
                        median(cpu),
                        "ms",
                        cpu,
                        baseline="ORT alone",
                        baseline_value=cpu_base,
                        ratio=median(cpu) / cpu_base,
                        aim=f"<= {AIM_RATIO:.2f}x ORT's CPU" if full else "",
                        met=(median(cpu) / cpu_base <= AIM_RATIO) if full else None,
                    )
                )
    return rows


def _parts_rows(raw: dict[str, Any], label: str, plan: Plan) -> list[Row]:
    """Each set's steps outside inference, and the best CPU ratio a pipeline can reach with them: ORT's
    own CPU per image (1 process, batch 1) plus these steps, over ORT's."""
    ort_cpu = median(raw[label]["ort_cpu_ms"][str(plan.pools[0])][str(plan.batches[0])])
    rows: list[Row] = []
    for name, part in raw["parts_ms"].items():
        own = sum(v for k, v in part.items() if k != "decode step (process_batch)")
        steps = ", ".join(f"{k} {v:.1f}" for k, v in part.items())
        rows.append(
            Row(
                CASE,
                f"{label}: {name}: the pipeline's own steps per image (CPU)",
                own,
                "ms",
                baseline="ORT alone CPU, 1 proc., batch 1",
                baseline_value=ort_cpu,
                ratio=(ort_cpu + own) / ort_cpu,
                note=f"{name} ms per image: {steps}; ratio: (ORT + steps) / ORT, the floor of the CPU ratio",
            )
        )
    return rows


async def run_case(quick: bool, repeats: int | None, scratch: Path) -> tuple[list[Row], dict[str, Any]]:
    """Case 10 for the suite: the rows and the raw figures (see the module doc)."""
    plan = QUICK if quick else FULL
    if repeats is not None:
        plan = replace(plan, repeats=max(1, repeats))
    root = scratch / "onnx-bench"
    root.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {"plan": asdict(plan)}
    t0 = time.perf_counter()
    sets = await asyncio.to_thread(generate, root / "images", plan.distinct)
    raw["generate_seconds"] = round(time.perf_counter() - t0, 1)
    fp32 = root / "vit-b32-shaped.onnx"
    t0 = time.perf_counter()
    params = await asyncio.to_thread(build_vit, fp32, blocks=plan.blocks)
    raw["model"] = {"blocks": plan.blocks, "parameters": params, "bytes": fp32.stat().st_size}
    raw["build_seconds"] = round(time.perf_counter() - t0, 1)
    int8 = root / "vit-b32-shaped-int8.onnx"
    t0 = time.perf_counter()
    why_not = await asyncio.to_thread(quantize, fp32, int8)
    raw["int8"] = {"seconds": round(time.perf_counter() - t0, 1), "error": why_not}
    if why_not is None:
        raw["int8"]["bytes"] = int8.stat().st_size
    log(
        f"case 10: ViT-B/32-shaped model, {plan.blocks} blocks, {params / 1e6:.1f}M parameters, "
        f"built in {raw['build_seconds']}s; int8: {why_not or 'made in ' + str(raw['int8']['seconds']) + 's'}"
    )
    shape = "ViT-B/32" if plan.blocks == 12 else f"ViT-B/32 shape, {plan.blocks} of 12 blocks (quick)"
    variants = [(f"{shape} fp32", fp32, plan.batches)]
    if why_not is None:
        variants.append((f"{shape} int8", int8, plan.int8_batches))
    rows: list[Row] = []
    raw["parts_ms"] = {name: await asyncio.to_thread(parts, paths, fp32) for name, paths in sets.items()}
    ort_medians: dict[str, dict[tuple[int, int], float]] = {}
    for label, model, batches in variants:
        tensors = root / f"{model.stem}.npy"
        np.save(tensors, await asyncio.to_thread(preprocessed, [p for ps in sets.values() for p in ps], model))
        spec_path = root / f"{model.stem}.spec.json"
        out_path = root / f"{model.stem}.out.json"
        spec = {
            "label": label,
            "model": str(model),
            "tensors": str(tensors),
            "plan": asdict(plan),
            "batches": list(batches),
            "sets": sets,
            "out": str(out_path),
        }
        spec_path.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETRAINING_ONNX_")}
        env.update(IMAGETRAINING_ONNX_MODEL=str(model), IMAGETRAINING_ONNX_THREADS="1", PYTHONPATH=str(ROOT))
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.onnx_bench", "--measure", str(spec_path), env=env, cwd=str(ROOT)
        )
        if await child.wait() != 0:
            raise RuntimeError(f"case 10: measuring {label} failed (exit status {child.returncode})")
        result = json.loads(out_path.read_text())
        raw[label] = result
        rows += _variant_rows(label, result, plan, batches, full=plan.blocks == 12)
        ort_medians[label] = {(int(s), int(b)): median(v) for s, per in result["ort"].items() for b, v in per.items()}
    rows += _parts_rows(raw, variants[0][0], plan)
    if why_not is None:
        (_fp_label, fp), (q_label, q) = ort_medians.items()
        for key, value in q.items():
            if key in fp:
                size, batch = key
                rows.append(
                    Row(
                        CASE,
                        f"{q_label} vs fp32: ORT alone, {size} proc., batch {batch}",
                        value,
                        "img/s",
                        baseline="fp32",
                        baseline_value=fp[key],
                        ratio=value / fp[key],
                        ratio_kind="faster",
                    )
                )
    else:
        rows.append(Row(CASE, f"{shape} int8: not measured", float("nan"), "", note=f"quantize_dynamic: {why_not}"))
    if rows:
        rows[0].note = (
            "ORT alone for a pool of 2 is two processes at once (a barrier starts them; all images over the "
            f"slower one's time); {plan.distinct} distinct files per set, each listed several times; "
            "CPU per image: the pool's processes and their parent, against the ORT processes'"
        )
    return rows, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 transformer blocks, fewer sizes (under 2 minutes)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the per-model subprocess
    args = parser.parse_args()
    if args.measure is not None:
        spec = json.loads(args.measure.read_text())
        Path(spec["out"]).write_text(json.dumps(asyncio.run(measure(spec))))
        return
    from benchmarks.harness import table

    with scratch_dir() as scratch:
        rows, _raw = asyncio.run(run_case(args.quick, args.repeats, scratch))
    print(table(rows))


if __name__ == "__main__":
    main()

"""Case 5, training throughput: the seed's naive hashing against draft decoding and the pool.

    .venv/bin/python benchmarks/hashing_bench.py [--repeats 3] [--n12 4] [--n2 8]
    .venv/bin/python -m benchmarks --cases 5        (the same, as a case of the suite: `run_case`)

Generates photo-like 12 MP and 2 MP JPEGs plus 2 MP PNG and WebP files in a temporary directory and
prints images/s (median over the repeats) for:

  naive        imagehash.dhash(Image.open(p)) in this process: the seed's way (full decode)
  process      discovery_worker.hashing.process_image in this process (JPEG draft decode, limits,
               format checks, DefaultTrainer features)
  pool1/pool2  TrainingPool of 1 and 2 processes (same work plus the inter-process round trip);
               the time to start the pool is excluded and printed separately

Ratios are against naive. The pool numbers depend on how many cores are free: on a shared machine
pool2 can fall short of 2x pool1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import imagehash
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Row, median, photo_image  # noqa: E402
from discovery_worker.hashing import process_image  # noqa: E402
from discovery_worker.pool import TrainingPool  # noqa: E402
from discovery_worker.trainer import DefaultTrainer  # noqa: E402

LIMITS = {"max_file_bytes": 200 * 1024 * 1024, "max_image_pixels": 100_000_000}
TRAINER = "discovery_worker.trainer:DefaultTrainer"


def write(path: Path, width: int, height: int, seed: int) -> str:
    """A photo-like image; JPEG like a camera writes it (4:2:0), PNG fast-compressed, WebP lossy."""
    image = photo_image(width, height, seed)
    if path.suffix == ".jpg":
        image.save(path, format="JPEG", quality=90)
    elif path.suffix == ".png":
        image.save(path, format="PNG", compress_level=1)
    else:
        image.save(path, format="WEBP", quality=80, method=0)
    return str(path)


def generate(root: Path, n12: int, n2: int) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {
        "JPEG 12MP": [write(root / f"big{i}.jpg", 4000, 3000, seed=i) for i in range(n12)],
        "JPEG 2MP": [write(root / f"mid{i}.jpg", 1600, 1200, seed=100 + i) for i in range(n2)],
        "PNG 2MP": [write(root / f"p{i}.png", 1600, 1200, seed=200 + i) for i in range(max(1, n2 // 2))],
        "WebP 2MP": [write(root / f"w{i}.webp", 1600, 1200, seed=300 + i) for i in range(max(1, n2 // 2))],
    }
    sets["all"] = [p for paths in list(sets.values()) for p in paths]
    return sets


def naive(paths: list[str]) -> None:
    for p in paths:
        imagehash.dhash(Image.open(p))


def in_process(paths: list[str]) -> None:
    trainer = DefaultTrainer()
    for p in paths:
        result = process_image(p, trainer=trainer, **LIMITS)
        assert result.ok, (p, result)


def rates(run: Callable[[list[str]], object], paths: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(paths)
        out.append(len(paths) / (time.perf_counter() - start))
    return out


def median_rate(run: Callable[[list[str]], object], paths: list[str], repeats: int) -> float:
    return statistics.median(rates(run, paths, repeats))


async def pool_samples(size: int, sets: dict[str, list[str]], repeats: int) -> tuple[float, dict[str, list[float]]]:
    pool = TrainingPool(size, trainer_spec=TRAINER, **LIMITS)
    start = time.perf_counter()
    await pool.start()
    startup = time.perf_counter() - start
    samples: dict[str, list[float]] = {}
    try:
        await pool.process(list(enumerate(paths[0] for paths in sets.values())))  # warm every process
        for name, paths in sets.items():
            items = list(enumerate(paths))
            samples[name] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                results = await pool.process(items)
                samples[name].append(len(paths) / (time.perf_counter() - t0))
                if not all(r.ok for _, r in results):
                    raise RuntimeError(f"pool could not process {name}: {results}")
    finally:
        await pool.close()
    return startup, samples


async def pool_rates(size: int, sets: dict[str, list[str]], repeats: int) -> tuple[float, dict[str, float]]:
    startup, samples = await pool_samples(size, sets, repeats)
    return startup, {k: statistics.median(v) for k, v in samples.items()}


async def run_case(n12: int, n2: int, repeats: int, scratch: Path) -> list[Row]:
    """Case 5 for the suite: images/s of the seed's naive dhash, the worker's step in-process, pools of 1 and 2."""
    root = scratch / "training-set"
    root.mkdir(parents=True, exist_ok=True)
    sets = await asyncio.to_thread(generate, root, n12, n2)
    for paths in sets.values():  # warm the page cache and the imports
        naive(paths[:1])
        in_process(paths[:1])
    rows: list[Row] = []
    pools = {}
    for size in (1, 2):
        _startup, pools[size] = await pool_samples(size, {k: v for k, v in sets.items() if k != "all"}, repeats)
    for name, paths in sets.items():
        if name == "all":
            continue
        base = rates(naive, paths, repeats)
        proc = rates(in_process, paths, repeats)
        b = median(base)
        label = f"{name} ({len(paths)} files)"
        rows.append(Row("5 Training", f"{label}: seed's dhash(Image.open), 1 process", b, "img/s", base))
        rows.append(
            Row(
                "5 Training",
                f"{label}: worker's step, 1 process",
                median(proc),
                "img/s",
                proc,
                baseline="seed's dhash",
                baseline_value=b,
                ratio=median(proc) / b,
                ratio_kind="faster",
            )
        )
        p1, p2 = median(pools[1][name]), median(pools[2][name])
        rows.append(
            Row(
                "5 Training",
                f"{label}: pool of 1",
                p1,
                "img/s",
                pools[1][name],
                baseline="seed's dhash",
                baseline_value=b,
                ratio=p1 / b,
                ratio_kind="faster",
            )
        )
        aim = "12MP" in name
        rows.append(
            Row(
                "5 Training",
                f"{label}: pool of 2",
                p2,
                "img/s",
                pools[2][name],
                baseline="seed's dhash",
                baseline_value=b,
                ratio=p2 / b,
                ratio_kind="faster",
                aim=">= 8x seed" if aim else "",
                met=(p2 / b >= 8) if aim else None,
            )
        )
        rows.append(
            Row(
                "5 Training",
                f"{label}: scaling pool 1 -> 2",
                p2 / p1,
                "x",
                [a / c for a, c in zip(pools[2][name], pools[1][name], strict=True)],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n12", type=int, default=4, help="number of 12 MP JPEGs")
    parser.add_argument("--n2", type=int, default=8, help="number of 2 MP JPEGs (half as many PNG and WebP)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hashing-bench-") as tmp:
        t0 = time.perf_counter()
        sets = generate(Path(tmp), args.n12, args.n2)
        print(f"generated {len(sets['all'])} images in {time.perf_counter() - t0:.1f}s; cpus: {os.cpu_count()}")
        for paths in sets.values():  # warm the page cache and the imports
            naive(paths[:1])
            in_process(paths[:1])

        rows: dict[str, dict[str, float]] = {}
        for name, paths in sets.items():
            rows[name] = {
                "naive": median_rate(naive, paths, args.repeats),
                "process": median_rate(in_process, paths, args.repeats),
            }
        startups = {}
        for size in (1, 2):
            startups[size], rates = asyncio.run(pool_rates(size, sets, args.repeats))
            for name, rate in rates.items():
                rows[name][f"pool{size}"] = rate

    columns = ("naive", "process", "pool1", "pool2")
    print(f"\nimages/s, median of {args.repeats} (ratio vs naive)")
    print(f"{'set':<10} {'n':>3} " + " ".join(f"{c:>15}" for c in columns))
    for name, rates in rows.items():
        base = rates["naive"]
        cells = [f"{base:>7.1f}        "]
        cells += [f"{rates[c]:>7.1f} ({rates[c] / base:>4.1f}x)" for c in columns[1:]]
        print(f"{name:<10} {len(sets[name]):>3} " + " ".join(f"{c:>15}" for c in cells))
    started = ", ".join(f"size {k}: {v:.2f}s" for k, v in startups.items())
    print(f"\npool start (processes + trainer, excluded above): {started}")


if __name__ == "__main__":
    main()

"""Micro-benchmark of the training step: the seed's naive hashing against draft decoding and the pool.

    .venv/bin/python benchmarks/hashing_bench.py [--repeats 3] [--n12 4] [--n2 8]

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

from discovery_worker.hashing import process_image  # noqa: E402
from discovery_worker.pool import TrainingPool  # noqa: E402
from discovery_worker.trainer import DefaultTrainer  # noqa: E402
from tests import images  # noqa: E402

LIMITS = {"max_file_bytes": 200 * 1024 * 1024, "max_image_pixels": 100_000_000}
TRAINER = "discovery_worker.trainer:DefaultTrainer"


def generate(root: Path, n12: int, n2: int) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {
        "JPEG 12MP": [str(images.write_jpeg(root / f"big{i}.jpg", 4000, 3000, seed=i)) for i in range(n12)],
        "JPEG 2MP": [str(images.write_jpeg(root / f"mid{i}.jpg", 1600, 1200, seed=100 + i)) for i in range(n2)],
        "PNG 2MP": [str(images.write_png(root / f"p{i}.png", 1600, 1200, seed=200 + i)) for i in range(n2 // 2)],
        "WebP 2MP": [str(images.write_webp(root / f"w{i}.webp", 1600, 1200, seed=300 + i)) for i in range(n2 // 2)],
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


def median_rate(run: Callable[[list[str]], object], paths: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(paths)
        times.append(time.perf_counter() - start)
    return len(paths) / statistics.median(times)


async def pool_rates(size: int, sets: dict[str, list[str]], repeats: int) -> tuple[float, dict[str, float]]:
    pool = TrainingPool(size, trainer_spec=TRAINER, **LIMITS)
    start = time.perf_counter()
    await pool.start()
    startup = time.perf_counter() - start
    rates: dict[str, float] = {}
    try:
        for name, paths in sets.items():
            items = list(enumerate(paths))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                results = await pool.process(items)
                times.append(time.perf_counter() - t0)
                assert all(r.ok for _, r in results)
            rates[name] = len(paths) / statistics.median(times)
    finally:
        await pool.close()
    return startup, rates


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

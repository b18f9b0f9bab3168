"""`python -m benchmarks` (`make bench`, `make bench-quick`): the performance cases of issue #5.

Generates its own data (tiny JPEGs in /dev/shm when writable, photo-like 12 MP and 2 MP images for
training), starts the real services as processes on a fresh database, runs every case several
times, prints a table of medians with ratios against baselines measured in the same run, and writes
every figure (with the per-repeat samples and the machine) as JSON. Nothing is asserted.

    python -m benchmarks                     # the full run (100,000 files, 3 repeats; under 30 minutes)
    python -m benchmarks --quick             # the smoke run (10,000 files, 2 repeats; under 2 minutes)
    python -m benchmarks --cases 1,3 --repeat 5 --json /tmp/out.json --database-url postgresql://...

Cases: 1 StartSession latency, 2 GetSession under load, 3 discovery throughput, 4 rescan,
5 training throughput, 6 progress delivery, 7 end to end, 8 one session over many workers, 9 similarity
search (benchmarks/search_bench.py: a second database on an embedded pgserver, for pgvector), 10
the ONNX embedding trainer (benchmarks/onnx_bench.py: a ViT-B/32-shaped model built at run time,
--quick with 2 of its 12 blocks; no database, no service). The
database: --database-url, else DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/postgres when
reachable, else the embedded pgserver; a database `imagetraining_bench_<pid>` is created on it and
dropped at the end (case 8 makes a second one, in turn, for its own workers).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases as c  # noqa: E402
from benchmarks import harness as h  # noqa: E402
from benchmarks import hashing_bench, many_workers, onnx_bench, search_bench  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and 2 repeats (CI smoke run)")
    parser.add_argument("--cases", default="1,2,3,4,5,6,7,8,9,10", help="comma-separated case numbers (default: all)")
    parser.add_argument("--repeat", type=int, default=None, help="repeats per case (default 2 quick, 3 full)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures ({DEFAULT_JSON})")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server to create the benchmark database on")
    parser.add_argument("--files", type=int, default=None, help="override the big library's size")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    selected = {int(x) for x in args.cases.split(",") if x.strip()}
    sizes = c.QUICK if args.quick else c.FULL
    if args.repeat is not None:
        sizes = dataclasses.replace(sizes, repeats=max(1, args.repeat))
    if args.files is not None:
        sizes = dataclasses.replace(sizes, big_files=args.files, big_folders=max(1, args.files // 50))
    mode = "quick" if args.quick else "full"
    info = h.machine()
    rows: list[h.Row] = []
    raw: dict[str, object] = {}
    with h.scratch_dir() as scratch:
        server, source = await h.admin_url(args.database_url, scratch)
        info["postgresql"] = await h.server_version(server)
        info["database"] = source
        h.log(
            f"{mode} run: cases {sorted(selected)}, {sizes.repeats} repeats; {info['usable_cores']} cores, "
            f"{info['memory_gib']} GiB; PostgreSQL {info['postgresql']} ({source}); data in {scratch}"
        )
        service_cases = selected & {1, 2, 3, 4, 6, 7, 8}
        if service_cases:
            t0 = time.perf_counter()
            blobs = h.tiny_jpegs()
            big = h.make_library(scratch / "big", sizes.big_files, sizes.big_folders, blobs)
            small = h.make_library(scratch / "small", sizes.small_files, 2, blobs)
            watch = h.make_library(scratch / "watch", sizes.watch_files, max(1, sizes.watch_files // 50), blobs)
            h.log(f"generated {big.files + small.files + watch.files:,} files in {time.perf_counter() - t0:.1f}s")
            async with h.fresh_database(server) as db:
                cluster = h.Cluster(
                    db.url, [big.root, small.root, watch.root], scratch, worker_env={"IMAGETRAINING_POOL_SIZE": "0"}
                )
                ctx = c.Context(
                    sizes=sizes, url=db.url, scratch=scratch, big=big, small=small, watch=watch, cluster=cluster
                )
                try:
                    await c.run(ctx, service_cases)
                finally:
                    rows += ctx.rows
                    raw.update(ctx.raw)
        if 5 in selected:
            h.log("case 5: training throughput")
            n12, n2 = (2, 4) if args.quick else (6, 12)
            rows += await hashing_bench.run_case(n12, n2, sizes.repeats, scratch)
        if 8 in selected:
            h.log("case 8: one session over many workers (12 MP JPEGs, pools of 1)")
            case8, raw["case8"] = await many_workers.run_case(
                40 if args.quick else 200,
                sizes.repeats,
                scratch,
                server,
                timeout=sizes.e2e_timeout,
                synthetic_jobs=2_000 if args.quick else 20_000,
            )
            # Its main figures first, then the end-to-end rows the service cases added.
            rows = (
                [r for r in rows if not r.case.startswith("8 ")] + case8 + [r for r in rows if r.case.startswith("8 ")]
            )
        if 9 in selected:
            vectors, queries = (5_000, 20) if args.quick else (100_000, 200)
            h.log(f"case 9: similarity search over {vectors:,} vectors of {search_bench.DIMENSION}, {queries} queries")
            case9, raw["case9"] = await search_bench.run_case(
                vectors, queries, sizes.repeats, server, scratch, budget=20 if args.quick else 60
            )
            rows += case9
        if 10 in selected:
            h.log("case 10: ONNX embedding trainer (ViT-B/32-shaped model built now): pipeline vs onnxruntime alone")
            case10, raw["case10"] = await onnx_bench.run_case(args.quick, args.repeat, scratch)
            rows += case10
    rows.sort(key=lambda r: int(r.case.split()[0]))  # numerically: 10 after 9
    elapsed = time.perf_counter() - started
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    print()
    print(f"## {mode} run: medians of {sizes.repeats} repeats; ratios against baselines measured in the same run")
    print()
    print(h.table(rows))
    print()
    print(
        f"machine: {info['usable_cores']} cores ({info['cpu']}), {info['memory_gib']} GiB; Python {info['python']}, "
        f"PostgreSQL {info['postgresql']}, grpcio {info['grpcio']}; `{command}` took {elapsed:.0f}s"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "mode": mode,
        "command": command,
        "cases": sorted(selected),
        "repeats": sizes.repeats,
        "sizes": dataclasses.asdict(sizes),
        "seconds": round(elapsed, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "rows": [r.as_json() for r in rows],
        "raw": raw,
    }
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))

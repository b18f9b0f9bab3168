"""Where one discovery batch spends its time: the statements of `recorder.write_batch`, timed apart.

    python benchmarks/profile_discovery_batch.py [--url postgresql://...] [--no-fk]

Creates (and drops) a scratch database `imagetraining_profile`, writes 25 batches of 2,000 new paths
for one session as the worker does (assets, jobs, counters), then the same 50,000 paths again as a
rescan of unchanged files, and prints seconds per step and paths/s for both. `--no-fk` runs the same
with foreign-key triggers off (`session_replication_role = replica`), to show what the per-row FK
checks of `training_jobs` cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import asyncpg
from sqlalchemy import text

from discovery_worker import recorder
from imagetraining import transitions
from imagetraining.db.engine import Database, with_database
from imagetraining.db.migrate import upgrade
from imagetraining.walk import FoundFile

BATCHES = 25
BATCH = 2000


async def main(url: str, no_fk: bool) -> None:
    admin = await asyncpg.connect(url)
    await admin.execute("DROP DATABASE IF EXISTS imagetraining_profile")
    await admin.execute("CREATE DATABASE imagetraining_profile")
    db = Database.connect(with_database(url, "imagetraining_profile"))
    try:
        await upgrade(db.engine)
        async with db.engine.begin() as conn:
            sid = (
                await conn.execute(
                    text(
                        "INSERT INTO training_sessions (display_name, root_path, state, config)"
                        " VALUES ('profile', '/x', 'discovering', '{}') RETURNING id"
                    )
                )
            ).scalar_one()
            sub = (
                await conn.execute(
                    text(
                        "INSERT INTO session_subdirectories (session_id, path, selected)"
                        " VALUES (:s, '/x/a', true) RETURNING id"
                    ),
                    {"s": sid},
                )
            ).scalar_one()
        for label in ("discovery (new paths)", "rescan (unchanged paths)"):
            spent = {"assets and jobs": 0.0, "counters": 0.0, "commit": 0.0}
            started = time.perf_counter()
            for b in range(BATCHES):
                files = [FoundFile(f"/x/a/d{b:03d}/f{i:05d}.jpg", 1000, 1, sub) for i in range(BATCH)]
                async with db.engine.begin() as conn:
                    if no_fk:
                        await conn.execute(text("SET LOCAL session_replication_role = replica"))
                    t0 = time.perf_counter()
                    await recorder._record(conn, sid, files)
                    t1 = t2 = time.perf_counter()
                    await conn.execute(
                        transitions.ADVANCE_DISCOVERY,
                        {
                            "id": sid,
                            "directories_scanned": b,
                            "files_seen": b * BATCH,
                            "images_found": b * BATCH,
                            "unreadable": 0,
                            "current_directory": "",
                            "new": BATCH,
                            "changed": 0,
                            "unchanged": 0,
                            "checkpoint": json.dumps({"images": b * BATCH}),
                        },
                    )
                    t3 = time.perf_counter()
                spent["commit"] += time.perf_counter() - t3
                spent["assets and jobs"] += t1 - t0
                spent["counters"] += t3 - t2
            elapsed = time.perf_counter() - started
            rows_total = BATCHES * BATCH
            print(f"{label}: {rows_total} paths in {BATCHES} batches{' (FK triggers off)' if no_fk else ''}:")
            for name, seconds in spent.items():
                print(f"  {name:15s} {seconds:6.3f} s")
            print(f"  total           {elapsed:6.3f} s = {rows_total / elapsed:,.0f} paths/s")
    finally:
        await db.dispose()
        await admin.execute("DROP DATABASE IF EXISTS imagetraining_profile")
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--no-fk", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.no_fk))

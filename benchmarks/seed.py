"""The seed's way: the blocking "Start Training" the first seed describes, re-implemented only to be measured.

One call does everything before it replies, on the event loop:

    for each selected subdirectory: Path(sub).glob("**/*")       # pathlib walk
        for each image file: SELECT id FROM seed_images WHERE path = $1   # one query per file
                             INSERT ... when missing                      # and one more when new
                             imagehash.dhash(Image.open(path))           # full decode, inline
    reply

It is generous to the seed in one respect: the statements run in one transaction (one commit per call,
not one per file). It has its own table so it never touches the services' rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import imagehash
from PIL import Image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS seed_images (
    id bigserial PRIMARY KEY,
    path text NOT NULL UNIQUE,
    size_bytes bigint NOT NULL,
    dhash text NOT NULL
)
"""


@dataclass
class SeedResult:
    files: int
    inserted: int
    seconds: float


async def start_session(
    conn: asyncpg.Connection, subdirectories: Sequence[str], *, hash_images: bool = True
) -> tuple[int, int]:
    """The seed's StartSession: (images, rows inserted), after walking, querying and hashing all."""
    count = 0
    inserted = 0
    async with conn.transaction():
        for sub in subdirectories:
            for path in Path(sub).glob("**/*"):  # noqa: ASYNC240 - blocking on the loop is the seed's design
                if path.suffix.lower() not in EXTENSIONS or not path.is_file():
                    continue
                key = str(path)
                row = await conn.fetchrow("SELECT id FROM seed_images WHERE path = $1", key)
                digest = str(imagehash.dhash(Image.open(path))) if hash_images else ""
                if row is None:
                    await conn.execute(
                        "INSERT INTO seed_images (path, size_bytes, dhash) VALUES ($1, $2, $3)",
                        key,
                        path.stat().st_size,
                        digest,
                    )
                    inserted += 1
                count += 1
    return count, inserted


async def measure(url: str, subdirectories: Sequence[str], *, fresh: bool, hash_images: bool = True) -> SeedResult:
    """One seed StartSession over the subdirectories; `fresh` empties its table first (first start)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SCHEMA)
        if fresh:
            await conn.execute("TRUNCATE seed_images")
        start = time.perf_counter()
        files, inserted = await start_session(conn, subdirectories, hash_images=hash_images)
        seconds = time.perf_counter() - start
    finally:
        await conn.close()
    return SeedResult(files=files, inserted=inserted, seconds=seconds)

"""What a claimed session's discovery walks: its selected subdirectories and walk configuration.

Read once per claim (`load_plan`) by discovery and by training (which needs the nested selected
directories for its per-subdirectory counts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from discovery_worker.claims import RunContext
from discovery_worker.library import Anchor
from imagetraining.duplicates import NEAR_DUPLICATE_DISTANCE_DEFAULT, NEAR_DUPLICATE_DISTANCE_MAX
from imagetraining.formats import describe, normalize_extensions
from imagetraining.paths import is_within


@dataclass(slots=True)
class Plan:
    """What to walk: selected subdirectories (id, path) and the session's walk configuration."""

    subdirectories: list[tuple[int, str]]
    extensions: tuple[str, ...]
    recursive: bool
    batch_size: int
    # directory path -> digest this session recorded (`fingerprint`); equal on a rescan: skipped.
    fingerprints: dict[str, str] = field(default_factory=dict)
    # The run's library anchors recorded so far (library_anchors), and whether this is a new run
    # (no checkpoint yet: anchors of an earlier run are replaced).
    anchors: list[Anchor] = field(default_factory=list)
    fresh: bool = True
    near_duplicate_distance: int = NEAR_DUPLICATE_DISTANCE_DEFAULT
    skip_near_duplicates: bool = False


async def load_plan(ctx: RunContext) -> Plan:
    async with ctx.db.engine.connect() as conn:
        head = (
            await conn.execute(
                text("SELECT config, discovery_checkpoint IS NULL AS fresh FROM training_sessions WHERE id = :id"),
                {"id": ctx.claim.session_id},
            )
        ).one()
        config = head.config
        rows = (
            await conn.execute(
                text(
                    """
                    SELECT id, path FROM session_subdirectories
                     WHERE session_id = :id AND selected
                     ORDER BY path
                    """
                ),
                {"id": ctx.claim.session_id},
            )
        ).all()
        fingerprints = {
            str(r.path): str(r.digest)
            for r in await conn.execute(
                text("SELECT path, digest FROM directory_fingerprints WHERE session_id = :id"),
                {"id": ctx.claim.session_id},
            )
        }
        anchors = [
            Anchor(str(r.path), int(r.inode), int(r.device))
            for r in await conn.execute(
                text("SELECT path, inode, device FROM library_anchors WHERE session_id = :id"),
                {"id": ctx.claim.session_id},
            )
        ]
    config = dict(config or {})
    try:
        extensions = normalize_extensions(config.get("extensions") or ())
    except ValueError:
        extensions = normalize_extensions(())
    batch_size = int(config.get("batch_size") or 0) or ctx.batch_size
    return Plan(
        subdirectories=[(int(r.id), str(r.path)) for r in rows],
        extensions=extensions,
        recursive=bool(config.get("recursive", True)),
        batch_size=max(1, batch_size),
        fingerprints=fingerprints,
        anchors=anchors,
        fresh=bool(head.fresh),
        near_duplicate_distance=min(
            max(int(config.get("near_duplicate_distance", NEAR_DUPLICATE_DISTANCE_DEFAULT)), 0),
            NEAR_DUPLICATE_DISTANCE_MAX,
        ),
        skip_near_duplicates=bool(config.get("skip_near_duplicates", False)),
    )


def tops_within_roots(plan: Plan, roots: Sequence[Any]) -> list[str]:
    """The selected directories that (still) resolve inside the roots (blocking: realpath)."""
    return [path for _sid, path in plan.subdirectories if is_within(os.path.realpath(path), roots)]


def nested_ids(subdirectories: list[tuple[int, str]]) -> list[int]:
    """Selected directories that lie inside another selected directory."""
    prefixes = [p.rstrip("/") + "/" for _i, p in subdirectories]
    return [sid for sid, path in subdirectories if any(path.startswith(q) and path + "/" != q for q in prefixes)]


def no_images_reason(plan: Plan) -> str:
    searched = ", ".join(p for _i, p in plan.subdirectories) or "(no subdirectory selected)"
    return (
        "Selected subdirectories contain no image files. "
        f"Supported formats: {describe(plan.extensions)}. Searched: {searched}"
    )

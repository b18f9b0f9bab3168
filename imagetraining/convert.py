"""Database rows -> protobuf messages, in one place for the control service and the workers.

Rows are plain mappings (`Row._mapping` of a `text()` query, or a dict in tests), so the SQL stays
readable and these functions stay pure. The progress arithmetic lives here because every client
relies on the same rules: the percentage is absent (not 0) until the total is final, and nothing
is ever NaN or a division by zero.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from imagetraining.duplicates import NEAR_DUPLICATE_DISTANCE_DEFAULT
from imagetraining.formats import DEFAULT_EXTENSIONS
from imagetraining.names import job_name, session_name
from imagetraining.states import ACTIVE_STATES, TERMINAL_STATES, JobState, SessionState
from imagetraining.v1 import resources_pb2 as pb

Row = Mapping[Any, Any]

SESSION_STATE_TO_PROTO: dict[str, pb.SessionState.ValueType] = {
    SessionState.PENDING: pb.SESSION_STATE_PENDING,
    SessionState.DISCOVERING: pb.SESSION_STATE_DISCOVERING,
    SessionState.RUNNING: pb.SESSION_STATE_RUNNING,
    SessionState.PAUSED: pb.SESSION_STATE_PAUSED,
    SessionState.COMPLETED: pb.SESSION_STATE_COMPLETED,
    SessionState.CANCELLED: pb.SESSION_STATE_CANCELLED,
    SessionState.FAILED: pb.SESSION_STATE_FAILED,
}
SESSION_STATE_FROM_PROTO: dict[int, SessionState] = {v: SessionState(k) for k, v in SESSION_STATE_TO_PROTO.items()}
# states.TERMINAL_STATES and ACTIVE_STATES as protobuf enum values (the relay, the CLI).
TERMINAL_PROTO: frozenset[int] = frozenset(SESSION_STATE_TO_PROTO[s] for s in TERMINAL_STATES)
ACTIVE_PROTO: frozenset[int] = frozenset(SESSION_STATE_TO_PROTO[s] for s in ACTIVE_STATES)

JOB_STATE_TO_PROTO: dict[str, pb.JobState.ValueType] = {
    JobState.PENDING: pb.JOB_STATE_PENDING,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.COMPLETED: pb.JOB_STATE_COMPLETED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.SKIPPED: pb.JOB_STATE_SKIPPED,
}
JOB_STATE_FROM_PROTO: dict[int, JobState] = {v: JobState(k) for k, v in JOB_STATE_TO_PROTO.items()}


def state_label(state: str) -> str:
    """'paused' -> 'PAUSED': how messages for people name a state (as grpcurl shows the enum)."""
    return state.upper()


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    return ts


def config_to_proto(config: Mapping[str, Any] | None) -> pb.SessionConfig:
    """The stored JSON config; a missing key reads as its default."""
    config = config or {}
    return pb.SessionConfig(
        extensions=list(config.get("extensions") or DEFAULT_EXTENSIONS),
        recursive=bool(config.get("recursive", True)),
        batch_size=int(config.get("batch_size") or 0),
        near_duplicate_distance=int(config.get("near_duplicate_distance", NEAR_DUPLICATE_DISTANCE_DEFAULT)),
        skip_near_duplicates=bool(config.get("skip_near_duplicates", False)),
    )


_RUNNING_STATES = (SessionState.DISCOVERING, SessionState.RUNNING)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def training_progress(row: Row) -> pb.TrainingProgress:
    """Counters, percentage, rate and ETA of a session row: the one formula every message uses
    (GetSession, GetSessionProgress, the worker's stream, the relay's row messages).

    The rate is images finished per second of training (`training_seconds` adds up the time the
    session's workers spent training, so paused and queued time never count); the ETA is what
    remains at that rate, and only while the session runs (a paused or ended session has none).
    While the total is not final the percentage and ETA are absent and `indeterminate` is true; with
    a final total of zero there is nothing to divide by, so the percentage stays absent but the
    total is not indeterminate.
    """
    final = bool(row["total_final"])
    found = int(row["images_found"])
    total = int(row["total_images"]) if final else found
    processed = int(row["processed_images"])
    failed = int(row["failed_images"])
    skipped = int(row["skipped_images"])
    done = processed + failed + skipped
    seconds = float(row.get("training_seconds") or 0.0)
    rate = _finite(done / seconds) if seconds > 0 else 0.0
    progress = pb.TrainingProgress(
        total_images=total,
        discovered_images=found,
        processed_images=processed,
        failed_images=failed,
        skipped_images=skipped,
        indeterminate=not final,
        images_per_second=rate,
    )
    if final and total > 0:
        progress.percentage = min(100.0, max(0.0, done / total * 100.0))
        remaining = max(total - done, 0)
        if rate > 0 and row.get("state", SessionState.RUNNING) in _RUNNING_STATES:
            progress.eta.CopyFrom(Duration(seconds=math.ceil(remaining / rate)))
    return progress


def discovery_progress(row: Row, now: dt.datetime | None = None) -> pb.DiscoveryProgress:
    """Discovery counters; files per second over the walk so far (to its end once it finished)."""
    progress = pb.DiscoveryProgress(
        directories_scanned=int(row["directories_scanned"]),
        files_seen=int(row["files_seen"]),
        images_found=int(row["images_found"]),
        assets_new=int(row["assets_new"]),
        assets_changed=int(row["assets_changed"]),
        assets_unchanged=int(row["assets_unchanged"]),
        current_directory=row["current_directory"] or "",
        total_final=bool(row["total_final"]),
        unreadable_paths=int(row["unreadable_paths"]),
    )
    started: dt.datetime | None = row.get("discovery_started_at")
    if started is not None:
        end: dt.datetime = row.get("discovery_finished_at") or now or dt.datetime.now(dt.UTC)
        elapsed = (end - started).total_seconds()
        if elapsed > 0:
            progress.files_per_second = _finite(progress.files_seen / elapsed)
    return progress


def subdirectory_to_proto(row: Row) -> pb.Subdirectory:
    return pb.Subdirectory(
        path=row["path"],
        selected=bool(row["selected"]),
        image_count=int(row["image_count"]),
        trained_count=int(row["trained_count"]),
    )


def session_to_proto(row: Row, subdirectories: Iterable[Row] = (), now: dt.datetime | None = None) -> pb.Session:
    """A `training_sessions` row (plus its subdirectory rows, sorted by path) as a `Session`."""
    session = pb.Session(
        name=session_name(int(row["id"])),
        display_name=row["display_name"],
        root_path=row["root_path"],
        state=SESSION_STATE_TO_PROTO[row["state"]],
        state_reason=row["state_reason"] or "",
        config=config_to_proto(row["config"]),
        subdirectories=[subdirectory_to_proto(s) for s in subdirectories],
        progress=training_progress(row),
        discovery=discovery_progress(row, now),
        attempts=int(row["attempts"]),
    )
    for field in ("create_time", "update_time", "start_time", "end_time"):
        ts = timestamp(row.get(field))
        if ts is not None:
            getattr(session, field).CopyFrom(ts)
    if row.get("trainer_name"):
        session.trainer.CopyFrom(trainer_to_proto(row))
    return session


def trainer_to_proto(row: Row) -> pb.Trainer:
    """A row with trainer_name, trainer_version, model_digest, embedding_dimension as a `Trainer`."""
    return pb.Trainer(
        name=row["trainer_name"] or "",
        version=row["trainer_version"] or "",
        model_digest=row["model_digest"] or "",
        embedding_dimension=int(row["embedding_dimension"] or 0),
    )


def job_to_proto(row: Row) -> pb.Job:
    """A `training_jobs` row joined with its asset (`path`, hash, size fields) as a `Job`."""
    job = pb.Job(
        name=job_name(int(row["session_id"]), int(row["id"])),
        path=row["path"],
        state=JOB_STATE_TO_PROTO[row["state"]],
        error_class=row["error_class"] or "",
        error_message=row["error_message"] or "",
        skip_reason=row["skip_reason"] or "",
        perceptual_hash=row.get("perceptual_hash") or "",
        hash_algorithm=row.get("hash_algorithm") or "",
        width=int(row.get("width") or 0),
        height=int(row.get("height") or 0),
        format=row.get("format") or "",
        asset_id=int(row["asset_id"]),
        duplicate_of=row.get("duplicate_of") or "",
        near_duplicate_of=row.get("near_duplicate_of") or "",
        near_duplicate_distance=int(row.get("near_duplicate_distance") or 0),
    )
    for field in ("create_time", "update_time"):
        ts = timestamp(row.get(field))
        if ts is not None:
            getattr(job, field).CopyFrom(ts)
    return job


def _now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def event(
    name: str,
    sequence: int,
    kind: int,
    state: int,
    state_reason: str,
    discovery: pb.DiscoveryProgress,
    training: pb.TrainingProgress,
    *,
    session: pb.Session | None = None,
    stamped: bool = True,
) -> pb.SessionEvent:
    """The one place a SessionEvent is built: every message carries the cumulative state.

    The worker's stream, the relay's row messages and snapshots, and the CLI's polling fallback all
    come through here, so no kind of message can leave a field out.
    """
    message = pb.SessionEvent(
        name=name,
        sequence=sequence,
        kind=kind,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        state_reason=state_reason,
        discovery=discovery,
        training=training,
    )
    if stamped:
        message.event_time.CopyFrom(_now_timestamp())
    if session is not None:
        message.session.CopyFrom(session)
    return message


def session_event(row: Row, sequence: int, kind: pb.EventKind.ValueType) -> pb.SessionEvent:
    """A stream message carrying the cumulative state of a session row at `sequence`."""
    return event(
        session_name(int(row["id"])),
        sequence,
        kind,
        SESSION_STATE_TO_PROTO[row["state"]],
        row["state_reason"] or "",
        discovery_progress(row),
        training_progress(row),
    )


def snapshot_event(session: pb.Session, sequence: int) -> pb.SessionEvent:
    """The first message of WatchSession: the whole session as stored, numbered `sequence`."""
    return event(
        session.name,
        sequence,
        pb.EVENT_KIND_SNAPSHOT,
        session.state,
        session.state_reason,
        session.discovery,
        session.progress,
        session=session,
    )

"""SQLAlchemy 2.0 models: the source of truth and the work queue.

States are stored as short text with CHECK constraints (readable in psql, easy to migrate).
Counters live on the session row so that progress reads are one primary-key lookup; the worker
advances them in the same transaction as the rows they count, so they never disagree with the
jobs table after a crash.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, REAL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from imagetraining.states import ACTIVE_STATES, TERMINAL_STATES, JobState, SessionState

__all__ = ["ACTIVE_STATES", "TERMINAL_STATES", "Base", "JobState", "SessionState"]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _check_in(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


def _now() -> Any:
    return func.now()


class TrainingSession(Base):
    __tablename__ = "training_sessions"
    __table_args__ = (
        CheckConstraint(_check_in("state", SessionState), name="state"),
        CheckConstraint("resume_state IS NULL OR resume_state IN ('discovering', 'running')", name="resume_state"),
        Index("ix_training_sessions_claimable", "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    root_path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), server_default=SessionState.PENDING.value)
    state_reason: Mapped[str] = mapped_column(Text, server_default="")
    # Where PAUSED goes back to on Resume.
    resume_state: Mapped[str | None] = mapped_column(String(16))
    # RESTART_SCOPE of the current run: 'all' or 'failed_only'.
    run_scope: Mapped[str] = mapped_column(String(16), server_default="all")
    # {"extensions": [...], "recursive": bool, "batch_size": int}
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    create_request_id: Mapped[str | None] = mapped_column(String(128), unique=True)

    # Discovery counters (cumulative for the current run).
    directories_scanned: Mapped[int] = mapped_column(BigInteger, server_default="0")
    files_seen: Mapped[int] = mapped_column(BigInteger, server_default="0")
    images_found: Mapped[int] = mapped_column(BigInteger, server_default="0")
    assets_new: Mapped[int] = mapped_column(BigInteger, server_default="0")
    assets_changed: Mapped[int] = mapped_column(BigInteger, server_default="0")
    assets_unchanged: Mapped[int] = mapped_column(BigInteger, server_default="0")
    unreadable_paths: Mapped[int] = mapped_column(BigInteger, server_default="0")
    current_directory: Mapped[str] = mapped_column(Text, server_default="")
    total_final: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Opaque walk checkpoint (e.g. the last directory fully written), for resume after a crash.
    discovery_checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    discovery_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    discovery_finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    # Training counters.
    total_images: Mapped[int] = mapped_column(BigInteger, server_default="0")
    processed_images: Mapped[int] = mapped_column(BigInteger, server_default="0")
    failed_images: Mapped[int] = mapped_column(BigInteger, server_default="0")
    skipped_images: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # Seconds spent RUNNING (excluding pauses), for the rate and ETA.
    training_seconds: Mapped[float] = mapped_column(server_default="0")
    # When training_seconds was last advanced (each chunk commit adds the wall-clock time since).
    training_mark: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The trainer of the latest run, stamped by its owner when training starts (helpers with another
    # trainer do not take its chunks: one run never mixes two models).
    trainer_name: Mapped[str | None] = mapped_column(String(100))
    trainer_version: Mapped[str | None] = mapped_column(String(100))
    model_digest: Mapped[str | None] = mapped_column(String(64))
    embedding_dimension: Mapped[int] = mapped_column(Integer, server_default="0")
    # W3C traceparent of the latest client transition ('' when untraced): the worker's run joins it.
    trace_context: Mapped[str] = mapped_column(String(64), server_default="")

    # Lease / fencing (written by workers; see discovery_worker.claims).
    owner_id: Mapped[str | None] = mapped_column(String(200))
    owner_address: Mapped[str | None] = mapped_column(String(300))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # High-water mark of stream sequences, so a new owner or a restarted control continues above it.
    event_sequence: Mapped[int] = mapped_column(BigInteger, server_default="0")

    create_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    update_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now(), onupdate=_now())
    start_time: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    subdirectories: Mapped[list[SessionSubdirectory]] = relationship(
        back_populates="session",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="SessionSubdirectory.path",
    )


class SessionSubdirectory(Base):
    __tablename__ = "session_subdirectories"
    __table_args__ = (UniqueConstraint("session_id", "path", name="uq_session_subdirectories_session_path"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("training_sessions.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    selected: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Recursive counts from the last discovery (the seed counted only direct children).
    image_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    trained_count: Mapped[int] = mapped_column(BigInteger, server_default="0")

    session: Mapped[TrainingSession] = relationship(back_populates="subdirectories")


class ImageAsset(Base):
    """One file on disk, shared by every session that covers it."""

    __tablename__ = "image_assets"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    perceptual_hash: Mapped[str | None] = mapped_column(String(64))
    hash_algorithm: Mapped[str | None] = mapped_column(String(32))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    # What the trainer returned (small: features, embeddings summary...).
    features: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # (size, mtime_ns) the hash was computed from; differs from the row's when the file changed.
    hashed_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    hashed_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    # BLAKE2b-128 (hex) of the bytes hashed: equal digests are exact duplicates.
    content_digest: Mapped[str | None] = mapped_column(String(32))
    # Which trainer produced `features` and `embedding` (NULL: none that recorded itself): an asset
    # trained by another trainer than the worker's is decoded and trained again.
    trainer_name: Mapped[str | None] = mapped_column(String(100))
    trainer_version: Mapped[str | None] = mapped_column(String(100))
    model_digest: Mapped[str | None] = mapped_column(String(64))
    # The trainer's vector, L2-normalised (float4[] everywhere; pgvector indexes it where it exists).
    embedding: Mapped[list[float] | None] = mapped_column(ARRAY(REAL))
    first_seen_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    update_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class TrainingJob(Base):
    """One image in one session."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        UniqueConstraint("session_id", "asset_id", name="uq_training_jobs_session_asset"),
        CheckConstraint(_check_in("state", JobState), name="state"),
        Index("ix_training_jobs_session_state", "session_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("training_sessions.id", ondelete="CASCADE"))
    # No foreign key on asset_id and subdirectory_id, on purpose: discovery inserts jobs 2,000 at a
    # time, and the two per-row FK checks (plus the index the asset FK needs for deletes) cost more
    # than the insert itself (benchmarks/profile_discovery_batch.py, docs/performance.md). Both ids
    # are written by the worker from rows it read or inserted in the same transaction; assets are
    # never deleted, and subdirectory rows go only with their session, whose FK (kept) cascades to
    # its jobs.
    asset_id: Mapped[int] = mapped_column(BigInteger)
    # The selected subdirectory this image was found under (for per-subdirectory counts).
    subdirectory_id: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), server_default=JobState.PENDING.value)
    error_class: Mapped[str] = mapped_column(String(32), server_default="")
    error_message: Mapped[str] = mapped_column(Text, server_default="")
    skip_reason: Mapped[str] = mapped_column(Text, server_default="")
    duplicate_of_asset_id: Mapped[int | None] = mapped_column(BigInteger)
    # Trained, but its dHash is within the session's near_duplicate_distance of this earlier asset's.
    near_duplicate_of_asset_id: Mapped[int | None] = mapped_column(BigInteger)
    near_duplicate_distance: Mapped[int | None] = mapped_column(SmallInteger)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # A `running` job belongs to the chunk holding this token until lease_expires_at (any worker may
    # claim a chunk of a session it helps; imagetraining/transitions.py CLAIM_CHUNK).
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The worker holding the job's chunk (running), or whose chunk wrote its outcome.
    trained_by: Mapped[str | None] = mapped_column(String(200))
    create_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    update_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class DiscoveryIssue(Base):
    """A directory or file the walk could not read: recorded with the reason, then skipped."""

    __tablename__ = "discovery_issues"
    __table_args__ = (UniqueConstraint("session_id", "path", name="uq_discovery_issues_session_path"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("training_sessions.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    create_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class DirectoryFingerprint(Base):
    """What one session last recorded of one directory: a digest of its images' (name, size, mtime).

    Written in the transaction that records the directory's last image, so a stored fingerprint means
    every image of that directory has its asset and its job in the session. A rescan that finds the
    same digest skips the directory's per-file database work (discovery_worker/discovery.py).
    """

    __tablename__ = "directory_fingerprints"

    session_id: Mapped[int] = mapped_column(ForeignKey("training_sessions.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))


class LibraryAnchor(Base):
    """A directory whose absence means the session's library is offline (discovery_worker/library.py).

    The library roots and selected directories of the current run, recorded when its discovery
    starts, and the mount points its walk met, each with its inode as it was then.
    """

    __tablename__ = "library_anchors"

    session_id: Mapped[int] = mapped_column(ForeignKey("training_sessions.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    inode: Mapped[int] = mapped_column(BigInteger)
    device: Mapped[int] = mapped_column(BigInteger)


class IdempotencyKey(Base):
    """The first answer to a request_id, returned again on a retry."""

    __tablename__ = "idempotency_keys"

    method: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    session_id: Mapped[int | None] = mapped_column(BigInteger)
    response: Mapped[bytes] = mapped_column(LargeBinary)
    create_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class WorkerTrainer(Base):
    """The trainer a worker runs, announced when it starts; the newest is the configured trainer."""

    __tablename__ = "worker_trainers"

    worker_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    trainer_name: Mapped[str] = mapped_column(String(100))
    trainer_version: Mapped[str] = mapped_column(String(100))
    model_digest: Mapped[str] = mapped_column(String(64))
    embedding_dimension: Mapped[int] = mapped_column(Integer)
    announced_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

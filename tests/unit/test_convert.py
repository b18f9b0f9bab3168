"""Rows -> messages: the progress arithmetic every client relies on (absent, never NaN)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest

from imagetraining import convert
from imagetraining.v1 import resources_pb2 as pb

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def session_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": 19,
        "display_name": "holiday",
        "root_path": "/lib/holiday",
        "state": "pending",
        "state_reason": "",
        "config": {"extensions": ["png"], "recursive": False, "batch_size": 500},
        "attempts": 0,
        "directories_scanned": 0,
        "files_seen": 0,
        "images_found": 0,
        "assets_new": 0,
        "assets_changed": 0,
        "assets_unchanged": 0,
        "unreadable_paths": 0,
        "current_directory": "",
        "total_final": False,
        "discovery_started_at": None,
        "discovery_finished_at": None,
        "total_images": 0,
        "processed_images": 0,
        "failed_images": 0,
        "skipped_images": 0,
        "training_seconds": 0.0,
        "create_time": T0,
        "update_time": T0,
        "start_time": None,
        "end_time": None,
    }
    row.update(overrides)
    return row


def test_percentage_is_absent_while_the_total_is_not_final() -> None:
    p = convert.training_progress(session_row(images_found=50, processed_images=10, training_seconds=2.0))
    assert p.indeterminate and not p.HasField("percentage") and not p.HasField("eta")
    assert (p.total_images, p.discovered_images, p.processed_images) == (50, 50, 10)
    assert p.images_per_second == 5.0


def test_percentage_counts_processed_failed_and_skipped() -> None:
    row = session_row(
        state="running",
        total_final=True,
        total_images=200,
        images_found=200,
        processed_images=100,
        failed_images=30,
        skipped_images=20,
        training_seconds=15.0,
    )
    p = convert.training_progress(row)
    assert not p.indeterminate and p.percentage == 75.0
    assert p.images_per_second == 10.0
    assert p.eta.seconds == 5


@pytest.mark.parametrize("state", ["paused", "pending", "completed", "cancelled", "failed"])
def test_only_a_running_session_has_an_eta(state: str) -> None:
    """Paused (or queued, or ended): the rate stays (it excludes paused time), the ETA is absent."""
    row = session_row(
        state=state, total_final=True, total_images=200, images_found=200, processed_images=100, training_seconds=10.0
    )
    p = convert.training_progress(row)
    assert p.images_per_second == 10.0 and p.percentage == 50.0
    assert not p.HasField("eta")
    assert convert.training_progress({**row, "state": "running"}).eta.seconds == 10


def test_a_final_total_of_zero_divides_nothing() -> None:
    p = convert.training_progress(session_row(total_final=True, total_images=0, training_seconds=0.0))
    assert not p.indeterminate and not p.HasField("percentage") and not p.HasField("eta")
    assert p.images_per_second == 0.0


@pytest.mark.parametrize("seconds", [0.0, -1.0, None])
def test_no_rate_without_training_time(seconds: float | None) -> None:
    row = session_row(total_final=True, total_images=10, images_found=10, processed_images=5, training_seconds=seconds)
    p = convert.training_progress(row)
    assert p.percentage == 50.0 and p.images_per_second == 0.0 and not p.HasField("eta")


def test_percentage_never_leaves_0_100_and_is_never_nan() -> None:
    row = session_row(total_final=True, total_images=10, processed_images=12, training_seconds=1e-300)
    p = convert.training_progress(row)
    assert p.percentage == 100.0 and math.isfinite(p.images_per_second)


def test_files_per_second_over_the_walk() -> None:
    row = session_row(
        files_seen=300,
        discovery_started_at=T0,
        discovery_finished_at=T0 + dt.timedelta(seconds=3),
        total_final=True,
    )
    d = convert.discovery_progress(row)
    assert d.files_per_second == 100.0 and d.total_final
    running = convert.discovery_progress(
        session_row(files_seen=10, discovery_started_at=T0), now=T0 + dt.timedelta(seconds=5)
    )
    assert running.files_per_second == 2.0
    assert convert.discovery_progress(session_row(files_seen=10)).files_per_second == 0.0


def test_session_to_proto() -> None:
    subdirectories = [{"path": "/lib/holiday/a", "selected": True, "image_count": 3, "trained_count": 1}]
    s = convert.session_to_proto(
        session_row(state="cancelled", state_reason="cancelled by a client", end_time=T0), subdirectories
    )
    assert s.name == "sessions/19" and s.state == pb.SESSION_STATE_CANCELLED
    assert s.config == pb.SessionConfig(extensions=["png"], recursive=False, batch_size=500, near_duplicate_distance=4)
    assert s.config.HasField("recursive")
    assert s.subdirectories[0] == pb.Subdirectory(path="/lib/holiday/a", selected=True, image_count=3, trained_count=1)
    assert s.create_time.ToDatetime(tzinfo=dt.UTC) == T0 and s.end_time.ToDatetime(tzinfo=dt.UTC) == T0
    assert not s.HasField("start_time")


def test_empty_config_reads_as_defaults() -> None:
    c = convert.config_to_proto({})
    assert list(c.extensions) == ["jpg", "jpeg", "png", "webp"] and c.recursive and c.batch_size == 0


def test_every_state_maps_both_ways() -> None:
    for text, value in convert.SESSION_STATE_TO_PROTO.items():
        assert convert.SESSION_STATE_FROM_PROTO[value] == text
    for job_text, job_value in convert.JOB_STATE_TO_PROTO.items():
        assert convert.JOB_STATE_FROM_PROTO[job_value] == job_text


def test_job_to_proto() -> None:
    job = convert.job_to_proto(
        {
            "id": 7,
            "session_id": 19,
            "asset_id": 3,
            "state": "skipped",
            "error_class": "",
            "error_message": "",
            "skip_reason": "duplicate of asset 1",
            "create_time": T0,
            "update_time": T0,
            "path": "/lib/a.jpg",
            "perceptual_hash": None,
            "hash_algorithm": None,
            "width": None,
            "height": None,
            "format": None,
        }
    )
    assert job.name == "sessions/19/jobs/7" and job.state == pb.JOB_STATE_SKIPPED
    assert job.skip_reason == "duplicate of asset 1" and job.perceptual_hash == "" and job.width == 0


def test_events_carry_the_cumulative_state() -> None:
    row = session_row(state="running", total_final=True, total_images=4, images_found=4, processed_images=2)
    event = convert.session_event(row, 42, pb.EVENT_KIND_TRAINING_PROGRESS)
    assert (event.name, event.sequence, event.state) == ("sessions/19", 42, pb.SESSION_STATE_RUNNING)
    assert event.training.percentage == 50.0 and event.HasField("event_time")
    snapshot = convert.snapshot_event(convert.session_to_proto(row), 43)
    assert snapshot.kind == pb.EVENT_KIND_SNAPSHOT and snapshot.session.name == "sessions/19"
    assert snapshot.training.percentage == 50.0

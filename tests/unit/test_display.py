"""The watch display, fed scripted SessionEvents: what a person sees in each phase, live and plain."""

from __future__ import annotations

import io

from google.protobuf.duration_pb2 import Duration
from rich.console import Console

from imagetraining.cli.display import Outcomes, SessionDisplay, reason_group
from imagetraining.v1 import resources_pb2 as pb

NAME = "sessions/7"


def terminal_console() -> Console:
    # file=StringIO keeps pytest's output clean; force_terminal makes it render like a real terminal.
    return Console(record=True, width=100, force_terminal=True, file=io.StringIO())


def plain_console() -> Console:
    return Console(record=True, width=100, file=io.StringIO())


def snapshot(seq: int, state: int = pb.SESSION_STATE_DISCOVERING) -> pb.SessionEvent:
    session = pb.Session(name=NAME, display_name="holiday photos", root_path="/lib/photos", state=state)
    return pb.SessionEvent(name=NAME, sequence=seq, kind=pb.EVENT_KIND_SNAPSHOT, state=state, session=session)


def discovery(seq: int, images: int, dirs: int, current: str = "/lib/photos/2024") -> pb.SessionEvent:
    return pb.SessionEvent(
        name=NAME,
        sequence=seq,
        kind=pb.EVENT_KIND_DISCOVERY_PROGRESS,
        state=pb.SESSION_STATE_DISCOVERING,
        discovery=pb.DiscoveryProgress(
            images_found=images,
            directories_scanned=dirs,
            files_seen=images + 10,
            files_per_second=512.0,
            current_directory=current,
        ),
    )


def state_change(seq: int, state: int, reason: str = "", **training: object) -> pb.SessionEvent:
    return pb.SessionEvent(
        name=NAME,
        sequence=seq,
        kind=pb.EVENT_KIND_STATE_CHANGE,
        state=state,
        state_reason=reason,
        training=pb.TrainingProgress(**training),  # type: ignore[arg-type]
    )


def training(seq: int, done: int, total: int = 200, *, failed: int = 0, skipped: int = 0) -> pb.SessionEvent:
    progress = pb.TrainingProgress(
        total_images=total,
        discovered_images=total,
        processed_images=done - failed - skipped,
        failed_images=failed,
        skipped_images=skipped,
        percentage=100.0 * done / total,
        images_per_second=12.5,
        eta=Duration(seconds=round((total - done) / 12.5)),
    )
    return pb.SessionEvent(
        name=NAME, sequence=seq, kind=pb.EVENT_KIND_TRAINING_PROGRESS, state=pb.SESSION_STATE_RUNNING, training=progress
    )


def outcomes() -> Outcomes:
    jobs = [
        pb.Job(path="/lib/photos/a/1.jpg", state=pb.JOB_STATE_FAILED, error_class="corrupt"),
        pb.Job(path="/lib/photos/a/2.jpg", state=pb.JOB_STATE_FAILED, error_class="corrupt"),
        pb.Job(path="/lib/photos/b/3.png", state=pb.JOB_STATE_FAILED, error_class="truncated"),
        pb.Job(path="/lib/photos/b/4.jpg", state=pb.JOB_STATE_SKIPPED, skip_reason="duplicate of asset 12"),
        pb.Job(path="/lib/photos/b/5.jpg", state=pb.JOB_STATE_SKIPPED, skip_reason="duplicate of asset 40"),
    ]
    return Outcomes.from_jobs(jobs)


def test_live_display_shows_each_phase() -> None:
    console = terminal_console()
    display = SessionDisplay(console, auto_refresh=False)
    assert not display.plain
    with display:
        display.update(snapshot(1))
        for seq, (images, dirs) in enumerate([(10, 1), (55, 3), (120, 7)], start=2):
            display.update(discovery(seq, images, dirs))
        text = console.export_text()
        assert "holiday photos" in text and "DISCOVERING" in text
        assert "Discovering... 10 images found in 1 directories" in text
        assert "Discovering... 120 images found in 7 directories" in text
        assert "512 files/s" in text
        assert "/lib/photos/2024" in text

        display.update(state_change(5, pb.SESSION_STATE_RUNNING, total_images=200, discovered_images=200))
        for seq, done in enumerate([20, 84, 150], start=6):
            display.update(training(seq, done))
        text = console.export_text()
        assert "RUNNING" in text
        assert "Discovering..." not in text
        assert "10.0%" in text and "42.0%" in text and "75.0%" in text
        assert "150/200 images" in text
        assert "12.5 images/s" in text
        assert "ETA 0:00:04" in text  # (200 - 150) / 12.5 s
        assert "━" in text  # the bar itself

        display.update(
            state_change(
                9,
                pb.SESSION_STATE_COMPLETED,
                "",
                total_images=200,
                processed_images=195,
                failed_images=3,
                skipped_images=2,
                percentage=100.0,
            )
        )
        console.export_text()
    display.finish(outcomes())
    text = console.export_text()
    assert "COMPLETED" in text
    lines = [line.strip("│ ") for line in text.splitlines()]
    assert any(line.startswith("Processed") and "195" in line for line in lines)
    assert any(line.startswith("Skipped") and "2" in line for line in lines)
    assert any(line.startswith("Failed") and "3" in line for line in lines)
    # Grouped by reason, biggest group first, with an example path.
    assert any(line.startswith("corrupt") and " 2 " in line and "/lib/photos/a/1.jpg" in line for line in lines)
    assert any(line.startswith("truncated") and " 1 " in line for line in lines)
    assert any(line.startswith("duplicate") and " 2 " in line and "/lib/photos/b/4.jpg" in line for line in lines)
    assert "imagetraining jobs 7 --state failed" in text


def test_the_truncation_note_is_below_both_groups_not_in_the_failed_rows() -> None:
    console = terminal_console()
    display = SessionDisplay(console, auto_refresh=False)
    with display:
        display.update(
            state_change(2, pb.SESSION_STATE_COMPLETED, "", total_images=5, failed_images=3, skipped_images=2)
        )
    partial = outcomes()
    partial.truncated = True
    display.finish(partial)
    lines = [line.strip("│ ").strip() for line in console.export_text().splitlines()]
    note = next(i for i, line in enumerate(lines) if line.startswith("Reasons counted over the first"))
    reasons = [i for i, line in enumerate(lines) if line.startswith(("corrupt", "truncated", "duplicate"))]
    assert reasons and note > max(reasons)
    assert "e.g." not in lines[note]


def test_indeterminate_training_shows_no_percentage() -> None:
    console = terminal_console()
    display = SessionDisplay(console, auto_refresh=False)
    event = pb.SessionEvent(
        name=NAME,
        sequence=3,
        kind=pb.EVENT_KIND_TRAINING_PROGRESS,
        state=pb.SESSION_STATE_RUNNING,
        training=pb.TrainingProgress(discovered_images=80, processed_images=30, indeterminate=True),
    )
    with display:
        display.update(event)
        text = console.export_text()
    assert "%" not in text
    assert "30 images done, 80 found so far" in text
    assert "ETA" not in text


def test_failed_session_summary_names_the_reason_and_next_step() -> None:
    console = terminal_console()
    display = SessionDisplay(console, auto_refresh=False)
    reason = "Selected subdirectories contain no image files. Supported formats: jpg, png"
    with display:
        display.update(snapshot(4))
        display.update(state_change(5, pb.SESSION_STATE_FAILED, reason))
    display.finish(Outcomes())
    text = console.export_text()
    assert "FAILED" in text
    assert "Reason: Selected subdirectories contain no image files" in text
    assert "imagetraining sessions restart 7" in text


def test_duplicate_and_backwards_sequences_are_ignored() -> None:
    console = terminal_console()
    display = SessionDisplay(console, auto_refresh=False)
    with display:
        assert display.update(snapshot(10))
        assert display.update(discovery(11, 50, 2))
        console.export_text()
        assert not display.update(discovery(11, 50, 2))  # the same message again after a reconnect
        assert not display.update(discovery(9, 999, 99))  # an old one
        assert console.export_text() == ""  # nothing was drawn for them
        assert display.view.discovery.images_found == 50
        assert display.view.last_sequence == 11
        assert display.update(discovery(12, 60, 3))
        assert "Discovering... 60 images found in 3 directories" in console.export_text()


def test_plain_mode_prints_state_lines_and_rate_limited_progress() -> None:
    console = plain_console()
    now = [100.0]
    display = SessionDisplay(console, clock=lambda: now[0])
    assert display.plain  # not a terminal
    with display:
        display.update(snapshot(1))
        display.update(discovery(2, 10, 1))
        now[0] += 0.3
        display.update(discovery(3, 20, 2))  # within a second of the last progress line: not printed
        now[0] += 0.8
        display.update(discovery(4, 120, 7))
        display.update(discovery(4, 120, 7))  # duplicate: nothing
        display.update(state_change(5, pb.SESSION_STATE_RUNNING, total_images=200, discovered_images=200))
        display.update(training(6, 20))
        now[0] += 0.1
        display.update(training(7, 40))
        now[0] += 1.0
        display.update(training(8, 84))
        display.update(state_change(9, pb.SESSION_STATE_COMPLETED, processed_images=197, skipped_images=2))
    display.finish(outcomes())
    lines = console.export_text().splitlines()
    assert lines[:7] == [
        "sessions/7: DISCOVERING",
        "sessions/7: Discovering... 10 images found in 1 directories (512 files/s)",
        "sessions/7: Discovering... 120 images found in 7 directories (512 files/s)",
        "sessions/7: RUNNING",
        "sessions/7: training: 10.0%, 20/200 images, 12.5 images/s, ETA 0:00:14",
        "sessions/7: training: 42.0%, 84/200 images, 12.5 images/s, ETA 0:00:09",
        "sessions/7: COMPLETED",
    ]
    assert lines[7] == "sessions/7: COMPLETED: processed 197, skipped 2, failed 0"
    assert "sessions/7: skipped duplicate: 2 (e.g. /lib/photos/b/4.jpg)" in lines
    assert "sessions/7: failed corrupt: 2 (e.g. /lib/photos/a/1.jpg)" in lines
    # No escape codes, no spinner frames: fit for logs.
    assert all("\x1b" not in line and "━" not in line for line in lines)


def test_plain_mode_notices_and_paused_state() -> None:
    console = plain_console()
    display = SessionDisplay(console)
    display.update(snapshot(1, pb.SESSION_STATE_PAUSED))
    display.notice("connection lost (UNAVAILABLE: shutting down); reconnecting in 0.5s")
    assert console.export_text().splitlines() == [
        "sessions/7: PAUSED",
        "sessions/7: connection lost (UNAVAILABLE: shutting down); reconnecting in 0.5s",
    ]


def test_live_paused_and_notice() -> None:
    console = terminal_console()
    display = SessionDisplay(console, auto_refresh=False)
    with display:
        display.update(snapshot(1, pb.SESSION_STATE_PAUSED))
        display.notice("connection lost (UNAVAILABLE); reconnecting in 1.0s")
        text = console.export_text()
    assert "resume with: imagetraining sessions resume 7" in text
    assert "reconnecting in 1.0s" in text


def test_reason_groups() -> None:
    assert reason_group("duplicate of asset 12") == "duplicate"
    assert reason_group("duplicate: same content as /x/y.jpg") == "duplicate"
    assert reason_group("too small") == "too small"
    assert reason_group("") == "unspecified"

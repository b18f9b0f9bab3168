"""How the CLI shows answers to people: tables for lists, a compact panel for one session.

Kept apart from the commands so that what is shown can change without touching what is called, and
so that `--json` (for scripts) bypasses all of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from imagetraining.cli.display import (
    discovery_text,
    outcome_counts,
    percentage_text,
    session_id,
    state_label,
    state_style,
    training_counts,
)
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as tss


def print_json(console: Console, message: Message) -> None:
    """The message as JSON (proto3 mapping, as grpcurl prints it), unwrapped and unhighlighted."""
    console.out(json_format.MessageToJson(message, indent=2, preserving_proto_field_name=True), highlight=False)


def timestamp(ts: Timestamp) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def state_text(state: int, reason: str = "") -> Text:
    text = Text(state_label(state), style=state_style(state))
    if reason:
        text.append(f"  {reason}", style="dim")
    return text


def progress_summary(session: pb.Session) -> str:
    """One short cell: the percentage and counts of training, or the discovery counters."""
    t = session.progress
    if session.state == pb.SESSION_STATE_DISCOVERING:
        return discovery_text(session.discovery).removeprefix("Discovering... ")
    pct = percentage_text(t)
    done = t.processed_images + t.failed_images + t.skipped_images
    if pct is not None:
        return f"{pct} ({training_counts(t)})"
    if done or t.discovered_images:
        return training_counts(t)
    return "-"


def relative(path: str, root: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def session_panel(session: pb.Session) -> RenderableType:
    """A compact panel: what, where, state, counters, selection."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("Root", session.root_path)
    grid.add_row("State", state_text(session.state, session.state_reason))
    t = session.progress
    pct = percentage_text(t)
    if session.state == pb.SESSION_STATE_PENDING and not session.HasField("start_time"):
        grid.add_row("Training", "not started")
    else:
        grid.add_row("Training", f"{pct + '  ' if pct else ''}{training_counts(t)}  ({outcome_counts(t)})")
    d = session.discovery
    final = "final" if d.total_final else "not final"
    grid.add_row(
        "Discovery",
        f"{d.images_found:,} images in {d.directories_scanned:,} directories, {d.files_seen:,} files seen ({final}); "
        f"new {d.assets_new:,}, changed {d.assets_changed:,}, unchanged {d.assets_unchanged:,}",
    )
    exts = ", ".join(session.config.extensions) or "defaults"
    recursive = not session.config.HasField("recursive") or session.config.recursive
    grid.add_row("Formats", f"{exts}{'' if recursive else ' (top level only)'}")
    grid.add_row(
        "Times",
        f"created {timestamp(session.create_time)} · started {timestamp(session.start_time)} · "
        f"ended {timestamp(session.end_time)} · attempts {session.attempts}",
    )
    parts: list[RenderableType] = [grid]
    if session.subdirectories:
        subs = Table(box=None, pad_edge=False, show_edge=False, header_style="bold dim")
        subs.add_column("sel", no_wrap=True)
        subs.add_column("subdirectory", overflow="fold")
        subs.add_column("images", justify="right", no_wrap=True)
        subs.add_column("trained", justify="right", no_wrap=True)
        selected = 0
        for sub in session.subdirectories:
            selected += sub.selected
            subs.add_row(
                Text("[x]", "green") if sub.selected else Text("[ ]", "dim"),
                relative(sub.path, session.root_path),
                f"{sub.image_count:,}",
                f"{sub.trained_count:,}",
            )
        parts.append(Text(f"Subdirectories: {selected} of {len(session.subdirectories)} selected", "bold"))
        parts.append(subs)
    title = Text.assemble((session.name, "bold"), " · ", session.display_name or "")
    return Panel(Group(*parts), title=title, title_align="left", border_style=state_style(session.state), expand=False)


def sessions_table(sessions: Iterable[pb.Session]) -> Table:
    table = Table(header_style="bold")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("name")
    table.add_column("state", no_wrap=True)
    table.add_column("progress")
    table.add_column("root", overflow="fold")
    table.add_column("created", no_wrap=True)
    for s in sessions:
        table.add_row(
            session_id(s.name),
            s.display_name,
            state_text(s.state),
            progress_summary(s),
            s.root_path,
            timestamp(s.create_time),
        )
    return table


def job_reason(job: pb.Job) -> str:
    if job.state == pb.JOB_STATE_FAILED:
        return f"{job.error_class or 'failed'}: {job.error_message}" if job.error_message else job.error_class
    if job.state == pb.JOB_STATE_SKIPPED:
        if job.duplicate_of:
            return f"{job.skip_reason} of {job.duplicate_of}"
        if job.near_duplicate_of:
            return f"{job.skip_reason} of {job.near_duplicate_of} ({job.near_duplicate_distance} bits apart)"
        return job.skip_reason
    if job.near_duplicate_of:
        # Trained all the same; said so that a user can find look-alikes (thumbnails, re-encodes).
        return f"near duplicate of {job.near_duplicate_of} ({job.near_duplicate_distance} bits apart)"
    return ""


def jobs_table(jobs: Iterable[pb.Job]) -> Table:
    table = Table(header_style="bold")
    table.add_column("path", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("reason", overflow="fold")
    styles = {pb.JOB_STATE_FAILED: "red", pb.JOB_STATE_SKIPPED: "yellow", pb.JOB_STATE_COMPLETED: "green"}
    for job in jobs:
        label = pb.JobState.Name(job.state).removeprefix("JOB_STATE_")
        table.add_row(job.path, Text(label, styles.get(job.state, "")), job_reason(job))
    return table


def scan_output(response: tss.ScanDirectoryResponse) -> RenderableType:
    table = Table(header_style="bold")
    table.add_column("subdirectory", overflow="fold")
    table.add_column("images", justify="right", no_wrap=True)
    total = 0
    for sub in response.subdirectories:
        total += sub.image_count
        count = f"≥{sub.image_count:,}" if sub.truncated else f"{sub.image_count:,}"
        table.add_row(relative(sub.path, response.path), count)
    lines = [
        f"{len(response.subdirectories)} subdirectories, {total:,} images in them; "
        f"{response.direct_image_count:,} directly in {response.path}",
        f"formats: {', '.join(response.extensions)}",
    ]
    if response.truncated:
        lines.append("counts were cut short (file cap or deadline): the true counts are at least these")
    return Group(Text(response.path, "bold", overflow="fold"), table, Text("\n".join(lines), "dim"))


def similar_output(response: tss.FindSimilarImagesResponse, query: str) -> RenderableType:
    table = Table(header_style="bold")
    table.add_column("distance", justify="right", no_wrap=True)
    table.add_column("image", overflow="fold")
    for result in response.results:
        table.add_row(f"{result.distance:.4f}", result.path)
    t = response.trainer
    how = "exact" if response.exact else "approximate (HNSW index)"
    note = f"{len(response.results)} nearest by cosine distance, {how}; embeddings of {t.name} {t.version}"
    return Group(Text(query, "bold", overflow="fold"), table, Text(note, "dim"))


def next_step(state: int, sid: int | str, *, selected: bool = True) -> str:
    """The command to run next for a session in `state`: always one the server accepts in that state.

    One table for every hint the CLI prints (tests/integration/test_cli.py runs each one).
    """
    if state == pb.SESSION_STATE_PENDING:
        if not selected:
            return f"imagetraining sessions select {sid} SUBDIRECTORY..."
        return f"imagetraining sessions start {sid}"
    if state in (pb.SESSION_STATE_DISCOVERING, pb.SESSION_STATE_RUNNING):
        return f"imagetraining watch {sid}"
    if state == pb.SESSION_STATE_PAUSED:
        return f"imagetraining sessions resume {sid}"
    # Completed, cancelled, failed: RestartSession runs it again (StartSession refuses the first two).
    return f"imagetraining sessions restart {sid}"


def validate_output(response: tss.ValidateSessionResponse, name: str) -> RenderableType:
    verdict = Text("valid: StartSession would succeed", "green") if response.valid else Text("not valid", "bold red")
    count = f"{'≥' if response.truncated else ''}{response.image_count:,}"
    head = Text.assemble(
        verdict,
        f"\nstate {state_label(response.state)} · {count} images in "
        f"{response.subdirectories_selected} of {response.subdirectories_total} subdirectories selected · "
        f"formats {', '.join(response.supported_formats)}",
    )
    parts: list[RenderableType] = [head]
    if response.selected_subdirectories:
        table = Table(box=None, header_style="bold dim", pad_edge=False)
        table.add_column("selected subdirectory", overflow="fold")
        table.add_column("images", justify="right", no_wrap=True)
        for sub in response.selected_subdirectories:
            table.add_row(sub.path, f"{'≥' if sub.truncated else ''}{sub.image_count:,}")
        parts.append(table)
    for problem in response.problems:
        parts.append(Text(f"problem {problem.type} ({problem.subject}): {problem.description}", "red"))
    if response.valid:
        parts.append(Text(f"next: {next_step(response.state, session_id(name))}", "dim"))
    return Group(*parts)


def session_line(session: pb.Session, verb: str) -> Text:
    """`sessions/7 (photos) started: DISCOVERING`: what a state-changing command reports."""
    text = Text.assemble((session.name, "bold"))
    if session.display_name:
        text.append(f" ({session.display_name})")
    text.append(f" {verb}: ")
    text.append_text(state_text(session.state, session.state_reason))
    return text

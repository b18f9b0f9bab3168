"""The live display of a session's progress stream, for people at a terminal.

It is a pure renderer: it is fed `SessionEvent` messages (from WatchSession, or built from polled
GetSessionProgress answers) and never talks to a server, so every phase can be tested by feeding a
scripted sequence into a recording console. Two modes:

- live (a terminal): a spinner with "Discovering... N images found in M directories" while the walk
  runs, a progress bar with percentage, rate and ETA while training, and a summary panel at the end;
- plain (no terminal, or asked for): one line per state change and at most one progress line per
  `progress_interval`, so logs of CI jobs and cron runs stay readable.

Messages are cumulative and carry a strictly increasing `sequence`: a message whose sequence is not
greater than the last one shown (a duplicate after a reconnect, or an out-of-order one) is ignored,
so nothing is ever shown twice or goes backwards.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from imagetraining.convert import TERMINAL_PROTO
from imagetraining.v1 import resources_pb2 as pb

TERMINAL_STATES = TERMINAL_PROTO  # the one definition: imagetraining/states.py
_STATE_STYLES: dict[int, str] = {
    pb.SESSION_STATE_PENDING: "yellow",
    pb.SESSION_STATE_DISCOVERING: "cyan",
    pb.SESSION_STATE_RUNNING: "blue",
    pb.SESSION_STATE_PAUSED: "yellow",
    pb.SESSION_STATE_COMPLETED: "green",
    pb.SESSION_STATE_CANCELLED: "magenta",
    pb.SESSION_STATE_FAILED: "red",
}
# The reason text after these words names one image or asset ("duplicate of asset 12"); cutting it
# there groups skips by kind instead of listing one group per original image.
_REASON_CUT = re.compile(r":| of | in | at | for |\(|\d")


def state_label(state: int) -> str:
    """`SESSION_STATE_RUNNING` -> `RUNNING`: the enum's value name without its prefix."""
    try:
        name = pb.SessionState.Name(state)  # type: ignore[arg-type]
    except ValueError:
        return f"STATE_{state}"
    return name.removeprefix("SESSION_STATE_")


def state_style(state: int) -> str:
    return _STATE_STYLES.get(state, "white")


def session_id(name: str) -> str:
    """`sessions/7` -> `7`, for the commands suggested to the user."""
    return name.rsplit("/", 1)[-1]


def format_duration(seconds: float) -> str:
    """Whole seconds as h:mm:ss, the way people read an ETA."""
    return str(timedelta(seconds=max(0, round(seconds))))


def format_rate(value: float, unit: str) -> str:
    if value <= 0:
        return f"- {unit}/s"
    if value < 100:
        return f"{value:.1f} {unit}/s"
    return f"{value:,.0f} {unit}/s"


def reason_group(text: str) -> str:
    """The kind of a skip or failure reason, without what names a single image.

    "duplicate of asset 12" and "duplicate of asset 40" are both "duplicate"; a reason without such
    a tail is its own group.
    """
    text = text.strip()
    if not text:
        return "unspecified"
    head = _REASON_CUT.split(text, maxsplit=1)[0].strip()
    return head or text


@dataclass
class ReasonGroup:
    count: int = 0
    example: str = ""


@dataclass
class Outcomes:
    """Failed and skipped jobs grouped by reason, for the summary (fetched by the caller from ListJobs)."""

    failed: dict[str, ReasonGroup] = field(default_factory=dict)
    skipped: dict[str, ReasonGroup] = field(default_factory=dict)
    # Only the first jobs were looked at: the groups may not add up to the counters.
    truncated: bool = False

    @classmethod
    def from_jobs(cls, jobs: Iterable[pb.Job], *, truncated: bool = False) -> Outcomes:
        out = cls(truncated=truncated)
        for job in jobs:
            if job.state == pb.JOB_STATE_FAILED:
                group = out.failed.setdefault(job.error_class or "unspecified", ReasonGroup())
            elif job.state == pb.JOB_STATE_SKIPPED:
                group = out.skipped.setdefault(reason_group(job.skip_reason), ReasonGroup())
            else:
                continue
            group.count += 1
            if not group.example:
                group.example = job.path
        return out


@dataclass
class SessionView:
    """The cumulative state of one session as known from the messages applied so far."""

    name: str = ""
    display_name: str = ""
    root_path: str = ""
    state: int = pb.SESSION_STATE_UNSPECIFIED
    state_reason: str = ""
    discovery: pb.DiscoveryProgress = field(default_factory=pb.DiscoveryProgress)
    training: pb.TrainingProgress = field(default_factory=pb.TrainingProgress)
    last_sequence: int | None = None

    def apply(self, event: pb.SessionEvent) -> bool:
        """Take one message; False (and nothing changes) for a duplicate or backwards sequence."""
        if self.last_sequence is not None and event.sequence <= self.last_sequence:
            return False
        self.last_sequence = event.sequence
        if event.name:
            self.name = event.name
        if event.HasField("session"):
            s = event.session
            self.name = s.name or self.name
            self.display_name = s.display_name
            self.root_path = s.root_path
        if event.kind == pb.EVENT_KIND_HEARTBEAT and event.state == pb.SESSION_STATE_UNSPECIFIED:
            return True
        if event.state != pb.SESSION_STATE_UNSPECIFIED:
            self.state = event.state
            self.state_reason = event.state_reason
        # New objects rather than in-place changes: the live refresh thread may be reading the old ones.
        if event.HasField("discovery"):
            self.discovery = _copy(event.discovery, pb.DiscoveryProgress)
        elif event.HasField("session") and event.session.HasField("discovery"):
            self.discovery = _copy(event.session.discovery, pb.DiscoveryProgress)
        if event.HasField("training"):
            self.training = _copy(event.training, pb.TrainingProgress)
        elif event.HasField("session") and event.session.HasField("progress"):
            self.training = _copy(event.session.progress, pb.TrainingProgress)
        return True

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def title(self) -> str:
        return f"{self.name} · {self.display_name}" if self.display_name else self.name


_M = TypeVar("_M", pb.DiscoveryProgress, pb.TrainingProgress)


def _copy(message: _M, cls: type[_M]) -> _M:
    out = cls()
    out.CopyFrom(message)
    return out


# --- text used by both modes -------------------------------------------------------------------------


def discovery_text(d: pb.DiscoveryProgress) -> str:
    return f"Discovering... {d.images_found:,} images found in {d.directories_scanned:,} directories"


def training_counts(t: pb.TrainingProgress) -> str:
    done = t.processed_images + t.failed_images + t.skipped_images
    if t.indeterminate or not t.HasField("percentage"):
        return f"{done:,} images done, {t.discovered_images:,} found so far"
    return f"{done:,}/{t.total_images:,} images"


def percentage_text(t: pb.TrainingProgress) -> str | None:
    """The percentage, or None while the total is not final (never a made-up 0%)."""
    if t.indeterminate or not t.HasField("percentage"):
        return None
    return f"{min(100.0, max(0.0, t.percentage)):.1f}%"


def eta_text(t: pb.TrainingProgress) -> str | None:
    if not t.HasField("eta"):
        return None
    return format_duration(t.eta.seconds + t.eta.nanos / 1e9)


def outcome_counts(t: pb.TrainingProgress) -> str:
    return f"processed {t.processed_images:,} · skipped {t.skipped_images:,} · failed {t.failed_images:,}"


class SessionDisplay:
    """Renders a session's event stream to a rich console, live or as plain lines.

    Use as a context manager (starts and stops the live region), call `update()` per message,
    `notice()` for connection news and `finish()` with the grouped outcomes once the terminal
    message arrived.
    """

    def __init__(
        self,
        console: Console,
        *,
        plain: bool | None = None,
        auto_refresh: bool = True,
        progress_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.plain = (not console.is_terminal or console.is_dumb_terminal) if plain is None else plain
        self.view = SessionView()
        self._auto_refresh = auto_refresh
        self._progress_interval = progress_interval
        self._clock = clock
        self._last_progress_line: float | None = None
        self._printed_state: int | None = None
        self._status = ""
        self._live: Live | None = None
        self._spinner = Spinner("dots", style="cyan")

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> SessionDisplay:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self.plain or self._live is not None:
            return
        self._live = Live(
            console=self.console,
            get_renderable=self.renderable,
            auto_refresh=self._auto_refresh,
            refresh_per_second=8,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # --- input -----------------------------------------------------------------------------------

    def update(self, event: pb.SessionEvent) -> bool:
        """Show one message; False when it was ignored (duplicate or backwards sequence)."""
        previous_state = self.view.state
        if not self.view.apply(event):
            return False
        self._status = ""
        if self.plain:
            self._plain_update(previous_state)
        elif self._live is not None:
            self._live.refresh()
        return True

    def notice(self, text: str) -> None:
        """Connection news ("reconnecting in 2s"): a status line live, a line of its own in plain mode."""
        if self.plain:
            self._line(f"{self.view.name or 'watch'}: {text}")
            return
        self._status = text
        if self._live is not None:
            self._live.refresh()

    def finish(self, outcomes: Outcomes | None = None) -> None:
        """Stop the live region and print the summary of a session in a terminal state."""
        self.stop()
        if self.plain:
            for line in self.summary_lines(outcomes):
                self._line(line)
        else:
            self.console.print(self.summary(outcomes))

    # --- live rendering --------------------------------------------------------------------------

    def renderable(self) -> RenderableType:
        """The live region for the current view (called by rich's refresh, also from its thread)."""
        v = self.view
        header = Text.assemble((v.title or "session", "bold"), "  ", (state_label(v.state), state_style(v.state)))
        parts: list[RenderableType] = [header]
        if v.state == pb.SESSION_STATE_DISCOVERING:
            parts.append(self._discovery_renderable())
        elif v.state == pb.SESSION_STATE_RUNNING:
            parts.append(self._training_renderable())
        elif v.state == pb.SESSION_STATE_PAUSED:
            pct = percentage_text(v.training)
            where = f"at {pct} ({training_counts(v.training)})" if pct else f"({training_counts(v.training)})"
            parts.append(
                Text(f"Paused {where}; resume with: imagetraining sessions resume {session_id(v.name)}", "yellow")
            )
        elif v.state == pb.SESSION_STATE_PENDING:
            parts.append(Text(f"Pending; start it with: imagetraining sessions start {session_id(v.name)}", "yellow"))
        elif v.terminal:
            parts.append(Text(f"{state_label(v.state).capitalize()}. {outcome_counts(v.training)}"))
        else:
            self._spinner.update(text=Text("Connecting..."))
            parts.append(self._spinner)
        if self._status:
            parts.append(Text(self._status, "dim italic"))
        return Group(*parts)

    def _discovery_renderable(self) -> RenderableType:
        d = self.view.discovery
        self._spinner.update(text=Text(discovery_text(d)))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row(self._spinner)
        details = f"{d.files_seen:,} files seen · {format_rate(d.files_per_second, 'files')}"
        if d.unreadable_paths:
            details += f" · {d.unreadable_paths:,} unreadable"
        grid.add_row(Text(details, "dim"))
        if d.current_directory:
            grid.add_row(Text(d.current_directory, "dim", no_wrap=True, overflow="ellipsis"))
        return grid

    def _training_renderable(self) -> RenderableType:
        t = self.view.training
        pct = percentage_text(t)
        bar_width = max(10, min(40, self.console.width - 60))
        grid = Table.grid(padding=(0, 1))
        if pct is None:
            # Total not final: a pulsing bar, the counts so far, no percentage.
            bar = ProgressBar(total=None, width=bar_width)
            line: list[RenderableType] = [
                bar,
                Text(training_counts(t)),
                Text(format_rate(t.images_per_second, "images")),
            ]
        else:
            bar = ProgressBar(total=100.0, completed=min(100.0, max(0.0, t.percentage)), width=bar_width)
            eta = eta_text(t)
            line = [
                bar,
                Text(pct, "bold"),
                Text(training_counts(t)),
                Text(format_rate(t.images_per_second, "images")),
                Text(f"ETA {eta}" if eta else "ETA -"),
            ]
        for _ in line:
            grid.add_column(no_wrap=True)
        grid.add_row(*line)
        counts = Text(outcome_counts(t), "dim")
        return Group(grid, counts)

    # --- summary ---------------------------------------------------------------------------------

    def summary(self, outcomes: Outcomes | None) -> RenderableType:
        v = self.view
        t = v.training
        body = Table.grid(padding=(0, 2))
        body.add_column(no_wrap=True)
        body.add_column(justify="right", no_wrap=True)
        body.add_column(overflow="ellipsis", no_wrap=True)
        body.add_row(Text("Processed", "bold"), f"{t.processed_images:,}", "")
        for label, total, groups in (
            ("Skipped", t.skipped_images, outcomes.skipped if outcomes else {}),
            ("Failed", t.failed_images, outcomes.failed if outcomes else {}),
        ):
            body.add_row(Text(label, "bold"), f"{total:,}", "")
            for reason, group in sorted(groups.items(), key=lambda kv: (-kv[1].count, kv[0])):
                body.add_row(f"  {reason}", f"{group.count:,}", Text(f"e.g. {group.example}", "dim"))
        parts: list[RenderableType] = [body]
        if outcomes and outcomes.truncated:
            # Below the table, not a row of it: it is about both groups, not the last reason listed.
            parts.append(Text("Reasons counted over the first skipped and failed jobs only.", "dim italic"))
        if v.state_reason:
            parts.append(Text(f"Reason: {v.state_reason}", state_style(v.state)))
        if v.state == pb.SESSION_STATE_FAILED:
            parts.append(Text(f"Run it again with: imagetraining sessions restart {session_id(v.name)}", "dim"))
        if t.failed_images:
            parts.append(Text(f"Details: imagetraining jobs {session_id(v.name)} --state failed", "dim"))
        title = Text.assemble((v.title, "bold"), " ", (state_label(v.state), state_style(v.state)))
        return Panel(Group(*parts), title=title, title_align="left", border_style=state_style(v.state), expand=False)

    def summary_lines(self, outcomes: Outcomes | None) -> list[str]:
        v = self.view
        t = v.training
        lines = [
            f"{v.name}: {state_label(v.state)}: processed {t.processed_images:,}, "
            f"skipped {t.skipped_images:,}, failed {t.failed_images:,}"
        ]
        if outcomes:
            for label, groups in (("skipped", outcomes.skipped), ("failed", outcomes.failed)):
                for reason, group in sorted(groups.items(), key=lambda kv: (-kv[1].count, kv[0])):
                    lines.append(f"{v.name}: {label} {reason}: {group.count:,} (e.g. {group.example})")
            if outcomes.truncated:
                lines.append(f"{v.name}: (reasons from the first jobs only)")
        if v.state_reason:
            lines.append(f"{v.name}: reason: {v.state_reason}")
        return lines

    # --- plain mode ------------------------------------------------------------------------------

    def _plain_update(self, previous_state: int) -> None:
        v = self.view
        if v.state != self._printed_state:
            self._printed_state = v.state
            line = f"{v.name}: {state_label(v.state)}"
            if v.state_reason:
                line += f" ({v.state_reason})"
            self._line(line)
            # The state line says where it stands; the next progress message gets a line at once.
            self._last_progress_line = None
            return
        now = self._clock()
        if self._last_progress_line is not None and now - self._last_progress_line < self._progress_interval:
            return
        progress = self.progress_line()
        if progress is None:
            return
        self._last_progress_line = now
        self._line(progress)

    def progress_line(self) -> str | None:
        """One line with the counters of the current phase, or None outside discovery and training."""
        v = self.view
        if v.state == pb.SESSION_STATE_DISCOVERING:
            d = v.discovery
            return f"{v.name}: {discovery_text(d)} ({format_rate(d.files_per_second, 'files')})"
        if v.state == pb.SESSION_STATE_RUNNING:
            t = v.training
            pct = percentage_text(t)
            parts: list[str] = [pct] if pct else []
            parts.append(training_counts(t))
            parts.append(format_rate(t.images_per_second, "images"))
            eta = eta_text(t)
            if pct and eta:
                parts.append(f"ETA {eta}")
            return f"{v.name}: training: {', '.join(parts)}"
        return None

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

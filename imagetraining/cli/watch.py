"""Following a session to its end: WatchSession with reconnects, or polling where it is missing.

The stream is the normal path. A dropped connection, UNAVAILABLE (server restarting) or
RESOURCE_EXHAUSTED (this subscriber was evicted as slow, or the server is full) is not the end of a
watch: it reconnects with exponential backoff (capped) and `after_sequence` = the last sequence seen,
so it continues where it stopped and shows nothing twice. A server that does not implement
WatchSession (UNIMPLEMENTED: older servers) is polled with GetSessionProgress instead, and the
answers are turned into the same `SessionEvent`s so the display does not care where they came from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf import json_format
from rich.console import Console

from imagetraining import convert
from imagetraining.cli.client import Client, status_code
from imagetraining.cli.display import TERMINAL_STATES, Outcomes, SessionView
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as tss

# Codes after which a plain reconnect can work. Anything else (NOT_FOUND, INVALID_ARGUMENT,
# UNAUTHENTICATED...) would fail the same way again and is shown to the user instead.
RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
# How many failed jobs / skipped jobs the summary looks at to group reasons.
SUMMARY_JOB_LIMIT = 5000


def pause(seconds: float) -> None:
    """The wait between polls and before reconnects (a module function so tests can replace it)."""
    time.sleep(seconds)


class EventSink(Protocol):
    """Where events go: the live display, or JSON lines for scripts."""

    view: SessionView

    def update(self, event: pb.SessionEvent) -> bool: ...

    def notice(self, text: str) -> None: ...


class JsonLinesSink:
    """One JSON object per event on stdout (for `--json`), with the same de-duplication as the display."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.view = SessionView()

    def update(self, event: pb.SessionEvent) -> bool:
        if not self.view.apply(event):
            return False
        line = json_format.MessageToJson(event, indent=None, preserving_proto_field_name=True)
        self.console.out(line, highlight=False)
        return True

    def notice(self, text: str) -> None:
        """Scripts read stdout; connection news is not data."""


class WatchGaveUp(Exception):
    """The server stayed unreachable for longer than the watch is willing to wait."""

    def __init__(self, message: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.code = code


class Backoff:
    """Exponential reconnect delays: initial, x2 each failure, never above `cap`; reset on success."""

    def __init__(self, initial: float = 0.5, cap: float = 10.0) -> None:
        self.initial = initial
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class Watcher:
    """Feeds one session's events into a sink until the session reaches a terminal state."""

    def __init__(
        self,
        client: Client,
        sink: EventSink,
        *,
        poll_interval: float = 0.5,
        backoff: Backoff | None = None,
        give_up_after: float = 300.0,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_first_connect: bool = True,
    ) -> None:
        """`retry_first_connect=False`: a server that cannot be reached at all is an error at once
        (exit 3), not five minutes of reconnect attempts; once connected, drops are always retried."""
        self.client = client
        self.retry_first_connect = retry_first_connect
        self.connected_once = False
        self.sink = sink
        self.poll_interval = poll_interval
        self.backoff = backoff or Backoff()
        self.give_up_after = give_up_after
        self.sleep = sleep if sleep is not None else pause
        self.clock = clock
        self.polling = False
        self._failing_since: float | None = None

    @property
    def last_sequence(self) -> int:
        last = self.sink.view.last_sequence
        return 0 if last is None else last

    def run(self, name: str, after_sequence: int = 0) -> SessionView:
        """Watch until the terminal message; returns the final view. Raises grpc.RpcError or WatchGaveUp."""
        floor = after_sequence
        while True:
            after = max(floor, self.last_sequence)
            stream = self.client.watch(tss.WatchSessionRequest(name=name, after_sequence=after))
            try:
                for response in stream:
                    self._connected()
                    self.sink.update(response.event)
                    if self.sink.view.terminal:
                        return self.sink.view
                why = "the stream ended before the session did"
                code: grpc.StatusCode | None = None
            except grpc.RpcError as error:
                code = status_code(error)
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return self.poll(name)
                if not self._retryable(code):
                    raise
                why = f"{code.name if code else 'error'}: {_details(error)}"
            finally:
                cancel = getattr(stream, "cancel", None)
                if callable(cancel):
                    cancel()
            if code is None and self._finished_meanwhile(name):
                return self.sink.view
            self._wait_before_retry(why, code)

    def poll(self, name: str) -> SessionView:
        """The fallback: GetSessionProgress every `poll_interval`, turned into SessionEvents."""
        self.polling = True
        sequence = self.last_sequence
        previous: tss.GetSessionProgressResponse | None = None
        if self.sink.view.last_sequence is None:
            # A snapshot first, as WatchSession would send: it names the session for the display.
            snapshot: tss.GetSessionResponse = self._retrying(lambda: self.client.call("GetSession", _get(name)))
            session = snapshot.session
            sequence += 1
            self.sink.update(convert.snapshot_event(session, sequence))
            if self.sink.view.terminal:
                return self.sink.view
        while True:
            progress: tss.GetSessionProgressResponse = self._retrying(
                lambda: self.client.call("GetSessionProgress", tss.GetSessionProgressRequest(name=name))
            )
            if previous is None or progress != previous:
                sequence += 1
                self.sink.update(event_from_progress(progress, sequence, previous, self.sink.view.state))
                previous = progress
            if self.sink.view.terminal:
                return self.sink.view
            self.sleep(self.poll_interval)

    def _retrying(self, call: Callable[[], tss.GetSessionProgressResponse | tss.GetSessionResponse]) -> Any:
        while True:
            try:
                result = call()
            except grpc.RpcError as error:
                code = status_code(error)
                if not self._retryable(code):
                    raise
                self._wait_before_retry(f"{code.name if code else 'error'}: {_details(error)}", code)
                continue
            self._connected()
            return result

    def _finished_meanwhile(self, name: str) -> bool:
        """After a stream that ended without a terminal message: did the session end anyway?

        A resume whose `after_sequence` is already the last one can end with nothing to send; one
        progress call tells that apart from a server going away.
        """
        try:
            progress: tss.GetSessionProgressResponse = self.client.call(
                "GetSessionProgress", tss.GetSessionProgressRequest(name=name)
            )
        except grpc.RpcError:
            return False
        if progress.state not in TERMINAL_STATES:
            return False
        if self.sink.view.state != progress.state:
            event = event_from_progress(progress, self.last_sequence + 1, None, self.sink.view.state)
            self.sink.update(event)
        return True

    def _retryable(self, code: grpc.StatusCode | None) -> bool:
        if code not in RECONNECT_CODES:
            return False
        return self.connected_once or self.retry_first_connect

    def _connected(self) -> None:
        self.connected_once = True
        self.backoff.reset()
        self._failing_since = None

    def _wait_before_retry(self, why: str, code: grpc.StatusCode | None) -> None:
        now = self.clock()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since > self.give_up_after:
            raise WatchGaveUp(f"gave up after {self.give_up_after:.0f}s without a connection ({why})", code)
        delay = self.backoff.next_delay()
        self.sink.notice(f"connection lost ({why}); reconnecting in {delay:.1f}s")
        self.sleep(delay)


def event_from_progress(
    progress: tss.GetSessionProgressResponse,
    sequence: int,
    previous: tss.GetSessionProgressResponse | None,
    shown_state: int,
) -> pb.SessionEvent:
    """A SessionEvent equivalent to a polled progress answer (kind chosen as the stream would)."""
    if progress.state != shown_state or (previous is not None and previous.state != progress.state):
        kind = pb.EVENT_KIND_STATE_CHANGE
    elif progress.state == pb.SESSION_STATE_DISCOVERING:
        kind = pb.EVENT_KIND_DISCOVERY_PROGRESS
    elif progress.state == pb.SESSION_STATE_RUNNING:
        kind = pb.EVENT_KIND_TRAINING_PROGRESS
    else:
        kind = pb.EVENT_KIND_HEARTBEAT
    return convert.event(
        progress.name,
        sequence,
        kind,
        progress.state,
        progress.state_reason,
        progress.discovery,
        progress.progress,
        stamped=False,
    )


def fetch_outcomes(client: Client, name: str, view: SessionView, limit: int = SUMMARY_JOB_LIMIT) -> Outcomes:
    """Failed and skipped jobs grouped by reason, from ListJobs (at most `limit` of each)."""
    jobs: list[pb.Job] = []
    truncated = False
    for state, count in (
        (pb.JOB_STATE_FAILED, view.training.failed_images),
        (pb.JOB_STATE_SKIPPED, view.training.skipped_images),
    ):
        if count <= 0:
            continue
        token = ""
        fetched = 0
        while True:
            response: tss.ListJobsResponse = client.call(
                "ListJobs", tss.ListJobsRequest(name=name, state=state, page_size=1000, page_token=token)
            )
            jobs.extend(response.jobs)
            fetched += len(response.jobs)
            token = response.next_page_token
            if not token:
                break
            if fetched >= limit:
                truncated = True
                break
    return Outcomes.from_jobs(jobs, truncated=truncated)


def _get(name: str) -> tss.GetSessionRequest:
    return tss.GetSessionRequest(name=name)


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else None
    return text or str(error)

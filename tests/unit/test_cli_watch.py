"""The CLI against a scripted fake control service over real loopback gRPC (no database).

It covers what the real service cannot easily be made to do on cue: a stream that drops with
UNAVAILABLE, an eviction with RESOURCE_EXHAUSTED, a server without WatchSession (UNIMPLEMENTED), and
the error rendering of google.rpc details. The real service is exercised in
tests/integration/test_cli.py.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from rich.console import Console

from imagetraining.cli import main
from imagetraining.cli import watch as watch_module
from imagetraining.cli.watch import Backoff
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as tss
from imagetraining.v1 import training_session_service_pb2_grpc as tss_grpc

NAME = "sessions/7"
Stream = Callable[[tss.WatchSessionRequest, grpc.ServicerContext], Iterator[tss.WatchSessionResponse]]


def event(seq: int, state: int, kind: int = pb.EVENT_KIND_TRAINING_PROGRESS, **training: Any) -> pb.SessionEvent:
    return pb.SessionEvent(name=NAME, sequence=seq, kind=kind, state=state, training=pb.TrainingProgress(**training))


def scripted(*events: pb.SessionEvent, end: tuple[grpc.StatusCode, str] | None = None) -> Stream:
    def stream(request: tss.WatchSessionRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        for e in events:
            yield tss.WatchSessionResponse(event=e)
        if end is not None:
            context.abort(*end)

    return stream


def status_with(code: int, message: str, detail: Any) -> grpc.Status:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[packed]))


class FakeService(tss_grpc.TrainingSessionServiceServicer):  # type: ignore[misc]
    """Answers from scripts; records what the client asked."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.watch_after: list[int] = []
        self.progress: list[tss.GetSessionProgressResponse] = []
        self.jobs: list[pb.Job] = []
        self.session = pb.Session(name=NAME, display_name="photos", root_path="/lib/photos")
        self.calls: list[tuple[str, Any]] = []
        self.scan = tss.ScanDirectoryResponse(path="/lib/photos", extensions=["jpg"])
        self.errors: dict[str, grpc.Status] = {}
        self.metadata: dict[str, str] = {}

    def _record(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        self.calls.append((method, request))
        self.metadata = dict(context.invocation_metadata())
        if method in self.errors:
            context.abort_with_status(self.errors[method])

    def WatchSession(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.watch_after.append(request.after_sequence)
        if not self.streams:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        yield from self.streams.pop(0)(request, context)

    def GetSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetSession", request, context)
        return tss.GetSessionResponse(session=self.session)

    def GetSessionProgress(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetSessionProgress", request, context)
        return self.progress.pop(0) if len(self.progress) > 1 else self.progress[0]

    def ListJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("ListJobs", request, context)
        return tss.ListJobsResponse(jobs=[j for j in self.jobs if j.state == request.state])

    def ScanDirectory(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("ScanDirectory", request, context)
        return self.scan

    def CreateSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("CreateSession", request, context)
        return tss.CreateSessionResponse(session=self.session)

    def UpdateSubdirectories(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("UpdateSubdirectories", request, context)
        return tss.UpdateSubdirectoriesResponse(session=self.session)

    def StartSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("StartSession", request, context)
        started = pb.Session()
        started.CopyFrom(self.session)
        started.state = pb.SESSION_STATE_DISCOVERING
        return tss.StartSessionResponse(session=started)

    def method_calls(self, method: str) -> list[Any]:
        return [request for name, request in self.calls if name == method]


@pytest.fixture
def fake() -> Iterator[tuple[FakeService, str]]:
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tss_grpc.add_TrainingSessionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff and poll waits are recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(watch_module, "pause", recorded.append)
    return recorded


def run(address: str, *argv: str, terminal: bool = False) -> tuple[int, str, str]:
    out = Console(record=True, width=120, file=io.StringIO(), force_terminal=terminal)
    err = Console(record=True, width=120, file=io.StringIO())
    code = main(["--address", address, "--timeout", "5", *argv], out=out, err=err)
    return code, out.export_text(), err.export_text()


def test_watch_reconnects_with_after_sequence_and_shows_nothing_twice(
    fake: tuple[FakeService, str], sleeps: list[float]
) -> None:
    service, address = fake
    running = pb.SESSION_STATE_RUNNING
    service.streams = [
        scripted(
            event(1, pb.SESSION_STATE_DISCOVERING, pb.EVENT_KIND_SNAPSHOT),
            event(2, running, pb.EVENT_KIND_STATE_CHANGE, total_images=100),
            end=(grpc.StatusCode.UNAVAILABLE, "server shutting down"),
        ),
        scripted(
            # A server that repeats the last message must not make the client show it twice.
            event(2, running, pb.EVENT_KIND_STATE_CHANGE, total_images=100),
            event(3, running, total_images=100, processed_images=40, percentage=40.0),
            end=(grpc.StatusCode.RESOURCE_EXHAUSTED, "subscriber evicted: last delivered sequence 3"),
        ),
        scripted(end=(grpc.StatusCode.UNAVAILABLE, "connection refused")),
        scripted(
            event(4, running, total_images=100, processed_images=90, percentage=90.0),
            event(5, pb.SESSION_STATE_COMPLETED, pb.EVENT_KIND_STATE_CHANGE, total_images=100, processed_images=100),
        ),
    ]
    code, out, _ = run(address, "watch", "7", "--plain")
    assert code == 0, out
    assert service.watch_after == [0, 2, 3, 3]
    # Exponential, reset after each connection that delivered something.
    assert sleeps == [0.5, 0.5, 1.0]
    lines = out.splitlines()
    assert lines.count("sessions/7: RUNNING") == 1
    assert "sessions/7: training: 40.0%, 40/100 images, - images/s" in lines
    assert any("reconnecting in 0.5s" in line and "UNAVAILABLE" in line for line in lines)
    assert any("RESOURCE_EXHAUSTED" in line for line in lines)
    assert "sessions/7: COMPLETED: processed 100, skipped 0, failed 0" in lines


def test_watch_json_prints_one_event_per_line(fake: tuple[FakeService, str], sleeps: list[float]) -> None:
    service, address = fake
    service.streams = [
        scripted(
            event(1, pb.SESSION_STATE_RUNNING, pb.EVENT_KIND_SNAPSHOT),
            event(2, pb.SESSION_STATE_FAILED, pb.EVENT_KIND_STATE_CHANGE),
        )
    ]
    code, out, _ = run(address, "watch", "sessions/7", "--json")
    assert code == 1  # failed
    lines = out.splitlines()
    assert len(lines) == 2
    assert '"sequence": "2"' in lines[1] and "SESSION_STATE_FAILED" in lines[1]


def test_watch_falls_back_to_polling_when_unimplemented(fake: tuple[FakeService, str], sleeps: list[float]) -> None:
    service, address = fake
    service.session.state = pb.SESSION_STATE_DISCOVERING

    def progress(state: int, **kw: Any) -> tss.GetSessionProgressResponse:
        discovery = pb.DiscoveryProgress(images_found=kw.pop("images", 0), directories_scanned=kw.pop("dirs", 0))
        return tss.GetSessionProgressResponse(
            name=NAME, state=state, discovery=discovery, progress=pb.TrainingProgress(**kw)
        )

    service.progress = [
        progress(pb.SESSION_STATE_DISCOVERING, images=120, dirs=7),
        progress(pb.SESSION_STATE_RUNNING, images=200, dirs=9, total_images=200, processed_images=100, percentage=50.0),
        progress(pb.SESSION_STATE_RUNNING, images=200, dirs=9, total_images=200, processed_images=100, percentage=50.0),
        progress(
            pb.SESSION_STATE_COMPLETED,
            total_images=200,
            processed_images=197,
            failed_images=2,
            skipped_images=1,
            percentage=100.0,
        ),
    ]
    service.jobs = [
        pb.Job(path="/lib/photos/a.jpg", state=pb.JOB_STATE_FAILED, error_class="corrupt"),
        pb.Job(path="/lib/photos/b.jpg", state=pb.JOB_STATE_FAILED, error_class="corrupt"),
        pb.Job(path="/lib/photos/c.jpg", state=pb.JOB_STATE_SKIPPED, skip_reason="duplicate of asset 3"),
    ]
    code, out, err = run(address, "watch", "7", "--plain")
    assert code == 0, out + err
    assert service.watch_after == [0]
    assert sleeps == [0.5, 0.5, 0.5]  # the poll interval, between the four answers
    lines = out.splitlines()
    assert lines == [
        "sessions/7: DISCOVERING",
        "sessions/7: Discovering... 120 images found in 7 directories (- files/s)",
        "sessions/7: RUNNING",
        "sessions/7: COMPLETED",
        "sessions/7: COMPLETED: processed 197, skipped 1, failed 2",
        "sessions/7: skipped duplicate: 1 (e.g. /lib/photos/c.jpg)",
        "sessions/7: failed corrupt: 2 (e.g. /lib/photos/a.jpg)",
    ]
    assert "polled" in err


def test_watch_stops_on_an_error_that_a_retry_cannot_fix(fake: tuple[FakeService, str], sleeps: list[float]) -> None:
    service, address = fake
    service.streams = [scripted(end=(grpc.StatusCode.NOT_FOUND, "sessions/7 not found"))]
    code, _, err = run(address, "watch", "7", "--plain")
    assert code == 2
    assert "error: NOT_FOUND: sessions/7 not found" in err
    assert sleeps == []


def test_errors_show_code_message_and_details(fake: tuple[FakeService, str]) -> None:
    service, address = fake
    message = "No subdirectories selected for session 7: select at least one with UpdateSubdirectories"
    service.errors["StartSession"] = status_with(
        code_pb2.FAILED_PRECONDITION,
        message,
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="SELECTION", subject=NAME, description="no subdirectory is selected"
                )
            ]
        ),
    )
    code, _, err = run(address, "sessions", "start", "7")
    assert code == 2
    assert f"error: FAILED_PRECONDITION: {message}" in err
    assert "precondition SELECTION of sessions/7: no subdirectory is selected" in err
    assert "imagetraining sessions select 7" in err

    service.errors["CreateSession"] = status_with(
        code_pb2.INVALID_ARGUMENT,
        "root_path: must be inside a library root",
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="root_path", description="must be inside a library root"
                )
            ]
        ),
    )
    code, _, err = run(address, "sessions", "create", "/etc")
    assert code == 2
    assert "error: INVALID_ARGUMENT: root_path: must be inside a library root" in err
    assert "invalid root_path: must be inside a library root" in err

    service.errors["GetSession"] = rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message="boom"))
    code, _, err = run(address, "sessions", "get", "7")
    assert (code, err.strip()) == (1, "error: INTERNAL: boom")


def test_unavailable_server_exits_3() -> None:
    code, _, err = run("127.0.0.1:1", "sessions", "list")
    assert code == 3
    assert err.startswith("error: UNAVAILABLE:")
    assert "is the control service running at 127.0.0.1:1?" in err


def test_train_selects_the_folder_itself_starts_and_watches(fake: tuple[FakeService, str], sleeps: list[float]) -> None:
    service, address = fake
    service.scan.subdirectories.extend(
        [tss.ScannedDirectory(path="/lib/photos/a", image_count=3), tss.ScannedDirectory(path="/lib/photos/b")]
    )
    service.session.subdirectories.extend(
        [pb.Subdirectory(path="/lib/photos/a"), pb.Subdirectory(path="/lib/photos/b")]
    )
    service.streams = [
        scripted(
            event(1, pb.SESSION_STATE_DISCOVERING, pb.EVENT_KIND_SNAPSHOT),
            event(2, pb.SESSION_STATE_COMPLETED, pb.EVENT_KIND_STATE_CHANGE, total_images=3, processed_images=3),
        )
    ]
    code, out, err = run(address, "train", "/lib/photos", "--plain", "--ext", "JPG,.png")
    assert code == 0, out + err
    (create,) = service.method_calls("CreateSession")
    assert create.root_path == "/lib/photos" and list(create.subdirectories) == []
    assert list(create.config.extensions) == ["jpg", "png"]
    uuid.UUID(create.request_id)
    (update,) = service.method_calls("UpdateSubdirectories")
    # The folder itself: its own images and everything under it (a flat folder trains the same way).
    assert [(s.path, s.selected) for s in update.selections] == [("/lib/photos", True)]
    (start,) = service.method_calls("StartSession")
    assert start.name == NAME and uuid.UUID(start.request_id)
    assert "started over /lib/photos (3 images)" in out
    assert "sessions/7: COMPLETED: processed 3" in out


def test_train_without_images_says_what_to_do(fake: tuple[FakeService, str]) -> None:
    service, address = fake
    service.scan.subdirectories.append(tss.ScannedDirectory(path="/lib/photos/empty"))
    code, _, err = run(address, "train", "/lib/photos")
    assert code == 2
    assert "no images in /lib/photos or its subdirectories" in err and "--ext" in err
    assert service.method_calls("CreateSession") == []


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial=0.5, cap=4.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_watch_of_an_unreachable_server_fails_at_once(sleeps: list[float]) -> None:
    code, _, err = run("127.0.0.1:1", "watch", "7")
    assert code == 3
    assert err.startswith("error: UNAVAILABLE:")
    assert sleeps == []  # no reconnect loop when it was never reachable


def test_watch_on_a_terminal_draws_the_live_display_and_a_summary_panel(
    fake: tuple[FakeService, str], sleeps: list[float]
) -> None:
    service, address = fake
    service.streams = [
        scripted(
            event(1, pb.SESSION_STATE_RUNNING, pb.EVENT_KIND_SNAPSHOT, total_images=10),
            event(2, pb.SESSION_STATE_RUNNING, total_images=10, processed_images=5, percentage=50.0),
            event(3, pb.SESSION_STATE_CANCELLED, pb.EVENT_KIND_STATE_CHANGE, total_images=10, processed_images=5),
        )
    ]
    code, out, _ = run(address, "watch", "7", terminal=True)
    assert code == 1  # cancelled
    assert "50.0%" in out and "5/10 images" in out
    assert "╭─ sessions/7 CANCELLED" in out


def test_token_is_sent_as_bearer_metadata(fake: tuple[FakeService, str], monkeypatch: pytest.MonkeyPatch) -> None:
    service, address = fake
    code, out, _ = run(address, "sessions", "get", "sessions/7", "--token", "s3cret")
    assert code == 0 and "sessions/7" in out
    assert service.metadata["authorization"] == "Bearer s3cret"
    assert service.method_calls("GetSession")[-1].name == NAME

    monkeypatch.setenv("IMAGETRAINING_AUTH_TOKEN", "from-env")
    code, _, _ = run(address, "--json", "sessions", "get", "7")
    assert code == 0
    assert service.metadata["authorization"] == "Bearer from-env"

"""TrainingSessionService over gRPC: protobuf in, a use case call, protobuf out.

Nothing here decides anything: names are parsed by `imagetraining.names`, rules and SQL live in
`control_service.sessions`, and errors are domain exceptions that `imagetraining.rpc.ErrorInterceptor`
turns into status codes. Keeping this layer thin keeps every RPC's behaviour testable in one place.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from control_service.inputs import validate_config
from control_service.pages import job_state_filter, session_state_filter
from control_service.refusals import request_deadline
from control_service.search import Search
from control_service.sessions import SessionUseCases
from imagetraining import convert
from imagetraining.errors import Unimplemented
from imagetraining.names import parse_session_name
from imagetraining.streaming import StreamWriter, start_stream
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc

# WatchSession's seam: (session id, after_sequence) -> the events to send. The relay plugs in here.
EventSource = Callable[[int, int], AsyncGenerator[pb.SessionEvent, None]]
# The WatchSessionResponse to write for an event: the message, or its serialized bytes (see server.py).
Encoder = Callable[[pb.SessionEvent], "api.WatchSessionResponse | bytes"]
# Raises ResourceExhausted when no subscriber can be taken now (the relay's cap), before any other work.
Admission = Callable[[], None]


def watch_response(event: pb.SessionEvent) -> api.WatchSessionResponse:
    return api.WatchSessionResponse(event=event)


def _config(config: pb.SessionConfig) -> dict[str, Any]:
    recursive = config.recursive if config.HasField("recursive") else None
    distance = config.near_duplicate_distance if config.HasField("near_duplicate_distance") else None
    return validate_config(
        list(config.extensions),
        recursive,
        config.batch_size,
        near_duplicate_distance=distance,
        skip_near_duplicates=config.skip_near_duplicates,
    )


def _time_remaining(context: Any) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else float(remaining)


def _bounded(context: Any) -> None:
    """Let the write this request makes wait for locks only as long as its deadline allows."""
    remaining = _time_remaining(context)
    request_deadline.set(None if remaining is None else time.monotonic() + remaining)


class TrainingSessionServicer(api_grpc.TrainingSessionServiceServicer):
    def __init__(
        self,
        sessions: SessionUseCases,
        watcher: EventSource | None = None,
        *,
        write_timeout: float = 30.0,
        encode: Encoder = watch_response,
        admit: Admission | None = None,
        search: Search | None = None,
    ) -> None:
        self.sessions = sessions
        self.search = search
        self.watcher = watcher
        self.write_timeout = write_timeout
        # The relay's events are shared by every subscriber: server.py serializes each one once.
        self.encode = encode
        self.admit = admit

    async def CreateSession(self, request: api.CreateSessionRequest, context: Any) -> api.CreateSessionResponse:
        _bounded(context)
        session = await self.sessions.create(
            display_name=request.display_name,
            root_path=request.root_path,
            subdirectories=list(request.subdirectories),
            config=_config(request.config),
            request_id=request.request_id,
        )
        return api.CreateSessionResponse(session=session)

    async def GetSession(self, request: api.GetSessionRequest, context: Any) -> api.GetSessionResponse:
        return api.GetSessionResponse(session=await self.sessions.get(parse_session_name(request.name)))

    async def ListSessions(self, request: api.ListSessionsRequest, context: Any) -> api.ListSessionsResponse:
        sessions, token = await self.sessions.list_sessions(
            request.page_size, request.page_token, session_state_filter(request.state)
        )
        return api.ListSessionsResponse(sessions=sessions, next_page_token=token)

    async def UpdateSession(self, request: api.UpdateSessionRequest, context: Any) -> api.UpdateSessionResponse:
        _bounded(context)
        session_id = parse_session_name(request.name)
        display_name = request.display_name if request.HasField("display_name") else None
        config = _config(request.config) if request.HasField("config") else None
        return api.UpdateSessionResponse(session=await self.sessions.update(session_id, display_name, config))

    async def DeleteSession(self, request: api.DeleteSessionRequest, context: Any) -> api.DeleteSessionResponse:
        _bounded(context)
        await self.sessions.delete(parse_session_name(request.name))
        return api.DeleteSessionResponse()

    async def ScanDirectory(self, request: api.ScanDirectoryRequest, context: Any) -> api.ScanDirectoryResponse:
        result = await self.sessions.scan_directory(
            request.path, list(request.extensions), request.max_files, _time_remaining(context)
        )
        return api.ScanDirectoryResponse(
            path=result.path,
            subdirectories=[
                api.ScannedDirectory(path=c.path, image_count=c.image_count, truncated=c.truncated)
                for c in result.subdirectories
            ],
            direct_image_count=result.direct_image_count,
            truncated=result.truncated,
            extensions=list(result.extensions),
            unusable_subdirectories=result.unusable,
        )

    async def UpdateSubdirectories(
        self, request: api.UpdateSubdirectoriesRequest, context: Any
    ) -> api.UpdateSubdirectoriesResponse:
        _bounded(context)
        session_id = parse_session_name(request.name)
        selections = [(s.path, s.selected) for s in request.selections]
        return api.UpdateSubdirectoriesResponse(
            session=await self.sessions.update_subdirectories(session_id, selections)
        )

    async def ValidateSession(self, request: api.ValidateSessionRequest, context: Any) -> api.ValidateSessionResponse:
        v = await self.sessions.validate(parse_session_name(request.name), _time_remaining(context))
        return api.ValidateSessionResponse(
            valid=v.valid,
            problems=[
                api.ValidationProblem(type=p.type, subject=p.subject, description=p.description) for p in v.problems
            ],
            state=convert.SESSION_STATE_TO_PROTO[v.state],
            image_count=v.image_count,
            truncated=v.truncated,
            selected_subdirectories=[
                api.ScannedDirectory(path=c.path, image_count=c.image_count, truncated=c.truncated) for c in v.selected
            ],
            subdirectories_total=v.subdirectories_total,
            subdirectories_selected=v.subdirectories_selected,
            supported_formats=list(v.supported_formats),
        )

    async def StartSession(self, request: api.StartSessionRequest, context: Any) -> api.StartSessionResponse:
        _bounded(context)
        session_id = parse_session_name(request.name)
        return api.StartSessionResponse(session=await self.sessions.start(session_id, request.request_id))

    async def PauseSession(self, request: api.PauseSessionRequest, context: Any) -> api.PauseSessionResponse:
        _bounded(context)
        return api.PauseSessionResponse(session=await self.sessions.pause(parse_session_name(request.name)))

    async def ResumeSession(self, request: api.ResumeSessionRequest, context: Any) -> api.ResumeSessionResponse:
        _bounded(context)
        return api.ResumeSessionResponse(session=await self.sessions.resume(parse_session_name(request.name)))

    async def CancelSession(self, request: api.CancelSessionRequest, context: Any) -> api.CancelSessionResponse:
        _bounded(context)
        return api.CancelSessionResponse(session=await self.sessions.cancel(parse_session_name(request.name)))

    async def RestartSession(self, request: api.RestartSessionRequest, context: Any) -> api.RestartSessionResponse:
        _bounded(context)
        session_id = parse_session_name(request.name)
        failed_only = request.scope == api.RESTART_SCOPE_FAILED_ONLY
        session = await self.sessions.restart(session_id, failed_only, request.request_id)
        return api.RestartSessionResponse(session=session)

    async def GetSessionProgress(
        self, request: api.GetSessionProgressRequest, context: Any
    ) -> api.GetSessionProgressResponse:
        p = await self.sessions.progress(parse_session_name(request.name))
        return api.GetSessionProgressResponse(
            name=p.name,
            state=convert.SESSION_STATE_TO_PROTO[p.state],
            state_reason=p.state_reason,
            progress=p.training,
            discovery=p.discovery,
        )

    async def ListJobs(self, request: api.ListJobsRequest, context: Any) -> api.ListJobsResponse:
        session_id = parse_session_name(request.name)
        jobs, token = await self.sessions.list_jobs(
            session_id, request.page_size, request.page_token, job_state_filter(request.state)
        )
        return api.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def FindSimilarImages(
        self, request: api.FindSimilarImagesRequest, context: Any
    ) -> api.FindSimilarImagesResponse:
        session_id = parse_session_name(request.session, "session") if request.session else None
        if self.search is None:
            raise Unimplemented("FindSimilarImages is not available on this server")
        return await self.search.find_similar(request, session_id)

    async def WatchSession(  # type: ignore[override]  # written with context.write, not yield
        self, request: api.WatchSessionRequest, context: Any
    ) -> None:
        session_id = parse_session_name(request.name)
        if self.watcher is None:
            raise Unimplemented("WatchSession is not available on this server yet; poll GetSessionProgress instead")
        if self.admit is not None:
            # Over the cap: RESOURCE_EXHAUSTED at once, without a database read. In a burst of stream
            # starts the calls behind this one wait in grpc core until this process accepts them.
            self.admit()
        await self.sessions.get(session_id)  # NOT_FOUND before the stream starts
        await start_stream(context)
        last = request.after_sequence
        encode, writer = self.encode, StreamWriter(context, self.write_timeout)
        async with contextlib.aclosing(self.watcher(session_id, request.after_sequence)) as events:
            async for event in events:
                # A client that stops reading blocks this write (HTTP/2 flow control): it is ended
                # with its last sequence instead of pinning the stream forever.
                await writer.write(encode(event), last)
                last = event.sequence

"""The commands of the `imagetraining` CLI: each is one or a few RPCs and an output.

`Context` carries the parsed arguments, the consoles and the client; a command returns its exit
code (imagetraining/cli/client.py defines them). The parser and `main` are in imagetraining/cli/app.py.
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from google.protobuf import json_format
from rich.console import Console

from imagetraining.cli import output
from imagetraining.cli.client import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Client,
    ClientOptions,
)
from imagetraining.cli.display import Outcomes, SessionDisplay, SessionView, session_id
from imagetraining.cli.watch import JsonLinesSink, Watcher, fetch_outcomes
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as tss

SESSION_STATES = {
    label.removeprefix("SESSION_STATE_").lower(): value
    for label, value in pb.SessionState.items()
    if value != pb.SESSION_STATE_UNSPECIFIED
}
# UpdateSubdirectories and CreateSession take at most this many paths per request.
MAX_PATHS_PER_REQUEST = 1000
JOB_STATES = {
    label.removeprefix("JOB_STATE_").lower(): value
    for label, value in pb.JobState.items()
    if value != pb.JOB_STATE_UNSPECIFIED
}


class Context:
    """What a command needs: its parsed arguments, a client, and where to write."""

    def __init__(self, args: argparse.Namespace, out: Console, err: Console) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.json: bool = args.json
        self.options = ClientOptions(
            address=args.address,
            token=args.token or None,
            tls_ca=Path(args.tls_ca) if args.tls_ca else None,
            timeout=args.timeout,
        )
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.options)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def hint(self, text: str) -> None:
        """A suggested next command: for people only, so on stderr and never in --json output."""
        if not self.json:
            self.err.print(text, style="dim", markup=False, highlight=False)


def session_name(value: str) -> str:
    """Both `7` and `sessions/7` name session 7; anything else goes to the server as typed, to judge."""
    value = value.strip()
    return f"sessions/{value}" if value.isdigit() else value


def absolute(path: str) -> str:
    """An absolute path for the server (relative ones are taken from the current directory)."""
    return path if os.path.isabs(path) else os.path.abspath(path)


def extensions(values: Sequence[str] | None) -> list[str]:
    """`--ext jpg --ext .PNG,webp` -> ["jpg", "png", "webp"]."""
    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip().lstrip(".").lower()
            if part and part not in out:
                out.append(part)
    return out


def session_config(args: argparse.Namespace) -> pb.SessionConfig:
    config = pb.SessionConfig(extensions=extensions(args.ext))
    if args.no_recursive:
        config.recursive = False
    if args.near_duplicate_distance is not None:
        config.near_duplicate_distance = args.near_duplicate_distance
    config.skip_near_duplicates = bool(args.skip_near_duplicates)
    return config


def request_id() -> str:
    return str(uuid.uuid4())


# --- sessions ------------------------------------------------------------------------------------


def cmd_create(ctx: Context) -> int:
    a = ctx.args
    response: tss.CreateSessionResponse = ctx.client.call(
        "CreateSession",
        tss.CreateSessionRequest(
            display_name=a.name or "",
            root_path=absolute(a.root),
            subdirectories=a.subdir or [],
            config=session_config(a),
            request_id=request_id(),
        ),
    )
    session = response.session
    if ctx.json:
        output.print_json(ctx.out, response)
        return EXIT_OK
    ctx.out.print(output.session_panel(session))
    sid = session_id(session.name)
    selected = any(sub.selected for sub in session.subdirectories)
    ctx.hint(
        f"next: {output.next_step(session.state, sid, selected=selected)}"
        + ("" if selected else "  (nothing is selected yet)")
    )
    return EXIT_OK


def _pages(fetch: Callable[[str], Any], take: Callable[[Any], None], *, every_page: bool) -> str:
    """Call a List RPC page by page (only the first unless `every_page`); returns the next page token."""
    token = ""
    while True:
        response = fetch(token)
        take(response)
        token = str(response.next_page_token)
        if not token or not every_page:
            return token


def cmd_list(ctx: Context) -> int:
    a = ctx.args
    state = SESSION_STATES[a.state] if a.state else pb.SESSION_STATE_UNSPECIFIED
    merged = tss.ListSessionsResponse()
    merged.next_page_token = _pages(
        lambda token: ctx.client.call(
            "ListSessions", tss.ListSessionsRequest(page_size=a.page_size or 0, page_token=token, state=state)
        ),
        lambda response: merged.sessions.extend(response.sessions),
        every_page=a.all,
    )
    if ctx.json:
        output.print_json(ctx.out, merged)
        return EXIT_OK
    if not merged.sessions:
        ctx.out.print("no sessions" + (f" in state {a.state}" if a.state else ""), highlight=False)
    else:
        ctx.out.print(output.sessions_table(merged.sessions))
    if merged.next_page_token:
        ctx.hint("more sessions: add --all")
    return EXIT_OK


def cmd_get(ctx: Context) -> int:
    response: tss.GetSessionResponse = ctx.client.call(
        "GetSession", tss.GetSessionRequest(name=session_name(ctx.args.session))
    )
    if ctx.json:
        output.print_json(ctx.out, response)
    else:
        ctx.out.print(output.session_panel(response.session))
    return EXIT_OK


def _transition(method: str, verb: str, build: Callable[[str], object]) -> Command:
    """A state-changing command; its hint is the next step for the state the session is now in."""

    def command(ctx: Context) -> int:
        name = session_name(ctx.args.session)
        response = ctx.client.call(method, build(name))  # type: ignore[arg-type]
        if ctx.json:
            output.print_json(ctx.out, response)
            return EXIT_OK
        session: pb.Session = response.session
        ctx.out.print(output.session_line(session, verb), soft_wrap=True)  # one line, even piped
        ctx.hint(f"next: {output.next_step(session.state, session_id(session.name))}")
        return EXIT_OK

    return command


cmd_start = _transition(
    "StartSession", "started", lambda name: tss.StartSessionRequest(name=name, request_id=request_id())
)
cmd_pause = _transition("PauseSession", "paused", lambda name: tss.PauseSessionRequest(name=name))
cmd_resume = _transition("ResumeSession", "resumed", lambda name: tss.ResumeSessionRequest(name=name))
cmd_cancel = _transition("CancelSession", "cancelled", lambda name: tss.CancelSessionRequest(name=name))


def cmd_restart(ctx: Context) -> int:
    scope = tss.RESTART_SCOPE_FAILED_ONLY if ctx.args.failed_only else tss.RESTART_SCOPE_ALL
    return _transition(
        "RestartSession",
        "restarted",
        lambda name: tss.RestartSessionRequest(name=name, scope=scope, request_id=request_id()),
    )(ctx)


def cmd_delete(ctx: Context) -> int:
    name = session_name(ctx.args.session)
    response: tss.DeleteSessionResponse = ctx.client.call("DeleteSession", tss.DeleteSessionRequest(name=name))
    if ctx.json:
        output.print_json(ctx.out, response)
    else:
        ctx.out.print(f"{name} deleted", highlight=False)
    return EXIT_OK


def cmd_select(ctx: Context) -> int:
    a = ctx.args
    name = session_name(a.session)
    selected = not a.unselect
    response = update_selection(ctx, name, a.paths, selected)
    if ctx.json:
        output.print_json(ctx.out, response)
        return EXIT_OK
    ctx.out.print(output.session_panel(response.session))
    if selected:
        state = response.session.state
        step = output.next_step(state, session_id(name))
        if state in (pb.SESSION_STATE_PAUSED, pb.SESSION_STATE_DISCOVERING, pb.SESSION_STATE_RUNNING):
            ctx.hint(f"next: {step}")  # ValidateSession checks a start or restart, neither of which works now
        else:
            ctx.hint(f"next: imagetraining validate {session_id(name)}  or  {step}")
    return EXIT_OK


def update_selection(ctx: Context, name: str, paths: Sequence[str], selected: bool) -> tss.UpdateSubdirectoriesResponse:
    """UpdateSubdirectories in requests of at most MAX_PATHS_PER_REQUEST paths (the server's limit)."""
    response = tss.UpdateSubdirectoriesResponse()
    for start in range(0, len(paths), MAX_PATHS_PER_REQUEST):
        chunk = paths[start : start + MAX_PATHS_PER_REQUEST]
        response = ctx.client.call(
            "UpdateSubdirectories",
            tss.UpdateSubdirectoriesRequest(
                name=name, selections=[tss.SubdirectorySelection(path=p, selected=selected) for p in chunk]
            ),
        )
    return response


# --- scan, validate, jobs ------------------------------------------------------------------------


def cmd_scan(ctx: Context) -> int:
    response: tss.ScanDirectoryResponse = ctx.client.call(
        "ScanDirectory", tss.ScanDirectoryRequest(path=absolute(ctx.args.path), extensions=extensions(ctx.args.ext))
    )
    if ctx.json:
        output.print_json(ctx.out, response)
    else:
        ctx.out.print(output.scan_output(response))
    return EXIT_OK


def cmd_similar(ctx: Context) -> int:
    """The images most like PATH (a trained image), within one session (--session) or all."""
    a = ctx.args
    path = absolute(a.path)
    request = tss.FindSimilarImagesRequest(
        path=path, k=a.k, session=session_name(a.session) if a.session else "", exact=a.exact
    )
    response: tss.FindSimilarImagesResponse = ctx.client.call("FindSimilarImages", request)
    if ctx.json:
        output.print_json(ctx.out, response)
    else:
        ctx.out.print(output.similar_output(response, path))
    return EXIT_OK


def cmd_validate(ctx: Context) -> int:
    """Exit 0 when StartSession would succeed, 2 (as StartSession's refusal would) when not."""
    name = session_name(ctx.args.session)
    response: tss.ValidateSessionResponse = ctx.client.call("ValidateSession", tss.ValidateSessionRequest(name=name))
    if ctx.json:
        output.print_json(ctx.out, response)
    else:
        ctx.out.print(output.validate_output(response, name))
    return EXIT_OK if response.valid else EXIT_USAGE


def cmd_jobs(ctx: Context) -> int:
    a = ctx.args
    name = session_name(a.session)
    state = JOB_STATES[a.state] if a.state else pb.JOB_STATE_UNSPECIFIED
    merged = tss.ListJobsResponse()
    merged.next_page_token = _pages(
        lambda token: ctx.client.call(
            "ListJobs", tss.ListJobsRequest(name=name, page_size=a.page_size or 0, page_token=token, state=state)
        ),
        lambda response: merged.jobs.extend(response.jobs),
        every_page=a.all,
    )
    if ctx.json:
        output.print_json(ctx.out, merged)
        return EXIT_OK
    if not merged.jobs:
        ctx.out.print(f"no jobs{f' in state {a.state}' if a.state else ''} in {name}", highlight=False)
    else:
        ctx.out.print(output.jobs_table(merged.jobs))
    if merged.next_page_token:
        ctx.hint("more jobs: add --all")
    return EXIT_OK


# --- watch and train -----------------------------------------------------------------------------


def _watch(ctx: Context, name: str, after_sequence: int = 0, *, just_started: bool = False) -> int:
    """Follow a session to its terminal state; 0 completed, 1 failed or cancelled.

    `just_started` (train): the server answered a moment ago, so even a first failed connection is
    worth retrying; a plain `watch` of an unreachable server fails at once with exit 3.
    """
    if ctx.json:
        sink = JsonLinesSink(ctx.out)
        view = Watcher(ctx.client, sink, retry_first_connect=just_started).run(name, after_sequence)
        return EXIT_OK if view.state == pb.SESSION_STATE_COMPLETED else EXIT_FAILURE
    display = SessionDisplay(ctx.out, plain=True if ctx.args.plain else None)
    watcher = Watcher(ctx.client, display, retry_first_connect=just_started)
    try:
        with display:
            view = watcher.run(name, after_sequence)
        display.finish(_outcomes(ctx, name, view))
    except KeyboardInterrupt:
        display.stop()
        ctx.err.print(
            f"stopped watching {name}; it goes on. Watch again: imagetraining watch {session_id(name)}",
            markup=False,
            highlight=False,
        )
        return EXIT_INTERRUPTED
    if watcher.polling:
        ctx.hint("(this server has no WatchSession: progress was polled)")
    return EXIT_OK if view.state == pb.SESSION_STATE_COMPLETED else EXIT_FAILURE


def _outcomes(ctx: Context, name: str, view: SessionView) -> Outcomes | None:
    try:
        return fetch_outcomes(ctx.client, name, view)
    except grpc.RpcError:
        # The summary still has the counters; the grouping is a bonus.
        return None


def cmd_watch(ctx: Context) -> int:
    return _watch(ctx, session_name(ctx.args.session), ctx.args.after_sequence)


def cmd_train(ctx: Context) -> int:
    """Scan PATH, create a session with PATH itself selected, start it, watch it."""
    a = ctx.args
    path = absolute(a.path)
    exts = extensions(a.ext)
    scan: tss.ScanDirectoryResponse = ctx.client.call(
        "ScanDirectory", tss.ScanDirectoryRequest(path=path, extensions=exts)
    )
    recursive = not a.no_recursive
    total = scan.direct_image_count + (sum(sub.image_count for sub in scan.subdirectories) if recursive else 0)
    if total == 0 and not scan.truncated:
        where = f"{scan.path} or its subdirectories" if recursive else scan.path
        ctx.err.print(
            f"error: no images in {where} (formats: {', '.join(scan.extensions)}); "
            "nothing to train. Add --ext for other formats.",
            markup=False,
            highlight=False,
        )
        return EXIT_USAGE
    created: tss.CreateSessionResponse = ctx.client.call(
        "CreateSession",
        tss.CreateSessionRequest(
            display_name=a.name or "", root_path=path, config=session_config(a), request_id=request_id()
        ),
    )
    name = created.session.name
    # The folder itself is selected: its own images and (recursively) everything under it, so a flat
    # folder trains like any other (with --no-recursive: only the images directly in it).
    paths = [scan.path]
    update_selection(ctx, name, paths, True)
    started: tss.StartSessionResponse = ctx.client.call(
        "StartSession", tss.StartSessionRequest(name=name, request_id=request_id())
    )
    if ctx.json:
        # One line, like the events that follow: the whole output is JSON lines.
        ctx.out.out(json_format.MessageToJson(started, indent=None, preserving_proto_field_name=True), highlight=False)
    else:
        ctx.out.print(
            output.session_line(started.session, f"started over {scan.path} ({total:,} images)"), soft_wrap=True
        )
    return _watch(ctx, name, just_started=True)


Command = Callable[[Context], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

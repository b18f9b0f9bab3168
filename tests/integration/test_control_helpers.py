"""Shared helpers of the control-service tests (no tests here).

A real in-process control server on 127.0.0.1:0 against the test database, a real grpc.aio
channel to it, and readers for the `google.rpc.Status` details every error carries.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import text

from control_service.server import ControlServer, serve
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc


@dataclass
class Control:
    server: ControlServer
    channel: grpc.aio.Channel
    stub: api_grpc.TrainingSessionServiceStub

    async def create(self, root: Path | str, *subdirectories: str | Path, **fields: Any) -> pb.Session:
        request = api.CreateSessionRequest(
            root_path=str(root), subdirectories=[str(s) for s in subdirectories], **fields
        )
        response: api.CreateSessionResponse = await self.stub.CreateSession(request)
        return response.session


@contextlib.asynccontextmanager
async def running_control(settings: Settings) -> AsyncIterator[Control]:
    server = await serve(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Control(server, channel, api_grpc.TrainingSessionServiceStub(channel))
    finally:
        await channel.close()
        await server.stop()


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    bad_request: error_details_pb2.BadRequest | None
    precondition: error_details_pb2.PreconditionFailure | None
    info: error_details_pb2.ErrorInfo | None

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []

    @property
    def violation_types(self) -> list[str]:
        return [v.type for v in self.precondition.violations] if self.precondition else []


def details(err: grpc.aio.AioRpcError) -> Details:
    """The status code, message and unpacked google.rpc details of a failed call."""
    status: status_pb2.Status | None = rpc_status.from_call(err)
    bad = pre = info = None
    for any_detail in status.details if status is not None else ():
        if any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_detail.Unpack(bad)
        elif any_detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pre = error_details_pb2.PreconditionFailure()
            any_detail.Unpack(pre)
        elif any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(info)
    return Details(err.code(), err.details() or "", bad, pre, info)


def session_id(session: pb.Session) -> int:
    return int(session.name.rsplit("/", 1)[1])


async def set_state(db: Database, name: str, state: str, **columns: Any) -> None:
    """Put a session into a state directly (as a worker would), with extra columns."""
    sets = ", ".join(["state = :state", *(f"{c} = :{c}" for c in columns)])
    async with db.engine.begin() as conn:
        await conn.execute(
            text(f"UPDATE training_sessions SET {sets} WHERE id = :id"),
            {"id": int(name.rsplit("/", 1)[1]), "state": state, **columns},
        )


async def row(db: Database, name: str) -> Any:
    async with db.engine.connect() as conn:
        return (
            await conn.execute(
                text("SELECT * FROM training_sessions WHERE id = :id"), {"id": int(name.rsplit("/", 1)[1])}
            )
        ).first()


def make_tree(root: Path, files: dict[str, bytes | str]) -> None:
    """Create files (and their directories) under root; a path ending in '/' is an empty directory."""
    for rel, content in files.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

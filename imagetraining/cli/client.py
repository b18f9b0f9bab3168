"""The CLI's connection to the control service, and how its errors are shown to people.

A synchronous channel is enough for a command-line tool (one call at a time, one stream for
`watch`), and it keeps the commands plain functions that tests can run in a thread next to an
in-process asyncio server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagetraining.v1 import training_session_service_pb2 as tss
from imagetraining.v1 import training_session_service_pb2_grpc as tss_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Keepalive pings notice a dead connection under a quiet stream; the server allows one per 5 s.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

# Exit codes: scripts tell "you asked for something impossible" from "the server is not there".
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130
_USAGE_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
)


def exit_code_for(code: grpc.StatusCode | None) -> int:
    if code in _USAGE_CODES:
        return EXIT_USAGE
    if code == grpc.StatusCode.UNAVAILABLE:
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE


@dataclass(frozen=True)
class ClientOptions:
    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls_ca: Path | None = None
    timeout: float = 30.0


class Client:
    """A channel and stub with the auth metadata and deadline that every call of this run uses."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        if options.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=options.tls_ca.read_bytes())
            self.channel = grpc.secure_channel(options.address, creds, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(options.address, options=CHANNEL_OPTIONS)
        self.stub = tss_grpc.TrainingSessionServiceStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {options.token}"),) if options.token else ()
        )

    def call(self, method: str, request: Message, *, timeout: float | None = None) -> Any:
        """One unary RPC by name, with this run's metadata and deadline; raises grpc.RpcError."""
        rpc = getattr(self.stub, method)
        return rpc(request, metadata=self.metadata, timeout=timeout or self.options.timeout)

    def watch(self, request: tss.WatchSessionRequest) -> Iterator[tss.WatchSessionResponse]:
        """The WatchSession stream, without a deadline: it lasts as long as the session runs.

        The returned object is also a grpc.Call: `cancel()` ends it.
        """
        stream: Iterator[tss.WatchSessionResponse] = self.stub.WatchSession(request, metadata=self.metadata)
        return stream

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def error_lines(error: grpc.RpcError, address: str | None = None) -> list[str]:
    """`error: <CODE>: <message>` and the google.rpc details a person can act on, one per line."""
    code = status_code(error)
    details = getattr(error, "details", None)
    message = (details() if callable(details) else None) or str(error)
    lines = [f"error: {code.name if code else 'UNKNOWN'}: {message}"]
    status = None
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        status = None
    for packed in status.details if status is not None else ():
        lines.extend(_detail_lines(packed))
    if code == grpc.StatusCode.UNAVAILABLE and address:
        lines.append(f"  is the control service running at {address}? (set --address or IMAGETRAINING_CONTROL_ADDRESS)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        lines.append("  pass the server's token with --token or IMAGETRAINING_AUTH_TOKEN")
    return lines


def _detail_lines(packed: Any) -> list[str]:
    if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
        bad_request = error_details_pb2.BadRequest()
        packed.Unpack(bad_request)
        return [f"  invalid {v.field}: {v.description}" for v in bad_request.field_violations]
    if packed.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
        failure = error_details_pb2.PreconditionFailure()
        packed.Unpack(failure)
        out = []
        for v in failure.violations:
            out.append(f"  precondition {v.type} of {v.subject}: {v.description}")
            if v.type == "SELECTION":
                sid = v.subject.rsplit("/", 1)[-1]
                out.append(f"  hint: imagetraining sessions select {sid} SUBDIRECTORY...")
        return out
    if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
        retry = error_details_pb2.RetryInfo()
        packed.Unpack(retry)
        delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        return [f"  retry after {delay:g}s"]
    if packed.Is(error_details_pb2.Help.DESCRIPTOR):
        help_ = error_details_pb2.Help()
        packed.Unpack(help_)
        return [f"  see {link.description}: {link.url}" for link in help_.links]
    # ErrorInfo and ResourceInfo repeat what the message says; they are for programs, not people.
    return []

"""gRPC server plumbing shared by both services: error mapping, auth, health, reflection, shutdown.

Servicers stay thin: they translate protobuf to domain calls and raise `ApiError`s (errors.py:
each names its status code). The one `ErrorInterceptor` here turns those into canonical status
codes with `google.rpc.Status` details: database trouble into UNAVAILABLE with a retry hint (or
ABORTED for a lost race), undecodable request bytes into INVALID_ARGUMENT, and anything unexpected
into INTERNAL without a stack trace on the wire. It also writes the access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import hmac
import inspect
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from imagetraining import metrics
from imagetraining.db import faults
from imagetraining.errors import (
    Aborted,
    ApiError,
    FieldViolation,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    internal_status,
)
from imagetraining.logs import request_id, rpc_method, session_name
from imagetraining.settings import Settings

log = logging.getLogger(__name__)
# One line per RPC: method, session, status code, duration (and messages sent, for streams).
access_log = logging.getLogger("imagetraining.access")
# The request id of the call being served (imagetraining.logs.request_id): from the client's
# `x-request-id` metadata, else made here.
REQUEST_ID_HEADER = "x-request-id"

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# gRPC core queues calls that arrive faster than the server can start them; past its default
# (about 1,000 soft, 3,000 hard, across all connections) it cancels them before any Python code
# runs, so a burst of WatchSession subscribers saw CANCELLED with nothing logged. The queue is
# sized so that a burst up to twice the subscriber cap reaches the cap's RESOURCE_EXHAUSTED.
MIN_PENDING_CALLS = 10_000


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """SERVER_OPTIONS plus a pending-call queue that can hold a burst of subscribers."""
    backlog = max(MIN_PENDING_CALLS, 2 * settings.max_subscribers)
    return [
        *SERVER_OPTIONS,
        ("grpc.server.max_pending_requests", backlog),
        ("grpc.server.max_pending_requests_hard_limit", backlog),
    ]


def _is_db_unavailable(exc: BaseException) -> bool:
    """The database is unreachable, starting, shutting down, in recovery or full: a retry later can work.

    Decided by SQLSTATE class where PostgreSQL sent one (imagetraining.db.faults), not by the
    wrapper's type: "the database system is starting up" arrives as a bare asyncpg error that no
    SQLAlchemy type covers, and answered INTERNAL when this looked at types only.
    """
    return faults.is_unavailable(exc)


def _short(method: str) -> str:
    """ "/imagetraining.v1.TrainingSessionService/GetSession" -> "GetSession"."""
    return method.rsplit("/", 1)[-1] or method


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, ApiError):
        status = exc.to_status()
    elif _is_db_unavailable(exc):
        log.warning("%s: database unavailable: %s", method, faults.describe(exc))
        status = Unavailable(
            f"{_short(method)}: the database is unavailable (unreachable, restarting or full); retry shortly"
        ).to_status()
    elif faults.is_conflict(exc):
        log.info("%s: lost a race: %s", method, faults.describe(exc))
        status = Aborted(f"{_short(method)}: a concurrent change won; retry").to_status()
    else:
        log.exception("%s: unexpected error", method, exc_info=exc)
        status = internal_status()
    await context.abort_with_status(rpc_status.to_status(status))


class _Undecodable:
    """What the wrapped deserializer returns for bytes that are not the method's request message.

    gRPC's asyncio server answers a deserializer that raises with UNKNOWN "Unexpected <class
    'google.protobuf.message.DecodeError'>": a Python class name and the wrong code. Returning this
    marker instead lets the handler wrapper answer INVALID_ARGUMENT naming the expected message.
    """

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _request_type(deserializer: Any, method: str) -> str:
    """The full name of the request message a deserializer parses (`Message.FromString`)."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return str(name) if name else f"{_short(method)} request"


def _tolerant(deserializer: Any) -> Any:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return deserialize


def _undecodable_status(method: str, deserializer: Any, error: Exception) -> Any:
    expected = _request_type(deserializer, method)
    log.info("%s: undecodable request: %s", method, (str(error).splitlines() or [""])[0])
    description = f"the request bytes are not a valid {expected} message"
    return rpc_status.to_status(
        InvalidArgument(
            f"{_short(method)}: {description}; send a serialized {expected}",
            [FieldViolation("", description)],
        ).to_status()
    )


class _UndecodableInStream(Exception):
    """An undecodable message in a client stream, raised out of the handler to the wrapper."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _UndecodableInStream(request.error)
        yield request


class _Call:
    """Access-log bookkeeping of one call: its request id, start, messages and outcome."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.started = time.monotonic()
        self.code = "OK"
        self.session = ""
        self.messages: int | None = None
        given = ""
        with contextlib.suppress(Exception):
            given = next((str(v) for k, v in context.invocation_metadata() or () if k == REQUEST_ID_HEADER), "")
        self.token = request_id.set(given[:64] if given.isprintable() and given else uuid.uuid4().hex[:12])
        self.method_token = rpc_method.set(method)
        self.session_token: contextvars.Token[str] | None = None

    def request(self, message: Any) -> None:
        name = getattr(message, "name", "")
        if isinstance(name, str) and name.startswith("sessions/"):
            self.session = name[:64]
            # "sessions/19/jobs/7" is about session "sessions/19".
            self.session_token = session_name.set("/".join(self.session.split("/", 2)[:2]))

    def failed(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self.code = "CANCELLED"
            return
        code: Any = None
        with contextlib.suppress(Exception):
            code = context.code()
        if isinstance(code, grpc.StatusCode):
            self.code = code.name
        else:
            # grpc.aio sets the code with abort(); only an error that escaped everything lacks one.
            by_value = {c.value[0]: c.name for c in grpc.StatusCode}
            self.code = by_value.get(code, "UNKNOWN") if isinstance(code, int) else "UNKNOWN"

    def done(self) -> None:
        elapsed = (time.monotonic() - self.started) * 1000.0
        level = logging.DEBUG if self.method.startswith(OPEN_SERVICES) else logging.INFO
        sent = "" if self.messages is None else f", {self.messages} messages"
        # The code, duration and messages are keys of their own in the JSON format (imagetraining.logs).
        fields: dict[str, Any] = {"code": self.code, "duration_ms": round(elapsed, 1)}
        if self.messages is not None:
            fields["messages"] = self.messages
        args = (_short(self.method), self.session or "-", self.code, elapsed, sent)
        access_log.log(level, "%s %s %s %.1f ms%s", *args, extra=fields)
        method = _short(self.method)
        metrics.RPC_REQUESTS.labels(method=method, code=self.code).inc()
        metrics.RPC_DURATION.labels(method=method).observe(elapsed / 1000.0)
        if self.messages and method == "WatchSession":
            metrics.WATCH_MESSAGES.inc(self.messages)
        with contextlib.suppress(ValueError):  # a stream closed from another task: another context
            if self.session_token is not None:
                session_name.reset(self.session_token)
            rpc_method.reset(self.method_token)
            request_id.reset(self.token)


@contextlib.asynccontextmanager
async def _served(method: str, parse: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[_Call]:
    """Around one call's handler: undecodable bytes refused, errors mapped (`_abort`), one
    access-log line at the end. The same for unary and server-streaming handlers."""
    call = _Call(method, context)
    try:
        if isinstance(request, _Undecodable):
            await context.abort_with_status(_undecodable_status(method, parse, request.error))
        call.request(request)
        try:
            yield call
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, method)
    except BaseException as exc:
        call.failed(exc, context)
        raise
    finally:
        call.done()


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps API errors to status codes, and undecodable requests to INVALID_ARGUMENT, for every method.

    Every handler is re-made with a deserializer that never raises (`_tolerant`); the wrapper
    answers INVALID_ARGUMENT when it gets the `_Undecodable` marker instead of a message.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer
        options = {
            "request_deserializer": _tolerant(parse),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _served(method, parse, request, context):
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
        if handler.unary_stream is not None and not inspect.isasyncgenfunction(handler.unary_stream):
            # A streaming handler written with context.write(): a coroutine, wrapped like a unary one.
            inner_uw = handler.unary_stream

            async def unary_write(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with _served(method, parse, request, context):
                    await inner_uw(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_write, **options)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with _served(method, parse, request, context) as call:
                    call.messages = 0
                    async for item in inner_us(request, context):
                        yield item
                        call.messages += 1

            return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            # Reflection's ServerReflectionInfo: each client message is checked as it is read.
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for item in inner_ss(_checked(requests), context):
                        yield item
                except _UndecodableInStream as bad:
                    await context.abort_with_status(_undecodable_status(method, parse, bad.error))

            return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
        # A client-streaming method or a coroutine-style bidirectional one (none is registered today):
        # left as it is, so its deserializer keeps gRPC's own behaviour.
        return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires exactly one `authorization: Bearer <token>` on every method but health and reflection.

    The token is compared in constant time (`hmac.compare_digest`), so the time an answer takes
    says nothing about how much of a guess was right. Two `authorization` values are refused
    rather than letting one of them (whichever a proxy or library keeps) decide.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        values = [value for key, value in handler_call_details.invocation_metadata or () if key == "authorization"]
        if len(values) == 1 and _same_secret(values[0], self._expected):
            return await continuation(handler_call_details)
        if len(values) > 1:
            problem = f"{len(values)} 'authorization' metadata values: send exactly one 'authorization: Bearer <token>'"
        else:
            problem = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
        status = rpc_status.to_status(Unauthenticated(problem).to_status())

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort_with_status(status)
            yield  # pragma: no cover - makes this an async generator

        handler = await continuation(handler_call_details)
        if handler is not None and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny_unary)


def _same_secret(value: str | bytes, expected: bytes) -> bool:
    given = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, expected)


class ListenError(OSError):
    """A server cannot listen on its address (in use, not a local address, no permission); one line says why."""


def check_listen_address(address: str) -> None:
    """Raise ListenError when no socket can be bound to `address` (HOST:PORT; port 0 is always free).

    gRPC reports a port in use with a C-level log line on stderr and a RuntimeError saying only
    "Failed to bind"; binding a plain socket first (SO_REUSEADDR, as gRPC does) names the reason.
    Like gRPC, an address that resolves to several (localhost) is usable when one of them binds.
    """
    host, _sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or int(port_text) == 0:
        return
    try:
        candidates = socket.getaddrinfo(host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address}: unknown host ({exc.strerror})") from None
    failure: OSError | None = None
    for family, kind, proto, _name, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                failure = failure or exc
                continue
        return
    if failure is not None:
        reason = (failure.strerror or str(failure)).lower()
        if failure.errno == errno.EADDRINUSE:
            reason += "; another process listens there: stop it or choose another port"
        raise ListenError(f"cannot listen on {address}: {reason}")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return grpc.ssl_server_credentials([(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    if settings.tls_cert_file is None:
        return None
    root = settings.tls_ca_file.read_bytes() if settings.tls_ca_file else settings.tls_cert_file.read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root)


class ServerHandle:
    """A started server with its health servicer; `stop()` does the graceful-shutdown sequence."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        port: int,
        service_names: Sequence[str],
        grace: float,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.service_names = list(service_names)
        self.grace = grace
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self._stopped = asyncio.Event()

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Load balancers and clients see NOT_SERVING before anything closes.
        await self.health.enter_graceful_shutdown()
        for hook in self.on_shutdown:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        await self.server.stop(self.grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    address: str,
    settings: Settings,
    add_servicers: Callable[[grpc.aio.Server], None],
    service_descriptors: Iterable[_descriptor.ServiceDescriptor],
) -> ServerHandle:
    """Start an asyncio gRPC server with error mapping, optional auth and TLS, health and reflection."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.auth_token:
        interceptors.append(AuthInterceptor(settings.auth_token))
    interceptors.append(ErrorInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    add_servicers(server)
    names = [d.full_name for d in service_descriptors]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    check_listen_address(address)
    creds = server_credentials(settings)
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:  # gRPC's "Failed to bind to address ...; set GRPC_VERBOSITY=debug ..."
        raise ListenError(f"cannot listen on {address}: {str(exc).split(';')[0]}") from None
    if port == 0:
        raise ListenError(f"cannot listen on {address}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ServerHandle(server, health_servicer, port, names, settings.grace_seconds)


def install_signal_handlers(handle: ServerHandle) -> None:
    """SIGTERM / SIGINT start the graceful shutdown once."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(handle.stop()))

"""gRPC server plumbing shared by both services: error mapping, auth, health, reflection, shutdown.

Servicers stay thin: they translate protobuf to domain calls and raise `DomainError`s. The one
`ErrorInterceptor` here turns those into canonical status codes with `google.rpc.Status` details,
and anything unexpected into INTERNAL without a stack trace on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from imagetraining.errors import DomainError, Unauthenticated, Unavailable, internal_status
from imagetraining.settings import Settings

log = logging.getLogger(__name__)

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


def _is_db_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (ConnectionError, OSError)) and not isinstance(exc, FileNotFoundError)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, DomainError):
        status = exc.to_status()
    elif _is_db_unavailable(exc):
        log.warning("%s: database unavailable: %s", method, exc)
        status = Unavailable("the database is unavailable; retry shortly").to_status()
    else:
        log.exception("%s: unexpected error", method, exc_info=exc)
        status = internal_status()
    await context.abort_with_status(rpc_status.to_status(status))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes for unary and server-streaming methods."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and not inspect.isasyncgenfunction(handler.unary_stream):
            # A streaming handler written with context.write(): a coroutine, wrapped like a unary one.
            inner_uw = handler.unary_stream

            async def unary_write(request: Any, context: grpc.aio.ServicerContext) -> None:
                try:
                    await inner_uw(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_write,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method but health and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == self._expected:
            return await continuation(handler_call_details)
        status = rpc_status.to_status(
            Unauthenticated("missing or wrong bearer token: send metadata 'authorization: Bearer <token>'").to_status()
        )

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort_with_status(status)
            yield  # pragma: no cover - makes this an async generator

        handler = await continuation(handler_call_details)
        if handler is not None and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny_unary)


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
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    add_servicers(server)
    names = [d.full_name for d in service_descriptors]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = server_credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
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

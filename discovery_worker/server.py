"""The worker's gRPC server: DiscoveryWorkerService plus health and reflection (imagetraining.rpc).

StreamSessionEvents arrives with the streaming issue: until then the servicer here answers
UNIMPLEMENTED. The seam is `start_worker_server(..., servicer=...)`: pass the real servicer and
nothing else changes.
"""

from __future__ import annotations

import socket

import grpc

from imagetraining.rpc import ServerHandle, start_server
from imagetraining.settings import Settings
from imagetraining.v1 import discovery_worker_service_pb2 as wpb
from imagetraining.v1 import discovery_worker_service_pb2_grpc as wgrpc


class PlaceholderWorkerServicer(wgrpc.DiscoveryWorkerServiceServicer):
    """Answers UNIMPLEMENTED until the progress streams are built."""

    async def StreamSessionEvents(  # type: ignore[override]  # a context.write-style handler
        self, request: wpb.StreamSessionEventsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "StreamSessionEvents is not available on this worker yet: read progress with GetSessionProgress",
        )


async def start_worker_server(
    settings: Settings, servicer: wgrpc.DiscoveryWorkerServiceServicer | None = None
) -> ServerHandle:
    """Start the server on settings.worker_address (port 0: any free port; see `handle.port`)."""
    impl = servicer if servicer is not None else PlaceholderWorkerServicer()

    def add(server: grpc.aio.Server) -> None:
        wgrpc.add_DiscoveryWorkerServiceServicer_to_server(impl, server)

    return await start_server(
        settings.worker_address, settings, add, [wpb.DESCRIPTOR.services_by_name["DiscoveryWorkerService"]]
    )


def advertised_address(settings: Settings, bound_port: int) -> str:
    """The address the control service dials: the configured one, else the listen address with its real port.

    A wildcard listen host (0.0.0.0, [::]) is no address to dial: the host name stands in for it.
    """
    if settings.worker_advertise_address:
        return settings.worker_advertise_address
    host, _sep, _port = settings.worker_address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = socket.gethostname()
    return f"{host}:{bound_port}"

"""The worker's gRPC server: DiscoveryWorkerService (StreamSessionEvents, `streams.py`) plus health
and reflection, started by `imagetraining.rpc.start_server` like the control service's."""

from __future__ import annotations

import socket

import grpc

from imagetraining.rpc import ServerHandle, start_server
from imagetraining.settings import Settings
from imagetraining.v1 import discovery_worker_service_pb2 as wpb
from imagetraining.v1 import discovery_worker_service_pb2_grpc as wgrpc


async def start_worker_server(settings: Settings, servicer: wgrpc.DiscoveryWorkerServiceServicer) -> ServerHandle:
    """Start the server on settings.worker_address (port 0: any free port; see `handle.port`)."""

    def add(server: grpc.aio.Server) -> None:
        wgrpc.add_DiscoveryWorkerServiceServicer_to_server(servicer, server)

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

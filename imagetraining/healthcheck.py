"""`python -m imagetraining.healthcheck ADDRESS [--service NAME]`: is the server at ADDRESS SERVING?

The container healthchecks of compose.yaml and `make run`'s readiness check ask the same question
the same way: a `grpc.health.v1.Health/Check` over a channel built from the services' own settings
(`Settings.from_env`), so it keeps working when TLS and the auth token are on:

- TLS is on when IMAGETRAINING_TLS_CERT_FILE is set, exactly as for the servers; the channel trusts
  IMAGETRAINING_TLS_CA_FILE (else the certificate itself), as the control service does when it dials
  a worker (`imagetraining.rpc.channel_credentials`).
- A check dials its own server on a loopback or wildcard address (127.0.0.1:50051), which a
  certificate issued for `localhost` or a service's DNS name does not name. The server presents
  IMAGETRAINING_TLS_CERT_FILE, so when the certificate does not name the dialed host the check
  verifies the server against a name the certificate does hold (`localhost` first); `--server-name`
  sets that name explicitly.
- IMAGETRAINING_AUTH_TOKEN, when set, is sent as `authorization: Bearer <token>`. The servers serve
  health without auth today (imagetraining.rpc.OPEN_SERVICES); sending it keeps the check working
  if that changes or a proxy in front requires it.

Exit status 0 only when the answer is SERVING; otherwise 1 and one line on stderr saying why
(NOT_SERVING, unreachable, a TLS failure, a bad setting). Never 2, which Docker reserves.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagetraining.rpc import channel_credentials
from imagetraining.settings import Settings, SettingsError

DEFAULT_TIMEOUT = 3.0
SERVING = "SERVING"
# Names a check on this machine prefers to verify the server against when the certificate does not
# name the dialed address.
_LOCAL_NAMES = ("localhost",)


@dataclass(frozen=True)
class Health:
    """The answer of one check: the serving status's name (or the gRPC code of a failed call) and why."""

    status: str
    detail: str = ""

    @property
    def serving(self) -> bool:
        return self.status == SERVING

    def line(self, address: str, service: str) -> str:
        """One line for stderr: `<address> [service]: <STATUS>: <detail>`."""
        target = f"{address} service {service!r}" if service else address
        text = f"{target}: {self.status}"
        if self.detail:
            text += ": " + " ".join(self.detail.split())
        return text


def settings_from_env() -> Settings:
    """The services' settings from the environment, without the library roots a check does not need."""
    return Settings.from_env(library_roots=())


def certificate_names(cert_file: Path) -> list[str]:
    """The DNS names and IP addresses a PEM certificate is issued for (its subjectAltName, else its CN).

    Read with the ssl module's own decoder (what `getpeercert()` returns); [] when it cannot be read.
    """
    import _ssl

    decode: Any = getattr(_ssl, "_test_decode_cert", None)
    if decode is None:
        return []
    try:
        decoded: dict[str, Any] = decode(str(cert_file))
    except (OSError, ValueError):
        return []
    names = [str(value) for kind, value in decoded.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    if names:
        return names
    for rdn in decoded.get("subject", ()):
        names.extend(str(value) for key, value in rdn if key == "commonName")
    return names


def _host(address: str) -> str:
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]")


def _same_host(host: str, name: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(name)
    except ValueError:
        return host.lower().rstrip(".") == name.lower().rstrip(".")


def server_name_for(address: str, settings: Settings) -> str | None:
    """The name to verify the server's certificate against, when it is not the dialed host; else None.

    Only with TLS on. A certificate that names the dialed host needs nothing; otherwise the server
    (which presents IMAGETRAINING_TLS_CERT_FILE) is verified against a local name it holds
    (`localhost`), else its first DNS name.
    """
    if settings.tls_cert_file is None:
        return None
    names = certificate_names(settings.tls_cert_file)
    host = _host(address)
    if not names or any(_same_host(host, name) for name in names):
        return None
    dns = [name for name in names if not _is_ip(name) and "*" not in name]
    local = [name for name in dns if name.lower() in _LOCAL_NAMES]
    preferred = local or dns
    return preferred[0] if preferred else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def open_channel(address: str, settings: Settings, *, server_name: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address` as the services' settings say: TLS when configured, with the
    certificate verified against `server_name` (default: `server_name_for`)."""
    creds = channel_credentials(settings)
    if creds is None:
        return grpc.aio.insecure_channel(address)
    name = server_name or server_name_for(address, settings)
    options: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.aio.secure_channel(address, creds, options=options)


def auth_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {settings.auth_token}"),) if settings.auth_token else ()


async def check(
    address: str,
    settings: Settings,
    *,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
) -> Health:
    """One `grpc.health.v1.Health/Check` of `service` ("": the whole server) at `address`."""
    channel = open_channel(address, settings, server_name=server_name)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=auth_metadata(settings)
        )
    except grpc.aio.AioRpcError as err:
        return Health(err.code().name, err.details() or "")
    finally:
        await channel.close()
    status = str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return Health(status, "" if status == SERVING else "the server answers but is not serving")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Docker reserves exit status 2; a usage error is "unhealthy" too, with one line.
        self.exit(1, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m imagetraining.healthcheck",
        description="Exit 0 when the gRPC server at ADDRESS reports SERVING (grpc.health.v1), 1 otherwise. "
        "TLS and the auth token come from the services' IMAGETRAINING_* settings.",
    )
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the server, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="the service to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (default %(default)s)")
    parser.add_argument(
        "--server-name",
        default=None,
        help="with TLS: the name to verify the certificate against (default: the dialed host if the "
        "certificate names it, else localhost or the certificate's first DNS name)",
    )
    args = parser.parse_args(argv)
    try:
        settings = settings_from_env()
    except SettingsError as err:
        print(f"{args.address}: cannot check: {err}", file=sys.stderr)
        return 1
    health = asyncio.run(
        check(args.address, settings, service=args.service, timeout=args.timeout, server_name=args.server_name)
    )
    if health.serving:
        return 0
    print(health.line(args.address, args.service), file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

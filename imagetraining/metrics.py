"""Prometheus metrics of both services, served on IMAGETRAINING_METRICS_ADDRESS (off when empty).

One module owns every metric, so the README's list ("Operating it"), the sample dashboard
(docs/grafana-dashboard.json) and the code cannot drift apart: tests/e2e/test_metrics.py scrapes
both services during a real session and checks that every metric the dashboard queries exists.

Conventions: names start with `imagetraining_`, counters end in `_total`, durations are in seconds,
and labels have bounded values (method, status code, state, outcome, kind: never a session id or a
path). Rates (images trained per second, files discovered per second) are PromQL's `rate()` of the
counters. prometheus-client's HTTP server runs in a thread of its own, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Both services.
RPC_REQUESTS = Counter("imagetraining_rpc_requests_total", "RPCs served, by method and status code", ["method", "code"])
RPC_DURATION = Histogram(
    "imagetraining_rpc_duration_seconds",
    "Time from a call's start to its status, by method (streams: their whole life)",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0),
)
DATABASE_ERRORS = Counter(
    "imagetraining_database_errors_total",
    "Database errors met by the service, by kind (unavailable, conflict, timeout, other)",
    ["kind"],
)

# Control service.
SESSIONS = Gauge("imagetraining_sessions", "Sessions by state, as the control service last read them", ["state"])
WATCH_MESSAGES = Counter("imagetraining_watch_messages_total", "WatchSession messages delivered to subscribers")

# Progress streams, both services: WatchSession subscribers on the control service, StreamSessionEvents
# subscribers (the control services' relays) on a worker.
WATCH_SUBSCRIBERS = Gauge("imagetraining_watch_subscribers", "Progress stream subscribers open on this process")
WATCH_EVICTIONS = Counter(
    "imagetraining_watch_evictions_total",
    "Progress stream subscribers refused or ended with RESOURCE_EXHAUSTED, by reason"
    " (cap: the subscriber cap was reached; idle: the subscriber stopped reading)",
    ["reason"],
)

# Discovery worker.
IMAGES = Counter(
    "imagetraining_images_total",
    "Images whose outcome this worker wrote, by outcome: completed and failed as chunks commit; skipped"
    " (duplicates, decided by the owner at the finish; they were counted completed when trained)",
    ["outcome"],
)
FILES_DISCOVERED = Counter("imagetraining_discovered_images_total", "Image files discovery recorded")
SESSION_CLAIMS = Counter(
    "imagetraining_session_claims_total",
    "Sessions this worker claimed, by kind (new: a run's first claim; takeover: after another owner's crash or lapse)",
    ["kind"],
)
LEASE_LOSSES = Counter(
    "imagetraining_lease_losses_total",
    "Leases this worker lost, by lease (session: its claim; chunk: a chunk taken back before its commit)",
    ["lease"],
)
CHUNK_CLAIMS = Counter("imagetraining_chunk_claims_total", "Training chunks claimed, by role (owner, helper)", ["role"])
POOL_CRASHES = Counter(
    "imagetraining_pool_process_crashes_total", "Training pool processes that died (crash, OOM kill, timeout)"
)
POOL_STARTS = Counter(
    "imagetraining_pool_generations_total", "Training pool process generations started (the first, then replacements)"
)

_engines: list[tuple[str, Callable[[], Any]]] = []


class _DatabasePool(Collector):
    """Connections of each SQLAlchemy pool, read at scrape time (cheap, no I/O)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "imagetraining_database_connections",
            "Connections of the service's database pools, by pool and state (in_use, idle)",
            labels=["pool", "state"],
        )
        for name, pool_of in _engines:
            pool = pool_of()
            in_use = getattr(pool, "checkedout", lambda: 0)()
            idle = getattr(pool, "checkedin", lambda: 0)()
            family.add_metric([name, "in_use"], float(in_use))
            family.add_metric([name, "idle"], float(idle))
        yield family


REGISTRY.register(_DatabasePool())


def watch_engines(pools: Iterable[tuple[str, Callable[[], Any]]]) -> None:
    """Report these pools (name, a function returning the SQLAlchemy pool) in the connections gauge."""
    _engines[:] = list(pools)


def database_error(exc: BaseException) -> None:
    """Count a database error by kind (imagetraining.db.faults decides the kind)."""
    from imagetraining.db import faults

    if faults.is_unavailable(exc):
        kind = "unavailable"
    elif faults.is_conflict(exc):
        kind = "conflict"
    elif faults.sqlstate(exc) in ("57014", "55P03"):  # statement / lock timeout
        kind = "timeout"
    else:
        kind = "other"
    DATABASE_ERRORS.labels(kind=kind).inc()


def serve(address: str) -> int:
    """Serve /metrics on `address` ("host:port"; port 0: any free port) in a thread; returns the port.

    Raises OSError when the address cannot be bound (the caller names the setting).
    """
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
    return bound


def _zeros() -> None:
    """Every label value known up front is exported from the start (0), so rates and alerts work
    before the first event and a dashboard never queries a series that does not exist yet."""
    for kind in ("unavailable", "conflict", "timeout", "other"):
        DATABASE_ERRORS.labels(kind=kind)
    for reason in ("cap", "idle"):
        WATCH_EVICTIONS.labels(reason=reason)
    for outcome in ("completed", "failed", "skipped"):
        IMAGES.labels(outcome=outcome)
    for kind in ("new", "takeover"):
        SESSION_CLAIMS.labels(kind=kind)
    for lease in ("session", "chunk"):
        LEASE_LOSSES.labels(lease=lease)
    for role in ("owner", "helper"):
        CHUNK_CLAIMS.labels(role=role)


_zeros()

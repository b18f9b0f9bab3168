"""Prometheus metrics (#14): both services scraped during a real session (real processes, real
PostgreSQL), parsed with prometheus-client's own parser; the sample Grafana dashboard queries only
metrics that exist."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests.conftest import ROOT, subprocess_env, wait_for
from tests.e2e.test_grpcurl import free_port, start_service, stop_service
from tests.images import write_jpeg

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def names(samples: Samples) -> set[str]:
    return {n for n, _ls in samples}


def dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    found = {m for e in exprs for m in re.findall(r"\b(imagetraining_[a-z_]+)\b", e)}
    assert found, "the dashboard queries no imagetraining metric"
    return found


@pytest.mark.slow
async def test_both_services_expose_their_metrics_during_a_session(db_url: str, library: Path, tmp_path: Path) -> None:
    for i in range(12):
        write_jpeg(library / "a" / f"{i:02d}.jpg", 48, 32, seed=i)
    (library / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    control_port, worker_port = free_port(), free_port()
    control_address, worker_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    control = await start_service(
        "control_service",
        subprocess_env(
            db_url,
            library,
            IMAGETRAINING_CONTROL_ADDRESS=control_address,
            IMAGETRAINING_METRICS_ADDRESS=f"127.0.0.1:{control_port}",
            IMAGETRAINING_POLL_SECONDS="0.2",
        ),
        control_address,
        tmp_path / "control.log",
    )
    try:
        worker = await start_service(
            "discovery_worker",
            subprocess_env(
                db_url,
                library,
                IMAGETRAINING_WORKER_ADDRESS=worker_address,
                IMAGETRAINING_METRICS_ADDRESS=f"127.0.0.1:{worker_port}",
                IMAGETRAINING_POOL_SIZE="1",
                IMAGETRAINING_POLL_SECONDS="0.2",
            ),
            worker_address,
            tmp_path / "worker.log",
        )
        try:
            async with grpc.aio.insecure_channel(control_address) as channel:
                stub = api_grpc.TrainingSessionServiceStub(channel)
                created = await stub.CreateSession(
                    api.CreateSessionRequest(root_path=str(library), subdirectories=[str(library / "a")])
                )
                name = created.session.name
                await stub.StartSession(api.StartSessionRequest(name=name))
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetSession(api.GetSessionRequest(name="sessions/999"))

                async def completed() -> bool:
                    got = await stub.GetSession(api.GetSessionRequest(name=name))
                    return bool(got.session.state == 5)  # SESSION_STATE_COMPLETED

                await wait_for(completed, timeout=60, what="the session to complete")

                async def counted() -> Samples | None:
                    c = await scrape(control_port)
                    return c if value(c, "imagetraining_sessions", state="completed") == 1 else None

                control_samples = await wait_for(counted, timeout=10, what="the sessions gauge to count it")
            worker_samples = await scrape(worker_port)
        finally:
            await stop_service(worker.proc)
    finally:
        await stop_service(control.proc)

    c, w = control_samples, worker_samples
    assert value(c, "imagetraining_rpc_requests_total", method="StartSession", code="OK") == 1
    assert value(c, "imagetraining_rpc_requests_total", method="GetSession", code="NOT_FOUND") == 1
    assert value(c, "imagetraining_rpc_duration_seconds_count", method="CreateSession") == 1
    assert value(c, "imagetraining_sessions", state="running") == 0
    assert value(c, "imagetraining_database_connections", pool="reads") >= 1
    assert value(w, "imagetraining_images_total", outcome="completed") == 12
    assert value(w, "imagetraining_images_total", outcome="failed") == 1
    assert value(w, "imagetraining_discovered_images_total") == 13
    assert value(w, "imagetraining_session_claims_total", kind="new") == 1
    assert value(w, "imagetraining_chunk_claims_total", role="owner") >= 1
    assert value(w, "imagetraining_pool_generations_total") == 1
    assert value(w, "imagetraining_pool_process_crashes_total") == 0
    assert value(w, "imagetraining_lease_losses_total") == 0
    # Bounded labels only: no session id or path anywhere.
    for name, labels in [*c, *w]:
        for _key, label_value in labels:
            assert "/" not in label_value and not label_value.startswith("sessions"), (name, labels)
    # Every metric the sample dashboard queries exists on one of the two services.
    exposed = {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in names(c) | names(w)} | names(c) | names(w)
    assert dashboard_metrics() <= exposed, dashboard_metrics() - exposed

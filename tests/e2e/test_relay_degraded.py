"""When the control service cannot reach the owning worker, subscribers still learn the truth (issue #9, item 11).

The worker's TLS certificate names `localhost` while it advertises 127.0.0.1: every dial fails
hostname verification. The relay logs that at WARNING with the fix, and keeps subscribers informed
from the session row meanwhile (progress, then the terminal state with the committed counters),
with sequences that still strictly increase.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from control_service.server import serve
from discovery_worker.worker import run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests import worker_support as ws
from tests.certs import make_certs
from tests.images import photo_folders


@pytest.mark.slow
async def test_an_unreachable_owner_is_reported_and_subscribers_get_progress_from_the_row(
    clean_db: Database,
    library: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    certs = make_certs(tmp_path / "tls", ["localhost"])
    tls = {"tls_cert_file": certs.cert, "tls_key_file": certs.key, "tls_ca_file": certs.ca}
    folders = photo_folders(library, folders=4, per_folder=150)
    caplog.set_level(logging.WARNING, logger="control_service.relay")
    worker = await run_worker(
        make_settings(pool_size=1, batch_size=100, trainer="tests.trainers:PacedTrainer", **tls), migrate=False
    )
    control = await serve(make_settings(**tls), database=clean_db)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{control.port}", credentials) as channel:
            stub = api_grpc.TrainingSessionServiceStub(channel)
            created = await stub.CreateSession(
                api.CreateSessionRequest(root_path=str(library), subdirectories=[str(f) for f in folders])
            )
            name = created.session.name
            call = stub.WatchSession(api.WatchSessionRequest(name=name))
            await stub.StartSession(api.StartSessionRequest(name=name))
            events = [response.event async for response in call]
            assert await call.code() == grpc.StatusCode.OK
        sid = int(name.split("/")[1])
        row = await ws.session(clean_db, sid)
    finally:
        await control.stop()
        await worker.stop()
    assert row["state"] == "completed"
    assert all(a.sequence < b.sequence for a, b in itertools.pairwise(events))
    # Progress kept coming while training although no worker stream could be relayed.
    during = {e.training.processed_images for e in events if e.state == pb.SESSION_STATE_RUNNING}
    # (Two or more: a training chunk grows to about a quarter second of the pool's work, so on a fast
    # run the 600 images are a handful of commits.)
    assert len(during - {0, 600}) >= 2, sorted(during)
    last = events[-1]
    assert last.state == pb.SESSION_STATE_COMPLETED
    assert (last.training.processed_images, last.training.total_images) == (row["processed_images"], 600)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("cannot relay from worker" in m and "IMAGETRAINING_WORKER_ADVERTISE_ADDRESS" in m for m in warnings), (
        warnings
    )
    # Logged once, not once per dial.
    assert sum("cannot relay from worker" in m for m in warnings) == 1

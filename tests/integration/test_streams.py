"""Live progress over real gRPC and real PostgreSQL: the worker's stream, the relay, many subscribers.

The control service and one discovery worker run in-process on the test's loop (real servers on
loopback ports); subscribers are real gRPC clients. Process-level failures (kill -9 of a worker or of
the control service) are in tests/e2e/test_stream_failover.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_service.server import ControlServer, serve
from discovery_worker.worker import WorkerHandle, run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests.conftest import wait_for
from tests.images import write_jpeg

TERMINAL = {pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_CANCELLED, pb.SESSION_STATE_FAILED}


@dataclass
class Pair:
    control: ControlServer
    worker: WorkerHandle | None
    channel: grpc.aio.Channel
    stub: api_grpc.TrainingSessionServiceStub
    make_settings: Callable[..., Settings]

    async def start_worker(self, **overrides: object) -> WorkerHandle:
        self.worker = await run_worker(self.make_settings(**overrides), migrate=False)
        return self.worker


def photos(root: Path, folders: int, per_folder: int, size: int = 24) -> int:
    for f in range(folders):
        for i in range(per_folder):
            write_jpeg(root / f"album{f:02d}" / f"img{i:04d}.JPG", size, size, seed=f * 10_000 + i, quality=70)
    return folders * per_folder


@pytest.fixture
async def pair(
    clean_db: Database, make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> AsyncIterator[Pair]:
    """Control service (with the relay) and, unless the test starts its own, no worker yet."""
    control_overrides = getattr(request, "param", {})
    control = await serve(make_settings(**control_overrides), database=clean_db)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{control.port}")
    pair = Pair(control, None, channel, api_grpc.TrainingSessionServiceStub(channel), make_settings)
    try:
        yield pair
    finally:
        await channel.close()
        if pair.worker is not None:
            await pair.worker.stop()
        await control.stop()


async def create(stub: api_grpc.TrainingSessionServiceStub, root: Path) -> str:
    """A session over every immediate subdirectory of `root`, all selected."""
    subdirs = sorted(entry.path for entry in os.scandir(root) if entry.is_dir())
    created = await stub.CreateSession(api.CreateSessionRequest(root_path=str(root), subdirectories=subdirs))
    return created.session.name


async def collect(
    stub: api_grpc.TrainingSessionServiceStub, name: str, after: int = 0, limit: int | None = None
) -> list[pb.SessionEvent]:
    events: list[pb.SessionEvent] = []
    async for response in stub.WatchSession(api.WatchSessionRequest(name=name, after_sequence=after)):
        events.append(response.event)
        if limit is not None and len(events) >= limit:
            break
    return events


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.SessionEvent]:
    """Read a call started with `read()` to its end (the iterator and read() may not be mixed)."""
    events: list[pb.SessionEvent] = []
    while (response := await call.read()) is not grpc.aio.EOF:
        events.append(response.event)
    return events


async def read_until(
    call: grpc.aio.UnaryStreamCall,
    events: list[pb.SessionEvent],
    state: int,
    also: Callable[[pb.SessionEvent], bool] = lambda _event: True,
) -> None:
    """Read `call` into `events` until a message in `state` (that also satisfies `also`)."""
    async for response in call:
        events.append(response.event)
        if response.event.state == state and also(response.event):
            return


def assert_increasing(events: list[pb.SessionEvent]) -> None:
    sequences = [e.sequence for e in events]
    assert all(a < b for a, b in itertools.pairwise(sequences)), sequences


def assert_counters_never_go_back(events: list[pb.SessionEvent]) -> None:
    for field in ("processed_images", "failed_images", "skipped_images", "discovered_images"):
        values = [getattr(e.training, field) for e in events]
        assert values == sorted(values), (field, values)
    found = [e.discovery.images_found for e in events]
    assert found == sorted(found), found


async def test_a_subscriber_sees_snapshot_discovery_training_and_the_end(pair: Pair, library: Path) -> None:
    total = photos(library, folders=15, per_folder=100)
    name = await create(pair.stub, library)
    watching = asyncio.create_task(collect(pair.stub, name))

    # The pending session's snapshot comes first; the stream then waits for StartSession.
    async def subscribed() -> bool:
        fanout = pair.control.relay.subscription_of(int(name.split("/")[1])) if pair.control.relay else None
        return fanout is not None and fanout.latest is not None and len(fanout) == 1

    await wait_for(subscribed, timeout=10, what="the subscriber to get its snapshot")
    await pair.start_worker(pool_size=1, batch_size=100, trainer="tests.trainers:PacedTrainer")
    await pair.stub.StartSession(api.StartSessionRequest(name=name))
    events = await asyncio.wait_for(watching, 120)

    assert events[0].kind == pb.EVENT_KIND_SNAPSHOT and events[0].state == pb.SESSION_STATE_PENDING
    assert events[0].session.name == name
    assert_increasing(events)
    assert_counters_never_go_back(events)
    states = [e.state for e in events if e.kind in (pb.EVENT_KIND_STATE_CHANGE, pb.EVENT_KIND_SNAPSHOT)]
    assert states[:1] == [pb.SESSION_STATE_PENDING]
    assert pb.SESSION_STATE_DISCOVERING in states and pb.SESSION_STATE_RUNNING in states
    assert states.index(pb.SESSION_STATE_DISCOVERING) < states.index(pb.SESSION_STATE_RUNNING)
    assert events[-1].kind == pb.EVENT_KIND_STATE_CHANGE and events[-1].state == pb.SESSION_STATE_COMPLETED

    # Growing counts while discovering, not one jump to the end.
    found = [e.discovery.images_found for e in events]
    during = [e.discovery.images_found for e in events if e.kind == pb.EVENT_KIND_DISCOVERY_PROGRESS]
    assert any(0 < n < total for n in during), during
    assert len(set(found)) >= 3, found
    training = [e.training for e in events if e.kind == pb.EVENT_KIND_TRAINING_PROGRESS]
    percentages = [t.percentage for t in training if t.HasField("percentage")]
    assert len(set(percentages)) >= 3 and percentages == sorted(percentages), percentages
    assert any(t.images_per_second > 0 for t in training)
    assert any(t.HasField("eta") for t in training)

    final = (await pair.stub.GetSession(api.GetSessionRequest(name=name))).session
    last = events[-1]
    assert last.training.total_images == final.progress.total_images == total
    assert last.training.percentage == pytest.approx(100.0)
    for field in ("processed_images", "failed_images", "skipped_images"):
        assert getattr(last.training, field) == getattr(final.progress, field), field
    assert last.discovery.images_found == final.discovery.images_found == total
    assert last.discovery.total_final

    # Watching a finished session: its snapshot, in the terminal state, then the end.
    again = await collect(pair.stub, name)
    assert [(e.kind, e.state) for e in again] == [(pb.EVENT_KIND_SNAPSHOT, pb.SESSION_STATE_COMPLETED)]
    assert again[0].sequence >= last.sequence
    # Resuming after the terminal message: nothing newer to say.
    assert [e.sequence for e in await collect(pair.stub, name, after=again[0].sequence)] == []


async def test_two_hundred_subscribers_all_finish_and_a_non_reader_is_evicted(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    photos(library, folders=4, per_folder=100)
    # Empty selected folders with long names make the snapshot about 6 KiB, more than the non-reader's
    # 1 KiB window below: its very first write blocks, whatever the timing of the rest of the run.
    for i in range(40):
        (library / f"an-empty-folder-whose-long-name-makes-the-snapshot-larger-than-a-small-window-{i:02d}").mkdir()
    control = await serve(make_settings(subscriber_idle_seconds=3.0, max_subscribers=250), database=clean_db)
    worker = None
    channels: list[grpc.aio.Channel] = []
    try:
        address = f"127.0.0.1:{control.port}"
        # Subscribers share a few connections, as dashboards behind one proxy would.
        channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
        stubs = [api_grpc.TrainingSessionServiceStub(c) for c in channels]
        name = await create(stubs[0], library)

        # A client that reads nothing, with a 1 KiB flow-control window: its transport holds a few
        # messages, then the server's writes block. (grpc's default window is 64 KiB and BDP probing
        # grows it to megabytes: a real non-reader is noticed once that much has piled up.)
        slow_channel = grpc.aio.insecure_channel(
            address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
        )
        channels.append(slow_channel)
        slow = api_grpc.TrainingSessionServiceStub(slow_channel).WatchSession(api.WatchSessionRequest(name=name))
        await slow.initial_metadata()

        subscribers = [asyncio.create_task(collect(stubs[i % 4], name)) for i in range(200)]
        sid = int(name.split("/")[1])

        async def all_subscribed() -> bool:
            fanout = control.relay.subscription_of(sid) if control.relay else None
            return fanout is not None and len(fanout) >= 200

        await wait_for(all_subscribed, timeout=30, what="200 subscribers")
        worker = await run_worker(
            make_settings(pool_size=1, batch_size=100, trainer="tests.trainers:PacedTrainer"), migrate=False
        )
        await stubs[0].StartSession(api.StartSessionRequest(name=name))
        results = await asyncio.wait_for(asyncio.gather(*subscribers), 120)
        for events in results:
            assert events[-1].state == pb.SESSION_STATE_COMPLETED
            assert_increasing(events)
        # Every subscriber kept the pace: (nearly) the same messages. A subscriber whose handler falls
        # behind gets progress conflated, so a loaded machine may cost one a few; a subscriber held
        # back by the non-reader would have lost most of them.
        counts = sorted(len(events) for events in results)
        assert counts[0] >= 0.75 * counts[-1], counts

        # The non-reader was ended with RESOURCE_EXHAUSTED carrying its last sequence; it did not hold
        # the others back (they finished above) and it got nothing after its eviction.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in slow:
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        metadata = dict(info.value.trailing_metadata() or ())
        assert "after_sequence=" in (info.value.details() or "")
        assert metadata.get("last_sequence") is not None or "after_sequence=" in (info.value.details() or "")

        async def subscribers_gone() -> bool:
            return control.relay is not None and control.relay.budget.count == 0

        await wait_for(subscribers_gone, timeout=10, what="every subscription to be released")
    finally:
        for c in channels:
            await c.close()
        if worker is not None:
            await worker.stop()
        await control.stop()


@pytest.mark.parametrize("pair", [{"max_subscribers": 2}], indirect=True)
async def test_subscriber_cap_and_disconnect_cleanup(pair: Pair, library: Path) -> None:
    (library / "a").mkdir()
    name = await create(pair.stub, library)
    sid = int(name.split("/")[1])
    first = pair.stub.WatchSession(api.WatchSessionRequest(name=name))
    second = pair.stub.WatchSession(api.WatchSessionRequest(name=name))
    assert (await first.read()).event.kind == pb.EVENT_KIND_SNAPSHOT
    assert (await second.read()).event.kind == pb.EVENT_KIND_SNAPSHOT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(pair.stub, name)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "IMAGETRAINING_MAX_SUBSCRIBERS" in (info.value.details() or "")

    first.cancel()  # a client that goes away frees its place at once

    async def one_left() -> bool:
        return pair.control.relay is not None and pair.control.relay.budget.count == 1

    await wait_for(one_left, timeout=5, what="the cancelled subscription to be released")
    third = pair.stub.WatchSession(api.WatchSessionRequest(name=name))
    assert (await third.read()).event.kind == pb.EVENT_KIND_SNAPSHOT
    # A client-driven transition reaches the subscribers live, with a higher sequence.
    await pair.stub.CancelSession(api.CancelSessionRequest(name=name))
    rest = await read_rest(third)
    assert [e.state for e in rest] == [pb.SESSION_STATE_CANCELLED]
    second.cancel()

    async def none_left() -> bool:
        return pair.control.relay is not None and pair.control.relay.budget.count == 0 and not pair.control.relay._feeds

    await wait_for(none_left, timeout=5, what="all subscriptions and the feed to be released")
    assert sid


async def test_resume_with_after_sequence_sees_no_repeat_and_no_gap(pair: Pair, library: Path) -> None:
    # 0.2 s per image: the first four messages cannot include the end, even on a loaded machine
    # (with 5 ms per image the session could finish before the fourth message, leaving no tail).
    photos(library, folders=2, per_folder=10)
    name = await create(pair.stub, library)
    await pair.start_worker(pool_size=1, batch_size=100, trainer="tests.trainers:SlowTrainer")
    await pair.stub.StartSession(api.StartSessionRequest(name=name))
    head = await collect(pair.stub, name, limit=4)  # a client that drops after four messages
    assert_increasing(head)
    tail = await collect(pair.stub, name, after=head[-1].sequence)
    assert tail, "the stream went on"
    assert tail[0].sequence > head[-1].sequence
    assert_increasing(head + tail)
    assert_counters_never_go_back(head + tail)
    assert tail[-1].state == pb.SESSION_STATE_COMPLETED


async def test_pause_and_resume_are_streamed_live(pair: Pair, library: Path) -> None:
    photos(library, folders=4, per_folder=60)
    name = await create(pair.stub, library)
    await pair.start_worker(pool_size=1, batch_size=100, trainer="tests.trainers:SlowTrainer")
    await pair.stub.StartSession(api.StartSessionRequest(name=name))
    events: list[pb.SessionEvent] = []
    call = pair.stub.WatchSession(api.WatchSessionRequest(name=name))

    def read_until_state(state: int) -> Coroutine[Any, Any, None]:
        return read_until(call, events, state)

    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_RUNNING), 30)
    await pair.stub.PauseSession(api.PauseSessionRequest(name=name))
    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_PAUSED), 10)
    await pair.stub.ResumeSession(api.ResumeSessionRequest(name=name))
    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_RUNNING), 10)
    await pair.stub.CancelSession(api.CancelSessionRequest(name=name))
    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_CANCELLED), 10)
    with contextlib.suppress(StopAsyncIteration):
        extra = [r async for r in call]
        assert extra == []
    assert_increasing(events)
    assert_counters_never_go_back(events)
    states = [e.state for e in events]
    paused_at = states.index(pb.SESSION_STATE_PAUSED)
    assert pb.SESSION_STATE_RUNNING in states[paused_at:]
    assert states[-1] == pb.SESSION_STATE_CANCELLED


async def test_watch_of_an_unknown_session_is_not_found(pair: Pair) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(pair.stub, "sessions/424242")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_deleted_session_ends_its_streams_with_not_found(pair: Pair, library: Path) -> None:
    (library / "a").mkdir()
    name = await create(pair.stub, library)
    call = pair.stub.WatchSession(api.WatchSessionRequest(name=name))
    assert (await call.read()).event.kind == pb.EVENT_KIND_SNAPSHOT
    await pair.stub.DeleteSession(api.DeleteSessionRequest(name=name))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read_rest(call)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_workers_own_stream_for_an_owned_session(pair: Pair, library: Path, clean_db: Database) -> None:
    """StreamSessionEvents straight from the owner: current state first, live progress, OK at the end."""
    from imagetraining.v1 import discovery_worker_service_pb2 as wpb
    from imagetraining.v1 import discovery_worker_service_pb2_grpc as wgrpc
    from tests import worker_support as ws

    photos(library, folders=3, per_folder=100)
    name = await create(pair.stub, library)
    sid = int(name.split("/")[1])
    worker = await pair.start_worker(pool_size=1, batch_size=100, trainer="tests.trainers:PacedTrainer")
    await pair.stub.StartSession(api.StartSessionRequest(name=name))

    async def owned() -> bool:
        return (await ws.session(clean_db, sid))["owner_id"] is not None

    await wait_for(owned, timeout=10, what="the worker to claim the session")
    row = await ws.session(clean_db, sid)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        call = wgrpc.DiscoveryWorkerServiceStub(channel).StreamSessionEvents(wpb.StreamSessionEventsRequest(name=name))
        events = [r.event async for r in call]
        assert await call.code() == grpc.StatusCode.OK
    assert events and all(e.name == name for e in events)
    assert_increasing(events)
    assert_counters_never_go_back(events)
    # The claim reserved a block: every sequence lies below the ceiling it stored.
    assert all(e.sequence <= row["event_sequence"] for e in events)
    assert events[-1].state == pb.SESSION_STATE_COMPLETED
    assert events[-1].training.processed_images + events[-1].training.skipped_images == 300
    kinds = {e.kind for e in events}
    assert pb.EVENT_KIND_TRAINING_PROGRESS in kinds and pb.EVENT_KIND_STATE_CHANGE in kinds


# ---- #10: what a subscriber sees is what GetSession says --------------------------------------


def _counters(training: pb.TrainingProgress) -> tuple[int, int, int, int]:
    return (training.processed_images, training.failed_images, training.skipped_images, training.total_images)


async def test_every_message_of_an_unowned_session_carries_the_committed_counters(pair: Pair, library: Path) -> None:
    """A finished, then a paused session: the snapshot and every later message show GetSession's counters."""
    photos(library, folders=2, per_folder=10)
    # One exact copy: the session skips it, so a "skipped 0" message would be caught.
    (library / "album00" / "copy.JPG").write_bytes((library / "album00" / "img0000.JPG").read_bytes())
    name = await create(pair.stub, library)
    await pair.start_worker(pool_size=1, batch_size=100)
    await pair.stub.StartSession(api.StartSessionRequest(name=name))

    async def finished() -> bool:
        got = (await pair.stub.GetSession(api.GetSessionRequest(name=name))).session
        return got.state == pb.SESSION_STATE_COMPLETED

    await wait_for(finished, timeout=60, what="the session to complete")
    stored = (await pair.stub.GetSession(api.GetSessionRequest(name=name))).session
    assert _counters(stored.progress) == (20, 0, 1, 21)
    events = await collect(pair.stub, name)
    assert events and events[0].kind == pb.EVENT_KIND_SNAPSHOT
    for event in events:
        assert _counters(event.training) == _counters(stored.progress), event
        assert event.discovery.images_found == stored.discovery.images_found == 21

    # Paused mid-run (no owner): the snapshot and the heartbeats carry the committed counters too.
    await pair.stub.RestartSession(api.RestartSessionRequest(name=name))
    await pair.stub.PauseSession(api.PauseSessionRequest(name=name))
    paused = (await pair.stub.GetSession(api.GetSessionRequest(name=name))).session
    assert paused.state == pb.SESSION_STATE_PAUSED
    call = pair.stub.WatchSession(api.WatchSessionRequest(name=name))
    first = (await asyncio.wait_for(call.read(), 10)).event
    assert first.kind == pb.EVENT_KIND_SNAPSHOT and first.state == pb.SESSION_STATE_PAUSED
    assert _counters(first.training) == _counters(paused.progress)
    assert first.training.processed_images == 20


async def test_an_unowned_stream_sends_heartbeats(pair: Pair, library: Path) -> None:
    """A pending session: after its snapshot, a heartbeat at least every 5 s (a dead stream sends nothing)."""
    (library / "a").mkdir()
    name = await create(pair.stub, library)
    call = pair.stub.WatchSession(api.WatchSessionRequest(name=name))
    first = (await asyncio.wait_for(call.read(), 10)).event
    assert first.kind == pb.EVENT_KIND_SNAPSHOT and first.state == pb.SESSION_STATE_PENDING
    beats = []
    for _ in range(2):
        beats.append((await asyncio.wait_for(call.read(), 7)).event)
    call.cancel()
    assert [b.kind for b in beats] == [pb.EVENT_KIND_HEARTBEAT] * 2
    assert first.sequence < beats[0].sequence < beats[1].sequence
    assert all(b.state == pb.SESSION_STATE_PENDING for b in beats)


def _announcements(events: list[pb.SessionEvent]) -> list[int]:
    """The states as a subscriber is told them: the snapshot's, then each STATE_CHANGE's."""
    return [e.state for e in events if e.kind in (pb.EVENT_KIND_SNAPSHOT, pb.EVENT_KIND_STATE_CHANGE)]


def _assert_no_repeat(events: list[pb.SessionEvent]) -> None:
    said = _announcements(events)
    repeats = [s for s, t in itertools.pairwise(said) if s == t]
    assert not repeats, [pb.SessionState.Name(s) for s in said]


def _assert_unknown_total_is_indeterminate(events: list[pb.SessionEvent]) -> None:
    for event in events:
        if not event.discovery.total_final:
            assert event.training.indeterminate, event
            assert not event.training.HasField("percentage"), event
            assert not event.training.HasField("eta"), event


async def test_each_transition_is_announced_once_and_an_unknown_total_is_indeterminate(
    pair: Pair, library: Path
) -> None:
    photos(library, folders=3, per_folder=60)
    name = await create(pair.stub, library)
    events: list[pb.SessionEvent] = []
    call = pair.stub.WatchSession(api.WatchSessionRequest(name=name))

    def read_until_state(state: int) -> Coroutine[Any, Any, None]:
        return read_until(call, events, state, lambda e: e.kind != pb.EVENT_KIND_HEARTBEAT)

    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_PENDING), 10)
    await pair.start_worker(pool_size=1, batch_size=50, trainer="tests.trainers:SlowTrainer")
    await pair.stub.StartSession(api.StartSessionRequest(name=name))
    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_RUNNING), 60)
    await pair.stub.PauseSession(api.PauseSessionRequest(name=name))
    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_PAUSED), 10)
    await pair.stub.ResumeSession(api.ResumeSessionRequest(name=name))
    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_RUNNING), 10)
    # Let the new owner's messages arrive before the end, so a repeated RUNNING would be seen.
    done_before = events[-1].training.processed_images

    async def progressed() -> bool:
        return bool(events) and events[-1].training.processed_images > done_before + 2

    reader = asyncio.create_task(read_until_state(pb.SESSION_STATE_CANCELLED))
    await wait_for(progressed, timeout=30, what="training to go on after the resume")
    await pair.stub.CancelSession(api.CancelSessionRequest(name=name))
    await asyncio.wait_for(reader, 10)

    said = _announcements(events)
    assert said == [
        pb.SESSION_STATE_PENDING,
        pb.SESSION_STATE_DISCOVERING,
        pb.SESSION_STATE_RUNNING,
        pb.SESSION_STATE_PAUSED,
        pb.SESSION_STATE_RUNNING,
        pb.SESSION_STATE_CANCELLED,
    ], [pb.SessionState.Name(s) for s in said]
    _assert_no_repeat(events)
    _assert_unknown_total_is_indeterminate(events)


async def test_the_stream_and_get_session_use_one_rate_and_eta(pair: Pair, library: Path) -> None:
    """#10 item 5: the worker's messages and GetSession computed the rate two ways; now one formula
    (images per second of training time), so the paused and the finished session agree exactly."""
    photos(library, folders=2, per_folder=25)
    name = await create(pair.stub, library)
    await pair.start_worker(pool_size=1, batch_size=50, trainer="tests.trainers:SlowTrainer")
    await pair.stub.StartSession(api.StartSessionRequest(name=name))
    events: list[pb.SessionEvent] = []
    call = pair.stub.WatchSession(api.WatchSessionRequest(name=name))

    def read_until_state(state: int) -> Coroutine[Any, Any, None]:
        return read_until(call, events, state, lambda e: e.training.processed_images >= 3)

    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_RUNNING), 60)
    running = events[-1].training
    assert running.images_per_second > 0 and running.HasField("eta")
    await pair.stub.PauseSession(api.PauseSessionRequest(name=name))
    await asyncio.wait_for(read_until_state(pb.SESSION_STATE_PAUSED), 10)
    call.cancel()
    stored = (await pair.stub.GetSession(api.GetSessionRequest(name=name))).session.progress
    assert not stored.HasField("eta"), "a paused session has no ETA"
    # A new subscriber of the paused session: the same figures as GetSession, no ETA.
    snapshot = (await collect(pair.stub, name, limit=1))[0]
    assert snapshot.training.images_per_second == stored.images_per_second > 0
    assert not snapshot.training.HasField("eta")
    # To the end: the owner's terminal message carries the committed row's rate, as GetSession does.
    await pair.stub.ResumeSession(api.ResumeSessionRequest(name=name))
    tail = await asyncio.wait_for(collect(pair.stub, name, after=snapshot.sequence), 60)
    assert tail[-1].state == pb.SESSION_STATE_COMPLETED
    final = (await pair.stub.GetSession(api.GetSessionRequest(name=name))).session.progress
    assert tail[-1].training.images_per_second == final.images_per_second > 0
    assert not tail[-1].training.HasField("eta") and not final.HasField("eta")

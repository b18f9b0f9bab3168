"""The worker's per-session event source: rate, heartbeats, sequences and reservations."""

from __future__ import annotations

from discovery_worker.events import SEQUENCE_LOW_WATER, SessionEvents
from imagetraining.fanout import Fanout, SubscriberBudget
from imagetraining.v1 import resources_pb2 as pb
from tests.conftest import wait_for


def make(first: int = 1, ceiling: int = 100_000, **kw: object) -> tuple[SessionEvents, Fanout]:
    fan = Fanout(SubscriberBudget(100), idle_seconds=60)
    return SessionEvents(7, fan, first_sequence=first, ceiling=ceiling, **kw), fan  # type: ignore[arg-type]


async def test_progress_is_rate_limited_but_the_latest_state_always_arrives() -> None:
    events, fan = make(min_interval=0.1, heartbeat_interval=60)
    sub = fan.subscribe(0)
    events.start()
    for i in range(1, 1001):
        events.discovery(pb.DiscoveryProgress(images_found=i, files_seen=i))
    first = await sub.get()
    assert first is not None and first.kind == pb.EVENT_KIND_STATE_CHANGE and first.sequence == 1

    async def latest_delivered() -> pb.SessionEvent | None:
        return fan.latest if fan.latest is not None and fan.latest.discovery.images_found == 1000 else None

    last = await wait_for(latest_delivered, timeout=5, what="the last discovery counters")
    # 1000 reports in a burst became a handful of messages, the last one cumulative.
    assert last.sequence < 10
    assert last.training.discovered_images == 1000
    await events.close()


async def test_state_changes_are_immediate_and_sequences_increase() -> None:
    events, fan = make(first=501, min_interval=10, heartbeat_interval=60)
    sub = fan.subscribe(0)
    events.start()
    events.set_state(pb.SESSION_STATE_RUNNING)
    events.set_state(pb.SESSION_STATE_COMPLETED, "done")
    await events.close()
    seen = []
    while (item := await sub.get()) is not None:
        seen.append((item.sequence, item.state))
    assert seen == [
        (501, pb.SESSION_STATE_DISCOVERING),
        (502, pb.SESSION_STATE_RUNNING),
        (503, pb.SESSION_STATE_COMPLETED),
    ]


async def test_heartbeat_when_idle() -> None:
    events, fan = make(min_interval=0.05, heartbeat_interval=0.2)
    events.start()

    async def heartbeat() -> bool:
        return fan.latest is not None and fan.latest.kind == pb.EVENT_KIND_HEARTBEAT

    await wait_for(heartbeat, timeout=5, what="a heartbeat")
    await events.close()


async def test_a_new_block_is_reserved_before_the_ceiling() -> None:
    reserved: list[int] = []

    async def reserve() -> int:
        reserved.append(1)
        return 10_000_000

    events, _fan = make(first=1, ceiling=SEQUENCE_LOW_WATER + 5, reserve=reserve, min_interval=10)
    events.start()
    for state in range(10):
        events.set_state(pb.SESSION_STATE_RUNNING if state % 2 else pb.SESSION_STATE_DISCOVERING)

    async def extended() -> bool:
        return bool(reserved)

    await wait_for(extended, timeout=5, what="a reservation")
    await events.close()
    assert len(reserved) == 1


async def test_numbers_taken_above_the_block_by_a_control_service_move_the_owner_above_them() -> None:
    """A relay that cannot reach this owner numbers row messages above its block (transitions.MINT_SEQUENCE):
    once the watcher reports the row's counter, the owner reserves a new block and numbers above it."""
    row_counter = 200_000  # the claim reserved (100_000, 200_000]

    async def reserve() -> int:
        nonlocal row_counter
        row_counter += 100_000
        return row_counter

    events, fan = make(first=100_001, ceiling=200_000, reserve=reserve, min_interval=10, heartbeat_interval=60)
    sub = fan.subscribe(0)
    events.start()
    events.acknowledge(200_001)  # the owner's own transition (discovering -> running) raised the row by one
    events.note_row_sequence(200_001)
    events.set_state(pb.SESSION_STATE_RUNNING)
    row_counter = 200_003  # a control service minted 200_002 and 200_003 for row messages
    events.note_row_sequence(200_003)

    async def moved() -> bool:
        return events._next > 200_003

    await wait_for(moved, timeout=5, what="the owner to number above the minted sequences")
    events.set_state(pb.SESSION_STATE_COMPLETED, "done")
    await events.close()
    seen = []
    while (item := await sub.get()) is not None:
        seen.append(item.sequence)
    assert seen[:2] == [100_001, 100_002]  # its own transition did not move it
    assert seen[-1] == 200_004  # the first number of the block reserved above the minted ones

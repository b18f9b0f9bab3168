"""Fan-out: conflation, ordering, eviction and the subscriber cap."""

from __future__ import annotations

import asyncio

import pytest

from imagetraining.errors import ResourceExhausted
from imagetraining.fanout import Evicted, Fanout, SubscriberBudget
from imagetraining.v1 import resources_pb2 as pb


def ev(seq: int, kind: int = pb.EVENT_KIND_TRAINING_PROGRESS, processed: int = 0) -> pb.SessionEvent:
    return pb.SessionEvent(
        name="sessions/1", sequence=seq, kind=kind, training=pb.TrainingProgress(processed_images=processed)
    )


async def drain(sub: object) -> list[int]:
    out = []
    while True:
        item = await sub.get()  # type: ignore[attr-defined]
        if item is None:
            return out
        out.append(item.sequence)


async def test_progress_is_conflated_and_state_changes_are_kept() -> None:
    fan = Fanout(SubscriberBudget(10), idle_seconds=60)
    sub = fan.subscribe(0)
    for i in range(1, 101):
        fan.publish(ev(i, processed=i))
    fan.publish(ev(101, pb.EVENT_KIND_STATE_CHANGE))
    for i in range(102, 200):
        fan.publish(ev(i, processed=i))
    fan.end()
    # 100 progress messages collapse to the newest, the state change stays, then the newest again.
    assert await drain(sub) == [100, 101, 199]
    assert sub.pending == 0


async def test_sequences_never_repeat_or_go_backwards() -> None:
    fan = Fanout(SubscriberBudget(10), idle_seconds=60)
    sub = fan.subscribe(after_sequence=5)
    for seq in (3, 5, 6, 6, 4, 8, 7, 9):
        fan.publish(ev(seq, pb.EVENT_KIND_STATE_CHANGE))
    fan.end()
    assert await drain(sub) == [6, 8, 9]


async def test_slow_subscriber_is_evicted_without_affecting_others() -> None:
    fan = Fanout(SubscriberBudget(10), idle_seconds=1.0)
    slow = fan.subscribe(0)
    fast = fan.subscribe(0)
    fan.publish(ev(1))
    assert (await fast.get()) is not None
    fast.delivered()
    # The slow one has held message 1 for longer than idle_seconds; the fast one holds nothing.
    assert slow.waiting_since is not None
    assert fan.sweep(now=slow.waiting_since + 1.5) == 1
    with pytest.raises(Evicted) as info:
        await slow.get()
    assert info.value.last_sequence == 0
    fan.publish(ev(2))
    item = await fast.get()
    assert item is not None and item.sequence == 2


async def test_unbounded_state_changes_evict_instead_of_growing() -> None:
    fan = Fanout(SubscriberBudget(10), idle_seconds=60, max_queue=8)
    sub = fan.subscribe(0)
    for i in range(1, 20):
        fan.publish(ev(i, pb.EVENT_KIND_STATE_CHANGE))
    assert sub.pending == 0
    with pytest.raises(Evicted):
        await sub.get()


async def test_subscriber_cap_is_process_wide_and_released() -> None:
    budget = SubscriberBudget(2)
    a, b = Fanout(budget, idle_seconds=60), Fanout(budget, idle_seconds=60)
    s1 = a.subscribe(0)
    b.subscribe(0)
    with pytest.raises(ResourceExhausted):
        b.subscribe(0)
    a.unsubscribe(s1)
    b.subscribe(0)
    assert budget.count == 2


def test_budget_check_takes_no_place_and_refusals_are_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    budget = SubscriberBudget(1)
    budget.check()  # room: no error, no place taken
    assert budget.count == 0
    budget.acquire()
    with caplog.at_level("WARNING", logger="imagetraining.fanout"):
        for _ in range(3):
            with pytest.raises(ResourceExhausted, match="IMAGETRAINING_MAX_SUBSCRIBERS"):
                budget.check()
        with pytest.raises(ResourceExhausted):
            budget.acquire()
    assert budget.count == 1 and budget.refused == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "IMAGETRAINING_MAX_SUBSCRIBERS=1" in warnings[0]


async def test_waiting_reader_wakes_on_publish() -> None:
    fan = Fanout(SubscriberBudget(10), idle_seconds=60)
    sub = fan.subscribe(0)
    reader = asyncio.create_task(sub.get())
    done, _ = await asyncio.wait({reader}, timeout=0.05)
    assert not done  # blocked: nothing published yet
    fan.publish(ev(7))
    item = await asyncio.wait_for(reader, 1)
    assert item is not None and item.sequence == 7

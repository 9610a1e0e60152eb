"""The eager hand-over of streams/faust_patches/handover.py, raced by mode's real `wait_first`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mode import Service
from mode.utils.locks import Event

from streams.faust_patches.handover import hand_over_eagerly


class Fetcher(Service):
    """The consumer surface the hook patches: mode's `wait_first` and a flow-stop event."""

    def __init__(self) -> None:
        super().__init__()
        self.suspend_flow = Event()
        self.races = 0
        race = self.wait_first

        async def counted(*coros: Any, **kwargs: Any) -> Any:
            self.races += 1
            return await race(*coros, **kwargs)

        self.wait_first = counted  # type: ignore[method-assign]
        hand_over_eagerly(self)

    async def hand_over(self, callback: Any) -> None:
        """What Faust's fetch loop does with each record."""
        await self.wait_first(callback, self.suspend_flow.wait())


async def test_a_callback_that_never_waits_runs_at_once_without_a_race() -> None:
    fetcher, done = Fetcher(), []

    async def put(value: int) -> None:
        done.append(value)

    for value in range(3):
        await fetcher.hand_over(put(value))
    assert done == [0, 1, 2]
    assert fetcher.races == 0


async def test_a_callback_that_waits_goes_on_in_a_task_and_races_the_flow() -> None:
    fetcher = Fetcher()
    room: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    got: list[str] = []

    async def put() -> None:
        got.append("before")
        got.append(await room)  # a full queue: the value it waited for comes through
        await asyncio.sleep(0)
        got.append("after")

    handing = asyncio.ensure_future(fetcher.hand_over(put()))
    await asyncio.sleep(0.01)
    assert got == ["before"] and not handing.done()
    room.set_result("room")
    await handing
    assert got == ["before", "room", "after"]
    assert fetcher.races == 1


async def test_a_flow_stop_cancels_a_waiting_callback() -> None:
    fetcher = Fetcher()
    cancelled = asyncio.Event()

    async def put() -> None:
        try:
            await asyncio.Event().wait()  # never room in the queue
        except asyncio.CancelledError:
            cancelled.set()
            raise

    handing = asyncio.ensure_future(fetcher.hand_over(put()))
    await asyncio.sleep(0.01)
    fetcher.suspend_flow.set()  # a rebalance stops the flow
    await asyncio.wait_for(handing, 1)
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_while_the_flow_is_stopped_fausts_own_race_runs() -> None:
    fetcher, done = Fetcher(), []

    async def put() -> None:
        done.append(1)

    fetcher.suspend_flow.set()
    await fetcher.hand_over(put())
    assert fetcher.races == 1


async def test_an_error_in_the_callback_reaches_the_fetch_loop() -> None:
    fetcher = Fetcher()

    async def put() -> None:
        raise ValueError("undecodable")

    with pytest.raises(ValueError, match="undecodable"):
        await fetcher.hand_over(put())


def test_patching_twice_changes_nothing() -> None:
    fetcher = Fetcher()
    patched = fetcher.wait_first
    hand_over_eagerly(fetcher)
    assert fetcher.wait_first is patched


# --- whole batches (BatchHandOver) -------------------------------------------------------

CASES = "acsr.cases"


def _record(offset: int, topic: str = CASES) -> Any:
    from faust.types import Message

    return Message(topic, 0, offset, 0.0, 0, [], b"case", b"{}", None)


def _app_with_handover(max_records: int = 3, wait_s: float = 0.05) -> tuple[Any, Any]:
    """A real (not started) Faust app, its conductor patched for the cases topic."""
    import faust

    from streams.faust_patches.handover import BatchHandOver, hand_over_in_batches

    app = faust.App(f"handover-{id(object())}", broker="kafka://127.0.0.1:1",
                    store="memory://", web_enabled=False)
    handover = BatchHandOver(CASES, max_records, wait_s)
    hand_over_in_batches(app, [handover])
    return app, handover


async def test_the_conductor_hands_the_chosen_topic_to_the_batch_and_others_to_faust() -> None:
    from faust.types import TP

    app, handover = _app_with_handover()
    deliver = app.topics._build_handler(TP(CASES, 0), set())
    other = app.topics._build_handler(TP("acsr.case-links", 0), set())
    assert other is not deliver and getattr(other, "__name__", "") != "deliver"
    app.flow_control.resume()  # as Faust does once the partitions are assigned
    for offset in range(2):
        await asyncio.wait_for(deliver(_record(offset)), 1)
    app.flow_control.suspend()  # a rebalance: the fetcher's records wait
    held = asyncio.ensure_future(deliver(_record(2)))
    await asyncio.sleep(0.01)
    assert not held.done() and len(handover.pending) == 2
    held.cancel()
    batches = handover.batches()
    batch = await asyncio.wait_for(anext(batches), 1)
    assert [r.offset for r in batch] == [0, 1]
    handover.acknowledge(batch)  # the consumer's own ack: Faust may commit past them
    assert all(r.acked for r in batch)


async def test_a_full_batch_is_handed_at_once_and_the_fetcher_waits_for_room() -> None:
    _, handover = _app_with_handover(max_records=3, wait_s=60)
    for offset in range(3):
        await handover.add(_record(offset))
    blocked = asyncio.ensure_future(handover.add(_record(3)))
    await asyncio.sleep(0.01)
    assert not blocked.done()  # no room: the fetch loop waits
    batch = await asyncio.wait_for(anext(handover.batches()), 1)  # full: no 60 s wait
    assert [r.offset for r in batch] == [0, 1, 2]
    await asyncio.wait_for(blocked, 1)
    assert [r.offset for r in handover.pending] == [3]


async def test_a_record_waits_at_most_wait_s_counting_from_its_arrival() -> None:
    _, handover = _app_with_handover(max_records=100, wait_s=0.2)
    await handover.add(_record(0))
    await asyncio.sleep(0.25)  # as if the last batch took that long
    started = asyncio.get_running_loop().time()
    batch = await asyncio.wait_for(anext(handover.batches()), 1)
    assert len(batch) == 1 and asyncio.get_running_loop().time() - started < 0.1
    await handover.add(_record(1))
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(anext(handover.batches()), 1)
    assert asyncio.get_running_loop().time() - started >= 0.15  # lingered for more


async def test_a_rebalance_drops_pending_records_unacknowledged() -> None:
    """Faust empties its stream queues at a revocation; the hand-over's list goes too,
    and those records are fetched again (never acknowledged, so never committed)."""
    app, handover = _app_with_handover()
    records = [_record(offset) for offset in range(2)]
    for record in records:
        await handover.add(record)
    app.flow_control.clear()
    assert handover.pending == [] and not any(r.acked for r in records)
    await handover.add(_record(7))
    batch = await asyncio.wait_for(anext(handover.batches()), 1)
    assert [r.offset for r in batch] == [7]


def test_installing_the_batch_hand_over_twice_changes_nothing() -> None:
    from streams.faust_patches.handover import BatchHandOver, hand_over_in_batches

    app, _ = _app_with_handover()
    patched = app.topics._build_handler
    hand_over_in_batches(app, [BatchHandOver(CASES, 5, 0.1)])
    assert app.topics._build_handler is patched

"""The eager hand-over of streams/faust_patches/handover.py, raced by mode's real `wait_first`."""

from __future__ import annotations

import asyncio
import contextlib
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


@pytest.mark.parametrize("ending", ["acknowledged", "left uncommitted"])
async def test_a_revocation_waits_for_the_batch_in_the_agents_hands(ending: str) -> None:
    """Faust's `wait_empty`, run at every revocation before the partitions go, returns only
    once the batch the agent took is acknowledged (or left uncommitted by a stop): the
    batch never writes for a partition another worker already owns."""
    from streams.faust_patches.fixes import keep_uncommitted

    app, handover = _app_with_handover()
    assert app.conf.stream_wait_empty  # Faust's default, which this relies on
    for offset in range(2):
        await handover.add(_record(offset))
    batch = await asyncio.wait_for(anext(handover.batches()), 1)
    revoking = asyncio.ensure_future(app.consumer.wait_empty())
    await asyncio.sleep(0.3)
    assert not revoking.done()  # the agent still holds the batch
    if ending == "acknowledged":
        handover.acknowledge(batch)
    else:
        keep_uncommitted(batch)
    await asyncio.wait_for(revoking, 3)
    assert not app.consumer._unacked_messages


def test_installing_the_batch_hand_over_twice_changes_nothing() -> None:
    from streams.faust_patches.handover import BatchHandOver, hand_over_in_batches

    app, _ = _app_with_handover()
    patched = app.topics._build_handler
    hand_over_in_batches(app, [BatchHandOver(CASES, 5, 0.1)])
    assert app.topics._build_handler is patched


async def test_a_batch_taken_while_the_group_rebalances_is_left_for_the_next_owner() -> None:
    """Between a revocation and the end of the recovery the generation has not changed,
    but the partitions are no longer the worker's: a record the fetcher handed over then
    is kept uncommitted, never processed (processed, it wrote its case from nothing and
    the case's earlier records, due again, were taken for redeliveries)."""
    from faust.types import Message

    from streams.config import Settings
    from streams.worker.app import Worker, batch_handovers, faust_app, install_patches

    settings = Settings()
    app = faust_app(settings)
    handovers = batch_handovers(settings)
    worker = Worker(app, settings, install_patches(app, settings, handovers), handovers)
    app.tables.recovery.completed.set()
    handled: list[int] = []

    async def handle(partition: int, messages: list[Any]) -> None:
        handled.extend(message.offset for message in messages)

    loop = asyncio.ensure_future(worker.in_batches(settings.cases_topic, handle))
    try:
        for rebalancing, offset in ((True, 5), (False, 6)):
            app.rebalancing = rebalancing
            record = Message(settings.cases_topic, 0, offset, 0.0, 0, [], b"c", b"{}", None,
                             generation_id=app.consumer_generation_id)
            await handovers[settings.cases_topic].add(record)
            for _ in range(100):
                if record.acked:
                    break
                await asyncio.sleep(0.02)
            assert record.acked  # kept uncommitted (5) or acknowledged once processed (6)
        assert handled == [6]
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop

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

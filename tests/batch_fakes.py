"""The worker's own batch protocol (streams/worker/batches.py BatchProcessor) on dicts and
lists: tables that acknowledge at once, a Kafka side that keeps what it would send."""

from __future__ import annotations

from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any, TypeVar

from streams.core.annotations import ResendGuard
from streams.core.events import InvalidEvent
from streams.core.ledger import BatchPlan
from streams.kafka.partitioners import CRC32, CaseRouting

T = TypeVar("T")


class Crash(Exception):
    """The worker died."""


class Table(dict):
    """A table whose writes are acknowledged at once."""

    async def acknowledged(self, partition: int) -> None:
        pass


class DyingTable(Table):
    """The case table of a worker that dies amid a batch's case writes: only the writes
    to `landed` cases reach it."""

    def __init__(self, table: Table, landed: set[str]) -> None:
        super().__init__(table)
        self.landed = landed

    def __setitem__(self, key: str, value: bytes) -> None:
        if key in self.landed:
            super().__setitem__(key, value)

    async def acknowledged(self, partition: int) -> None:
        raise Crash


class Outputs:
    """Cases placed by CRC32 over `partitions`; links and items go nowhere, dead letters
    are kept."""

    def __init__(self, partitions: int = 1) -> None:
        self.routing = CaseRouting(CRC32, partitions)
        self.dead_lettered: list[int] = []

    async def case_routing(self) -> CaseRouting:
        return self.routing

    async def resend_guard(self, partition: int, offset: int) -> ResendGuard:
        return ResendGuard(offset)

    async def dead_letter(self, message: Any, invalid: InvalidEvent) -> bool:
        return (await self.dead_letters([(message, invalid)]))[0]

    async def dead_letters(self, invalid: list[tuple[Any, InvalidEvent]]) -> list[bool]:
        self.dead_lettered.extend(message.offset for message, _ in invalid)
        return [True] * len(invalid)

    async def send_links(self, plan: BatchPlan, routing: CaseRouting) -> list[Any]:
        return []

    async def send_items(self, plan: BatchPlan, guard: ResendGuard) -> list[Any]:
        return []

    def report_misrouting(self, plan: BatchPlan, routing: CaseRouting) -> None:
        pass


class NoWindows:
    """Windows left to the tests of windows."""

    def build(self, partitions: set[int]) -> None:
        pass

    def fold(self, plan: BatchPlan) -> None:
        pass

    async def acknowledged(self, partition: int) -> None:
        pass

    async def advance(self, partition: int, offset: int) -> None:
        pass


def records(lines: list[tuple[int, bytes]], partition: int = 0) -> list[Any]:
    """Records as the agents get them from the hand-over: offset and value of each."""
    return [SimpleNamespace(offset=offset, value=value, partition=partition, key=None,
                            headers=())
            for offset, value in lines]


def run_now(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a batch on these fakes to its end at once: nothing in it waits (the fakes
    acknowledge at once), so no event loop is needed, and it runs inside one too."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the batch waited for something: a fake that does not answer at once")

"""The batch protocol: how one partition's batch reaches the tables and topics exactly once.

    plan (the ledger, pure) -> dead-letter the invalid ones -> send links and annotation
    items -> fold windowed facts -> mark the partition record -> wait for every
    acknowledgement -> write the cases -> wait -> advance the windows -> expire idle cases

Every side effect of a batch is acknowledged before its cases are written, so a crash
anywhere leaves state that the next owner completes without counting anything twice
(docs/architecture.md, Batches). `BatchProcessor` owns that order and nothing else: its
tables and its Kafka side (`Outputs`) are injected, so the worker runs it on Faust tables
and producers, and the tests run the same class on dicts and lists.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import orjson

from streams.core import kpis
from streams.core.annotations import ResendGuard
from streams.core.events import Event, EventTimeBounds, InvalidEvent, parse_event
from streams.core.ledger import BatchPlan, Ledger, Origin, RecordTooLarge
from streams.kafka.partitioners import CaseRouting, parse_source
from streams.kafka.reader import OutputTopicError

log = logging.getLogger("acsr_metrics")

PROCESSING_ERROR = "processing_error"
STATE_TOO_LARGE = "state_too_large"  # a case record over the limit even after its spill


# A table: a MutableMapping of bytes whose writes to one changelog partition can be
# awaited with `await table.acknowledged(partition)` (faust_patches/tables.py).
Table = MutableMapping[Any, bytes]


class WindowSink(Protocol):
    """The window tables (streams/worker/window_tables.py)."""

    def build(self, partitions: set[int]) -> None: ...
    def fold(self, plan: BatchPlan) -> None: ...
    async def acknowledged(self, partition: int) -> None: ...
    async def advance(self, partition: int, offset: int) -> None: ...


class Outputs(Protocol):
    """The Kafka side of a batch (streams/worker/outputs.py)."""

    async def case_routing(self) -> CaseRouting: ...
    async def resend_guard(self, partition: int, offset: int) -> ResendGuard: ...
    async def dead_letter(self, message: Any, invalid: InvalidEvent) -> bool: ...
    async def dead_letters(self, invalid: list[tuple[Any, InvalidEvent]]) -> list[bool]: ...
    async def send_links(self, plan: BatchPlan, routing: CaseRouting) -> list[Awaitable[Any]]:
        ...
    async def send_items(self, plan: BatchPlan, guard: ResendGuard) -> list[Awaitable[Any]]:
        ...
    def report_misrouting(self, plan: BatchPlan, routing: CaseRouting) -> None: ...


def parse_or_invalid(value: bytes | None, bounds: EventTimeBounds) -> Event | InvalidEvent:
    try:
        return parse_event(value, bounds)
    except InvalidEvent as invalid:
        return invalid


class BatchProcessor:
    """Applies batches and links of the partitions a worker owns (see the module doc).

    `writes_on(message)` makes table writes go to the changelog partition of `message`'s
    partition (Faust's rule); `applied(plan)` hears of every batch that landed."""

    def __init__(self, ledger: Ledger, cases: Table, records: Table, windows: WindowSink,
                 outputs: Outputs, *, bounds: EventTimeBounds, repartitions: bool,
                 writes_on: Callable[[Any], AbstractContextManager[Any]],
                 applied: Callable[[BatchPlan], None] = lambda plan: None) -> None:
        self.ledger, self.cases, self.records = ledger, cases, records
        self.windows, self.outputs = windows, outputs
        self.bounds, self.repartitions = bounds, repartitions
        self.writes_on, self.applied = writes_on, applied
        # Held from planning a batch to writing its cases, so no link write lands between.
        self.locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    def ensure_built(self, partitions: set[int]) -> None:
        """Derive these partitions' aggregates, watermarks and windows from the recovered
        tables, if not done yet (after a start or a rebalance)."""
        unbuilt = self.ledger.unbuilt(partitions)
        if unbuilt:
            self.ledger.build(self.cases.items(), self.records.items(), unbuilt)
        self.windows.build(partitions)

    async def process(self, partition: int, messages: list[Any]) -> None:
        """A batch; if it fails (a bug, never input), its events again one by one, so only
        the one that fails goes to the dead-letter topic. An output that cannot be
        written (OutputTopicError) is raised: the worker stops."""
        try:
            await self.batch(partition, messages)
        except OutputTopicError:
            raise
        except Exception:
            log.exception("batch failed (partition=%s, offsets %s-%s); one by one",
                          partition, messages[0].offset, messages[-1].offset)
            await self.one_by_one(partition, messages)

    async def batch(self, partition: int, records: list[Any]) -> None:
        """One partition's records, in offset order, each once (a seek back can hand some
        records over again inside one batch)."""
        self.ensure_built({partition})
        messages = {message.offset: message for message in records}
        batch = [(offset, parse_or_invalid(messages[offset].value, self.bounds))
                 for offset in sorted(messages)]
        origins = self._origins(messages) if self.repartitions else None
        guard = await self.outputs.resend_guard(partition, batch[0][0])
        routing = await self.outputs.case_routing()
        with self.writes_on(records[-1]):
            async with self.locks[partition]:
                plan = self.ledger.plan_batch(self.cases, self.records, partition, batch,
                                              routing.home, origins)
                self.outputs.report_misrouting(plan, routing)
                await self._land(plan, messages, routing, guard)
            await self.windows.advance(partition, plan.last)
            self.ledger.maybe_expire(self.cases, self.records, partition)
        self.applied(plan)

    async def _land(self, plan: BatchPlan, messages: dict[int, Any], routing: CaseRouting,
                    guard: ResendGuard) -> None:
        """Every side effect acknowledged, then the partition record, then the cases."""
        partition = plan.partition
        refused = await self._dead_letter_all(plan, messages) if plan.invalid else []
        acks = [*await self.outputs.send_links(plan, routing),
                *await self.outputs.send_items(plan, guard)]
        self.windows.fold(plan)
        if plan.applied or plan.invalid:
            self.ledger.mark_batch(self.records, plan, refused)
        for ack in acks:
            await ack
        await self.windows.acknowledged(partition)
        await self.records.acknowledged(partition)
        self.ledger.commit_batch(self.cases, plan)
        await self.cases.acknowledged(partition)

    async def _dead_letter_all(self, plan: BatchPlan, messages: dict[int, Any]) -> list[int]:
        """Dead-letter the batch's invalid messages, all sent before any acknowledgement
        is awaited; the offsets the topic refused."""
        landed = await self.outputs.dead_letters([(messages[offset], invalid)
                                                  for offset, invalid in plan.invalid])
        return [offset for (offset, _), ok in zip(plan.invalid, landed, strict=True) if not ok]

    @staticmethod
    def _origins(messages: dict[int, Any]) -> dict[int, Origin]:
        return {offset: origin for offset, message in messages.items()
                if (origin := parse_source(message.headers)) is not None}

    async def one_by_one(self, partition: int, messages: Iterable[Any]) -> None:
        for message in messages:
            try:
                await self.batch(partition, [message])
            except OutputTopicError:
                raise
            except Exception as err:
                await self._failed(partition, message, err)

    async def _failed(self, partition: int, message: Any, err: Exception) -> None:
        """Dead-letter a record that failed on its own, with the reason, and count it."""
        reason = STATE_TOO_LARGE if isinstance(err, RecordTooLarge) else PROCESSING_ERROR
        log.exception("processing failed (partition=%s, offset=%s, case %r): %s",
                      message.partition, message.offset, message.key, reason)
        failure = InvalidEvent(reason, f"{type(err).__name__}: {err}")
        with self.writes_on(message):
            dead_lettered = await self.outputs.dead_letter(message, failure)
            self.ledger.apply_invalid(self.records, partition, message.offset, reason,
                                      counter=kpis.PROCESSING_ERROR,
                                      dead_lettered=dead_lettered)

    async def apply_link(self, message: Any) -> None:
        """A re-engagement sent by the worker owning the later case (our own message)."""
        partition = message.partition
        self.ensure_built({partition})
        try:
            link = orjson.loads(message.value)
            async with self.locks[partition]:
                self.ledger.apply_link(self.cases, link["case_id"], partition, link["ts_us"])
        except Exception:  # only our own messages come here: a bug, never input
            log.exception("link failed (partition=%s, offset=%s)", partition, message.offset)
            self.ledger.count_link_error(self.records, partition)

"""The consumer patches of streams/faust_patches/fixes.py, driven as Faust's fetch loop does.

The consumer here is a stand-in with Faust's consumer surface (read offsets, seeks,
revocation, batches); the patches' effect on a real worker is proven by the fault tests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from faust.transport.consumer import Consumer as FaustConsumer
from intervaltree import IntervalTree

from streams.faust_patches.fixes import (
    commit_only_contiguous,
    keep_seeks_over_stale_reads,
    stop_when_offsets_vanish,
)


class TP(NamedTuple):
    topic: str
    partition: int


class Record(NamedTuple):
    offset: int


A, B = TP("events", 0), TP("events", 1)


class Consumer:
    """Faust's consumer surface the patch relies on, with batches given up front."""

    def __init__(self, batches: list[list[tuple[TP, int]]], committed: dict[TP, int]) -> None:
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self.batches = batches
        self.committed = committed
        self.assigned = {A, B}
        self.sought: list[tuple[TP, int]] = []
        self.highwaters: dict[TP, int] = {}
        # Faust's acknowledgement bookkeeping, with its own gap and commit arithmetic.
        self._committed_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._gap: defaultdict[TP, IntervalTree] = defaultdict(IntervalTree)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)

    _add_gap = FaustConsumer._add_gap
    _new_offset = FaustConsumer._new_offset

    def ack(self, tp: TP, offset: int) -> None:
        if offset not in self._acked_index[tp]:
            self._acked_index[tp].add(offset)
            self._acked[tp].append(offset)

    async def seek(self, tp: TP, offset: int) -> None:
        self.sought.append((tp, offset))
        self._read_offset[tp] = offset if offset else None

    async def seek_to_committed(self) -> dict[TP, int]:
        for tp, offset in self.committed.items():
            self.sought.append((tp, offset))
        return dict(self.committed)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.assigned -= revoked
        for tp in revoked:
            self._read_offset.pop(tp, None)

    def assignment(self) -> set[TP]:
        return self.assigned

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters.get(tp)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Record]]:
        for tp, offset in self.batches.pop(0):
            yield tp, Record(offset)


Handler = Callable[[TP, int], Awaitable[None]]


async def drain(consumer: Any, on_record: Handler) -> list[tuple[TP, int]]:
    """One pass of Faust's fetch loop: hand each record over, then mark it read."""
    handed: list[tuple[TP, int]] = []
    async for tp, record in consumer.getmany(timeout=1.0):
        read = consumer._read_offset[tp]
        if read is None or record.offset >= read:
            handed.append((tp, record.offset))
            await on_record(tp, record.offset)
            consumer._read_offset[tp] = record.offset
    return handed


async def nothing(tp: TP, offset: int) -> None:
    return None


def patched(batches: list[list[tuple[TP, int]]], committed: dict[TP, int] | None = None
            ) -> Consumer:
    consumer = Consumer(batches, committed or {})
    keep_seeks_over_stale_reads(consumer)
    return consumer


async def test_a_seek_drops_only_the_moved_partitions_records_and_fetches_them_again() -> None:
    consumer = patched([[(A, 10), (B, 20), (A, 11), (B, 21), (A, 12)]])

    async def seek_a_back(tp: TP, offset: int) -> None:
        if (tp, offset) == (B, 20):
            await consumer.seek(A, 5)

    handed = await drain(consumer, seek_a_back)
    # B's records go on (ending the whole batch lost them); A's stale ones are dropped
    # and A is sought to where the seek put it, so they are fetched again.
    assert handed == [(A, 10), (B, 20), (B, 21)]
    assert consumer.sought == [(A, 5), (A, 5)]
    assert consumer._read_offset[A] == 5


async def test_a_read_offset_set_during_a_seek_is_put_back_to_the_seeks() -> None:
    consumer = patched([[(A, 40), (A, 41)]])

    async def seek_back_while_handing_over(tp: TP, offset: int) -> None:
        if offset == 40:
            await consumer.seek(A, 30)

    handed = await drain(consumer, seek_back_while_handing_over)
    assert handed == [(A, 40)]
    # Without the patch the fetch loop leaves 40 as read, and 30-39 fetched again are
    # dropped as already read.
    assert consumer._read_offset[A] == 30


async def test_recovery_seek_to_committed_moves_every_committed_partition() -> None:
    consumer = patched([[(A, 100), (B, 200), (A, 101), (B, 201)]], committed={A: 90, B: 190})

    async def recovery_seeks(tp: TP, offset: int) -> None:
        if offset == 100:
            await consumer.seek_to_committed()

    handed = await drain(consumer, recovery_seeks)
    assert handed == [(A, 100)]
    assert consumer.sought == [(A, 90), (B, 190), (B, 190), (A, 90)]


async def test_revoked_partitions_records_are_dropped_and_not_sought() -> None:
    consumer = patched([[(A, 7), (B, 8), (A, 9), (B, 10)]])

    async def revoke_a(tp: TP, offset: int) -> None:
        if offset == 7:
            await consumer.on_partitions_revoked({A})

    handed = await drain(consumer, revoke_a)
    assert handed == [(A, 7), (B, 8), (B, 10)]
    assert consumer.sought == []
    assert A not in consumer._read_offset


async def test_batches_fetched_after_a_move_are_handed_over_whole() -> None:
    consumer = patched([[(A, 1)], [(A, 5), (A, 6), (B, 3)]])

    async def seek_a(tp: TP, offset: int) -> None:
        if offset == 1:
            await consumer.seek(A, 5)

    assert await drain(consumer, seek_a) == [(A, 1)]
    assert await drain(consumer, nothing) == [(A, 5), (A, 6), (B, 3)]


async def test_patching_twice_changes_nothing() -> None:
    consumer = patched([[(A, 1), (A, 2)]])
    getmany = consumer.getmany
    keep_seeks_over_stale_reads(consumer)
    assert consumer.getmany is getmany


class Message:
    def __init__(self, tp: TP, offset: int, generation_id: int = 1) -> None:
        self.tp, self.offset, self.acked = tp, offset, False
        self.partition, self.generation_id = tp.partition, generation_id


class Event(NamedTuple):
    message: Message


async def test_a_record_ahead_of_its_due_offset_is_skipped_and_fetched_again() -> None:
    consumer = patched([])
    deliveries = keep_seeks_over_stale_reads(consumer)
    await consumer.seek(A, 10)  # recovery: the committed offset
    # 10 never reached the agent; 11 and 12 did: skipped, and marked so that Faust does
    # not acknowledge them (a commit would pass them before they come again).
    ahead = Message(A, 11)
    assert not await deliveries.in_order(ahead)
    assert ahead.acked
    assert not await deliveries.in_order(Message(A, 12))
    assert consumer.sought == [(A, 10), (A, 10)]  # sought back once, not per record
    # Fetched again from 10: all in order, redeliveries of what ran before too.
    for offset in (10, 11, 12):
        again = Message(A, offset)
        assert await deliveries.in_order(again)
        assert not again.acked  # left to Faust
    assert await deliveries.in_order(Message(A, 5))
    assert await deliveries.in_order(Message(B, 99))  # nothing due yet on B


async def test_a_batch_leaves_out_events_fetched_before_the_last_rebalance() -> None:
    consumer = patched([])
    deliveries = keep_seeks_over_stale_reads(consumer)
    await consumer.seek(A, 10)  # generation 2's assignment: A from its committed offset 10
    # Held by the batch across the rebalance: 10 and 11 of generation 1, and B's 7.
    before = [Message(A, 10, 1), Message(A, 11, 1), Message(B, 7, 1)]
    after = [Message(A, 10, 2), Message(A, 11, 2)]
    grouped = await deliveries.by_partition([*before, *after], 2)
    assert grouped == {0: after}
    assert all(m.acked for m in before)  # uncommitted: fetched again after recovery
    assert not any(m.acked for m in after)
    assert consumer.sought == [(A, 10)]  # nothing looked out of order


async def test_while_the_group_rebalances_a_batch_processes_nothing() -> None:
    """Revoked, not yet recovered (generation None): a record the fetcher handed over
    after the revocation emptied the queues is left uncommitted, never processed on a
    partition that has nothing due (it would write its case from nothing)."""
    consumer = patched([])
    deliveries = keep_seeks_over_stale_reads(consumer)
    await consumer.seek(A, 10)
    await consumer.on_partitions_revoked({A})
    late = [Message(A, 12, 1), Message(B, 3, 1)]
    assert await deliveries.by_partition(late, None) == {}
    assert all(m.acked for m in late)  # kept uncommitted: fetched again after recovery


async def test_a_revoked_partition_has_nothing_due() -> None:
    consumer = patched([])
    deliveries = keep_seeks_over_stale_reads(consumer)
    await consumer.seek(A, 10)
    await consumer.on_partitions_revoked({A})
    assert await deliveries.in_order(Message(A, 50))


async def test_records_the_guard_dropped_are_not_counted_as_acknowledged_gaps() -> None:
    """After a rebalance the fetcher handed over 505 right after 420: the guard had
    dropped 421-504 (fetched before the move), which are fetched again and processed."""

    async def after_rebalance(consumer: Consumer) -> int | None:
        consumer._committed_offset[A] = 421
        await consumer._add_gap(A, 421, 504)  # Faust's fetch loop: 505 came after 420
        for offset in range(421, 613):
            consumer.ack(A, offset)
        return consumer._new_offset(A)

    assert await after_rebalance(Consumer([], {})) < 425  # Faust alone: an offset or two
    assert await after_rebalance(patched([])) == 613
    other = TP("elsewhere", 0)
    unguarded = Consumer([], {})
    keep_seeks_over_stale_reads(unguarded, topics={"events"})
    await unguarded._add_gap(other, 3, 5)
    assert unguarded._gap[other].overlaps(4)  # other topics keep Faust's gaps


class Gaps:
    def __init__(self, *covered: int) -> None:
        self.covered = covered

    def overlaps(self, point: int) -> bool:
        return point in self.covered


class Acks:
    """Faust's acknowledgement bookkeeping; `_new_offset` as Faust computes it."""

    def __init__(self, committed: int | None, acked: list[int], gaps: Gaps | None = None):
        self._committed_offset = {A: committed}
        self._acked = {A: acked}
        self._gap = {A: gaps} if gaps else {}

    def _new_offset(self, tp: TP) -> int | None:
        acked = sorted(self._acked[tp])
        committed = self._committed_offset[tp]
        if committed and min(acked) - committed > 1:  # faust-streaming 0.15
            return None
        end = acked[0]
        while end + 1 in acked:
            end += 1
        return end + 1


def test_a_commit_never_passes_the_unacknowledged_committed_offset() -> None:
    acks = Acks(committed=10, acked=[11, 12])
    assert acks._new_offset(A) == 13  # Faust alone skips offset 10
    commit_only_contiguous(acks)
    assert acks._new_offset(A) is None
    acks._acked[A].append(10)
    assert acks._new_offset(A) == 13


def test_a_commit_passes_offsets_faust_knows_are_gaps() -> None:
    acks = Acks(committed=10, acked=[11, 12], gaps=Gaps(10))
    commit_only_contiguous(acks)
    assert acks._new_offset(A) == 13


async def test_a_partition_whose_due_record_never_arrives_is_fetched_again() -> None:
    consumer = patched([])
    deliveries = keep_seeks_over_stale_reads(consumer)
    await consumer.seek(A, 9)
    consumer.highwaters = {A: 10, B: 4}  # the broker holds record 9 of A
    await deliveries.refetch_stalled(idle_s=60)
    assert consumer.sought == [(A, 9)]  # not yet: it may still be on its way
    await deliveries.refetch_stalled(idle_s=0)
    assert consumer.sought == [(A, 9), (A, 9)]
    assert await deliveries.in_order(Message(A, 9))
    await deliveries.refetch_stalled(idle_s=0)  # caught up with the broker: nothing to do
    assert consumer.sought == [(A, 9), (A, 9)]


async def test_a_partition_is_not_stalled_while_the_agent_processes_a_batch() -> None:
    consumer = patched([])
    deliveries = keep_seeks_over_stale_reads(consumer)
    await consumer.seek(A, 9)
    consumer.highwaters = {A: 10}
    with deliveries.processing():  # e.g. a batch that takes longer than the idle time
        await deliveries.refetch_stalled(idle_s=0)
        assert consumer.sought == [(A, 9)]
    await deliveries.refetch_stalled(idle_s=60)  # the wait starts again after the batch
    assert consumer.sought == [(A, 9)]
    await deliveries.refetch_stalled(idle_s=0)
    assert consumer.sought == [(A, 9), (A, 9)]


async def test_only_the_agents_topics_are_watched() -> None:
    consumer = Consumer([], {})
    deliveries = keep_seeks_over_stale_reads(consumer, topics={"links"})
    await consumer.seek(A, 3)  # an events partition: no agent of `topics` reads it
    consumer.highwaters = {A: 10}
    await deliveries.refetch_stalled(idle_s=0)
    assert consumer.sought == [(A, 3)]
    assert await deliveries.in_order(Message(A, 7))


class Committing:
    """Faust's commit and seek-to-committed, answered as the broker would."""

    def __init__(self) -> None:
        self.broker: dict[TP, int | None] = {A: None}
        self.refuse = False

    async def _commit(self, offsets: dict[TP, int]) -> bool:
        if self.refuse:  # e.g. the group is rebalancing
            return False
        self.broker.update(offsets)
        return True

    async def seek_to_committed(self) -> dict[TP, int | None]:
        return dict(self.broker)


async def test_offsets_the_broker_confirmed_and_then_lost_are_reported() -> None:
    consumer = Committing()
    lost: list[list[TP]] = []

    async def on_lost(tps: list[TP]) -> None:
        lost.append(tps)

    stop_when_offsets_vanish(consumer, on_lost)
    consumer.refuse = True
    assert not await consumer._commit({A: 5})  # refused: the broker never had it
    await consumer.seek_to_committed()
    assert lost == []
    consumer.refuse = False
    assert await consumer._commit({A: 5})
    consumer.broker = {A: None}  # the broker lost its log
    await consumer.seek_to_committed()
    assert lost == [[A]]


async def test_a_commit_that_lands_during_the_read_back_is_no_loss() -> None:
    """The read-back asked the broker before the commit landed: its answer has no offset
    for that partition, which is not a lost log."""
    consumer = Committing()
    lost: list[list[TP]] = []

    async def on_lost(tps: list[TP]) -> None:
        lost.append(tps)

    read_back = consumer.seek_to_committed

    async def slow_read_back() -> dict[TP, int | None]:
        answer = await read_back()  # asked before the commit below
        assert await consumer._commit({A: 5})  # lands meanwhile, confirmed
        return answer

    consumer.seek_to_committed = slow_read_back  # type: ignore[method-assign]
    stop_when_offsets_vanish(consumer, on_lost)
    await consumer.seek_to_committed()
    assert lost == []
    consumer.broker = {A: None}  # lost after that commit was confirmed: reported
    await consumer.seek_to_committed()
    assert lost == [[A]]

"""Fixes for Faust (faust-streaming 0.15), written so they could be offered upstream.

1. Complete producer flushes.

Faust commits a consumer offset after `producer.flush()`, which must mean: every
message sent while processing the events up to that offset (table changelog writes
above all) has reached the Kafka client. `ProducerBuffer.flush()` (faust-streaming
0.15) does not guarantee that:

- it gives up when no message was sent for 0.1 s, with messages still queued;
- the message its sender task is handing to the client is no longer counted in the
  queue's size, so a flush can return while that message is in flight.

A worker killed right after such a commit loses changelog writes whose offsets are
committed: a table silently misses updates (measured: re-engagement links lost after a
SIGKILL). `complete_flushes(producer)` makes `flush()` wait until the queue is empty
and nothing is in flight.

2. Seeking partitions that have no committed offset.

While a rebalance's table recovery runs, the consumer keeps fetching, and records of
partitions not yet active are dropped; the stream then "seeks to committed offsets".
aiokafka's `seek_to_committed()` seeks only partitions whose committed offset is > 0,
so a partition with no committed offset (or 0) stays past the dropped records, and
they are never processed (measured: a new owner of a never-committed partition
started at its end). `seek_uncommitted_to_beginning(consumer)` seeks those partitions
to their earliest offset, as `auto_offset_reset="earliest"` promises.

3. Stale records and read offsets around a seek.

The fetcher hands a record to the stream and then records its offset as read. When a
rebalance (or a seek) runs while the hand-over is pending, the seek to the committed
offset happens first and the fetcher's stale "read" record lands after it; the records
re-fetched from the committed offset then count as already read and are dropped, while
later ones are processed (measured: after a SIGKILL and two quick rebalances, offsets
362-373 of a partition were never processed and its commit stopped at 362). The fetcher
also goes on handing over the rest of a batch fetched before the seek that recovery
makes once the tables are restored (measured: a restarted worker processed offsets
276-330, then 643 on, of a partition; 331-642 never). So
`keep_seeks_over_stale_reads(consumer)` tracks, per partition, the last seek or
revocation and where it put the partition. Records of a batch fetched before their
partition moved are dropped and the partition is sought to that position again (the
fetch position has passed them), records of partitions that did not move go on, and a
read offset set during a hand-over is put back to the move's. (Ending the whole batch on
any move instead lost records of the partitions that did not move: measured, 1 record
in about 10 runs with more workers than partitions.)

Faust takes offsets its fetcher skipped for offsets that hold no record (a compacted
topic, transaction markers) and counts them acknowledged ("gaps"). The records this
guard drops are no such thing: they are fetched again and acknowledged once processed.
Counted as gaps they could let a commit pass records not yet processed, and once
acknowledged for real they were counted twice: each commit then passed a single offset,
and after a rebalance a partition's commits crawled at one record a second while its
records were long processed (measured: 1.3 minutes for 80 records). So the patched
consumer keeps no gaps for the topics it guards; every offset of them is a record.

4. Offsets the broker lost.

A partition this worker committed offsets for, found with no committed offset after a
rebalance, means the broker lost the group's offsets, and with them (an embedded broker
restarted, a cluster replaced) the log the tables were built from. Processing on would be
silently wrong: the new log's offsets start again at 0, below the cases' recorded ones.
`stop_when_offsets_vanish(consumer, on_lost)` calls `on_lost` before any such record is
processed, so the worker can stop loudly and be restarted against the broker as it is.

5. Commits past a record that was never acknowledged.

`_new_offset` treats the committed offset as the last processed one, while it is the
next one to process (Kafka's, and Faust's own when it commits): with records C+1 on
acknowledged and C not, it commits past C (`min(acked) - committed > 1` is false). A
record lost on its way to the agent at the committed offset was then skipped for good
(measured: one re-engagement link or one event in about 40 runs with more workers than
partitions). `commit_only_contiguous(consumer)` commits only from C on once C is
acknowledged, and `Deliveries` (above) fetches such a lost record again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

POLL_S = 0.005

log = logging.getLogger("acsr_metrics")


def complete_flushes(producer: Any) -> None:
    """Patch a (not yet started) Faust producer's buffer so that flush() is complete."""
    buffer = producer.buffer
    if getattr(buffer, "_complete_flush", False):
        return
    send_pending = buffer._send_pending
    in_flight = 0

    async def tracked_send(fut: Any) -> None:
        nonlocal in_flight
        in_flight += 1
        try:
            await send_pending(fut)
        finally:
            in_flight -= 1

    async def flush() -> None:
        while buffer.size or in_flight:
            if buffer.state != "running" and buffer.size:
                raise RuntimeError("Cannot flush: Producer not Running")
            await asyncio.sleep(POLL_S)

    buffer._send_pending = tracked_send
    buffer.flush = flush
    buffer._complete_flush = True


def seek_uncommitted_to_beginning(consumer: Any) -> None:
    """Patch a Faust consumer so partitions with no committed offset restart at the beginning."""
    if getattr(consumer, "_seeks_uncommitted", False):
        return
    seek_to_committed = consumer.seek_to_committed

    async def seek_all_to_committed() -> Any:
        offsets = await seek_to_committed()
        uncommitted = [tp for tp, offset in offsets.items() if not offset or offset < 0]
        if uncommitted:
            # An explicit seek, not seek_to_beginning(): that one leaves the position
            # unset until a reset completes, and Faust's livelock detector asserts on it.
            earliest = await consumer.earliest_offsets(*uncommitted)
            for tp in uncommitted:
                await consumer.seek(tp, earliest.get(tp) or 0)
        return offsets

    consumer.seek_to_committed = seek_all_to_committed
    consumer._seeks_uncommitted = True


def keep_uncommitted(messages: Iterable[Any]) -> None:
    """Make Faust's later acknowledgement of these messages a no-op: no commit passes
    them, and they are fetched again after the next seek or rebalance."""
    for message in messages:
        message.acked = True


class Deliveries:
    """Where each partition's next record is due, as its consumer's seeks left it.

    Records can be lost on the way from the fetcher to the agent (measured: with more
    workers than partitions, a record right after a rebalance in about 1 run in 40;
    the cause inside Faust's hand-over is not found). A record handed to an agent ahead
    of its partition's due offset shows it: `in_order` seeks the partition back to the
    due offset and tells the agent to skip the record, which comes again after those
    before it. When the lost record was the partition's last, nothing shows it:
    `refetch_stalled` seeks back a partition whose due record the broker holds but that
    has not arrived for a while.
    """

    def __init__(self, consumer: Any, topics: Iterable[str] | None = None) -> None:
        self.consumer = consumer
        self.topics = set(topics) if topics is not None else None  # None: every topic
        self.due: dict[Any, int] = {}
        self.since: dict[Any, float] = {}  # partition -> when its due offset last moved
        self.refetching: dict[Any, int] = {}  # partition -> due offset sought back to
        self.busy = 0  # batches being processed: records are not awaited meanwhile

    def moved(self, tp: Any, target: int | None) -> None:
        if self.topics is not None and tp.topic not in self.topics:
            return
        self.refetching.pop(tp, None)
        if target is None or target < 0:
            self.due.pop(tp, None)
        else:
            self.due[tp] = target
            self.since[tp] = time.monotonic()

    async def in_order(self, message: Any) -> bool:
        """True when the agent may process `message` (redeliveries included); False when it
        must skip it, which also keeps Faust from acknowledging it."""
        tp, offset = message.tp, message.offset
        due = self.due.get(tp)
        if due is None or offset <= due:
            self.due[tp] = offset + 1
            self.since[tp] = time.monotonic()
            self.refetching.pop(tp, None)
            return True
        # Not acknowledged either: acknowledged, it would let a commit pass it (once the
        # records before it are) before it came again and was processed.
        keep_uncommitted([message])
        if self.refetching.get(tp) != due:
            await self._refetch(tp, due, f"record {offset} arrived first")
        return False

    async def by_partition(self, messages: Iterable[Any], generation: int | None
                           ) -> dict[int, list[Any]]:
        """A batch's records that may be processed, grouped by partition, each in order.

        Records fetched before the consumer's latest rebalance (`generation`) are left
        out and uncommitted. A batch can hold them across a rebalance, which Faust's own
        check (one event at a time) never lets through; processed, they would write to a
        table while its recovery reads the changelog, and recovery would overwrite them.
        The partition's owner fetches them again once its tables are recovered.

        While the group rebalances (`generation` None: from the revocation until the
        tables are recovered) every record is left out: the generation has not changed
        yet, but the partitions are no longer this worker's. A record the fetcher
        handed over just after the revocation emptied the queues, processed then, wrote
        its case from nothing, and the next owner took the case's earlier records, due
        again, for redeliveries."""
        grouped: dict[int, list[Any]] = {}
        stale = []
        for message in messages:
            if message.generation_id != generation:  # None: never equal
                stale.append(message)
            elif await self.in_order(message):
                grouped.setdefault(message.partition, []).append(message)
        if stale:
            keep_uncommitted(stale)
            log.info("%d records fetched before or during a rebalance left to be fetched again",
                     len(stale))
        return grouped

    @contextlib.contextmanager
    def processing(self) -> Iterator[None]:
        """While the agent processes a batch it takes no records: none counts as late,
        and the wait for each due record starts again when it is done."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            now = time.monotonic()
            for tp in self.since:
                self.since[tp] = now

    async def refetch_stalled(self, idle_s: float) -> None:
        """Seek back partitions whose due record the broker holds (below the high
        watermark of the last fetch) but that has not arrived for `idle_s` seconds of
        the agent waiting for records."""
        if self.busy:
            return
        now = time.monotonic()
        assigned = self.consumer.assignment()
        for tp, due in list(self.due.items()):
            highwater = self.consumer.highwater(tp)
            if (tp in assigned and highwater is not None and highwater > due
                    and now - self.since.get(tp, now) >= idle_s):
                await self._refetch(tp, due, f"nothing arrived for {idle_s:g}s")

    async def _refetch(self, tp: Any, due: int, why: str) -> None:
        log.warning("%s[%d]: record %d did not reach its agent (%s); fetching again from %d",
                    tp.topic, tp.partition, due, why, due)
        await self.consumer.seek(tp, due)  # a tracked move: `due` stays, `since` restarts
        self.refetching[tp] = due


def keep_seeks_over_stale_reads(consumer: Any, topics: Iterable[str] | None = None
                                ) -> Deliveries:
    """Patch a (not yet started) Faust consumer: a seek's positions win over stale records.

    Returns the consumer's `Deliveries` for the agents of `topics` to check each record
    with (every topic when None)."""
    existing = getattr(consumer, "_deliveries", None)
    if existing is not None:
        return existing
    deliveries = Deliveries(consumer, topics)
    read_offset = consumer._read_offset
    seek = consumer.seek
    moves = 0
    last_move: dict[Any, int] = {}  # partition -> the move that last repositioned it
    targets: dict[Any, int | None] = {}  # where that move put it (None: revoked)

    def moved(positions: Mapping[Any, int | None]) -> None:
        nonlocal moves
        moves += 1
        for tp, target in positions.items():
            last_move[tp] = moves
            targets[tp] = target
            deliveries.moved(tp, target)

    async def tracked_seek(tp: Any, offset: int) -> Any:
        try:
            return await seek(tp, offset)
        finally:
            moved({tp: offset})

    seek_to_committed = consumer.seek_to_committed

    async def tracked_seek_to_committed() -> Any:
        offsets = await seek_to_committed()
        # Partitions without a committed offset were sought one by one (tracked_seek).
        moved({tp: offset for tp, offset in offsets.items() if offset and offset > 0})
        return offsets

    on_partitions_revoked = consumer.on_partitions_revoked

    async def tracked_revocation(revoked: Any) -> Any:
        moved(dict.fromkeys(revoked))
        try:
            return await on_partitions_revoked(revoked)
        finally:
            moved(dict.fromkeys(revoked))

    async def reposition(tp: Any) -> None:
        # Records of `tp` were dropped after the fetcher's position passed them: put it
        # back where the move wanted it, so they are fetched again.
        target = targets.get(tp)
        if target is not None and tp in consumer.assignment():
            await seek(tp, target)

    def restore_read_offset(tp: Any) -> None:
        target = targets.get(tp)
        if target is None or target < 0:
            read_offset.pop(tp, None)
        else:
            read_offset[tp] = target

    getmany = consumer.getmany

    async def guarded_getmany(timeout: float) -> Any:
        fetched_at = None
        repositioned: set[Any] = set()
        async for tp, message in getmany(timeout=timeout):
            if fetched_at is None:  # the batch has just been fetched (no await in between)
                fetched_at = moves
            if last_move.get(tp, 0) > fetched_at:
                # `tp` was repositioned after this batch was fetched: its records are stale.
                if tp not in repositioned:
                    repositioned.add(tp)
                    await reposition(tp)
                continue
            before = last_move.get(tp, 0)
            yield tp, message
            if last_move.get(tp, 0) != before:
                # The fetcher marked this record read after the move: the move wins.
                restore_read_offset(tp)

    add_gap = consumer._add_gap

    async def gaps_only_outside_guarded_topics(tp: Any, offset_from: int, offset_to: int
                                               ) -> None:
        if deliveries.topics is not None and tp.topic not in deliveries.topics:
            await add_gap(tp, offset_from, offset_to)

    consumer._add_gap = gaps_only_outside_guarded_topics
    consumer.seek = tracked_seek
    consumer.seek_to_committed = tracked_seek_to_committed
    consumer.on_partitions_revoked = tracked_revocation
    consumer.getmany = guarded_getmany
    consumer._deliveries = deliveries
    return deliveries


def commit_only_contiguous(consumer: Any) -> None:
    """Patch a Faust consumer so a commit never passes a record that was not acknowledged."""
    if getattr(consumer, "_commits_contiguous", False):
        return
    new_offset = consumer._new_offset

    def contiguous_new_offset(tp: Any) -> int | None:
        committed = consumer._committed_offset.get(tp)
        acked = consumer._acked.get(tp)
        if committed is not None and acked and min(acked) > committed:
            gaps = consumer._gap.get(tp)
            if not (gaps and gaps.overlaps(committed)):
                return None  # the record at `committed` is not acknowledged yet
        return new_offset(tp)

    consumer._new_offset = contiguous_new_offset
    consumer._commits_contiguous = True


def stop_when_offsets_vanish(consumer: Any,
                             on_lost: Callable[[list[Any]], Awaitable[None]]) -> None:
    """Patch a (not yet started) Faust consumer to report offsets it committed and lost."""
    if getattr(consumer, "_watches_offsets", False):
        return
    # Offsets the broker confirmed: a commit that succeeded, or one read back from it.
    # (Faust's own record of committed offsets also keeps commits that failed in a
    # rebalance: measured, a false alarm for a partition never committed.)
    committed_once: set[Any] = set()
    commit = consumer._commit
    seek_to_committed = consumer.seek_to_committed

    async def remembering_commit(offsets: Mapping[Any, int]) -> bool:
        committed = await commit(offsets)
        if committed:
            committed_once.update(tp for tp, offset in offsets.items() if offset)
        return committed

    async def check_committed() -> Any:
        # Only commits confirmed before the read-back began: one that lands while it is
        # under way (records processed once the recovery ended, the read-back slow on a
        # loaded broker) is not in the answer, and is no loss (measured: a false alarm).
        confirmed = set(committed_once)
        offsets = await seek_to_committed()
        lost = sorted(tp for tp, offset in offsets.items()
                      if (not offset or offset < 0) and tp in confirmed)
        committed_once.update(tp for tp, offset in offsets.items() if offset and offset > 0)
        if lost:
            await on_lost(lost)
        return offsets

    consumer._commit = remembering_commit
    consumer.seek_to_committed = check_committed
    consumer._watches_offsets = True

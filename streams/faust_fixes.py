"""Two fixes for Faust (faust-streaming 0.15), written so they could be offered upstream.

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

3. Read offsets overwritten by a stale record around a rebalance.

The fetcher hands a record to the stream and then records its offset as read. When a
rebalance (or a seek) runs while the hand-over is pending, the seek to the committed
offset happens first and the fetcher's stale "read" record lands after it; the records
re-fetched from the committed offset then count as already read and are dropped, while
later ones are processed (measured: after a SIGKILL and two quick rebalances, offsets
362-373 of a partition were never processed and its commit stopped at 362). The same
happens when the fetcher goes on handing over the rest of a batch fetched before the
seek that recovery makes once the tables are restored (measured: a restarted worker
processed offsets 276-330, then 643 on, of a partition; 331-642 never). So
`keep_seeks_over_stale_reads(consumer)` ends a batch as soon as a seek or revocation
has run, and restores the read offsets it set if it ran during a hand-over.

4. Offsets the broker lost.

A partition this worker committed offsets for, found with no committed offset after a
rebalance, means the broker lost the group's offsets, and with them (an embedded broker
restarted, a cluster replaced) the log the tables were built from. Processing on would be
silently wrong: the new log's offsets start again at 0, below the cases' recorded ones.
`stop_when_offsets_vanish(consumer, on_lost)` calls `on_lost` before any such record is
processed, so the worker can stop loudly and be restarted against the broker as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

POLL_S = 0.005


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


def keep_seeks_over_stale_reads(consumer: Any) -> None:
    """Patch a (not yet started) Faust consumer: a seek's read offsets win over stale ones."""
    if getattr(consumer, "_keeps_seeks", False):
        return
    read_offset = consumer._read_offset
    moves = 0  # seeks and revocations so far
    after_move: dict[Any, Any] = {}  # read offsets as the last one left them

    def moving(method: Any) -> Any:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            nonlocal moves
            try:
                return await method(*args, **kwargs)
            finally:
                moves += 1
                after_move.clear()
                after_move.update(read_offset)

        return wrapped

    getmany = consumer.getmany

    async def guarded_getmany(timeout: float) -> Any:
        fetched_at = None
        async for tp, message in getmany(timeout=timeout):
            if fetched_at is None:  # the batch has just been fetched (no await in between)
                fetched_at = moves
            elif moves != fetched_at:
                return  # a seek ran since this batch was fetched: the rest of it is stale
            yield tp, message
            if moves != fetched_at:  # the fetcher just marked this record read, after a seek
                if tp in after_move:
                    read_offset[tp] = after_move[tp]
                else:
                    read_offset.pop(tp, None)
                return

    consumer.perform_seek = moving(consumer.perform_seek)
    consumer.seek = moving(consumer.seek)
    consumer.on_partitions_revoked = moving(consumer.on_partitions_revoked)
    consumer.getmany = guarded_getmany
    consumer._keeps_seeks = True


def stop_when_offsets_vanish(consumer: Any,
                             on_lost: Callable[[list[Any]], Awaitable[None]]) -> None:
    """Patch a (not yet started) Faust consumer to report offsets it committed and lost."""
    if getattr(consumer, "_watches_offsets", False):
        return
    committed_once: set[Any] = set()
    on_partitions_revoked = consumer.on_partitions_revoked
    seek_to_committed = consumer.seek_to_committed

    async def remember_committed(revoked: Any) -> Any:
        committed_once.update(tp for tp, offset in consumer._committed_offset.items() if offset)
        return await on_partitions_revoked(revoked)

    async def check_committed() -> Any:
        offsets = await seek_to_committed()
        lost = sorted(tp for tp, offset in offsets.items()
                      if (not offset or offset < 0) and tp in committed_once)
        if lost:
            await on_lost(lost)
        return offsets

    consumer.on_partitions_revoked = remember_committed
    consumer.seek_to_committed = check_committed
    consumer._watches_offsets = True

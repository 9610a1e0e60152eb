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
"""

from __future__ import annotations

import asyncio
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

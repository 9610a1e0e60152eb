"""Faust's hand-over of fetched records to the agents (faust-streaming 0.15); written so
it could be offered upstream.

1. Without a task per record (`hand_over_eagerly`).

Faust's fetch loop hands each record to the streams with
`await consumer.wait_first(callback(message), consumer.suspend_flow.wait())`: the
callback races a flow stop (a rebalance). mode's `wait_first` wraps each of the two
coroutines, and the service's stopped and crashed events, in a task of its own, and
waits on all four; the callback almost always finishes at once (it puts the event on a
stream's queue). Measured on the busy worker, that race took about a tenth of the main
thread (docs/performance.md).

`hand_over_eagerly(consumer)` runs the callback at once instead, up to its first real
wait; only a callback that does wait (a full stream queue, flow control) becomes a task
and races the flow stop as before. While the flow is stopped, or the consumer is
stopping, Faust's own race runs unchanged.

2. In whole batches (`BatchHandOver`). Faust's conductor gives every assigned partition a
callback that decodes a record into an event and puts it on the queue of each stream
that reads its topic; the stream then takes events off one at a time, through its
processors, and `Stream.take_events` buffers them for the agent (about 69 µs a record,
docs/performance.md). While the agent processes a batch, `take_events` takes nothing, so
the records fetched meanwhile pass that path only after it, and the next batch waits.
For the topics a `BatchHandOver` names, the partition's callback only appends the record
to a list the agent takes whole (`batches`); the agent acknowledges each record itself
once processed (`acknowledge`). Records fetched while a batch is processed wait in the
list, so the next batch is ready when the last one is done. Faust's flow control holds
as for its streams: no record is added while the flow is stopped, the list is emptied
when Faust empties its queues at a rebalance (those records stay unacknowledged and are
fetched again), and a full list makes the fetcher wait. A batch the agent has taken is
pending for Faust as its streams' events are (`Consumer._unacked_messages`), so a
revocation waits for it (`Consumer.wait_empty`) before the partitions go: no batch writes
to a table or topic of a partition another worker already owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine, Generator, Iterable
from typing import Any


class _Rest:
    """The rest of a coroutine that ran outside any task until it first yielded
    `pending`: awaited in a task, it goes on from there as if it had run in that task."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # cancellation and the like: the coroutine's
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return done.value


async def _finish(coro: Coroutine[Any, Any, Any], pending: Any) -> Any:
    return await _Rest(coro, pending)


def hand_over_eagerly(consumer: Any) -> None:
    """Patch a (not yet started) Faust consumer: see the module doc."""
    race = consumer.wait_first
    if getattr(race, "eager", False):
        return
    suspended = consumer.suspend_flow.is_set
    stopped, crashed = consumer._stopped.is_set, consumer._crashed.is_set

    async def wait_first(*coros: Any, timeout: Any = None) -> Any:
        callback = coros[0] if len(coros) == 2 and timeout is None else None
        if (not isinstance(callback, Coroutine) or suspended() or stopped()
                or crashed()):
            return await race(*coros, timeout=timeout)
        try:
            pending = callback.send(None)
        except StopIteration:
            coros[1].close()  # the flow-stop wait, never started
            return None
        except BaseException:
            coros[1].close()
            raise
        return await race(asyncio.ensure_future(_finish(callback, pending)), coros[1])

    wait_first.eager = True  # type: ignore[attr-defined]
    consumer.wait_first = wait_first


class BatchHandOver:
    """The records of one topic, handed to its agent in whole batches (see the module
    doc); installed with `hand_over_in_batches`."""

    def __init__(self, topic: str, max_records: int, wait_s: float) -> None:
        self.topic, self.max_records, self.wait_s = topic, max_records, wait_s
        self.pending: list[Any] = []
        self.first_at = 0.0  # when the oldest pending record arrived
        self.arrived, self.full, self.room = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.room.set()
        self.ack: Any = None  # the consumer's, once installed
        self.in_hand: Any = lambda batch: None  # the consumer's pending set, once installed

    async def add(self, message: Any) -> None:
        while len(self.pending) >= self.max_records:  # the fetcher waits for the agent
            self.room.clear()
            await self.room.wait()
        if not self.pending:
            self.first_at = time.monotonic()
            self.arrived.set()
        self.pending.append(message)
        if len(self.pending) >= self.max_records:
            self.full.set()

    def take(self) -> list[Any]:
        """The pending records (dropped ones stay unacknowledged: fetched again)."""
        batch, self.pending = self.pending, []
        self.arrived.clear()
        self.full.clear()
        self.room.set()
        return batch

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Each batch: what arrived, once `max_records` did or the oldest of them has
        waited `wait_s` (the time the last batch took counts)."""
        while True:
            await self.arrived.wait()
            left = self.wait_s - (time.monotonic() - self.first_at)
            if left > 0 and not self.full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.full.wait(), left)
            batch = self.take()
            if batch:
                self.in_hand(batch)  # before the agent sees it: a revocation waits for it
                yield batch

    def acknowledge(self, messages: Iterable[Any]) -> None:
        """Processed: Faust may commit past them (a record kept uncommitted stays so)."""
        for message in messages:
            self.ack(message)


def hand_over_in_batches(app: Any, handovers: Iterable[BatchHandOver]) -> None:
    """Patch a (not yet started) app: its conductor hands the records of each hand-over's
    topic to it instead of to Faust's streams (see the module doc)."""
    conductor, flow = app.topics, app.flow_control
    by_topic = {handover.topic: handover for handover in handovers}
    if not by_topic or getattr(conductor._build_handler, "batches", None) is not None:
        return
    build, clear = conductor._build_handler, flow.clear
    acquire, ebb = flow.acquire, app.producer.buffer.wait_until_ebb

    def build_handler(tp: Any, channels: Any) -> Any:
        handover = by_topic.get(tp.topic)
        if handover is None:
            return build(tp, channels)

        async def deliver(message: Any) -> None:
            await acquire()  # the flow is stopped during a rebalance
            await ebb()  # as Faust's streams: no more records while the producer is full
            await handover.add(message)

        return deliver

    def clear_queues() -> None:
        clear()
        for handover in by_topic.values():
            handover.take()

    consumer = app.consumer

    def in_hand(batch: list[Any]) -> None:
        # What Faust's conductor does for its streams (`track_message`), minus the
        # sensors: `wait_empty` waits until every one is acknowledged.
        consumer._unacked_messages.update(batch)

    for handover in by_topic.values():
        handover.ack, handover.in_hand = consumer.ack, in_hand
    build_handler.batches = by_topic  # type: ignore[attr-defined]
    conductor._build_handler = build_handler
    flow.clear = clear_queues

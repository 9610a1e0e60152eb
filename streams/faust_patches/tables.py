"""Faust hooks for processing events in batches (faust-streaming 0.15).

1. Table writes of a batch. A table write goes to the changelog partition of "the event
being processed", which Faust reads from a context variable set per event by
`async for event in stream`. A batch's records reach the agent without a stream
(handover.py, `BatchHandOver`), so in the agent that variable names no event.
`writes_on(message)` names the record whose partition the writes made inside it belong
to; tables keep deciding the partition themselves, as with one event at a time.
`AcknowledgedTable` lets a batch wait until its writes to one changelog partition
reached the broker, before the writes that depend on them.

2. Changelog ends on the embedded broker. Table recovery reads each changelog up to the
end offset `consumer.highwaters()` gets from ListOffsets. Tansu (0.6) answers a batch's
first offset + 1 there when the partition's last producer batch holds several records,
so recovery would stop short; the high watermark in its fetch responses is right.
`ends_from_fetches(consumer, ...)` makes `highwaters()` read that one, so changelog
writes can go in normal producer batches (one record per batch was the old workaround,
and capped a worker near 2,000 events/s, docs/performance.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import faust
from aiokafka import TopicPartition
from faust import streams

from streams.kafka.reader import OutputTopicError, high_watermarks, reader


class ChangelogWriteFailed(OutputTopicError):
    """A table write the broker did not take: the worker stops (a restart would meet the
    same write again, so going on or retrying in a loop helps nobody)."""


class _Writing:
    """What Faust's tables read of the current event: its message (partition, topic)."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, message: Any) -> None:
        self.message = message


@contextmanager
def writes_on(message: Any) -> Iterator[None]:
    """Table writes inside go to the changelog partition of `message`'s partition."""
    writing = _Writing(message)  # held here: Faust keeps only a weak reference
    token = streams._current_event.set(weakref.ref(writing))
    try:
        yield
    finally:
        streams._current_event.reset(token)


class AcknowledgedTable(faust.Table):
    """A table whose changelog writes can be awaited until the broker acknowledged them,
    per changelog partition (batches of several partitions are processed at once)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unacknowledged: dict[int | None, list[Any]] = {}

    def send_changelog(self, partition: int | None, *args: Any, **kwargs: Any) -> Any:
        sent = super().send_changelog(partition, *args, **kwargs)
        self._unacknowledged.setdefault(partition, []).append(sent)
        return sent

    async def acknowledged(self, partition: int) -> None:
        """Wait for every write to `partition` made since the last call."""
        for sent in self._unacknowledged.pop(partition, ()):
            try:
                await sent
            except Exception as err:
                raise ChangelogWriteFailed(
                    f"a write to table {self.name!r} (changelog partition {partition}) "
                    f"failed: {type(err).__name__}: {err}. The worker stops. If the broker "
                    "refused the record's size, its max.message.bytes is below the 1,000,000 "
                    "bytes acsr-metrics keeps every record under (docs/architecture.md, "
                    "Bounded state)") from err

    def settle(self) -> None:
        """Stop tracking writes already acknowledged (for writes nobody waits for)."""
        self._unacknowledged = {
            partition: pending for partition, sent in self._unacknowledged.items()
            if (pending := [fut for fut in sent if not fut.done()])}


def ends_from_fetches(consumer: Any, bootstrap: str, client: Mapping[str, Any]) -> None:
    """Patch a Faust consumer: `highwaters()` from fetch responses (see the module doc)."""

    async def highwaters(*partitions: Any) -> Mapping[Any, int]:
        if not partitions:  # a rebalance left nothing to recover
            return {}
        async with reader(bootstrap, client=client) as fetcher:
            found = await high_watermarks(
                fetcher, [TopicPartition(tp.topic, tp.partition) for tp in partitions])
        return {tp: found[TopicPartition(tp.topic, tp.partition)] for tp in partitions}

    consumer.highwaters = highwaters

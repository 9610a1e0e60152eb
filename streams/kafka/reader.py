"""Reading the annotation topic: end offsets from fetches, offset ranges, the resend tail.

End offsets come from fetch responses (the high watermark), never from ListOffsets:
the embedded broker (Tansu 0.6.0) answers ListOffsets "latest" wrongly after a
multi-record batch, and the high watermark of a fetch is right on every broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from streams.core.annotations import HORIZON_HEADER, ItemError, ResendGuard, TailRecord, decode
from streams.kafka.broker import ensure_topics

log = logging.getLogger("acsr_metrics")

class OutputTopicError(RuntimeError):
    """An output topic cannot take every events partition's records: stop the worker."""


TAIL_CHUNK = 500  # records read per step back from the end of a partition
POLL_MS = 200


@contextlib.asynccontextmanager
async def reader(bootstrap: str, group: str | None = None,
                 client: Mapping[str, Any] | None = None) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer for manual assignment (a group only to commit offsets, never to join);
    `client` holds the security options (streams.security.kafka_client_kwargs)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=POLL_MS, request_timeout_ms=15_000,
        **(client or {}),
    )
    try:
        await consumer.start()
    except BaseException:
        await _stop(consumer)  # releases what a failed start opened
        raise
    try:
        yield consumer
    finally:
        await _stop(consumer)


async def _stop(consumer: AIOKafkaConsumer) -> None:
    # aiokafka 0.14: a consumer without a group stopped before its committed-offset task
    # ever ran (no await in between, as with nothing assigned) raises CancelledError out
    # of stop(). Raised in a table recovery with nothing to recover, it ended Faust's
    # recovery task for good: the worker never recovered a partition assigned later.
    # One turn of the event loop lets the task start.
    await asyncio.sleep(0)
    await consumer.stop()


async def partition_count(consumer: AIOKafkaConsumer, topic: str) -> int:
    """Partitions of `topic` (0 when the broker does not know it)."""
    await consumer.topics()  # refreshes the metadata of every topic
    return len(consumer.partitions_for_topic(topic) or ())


async def high_watermarks(consumer: AIOKafkaConsumer, tps: list[TopicPartition],
                          timeout_s: float = 30.0) -> dict[TopicPartition, int]:
    """End offset of each partition, from a fetch response; the positions are left at the
    start of each partition (reset by the caller)."""
    consumer.assign(tps)
    starts = await consumer.beginning_offsets(tps)
    for tp in tps:
        consumer.seek(tp, starts[tp])
    deadline = time.monotonic() + timeout_s
    found: dict[TopicPartition, int] = {}
    while len(found) < len(tps):
        if time.monotonic() > deadline:
            missing = sorted(tp.partition for tp in tps if tp not in found)
            raise TimeoutError(f"no fetch answer for partitions {missing} in {timeout_s:.0f}s")
        pending = [tp for tp in tps if tp not in found]
        await consumer.getmany(*pending, timeout_ms=POLL_MS, max_records=1)
        for tp in pending:
            highwater = consumer.highwater(tp)
            if highwater is not None:
                found[tp] = highwater
    return found


async def read_range(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int,
                     timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Records of one assigned partition with start <= offset < end, in offset order."""
    consumer.seek(tp, start)
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while await consumer.position(tp) < end:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tp.topic}[{tp.partition}] stopped short of offset {end}")
        batch = await consumer.getmany(tp, timeout_ms=POLL_MS)
        records.extend(r for r in batch.get(tp, ()) if start <= r.offset < end)
    return records


def tail_record(record: ConsumerRecord) -> TailRecord | None:
    """The guard's view of an item on the topic; None for a message that is no item."""
    try:
        item = decode(record.value)
        horizon = int(dict(record.headers or ()).get(HORIZON_HEADER, b"-1"))
        return TailRecord(item["case_id"], item["reason"], int(item["source"]["offset"]),
                          horizon)
    except (ItemError, ValueError, KeyError, TypeError):
        return None


async def load_guard(bootstrap: str, topic: str, partition: int, first_offset: int,
                     client: Mapping[str, Any] | None = None, attempts: int = 5,
                     parse: Callable[[ConsumerRecord], TailRecord | None] = tail_record
                     ) -> ResendGuard:
    """Read one annotation partition back from its end until the guard has all it needs.

    `parse` reads a record as the guard sees it: another output topic sent under the same
    rules (the windows topic, streams/worker/window_tables.py) reuses the guard with its own."""
    for attempt in range(1, attempts + 1):
        try:
            return await _scan_tail(bootstrap, TopicPartition(topic, partition), first_offset,
                                    client, parse)
        except Exception as err:
            if attempt == attempts:
                raise
            log.warning("annotation tail scan of %s[%d] failed (attempt %d): %s",
                        topic, partition, attempt, err)
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


class ResendGuards:
    """The resend guards of one output topic, per partition: each read from the topic's
    tail (`load_guard`) when a session of the partition first needs it, or again when a
    session starts before the one it was read for (after a rebalance or a restart)."""

    def __init__(self, settings: Any, topic: str, client: Mapping[str, Any] | None = None,
                 parse: Callable[[ConsumerRecord], TailRecord | None] = tail_record) -> None:
        self.settings, self.topic, self.client, self.parse = settings, topic, client, parse
        self.guards: dict[int, ResendGuard] = {}
        self.topic_ready = False

    async def get(self, partition: int, first_offset: int) -> ResendGuard:
        guard = self.guards.get(partition)
        if guard is None or first_offset < guard.first_offset:
            if not self.topic_ready:
                await ensure_copartitioned(self.settings, self.topic, self.client)
                self.topic_ready = True
            guard = self.guards[partition] = await load_guard(
                self.settings.bootstrap_servers, self.topic, partition, first_offset,
                self.client, parse=self.parse)
        return guard

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.guards.pop(partition, None)


async def _scan_tail(bootstrap: str, tp: TopicPartition, first_offset: int,
                     client: Mapping[str, Any] | None,
                     parse: Callable[[ConsumerRecord], TailRecord | None]) -> ResendGuard:
    guard = ResendGuard(first_offset)
    async with reader(bootstrap, client=client) as consumer:
        end = (await high_watermarks(consumer, [tp]))[tp]
        begin = (await consumer.beginning_offsets([tp]))[tp]
        while end > begin:
            start = max(begin, end - TAIL_CHUNK)
            chunk = [parse(r) for r in await read_range(consumer, tp, start, end)]
            if guard.take(r for r in reversed(chunk) if r is not None):
                break
            end = start
    return guard


async def ensure_copartitioned(settings: Any, topic: str,
                               client: Mapping[str, Any] | None = None,
                               like: str | None = None) -> None:
    """Create `topic` if missing and check it has a partition for each partition of `like`
    (default: the cases' topic): records of partition p go to its partition p (the resend
    tail relies on it)."""
    like = like or settings.cases_topic
    await ensure_topics(settings.bootstrap_servers, {topic: settings.partitions},
                        settings.replication_factor, client=client)
    async with reader(settings.bootstrap_servers, client=client) as consumer:
        have = await partition_count(consumer, topic)
        need = await partition_count(consumer, like)
    if have < need:
        raise OutputTopicError(
            f"topic {topic} has {have} partitions, fewer than the {need} of "
            f"{like}: recreate it with {need}")

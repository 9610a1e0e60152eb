"""The Faust hooks for batches: table writes on an event's partition, and changelog ends
read from fetch responses (streams/faust_patches/tables.py)."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import faust
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from faust.streams import current_event
from faust.types import TP

from streams.faust_patches.tables import (
    AcknowledgedTable,
    ChangelogWriteFailed,
    ends_from_fetches,
    writes_on,
)
from streams.kafka.broker import ensure_topics
from streams.kafka.reader import OutputTopicError, high_watermarks, reader

from .conftest import BrokerInfo


def test_writes_inside_go_to_the_named_records_partition() -> None:
    """Faust's tables read the partition from the current event's message."""
    record, other = SimpleNamespace(partition=3), SimpleNamespace(partition=1)
    assert current_event() is None
    with writes_on(record):
        assert current_event().message is record
        with writes_on(other):
            assert current_event().message is other
        assert current_event().message is record
    assert current_event() is None


@pytest.mark.integration
async def test_changelog_ends_come_from_fetches_and_count_every_record(
        kafka: BrokerInfo) -> None:
    """Two records, then ten in one producer batch: the end is 12, which table recovery
    must read up to (Tansu's ListOffsets answers 3 after that batch: docs/architecture.md)."""
    topic = f"ends-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka.bootstrap, {topic: 2})
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=200)
    await producer.start()
    try:
        for _ in range(2):
            await producer.send_and_wait(topic, b"y", partition=0)
        sent = [await producer.send(topic, b"x" * 100, partition=0) for _ in range(10)]
        last = [await future for future in sent][-1]
    finally:
        await producer.stop()
    assert last.offset == 11
    async with reader(kafka.bootstrap) as client:
        listed = await client.end_offsets([TopicPartition(topic, 0)])
    if kafka.embedded:  # the quirk this hook is for
        assert listed[TopicPartition(topic, 0)] < 12
    consumer = SimpleNamespace()
    ends_from_fetches(consumer, kafka.bootstrap, {})
    ends = await consumer.highwaters(TP(topic, 0), TP(topic, 1))
    assert ends == {TP(topic, 0): 12, TP(topic, 1): 0}
    assert TopicPartition(topic, 0) in ends  # Faust's and aiokafka's partitions are alike


@pytest.mark.integration
async def test_a_recovery_with_nothing_to_recover_raises_nothing(kafka: BrokerInfo) -> None:
    """A rebalance that leaves a worker nothing asks for no ends; a reader opened and
    closed at once (aiokafka once raised CancelledError there, ending Faust's recovery
    task) raises nothing either."""
    consumer = SimpleNamespace()
    ends_from_fetches(consumer, kafka.bootstrap, {})
    assert await consumer.highwaters() == {}
    async with reader(kafka.bootstrap) as client:
        assert await high_watermarks(client, []) == {}
    async with reader(kafka.bootstrap):
        pass


async def test_a_changelog_write_the_broker_refuses_stops_the_worker_naming_it() -> None:
    """The broker refused a table write (e.g. its max.message.bytes is below ours): waiting
    for it raises an OutputTopicError, which stops the worker (streams/worker/app.py) instead of
    processing the same batch again and again."""
    app = faust.App(f"t-{uuid.uuid4().hex[:6]}", broker="kafka://localhost:1")
    table = AcknowledgedTable(app, name="cases", partitions=4)
    refused = asyncio.get_running_loop().create_future()
    refused.set_exception(MessageSizeTooLargeError())
    table._unacknowledged[3] = [refused]
    with pytest.raises(ChangelogWriteFailed, match=r"table 'cases' \(changelog partition 3\)"
                       r".*MessageSizeTooLargeError.*The worker stops") as raised:
        await table.acknowledged(3)
    assert isinstance(raised.value, OutputTopicError)
    await table.acknowledged(3)  # nothing left to wait for

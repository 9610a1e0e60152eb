"""The bridge through the embedded broker: OTLP in both encodings, over several messages,
becomes the contract events of the same story; what is not OTLP is dead-lettered."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.kafka.broker import ensure_topics
from streams.kafka.publisher import producer_options
from streams.tools.otel_bridge import REASON_HEADER, BridgeMetrics, BridgeTopics, run_bridge

from .conftest import BrokerInfo
from .test_otlp import agent_turn, as_json, as_proto

pytestmark = pytest.mark.integration


async def read_all(bootstrap: str, topic: str, count: int, timeout_s: float = 60) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: list = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records += batch
    finally:
        await consumer.stop()
    return records


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
async def test_spans_in_several_messages_become_the_storys_events(
        kafka: BrokerInfo, encoding: str) -> None:
    run = uuid.uuid4().hex[:8]
    settings = kafka.settings(partitions=2, events_topic=f"otel-{run}.events")
    topics = BridgeTopics(spans=f"otel-{run}.spans", logs=f"otel-{run}.logs",
                          dead_letters=f"otel-{run}.dlq", encoding=encoding)
    await ensure_topics(settings.bootstrap_servers,
                        {settings.events_topic: 2, topics.spans: 1, topics.logs: 1,
                         topics.dead_letters: 1})
    spans = agent_turn()
    encode = as_proto if encoding == "otlp_proto" else as_json
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                **producer_options(settings.tansu))
    await producer.start()
    try:
        for part in (spans[:2], spans[2:]):  # one trace, two messages, as exporters batch
            await producer.send_and_wait(topics.spans, encode(part))
        await producer.send_and_wait(topics.spans, b"\x00garbage")
    finally:
        await producer.stop()
    metrics, stop = BridgeMetrics(), asyncio.Event()
    bridge = asyncio.create_task(run_bridge(settings, topics, metrics, stop, group=run))
    try:
        events = await read_all(settings.bootstrap_servers, settings.events_topic, 3)
        dead = await read_all(settings.bootstrap_servers, topics.dead_letters, 1)
    finally:
        stop.set()
        await asyncio.wait_for(bridge, 30)
    docs = [orjson.loads(record.value) for record in events]
    assert sorted(doc["type"] for doc in docs) == [
        "action_executed", "evaluation_scored", "response_sent"]
    assert {record.key for record in events} == {b"case-1"}
    assert dead[0].value == b"\x00garbage"
    reason = dict(dead[0].headers)[REASON_HEADER].decode()
    assert reason in ("not_otlp_proto", "not_json")
    assert metrics.invalid.labels(reason)._value.get() == 1

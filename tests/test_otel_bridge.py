"""The bridge through the embedded broker: OTLP in both encodings, over several messages,
becomes the contract events of the same story; what is not OTLP is dead-lettered. And a
worker with ACSR_OTEL_BRIDGE does the same as a task, its counters in its /metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streams.config import Settings
from streams.kafka.broker import ensure_topics
from streams.kafka.partitioners import partition_for
from streams.kafka.publisher import producer_options
from streams.kafka.security import kafka_client_kwargs
from streams.tools.otel_bridge import REASON_HEADER, BridgeMetrics, BridgeTopics, run_bridge
from streams.tools.replay import Cluster, WorkerProcess, create_topics

from .cluster_helpers import run_settings, worker_metrics
from .conftest import BrokerInfo
from .metrics_helpers import by_label
from .test_otlp import agent_turn, as_json, as_proto

pytestmark = pytest.mark.integration


async def send_all(settings: Settings, topic: str, values: list[bytes]) -> None:
    """Unkeyed messages, one by one, as the Collector's exporter writes its batches."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                **producer_options(settings.tansu),
                                **kafka_client_kwargs(settings))
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def read_all(settings: Settings, topic: str, count: int, timeout_s: float = 60
                   ) -> list[Any]:
    """The first `count` records of `topic` (all partitions)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                                auto_offset_reset="earliest", group_id=None,
                                **kafka_client_kwargs(settings))
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records += batch
    finally:
        await consumer.stop()
    return records


async def bridged(settings: Settings, topics: BridgeTopics, group: str, events: int,
                  dead: int) -> tuple[BridgeMetrics, list[Any], list[Any]]:
    """Run the bridge until `events` events and `dead` dead letters are out; its counters
    and those records."""
    metrics, stop = BridgeMetrics(), asyncio.Event()
    bridge = asyncio.create_task(run_bridge(settings, topics, metrics, stop, group=group))
    try:
        published = await read_all(settings, settings.events_topic, events)
        dead_letters = await read_all(settings, topics.dead_letters, dead)
    finally:
        stop.set()
        await asyncio.wait_for(bridge, 30)
    return metrics, published, dead_letters


async def run_topics(kafka: BrokerInfo, encoding: str, **overrides: object
                     ) -> tuple[str, Settings, BridgeTopics]:
    """A run id, settings and bridge topics of this run only, the topics created."""
    run = uuid.uuid4().hex[:8]
    settings = kafka.settings(partitions=2, events_topic=f"otel-{run}.events", **overrides)
    topics = BridgeTopics(spans=f"otel-{run}.spans", logs=f"otel-{run}.logs",
                          dead_letters=f"otel-{run}.dlq", encoding=encoding)
    await ensure_topics(settings.bootstrap_servers, topics.to_ensure(settings))
    return run, settings, topics


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
async def test_spans_in_several_messages_become_the_storys_events(
        kafka: BrokerInfo, encoding: str) -> None:
    run, settings, topics = await run_topics(kafka, encoding)
    spans = agent_turn()
    encode = as_proto if encoding == "otlp_proto" else as_json
    # one trace, two messages, as exporters batch; then one that is no OTLP
    await send_all(settings, topics.spans, [encode(spans[:2]), encode(spans[2:]),
                                            b"\x00garbage"])
    metrics, events, dead = await bridged(settings, topics, run, events=3, dead=1)
    docs = [orjson.loads(record.value) for record in events]
    assert sorted(doc["type"] for doc in docs) == [
        "action_executed", "evaluation_scored", "response_sent"]
    assert {record.key for record in events} == {b"case-1"}
    assert dead[0].value == b"\x00garbage"
    reason = dict(dead[0].headers)[REASON_HEADER].decode()
    assert reason in ("not_otlp_proto", "not_json")
    assert metrics.invalid.labels(reason)._value.get() == 1


def caseless_spans() -> list:
    """Two spans of an agent that sets no case anywhere."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with (tracer.start_as_current_span("invoke_agent support"),
          tracer.start_as_current_span("chat gpt")):
        pass
    return list(exporter.get_finished_spans())


@pytest.mark.parametrize("encoding, reason", [("otlp_proto", "not_otlp_proto"),
                                              ("otlp_json", "not_json")])
async def test_malformed_otlp_is_dead_lettered_with_its_reason_and_the_bridge_goes_on(
        kafka: BrokerInfo, encoding: str, reason: str) -> None:
    """A truncated message and one in the other encoding go, unchanged, to the bridge's
    dead-letter topic with their reason; spans without a case are counted, never
    guessed; the valid message after them is published, keyed and placed by case."""
    run, settings, topics = await run_topics(kafka, encoding, partitioner="crc32")
    encode, other = (as_proto, as_json) if encoding == "otlp_proto" else (as_json, as_proto)
    valid = encode(agent_turn())
    truncated, wrong_encoding = valid[: len(valid) // 2], other(agent_turn())
    await send_all(settings, topics.spans,
                   [truncated, wrong_encoding, encode(caseless_spans()), valid])
    metrics, events, dead = await bridged(settings, topics, run, events=3, dead=2)
    assert [record.value for record in dead] == [truncated, wrong_encoding]
    assert [dict(record.headers)[REASON_HEADER].decode() for record in dead] == [reason] * 2
    assert metrics.invalid.labels(reason)._value.get() == 2
    assert metrics.unmapped.labels("no_case")._value.get() == 2
    assert sorted(orjson.loads(record.value)["type"] for record in events) == [
        "action_executed", "evaluation_scored", "response_sent"]
    for record in events:
        assert record.key == b"case-1"
        assert record.partition == partition_for("crc32", record.key, settings.partitions)


async def answers(worker: WorkerProcess) -> bool:
    try:
        await worker_metrics(worker)
    except (OSError, TimeoutError, aiohttp.ClientError):
        return False
    return True


async def test_a_worker_with_acsr_otel_bridge_runs_the_bridge(kafka: BrokerInfo,
                                                              tmp_path: Path) -> None:
    """One real worker process: it creates the OTLP topics, publishes the story's events,
    counts them in its own /metrics, and stops cleanly on SIGTERM."""
    run = uuid.uuid4().hex[:8]
    settings = run_settings(kafka, partitions=2, otel_bridge=True,
                            otel_spans_topic=f"otel-{run}.spans",
                            otel_logs_topic=f"otel-{run}.logs",
                            otel_dlq_topic=f"otel-{run}.dlq", data_dir=str(tmp_path / "data"))
    await create_topics(settings)  # the worker's own, never auto-created by a reader
    cluster = Cluster(settings, 1, tmp_path / "logs")
    cluster.start()
    worker = cluster.workers[0]
    try:
        deadline = time.monotonic() + 60
        while not await answers(worker):  # it ensures the OTLP topics before it serves
            assert time.monotonic() < deadline, worker.log_tail()
            cluster.check_alive()
            await asyncio.sleep(0.5)
        await send_all(settings, settings.otel_spans_topic, [as_proto(agent_turn())])
        events = await read_all(settings, settings.events_topic, 3)
        published: dict[str, float] = {}
        while sum(published.values()) < 3:
            assert time.monotonic() < deadline + 60, worker.log_tail()
            published = by_label(await worker_metrics(worker), "acsr_otel_events_total",
                                 "type")
            await asyncio.sleep(0.5)
        stopping = time.monotonic()
    finally:
        cluster.stop()
    stop_s = time.monotonic() - stopping
    assert sorted(orjson.loads(record.value)["type"] for record in events) == [
        "action_executed", "evaluation_scored", "response_sent"]
    assert published == {"action_executed": 1, "evaluation_scored": 1, "response_sent": 1}
    log = worker.log_path.read_text()
    assert worker.process is not None and worker.process.returncode in (0, -15), (stop_s, log)
    assert "the OTLP bridge failed" not in log and "Traceback" not in log

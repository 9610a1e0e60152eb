"""`acsr-metrics otel-bridge`: OTLP from the Collector's Kafka exporter into the events topic.

    otlp_spans / otlp_logs (OTLP protobuf or JSON, unkeyed batches)
      -> decode (streams/kafka/otlp.py) -> map (streams/core/otel.py)
      -> check against the contract -> the events topic, keyed by case_id

At least once: a batch's offsets are committed only once every event it made is
acknowledged; a batch read again makes the same event ids, which the duplicate rule
counts once. A message that does not decode goes, unchanged, to the bridge's dead-letter
topic with a reason header; nothing stops the bridge.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter

from streams.config import Settings
from streams.core.events import InvalidEvent
from streams.core.otel import SpanMapping
from streams.kafka.otlp import OtlpError, decode_logs, decode_spans
from streams.kafka.publisher import Publisher, producer_options
from streams.kafka.security import kafka_client_kwargs

log = logging.getLogger("acsr_metrics")
REASON_HEADER = "acsr-otel-reason"


@dataclass
class BridgeTopics:
    spans: str = "otlp_spans"
    logs: str = "otlp_logs"
    dead_letters: str = "acsr.otlp.dlq"
    encoding: str = "otlp_proto"

    @classmethod
    def of(cls, settings: Settings) -> BridgeTopics:
        return cls(settings.otel_spans_topic, settings.otel_logs_topic,
                   settings.otel_dlq_topic, settings.otel_encoding)


@dataclass
class BridgeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.invalid = Counter("acsr_otel_messages_invalid", "OTLP messages that did not "
                               "decode, sent to the bridge's dead-letter topic, by reason.",
                               ["reason"], registry=r)
        self.unmapped = Counter("acsr_otel_spans_unmapped", "Spans and log records mapped "
                                "to no event, by reason (no_case: no case attribute).",
                                ["reason"], registry=r)
        self.events = Counter("acsr_otel_events", "Contract events the bridge published, "
                              "by type.", ["type"], registry=r)
        self.events_invalid = Counter("acsr_otel_events_invalid", "Mapped events that break "
                                      "the contract, by its reason (not published).",
                                      ["reason"], registry=r)


class Bridge:
    """One batch of OTLP records at a time (see the module doc)."""

    def __init__(self, publisher: Publisher, dead_letters: AIOKafkaProducer,
                 topics: BridgeTopics, metrics: BridgeMetrics,
                 mapping: SpanMapping | None = None) -> None:
        self.publisher, self.dead_letters = publisher, dead_letters
        self.topics, self.metrics = topics, metrics
        self.mapping = mapping or SpanMapping()

    def events_of(self, topic: str, value: bytes) -> list[dict[str, Any]]:
        """The contract events of one OTLP message (OtlpError: it does not decode)."""
        encoding, mapping = self.topics.encoding, self.mapping
        if topic == self.topics.logs:
            results = [mapping.log_events(record) for record in decode_logs(value, encoding)]
        else:
            results = [mapping.events(span) for span in decode_spans(value, encoding)]
        events = []
        for found, reason in results:
            if reason is not None:
                self.metrics.unmapped.labels(reason).inc()
            events += found
        return events

    async def handle(self, records: list[Any]) -> None:
        """A batch: every event published or dead-lettered, and acknowledged."""
        deliveries = []
        for record in records:
            try:
                events = self.events_of(record.topic, record.value or b"")
            except OtlpError as err:
                self.metrics.invalid.labels(err.reason).inc()
                deliveries.append(await self.dead_letters.send(
                    self.topics.dead_letters, record.value,
                    headers=[(REASON_HEADER, err.reason.encode())]))
                continue
            for event in events:
                try:
                    deliveries.append(await self.publisher.send_event(event))
                except InvalidEvent as invalid:
                    self.metrics.events_invalid.labels(invalid.reason).inc()
                    continue
                self.metrics.events.labels(event["type"]).inc()
        if deliveries:
            await asyncio.gather(*deliveries)


async def run_bridge(settings: Settings, topics: BridgeTopics, metrics: BridgeMetrics,
                     stop: asyncio.Event, group: str = "acsr-otel-bridge") -> None:
    """Consume the OTLP topics until `stop` is set, committing after each batch landed."""
    client = kafka_client_kwargs(settings)
    consumer = AIOKafkaConsumer(topics.spans, topics.logs,
                                bootstrap_servers=settings.bootstrap_servers, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                **client)
    dead_letters = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                    **producer_options(settings.tansu), **client)
    await consumer.start()
    await dead_letters.start()
    try:
        async with Publisher.from_settings(settings) as publisher:
            bridge = Bridge(publisher, dead_letters, topics, metrics)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                records = [record for batch in batches.values() for record in batch]
                if records:
                    await bridge.handle(records)
                    await consumer.commit()
    finally:
        await dead_letters.stop()
        await consumer.stop()


def run_bridge_command(settings: Settings) -> int:
    """`acsr-metrics otel-bridge`: until Ctrl-C or SIGTERM, with its counters served at
    http://WEB_HOST:WEB_PORT/metrics."""
    import signal

    from prometheus_client import start_http_server

    from streams.kafka.broker import ensure_topics

    metrics = BridgeMetrics()
    start_http_server(settings.web_port, settings.web_host, registry=metrics.registry)
    topics = BridgeTopics.of(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await ensure_topics(settings.bootstrap_servers,
                            {topics.spans: 1, topics.logs: 1, topics.dead_letters: 1,
                             settings.events_topic: settings.partitions},
                            settings.replication_factor, settings.broker_wait_s,
                            kafka_client_kwargs(settings))
        await run_bridge(settings, topics, metrics, stop, group=f"{settings.app_id}-otel")

    asyncio.run(main())
    return 0

"""`acsr-metrics otel-bridge`: OTLP from the Collector's Kafka exporter into the events topic.

    otlp_spans / otlp_logs (OTLP protobuf or JSON, unkeyed batches)
      -> decode (streams/kafka/otlp.py) -> map (streams/core/otel.py)
      -> check against the contract -> the events topic, keyed by case_id

At least once: a batch's offsets are committed only once every event it made is
acknowledged; a batch read again makes the same event ids, which the duplicate rule
counts once. A message that does not decode goes, unchanged, to the bridge's dead-letter
topic with a reason header; nothing stops the bridge.

It runs as its own command, or inside each worker with ACSR_OTEL_BRIDGE
(`worker_bridge`, a task of streams/worker/app.py); either way the mapping is the default
or the YAML file of ACSR_OTEL_MAPPING (`load_mapping`), read once at start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter

from streams.config import ConfigError, Settings
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

    def to_ensure(self, settings: Settings) -> dict[str, int]:
        """The topics the bridge needs, with the partitions they are created with: the
        OTLP ones with one, which keeps the exporter's batches in order (one made with
        more is shared by the consumers of the group), the events topic as the workers'."""
        return {self.spans: 1, self.logs: 1, self.dead_letters: 1,
                settings.events_topic: settings.partitions}


@dataclass
class BridgeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.invalid = Counter("acsr_otel_messages_invalid", "OTLP messages that did not "
                               "decode, sent to the bridge's dead-letter topic, by reason.",
                               ["reason"], registry=r)
        self.unmapped = Counter("acsr_otel_spans_unmapped", "Spans and log records mapped "
                                "to no event, by reason (no_case: no case attribute; "
                                "unknown_event: an acsr.event that is no event type).",
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


def load_mapping(path: str | Path) -> SpanMapping:
    """The mapping of a YAML file (docs/otel.md); ConfigError names the file and what is
    wrong in it, so a bad file stops the bridge at start, not after mapping nothing."""
    try:
        with open(path, encoding="utf-8") as file:
            doc = yaml.safe_load(file)
    except OSError as err:
        raise ConfigError(f"ACSR_OTEL_MAPPING {str(path)!r}: cannot read it: "
                          f"{err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"ACSR_OTEL_MAPPING {str(path)!r} is not YAML: {err}") from None
    try:
        return SpanMapping.from_dict({} if doc is None else doc)
    except ValueError as err:
        raise ConfigError(f"ACSR_OTEL_MAPPING {str(path)!r}: {err}") from None


def mapping_of(settings: Settings) -> SpanMapping:
    """ACSR_OTEL_MAPPING's mapping, or the default one."""
    return load_mapping(settings.otel_mapping) if settings.otel_mapping else SpanMapping()


async def run_bridge(settings: Settings, topics: BridgeTopics, metrics: BridgeMetrics,
                     stop: asyncio.Event, group: str = "acsr-otel-bridge",
                     mapping: SpanMapping | None = None) -> None:
    """Consume the OTLP topics until `stop` is set, committing after each batch landed.
    Cancelled instead, it stops its clients all the same (the batch is read again)."""
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
            bridge = Bridge(publisher, dead_letters, topics, metrics, mapping)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                records = [record for batch in batches.values() for record in batch]
                if records:
                    await bridge.handle(records)
                    await consumer.commit()
    finally:
        await dead_letters.stop()
        await consumer.stop()


def worker_bridge(settings: Settings
                  ) -> Callable[[CollectorRegistry, asyncio.Event], Awaitable[None]]:
    """ACSR_OTEL_BRIDGE: the bridge as a worker runs it (streams/worker/app.py), given the
    worker's registry and a stop event; the consumer group is the workers' app id with
    `-otel`, so the workers share the OTLP topics' partitions. The mapping is read now:
    a bad file stops the worker before it starts."""
    mapping, topics = mapping_of(settings), BridgeTopics.of(settings)

    async def run(registry: CollectorRegistry, stop: asyncio.Event) -> None:
        await run_bridge(settings, topics, BridgeMetrics(registry), stop,
                         group=bridge_group(settings), mapping=mapping)

    return run


def bridge_group(settings: Settings) -> str:
    return f"{settings.app_id}-otel"


def run_bridge_command(settings: Settings) -> int:
    """`acsr-metrics otel-bridge`: until Ctrl-C or SIGTERM, with its counters served at
    http://WEB_HOST:WEB_PORT/metrics."""
    import signal

    from prometheus_client import start_http_server

    from streams.kafka.broker import ensure_topics

    mapping = mapping_of(settings)  # a bad file: exit 2 before anything starts
    metrics = BridgeMetrics()
    start_http_server(settings.web_port, settings.web_host, registry=metrics.registry)
    topics = BridgeTopics.of(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await ensure_topics(settings.bootstrap_servers, topics.to_ensure(settings),
                            settings.replication_factor, settings.broker_wait_s,
                            kafka_client_kwargs(settings))
        await run_bridge(settings, topics, metrics, stop, group=bridge_group(settings),
                         mapping=mapping)

    asyncio.run(main())
    return 0

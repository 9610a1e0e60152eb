"""Publishing agent events: checked against the contract before they leave the agent.

An event that breaks the contract would only land in the dead-letter topic, far from the
code that made it; `build_event` refuses it on the spot with `InvalidEventError` instead.
`Publisher` keys every message by `case_id` (so a case's events stay in order on one
partition) and uses an idempotent producer with `acks=all`, so a retried send is never
written twice.

    async with Publisher("kafka:9092") as events:
        await events.send("case_opened", "c-42", channel="web", agent_version="v7")
        await events.send("intent_classified", "c-42", intent="refund", confidence=0.93)
        await events.send("case_resolved", "c-42", by="agent")

The embedded broker (Tansu) refuses idempotent producers (InitProducerId fails) and
miscounts multi-record batches, so with `embedded=True` the producer sends one record
per batch without idempotence (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from streams.config import Settings
from streams.core.events import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    READER_CLOCK,
    EventTimeBounds,
    InvalidEvent,
    message_key,
    parse_event,
)
from streams.kafka.broker import ONE_RECORD_BATCH_BYTES, BrokerUnavailable
from streams.kafka.partitioners import MURMUR2, ClientPartitioner
from streams.kafka.security import kafka_client_kwargs

Delivery = asyncio.Future[RecordMetadata]


class InvalidEventError(InvalidEvent):
    """An event that breaks the contract, refused before it was sent.

    `reason` is the dead-letter reason the processor would have given it."""

    def __init__(self, reason: str, detail: str, event_type: Any, case_id: Any) -> None:
        super().__init__(reason, detail)
        self.args = (f"refusing to publish {event_type!r} for case {case_id!r}: "
                     f"{reason} ({detail}); see docs/events.md",)


def build_event(event_type: str, case_id: str, *, event_id: str | None = None,
                ts: datetime | int | str | None = None,
                bounds: EventTimeBounds = READER_CLOCK, **fields: Any) -> dict[str, Any]:
    """An event as a JSON object, checked against the contract.

    `event_id` defaults to a fresh UUID, `ts` to now; fields that are None are left out
    (the contract reads null as absent). Raises InvalidEventError."""
    if ts is None:
        ts = int(time.time() * 1000)
    elif isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise InvalidEventError("bad_ts", "a datetime ts needs a timezone, e.g. "
                                    "datetime.now(UTC)", event_type, case_id)
        ts = int(ts.timestamp() * 1000)
    doc: dict[str, Any] = {
        "event_id": event_id or uuid.uuid4().hex, "type": event_type, "case_id": case_id,
        "ts": ts,
        **{name: value for name, value in fields.items() if value is not None},
    }
    encode(doc, bounds)
    return doc


def encode(doc: dict[str, Any], bounds: EventTimeBounds = READER_CLOCK) -> bytes:
    """The message value of an event object, checked as the processor will check it."""
    try:
        raw = orjson.dumps(doc)
    except TypeError as err:
        raise InvalidEventError("not_json", str(err), doc.get("type"), doc.get("case_id")) from None
    check(raw, bounds)
    return raw


def check(raw: bytes, bounds: EventTimeBounds = READER_CLOCK) -> None:
    """Raise InvalidEventError when the processor would dead-letter this message value
    (an implausible `ts` against this process's clock: past_ts, future_ts)."""
    try:
        parse_event(raw, bounds)
    except InvalidEvent as err:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        doc = doc if isinstance(doc, dict) else {}
        raise InvalidEventError(err.reason, err.detail, doc.get("type"),
                                doc.get("case_id")) from None


def producer_options(embedded: bool) -> dict[str, Any]:
    """aiokafka producer settings: idempotent and fully acknowledged; on the embedded
    broker, one record per batch and no idempotence (both Tansu limits)."""
    if embedded:
        return {"acks": "all", "enable_idempotence": False,
                "max_batch_size": ONE_RECORD_BATCH_BYTES, "linger_ms": 5}
    return {"acks": "all", "enable_idempotence": True, "linger_ms": 5}


class Publisher:
    """Sends checked events to the events topic, keyed by `case_id`."""

    def __init__(self, broker: str = "127.0.0.1:9092", topic: str = "acsr.events", *,
                 embedded: bool = False, partitioner: str = MURMUR2,
                 max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S, **options: Any) -> None:
        self.topic = topic
        self.bounds = EventTimeBounds(max_skew_s=max_clock_skew_s)
        self.options = {**producer_options(embedded),
                        "partitioner": ClientPartitioner(partitioner), **options}
        self.broker = Settings(broker=broker).validate().bootstrap_servers
        self._producer: AIOKafkaProducer | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Publisher:
        """The broker, events topic, security and embedded-broker mode of `settings`."""
        return cls(settings.broker, settings.events_topic, embedded=settings.tansu,
                   partitioner=settings.partitioner,
                   max_clock_skew_s=settings.max_clock_skew_s,
                   **{**kafka_client_kwargs(settings), **options})

    async def start(self) -> Publisher:
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.broker, **self.options)
            try:
                await producer.start()
            except KafkaError as err:
                await producer.stop()
                hint = (" (the embedded Tansu broker refuses idempotent producers: "
                        "use embedded=True, or --tansu)"
                        if self.options.get("enable_idempotence") else "")
                raise BrokerUnavailable(
                    f"cannot start a producer on {self.broker}: {err!r}{hint}") from None
            self._producer = producer
        return self

    async def stop(self) -> None:
        """Deliver what is pending, then close."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def __aenter__(self) -> Publisher:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def send(self, event_type: str, case_id: str, **fields: Any) -> Delivery:
        """Build, check and queue one event (see `build_event`); returns its delivery,
        a future of the broker's acknowledgement. `stop()` waits for every delivery."""
        return await self.send_event(build_event(event_type, case_id, bounds=self.bounds,
                                                 **fields))

    async def send_and_wait(self, event_type: str, case_id: str, **fields: Any
                            ) -> RecordMetadata:
        """`send`, then wait until the broker has the event."""
        return await (await self.send(event_type, case_id, **fields))

    async def send_event(self, doc: dict[str, Any]) -> Delivery:
        """Check and queue an event object that already has its envelope."""
        return await self.send_value(encode(doc, self.bounds))

    async def send_value(self, value: bytes, *, checked: bool = True) -> Delivery:
        """Queue a message value keyed by its `case_id`. With `checked=False` the value
        goes out even when it breaks the contract (test traffic for the dead-letter path)."""
        if checked:
            check(value, self.bounds)
        if self._producer is None:
            raise RuntimeError("Publisher is not started: use `async with Publisher(...)`")
        return await self._producer.send(self.topic, value, key=message_key(value))


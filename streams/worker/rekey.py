"""Re-keying (ACSR_PARTITIONER=repartition): events onto the cases topic by `case_id`.

Producers with a custom or unknown partitioner keep a case on one partition, but not on
the one our hash gives. The forwarder reads each events partition in offset order and
writes every message to the cases topic, keyed and placed by `case_id` with our hash,
with its origin: source partition, offset, and the source partition's event time before
it. Lateness is judged against that time, as it would be on the source partition, so
figures do not depend on how the forwarder interleaves source partitions.

Each batch's copies are acknowledged, then the source partition's event time after the
batch is written to partition p of the event-time topic, then Faust commits the source
offsets. A crash in between forwards some messages again; the processor counts each
source position once (streams/core/ledger.py), and the event time read back at the restart is
the one after those messages, which only the skipped copies carry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiokafka import TopicPartition

from streams.core.events import EventTimeBounds
from streams.kafka.partitioners import (
    SOURCE_HEADER,
    CaseRouting,
    Origin,
    source_header,
    time_after,
    valid_event,
)
from streams.kafka.reader import high_watermarks, read_range, reader


class Rekeyer:
    """The forwarder's I/O: Faust topics to send to, the event-time topic to read back."""

    def __init__(self, cases_topic: Any, times_topic: Any, bootstrap: str,
                 client: Mapping[str, Any], routing: Callable[[], Awaitable[CaseRouting]],
                 bounds: EventTimeBounds) -> None:
        self.bounds = bounds
        self.cases_topic = cases_topic
        self.times_topic = times_topic
        self.bootstrap = bootstrap
        self.client = client
        self.routing = routing
        self.times: dict[int, int | None] = {}  # events partition -> its event time

    async def forward(self, partition: int, records: list[Any]) -> None:
        """One events partition's batch, in offset order (each offset once)."""
        routing = await self.routing()
        messages = {message.offset: message for message in records}
        time_us = await self.event_time(partition)
        acks = []
        for offset in sorted(messages):
            message = messages[offset]
            event = valid_event(message.value, self.bounds)  # parsed once: key and time
            key, target = routing.rekey(message.value, message.key, partition, event)
            headers = [*(h for h in message.headers or () if h[0] != SOURCE_HEADER),
                       source_header(Origin(partition, offset, time_us))]
            acks.append(await self.cases_topic.send(key=key, value=message.value,
                                                    partition=target, headers=headers,
                                                    force=True))
            time_us = time_after(time_us, event)
        for ack in acks:
            await ack
        last = max(messages)
        record = orjson.dumps({"offset": last, "time_us": time_us})
        await (await self.times_topic.send(key=str(partition).encode(), value=record,
                                           partition=partition, force=True))
        self.times[partition] = time_us

    async def event_time(self, partition: int) -> int | None:
        """The partition's event time where forwarding resumes: kept since the last batch,
        or read back from the event-time topic after a start or a rebalance."""
        if partition not in self.times:
            self.times[partition] = await self._read_back(partition)
        return self.times[partition]

    async def _read_back(self, partition: int) -> int | None:
        tp = TopicPartition(self.times_topic.get_topic_name(), partition)
        async with reader(self.bootstrap, client=self.client) as consumer:
            end = (await high_watermarks(consumer, [tp]))[tp]
            if end == 0:
                return None
            records = await read_range(consumer, tp, end - 1, end)
        return orjson.loads(records[-1].value)["time_us"] if records else None

    def forget(self, partitions: set[int]) -> None:
        """Partitions moved to another worker: read their time back if they return."""
        for partition in partitions:
            self.times.pop(partition, None)

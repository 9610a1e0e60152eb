"""The Kafka side of a batch: the dead-letter topic, links, annotation items, the resend
guards and the partitioner's routing (`Outputs` of streams/worker/batches.py)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from streams.config import Settings
from streams.core.annotations import HORIZON_HEADER, ResendGuard, Source, build_item, encode_within
from streams.core.events import InvalidEvent
from streams.core.ledger import RECORD_LIMIT, BatchPlan
from streams.kafka.partitioners import CaseRouting
from streams.kafka.reader import (
    OutputTopicError,
    ResendGuards,
    ensure_copartitioned,
    partition_count,
    reader,
)
from streams.worker.topics import Topics

log = logging.getLogger("acsr_metrics")

REASON_HEADER = "acsr-invalid-reason"
DETAIL_HEADER = "acsr-invalid-detail"


class KafkaOutputs:
    """Sends what a batch produces and remembers, per partition, what it needs to know of
    the topics (the resend guard, the partition count)."""

    def __init__(self, settings: Settings, topics: Topics, client_options: dict[str, Any],
                 registry: CollectorRegistry) -> None:
        self.settings, self.topics, self.client_options = settings, topics, client_options
        self.guards = ResendGuards(settings, settings.annotation_topic, client_options)
        self.routing: CaseRouting | None = None  # read once per assignment
        self.misrouting_logged: set[int] = set()
        self.resends_prevented = Counter(
            "acsr_annotation_resends_prevented",
            "Annotation items found already sent (before a crash) and not sent again.",
            registry=registry)

    def forget(self, partitions: set[int]) -> None:
        """After a rebalance: partitions may have been added, guards start again."""
        self.routing = None
        self.guards.forget(partitions)

    async def case_routing(self) -> CaseRouting:
        """The configured partitioner over the cases topic's real partition count."""
        if self.routing is None:
            settings = self.settings
            await ensure_copartitioned(settings, settings.links_topic, self.client_options)
            if settings.repartitions:
                await ensure_copartitioned(settings, settings.source_times_topic,
                                           self.client_options, like=settings.events_topic)
            async with reader(settings.bootstrap_servers, client=self.client_options) as consumer:
                count = await partition_count(consumer, settings.cases_topic)
            if count == 0:
                raise OutputTopicError(f"topic {settings.cases_topic} does not exist")
            self.routing = CaseRouting(settings.partitioner, count)
        return self.routing

    def report_misrouting(self, plan: BatchPlan, routing: CaseRouting) -> None:
        if plan.misrouted and plan.partition not in self.misrouting_logged:
            self.misrouting_logged.add(plan.partition)
            log.error(
                "partition %s of %s holds events of cases that ACSR_PARTITIONER=%s places on "
                "other partitions (e.g. case %r): their producers use another partitioner, and "
                "figures that join cases (FCR) are wrong with more than one worker. %s; see "
                "docs/events.md, Producers. Counted in acsr_events_misrouted_total.",
                plan.partition, self.settings.cases_topic, self.settings.partitioner,
                plan.misrouted[0], routing.remedy(plan.misrouted[:20], plan.partition))

    async def dead_letter(self, message: Any, invalid: InvalidEvent) -> bool:
        """Send the message to the dead-letter topic; False when the topic refused it."""
        return (await self.dead_letters([(message, invalid)]))[0]

    async def dead_letters(self, invalid: list[tuple[Any, InvalidEvent]]) -> list[bool]:
        """Send every message to the dead-letter topic, then wait for the broker's answers
        (all in flight at once); for each, False when the topic refused it."""
        sent: list[Any] = []
        for message, why in invalid:
            headers = [
                *(message.headers or ()),
                (REASON_HEADER, why.reason.encode()),
                (DETAIL_HEADER, why.detail.encode()[:512]),
            ]
            try:
                sent.append(await self.topics.dlq.send(key=message.key, value=message.value,
                                                       headers=headers, force=True))
            except Exception as err:
                sent.append(err)
        landed = []
        for (message, why), ack in zip(invalid, sent, strict=True):
            try:
                if isinstance(ack, Exception):
                    raise ack
                await ack
            except Exception as err:  # the dead-letter topic refused it: count, log, go on
                log.warning("dead-letter write failed (reason=%s, partition=%s, offset=%s): %s",
                            why.reason, message.partition, message.offset, err)
                landed.append(False)
            else:
                landed.append(True)
        return landed

    async def resend_guard(self, partition: int, offset: int) -> ResendGuard:
        """The first event a worker processes on a partition (after a start or a rebalance)
        marks where redelivery may begin: items sent for events from there on are found
        on the annotation partition's tail and not sent again."""
        return await self.guards.get(partition, offset)

    async def send_items(self, plan: BatchPlan, guard: ResendGuard) -> list[Awaitable[Any]]:
        """Send the batch's annotation items; the acknowledgements to wait for."""
        acks = []
        headers = [(HORIZON_HEADER, str(guard.horizon).encode())]
        for applied in plan.applied:
            case_id, step = applied.event.case_id, applied.step
            source = Source(self.settings.cases_topic, plan.partition, applied.offset)
            for route in step.routes:
                if guard.already_sent(case_id, route.reason):
                    self.resends_prevented.inc()
                    continue
                item = build_item(case_id, route.reason, route.trigger, applied.view, source)
                acks.append(await self.topics.annotations.send(
                    key=case_id.encode(), value=encode_within(item, RECORD_LIMIT),
                    partition=plan.partition, headers=headers, force=True))
        return acks

    async def send_links(self, plan: BatchPlan, routing: CaseRouting) -> list[Awaitable[Any]]:
        """Each link to the partition of the earlier case, as the producers placed it."""
        acks = []
        for related, ts_us in plan.links:
            link = orjson.dumps({"case_id": related, "ts_us": ts_us})
            acks.append(await self.topics.links.send(
                key=related.encode(), value=link, partition=routing.home(related), force=True))
        return acks

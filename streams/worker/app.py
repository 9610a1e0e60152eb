"""The Faust application: topics, tables and the agents that own them.

`build_app(settings)` declares everything; `acsr-metrics worker` runs it. Each agent is
a short loop that hands the event to the ledger (pure accounting) and does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import faust
import orjson
from faust.types import TP
from faust.web import Request, Response, View
from prometheus_client import Counter, generate_latest

from streams import __version__
from streams.config import Settings
from streams.core import kpis
from streams.core.annotations import HORIZON_HEADER, ResendGuard, Source, build_item, encode_within
from streams.core.cases import SECOND_US, WindowPolicy
from streams.core.events import Event, EventTimeBounds, InvalidEvent, parse_event
from streams.core.ledger import RECORD_LIMIT, BatchPlan, Ledger, Origins, RecordTooLarge
from streams.faust_patches.fixes import (
    commit_only_contiguous,
    complete_flushes,
    keep_seeks_over_stale_reads,
    keep_uncommitted,
    seek_uncommitted_to_beginning,
    stop_when_offsets_vanish,
)
from streams.faust_patches.handover import hand_over_eagerly
from streams.faust_patches.tables import AcknowledgedTable, ends_from_fetches, writes_on
from streams.kafka.partitioners import CaseRouting, parse_source
from streams.kafka.reader import (
    OutputTopicError,
    ensure_copartitioned,
    load_guard,
    partition_count,
    reader,
)
from streams.kafka.security import faust_credentials, kafka_client_kwargs
from streams.metrics.exporter import LabelBounds, WorkerView, build_registry
from streams.worker.rekey import Rekeyer
from streams.worker.window_tables import WindowTables

log = logging.getLogger("acsr_metrics")

REASON_HEADER = "acsr-invalid-reason"
DETAIL_HEADER = "acsr-invalid-detail"
PROCESSING_ERROR = "processing_error"
STATE_TOO_LARGE = "state_too_large"  # a case record over the limit even after its spill
# Prometheus text format 0.0.4 (aiohttp adds the charset itself).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"


TANSU_REQUEST_TIMEOUT_S = 10.0
PRODUCER_BATCH_BYTES = 512 * 1024
PRODUCER_LINGER_S = 0.005
DELIVERY_CHECK_S = 1.0
STALLED_DELIVERY_S = 5.0  # a due record held by the broker that long is fetched again


class BrokerStateLost(RuntimeError):
    """The broker lost offsets this worker committed, and with them its log: stop."""


def tables_recovering(app: faust.App) -> bool:
    """True until this worker's tables are recovered, in every rebalance.

    Faust sets `recovery.completed` once and never clears it; `rebalancing` covers each
    later rebalance, from its start until its recovery is done. Read in between, a
    partition's aggregate would be derived from half-recovered tables."""
    return app.rebalancing or not app.tables.recovery.completed.is_set()


def parse_or_invalid(value: bytes | None, bounds: EventTimeBounds) -> Event | InvalidEvent:
    try:
        return parse_event(value, bounds)
    except InvalidEvent as invalid:
        return invalid


def acknowledged_table(app: faust.App, name: str, partitions: int, key_type: type
                       ) -> AcknowledgedTable:
    # Values are our own JSON bytes (value_type=bytes: raw changelog values), so the store
    # never aliases a state we go on mutating; keys are JSON (str and int survive recovery).
    table = AcknowledgedTable(app, name=name, beacon=app.tables.beacon, partitions=partitions,
                              key_type=key_type, value_type=bytes)
    app.tables.add(table)
    return table


def build_app(settings: Settings) -> faust.App:
    data_dir = Path(settings.data_dir) / f"{settings.app_id}-{settings.web_port}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tansu_workarounds: dict[str, Any] = (
        {
            # Tansu now and then never answers a request after a client was killed; a
            # short timeout retries it instead of waiting Faust's default 20 minutes.
            "producer_request_timeout": TANSU_REQUEST_TIMEOUT_S,
        } if settings.tansu else {}
    )
    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        broker_credentials=faust_credentials(settings),
        store="memory://",
        datadir=str(data_dir),
        table_standby_replicas=0,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 6),
        broker_commit_interval=settings.commit_interval_s,
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # A batch writes hundreds of changelog records per partition at once; in 16 KB
        # producer batches (the default) each waits for the one before it to be sent.
        # Below real Kafka's default message.max.bytes (1 MB).
        producer_max_batch_size=PRODUCER_BATCH_BYTES,
        producer_linger=PRODUCER_LINGER_S,  # a batch's writes go in a few requests
        version=1,
        **tansu_workarounds,
    )
    complete_flushes(app.producer)  # offsets are committed only after every table write
    seek_uncommitted_to_beginning(app.consumer)  # no record skipped after a rebalance
    # nor records re-fetched after one; agents check each record's order with `deliveries`
    deliveries = keep_seeks_over_stale_reads(
        app.consumer, {settings.events_topic, settings.cases_topic, settings.links_topic})
    commit_only_contiguous(app.consumer)  # a commit never passes an unprocessed record
    hand_over_eagerly(app.consumer)  # no tasks per fetched record

    async def stop_on_lost_offsets(lost: list[Any]) -> None:
        err = BrokerStateLost(
            "the broker lost the committed offsets of "
            + ", ".join(f"{tp.topic}/{tp.partition}" for tp in lost)
            + ": it lost its log (an embedded broker restarted, or the cluster was replaced)."
            " Stopping rather than counting a new log against old state: restart the workers"
            " (the figures start again from what the broker holds now)."
        )
        log.critical("%s", err)
        await app.crash(err)
        raise err

    stop_when_offsets_vanish(app.consumer, stop_on_lost_offsets)
    client_options = kafka_client_kwargs(settings)  # our own clients, secured like Faust's
    if settings.tansu:  # changelog writes in normal producer batches (faust_patches/tables.py)
        ends_from_fetches(app.consumer, settings.bootstrap_servers, client_options)
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    events_topic = app.topic(settings.events_topic, partitions=settings.partitions, **raw)
    # Where cases live: the events topic, or (partitioner `repartition`) the events re-keyed
    # by case_id with our own hash.
    cases_topic = (app.topic(settings.repartition_topic, partitions=settings.partitions,
                             internal=True, **raw)
                   if settings.repartitions else events_topic)
    links_topic = app.topic(settings.links_topic, partitions=settings.partitions,
                            internal=True, **raw)
    dlq_topic = app.topic(settings.dlq_topic, **raw)
    # Items of events partition p go to annotation partition p (see docs/annotations.md).
    annotation_topic = app.topic(settings.annotation_topic, partitions=settings.partitions,
                                 **raw)

    cases = acknowledged_table(app, "cases", settings.partitions, str)
    partition_records = acknowledged_table(app, "partitions", settings.partitions, int)
    ledger = Ledger(
        WindowPolicy(sizes_s=settings.window_sizes_s, grace_s=settings.window_grace_s),
        retention_us=settings.case_retention_s * SECOND_US,
        sample_rate=settings.sample_resolved_rate,
    )
    guards: dict[int, ResendGuard] = {}  # per events partition, since it was assigned
    # Held from planning a batch to writing its cases, so no link write lands in between.
    case_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
    annotation_topic_ready = asyncio.Event()
    window_tables = WindowTables(app, settings, ledger.windows, ledger.watermarks.get,
                                 client_options)
    event_time_bounds = settings.event_time_bounds
    routings: dict[str, CaseRouting] = {}  # read once per assignment (partitions may be added)
    misrouting_logged: set[int] = set()

    async def case_routing() -> CaseRouting:
        """The configured partitioner over the cases topic's real partition count."""
        routing = routings.get("cases")
        if routing is None:
            await ensure_copartitioned(settings, settings.links_topic, client_options)
            if settings.repartitions:
                await ensure_copartitioned(settings, settings.source_times_topic,
                                           client_options, like=settings.events_topic)
            async with reader(settings.bootstrap_servers, client=client_options) as consumer:
                count = await partition_count(consumer, settings.cases_topic)
            if count == 0:
                raise OutputTopicError(f"topic {settings.cases_topic} does not exist")
            routing = routings["cases"] = CaseRouting(settings.partitioner, count)
        return routing

    def report_misrouting(plan: BatchPlan, routing: CaseRouting) -> None:
        if plan.misrouted and plan.partition not in misrouting_logged:
            misrouting_logged.add(plan.partition)
            log.error(
                "partition %s of %s holds events of cases that ACSR_PARTITIONER=%s places on "
                "other partitions (e.g. case %r): their producers use another partitioner, and "
                "figures that join cases (FCR) are wrong with more than one worker. %s; see "
                "docs/events.md, Producers. Counted in acsr_events_misrouted_total.",
                plan.partition, settings.cases_topic, settings.partitioner, plan.misrouted[0],
                routing.remedy(plan.misrouted[:20], plan.partition))

    async def dead_letter(message: Any, invalid: InvalidEvent) -> bool:
        """Send the message to the dead-letter topic; False when the topic refused it."""
        headers = [
            *(message.headers or ()),
            (REASON_HEADER, invalid.reason.encode()),
            (DETAIL_HEADER, invalid.detail.encode()[:512]),
        ]
        try:
            sent = await dlq_topic.send(key=message.key, value=message.value, headers=headers,
                                        force=True)
            await sent
        except Exception as err:  # the dead-letter topic refused it: count, log, go on
            log.warning("dead-letter write failed (reason=%s, partition=%s, offset=%s): %s",
                        invalid.reason, message.partition, message.offset, err)
            return False
        return True

    def ensure_built(partitions: set[int]) -> None:
        # After a rebalance a partition's aggregate, watermark and key index are derived
        # from its recovered tables before any event of it is applied or exposed.
        unbuilt = ledger.unbuilt(partitions)
        if unbuilt:
            ledger.build(cases.items(), partition_records.items(), unbuilt)
        window_tables.build(partitions)

    async def ensure_annotation_topic() -> None:
        if not annotation_topic_ready.is_set():
            await ensure_copartitioned(settings, settings.annotation_topic, client_options)
            annotation_topic_ready.set()

    async def resend_guard(partition: int, offset: int) -> ResendGuard:
        # The first event a worker processes on a partition (after a start or a rebalance)
        # marks where redelivery may begin: items sent for events from there on are found
        # on the annotation partition's tail and not sent again.
        guard = guards.get(partition)
        if guard is None or offset < guard.first_offset:
            await ensure_annotation_topic()
            guard = guards[partition] = await load_guard(
                settings.bootstrap_servers, settings.annotation_topic, partition, offset,
                client_options)
        return guard

    async def send_items(plan: BatchPlan, guard: ResendGuard) -> list[Any]:
        """Send the batch's annotation items; the acknowledgements to wait for."""
        acks = []
        headers = [(HORIZON_HEADER, str(guard.horizon).encode())]
        for applied in plan.applied:
            case_id, step = applied.event.case_id, applied.step
            source = Source(settings.cases_topic, plan.partition, applied.offset)
            for route in step.routes:
                if guard.already_sent(case_id, route.reason):
                    resends_prevented.inc()
                    continue
                item = build_item(case_id, route.reason, route.trigger, applied.view, source)
                acks.append(await annotation_topic.send(
                    key=case_id.encode(), value=encode_within(item, RECORD_LIMIT),
                    partition=plan.partition,
                    headers=headers, force=True))
        return acks

    async def send_links(plan: BatchPlan, routing: CaseRouting) -> list[Any]:
        """Each link to the partition of the earlier case, as the producers placed it."""
        acks = []
        for related, ts_us in plan.links:
            link = orjson.dumps({"case_id": related, "ts_us": ts_us})
            acks.append(await links_topic.send(key=related.encode(), value=link,
                                               partition=routing.home(related), force=True))
        return acks

    async def dead_letter_all(plan: BatchPlan, messages: dict[int, Any]) -> list[int]:
        """Dead-letter the batch's invalid messages; the offsets the topic refused."""
        return [offset for offset, invalid in plan.invalid
                if not await dead_letter(messages[offset], invalid)]

    async def process_batch(partition: int, events: list[Any]) -> None:
        """One partition's events, in offset order: every side effect of the batch is
        acknowledged before its cases are written (docs/architecture.md)."""
        ensure_built({partition})
        # In offset order, each once: a seek back (a rebalance, a refetch) can hand some
        # records over again inside one batch.
        messages = {event.message.offset: event.message for event in events}
        batch = [(offset, parse_or_invalid(messages[offset].value, event_time_bounds))
                 for offset in sorted(messages)]
        origins: Origins | None = None
        if settings.repartitions:
            origins = {offset: origin for offset, message in messages.items()
                       if (origin := parse_source(message.headers)) is not None}
        guard = await resend_guard(partition, batch[0][0])
        routing = await case_routing()
        with writes_on(events[-1]):
            async with case_locks[partition]:
                plan = ledger.plan_batch(cases, partition_records, partition, batch,
                                         routing.home, origins)
                report_misrouting(plan, routing)
                refused = await dead_letter_all(plan, messages) if plan.invalid else []
                acks = [*await send_links(plan, routing), *await send_items(plan, guard)]
                window_tables.fold(plan)
                if plan.applied or plan.invalid:
                    ledger.mark_batch(partition_records, plan, refused)
                for ack in acks:
                    await ack
                await window_tables.acknowledged(partition)
                await partition_records.acknowledged(partition)
                ledger.commit_batch(cases, plan)
                await cases.acknowledged(partition)
            await window_tables.advance(partition, plan.last)
            ledger.maybe_expire(cases, partition_records, partition)
        now = time.time()
        for applied in plan.applied:
            event_time_lag.observe(max(0.0, now - applied.event.ts_us / 1e6))

    async def process_one_by_one(partition: int, events: list[Any]) -> None:
        # A batch failed: a bug, never input. Each event again on its own, so only the
        # one that fails goes to the dead-letter topic (reason processing_error).
        for event in events:
            try:
                await process_batch(partition, [event])
            except OutputTopicError:
                raise
            except Exception as err:
                message = event.message
                reason = STATE_TOO_LARGE if isinstance(err, RecordTooLarge) else PROCESSING_ERROR
                log.exception("processing failed (partition=%s, offset=%s, case %r): %s",
                              message.partition, message.offset, message.key, reason)
                failure = InvalidEvent(reason, f"{type(err).__name__}: {err}")
                with writes_on(event):
                    dead_lettered = await dead_letter(message, failure)
                    ledger.apply_invalid(partition_records, message.partition, message.offset,
                                         reason, counter=kpis.PROCESSING_ERROR,
                                         dead_lettered=dead_lettered)

    async def in_batches(stream: faust.StreamT,
                         handle: Callable[[int, list[Any]], Awaitable[None]]) -> None:
        """Hand each batch to `handle`, partition by partition, in order."""
        async for events in stream.take_events(settings.batch_max, settings.batch_wait_s):
            try:
                by_partition = await deliveries.by_partition(events,
                                                             app.consumer_generation_id)
                with deliveries.processing():
                    # Partitions at once: each waits for the broker, none for the others.
                    await asyncio.gather(*(handle(partition, in_partition)
                                           for partition, in_partition in by_partition.items()))
            except BaseException:
                # Stopped (a SIGTERM cancels the agent) or crashed inside a batch:
                # `take_events` acknowledges the whole batch on its way out, which would let
                # a commit pass events never processed. Marked acknowledged, Faust leaves them
                # uncommitted; the next owner takes them again (applied ones are skipped).
                keep_uncommitted(event.message for event in events)
                raise

    if settings.repartitions:
        rekeyer = Rekeyer(cases_topic, app.topic(settings.source_times_topic, **raw),
                          settings.bootstrap_servers, client_options, case_routing,
                          event_time_bounds)

        @app.agent(events_topic)
        async def rekey_events(stream: faust.StreamT) -> None:
            await in_batches(stream, rekeyer.forward)

        @app.on_partitions_revoked.connect
        async def forget_forwarded(sender: Any, revoked: set[TP], **_: Any) -> None:
            rekeyer.forget({tp.partition for tp in revoked if tp.topic == settings.events_topic})

    @app.agent(cases_topic)
    async def process_events(stream: faust.StreamT) -> None:
        await in_batches(stream, process_partition)

    async def process_partition(partition: int, events: list[Any]) -> None:
        try:
            await process_batch(partition, events)
        except OutputTopicError as err:
            log.critical("%s", err)
            await app.crash(err)
            raise
        except Exception:
            log.exception("batch failed (partition=%s, offsets %s-%s); one by one",
                          partition, events[0].message.offset, events[-1].message.offset)
            await process_one_by_one(partition, events)

    @app.agent(links_topic)
    async def apply_links(stream: faust.StreamT) -> None:
        async for event in stream.events():
            if not await deliveries.in_order(event.message):
                continue
            ensure_built({event.message.partition})
            try:
                link = orjson.loads(event.message.value)
                async with case_locks[event.message.partition]:
                    ledger.apply_link(cases, link["case_id"], event.message.partition,
                                      link["ts_us"])
            except Exception:  # only our own messages come here: a bug, never input
                log.exception("link failed (partition=%s, offset=%s)",
                              event.message.partition, event.message.offset)
                ledger.aggregate(event.message.partition).count(kpis.PROCESSING_ERROR, "link")

    def owned_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives()
                if tp.topic == settings.cases_topic}

    def recovering() -> bool:
        return tables_recovering(app)

    @app.timer(interval=DELIVERY_CHECK_S)
    async def refetch_stalled_partitions() -> None:
        # A record lost on its way to an agent with none after it would stall its
        # partition's commits for good (streams/faust_patches/fixes.py, Deliveries).
        if not recovering():
            await deliveries.refetch_stalled(STALLED_DELIVERY_S)

    def consumer_lag() -> dict[int, int]:
        lag = {}
        for partition in owned_partitions():
            highwater = app.consumer.highwater(TP(settings.cases_topic, partition))
            if highwater is not None and highwater >= 0:
                lag[partition] = max(0, highwater - ledger.positions.get(partition, 0))
        return lag

    def owned_aggregates() -> dict[int, Any]:
        """Aggregates of the partitions owned and derived from recovered tables."""
        owned = owned_partitions()
        if not recovering():
            ensure_built(owned)
        return {p: agg for p, agg in ledger.aggregates.items() if p in owned}

    registry, event_time_lag = build_registry(
        WorkerView(owned_aggregates, consumer_lag, recovering, __version__, settings.app_id,
                   windows=lambda: window_tables.latest_closed(owned_aggregates())),
        LabelBounds(limit=settings.label_limit, allowed=settings.label_allow_lists()),
    )
    resends_prevented = Counter(
        "acsr_annotation_resends_prevented",
        "Annotation items found already sent (before a crash) and not sent again.",
        registry=registry)

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: set[TP], **_: Any) -> None:
        # Stop exposing a partition at once: its new owner exposes it from its tables.
        gone = {tp.partition for tp in revoked if tp.topic == settings.cases_topic}
        routings.clear()  # partitions may have been added: read the count again
        ledger.drop(gone)
        window_tables.forget(gone)
        for partition in gone:
            guards.pop(partition, None)

    @cases.on_recover
    async def rebuild_aggregates() -> None:
        ledger.rebuild(cases.items(), partition_records.items(), owned_partitions())

    @app.page("/metrics")
    class MetricsView(View):
        """Prometheus exposition of this worker's partitions."""

        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(registry), content_type=METRICS_CONTENT_TYPE)

    @app.page("/kpis/")
    class KpisView(View):
        """The worker's per-partition aggregates: `replay` sums them into the report."""

        async def get(self, request: Request) -> Response:
            aggregates = owned_aggregates()
            owned = owned_partitions()
            return self.json({
                "version": __version__,
                # Windows come from the window tables (the aggregates keep none).
                "partitions": {str(p): {**agg.to_json(), "windows": window_tables.rows(p)}
                               for p, agg in sorted(aggregates.items())},
                "owned": sorted(owned),
                "recovering": recovering() or set(aggregates) != owned,
            })

    return app

"""The Faust application: topics, tables and the agents that own them.

`build_app(settings)` declares everything; `acsr-metrics worker` runs it. Each agent is
a short loop that hands the event to the ledger (pure accounting) and does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import faust
import orjson
from faust.types import TP
from faust.web import Request, Response, View
from prometheus_client import Counter, generate_latest

from . import __version__, kpis
from .annotation_log import OutputTopicError, ensure_copartitioned, load_guard
from .annotations import HORIZON_HEADER, ResendGuard, Source, build_item, encode
from .broker import ONE_RECORD_BATCH_BYTES
from .cases import SECOND_US, Step, WindowPolicy, related_case
from .config import Settings
from .events import InvalidEvent, parse_event
from .exporter import LabelBounds, WorkerView, build_registry
from .faust_fixes import (
    commit_only_contiguous,
    complete_flushes,
    keep_seeks_over_stale_reads,
    seek_uncommitted_to_beginning,
    stop_when_offsets_vanish,
)
from .ledger import Ledger
from .security import faust_credentials, kafka_client_kwargs
from .window_tables import WindowTables

log = logging.getLogger("acsr_metrics")

REASON_HEADER = "acsr-invalid-reason"
DETAIL_HEADER = "acsr-invalid-detail"
PROCESSING_ERROR = "processing_error"
# Prometheus text format 0.0.4 (aiohttp adds the charset itself).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"


TANSU_REQUEST_TIMEOUT_S = 10.0
DELIVERY_CHECK_S = 1.0
STALLED_DELIVERY_S = 5.0  # a due record held by the broker that long is fetched again


class BrokerStateLost(RuntimeError):
    """The broker lost offsets this worker committed, and with them its log: stop."""


def build_app(settings: Settings) -> faust.App:
    data_dir = Path(settings.data_dir) / f"{settings.app_id}-{settings.web_port}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tansu_workarounds: dict[str, Any] = (
        {
            "producer_max_batch_size": ONE_RECORD_BATCH_BYTES,
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
        version=1,
        **tansu_workarounds,
    )
    complete_flushes(app.producer)  # offsets are committed only after every table write
    seek_uncommitted_to_beginning(app.consumer)  # no record skipped after a rebalance
    # nor records re-fetched after one; agents check each record's order with `deliveries`
    deliveries = keep_seeks_over_stale_reads(
        app.consumer, {settings.events_topic, settings.links_topic})
    commit_only_contiguous(app.consumer)  # a commit never passes an unprocessed record

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
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    events_topic = app.topic(settings.events_topic, partitions=settings.partitions, **raw)
    links_topic = app.topic(settings.links_topic, partitions=settings.partitions,
                            internal=True, **raw)
    dlq_topic = app.topic(settings.dlq_topic, **raw)
    # Items of events partition p go to annotation partition p (see docs/annotations.md).
    annotation_topic = app.topic(settings.annotation_topic, partitions=settings.partitions,
                                 **raw)

    # Values are our own JSON bytes (value_type=bytes: raw changelog values), so the store
    # never aliases a state we go on mutating; keys are JSON (str and int survive recovery).
    cases = app.Table("cases", partitions=settings.partitions, key_type=str, value_type=bytes)
    partition_records = app.Table("partitions", partitions=settings.partitions, key_type=int,
                                  value_type=bytes)
    ledger = Ledger(
        WindowPolicy(sizes_s=settings.window_sizes_s, grace_s=settings.window_grace_s),
        retention_us=settings.case_retention_s * SECOND_US,
        sample_rate=settings.sample_resolved_rate,
        fact_windows=False,  # the window tables hold the windows
    )
    guards: dict[int, ResendGuard] = {}  # per events partition, since it was assigned
    # Held from planning an event to writing its case, so no link write lands in between.
    case_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
    annotation_topic_ready = asyncio.Event()
    client_options = kafka_client_kwargs(settings)  # our own clients, secured like Faust's
    window_tables = WindowTables(app, settings, ledger.windows, ledger.watermarks.get,
                                 client_options)

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

    async def send_items(message: Any, case_id: str, step: Step, guard: ResendGuard) -> None:
        source = Source(message.topic, message.partition, message.offset)
        headers = [(HORIZON_HEADER, str(guard.horizon).encode())]
        acks = []
        for route in step.routes:
            if guard.already_sent(case_id, route.reason):
                resends_prevented.inc()
                continue
            item = build_item(case_id, route.reason, route.trigger,
                              step.state.annotation_view(), source)
            acks.append(await annotation_topic.send(
                key=case_id.encode(), value=encode(item), partition=message.partition,
                headers=headers, force=True))
        for ack in acks:
            await ack

    async def process(message: Any) -> None:
        ensure_built({message.partition})
        guard = await resend_guard(message.partition, message.offset)
        try:
            parsed = parse_event(message.value)
        except InvalidEvent as invalid:
            dead_lettered = await dead_letter(message, invalid)
            ledger.apply_invalid(partition_records, message.partition, message.offset,
                                 invalid.reason, dead_lettered=dead_lettered)
            return
        related = related_case(parsed)
        if related is not None:
            # Acknowledged before the case is written, so a crash cannot lose it;
            # applying a link twice changes nothing.
            link = orjson.dumps({"case_id": related, "ts_us": parsed.ts_us})
            await (await links_topic.send(key=related.encode(), value=link, force=True))
        async with case_locks[message.partition]:
            step = ledger.plan_event(cases, parsed, message.partition, message.offset)
            if step is not None:
                # Items are acknowledged before the case write that records them (as links).
                await send_items(message, parsed.case_id, step, guard)
                # Window cells too are acknowledged before the case write.
                await window_tables.fold(message, parsed, step)
                ledger.commit_event(cases, parsed, message.partition, step)
        await window_tables.advance(message)  # publish closed windows, drop expired ones
        event_time_lag.observe(max(0.0, time.time() - parsed.ts_us / 1e6))
        ledger.maybe_expire(cases, partition_records, message.partition)

    @app.agent(events_topic)
    async def process_events(stream: faust.StreamT) -> None:
        async for event in stream.events():
            if not await deliveries.in_order(event.message):
                continue  # records before it were lost on the way: it comes again after them
            try:
                await process(event.message)
            except OutputTopicError as err:
                log.critical("%s", err)
                await app.crash(err)
                raise
            except Exception as err:
                # A bug must not stop the partition nor lose the message: it goes to the
                # dead-letter topic with reason processing_error, counted and logged.
                log.exception("processing failed (partition=%s, offset=%s)",
                              event.message.partition, event.message.offset)
                failure = InvalidEvent(PROCESSING_ERROR, f"{type(err).__name__}: {err}")
                dead_lettered = await dead_letter(event.message, failure)
                ledger.apply_invalid(partition_records, event.message.partition,
                                     event.message.offset, PROCESSING_ERROR,
                                     counter=kpis.PROCESSING_ERROR, dead_lettered=dead_lettered)

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
                if tp.topic == settings.events_topic}

    def recovering() -> bool:
        return not app.tables.recovery.completed.is_set()

    @app.timer(interval=DELIVERY_CHECK_S)
    async def refetch_stalled_partitions() -> None:
        # A record lost on its way to an agent with none after it would stall its
        # partition's commits for good (streams/faust_fixes.py, Deliveries).
        if not recovering():
            await deliveries.refetch_stalled(STALLED_DELIVERY_S)

    def consumer_lag() -> dict[int, int]:
        lag = {}
        for partition in owned_partitions():
            highwater = app.consumer.highwater(TP(settings.events_topic, partition))
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
        gone = {tp.partition for tp in revoked if tp.topic == settings.events_topic}
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

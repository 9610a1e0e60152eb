"""The Faust application: its tables, the agents that own them, and the web views.

`build_app(settings)` declares everything; `acsr-metrics worker` runs it. Each agent is a
short loop that hands its batches to the `BatchProcessor` (streams/worker/batches.py),
which applies the ledger's plans in the order exactness needs. With ACSR_OTEL_BRIDGE the
command hands it the OTLP bridge too (streams/tools/otel_bridge.py), run as a task.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest

from streams import __version__
from streams.config import Settings
from streams.core.ledger import BatchPlan, Ledger
from streams.core.units import SECOND_US
from streams.core.windows import WindowPolicy
from streams.faust_patches import BatchHandOver, Deliveries, install_all
from streams.faust_patches.fixes import keep_uncommitted
from streams.faust_patches.tables import AcknowledgedTable, writes_on
from streams.kafka.reader import OutputTopicError
from streams.kafka.security import faust_credentials, kafka_client_kwargs
from streams.metrics.exporter import WorkerView, build_registry
from streams.metrics.group import RECENT_WINDOWS, Snapshot
from streams.worker.batches import BatchProcessor
from streams.worker.group import GroupExport
from streams.worker.outputs import REASON_HEADER, KafkaOutputs
from streams.worker.rekey import Rekeyer
from streams.worker.topics import Topics, declare_topics
from streams.worker.window_tables import WindowTables

__all__ = ["REASON_HEADER", "build_app", "tables_recovering"]

log = logging.getLogger("acsr_metrics")

# Prometheus text format 0.0.4 (aiohttp adds the charset itself).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
TANSU_REQUEST_TIMEOUT_S = 10.0
PRODUCER_BATCH_BYTES = 512 * 1024
PRODUCER_LINGER_S = 0.005
DELIVERY_CHECK_S = 1.0
STALLED_DELIVERY_S = 5.0  # a due record held by the broker that long is fetched again
GC_THRESHOLDS = (50_000, 20, 100)  # the collector's generations (tune_gc)
BRIDGE_STOP_S = 10.0  # how long a stopping worker waits for the bridge's batch to land

# The OTLP bridge a worker runs beside its agents: given the worker's registry (its
# counters are served at the worker's /metrics), it runs until the event is set.
BridgeRunner = Callable[[CollectorRegistry, asyncio.Event], Awaitable[None]]


class BrokerStateLost(RuntimeError):
    """The broker lost offsets this worker committed, and with them its log: stop."""


def tables_recovering(app: faust.App) -> bool:
    """True until this worker's tables are recovered, in every rebalance.

    Faust sets `recovery.completed` once and never clears it; `rebalancing` covers each
    later rebalance, from its start until its recovery is done. Read in between, a
    partition's aggregate would be derived from half-recovered tables."""
    return app.rebalancing or not app.tables.recovery.completed.is_set()


def acknowledged_table(app: faust.App, name: str, partitions: int, key_type: type
                       ) -> AcknowledgedTable:
    # Values are our own JSON bytes (value_type=bytes: raw changelog values), so the store
    # never aliases a state we go on mutating; keys are JSON (str and int survive recovery).
    table = AcknowledgedTable(app, name=name, beacon=app.tables.beacon, partitions=partitions,
                              key_type=key_type, value_type=bytes)
    app.tables.add(table)
    return table


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Collect young objects every GC_THRESHOLDS[0] allocations instead of Python's 700.

    A batch allocates hundreds of thousands of objects that die with it (parsed events,
    plans, decoded cases, the group topic's snapshots); at the default the collector ran
    hundreds of times a batch, and its older generations over the worker's long-lived
    state: the worker ran at about half the speed (docs/performance.md). Whatever is
    cyclic garbage is still collected, a little later."""
    gc.set_threshold(*thresholds)


def faust_app(settings: Settings) -> faust.App:
    data_dir = Path(settings.data_dir) / f"{settings.app_id}-{settings.web_port}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tansu_workarounds: dict[str, Any] = (
        {
            # Tansu now and then never answers a request after a client was killed; a
            # short timeout retries it instead of waiting Faust's default 20 minutes.
            "producer_request_timeout": TANSU_REQUEST_TIMEOUT_S,
        } if settings.tansu else {}
    )
    return faust.App(
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


def batch_handovers(settings: Settings) -> dict[str, BatchHandOver]:
    """The topics whose records reach their agent in whole batches: the cases topic, and
    the events topic when it is re-keyed."""
    topics = [settings.cases_topic, *([settings.events_topic] if settings.repartitions else [])]
    return {topic: BatchHandOver(topic, settings.batch_max, settings.batch_wait_s)
            for topic in topics}


def install_patches(app: faust.App, settings: Settings,
                    handovers: dict[str, BatchHandOver]) -> Deliveries:
    """Faust's consumer and producer as the batch protocol needs them
    (streams/faust_patches/); the agents check each record's order with the result."""

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

    return install_all(
        app, {settings.events_topic, settings.cases_topic, settings.links_topic},
        stop_on_lost_offsets,
        # changelog writes in normal producer batches (faust_patches/tables.py)
        (settings.bootstrap_servers, kafka_client_kwargs(settings)) if settings.tansu else None,
        handovers.values())


class Worker:
    """The state one worker process shares between its agents, timers and views."""

    def __init__(self, app: faust.App, settings: Settings, deliveries: Deliveries,
                 handovers: dict[str, BatchHandOver]) -> None:
        self.app, self.settings, self.deliveries = app, settings, deliveries
        self.handovers = handovers
        client_options = self.client_options = kafka_client_kwargs(settings)  # our clients
        self.topics: Topics = declare_topics(app, settings)
        self.cases = acknowledged_table(app, "cases", settings.partitions, str)
        self.records = acknowledged_table(app, "partitions", settings.partitions, int)
        self.ledger = Ledger(
            WindowPolicy(sizes_s=settings.window_sizes_s, grace_s=settings.window_grace_s),
            retention_us=settings.case_retention_s * SECOND_US,
            sample_rate=settings.sample_resolved_rate)
        self.windows = WindowTables(app, settings, self.ledger.windows,
                                    self.ledger.watermarks.get, client_options)
        self.exposition_and_outputs()
        self.processor = BatchProcessor(
            self.ledger, self.cases, self.records, self.windows, self.outputs,
            bounds=settings.event_time_bounds, repartitions=settings.repartitions,
            writes_on=writes_on, applied=self.applied)
        self.group = GroupExport(
            app, settings, client_options, owned=self.owned_partitions,
            ready=lambda: not self.recovering(),
            lock=lambda partition: self.processor.locks[partition],
            snapshot=self.partition_snapshot)
        self.rekeyer = (Rekeyer(self.topics.cases, self.topics.source_times,
                                settings.bootstrap_servers, client_options,
                                self.outputs.case_routing, settings.event_time_bounds)
                        if settings.repartitions else None)

    def exposition_and_outputs(self) -> None:
        """The worker's own exposition and the outputs that count into it."""
        self.registry, self.event_time_lag = build_registry(WorkerView(
            owned=self.owned_partitions, lag=self.consumer_lag, recovering=self.recovering,
            exporting=lambda: self.group.serves(), version=__version__,
            app_id=self.settings.app_id, cells_held=self.cells_held,
            render_s=lambda: self.group.render_s))
        self.outputs = KafkaOutputs(self.settings, self.topics, self.client_options,
                                    self.registry)

    # --- what the agents run -------------------------------------------------------------

    async def in_batches(self, topic: str,
                         handle: Callable[[int, list[Any]], Awaitable[None]]) -> None:
        """Hand each batch of `topic`'s records to `handle`, partition by partition, in
        order, then acknowledge them. The records come from the topic's hand-over
        (faust_patches/handover.py), not through the agent's stream."""
        handover = self.handovers[topic]
        async for messages in handover.batches():
            try:
                by_partition = await self.deliveries.by_partition(
                    messages, self.current_generation())
                with self.deliveries.processing():
                    # Partitions at once: each waits for the broker, none for the others.
                    await asyncio.gather(*(handle(partition, in_partition)
                                           for partition, in_partition in by_partition.items()))
            except BaseException:
                # Stopped (a SIGTERM cancels the agent) or crashed inside a batch: marked
                # acknowledged, Faust leaves them uncommitted (and stops waiting for them);
                # the next owner takes them again (applied ones are skipped).
                keep_uncommitted(messages)
                raise
            handover.acknowledge(messages)

    async def process_partition(self, partition: int, messages: list[Any]) -> None:
        try:
            await self.processor.process(partition, messages)
        except OutputTopicError as err:  # an output we cannot write: stop, loudly
            log.critical("%s", err)
            await self.app.crash(err)
            raise

    def applied(self, plan: BatchPlan) -> None:
        """A batch landed: its event-time lag observed, its partition's figures changed."""
        self.group.changed(plan.partition)
        now = time.time()
        for applied in plan.applied:
            self.event_time_lag.observe(max(0.0, now - applied.event.ts_us / 1e6))

    # --- ownership: what a worker holds, and when it is derived ---------------------------

    def owned_partitions(self) -> set[int]:
        return {tp.partition for tp in self.app.assignor.assigned_actives()
                if tp.topic == self.settings.cases_topic}

    def recovering(self) -> bool:
        return tables_recovering(self.app)

    def current_generation(self) -> int | None:
        """The consumer's generation, None while the group rebalances (no record may be
        processed then: Deliveries.by_partition)."""
        return None if self.recovering() else self.app.consumer_generation_id

    def build_owned(self) -> None:
        """Derive owned partitions' state from the recovered tables: at every recovery,
        and at the delivery check for a partition assigned without one."""
        if not self.recovering():
            self.processor.ensure_built(self.owned_partitions())

    def rebuild(self) -> None:
        """Every table was recovered (a start or a rebalance): derive the owned
        partitions' state from them (Faust calls this before the recovery ends)."""
        owned = self.owned_partitions()
        self.ledger.rebuild(self.cases.items(), self.records.items(), owned)
        self.windows.reload(owned)

    def forget(self, revoked: set[TP]) -> None:
        """Stop exposing a partition at once: its new owner exposes it from its tables."""
        gone = {tp.partition for tp in revoked if tp.topic == self.settings.cases_topic}
        self.ledger.drop(gone)
        self.windows.forget(gone)
        self.outputs.forget(gone)
        self.group.forget(gone)

    # --- what the views read (never changing state) -------------------------------------

    def owned_aggregates(self) -> dict[int, Any]:
        """Aggregates of the owned partitions already derived from recovered tables."""
        owned = self.owned_partitions()
        return {p: agg for p, agg in self.ledger.aggregates.items() if p in owned}

    def cells_held(self) -> dict[int, int]:
        owned = self.owned_partitions()
        return {partition: len(windows) for partition, windows in self.windows.partitions.items()
                if partition in owned}

    def partition_snapshot(self, partition: int) -> Snapshot | None:
        """The partition's figures for the group topic (None until derived)."""
        aggregate = self.ledger.aggregates.get(partition)
        windows = self.windows.partitions.get(partition)
        if aggregate is None or windows is None:
            return None
        recent = windows.recent_closed(self.ledger.watermarks.get(partition), RECENT_WINDOWS)
        return Snapshot.of(partition, self.ledger.positions.get(partition, 0), aggregate, recent)

    def consumer_lag(self) -> dict[int, int]:
        lag = {}
        for partition in self.owned_partitions():
            highwater = self.app.consumer.highwater(TP(self.settings.cases_topic, partition))
            if highwater is not None and highwater >= 0:
                lag[partition] = max(0, highwater - self.ledger.positions.get(partition, 0))
        return lag

    def kpis(self) -> dict[str, Any]:
        """The per-partition aggregates `replay` sums into its report."""
        aggregates = self.owned_aggregates()
        owned = self.owned_partitions()
        return {
            "version": __version__,
            # Windows come from the window tables (the aggregates keep none).
            "partitions": {str(p): {**agg.to_json(), "windows": self.windows.rows(p)}
                           for p, agg in sorted(aggregates.items())},
            "owned": sorted(owned),
            "recovering": (self.recovering() or set(aggregates) != owned
                           or not self.windows.built(owned)),
        }


def build_app(settings: Settings, bridge: BridgeRunner | None = None) -> faust.App:
    tune_gc()
    app = faust_app(settings)
    handovers = batch_handovers(settings)
    worker = Worker(app, settings, install_patches(app, settings, handovers), handovers)
    add_agents(app, worker)
    add_views(app, worker)
    if bridge is not None:
        add_bridge(app, worker, bridge)
    return app


def add_bridge(app: faust.App, worker: Worker, bridge: BridgeRunner) -> None:
    """The OTLP bridge as a task of the worker. A stopping worker tells it to stop and
    waits for its batch to land (its consumer and producer stopped) before Faust's own
    producer goes; if it does not in BRIDGE_STOP_S, Faust cancels it, which stops its
    clients too. A bridge that fails stops the worker: never a worker silently not
    bridging."""
    stop = asyncio.Event()
    running: list[asyncio.Future[Any]] = []

    @app.task
    async def otel_bridge() -> None:
        running.append(asyncio.ensure_future(bridge(worker.registry, stop)))
        try:
            await running[0]
        except Exception as err:
            log.critical("the OTLP bridge failed: %r", err)
            await app.crash(err)
            raise

    @app.on_before_shutdown.connect
    async def stop_bridge(sender: Any, **_: Any) -> None:
        stop.set()
        if running:
            await asyncio.wait(running, timeout=BRIDGE_STOP_S)


def add_agents(app: faust.App, worker: Worker) -> None:
    topics, deliveries = worker.topics, worker.deliveries

    if worker.rekeyer is not None:
        rekeyer = worker.rekeyer

        @app.agent(topics.events)
        async def rekey_events(stream: faust.StreamT) -> None:
            await worker.in_batches(worker.settings.events_topic, rekeyer.forward)

    @app.agent(topics.cases)
    async def process_events(stream: faust.StreamT) -> None:
        await worker.in_batches(worker.settings.cases_topic, worker.process_partition)

    @app.agent(topics.links)
    async def apply_links(stream: faust.StreamT) -> None:
        async for event in stream.events():
            # The batches' check, for a batch of one: left uncommitted while the group
            # rebalances, skipped when out of order.
            if await deliveries.by_partition([event.message], worker.current_generation()):
                await worker.processor.apply_link(event.message)
                worker.group.changed(event.message.partition)

    @app.task
    async def publish_figures() -> None:
        await worker.group.publish_every(worker.settings.group_publish_s)

    @app.task
    async def follow_group() -> None:
        await worker.group.follow()

    @app.timer(interval=DELIVERY_CHECK_S)
    async def check_deliveries() -> None:
        # A record lost on its way to an agent with none after it would stall its
        # partition's commits for good (streams/faust_patches/fixes.py, Deliveries).
        if not worker.recovering():
            worker.build_owned()
            await deliveries.refetch_stalled(STALLED_DELIVERY_S)

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: set[TP], **_: Any) -> None:
        worker.forget(revoked)
        if worker.rekeyer is not None:
            worker.rekeyer.forget({tp.partition for tp in revoked
                                   if tp.topic == worker.settings.events_topic})

    @worker.cases.on_recover
    async def rebuild() -> None:
        worker.rebuild()


def add_views(app: faust.App, worker: Worker) -> None:
    @app.page("/metrics")
    class MetricsView(View):
        """This worker's own health (job `acsr`)."""

        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(worker.registry),
                              content_type=METRICS_CONTENT_TYPE)

    @app.page("/metrics/group")
    class GroupMetricsView(View):
        """The group's KPI figures (job `acsr-group`): empty on all but the exporter."""

        async def get(self, request: Request) -> Response:
            return self.bytes(await worker.group.exposition(),
                              content_type=METRICS_CONTENT_TYPE)

    @app.page("/kpis/")
    class KpisView(View):
        """The worker's per-partition aggregates: `replay` sums them into the report."""

        async def get(self, request: Request) -> Response:
            return self.json(worker.kpis())

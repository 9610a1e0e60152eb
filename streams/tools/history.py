"""The worker's figures over an archive of events, in event time, without a broker.

`History` is what the consumer group would compute from the same messages, one partition
per events partition, each in the order its messages arrive: the pure core's ledger and
window cells (as the worker's batch protocol applies them), re-engagement links applied
on the earlier case's partition, the group's figures merged from every partition's
snapshot as the group topic merges them, with the same label bounds. `acsr-metrics
backfill` asks it for those figures at every step of event time (streams/tools/backfill.py).

Messages go to partitions as `replay` sends them: keyed by `case_id`, placed by the
configured partitioner; keyless ones (invalid messages) round-robin, as their partition
changes no figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from streams.config import Settings
from streams.core.events import Event, InvalidEvent, message_key
from streams.core.kpis import Aggregate, build_report
from streams.core.ledger import BatchPlan, Ledger
from streams.core.windows import Cell, PartitionWindows, WindowKey, WindowRules, aggregate_rows
from streams.kafka.partitioners import MURMUR2, REPARTITION, CaseRouting
from streams.metrics.exporter import GroupFigures, LabelBounds
from streams.metrics.group import RECENT_WINDOWS, GroupState, Snapshot, series_label_values
from streams.metrics.openmetrics import Changes, Exposition, Frames
from streams.metrics.timeline import GroupTimeline
from streams.tools.core_bench import worker_ledger
from streams.worker.batches import parse_or_invalid

BATCH_MAX = 5000  # a partition's messages applied together at most (memory stays bounded)
NO_FIGURES = Aggregate(window_sizes=())  # snapshots carry windows only (see `History`)


@dataclass
class PartitionLog:
    """One events partition: its next offset, the messages not applied yet, and whether
    anything changed since its last snapshot."""

    partition: int
    windows: PartitionWindows
    next_offset: int = 0
    waiting: list[tuple[int, Event | InvalidEvent]] = field(default_factory=list)
    changed: bool = False
    # Report-size cells of windows past their retention: the report lists every window.
    expired_cells: dict[WindowKey, Cell] = field(default_factory=dict)


class History:
    """The group's figures over messages given in arrival order (see the module doc)."""

    def __init__(self, settings: Settings, partitions: int | None = None) -> None:
        self.settings = settings
        self.partitions = partitions or settings.partitions
        self.ledger: Ledger = worker_ledger(settings)
        # Every partition is ours, and the group's figures are their sum: one aggregate
        # that all partitions' accounting adds to is that sum, kept as events are applied
        # (the group state then only merges windows).
        self.total = Aggregate(window_sizes=())
        self.ledger.aggregates = dict.fromkeys(range(self.partitions), self.total)
        self.cases: dict[str, bytes] = {}
        self.records: dict[Any, bytes] = {}
        # Re-keyed events land where our own hash puts their case; their source partition
        # is that same partition here, so lateness is judged as in `replay`.
        partitioner = MURMUR2 if settings.partitioner == REPARTITION else settings.partitioner
        self.routing = CaseRouting(partitioner, self.partitions)
        rules = WindowRules(self.ledger.windows, settings.window_retention_s)
        self.logs = [PartitionLog(p, PartitionWindows(p, rules), changed=True)
                     for p in range(self.partitions)]
        self.bounds = settings.event_time_bounds
        self.report_size = settings.report_window_s
        self.group = GroupState()
        self.labels = LabelBounds(settings.label_limit, settings.label_allow_lists())
        self.drops = settings.metric_drops
        self.frames = Frames()
        self.timeline = GroupTimeline(self.labels, self.drops, self.frames)
        self.unkeyed = 0
        # Aggregate series that facts changed since the last frame: only the figures' facts
        # add to them (ledger._account).
        self.moved: set[tuple[str, tuple[str, ...], tuple[str, ...]]] = set()
        self.series_seen = 0  # aggregate series whose label values were admitted
        self.invalid = 0

    # --- taking messages -----------------------------------------------------------------

    def parse(self, line: bytes) -> tuple[int, Event | InvalidEvent]:
        """The message parsed, and the partition `replay` would put it on."""
        parsed = parse_or_invalid(line, self.bounds)
        if isinstance(parsed, Event):
            return self.routing.home(parsed.case_id), parsed
        key = message_key(line)
        if key is not None:
            return self.routing.home(key.decode()), parsed
        self.unkeyed += 1
        return self.unkeyed % self.partitions, parsed

    def add(self, partition: int, parsed: Event | InvalidEvent) -> None:
        """One message, after every message before it (apply with `apply` before reading
        figures)."""
        log = self.logs[partition]
        log.waiting.append((log.next_offset, parsed))
        log.next_offset += 1
        if isinstance(parsed, InvalidEvent):
            self.invalid += 1
        if len(log.waiting) >= BATCH_MAX:
            self._apply(log)

    def apply(self) -> None:
        """Apply every waiting message, partition by partition."""
        for log in self.logs:
            if log.waiting:
                self._apply(log)

    def _apply(self, log: PartitionLog) -> None:
        """One partition's batch, in the worker's order (streams/worker/batches.py): plan,
        fold windowed facts, mark, commit, links, advance the windows, expire idle cases."""
        ledger, partition = self.ledger, log.partition
        batch, log.waiting = log.waiting, []
        plan = ledger.plan_batch(self.cases, self.records, partition, batch, self.routing.home)
        self._fold_windows(log, plan)
        if plan.applied or plan.invalid:
            ledger.mark_batch(self.records, plan)
        ledger.commit_batch(self.cases, plan)
        moved = self.moved
        for applied in plan.applied:
            for fact in applied.step.facts:
                moved.add((fact.name, fact.labels, fact.dims))
        for case_id, ts_us in plan.links:
            home = self.routing.home(case_id)
            step = ledger.apply_link(self.cases, case_id, home, ts_us)
            moved.update((fact.name, fact.labels, fact.dims) for fact in step.facts)
            self.logs[home].changed = True
        self._advance_windows(log)
        ledger.maybe_expire(self.cases, self.records, partition)
        log.changed = True

    @staticmethod
    def _fold_windows(log: PartitionLog, plan: BatchPlan) -> None:
        for applied in plan.applied:
            log.windows.fold(applied.offset, applied.event.ts_us, applied.step.late,
                             applied.step.facts)

    def _advance_windows(self, log: PartitionLog) -> None:
        """Closed windows marked as emitted (nothing to publish here); windows past their
        retention dropped, their report-size cells kept for the report."""
        windows = log.windows
        watermark = self.ledger.watermarks.get(log.partition)
        for key in windows.closing(watermark):
            windows.mark_emitted(key)
        expiring = windows.expiring(watermark)
        for key in expiring:
            if key.size == self.report_size:
                log.expired_cells[key] = windows.cells[key]
        windows.drop(expiring)

    # --- reading figures -----------------------------------------------------------------

    def figures(self) -> GroupFigures:
        """The group's figures now, as the exporter would render them: every changed
        partition's snapshot merged into the group state, new label values admitted."""
        for log in self.logs:
            if log.changed:
                log.changed = False
                self.group.add(self._snapshot(log))
        series = self.total.series
        if len(series) > self.series_seen:
            # New label values come with new series only (a window cell's come from facts
            # that made series too), and every value seen before was admitted or refused
            # for good: the new series' values are all there is to admit.
            found = series_label_values(islice(series, self.series_seen, None))
            self.series_seen = len(series)
            self.labels.admit({label: sorted(values) for label, values in found.items()})
        return GroupFigures(self.total, self.group.group_windows(), len(self.group.figures))

    def _snapshot(self, log: PartitionLog) -> Snapshot:
        partition = log.partition
        recent = log.windows.recent_closed(self.ledger.watermarks.get(partition),
                                           RECENT_WINDOWS)
        return Snapshot.of(partition, log.next_offset, NO_FIGURES, recent)

    def update(self) -> Changes:
        """The `/metrics/group` exposition now (in `self.exposition`), and what changed in
        it since the last update (only that is computed again)."""
        moved, self.moved = self.moved, set()
        return self.timeline.update(self.figures(), moved)

    @property
    def exposition(self) -> Exposition:
        return self.timeline.exposition

    def report(self) -> dict[str, Any]:
        """The replay report of everything applied (`replay` sums the same figures)."""
        docs = [{**self.total.to_json(), "windows": []}]
        for log in self.logs:
            cells = [*log.expired_cells.items(), *log.windows.cells.items()]
            docs.append({"windows": aggregate_rows(cells)})
        return build_report(Aggregate.sum_of(docs, self.settings.window_sizes_s),
                            self.report_size)

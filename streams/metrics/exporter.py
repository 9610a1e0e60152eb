"""Prometheus exposition: the group's KPI figures once, and each worker's own health.

Two expositions, scraped as two jobs (deploy/prometheus/prometheus.yml):

- `/metrics/group` (`render_group`): the KPI counters, histograms and window gauges of
  the whole consumer group, from the merged snapshots of every partition
  (streams/metrics/group.py). Only the exporter of the moment serves them; the others
  answer with an empty exposition. No KPI series carries `partition` or `worker`.
- `/metrics` (`build_registry`): what only this worker knows: its partitions, their lag,
  its recovery, the event-time lag it observed, whether it is the exporter.

Both read state and never change it; label values are bounded by `LabelBounds`, whose
admitted values are the group's (stored in the group topic), never one process's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from streams.core import kpis
from streams.core.annotations import priority
from streams.core.events import EVENT_TYPES, INVALID_REASONS
from streams.core.kpis import HISTOGRAM_BUCKETS, OUTCOMES, Aggregate
from streams.core.metric_labels import BOUNDED, DIMENSIONS, FIGURE_LABELS, METRICS, KpiMetric
from streams.core.windows import GAUGES, gauge_values, size_label
from streams.metrics.group import GroupWindow
from streams.metrics.openmetrics import escape_label_value

disable_created_metrics()  # *_created samples say nothing here and double the exposition

OTHER = "other"


@dataclass
class LabelBounds:
    """Bounded label values: an allow-list, else the values admitted so far, at most
    `limit` per label (first come, first kept: `admit` never gives a value back)."""

    limit: int = 50
    allowed: dict[str, frozenset[str]] = field(default_factory=dict)
    admitted: dict[str, list[str]] = field(default_factory=dict)

    def admit(self, found: dict[str, list[str]]) -> dict[str, list[str]]:
        """Admit the values of `found` that fit, in order; the newly admitted ones."""
        new: dict[str, list[str]] = {}
        for label, values in found.items():
            if label in self.allowed:
                continue
            mine = self.admitted.setdefault(label, [])
            held = set(mine)
            for value in values:
                if value in held or value == kpis.UNKNOWN or len(mine) >= self.limit:
                    continue
                mine.append(value)
                held.add(value)
                new.setdefault(label, []).append(value)
        return new

    def bound(self, label: str, value: str) -> str:
        if value == kpis.UNKNOWN:
            return value
        allowed = self.allowed.get(label)
        if allowed is not None:
            return value if value in allowed else OTHER
        return value if value in self.admitted.get(label, ()) else OTHER


PIPELINE: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("acsr_events", "Valid events counted, by type.", kpis.EVENT, "type", EVENT_TYPES),
    ("acsr_events_invalid", "Invalid messages sent to the dead-letter topic, by reason.",
     kpis.INVALID, "reason", INVALID_REASONS),
    ("acsr_events_late", "Events for an already closed window, by window size.", kpis.LATE,
     "window", ()),
    ("acsr_events_normalised", "Fields normalised (e.g. an unknown escalation reason).",
     kpis.NORMALISED, "field", ("reason",)),
    ("acsr_dead_letter_failed", "Invalid messages the dead-letter topic refused.",
     kpis.DEAD_LETTER_FAILED, "reason", ()),
    ("acsr_processing_errors", "Valid messages that failed processing (dead-lettered).",
     kpis.PROCESSING_ERROR, "reason", ()),
)

PIPELINE_UNLABELLED: tuple[tuple[str, str, str], ...] = (
    ("acsr_events_duplicate", "Events dropped as repeats of a counted event_id.",
     kpis.DUPLICATE),
    ("acsr_events_misrouted",
     "Valid events found on a partition that the configured partitioner (ACSR_PARTITIONER) "
     "does not give their case_id: the producers partition otherwise.", kpis.MISROUTED),
    ("acsr_case_spills", "Times a case's figures outgrew its record and moved to its "
     "partition's archive (a case with thousands of events: an agent in a loop?).",
     kpis.SPILLED),
)

# Label values every label set of a figure shows from the start (at 0).
ZERO_VALUES: dict[str, tuple[str, tuple[str, ...]]] = {
    kpis.CONCLUDED: ("outcome", OUTCOMES),
    kpis.POLICY_CHECK: ("result", ("passed", "failed")),
    kpis.THUMBS: ("vote", ("up", "down")),
}


@dataclass
class GroupFigures:
    """What `/metrics/group` shows: the group's totals and latest closed windows."""

    total: Aggregate
    windows: dict[int, GroupWindow] = field(default_factory=dict)
    partitions: int = 0  # partitions whose snapshots the totals hold


class GroupCollector(Collector):
    """The group's KPI families, once, without a partition label."""

    def __init__(self, figures: GroupFigures, bounds: LabelBounds,
                 drops: dict[str, frozenset[str]] | None = None) -> None:
        self.figures, self.bounds, self.drops = figures, bounds, drops or {}
        self._dims: dict[kpis.Dims, dict[str, str]] = {}

    def collect(self) -> Iterator:
        index = _by_figure(self.figures.total.series)
        for metric in METRICS:
            if metric.histogram:
                yield self._histogram(metric, index.get(metric.figure, ()))
            else:
                yield self._counter(metric, index.get(metric.figure, ()))
        yield from self.pipeline(self.figures.total)
        yield from self.windows()
        yield self.reporting()

    def reporting(self) -> GaugeMetricFamily:
        reporting = GaugeMetricFamily("acsr_group_partitions",
                                      "Partitions whose figures the group exposition holds.")
        reporting.add_metric((), self.figures.partitions)
        return reporting

    def kept(self, metric: KpiMetric) -> tuple[str, ...]:
        dropped = self.drops.get(metric.exported_name, frozenset())
        return tuple(label for label in metric.labels if label not in dropped)

    def exported_labels(self, metric: KpiMetric, labels: tuple[str, ...], dims: kpis.Dims,
                kept: tuple[str, ...]) -> tuple[str, ...]:
        bounded = self._dims.get(dims)
        if bounded is None:
            bounded = self._dims[dims] = {name: self.bounds.bound(name, value)
                                          for name, value in zip(DIMENSIONS, dims, strict=True)}
        values = dict(bounded)
        for name, value in zip(FIGURE_LABELS.get(metric.figure, ()), labels, strict=False):
            values[name] = self.bounds.bound(name, value) if name in BOUNDED else value
        if "priority" in kept:
            values["priority"] = str(priority(values["reason"]))
        return tuple(values[name] for name in kept)

    def _counter(self, metric: KpiMetric, series: Iterable[_Series]) -> CounterMetricFamily:
        kept = self.kept(metric)
        family = CounterMetricFamily(metric.name, metric.help, labels=kept)
        cells: dict[tuple[str, ...], float] = {}
        for labels, dims, (count, total) in series:
            key = self.exported_labels(metric, labels, dims, kept)
            cells[key] = cells.get(key, 0.0) + (total if metric.use_sum else count)
        zero = ZERO_VALUES.get(metric.figure)
        if zero is not None and zero[0] in kept:
            at = kept.index(zero[0])
            for key in list(cells):
                for value in zero[1]:
                    cells.setdefault((*key[:at], value, *key[at + 1:]), 0.0)
        for key, value in sorted(cells.items()):
            family.add_metric(key, value)
        return family

    def _histogram(self, metric: KpiMetric, series: Iterable[_Series]) -> HistogramMetricFamily:
        kept = self.kept(metric)
        family = HistogramMetricFamily(metric.name, metric.help, labels=kept)
        bounds = HISTOGRAM_BUCKETS[metric.figure]
        histograms = self.figures.total.histograms
        merged: dict[tuple[str, ...], tuple[list[int], float]] = {}
        for labels, dims, (_, observed_sum) in series:
            buckets = histograms[(metric.figure, labels, dims)]
            key = self.exported_labels(metric, labels, dims, kept)
            counts, total = merged.get(key, ([0] * len(buckets), 0.0))
            merged[key] = ([a + b for a, b in zip(counts, buckets, strict=True)],
                           total + observed_sum)
        for key, (counts, total) in sorted(merged.items()):
            cumulative, running = [], 0
            for bound, n in zip((*bounds, math.inf), counts, strict=True):
                running += n
                cumulative.append((le_label(bound), running))
            family.add_metric(key, cumulative, total)
        return family

    @staticmethod
    def pipeline(total: Aggregate) -> Iterator:
        for metric, help_text, name, label, known in PIPELINE:
            family = CounterMetricFamily(metric, help_text, labels=(label,))
            values = dict.fromkeys(known, 0)
            for (pname, plabel), n in total.pipeline.items():
                if pname == name:
                    values[plabel] = values.get(plabel, 0) + n
            for value, n in sorted(values.items()):
                family.add_metric((value,), n)
            yield family
        for metric, help_text, name in PIPELINE_UNLABELLED:
            family = CounterMetricFamily(metric, help_text)
            family.add_metric((), total.pipeline.get((name, ""), 0))
            yield family

    def windows(self) -> Iterator:
        """Gauges of the group's latest closed event-time window of each size."""
        labels = ("window", "intent", "agent_version")
        families = {kind: GaugeMetricFamily(metric, help_text, labels=labels)
                    for metric, help_text, kind in GAUGES}
        ends = GaugeMetricFamily(
            "acsr_window_end_timestamp_seconds",
            "End (epoch seconds, event time) of the group's latest closed window, the one "
            "the acsr_window_* gauges show: closed on every partition.", labels=("window",))
        for size, window in sorted(self.figures.windows.items()):
            groups: dict[tuple[str, str], list] = {}
            for (intent, version), cells in window.cells.items():
                group = (self.bounds.bound("intent", intent),
                         self.bounds.bound("agent_version", version))
                groups.setdefault(group, []).extend(cells)
            for group, members in sorted(groups.items()):
                for kind, value in gauge_values(members).items():
                    if value is not None:
                        families[kind].add_metric((size_label(size), *group), value)
            ends.add_metric((size_label(size),), window.end)
        yield from families.values()
        yield ends


def render_group(figures: GroupFigures, bounds: LabelBounds,
                 drops: dict[str, frozenset[str]] | None = None) -> bytes:
    """The `/metrics/group` exposition (rendered at a scrape after a change, kept as bytes)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GroupCollector(figures, bounds, drops))
    return generate_latest(registry)


@dataclass
class WorkerView:
    """What the worker's own exposition reads, as plain callables (testable without Faust)."""

    owned: Callable[[], set[int]] = set
    lag: Callable[[], dict[int, int]] = dict
    recovering: Callable[[], bool] = lambda: False
    exporting: Callable[[], bool] = lambda: False
    version: str = "0"
    app_id: str = ""
    cells_held: Callable[[], dict[int, int]] = dict  # window cells per owned partition
    render_s: Callable[[], float] = float  # the last rendering of the group's exposition


class WorkerCollector(Collector):
    """This worker's health: partitions, lag, recovery, its exporter role."""

    def __init__(self, view: WorkerView) -> None:
        self.view = view

    def collect(self) -> Iterator:
        view = self.view
        info = InfoMetricFamily("acsr_worker", "The worker's version and consumer group.")
        info.add_metric((), {"version": view.version, "app_id": view.app_id})
        yield info
        yield _gauge("acsr_worker_up", "1 while the worker runs.", 1)
        yield _gauge("acsr_table_recovery_in_progress",
                     "1 while tables are being recovered from changelogs.",
                     1 if view.recovering() else 0)
        yield _gauge("acsr_partitions_owned", "Events partitions this worker owns.",
                     len(view.owned()))
        yield _gauge("acsr_group_exporter", "1 while this worker serves the group's KPI "
                     "figures at /metrics/group (one worker of the group at a time).",
                     1 if view.exporting() else 0)
        yield _gauge("acsr_group_render_seconds", "How long this worker took to render the "
                     "group's exposition the last time figures changed (0: never rendered).",
                     view.render_s())
        yield _by_partition("acsr_consumer_lag_messages",
                            "Messages of the events topic not yet processed, by partition.",
                            view.lag())
        yield _by_partition("acsr_window_cells",
                            "Window cells held in the window tables, by partition.",
                            view.cells_held())


def _by_partition(name: str, help_text: str, values: dict[int, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=("partition",))
    for partition, value in sorted(values.items()):
        family.add_metric((str(partition),), value)
    return family


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text)
    family.add_metric((), value)
    return family


_Series = tuple[tuple[str, ...], kpis.Dims, list[float]]
_FigureIndex = dict[str, list[_Series]]


def _by_figure(series: dict[tuple[str, tuple[str, ...], kpis.Dims], list[float]]
               ) -> _FigureIndex:
    index: _FigureIndex = {}
    for (name, labels, dims), cell in series.items():
        index.setdefault(name, []).append((labels, dims, cell))
    return index


def le_label(bound: float) -> str:
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


EVENT_TIME_LAG_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)


def build_registry(view: WorkerView) -> tuple[CollectorRegistry, Histogram]:
    """The worker's own registry: its health and the event-time lag it observed."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(view))
    lag = Histogram("acsr_event_time_lag_seconds",
                    "Processing time minus event time, observed as events are processed.",
                    buckets=EVENT_TIME_LAG_BUCKETS, registry=registry)
    return registry, lag


def metric_sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """Sum of every sample of each named metric (e.g. `acsr_events_total`) in an
    exposition; a metric that is absent sums to 0."""
    sums = dict.fromkeys(names, 0.0)
    # Only the wanted samples' lines are parsed: a worker's exposition is large, and
    # parsing all of it at every scrape would slow the scrapes down.
    prefixes = tuple(f"{name}{end}" for name in names for end in ("{", " "))
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(prefixes))
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums


def merge_expositions(texts: Iterable[str]) -> str:
    """Sum samples with equal names and labels across workers' expositions."""
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            types.setdefault(family.name, family.type)
            helps.setdefault(family.name, family.documentation)
            merged = samples.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.type in ("gauge", "info", "unknown") and key in merged:
                    merged[key] = max(merged[key], sample.value)
                else:
                    merged[key] = merged.get(key, 0.0) + sample.value
    lines = []
    for name, merged in samples.items():
        lines.append(f"# HELP {name} {helps[name]}")
        lines.append(f"# TYPE {name} {types[name]}")
        for (sample_name, labels), value in merged.items():
            rendered = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{rendered}}} {_number(value)}" if rendered
                         else f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value == int(value) else repr(value)

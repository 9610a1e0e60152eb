"""Prometheus exposition: KPI counters and histograms read off the ledger's table state.

Every KPI series carries a `partition` label and is derived from that partition's
table state, so when a partition moves to another worker its series moves whole
(a new series, not a counter jump), and a restarted worker re-exposes exactly what
its tables hold. Sum away `partition` and `instance` in PromQL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
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
from streams.core.windows import GAUGES, Cell, WindowKey, gauge_values, size_label

disable_created_metrics()  # *_created samples say nothing here and double the exposition

DIMENSION_LABELS = ("intent", "channel", "agent_version")
OTHER = "other"


@dataclass
class LabelBounds:
    """Bounded label values: an allow-list, else the first `limit` distinct values seen."""

    limit: int = 50
    allowed: dict[str, frozenset[str]] = field(default_factory=dict)
    _admitted: dict[str, dict[str, None]] = field(default_factory=dict)

    def bound(self, label: str, value: str) -> str:
        allowed = self.allowed.get(label)
        if allowed is not None:
            return value if value in allowed or value == kpis.UNKNOWN else OTHER
        admitted = self._admitted.setdefault(label, {})
        if value in admitted or value == kpis.UNKNOWN:
            return value
        if len(admitted) < self.limit:
            admitted[value] = None
            return value
        return OTHER

    def dims(self, dims: kpis.Dims) -> tuple[str, str, str]:
        return tuple(self.bound(name, value) for name, value in zip(DIMENSION_LABELS, dims,
                                                                    strict=True))  # type: ignore[return-value]


# (metric name, help, figure, extra label names); value is the count unless `use_sum`.
_COUNTERS: tuple[tuple[str, str, str, tuple[str, ...], bool], ...] = (
    ("acsr_cases_concluded", "Cases concluded, by outcome.", kpis.CONCLUDED, ("outcome",), False),
    ("acsr_escalations", "Concluding escalations by reason code.", kpis.ESCALATION, ("reason",),
     False),
    ("acsr_policy_checks", "Policy checks by result.", kpis.POLICY_CHECK, ("result",), False),
    ("acsr_reopens", "Autonomous cases reopened within 24 h.", kpis.REOPENED, (), False),
    ("acsr_fcr_failures", "Autonomous cases reopened or re-engaged within 24 h.",
     kpis.FCR_FAILURE, (), False),
    ("acsr_thumbs", "Thumbs votes.", kpis.THUMBS, ("vote",), False),
    ("acsr_overridden_cases", "Cases with a human override (counted at the first).",
     kpis.OVERRIDDEN, (), False),
    ("acsr_cost_usd", "Every cost_usd as it arrives, in USD.", kpis.COST, (), True),
    ("acsr_case_cost_usd", "Case cost credited to its outcome at and after the conclusion.",
     kpis.CASE_COST, ("outcome",), True),
    ("acsr_actions", "Actions executed by result.", kpis.ACTION, ("action", "result"), False),
    ("acsr_suggestions_reviewed", "AI-drafted replies reviewed by a human.", kpis.SUGGESTION,
     ("adopted",), False),
    ("acsr_knowledge_flags", "Knowledge flagged by kind.", kpis.KNOWLEDGE, ("kind",), False),
    ("acsr_fallback_responses", "Safe fallback answers sent.", kpis.FALLBACK, (), False),
    ("acsr_annotation_routed", "Cases routed to the annotation queue, by reason and priority.",
     kpis.ANNOTATION, ("reason", "priority"), False),
)

_HISTOGRAMS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("acsr_handling_time_seconds", "Handling time of autonomous cases.", kpis.AHT, ()),
    ("acsr_csat_score", "CSAT scores (1-5).", kpis.CSAT, ()),
    ("acsr_ces_score", "CES scores (1-7, 7 = very easy).", kpis.CES, ()),
    ("acsr_response_latency_seconds", "Agent response latency.", kpis.RESPONSE_LATENCY, ()),
    ("acsr_evaluation_score", "Evaluation scores (0-1) by evaluation name.", kpis.EVALUATION,
     ("name",)),
)

_PIPELINE: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
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

_PIPELINE_UNLABELLED: tuple[tuple[str, str, str], ...] = (
    ("acsr_events_duplicate", "Events dropped as repeats of a counted event_id.",
     kpis.DUPLICATE),
    ("acsr_events_misrouted",
     "Valid events found on a partition that the configured partitioner (ACSR_PARTITIONER) "
     "does not give their case_id: the producers partition otherwise.", kpis.MISROUTED),
    ("acsr_case_spills", "Times a case's figures outgrew its record and moved to its "
     "partition's archive (a case with thousands of events: an agent in a loop?).",
     kpis.SPILLED),
)

_ZERO_LABELS = {
    kpis.CONCLUDED: [(o,) for o in OUTCOMES],
    kpis.POLICY_CHECK: [("passed",), ("failed",)],
    kpis.THUMBS: [("up",), ("down",)],
}


@dataclass
class WorkerView:
    """What the collector needs from a worker, as plain callables (testable without Faust)."""

    aggregates: Callable[[], dict[int, Aggregate]]
    lag: Callable[[], dict[int, int]] = dict
    recovering: Callable[[], bool] = lambda: False
    version: str = "0"
    app_id: str = ""
    # Per partition: window cells held, and per size the latest closed window's cells.
    windows: Callable[[], dict[int, tuple[int, dict[int, list[tuple[WindowKey, Cell]]]]]] = dict


class KpiCollector(Collector):
    """Builds every KPI family from the owned partitions' aggregates at scrape time."""

    def __init__(self, view: WorkerView, bounds: LabelBounds) -> None:
        self.view = view
        self.bounds = bounds

    def collect(self) -> Iterator:
        aggregates = self.view.aggregates()
        # One pass over each partition's series, then each family reads only its own.
        series = {p: _by_figure(agg.series) for p, agg in aggregates.items()}
        yield from self._counters(series)
        yield from self._histograms(aggregates, series)
        yield from self._pipeline(aggregates)
        yield from self._windows()
        yield from self._health(len(aggregates))

    def _bounded(self, name: str, labels: tuple[str, ...], extra: tuple[str, ...]
                 ) -> tuple[str, ...]:
        if name == kpis.ACTION:
            return (self.bounds.bound("action", labels[0]), labels[1])
        if name == kpis.ANNOTATION:  # priority follows from the reason: no extra series
            return (labels[0], str(priority(labels[0])))
        return labels[: len(extra)]

    def _counters(self, series: dict[int, _FigureIndex]) -> Iterator:
        for metric, help_text, figure, extra, use_sum in _COUNTERS:
            family = CounterMetricFamily(metric, help_text,
                                         labels=("partition", *DIMENSION_LABELS, *extra))
            for partition, by_figure in series.items():
                cells: dict[tuple[str, ...], float] = {}
                for labels, dims, (count, total) in by_figure.get(figure, ()):
                    key = (*self.bounds.dims(dims), *self._bounded(figure, labels, extra))
                    cells[key] = cells.get(key, 0.0) + (total if use_sum else count)
                    for zero in _ZERO_LABELS.get(figure, ()):
                        cells.setdefault((*key[:3], *zero), 0.0)
                for key, value in sorted(cells.items()):
                    family.add_metric((str(partition), *key), value)
            yield family

    def _histograms(self, aggregates: dict[int, Aggregate], series: dict[int, _FigureIndex]
                    ) -> Iterator:
        for metric, help_text, figure, extra in _HISTOGRAMS:
            bounds = HISTOGRAM_BUCKETS[figure]
            family = HistogramMetricFamily(metric, help_text,
                                           labels=("partition", *DIMENSION_LABELS, *extra))
            for partition, agg in aggregates.items():
                merged: dict[tuple[str, ...], tuple[list[int], float]] = {}
                for labels, dims, (_, observed_sum) in series[partition].get(figure, ()):
                    buckets = agg.histograms[(figure, labels, dims)]
                    label_key = (*self.bounds.dims(dims), *labels[: len(extra)])
                    counts, total = merged.get(label_key, ([0] * len(buckets), 0.0))
                    counts = [a + b for a, b in zip(counts, buckets, strict=True)]
                    merged[label_key] = (counts, total + observed_sum)
                for label_key, (counts, total) in sorted(merged.items()):
                    cumulative, running = [], 0
                    for bound, n in zip((*bounds, math.inf), counts, strict=True):
                        running += n
                        cumulative.append((_le(bound), running))
                    family.add_metric((str(partition), *label_key), cumulative, total)
            yield family

    def _pipeline(self, aggregates: dict[int, Aggregate]) -> Iterator:
        for metric, help_text, name, label, known in _PIPELINE:
            family = CounterMetricFamily(metric, help_text, labels=("partition", label))
            for partition, agg in aggregates.items():
                values = {value: 0 for value in known}
                for (pname, plabel), n in agg.pipeline.items():
                    if pname == name:
                        values[plabel] = values.get(plabel, 0) + n
                for value, n in sorted(values.items()):
                    family.add_metric((str(partition), value), n)
            yield family
        for metric, help_text, name in _PIPELINE_UNLABELLED:
            family = CounterMetricFamily(metric, help_text, labels=("partition",))
            for partition, agg in aggregates.items():
                family.add_metric((str(partition),), agg.pipeline.get((name, ""), 0))
            yield family

    def _windows(self) -> Iterator:
        """Gauges of the latest closed event-time window of each size, per partition."""
        labels = ("partition", "window", "intent", "agent_version")
        families = {kind: GaugeMetricFamily(metric, help_text, labels=labels)
                    for metric, help_text, kind in GAUGES}
        ends = GaugeMetricFamily(
            "acsr_window_end_timestamp_seconds",
            "End (epoch seconds, event time) of the closed window the acsr_window_* gauges "
            "show.", labels=labels)
        held = GaugeMetricFamily("acsr_window_cells",
                                 "Window cells held in the window tables, by partition.",
                                 labels=("partition",))
        for partition, (cells_held, latest) in sorted(self.view.windows().items()):
            held.add_metric((str(partition),), cells_held)
            for size, cells in latest.items():
                groups: dict[tuple[str, str], list[Cell]] = {}
                for key, cell in cells:
                    group = (self.bounds.bound("intent", key.intent),
                             self.bounds.bound("agent_version", key.agent_version))
                    groups.setdefault(group, []).append(cell)
                for group, members in sorted(groups.items()):
                    label_values = (str(partition), size_label(size), *group)
                    for kind, value in gauge_values(members).items():
                        if value is not None:
                            families[kind].add_metric(label_values, value)
                    ends.add_metric(label_values, cells[0][0].end)
        yield from families.values()
        yield ends
        yield held

    def _health(self, owned_partitions: int) -> Iterator:
        info = InfoMetricFamily("acsr_worker", "The worker's version and consumer group.")
        info.add_metric((), {"version": self.view.version, "app_id": self.view.app_id})
        yield info
        up = GaugeMetricFamily("acsr_worker_up", "1 while the worker runs.")
        up.add_metric((), 1)
        yield up
        recovering = GaugeMetricFamily("acsr_table_recovery_in_progress",
                                       "1 while tables are being recovered from changelogs.")
        recovering.add_metric((), 1 if self.view.recovering() else 0)
        yield recovering
        lag = GaugeMetricFamily("acsr_consumer_lag_messages",
                                "Messages of the events topic not yet processed, by partition.",
                                labels=("partition",))
        for partition, value in sorted(self.view.lag().items()):
            lag.add_metric((str(partition),), value)
        yield lag
        owned = GaugeMetricFamily("acsr_partitions_owned", "Events partitions this worker owns.")
        owned.add_metric((), owned_partitions)
        yield owned


_FigureIndex = dict[str, list[tuple[tuple[str, ...], kpis.Dims, list[float]]]]


def _by_figure(series: dict[tuple[str, tuple[str, ...], kpis.Dims], list[float]]
               ) -> _FigureIndex:
    index: _FigureIndex = {}
    for (name, labels, dims), cell in series.items():
        index.setdefault(name, []).append((labels, dims, cell))
    return index


def _le(bound: float) -> str:
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


EVENT_TIME_LAG_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)


def build_registry(view: WorkerView, bounds: LabelBounds) -> tuple[CollectorRegistry, Histogram]:
    """A registry with the KPI collector and the process-local event-time lag histogram."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KpiCollector(view, bounds))
    lag = Histogram("acsr_event_time_lag_seconds",
                    "Processing time minus event time, observed as events are processed.",
                    buckets=EVENT_TIME_LAG_BUCKETS, registry=registry)
    return registry, lag


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
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{rendered}}} {_number(value)}" if rendered
                         else f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value == int(value) else repr(value)

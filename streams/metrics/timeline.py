"""The group's exposition at moment after moment, recomputing only what changed.

`GroupCollector` renders every series from the whole aggregate: right for a scrape, too
slow for a backfill that needs the exposition at every step of months of event time (a
few thousand series, most unchanged from one step to the next). `GroupTimeline` keeps the
KPI families' values by metric and, at each moment, recomputes only the metrics whose
aggregate series moved, each from all its series in the collector's order, so every
value is bit for bit what the collector would show (a test holds them together). The
small families (pipeline counters, window gauges) are collected whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any, NamedTuple

from streams.core import kpis
from streams.core.kpis import HISTOGRAM_BUCKETS
from streams.core.metric_labels import METRICS, KpiMetric
from streams.metrics.exporter import (
    ZERO_VALUES,
    GroupCollector,
    GroupFigures,
    LabelBounds,
    le_label,
)
from streams.metrics.openmetrics import Changes, Exposition, Frames, Header, Values

SeriesKey = tuple[str, tuple[str, ...], kpis.Dims]  # an aggregate's (figure, labels, dims)
Target = tuple[str, tuple[str, ...]]  # an exported metric: (family name, label values)


class _Sample(NamedTuple):
    """The layout of one sample line, as `Frames.metric_id` reads it."""

    name: str
    labels: dict[str, str]


class GroupTimeline:
    """Frames of the group's exposition, kept up to date (see the module doc)."""

    def __init__(self, bounds: LabelBounds, drops: dict[str, frozenset[str]],
                 frames: Frames) -> None:
        self.bounds, self.drops, self.frames = bounds, drops, frames
        self.by_figure = {metric.figure: metric for metric in METRICS}
        self.by_name = {metric.name: metric for metric in METRICS}
        self.known = 0  # aggregate series placed so far (in the aggregate's order)
        self.counts: dict[SeriesKey, float] = {}  # each series' count when last seen
        self.target: dict[SeriesKey, Target] = {}
        self.members: dict[Target, list[SeriesKey]] = {}  # in the aggregate's order
        self.ids: dict[Target, int] = {}
        self.exposition = Exposition()  # every metric's values now, and what changed
        self.small: set[int] = set()  # ids of the small families' metrics now
        self.windows_key: tuple[Any, ...] = ()
        self.windows_metrics: list[tuple[int, Values]] = []

    def update(self, figures: GroupFigures, moved: Iterable[SeriesKey] | None = None
               ) -> Changes:
        """The exposition of `figures` (in `exposition`), and what changed since the last
        call (the aggregate only grows: series are added and their counters go up).
        `moved` names the series that changed, if the caller knows; else every one is
        checked."""
        collector = GroupCollector(figures, self.bounds, self.drops)
        if not self.known:
            self._headers(collector)
        total = figures.total
        if len(total.series) > self.known:
            for key in islice(total.series, self.known, None):
                self._place(collector, key)
            self.known = len(total.series)
        targets = self.target
        if moved is None:
            moved = [key for key, cell in total.series.items()
                     if self.counts.get(key) != cell[0]]
            self.counts.update((key, total.series[key][0]) for key in moved)
        for target in {targets[key] for key in moved if key in targets}:
            self._recompute(target, figures)
        small = self._small_metrics(collector)
        exposition = self.exposition
        for metric_id, values in small:
            exposition.set(metric_id, values)
        now = {metric_id for metric_id, _ in small}
        for metric_id in self.small - now:
            exposition.remove(metric_id)
        self.small = now
        return exposition.take()

    def _headers(self, collector: GroupCollector) -> None:
        """Every family's header, in the collector's order (the chunks follow it)."""
        for family in collector.collect():
            self.frames.header(family.name, family.type, family.documentation, family.unit)

    def _small_metrics(self, collector: GroupCollector) -> list[tuple[int, Values]]:
        """The pipeline counters and the partitions gauge, and the window gauges again
        only if the group's latest closed windows (or the admitted labels) changed: a
        closed window never changes, so the same windows show the same figures."""
        figures = collector.figures
        windows_key = (tuple((size, window.start) for size, window in
                             sorted(figures.windows.items())),
                       figures.partitions,
                       tuple(len(values) for values in self.bounds.admitted.values()))
        if windows_key != self.windows_key:
            self.windows_key = windows_key
            self.windows_metrics = list(self.frames.of(collector.windows()).metrics)
        rest = self.frames.of([*collector.pipeline(figures.total), collector.reporting()])
        return [*rest.metrics, *self.windows_metrics]

    def _place(self, collector: GroupCollector, key: SeriesKey) -> None:
        """A new aggregate series: the exported metric it adds to (and, for a counter with
        zero values, that metric's siblings, shown at 0 from now on)."""
        figure, labels, dims = key
        metric = self.by_figure.get(figure)
        if metric is None:
            return
        kept = collector.kept(metric)
        values = collector.exported_labels(metric, labels, dims, kept)
        target = (metric.name, values)
        self.target[key] = target
        self._add_target(metric, kept, target).append(key)
        zero = ZERO_VALUES.get(figure)
        if zero is not None and zero[0] in kept and not metric.histogram:
            at = kept.index(zero[0])
            for value in zero[1]:
                self._add_target(metric, kept, (metric.name, (*values[:at], value,
                                                              *values[at + 1:])))

    def _add_target(self, metric: KpiMetric, kept: tuple[str, ...], target: Target
                    ) -> list[SeriesKey]:
        members = self.members.get(target)
        if members is not None:
            return members
        members = self.members[target] = []
        header = self.frames.headers[metric.name]
        labels = dict(zip(kept, target[1], strict=True))
        if metric.histogram:
            bounds = (*HISTOGRAM_BUCKETS[metric.figure], float("inf"))
            samples = [*(_Sample(f"{metric.name}_bucket", {**labels, "le": le_label(bound)})
                         for bound in bounds),
                       _Sample(f"{metric.name}_count", labels),
                       _Sample(f"{metric.name}_sum", labels)]
            zero: tuple[float, ...] = (0,) * len(bounds) + (0, 0.0)
        else:
            samples = [_Sample(f"{metric.name}_total", labels)]
            zero = (0.0,)
        metric_id = self.ids[target] = self.frames.metric_id(header, tuple(labels.items()),
                                                             samples)
        self.exposition.set(metric_id, zero)
        return members

    def _recompute(self, target: Target, figures: GroupFigures) -> None:
        """The metric's values from all its series, summed as `GroupCollector` sums them."""
        metric = self.by_name[target[0]]
        total = figures.total
        members = self.members[target]
        if metric.histogram:
            histograms = total.histograms
            counts = [0] * (len(HISTOGRAM_BUCKETS[metric.figure]) + 1)
            observed = 0.0
            for key in members:
                counts = [a + b for a, b in zip(counts, histograms[key], strict=True)]
                observed = observed + total.series[key][1]
            cumulative, running = [], 0
            for n in counts:
                running += n
                cumulative.append(running)
            values: tuple[float, ...] = (*cumulative, running, observed)
        else:
            value = 0.0
            for key in members:
                count, amount = total.series[key]
                value = value + (amount if metric.use_sum else count)
            values = (value,)
        metric_id = self.ids[target]
        self.exposition.set(metric_id, self.frames.shared(metric_id, values))


__all__ = ["GroupTimeline", "Header"]

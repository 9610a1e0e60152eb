"""KPI accounting: facts, their aggregation, and the figures of docs/kpis.md.

A *fact* is one increment of one figure, with the case's dimensions as known when
it was counted. Facts are kept in the case's state (so one table write carries an
event's whole effect) and summed into an `Aggregate` per partition; the replay
report and the Prometheus exposition are both read off aggregates, so they agree.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from streams.core.events import format_ts

UNKNOWN = "unknown"

# Figure names: one per kind of increment.
CONCLUDED = "concluded"  # labels: (outcome,)
ESCALATION = "escalation"  # (reason,)
AHT = "aht"  # value: seconds
POLICY_CHECK = "policy_check"  # (result,) passed | failed
REOPENED = "reopened"
FCR_FAILURE = "fcr_failure"
CSAT = "csat"  # value: score
CES = "ces"  # value: score
THUMBS = "thumbs"  # (vote,)
OVERRIDDEN = "overridden"
COST = "cost"  # value: USD
CASE_COST = "case_cost"  # (outcome,) value: USD
RESPONSE_LATENCY = "response_latency"  # value: seconds
FALLBACK = "fallback"
EVALUATION = "evaluation"  # (name,) value: score
ACTION = "action"  # (action, result) success | failure
SUGGESTION = "suggestion"  # (adopted,) true | false
KNOWLEDGE = "knowledge"  # (kind,)
ANNOTATION = "annotation"  # (reason,)

WINDOWED = frozenset({CONCLUDED, AHT, POLICY_CHECK})

# Pipeline counters (no case dimensions).
EVENT = "event"  # label: type
DUPLICATE = "duplicate"
INVALID = "invalid"  # label: reason
LATE = "late"  # label: window size in seconds
NORMALISED = "normalised"  # label: field name
PROCESSING_ERROR = "processing_error"  # label: the error's reason (messages dead-lettered)
DEAD_LETTER_FAILED = "dead_letter_failed"  # label: reason of a message the DLQ refused
MISROUTED = "misrouted"  # valid events on a partition the configured partitioner does not give
SPILLED = "spilled"  # a large case's figures moved to its partition's archive (bounded state)

OUTCOMES = ("autonomous", "unverified", "human", "escalated")

# Histogram bucket upper bounds (the +Inf bucket is implicit).
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    AHT: (15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200, 14400, 86400),
    CSAT: (1, 2, 3, 4, 5),
    CES: (1, 2, 3, 4, 5, 6, 7),
    RESPONSE_LATENCY: (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
    EVALUATION: (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1),
}

Dims = tuple[str, str, str]


class Fact(NamedTuple):
    """One increment: `value` is 1 for counts, the measured amount otherwise."""

    name: str
    labels: tuple[str, ...]
    value: float
    dims: Dims
    ts_us: int | None = None  # event time of the trigger, for windowed figures
    late: tuple[int, ...] = ()  # window sizes (s) whose window had closed

    def to_json(self) -> list[Any]:
        return [self.name, list(self.labels), self.value, list(self.dims), self.ts_us,
                list(self.late)]

    @classmethod
    def from_json(cls, item: list[Any]) -> Fact:
        name, labels, value, dims, ts_us, late = item
        return cls(name, tuple(labels), value, tuple(dims), ts_us, tuple(late))


def window_start(ts_us: int, size_s: int) -> int:
    """Start (epoch seconds) of the UTC-aligned tumbling window holding `ts_us`."""
    return (ts_us // 1_000_000) // size_s * size_s


def bucket_index(bounds: tuple[float, ...], value: float) -> int:
    """The first bucket whose upper bound holds `value` (the last, +Inf, for NaN)."""
    return bisect_left(bounds, value) if value == value else len(bounds)


@dataclass
class Aggregate:
    """Sums of facts: counters by figure, labels and dimensions; histograms. `windows`
    carries the window tables' rows to the report (`replay` sums the workers' /kpis/);
    facts are never windowed here (streams/worker/window_tables.py does that)."""

    window_sizes: tuple[int, ...] = ()  # the sizes of the rows in `windows`
    series: dict[tuple[str, tuple[str, ...], Dims], list[float]] = field(default_factory=dict)
    histograms: dict[tuple[str, tuple[str, ...], Dims], list[int]] = field(default_factory=dict)
    windows: dict[tuple[int, int, str, tuple[str, ...]], list[float]] = field(
        default_factory=dict
    )
    pipeline: dict[tuple[str, str], int] = field(default_factory=dict)

    def add_fact(self, fact: Fact) -> None:
        name, labels, value, dims, _, _ = fact
        key = (name, labels, dims)
        cell = self.series.get(key)
        if cell is None:
            self.series[key] = [1, value]
        else:
            cell[0] += 1
            cell[1] += value
        bounds = HISTOGRAM_BUCKETS.get(name)
        if bounds is not None:
            buckets = self.histograms.get(key)
            if buckets is None:
                buckets = self.histograms[key] = [0] * (len(bounds) + 1)
            buckets[bucket_index(bounds, value)] += 1

    def add_facts(self, facts: Iterable[Fact]) -> None:
        for fact in facts:
            self.add_fact(fact)

    def count(self, name: str, label: str = "", n: int = 1) -> None:
        key = (name, label)
        self.pipeline[key] = self.pipeline.get(key, 0) + n

    def add_pipeline(self, counts: dict[str, int]) -> None:
        pipeline = self.pipeline
        for key, n in counts.items():
            name, _, label = key.partition("/")
            cell = (name, label)
            pipeline[cell] = pipeline.get(cell, 0) + n

    def merge(self, other: Aggregate, combine: Callable[[float, float], float] = operator.add
              ) -> None:
        """Add `other` in; with `combine=max`, keep the larger of each counter instead
        (the group's view of one partition's snapshots, streams/metrics/group.py)."""
        for key, (count, total) in other.series.items():
            cell = self.series.setdefault(key, [0, 0.0])
            cell[0], cell[1] = combine(cell[0], count), combine(cell[1], total)
        for key, buckets in other.histograms.items():
            mine = self.histograms.setdefault(key, [0] * len(buckets))
            for index, n in enumerate(buckets):
                mine[index] = combine(mine[index], n)
        for key, (count, total) in other.windows.items():
            cell = self.windows.setdefault(key, [0, 0.0])
            cell[0], cell[1] = combine(cell[0], count), combine(cell[1], total)
        for key, n in other.pipeline.items():
            self.pipeline[key] = combine(self.pipeline.get(key, 0), n)

    def to_json(self) -> dict[str, Any]:
        return {
            "window_sizes": list(self.window_sizes),
            "series": [[n, list(lb), list(d), c, s] for (n, lb, d), (c, s) in self.series.items()],
            "histograms": [[n, list(lb), list(d), b] for (n, lb, d), b in self.histograms.items()],
            "windows": [
                [z, st, n, list(lb), c, s] for (z, st, n, lb), (c, s) in self.windows.items()
            ],
            "pipeline": [[n, lb, c] for (n, lb), c in self.pipeline.items()],
        }

    @classmethod
    def sum_of(cls, docs: Iterable[dict[str, Any]], window_sizes: tuple[int, ...]) -> Aggregate:
        """One aggregate from several partitions' JSON aggregates (e.g. workers' /kpis/)."""
        total = cls(window_sizes=window_sizes)
        for doc in docs:
            total.merge(cls.from_json(doc))
        return total

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Aggregate:
        agg = cls(window_sizes=tuple(doc.get("window_sizes", (3600,))))
        for n, lb, d, c, s in doc.get("series", ()):
            agg.series[(n, tuple(lb), tuple(d))] = [c, s]
        for n, lb, d, b in doc.get("histograms", ()):
            agg.histograms[(n, tuple(lb), tuple(d))] = list(b)
        for z, st, n, lb, c, s in doc.get("windows", ()):
            agg.windows[(z, st, n, tuple(lb))] = [c, s]
        for n, lb, c in doc.get("pipeline", ()):
            agg.pipeline[(n, lb)] = c
        return agg


# --- figures --------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float) -> float | None:
    """A ratio, or None where its denominator is zero (the report's `null`)."""
    return numerator / denominator if denominator else None


def _mean(cell: list[float]) -> float | None:
    return ratio(cell[1], cell[0])


class _Sums:
    """Counts and sums of one group of series, by figure and labels."""

    def __init__(self, items: Iterable[tuple[str, tuple[str, ...], list[float]]]) -> None:
        self.cells: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        for name, labels, (count, total) in items:
            cell = self.cells.setdefault((name, labels), [0, 0.0])
            cell[0] += count
            cell[1] += total

    def cell(self, name: str, *labels: str | None) -> list[float]:
        """Count and sum of `name` over its labels tuples that match `labels` position by
        position (`None` matches any value; missing trailing labels match anything)."""
        out = [0, 0.0]
        for (cname, clabels), (count, total) in self.cells.items():
            if cname == name and all(
                want is None or want == have for want, have in zip(labels, clabels, strict=False)
            ):
                out[0] += count
                out[1] += total
        return out

    def n(self, name: str, *labels: str | None) -> int:
        return int(self.cell(name, *labels)[0])

    def total(self, name: str, *labels: str) -> float:
        return self.cell(name, *labels)[1]

    def by_label(self, name: str) -> Iterator[tuple[str, list[float]]]:
        grouped: dict[str, list[float]] = {}
        for (cname, labels), (count, total) in self.cells.items():
            if cname == name:
                cell = grouped.setdefault(labels[0], [0, 0.0])
                cell[0] += count
                cell[1] += total
        return iter(sorted(grouped.items()))


def figures(items: Iterable[tuple[str, tuple[str, ...], list[float]]]) -> dict[str, Any]:
    """Every KPI of docs/kpis.md from (figure, labels, [count, sum]) items."""
    s = _Sums(items)
    concluded = s.n(CONCLUDED)
    autonomous = s.n(CONCLUDED, "autonomous")
    escalated = s.n(CONCLUDED, "escalated")
    aht = s.cell(AHT)
    checks, passed = s.n(POLICY_CHECK), s.n(POLICY_CHECK, "passed")
    fcr_failures = s.n(FCR_FAILURE)
    overridden = s.n(OVERRIDDEN)
    cost_autonomous = s.total(CASE_COST, "autonomous")
    reviewed, adopted = s.n(SUGGESTION), s.n(SUGGESTION, "true")
    actions = s.n(ACTION)
    return {
        "cases_concluded": concluded,
        **{outcome: s.n(CONCLUDED, outcome) for outcome in OUTCOMES},
        "arr": ratio(autonomous, concluded),
        "escalation_rate": ratio(escalated, concluded),
        "escalations_by_reason": {r: int(c[0]) for r, c in s.by_label(ESCALATION)},
        "aht_seconds_mean": _mean(aht),
        "aht_count": int(aht[0]),
        "policy_checks": checks,
        "policy_checks_passed": passed,
        "compliance_score": ratio(passed, checks),
        "reopened_24h": s.n(REOPENED),
        "fcr_failures_24h": fcr_failures,
        "fcr": ratio(autonomous - fcr_failures, autonomous),
        "csat_count": s.n(CSAT),
        "csat_mean": _mean(s.cell(CSAT)),
        "ces_count": s.n(CES),
        "ces_mean": _mean(s.cell(CES)),
        "thumbs_up": s.n(THUMBS, "up"),
        "thumbs_down": s.n(THUMBS, "down"),
        "overridden_cases": overridden,
        "override_rate": ratio(overridden, concluded),
        "cost_usd_total": s.total(COST),
        "cost_usd_autonomous": cost_autonomous,
        "cost_per_autonomous_resolution": ratio(cost_autonomous, autonomous),
        "response_latency_seconds_mean": _mean(s.cell(RESPONSE_LATENCY)),
        "fallback_responses": s.n(FALLBACK),
        "evaluations_by_name": {
            name: {"count": int(c[0]), "mean": _mean(c)} for name, c in s.by_label(EVALUATION)
        },
        "actions": actions,
        "actions_failed": s.n(ACTION, None, "failure"),
        "suggestions_reviewed": reviewed,
        "suggestions_adopted": adopted,
        "adoption_rate": ratio(adopted, reviewed),
        "knowledge_irrelevant": s.n(KNOWLEDGE, "irrelevant"),
        "knowledge_missing": s.n(KNOWLEDGE, "missing"),
        "annotation_routed": {r: int(c[0]) for r, c in s.by_label(ANNOTATION)},
    }


def window_items(agg: Aggregate, size: int) -> list[dict[str, Any]]:
    """The report's window rows: windows with at least one conclusion or policy check."""
    by_start: dict[int, list[tuple[str, tuple[str, ...], list[float]]]] = {}
    for (wsize, start, name, labels), cell in agg.windows.items():
        if wsize == size:
            by_start.setdefault(start, []).append((name, labels, cell))
    rows = []
    for start in sorted(by_start):
        s = _Sums(by_start[start])
        concluded, checks = s.n(CONCLUDED), s.n(POLICY_CHECK)
        if not concluded and not checks:
            continue
        autonomous, passed = s.n(CONCLUDED, "autonomous"), s.n(POLICY_CHECK, "passed")
        rows.append(
            {
                "start": format_ts(start * 1_000_000),
                "cases_concluded": concluded,
                "autonomous": autonomous,
                "escalated": s.n(CONCLUDED, "escalated"),
                "arr": ratio(autonomous, concluded),
                "policy_checks": checks,
                "policy_checks_passed": passed,
                "compliance_score": ratio(passed, checks),
                "aht_seconds_mean": _mean(s.cell(AHT)),
            }
        )
    return rows


def _group(agg: Aggregate, dim: int) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[tuple[str, tuple[str, ...], list[float]]]] = {}
    for (name, labels, dims), cell in agg.series.items():
        groups.setdefault(dims[dim], []).append((name, labels, cell))
    return {key: figures(items) for key, items in sorted(groups.items())}


def build_report(agg: Aggregate, window_size: int = 3600) -> dict[str, Any]:
    """The replay report of docs/kpis.md from the sum of every partition's aggregate."""
    by_type = {lb: n for (name, lb), n in agg.pipeline.items() if name == EVENT and n}
    invalid = {lb: n for (name, lb), n in agg.pipeline.items() if name == INVALID and n}
    report = {
        "events": {
            "valid": sum(by_type.values()),
            "invalid": sum(invalid.values()),
            "duplicate": agg.pipeline.get((DUPLICATE, ""), 0),
            "misrouted": agg.pipeline.get((MISROUTED, ""), 0),
            "by_type": dict(sorted(by_type.items())),
            "invalid_by_reason": dict(sorted(invalid.items())),
        },
        "totals": figures((n, lb, c) for (n, lb, _), c in agg.series.items()),
        "by_intent": _group(agg, 0),
        "by_agent_version": _group(agg, 2),
        "windows": {"size_seconds": window_size, "items": window_items(agg, window_size)},
    }
    return _finite(report)


def _finite(value: Any) -> Any:
    """Ratios are never NaN or infinite in a report; guard the JSON anyway."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value

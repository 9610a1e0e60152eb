"""The label set of every KPI metric: which labels, why, and how many series at worst.

One table serves the exporter (what it renders), the settings (which labels an operator
may drop, `ACSR_METRIC_LABELS_DROP`) and docs/kpis.md (the worst-case series). No label
grows with the deployment: there is no `partition` or `worker` label on a KPI metric.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.core import kpis
from streams.core.annotations import REASONS as ANNOTATION_REASONS
from streams.core.events import ESCALATION_REASONS

DIMENSIONS = ("intent", "channel", "agent_version")
# Labels whose values come from producers: bounded by an allow-list or the first
# `label_limit` values the group exports (then `other`); `unknown` is always kept.
BOUNDED = ("intent", "channel", "agent_version", "action", "name")


@dataclass(frozen=True)
class KpiMetric:
    """One exported KPI family: its name (without `_total`), the figure it reads, the
    labels it keeps (in order) and the labels the contract requires it to keep."""

    name: str
    help: str
    figure: str
    labels: tuple[str, ...]
    required: tuple[str, ...]
    histogram: bool = False
    use_sum: bool = False  # a counter of amounts (USD), not of increments
    why: str = ""

    @property
    def exported_name(self) -> str:
        return self.name if self.histogram else f"{self.name}_total"


# The figure's own labels, in the order the core's facts carry them.
FIGURE_LABELS: dict[str, tuple[str, ...]] = {
    kpis.CONCLUDED: ("outcome",), kpis.ESCALATION: ("reason",), kpis.POLICY_CHECK: ("result",),
    kpis.THUMBS: ("vote",), kpis.CASE_COST: ("outcome",), kpis.ACTION: ("action", "result"),
    kpis.SUGGESTION: ("adopted",), kpis.KNOWLEDGE: ("kind",), kpis.ANNOTATION: ("reason",),
    kpis.EVALUATION: ("name",),
}

_DIMS = DIMENSIONS
_HIST = ("intent", "agent_version")

METRICS: tuple[KpiMetric, ...] = (
    KpiMetric("acsr_cases_concluded", "Cases concluded, by outcome.", kpis.CONCLUDED,
              (*_DIMS, "outcome"), (*_DIMS, "outcome"),
              why="ARR, escalation and override rates by every dimension"),
    KpiMetric("acsr_escalations", "Concluding escalations by reason code.", kpis.ESCALATION,
              (*_DIMS, "reason"), (*_DIMS, "reason"), why="why the agent escalates"),
    KpiMetric("acsr_policy_checks", "Policy checks by result.", kpis.POLICY_CHECK,
              (*_DIMS, "result"), (*_DIMS, "result"), why="the compliance SLO and its alerts"),
    KpiMetric("acsr_reopens", "Autonomous cases reopened within 24 h.", kpis.REOPENED,
              _DIMS, _DIMS, why="false resolutions"),
    KpiMetric("acsr_fcr_failures", "Autonomous cases reopened or re-engaged within 24 h.",
              kpis.FCR_FAILURE, _DIMS, _DIMS, why="first-contact resolution"),
    KpiMetric("acsr_thumbs", "Thumbs votes.", kpis.THUMBS, (*_DIMS, "vote"), (*_DIMS, "vote"),
              why="customer feedback"),
    KpiMetric("acsr_overridden_cases", "Cases with a human override (counted at the first).",
              kpis.OVERRIDDEN, _DIMS, _DIMS, why="override rate"),
    KpiMetric("acsr_cost_usd", "Every cost_usd as it arrives, in USD.", kpis.COST, _DIMS, _DIMS,
              use_sum=True, why="spend"),
    KpiMetric("acsr_case_cost_usd", "Case cost credited to its outcome at and after the "
              "conclusion.", kpis.CASE_COST, (*_DIMS, "outcome"), (*_DIMS, "outcome"),
              use_sum=True, why="cost per autonomous resolution"),
    KpiMetric("acsr_actions", "Actions executed by result.", kpis.ACTION,
              (*_DIMS, "action", "result"), (*_DIMS, "result"),
              why="which tools fail; `action` may be dropped"),
    KpiMetric("acsr_suggestions_reviewed", "AI-drafted replies reviewed by a human.",
              kpis.SUGGESTION, (*_DIMS, "adopted"), (*_DIMS, "adopted"), why="adoption rate"),
    KpiMetric("acsr_knowledge_flags", "Knowledge flagged by kind.", kpis.KNOWLEDGE,
              (*_DIMS, "kind"), (*_DIMS, "kind"), why="knowledge gaps"),
    KpiMetric("acsr_fallback_responses", "Safe fallback answers sent.", kpis.FALLBACK,
              _DIMS, _DIMS, why="fallback rate"),
    KpiMetric("acsr_annotation_routed", "Cases routed to the annotation queue, by reason and "
              "priority.", kpis.ANNOTATION, (*_DIMS, "reason", "priority"), (*_DIMS, "reason"),
              why="review load; `priority` follows from `reason` (no extra series)"),
    KpiMetric("acsr_handling_time_seconds", "Handling time of autonomous cases.", kpis.AHT,
              _HIST, _HIST, histogram=True,
              why="AHT quantiles per intent and version; channel is in the counters"),
    KpiMetric("acsr_csat_score", "CSAT scores (1-5).", kpis.CSAT, _HIST, _HIST, histogram=True,
              why="CSAT mean and distribution"),
    KpiMetric("acsr_ces_score", "CES scores (1-7, 7 = very easy).", kpis.CES, _HIST, _HIST,
              histogram=True, why="CES mean and distribution"),
    KpiMetric("acsr_response_latency_seconds", "Agent response latency.", kpis.RESPONSE_LATENCY,
              _HIST, _HIST, histogram=True, why="latency quantiles per intent and version"),
    KpiMetric("acsr_evaluation_score", "Evaluation scores (0-1) by evaluation name.",
              kpis.EVALUATION, (*_HIST, "name"), (*_HIST, "name"), histogram=True,
              why="quality scores per evaluator"),
)

BY_NAME = {metric.exported_name: metric for metric in METRICS}

# Values a fixed label can take (for the worst-case series count).
FIXED_VALUES: dict[str, int] = {
    "outcome": len(kpis.OUTCOMES), "reason": len(ESCALATION_REASONS) + 1, "result": 2,
    "vote": 2, "adopted": 2, "kind": 2, "priority": 1,
}
ANNOTATION_REASON_COUNT = len(ANNOTATION_REASONS)


def worst_case_series(metric: KpiMetric, limit: int) -> int:
    """Series of `metric` at most: a bounded label has `limit` values plus `unknown` and
    `other`; a histogram's series are its buckets, +Inf, `_sum` and `_count`."""
    series = 1
    for label in metric.labels:
        if label in BOUNDED:
            series *= limit + 2
        elif metric.figure == kpis.ANNOTATION and label == "reason":
            series *= ANNOTATION_REASON_COUNT
        else:
            series *= FIXED_VALUES.get(label, 1)
    if metric.histogram:
        series *= len(kpis.HISTOGRAM_BUCKETS[metric.figure]) + 3
    return series


def parse_drops(raw: str) -> dict[str, frozenset[str]]:
    """`metric:label,metric:label` (ACSR_METRIC_LABELS_DROP): labels an operator drops
    from a metric, its series summed over them. A label the contract requires, or a
    metric or label that does not exist, is refused with what to write instead."""
    drops: dict[str, set[str]] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, label = item.partition(":")
        metric = BY_NAME.get(name.strip())
        if not sep or metric is None:
            raise ValueError(f"{item!r} is not metric:label with a KPI metric of "
                             f"{sorted(BY_NAME)}")
        label = label.strip()
        optional = [lb for lb in metric.labels if lb not in metric.required]
        if label not in optional:
            raise ValueError(f"{item!r}: {metric.exported_name} can drop only "
                             f"{optional or 'no label'} (the contract requires "
                             f"{list(metric.required)})")
        drops.setdefault(metric.exported_name, set()).add(label)
    return {name: frozenset(labels) for name, labels in drops.items()}

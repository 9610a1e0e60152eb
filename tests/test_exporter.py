"""The expositions: label bounds, label sets per metric, and how figures map to metrics
(no broker needed)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams.config import ConfigError, Settings
from streams.core import kpis
from streams.core.kpis import Aggregate, Fact
from streams.core.metric_labels import METRICS, parse_drops, worst_case_series
from streams.metrics.exporter import (
    GroupFigures,
    LabelBounds,
    WorkerView,
    build_registry,
    merge_expositions,
    render_group,
)
from streams.metrics.group import GroupState


def _exposition(agg: Aggregate, bounds: LabelBounds | None = None,
                drops: dict[str, frozenset[str]] | None = None) -> str:
    bounds = bounds or LabelBounds()
    bounds.admit(GroupState().label_values(agg))
    return render_group(GroupFigures(agg), bounds, drops).decode()


def _label_values(text: str, metric: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric
    }


def _labels_of(text: str, metric: str) -> set[str]:
    return {name for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == metric for name in sample.labels}


def test_ten_thousand_intents_give_at_most_limit_plus_one_label_values() -> None:
    agg = Aggregate()
    for index in range(10_000):
        agg.add_fact(Fact(kpis.CONCLUDED, ("autonomous",), 1.0, (f"intent-{index}", "web", "v1")))
    text = _exposition(agg, LabelBounds(limit=50))
    values = _label_values(text, "acsr_cases_concluded_total", "intent")
    assert len(values) <= 51
    assert "other" in values
    total = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "acsr_cases_concluded_total"
    )
    assert total == 10_000


def test_allow_list_keeps_only_listed_values_and_unknown() -> None:
    agg = Aggregate()
    for intent in ("refund", "weird", "unknown"):
        agg.add_fact(Fact(kpis.POLICY_CHECK, ("passed",), 1.0, (intent, "web", "v1")))
    bounds = LabelBounds(allowed={"intent": frozenset({"refund"})})
    values = _label_values(_exposition(agg, bounds), "acsr_policy_checks_total", "intent")
    assert values == {"refund", "other", "unknown"}


def test_an_admitted_value_is_never_given_back_and_a_late_one_stays_other() -> None:
    bounds = LabelBounds(limit=2)
    assert bounds.admit({"intent": ["a", "b"]}) == {"intent": ["a", "b"]}
    assert bounds.admit({"intent": ["0-first-in-sort-order", "a"]}) == {}
    assert bounds.bound("intent", "a") == "a"
    assert bounds.bound("intent", "0-first-in-sort-order") == "other"
    assert bounds.bound("intent", "unknown") == "unknown"


def test_known_label_sets_start_at_zero_and_no_kpi_metric_has_a_partition_label() -> None:
    agg = Aggregate()
    agg.add_fact(Fact(kpis.CONCLUDED, ("escalated",), 1.0, ("refund", "web", "v1")))
    agg.add_fact(Fact(kpis.CSAT, (), 4.0, ("refund", "web", "v1")))
    text = _exposition(agg)
    outcomes = _label_values(text, "acsr_cases_concluded_total", "outcome")
    assert outcomes == {"autonomous", "unverified", "human", "escalated"}
    assert _label_values(text, "acsr_events_invalid_total", "reason") >= {"bad_ts", "not_json"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert "partition" not in sample.labels, sample
    assert _labels_of(text, "acsr_csat_score_count") == {"intent", "agent_version"}
    assert _labels_of(text, "acsr_cases_concluded_total") == {
        "intent", "channel", "agent_version", "outcome"}


def test_every_metric_renders_exactly_its_table_labels() -> None:
    agg = Aggregate()
    dims = ("refund", "web", "v1")
    for metric in METRICS:
        labels = {kpis.CONCLUDED: ("autonomous",), kpis.ESCALATION: ("policy_ambiguity",),
                  kpis.POLICY_CHECK: ("passed",), kpis.THUMBS: ("up",),
                  kpis.CASE_COST: ("autonomous",), kpis.ACTION: ("refund_issue", "success"),
                  kpis.SUGGESTION: ("true",), kpis.KNOWLEDGE: ("missing",),
                  kpis.ANNOTATION: ("low_csat",), kpis.EVALUATION: ("helpfulness",)
                  }.get(metric.figure, ())
        agg.add_fact(Fact(metric.figure, labels, 1.0, dims))
    text = _exposition(agg)
    for metric in METRICS:
        sample = f"{metric.name}_count" if metric.histogram else metric.exported_name
        assert _labels_of(text, sample) == set(metric.labels), metric.name


def test_a_dropped_label_sums_its_series_and_a_required_one_is_refused() -> None:
    agg = Aggregate()
    for action in ("refund_issue", "address_update"):
        agg.add_fact(Fact(kpis.ACTION, (action, "success"), 1.0, ("refund", "web", "v1")))
    text = _exposition(agg, drops=parse_drops("acsr_actions_total:action"))
    assert _labels_of(text, "acsr_actions_total") == {"intent", "channel", "agent_version",
                                                      "result"}
    assert sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "acsr_actions_total") == 2
    with pytest.raises(ConfigError, match="requires"):
        Settings(metric_labels_drop="acsr_actions_total:intent").validate()
    with pytest.raises(ConfigError, match="metric:label"):
        Settings(metric_labels_drop="acsr_nope_total:action").validate()


def test_worst_case_series_multiplies_the_bounded_and_fixed_label_values() -> None:
    concluded = next(m for m in METRICS if m.name == "acsr_cases_concluded")
    assert worst_case_series(concluded, 10) == 12 ** 3 * 4
    csat = next(m for m in METRICS if m.name == "acsr_csat_score")
    assert worst_case_series(csat, 10) == 12 ** 2 * (5 + 3)


def test_histograms_count_every_observation_in_cumulative_buckets() -> None:
    agg = Aggregate()
    for score in (1, 2, 2, 5):
        agg.add_fact(Fact(kpis.CSAT, (), float(score), ("refund", "web", "v1")))
    for score in (3,):
        agg.add_fact(Fact(kpis.CSAT, (), float(score), ("refund", "chat", "v1")))
    text = _exposition(agg)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("acsr_csat_score")
    }  # the two channels are one series: histograms keep intent and agent_version
    assert samples[("acsr_csat_score_bucket", "2.0")] == 3
    assert samples[("acsr_csat_score_bucket", "+Inf")] == 5
    assert samples[("acsr_csat_score_count", None)] == 5
    assert samples[("acsr_csat_score_sum", None)] == 13


def test_the_workers_own_exposition_holds_only_its_health() -> None:
    registry, _ = build_registry(WorkerView(owned=lambda: {1, 3}, lag=lambda: {1: 5, 3: 0},
                                            exporting=lambda: True))
    text = generate_latest(registry).decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert not any(name.startswith(("acsr_cases", "acsr_events")) for name in names)
    assert _label_values(text, "acsr_consumer_lag_messages", "partition") == {"1", "3"}
    assert "acsr_group_exporter" in names


def test_merging_sums_counters_across_workers() -> None:
    one, two = Aggregate(), Aggregate()
    one.add_fact(Fact(kpis.THUMBS, ("up",), 1.0, ("refund", "web", "v1")))
    two.add_fact(Fact(kpis.THUMBS, ("up",), 1.0, ("refund", "web", "v1")))
    merged = merge_expositions([_exposition(one), _exposition(two)])
    ups = [
        s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
        if s.name == "acsr_thumbs_total" and s.labels["vote"] == "up"
    ]
    assert ups == [2]

"""The exposition: label bounds and how figures map to metrics (no broker needed)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams.core import kpis
from streams.core.kpis import Aggregate, Fact
from streams.metrics.exporter import LabelBounds, WorkerView, build_registry, merge_expositions


def _exposition(aggregates: dict[int, Aggregate], bounds: LabelBounds | None = None) -> str:
    registry, _ = build_registry(WorkerView(lambda: aggregates), bounds or LabelBounds())
    return generate_latest(registry).decode()


def _label_values(text: str, metric: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric
    }


def test_ten_thousand_intents_give_at_most_limit_plus_one_label_values() -> None:
    agg = Aggregate()
    for index in range(10_000):
        agg.add_fact(Fact(kpis.CONCLUDED, ("autonomous",), 1.0, (f"intent-{index}", "web", "v1")))
    text = _exposition({0: agg}, LabelBounds(limit=50))
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
    values = _label_values(_exposition({0: agg}, bounds), "acsr_policy_checks_total", "intent")
    assert values == {"refund", "other", "unknown"}


def test_known_label_sets_start_at_zero() -> None:
    agg = Aggregate()
    agg.add_fact(Fact(kpis.CONCLUDED, ("escalated",), 1.0, ("refund", "web", "v1")))
    text = _exposition({3: agg})
    outcomes = _label_values(text, "acsr_cases_concluded_total", "outcome")
    assert outcomes == {"autonomous", "unverified", "human", "escalated"}
    assert _label_values(text, "acsr_events_invalid_total", "reason") >= {"bad_ts", "not_json"}
    assert _label_values(text, "acsr_cases_concluded_total", "partition") == {"3"}


def test_histograms_count_every_observation_in_cumulative_buckets() -> None:
    agg = Aggregate()
    for score in (1, 2, 2, 5):
        agg.add_fact(Fact(kpis.CSAT, (), float(score), ("refund", "web", "v1")))
    text = _exposition({0: agg})
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("acsr_csat_score")
    }
    assert samples[("acsr_csat_score_bucket", "2.0")] == 3
    assert samples[("acsr_csat_score_bucket", "+Inf")] == 4
    assert samples[("acsr_csat_score_count", None)] == 4
    assert samples[("acsr_csat_score_sum", None)] == 10


def test_merging_sums_counters_across_workers() -> None:
    one, two = Aggregate(), Aggregate()
    one.add_fact(Fact(kpis.THUMBS, ("up",), 1.0, ("refund", "web", "v1")))
    two.add_fact(Fact(kpis.THUMBS, ("up",), 1.0, ("refund", "web", "v1")))
    merged = merge_expositions([_exposition({0: one}), _exposition({0: two})])
    ups = [
        s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
        if s.name == "acsr_thumbs_total" and s.labels["vote"] == "up"
    ]
    assert ups == [2]

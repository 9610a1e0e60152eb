"""KPI rule unit tests: events through apply_event/apply_link into an Aggregate (KPIS.md)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core.cases import CaseState, Route, apply_event, apply_link, related_case
from streams.core.events import parse_event
from streams.core.kpis import Aggregate, build_report, figures, window_items
from streams.core.windows import WindowPolicy

from .fact_windows import FactWindows

T0_MS = 1_795_352_400_000  # 2026-11-22T13:00:00Z
SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY = 24 * HOUR

_ids = itertools.count()


def ev(type_: str, at_ms: int, case: str = "c1", *, eid: str | None = None,
       **fields: Any) -> dict[str, Any]:
    """An event dict `at_ms` milliseconds after 13:00Z (ts as epoch ms)."""
    event_id = eid if eid is not None else f"e{next(_ids)}"
    return {"event_id": event_id, "type": type_, "case_id": case, "ts": T0_MS + at_ms, **fields}


@dataclass
class Run:
    agg: Aggregate
    states: dict[str, CaseState]
    routes: list[tuple[str, Route]]
    watermark_us: int | None

    @property
    def report(self) -> dict[str, Any]:
        return build_report(self.agg)

    @property
    def totals(self) -> dict[str, Any]:
        return self.report["totals"]


def run(docs: list[dict[str, Any]], *, windows: WindowPolicy | None = None,
        window_sizes: tuple[int, ...] = (3600,), roundtrip: bool = False) -> Run:
    """Feed events (in arrival order) through one partition, as the worker does."""
    windows = windows or WindowPolicy()
    agg = FactWindows(window_sizes)
    states: dict[str, CaseState] = {}
    routes: list[tuple[str, Route]] = []
    watermark: int | None = None

    def load(case_id: str) -> CaseState | None:
        state = states.get(case_id)
        if roundtrip and state is not None:
            state = CaseState.from_bytes(state.to_bytes())
        return state

    for offset, doc in enumerate(docs):
        event = parse_event(orjson.dumps(doc))
        step = apply_event(load(event.case_id), event, partition=0, offset=offset,
                           watermark_us=watermark, windows=windows)
        states[event.case_id] = step.state
        agg.add_facts(step.facts)
        agg.add_pipeline(step.pipeline)
        routes.extend((event.case_id, r) for r in step.routes)
        if step.duplicate:
            continue
        watermark = step.state.watermark_us
        related = related_case(event)
        if related is not None:
            link = apply_link(load(related), partition=0, link_ts_us=event.ts_us)
            states[related] = link.state
            agg.add_facts(link.facts)
            agg.add_pipeline(link.pipeline)
            routes.extend((related, r) for r in link.routes)
    return Run(agg, states, routes, watermark)


def autonomous_case(case: str = "c1", start: int = 0, end: int = 90 * SEC,
                    intent: str = "refund", **dims: Any) -> list[dict[str, Any]]:
    """A case that meets every condition of an autonomous resolution."""
    return [
        ev("case_opened", start, case, channel="web", agent_version="v7", **dims),
        ev("intent_classified", start + 2 * SEC, case, intent=intent, confidence=0.9),
        ev("policy_checked", start + 3 * SEC, case, policy="refund_limit", passed=True),
        ev("action_executed", start + 5 * SEC, case, action="refund", success=True),
        ev("case_resolved", end, case, by="agent"),
    ]


# --- outcomes -----------------------------------------------------------------------------


def test_escalated_outcome() -> None:
    """A case_escalated conclusion is escalated, whatever came before."""
    docs = [*autonomous_case()[:4], ev("case_escalated", 60 * SEC, reason="low_confidence")]
    t = run(docs).totals
    assert (t["cases_concluded"], t["escalated"], t["autonomous"]) == (1, 1, 0)
    assert t["escalation_rate"] == 1.0
    assert t["arr"] == 0.0
    assert t["escalations_by_reason"] == {"low_confidence": 1}
    assert t["annotation_routed"] == {"escalated": 1}
    assert t["aht_count"] == 0


def test_human_outcome() -> None:
    """by = human is a human resolution even when every autonomous condition holds."""
    docs = [*autonomous_case()[:4], ev("case_resolved", 60 * SEC, by="human")]
    t = run(docs).totals
    assert (t["cases_concluded"], t["human"], t["autonomous"], t["unverified"]) == (1, 1, 0, 0)
    assert t["annotation_routed"] == {}
    assert t["aht_count"] == 0


def test_autonomous_outcome() -> None:
    t = run(autonomous_case()).totals
    assert (t["cases_concluded"], t["autonomous"], t["unverified"]) == (1, 1, 0)
    assert t["arr"] == 1.0
    assert t["aht_count"] == 1
    assert t["aht_seconds_mean"] == pytest.approx(90.0)
    assert t["annotation_routed"] == {}


def test_autonomous_needs_no_policy_check_or_action() -> None:
    """With no checks and no actions, only a known intent is required."""
    docs = [ev("intent_classified", 0, intent="faq", confidence=0.5),
            ev("case_resolved", 10 * SEC, by="agent")]
    assert run(docs).totals["autonomous"] == 1


def test_failed_action_retried_successfully_is_autonomous() -> None:
    """Only the last attempt of each action name counts."""
    docs = autonomous_case()
    docs.insert(3, ev("action_executed", 4 * SEC, action="refund", success=False))
    t = run(docs).totals
    assert t["autonomous"] == 1
    assert (t["actions"], t["actions_failed"]) == (2, 1)


UNVERIFIED_CASES: dict[str, list[dict[str, Any]]] = {
    "no_intent_at_all": [ev("case_opened", 0), ev("case_resolved", 60 * SEC, by="agent")],
    "intent_only_on_the_resolution": [
        ev("case_opened", 0),
        ev("case_resolved", 60 * SEC, by="agent", intent="refund"),
    ],
    "intent_known_only_after_the_resolution": [
        ev("case_opened", 0),
        ev("case_resolved", 60 * SEC, by="agent"),
        ev("intent_classified", 70 * SEC, intent="refund", confidence=0.9),
    ],
    "failed_policy_check": [
        ev("intent_classified", 0, intent="refund", confidence=0.9),
        ev("policy_checked", 1 * SEC, policy="p", passed=False),
        ev("policy_checked", 2 * SEC, policy="p", passed=True),
        ev("case_resolved", 60 * SEC, by="agent"),
    ],
    "human_override": [
        ev("intent_classified", 0, intent="refund", confidence=0.9),
        ev("human_override", 1 * SEC, original_action="refund", final_action="deny",
           rationale="over limit"),
        ev("case_resolved", 60 * SEC, by="agent"),
    ],
    "last_attempt_failed": [
        ev("intent_classified", 0, intent="refund", confidence=0.9),
        ev("action_executed", 1 * SEC, action="refund", success=True),
        ev("action_executed", 2 * SEC, action="refund", success=False),
        ev("case_resolved", 60 * SEC, by="agent"),
    ],
    "another_action_failed": [
        ev("intent_classified", 0, intent="refund", confidence=0.9),
        ev("action_executed", 1 * SEC, action="cancel", success=False),
        ev("action_executed", 2 * SEC, action="refund", success=True),
        ev("case_resolved", 60 * SEC, by="agent"),
    ],
}


@pytest.mark.parametrize("name", sorted(UNVERIFIED_CASES))
def test_unverified_outcome(name: str) -> None:
    """An agent resolution that fails one strict condition is unverified and routed."""
    t = run(UNVERIFIED_CASES[name]).totals
    assert (t["cases_concluded"], t["autonomous"], t["unverified"]) == (1, 0, 1)
    assert t["arr"] == 0.0
    assert t["aht_count"] == 0
    assert t["annotation_routed"].get("unverified_resolution") == 1


def test_conditions_after_the_conclusion_do_not_change_the_outcome() -> None:
    """The outcome is fixed at the conclusion; later checks still count as checks."""
    docs = [*autonomous_case(),
            ev("policy_checked", 100 * SEC, policy="p", passed=False),
            ev("action_executed", 101 * SEC, action="refund", success=False)]
    t = run(docs).totals
    assert t["autonomous"] == 1
    assert (t["policy_checks"], t["policy_checks_passed"]) == (2, 1)
    assert t["compliance_score"] == 0.5


def test_case_concludes_once() -> None:
    """Later resolutions/escalations count as events but change no KPI."""
    once = run(autonomous_case())
    docs = [*autonomous_case(),
            ev("case_escalated", 100 * SEC, reason="customer_request"),
            ev("case_resolved", 110 * SEC, by="human"),
            ev("case_resolved", 120 * SEC, by="agent")]
    r = run(docs).report
    assert r["events"]["by_type"]["case_resolved"] == 3
    assert r["events"]["by_type"]["case_escalated"] == 1
    assert r["totals"] == once.totals


def test_escalation_then_resolution_stays_escalated() -> None:
    docs = [ev("case_escalated", 0, reason="tool_failure"),
            ev("case_resolved", 10 * SEC, by="agent")]
    t = run(docs).totals
    assert (t["cases_concluded"], t["escalated"], t["unverified"]) == (1, 1, 0)
    assert t["annotation_routed"] == {"escalated": 1}


# --- duplicates ---------------------------------------------------------------------------


def test_duplicate_event_id_in_a_case_is_dropped() -> None:
    """A repeated event_id is dropped even when its content differs."""
    docs = [ev("intent_classified", 0, intent="refund", confidence=0.9),
            ev("policy_checked", 1 * SEC, eid="p1", policy="p", passed=True),
            ev("policy_checked", 2 * SEC, eid="p1", policy="p", passed=False),
            ev("csat_submitted", 3 * SEC, eid="s1", score=5),
            ev("csat_submitted", 3 * SEC, eid="s1", score=5),
            ev("case_resolved", 60 * SEC, by="agent")]
    r = run(docs).report
    assert r["events"]["duplicate"] == 2
    assert r["events"]["valid"] == 4
    assert r["events"]["by_type"]["policy_checked"] == 1
    assert r["totals"]["policy_checks"] == 1
    assert r["totals"]["csat_count"] == 1
    assert r["totals"]["autonomous"] == 1


def test_same_event_id_in_another_case_is_not_a_duplicate() -> None:
    docs = [ev("csat_submitted", 0, "c1", eid="same", score=4),
            ev("csat_submitted", 0, "c2", eid="same", score=2)]
    r = run(docs).report
    assert r["events"]["duplicate"] == 0
    assert r["totals"]["csat_count"] == 2
    assert r["totals"]["csat_mean"] == pytest.approx(3.0)


def test_duplicate_conclusion_counts_once() -> None:
    docs = autonomous_case()
    docs.append(dict(docs[-1]))
    r = run(docs).report
    assert r["events"]["duplicate"] == 1
    assert r["totals"]["cases_concluded"] == 1


# --- dimensions ---------------------------------------------------------------------------


def test_first_non_empty_dimension_is_kept() -> None:
    docs = [ev("case_opened", 0, agent_version="v7"),
            ev("intent_classified", 1 * SEC, intent="refund", confidence=0.9),
            ev("intent_classified", 2 * SEC, intent="billing", confidence=0.9,
               agent_version="v8"),
            ev("case_resolved", 60 * SEC, by="agent")]
    r = run(docs)
    assert set(r.report["by_intent"]) == {"refund"}
    assert set(r.report["by_agent_version"]) == {"v7"}
    assert r.report["by_intent"]["refund"]["autonomous"] == 1
    assert r.states["c1"].dims == ["refund", None, "v7"]


def test_figures_before_the_intent_is_known_count_as_unknown() -> None:
    docs = [ev("policy_checked", 0, policy="p", passed=True),
            ev("intent_classified", 1 * SEC, intent="refund", confidence=0.9),
            ev("policy_checked", 2 * SEC, policy="p", passed=False)]
    by_intent = run(docs).report["by_intent"]
    assert by_intent["unknown"]["policy_checks"] == 1
    assert by_intent["unknown"]["policy_checks_passed"] == 1
    assert by_intent["refund"]["policy_checks"] == 1
    assert by_intent["refund"]["policy_checks_passed"] == 0


def test_triggering_events_own_dimensions_count() -> None:
    """A figure's event carries the first known intent: it is not unknown."""
    docs = [ev("csat_submitted", 0, score=4, intent="billing", agent_version="v9")]
    r = run(docs).report
    assert r["by_intent"] == {"billing": figures([("csat", (), [1, 4.0])])}
    assert r["by_agent_version"]["v9"]["csat_count"] == 1


def test_conclusion_carrying_the_intent_is_attributed_to_it() -> None:
    """The resolution's own intent labels it, though it came too late for autonomy."""
    by_intent = run(UNVERIFIED_CASES["intent_only_on_the_resolution"]).report["by_intent"]
    assert set(by_intent) == {"refund"}
    assert by_intent["refund"]["unverified"] == 1


# --- AHT ----------------------------------------------------------------------------------


def test_aht_uses_the_smallest_ts_before_the_conclusion() -> None:
    """Out-of-order arrivals: opened at is the minimum ts, not the first arrival."""
    docs = [ev("intent_classified", 30 * SEC, intent="refund", confidence=0.9),
            ev("case_opened", 0),
            ev("case_resolved", 90 * SEC, by="agent")]
    assert run(docs).totals["aht_seconds_mean"] == pytest.approx(90.0)


def test_aht_ignores_earlier_ts_arriving_after_the_conclusion() -> None:
    docs = [*autonomous_case(start=0, end=90 * SEC), ev("case_opened", -10 * MIN),
            ev("csat_submitted", -20 * MIN, score=5)]
    r = run(docs)
    assert r.totals["aht_seconds_mean"] == pytest.approx(90.0)
    assert r.states["c1"].opened_us == (T0_MS) * 1000


def test_aht_negative_clamps_to_zero() -> None:
    """A conclusion stamped before the other events gives 0, never a negative time."""
    docs = [ev("intent_classified", 100 * SEC, intent="refund", confidence=0.9),
            ev("case_resolved", 50 * SEC, by="agent")]
    t = run(docs).totals
    assert t["aht_count"] == 1
    assert t["aht_seconds_mean"] == 0.0


def test_aht_mean_over_autonomous_cases_only() -> None:
    docs = [*autonomous_case("a", end=60 * SEC), *autonomous_case("b", end=120 * SEC),
            ev("case_opened", 0, "h"), ev("case_resolved", 1 * HOUR, "h", by="human")]
    t = run(docs).totals
    assert t["aht_count"] == 2
    assert t["aht_seconds_mean"] == pytest.approx(90.0)


def test_aht_with_millisecond_precision() -> None:
    docs = autonomous_case(end=90 * SEC + 250)
    assert run(docs).totals["aht_seconds_mean"] == pytest.approx(90.25)


# --- reopens and FCR ----------------------------------------------------------------------

END = 90 * SEC  # conclusion of autonomous_case()


@pytest.mark.parametrize(
    ("delta", "counted"),
    [(0, True), (1, True), (DAY, True), (DAY + 1, False), (-1, False), (2 * DAY, False)],
)
@pytest.mark.parametrize("reopen_first", [False, True])
def test_reopen_within_24h(delta: int, counted: bool, reopen_first: bool) -> None:
    """0 <= reopen ts - conclusion ts <= 24 h, whichever arrives first."""
    case = autonomous_case(end=END)
    reopen = ev("case_reopened", END + delta)
    docs = [*case[:-1], reopen, case[-1]] if reopen_first else [*case, reopen]
    t = run(docs).totals
    assert t["autonomous"] == 1
    assert t["reopened_24h"] == int(counted)
    assert t["fcr_failures_24h"] == int(counted)
    assert t["fcr"] == (0.0 if counted else 1.0)
    assert t["annotation_routed"].get("reopened", 0) == int(counted)


@pytest.mark.parametrize("reopen_first", [False, True])
def test_reopen_counted_once_per_case(reopen_first: bool) -> None:
    case = autonomous_case(end=END)
    reopens = [ev("case_reopened", END + MIN), ev("case_reopened", END + HOUR)]
    docs = [*case[:-1], *reopens, case[-1]] if reopen_first else [*case, *reopens]
    t = run(docs).totals
    assert (t["reopened_24h"], t["fcr_failures_24h"]) == (1, 1)
    assert t["annotation_routed"] == {"reopened": 1}


@pytest.mark.parametrize("case_name", ["human", "escalated", "unverified"])
def test_reopen_of_a_non_autonomous_case_not_counted(case_name: str) -> None:
    concluding = {
        "human": ev("case_resolved", END, by="human"),
        "escalated": ev("case_escalated", END, reason="other"),
        "unverified": ev("case_resolved", END, by="agent"),
    }[case_name]
    docs = [ev("case_opened", 0), concluding, ev("case_reopened", END + MIN)]
    t = run(docs).totals
    assert t[case_name] == 1
    assert (t["reopened_24h"], t["fcr_failures_24h"]) == (0, 0)
    assert t["fcr"] is None


@pytest.mark.parametrize(
    ("delta", "counted"), [(0, True), (HOUR, True), (DAY, True), (DAY + 1, False), (-1, False)]
)
@pytest.mark.parametrize("link_first", [False, True])
def test_re_engagement_is_an_fcr_failure(delta: int, counted: bool, link_first: bool) -> None:
    """A case_opened of another case naming this one fails FCR, in either arrival order."""
    earlier = autonomous_case("a", end=END)
    later = ev("case_opened", END + delta, "b", related_case_id="a")
    docs = [later, *earlier] if link_first else [*earlier, later]
    t = run(docs).totals
    assert t["autonomous"] == 1
    assert t["fcr_failures_24h"] == int(counted)
    assert t["reopened_24h"] == 0
    assert t["fcr"] == (0.0 if counted else 1.0)
    assert "reopened" not in t["annotation_routed"]


def test_re_engagement_naming_its_own_case_is_not_counted() -> None:
    case = autonomous_case("a", end=END)
    docs = [*case, ev("case_opened", END + MIN, "a", related_case_id="a")]
    assert related_case(parse_event(orjson.dumps(docs[-1]))) is None
    t = run(docs).totals
    assert t["fcr_failures_24h"] == 0
    assert t["fcr"] == 1.0


@pytest.mark.parametrize("link_first", [False, True])
def test_re_engagement_uses_the_earlier_cases_dimensions(link_first: bool) -> None:
    earlier = autonomous_case("a", end=END, intent="refund")
    later = [ev("case_opened", END + HOUR, "b", related_case_id="a", agent_version="v8"),
             ev("intent_classified", END + HOUR + SEC, "b", intent="billing", confidence=0.9)]
    docs = [*later, *earlier] if link_first else [*earlier, *later]
    r = run(docs).report
    assert r["by_intent"]["refund"]["fcr_failures_24h"] == 1
    assert r["by_intent"].get("billing", {}).get("fcr_failures_24h", 0) == 0
    assert r["by_agent_version"]["v7"]["fcr_failures_24h"] == 1
    assert "v8" not in r["by_agent_version"]
    assert r["totals"]["fcr_failures_24h"] == 1


def test_re_engagement_of_a_non_autonomous_case_not_counted() -> None:
    docs = [ev("case_opened", 0, "a"), ev("case_escalated", END, "a", reason="other"),
            ev("case_opened", END + MIN, "b", related_case_id="a")]
    assert run(docs).totals["fcr_failures_24h"] == 0


def test_reopen_and_re_engagement_fail_fcr_once() -> None:
    docs = [*autonomous_case("a", end=END),
            ev("case_opened", END + MIN, "b", related_case_id="a"),
            ev("case_opened", END + 2 * MIN, "c", related_case_id="a"),
            ev("case_reopened", END + 3 * MIN, "a")]
    t = run(docs).totals
    assert (t["reopened_24h"], t["fcr_failures_24h"]) == (1, 1)


def test_apply_link_counts_once_directly() -> None:
    """apply_link alone: one failure for an autonomous case, then none."""
    state = run(autonomous_case("a", end=END)).states["a"]
    first = apply_link(state, partition=0, link_ts_us=(T0_MS + END + MIN) * 1000)
    second = apply_link(first.state, partition=0, link_ts_us=(T0_MS + END + 2 * MIN) * 1000)
    assert [f.name for f in first.facts] == ["fcr_failure"]
    assert first.facts[0].dims == ("refund", "web", "v7")
    assert second.facts == []


# --- costs --------------------------------------------------------------------------------


def test_cost_of_an_autonomous_case() -> None:
    """Cost so far at the conclusion, plus every later cost of the case."""
    case = autonomous_case(end=END)
    docs = [*case[:3],
            ev("action_executed", 5 * SEC, action="refund", success=True, cost_usd=0.5),
            ev("response_sent", 6 * SEC, latency_ms=300, cost_usd=0.25),
            case[-1],
            ev("response_sent", END + SEC, latency_ms=100, cost_usd=0.125)]
    t = run(docs).totals
    assert t["cost_usd_total"] == pytest.approx(0.875)
    assert t["cost_usd_autonomous"] == pytest.approx(0.875)
    assert t["cost_per_autonomous_resolution"] == pytest.approx(0.875)


def test_cost_of_escalated_and_open_cases_only_in_total() -> None:
    docs = [
        *autonomous_case("a"),
        ev("response_sent", 100 * SEC, "a", latency_ms=1, cost_usd=1.0),
        ev("response_sent", 0, "b", latency_ms=1, cost_usd=2.0),
        ev("case_escalated", 10 * SEC, "b", reason="low_confidence"),
        ev("action_executed", 20 * SEC, "b", action="x", success=True, cost_usd=3.0),
        ev("response_sent", 0, "c", latency_ms=1, cost_usd=4.0),
        *autonomous_case("d"),
    ]
    t = run(docs).totals
    assert t["cost_usd_total"] == pytest.approx(10.0)
    assert t["cost_usd_autonomous"] == pytest.approx(1.0)
    assert t["cost_per_autonomous_resolution"] == pytest.approx(0.5)


def test_cost_fact_is_labelled_with_outcome() -> None:
    """An escalated case's cost goes to the escalated case cost, never to autonomous."""
    docs = [ev("response_sent", 0, latency_ms=1, cost_usd=2.0),
            ev("case_escalated", 10 * SEC, reason="low_confidence"),
            ev("response_sent", 20 * SEC, latency_ms=1, cost_usd=3.0)]
    agg = run(docs).agg
    case_cost = {k[1]: v[1] for k, v in agg.series.items() if k[0] == "case_cost"}
    assert case_cost == {("escalated",): pytest.approx(5.0)}
    assert build_report(agg)["totals"]["cost_usd_autonomous"] == 0


# --- ratios -------------------------------------------------------------------------------

RATIOS = ["arr", "escalation_rate", "compliance_score", "fcr", "override_rate",
          "cost_per_autonomous_resolution", "adoption_rate", "aht_seconds_mean", "csat_mean",
          "ces_mean", "response_latency_seconds_mean"]


def test_ratios_with_zero_denominators_are_none() -> None:
    t = build_report(Aggregate())["totals"]
    assert {name: t[name] for name in RATIOS} == dict.fromkeys(RATIOS)
    assert t["cases_concluded"] == 0
    assert t["evaluations_by_name"] == {}


def test_ratio_none_only_where_the_denominator_is_zero() -> None:
    """One escalated case: arr is 0, fcr (no autonomous) and compliance (no checks) null."""
    t = run([ev("case_escalated", 0, reason="other")]).totals
    assert t["arr"] == 0.0
    assert t["escalation_rate"] == 1.0
    assert t["override_rate"] == 0.0
    assert t["fcr"] is None
    assert t["compliance_score"] is None
    assert t["cost_per_autonomous_resolution"] is None


def test_other_figures() -> None:
    """Every-event figures: latency, fallback, suggestions, knowledge, evaluations."""
    docs = [ev("response_sent", 0, latency_ms=500, fallback=True),
            ev("response_sent", 1, latency_ms=1500, fallback=False),
            ev("suggestion_reviewed", 2, adopted=True),
            ev("suggestion_reviewed", 3, adopted=False),
            ev("suggestion_reviewed", 4, adopted=True),
            ev("knowledge_flagged", 5, kind="irrelevant"),
            ev("evaluation_scored", 6, name="tone", score=0.9),
            ev("evaluation_scored", 7, name="tone", score=0.7),
            ev("thumbs_submitted", 8, vote="up"),
            ev("ces_submitted", 9, score=6)]
    t = run(docs).totals
    assert t["response_latency_seconds_mean"] == pytest.approx(1.0)
    assert t["fallback_responses"] == 1
    assert (t["suggestions_reviewed"], t["suggestions_adopted"]) == (3, 2)
    assert t["adoption_rate"] == pytest.approx(2 / 3)
    assert (t["knowledge_irrelevant"], t["knowledge_missing"]) == (1, 0)
    assert t["evaluations_by_name"] == {"tone": {"count": 2, "mean": pytest.approx(0.8)}}
    assert (t["thumbs_up"], t["thumbs_down"]) == (1, 0)
    assert (t["ces_count"], t["ces_mean"]) == (1, 6.0)
    assert t["annotation_routed"] == {}


# --- annotation queue ---------------------------------------------------------------------


def test_routed_once_per_reason_per_case() -> None:
    docs = [ev("thumbs_submitted", 0, vote="down"), ev("thumbs_submitted", 1, vote="down"),
            ev("thumbs_submitted", 2, "c2", vote="down")]
    r = run(docs)
    assert r.totals["thumbs_down"] == 3
    assert r.totals["annotation_routed"] == {"thumbs_down": 2}
    assert [(case, route.reason) for case, route in r.routes] == [
        ("c1", "thumbs_down"), ("c2", "thumbs_down")]
    assert r.routes[0][1].trigger["event_id"] == docs[0]["event_id"]


def test_override_routed_once_and_counted_once() -> None:
    over = {"original_action": "refund", "final_action": "deny", "rationale": "r",
            "policy_clause": "4.2"}
    docs = [ev("human_override", 0, **over), ev("human_override", 1, **over),
            ev("case_resolved", 2, by="human")]
    r = run(docs)
    assert r.totals["overridden_cases"] == 1
    assert r.totals["override_rate"] == 1.0
    assert r.totals["annotation_routed"] == {"human_override": 1}
    assert r.routes[0][1].trigger["policy_clause"] == "4.2"


@pytest.mark.parametrize(
    ("event_type", "fields", "reason", "routed"),
    [
        *[("csat_submitted", {"score": s}, "low_csat", s <= 2) for s in range(1, 6)],
        *[("ces_submitted", {"score": s}, "low_ces", s <= 3) for s in range(1, 8)],
        ("evaluation_scored", {"name": "g", "score": 0.0}, "low_score", True),
        ("evaluation_scored", {"name": "g", "score": 0.4999}, "low_score", True),
        ("evaluation_scored", {"name": "g", "score": 0.5}, "low_score", False),
        ("evaluation_scored", {"name": "g", "score": 1.0}, "low_score", False),
        ("knowledge_flagged", {"kind": "missing"}, "knowledge_missing", True),
        ("knowledge_flagged", {"kind": "irrelevant"}, "knowledge_missing", False),
        ("thumbs_submitted", {"vote": "up"}, "thumbs_down", False),
    ],
)
def test_routing_thresholds(event_type: str, fields: dict[str, Any], reason: str,
                            routed: bool) -> None:
    t = run([ev(event_type, 0, **fields), ev(event_type, 1, **fields)]).totals
    assert t["annotation_routed"].get(reason, 0) == int(routed)


# --- escalation reasons -------------------------------------------------------------------


def test_unknown_escalation_reason_counted_as_other() -> None:
    r = run([ev("case_escalated", 0, reason="angry_customer")])
    assert r.totals["escalations_by_reason"] == {"other": 1}
    assert r.agg.pipeline[("normalised", "reason")] == 1


def test_known_escalation_reason_not_normalised() -> None:
    r = run([ev("case_escalated", 0, "a", reason="other"),
             ev("case_escalated", 0, "b", reason="compliance_block")])
    assert r.totals["escalations_by_reason"] == {"compliance_block": 1, "other": 1}
    assert ("normalised", "reason") not in r.agg.pipeline


def test_only_concluding_escalation_counts_by_reason() -> None:
    docs = [ev("case_escalated", 0, reason="tool_failure"),
            ev("case_escalated", 1, reason="low_confidence")]
    assert run(docs).totals["escalations_by_reason"] == {"tool_failure": 1}


# --- windows ------------------------------------------------------------------------------


def _late_scenario(watermark_at: int, late_type: str = "case_resolved") -> Run:
    """c1 concludes at 13:30; c3 starts at 13:35; c2 moves event time to `watermark_at`;
    then c3's event stamped 13:40 arrives."""
    late = (ev("case_resolved", 40 * MIN, "c3", by="agent") if late_type == "case_resolved"
            else ev("policy_checked", 40 * MIN, "c3", policy="p", passed=True))
    docs = [*autonomous_case("c1", start=20 * MIN, end=30 * MIN),
            ev("intent_classified", 35 * MIN, "c3", intent="refund", confidence=0.9),
            ev("csat_submitted", watermark_at, "c2", score=4),
            late]
    return run(docs, window_sizes=(60, 3600))


@pytest.mark.parametrize("late_type", ["case_resolved", "policy_checked"])
def test_late_event_leaves_closed_window_unchanged(late_type: str) -> None:
    """Event time at 14:20 > 14:00 + 10 min grace: the 13:00 window is closed."""
    r = _late_scenario(80 * MIN, late_type)
    assert r.agg.pipeline[("late", "3600")] == 1
    items = r.report["windows"]["items"]
    assert [item["start"] for item in items] == ["2026-11-22T13:00:00Z"]
    assert items[0]["cases_concluded"] == 1
    assert items[0]["policy_checks"] == 1
    # the late figure still counts in the totals
    t = r.totals
    assert t["cases_concluded"] + t["policy_checks"] == 3


def test_event_within_grace_still_changes_the_window() -> None:
    """Event time at 14:05 <= 14:10: the 13:00 window is still open (the minute one is not)."""
    r = _late_scenario(65 * MIN)
    assert ("late", "3600") not in r.agg.pipeline
    assert r.agg.pipeline[("late", "60")] == 1
    items = r.report["windows"]["items"]
    assert items[0]["cases_concluded"] == 2
    assert items[0]["autonomous"] == 2
    minute_starts = [item["start"] for item in window_items(r.agg, 60)]
    assert "2026-11-22T13:30:00Z" in minute_starts
    assert "2026-11-22T13:40:00Z" not in minute_starts


@pytest.mark.parametrize(("watermark_at", "late"), [(70 * MIN, False), (70 * MIN + 1, True)])
def test_window_closes_only_when_event_time_passes_end_plus_grace(
    watermark_at: int, late: bool
) -> None:
    r = _late_scenario(watermark_at)
    assert (("late", "3600") in r.agg.pipeline) is late
    assert r.report["windows"]["items"][0]["cases_concluded"] == (1 if late else 2)


def test_partition_event_time_never_moves_back() -> None:
    """An old event does not reopen closed windows for the events after it."""
    docs = [ev("csat_submitted", 80 * MIN, "c2", score=4),
            ev("csat_submitted", 10 * MIN, "c3", score=4),
            ev("policy_checked", 40 * MIN, "c4", policy="p", passed=True)]
    r = run(docs)
    assert r.watermark_us == (T0_MS + 80 * MIN) * 1000
    assert r.states["c3"].watermark_us == (T0_MS + 80 * MIN) * 1000
    assert r.agg.pipeline[("late", "3600")] == 2
    assert r.report["windows"]["items"] == []
    assert r.totals["policy_checks"] == 1


def test_custom_grace() -> None:
    policy = WindowPolicy(sizes_s=(3600,), grace_s=0)
    end_us = (T0_MS + HOUR) * 1000
    assert policy.late_sizes((T0_MS + 59 * MIN) * 1000, end_us) == ()
    assert policy.late_sizes((T0_MS + 59 * MIN) * 1000, end_us + 1) == (3600,)
    assert WindowPolicy().late_sizes((T0_MS + 59 * MIN) * 1000, end_us + 1) == ()


def test_first_event_of_a_partition_is_never_late() -> None:
    """Without a watermark yet, even a very old event falls in its window."""
    r = run([ev("case_resolved", -5 * DAY, by="human")])
    assert r.report["windows"]["items"][0]["cases_concluded"] == 1
    assert not any(name == "late" for name, _ in r.agg.pipeline)


@pytest.mark.parametrize(
    ("ts", "start"),
    [
        ("2026-11-22T13:00:00Z", "2026-11-22T13:00:00Z"),
        ("2026-11-22T13:59:59.999Z", "2026-11-22T13:00:00Z"),
        ("2026-11-22T14:00:00Z", "2026-11-22T14:00:00Z"),
        ("2026-11-22T15:30:00+02:00", "2026-11-22T13:00:00Z"),
        ("2026-11-22T08:45:00-05:30", "2026-11-22T14:00:00Z"),
    ],
)
def test_window_start_aligned_to_utc_hour(ts: str, start: str) -> None:
    doc = ev("policy_checked", 0, policy="p", passed=True)
    doc["ts"] = ts
    items = run([doc]).report["windows"]["items"]
    assert [item["start"] for item in items] == [start]


def test_windows_list_only_conclusions_and_policy_checks() -> None:
    docs = [*autonomous_case(start=0, end=10 * MIN),
            ev("csat_submitted", 3 * HOUR, score=1),
            ev("policy_checked", 5 * HOUR, "c2", policy="p", passed=False)]
    items = run(docs).report["windows"]["items"]
    assert [item["start"] for item in items] == ["2026-11-22T13:00:00Z", "2026-11-22T18:00:00Z"]
    assert items[0]["aht_seconds_mean"] == pytest.approx(600.0)
    assert items[1]["compliance_score"] == 0.0
    assert items[1]["arr"] is None


# --- state persistence --------------------------------------------------------------------


def _rich_docs() -> list[dict[str, Any]]:
    return [
        ev("case_opened", 0, "b", related_case_id="a", channel="sms"),
        ev("case_reopened", END + MIN, "a"),
        *autonomous_case("a", end=END),
        ev("response_sent", END + 1, "a", latency_ms=5, cost_usd=0.3, fallback=True),
        ev("thumbs_submitted", END + 2, "a", vote="down"),
        ev("action_executed", 0, "b", action="x", success=False, cost_usd=0.1),
        ev("human_override", 1, "b", original_action="x", final_action="y", rationale="r"),
        ev("case_reopened", 2 * HOUR, "b"),
        ev("evaluation_scored", 3, "b", name="g", score=0.2),
    ]


def test_case_state_round_trips() -> None:
    for state in run(_rich_docs()).states.values():
        again = CaseState.from_bytes(state.to_bytes())
        assert again == state
        assert again.to_bytes() == state.to_bytes()
    state_b = run(_rich_docs()).states["b"]
    assert state_b.reopens and state_b.overridden and state_b.routed and state_b.figures.series


def test_round_tripping_state_between_events_changes_nothing() -> None:
    """Persisting the state after every event (as the table does) gives the same report."""
    docs = _rich_docs()
    assert run(copy.deepcopy(docs), roundtrip=True).report == run(docs).report


EDGE_MESSAGES = [
    b'{"event_id":"e","type":"response_sent","case_id":"c","ts":1764000000000,"latency_ms":1,'
    b'"cost_usd":1000000000000000000000000000000}',
    b'{"event_id":"e","type":"response_sent","case_id":"c","ts":1764000000000,"latency_ms":1,'
    b'"tokens_in":18446744073709551616,"cost_usd":0.1}',
    b'{"event_id":"e","type":"action_executed","case_id":"c","ts":1764000000000,"action":"\xf0\x9f\x98\x80",'
    b'"success":false,"cost_usd":0.5,"x":1e400}',
    b'{"event_id":"\\ud83d\\ude00","type":"thumbs_submitted","case_id":"c","ts":1764000000000,'
    b'"vote":"down","x":1' + b"0" * 5000 + b"}",
]


@pytest.mark.parametrize("raw", EDGE_MESSAGES)
def test_state_round_trips_for_edge_values(raw: bytes) -> None:
    """Whatever the parser accepts, the case state can be stored and used again."""
    windows = WindowPolicy()
    step = apply_event(None, parse_event(raw), partition=0, offset=0, watermark_us=None,
                       windows=windows)
    again = CaseState.from_bytes(step.state.to_bytes())
    assert again == step.state
    more = parse_event(orjson.dumps({"event_id": "e2", "type": "response_sent", "case_id": "c",
                                     "ts": 1764000000001, "latency_ms": 1, "cost_usd": 0.25}))
    after = apply_event(again, more, partition=0, offset=1, watermark_us=again.watermark_us,
                        windows=windows)
    assert after.state.cost == pytest.approx(step.state.cost + 0.25)


# --- invariants ---------------------------------------------------------------------------

CASES = ["a", "b", "c"]


@st.composite
def event_docs(draw: st.DrawFn, index: int) -> dict[str, Any]:
    case = draw(st.sampled_from(CASES))
    at = draw(st.integers(0, 2 * 24 * 6)) * 10 * MIN
    kind = draw(st.sampled_from([
        "case_opened", "intent_classified", "policy_checked", "action_executed",
        "response_sent", "case_escalated", "case_resolved", "case_reopened",
        "human_override", "csat_submitted", "thumbs_submitted", "evaluation_scored",
    ]))
    fields: dict[str, Any] = {
        "case_opened": {"related_case_id": draw(st.sampled_from([None, *CASES]))},
        "intent_classified": {"intent": draw(st.sampled_from(["refund", "billing"])),
                              "confidence": 0.9},
        "policy_checked": {"policy": "p", "passed": draw(st.booleans())},
        "action_executed": {"action": draw(st.sampled_from(["refund", "cancel"])),
                            "success": draw(st.booleans()),
                            "cost_usd": draw(st.sampled_from([0, 0.5, 1.25]))},
        "response_sent": {"latency_ms": 100, "cost_usd": draw(st.sampled_from([None, 0.25]))},
        "case_escalated": {"reason": draw(st.sampled_from(["low_confidence", "weird"]))},
        "case_resolved": {"by": draw(st.sampled_from(["agent", "agent", "human"]))},
        "case_reopened": {},
        "human_override": {"original_action": "a", "final_action": "b", "rationale": "r"},
        "csat_submitted": {"score": draw(st.integers(1, 5))},
        "thumbs_submitted": {"vote": draw(st.sampled_from(["up", "down"]))},
        "evaluation_scored": {"name": "g", "score": draw(st.sampled_from([0.2, 0.5, 0.9]))},
    }[kind]
    dims = draw(st.fixed_dictionaries({}, optional={
        "intent": st.sampled_from(["refund", "billing"]),
        "agent_version": st.sampled_from(["v1", "v2"]),
    }))
    return ev(kind, at, case, eid=f"i{index}", **{**dims, **fields})


@st.composite
def sequences(draw: st.DrawFn) -> list[dict[str, Any]]:
    size = draw(st.integers(0, 25))
    return [draw(event_docs(i)) for i in range(size)]


def _without_duplicate_count(report: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(report)
    del out["events"]["duplicate"]
    return out


@settings(max_examples=100, deadline=None)
@given(sequences())
def test_invariants(docs: list[dict[str, Any]]) -> None:
    """Outcomes partition conclusions; ratios are proportions; duplicates change nothing."""
    report = run(docs).report
    for group in [report["totals"], *report["by_intent"].values(),
                  *report["by_agent_version"].values()]:
        outcomes = sum(group[o] for o in ("autonomous", "unverified", "human", "escalated"))
        assert outcomes == group["cases_concluded"]
        assert group["arr"] is None or 0 <= group["arr"] <= 1
    t = report["totals"]
    assert t["cases_concluded"] <= len(CASES)
    assert t["fcr_failures_24h"] <= t["autonomous"]
    assert t["reopened_24h"] <= t["fcr_failures_24h"]
    assert report["events"]["valid"] == len(docs)
    assert report["events"]["duplicate"] == 0

    interleaved = run([d for doc in docs for d in (doc, dict(doc))]).report
    appended = run(docs + [dict(doc) for doc in docs]).report
    for doubled in (interleaved, appended):
        assert doubled["events"]["duplicate"] == len(docs)
        assert _without_duplicate_count(doubled) == _without_duplicate_count(report)

    assert run(docs, roundtrip=True).report == report


# --- the duplicate memory: the last 1,000 event ids counted (KPIS.md) ------------------------


def _replies(event_ids: list[str]) -> list[bool]:
    """Apply a response_sent per id to one case; whether each was taken as a duplicate."""
    state, out = None, []
    for offset, event_id in enumerate(event_ids):
        event = parse_event(orjson.dumps(ev("response_sent", offset, eid=event_id,
                                             latency_ms=5)))
        step = apply_event(state, event, partition=0, offset=offset, watermark_us=None,
                           windows=WindowPolicy())
        state = CaseState.from_bytes(step.state.to_bytes())
        out.append(step.duplicate)
    return out


def test_an_id_repeated_after_1000_newer_ones_counts_as_a_new_event() -> None:
    newer = [f"n{i}" for i in range(1000)]
    assert _replies(["old", *newer, "old"])[-1] is False
    assert _replies(["old", *newer[:999], "old"])[-1] is True
    # a duplicate is not counted, so it does not push an id out of the memory
    assert _replies(["old", *newer[:999], "n5", "old"])[-2:] == [True, True]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1300), min_size=1, max_size=2500))
def test_duplicates_are_the_ids_among_the_last_1000_counted(ids: list[int]) -> None:
    model: list[str] = []  # the contract's rule, in full
    expected = []
    for event_id in map(str, ids):
        duplicate = event_id in model[-1000:]
        expected.append(duplicate)
        if not duplicate:
            model.append(event_id)
    assert _replies([str(i) for i in ids]) == expected


def test_a_case_stored_by_the_previous_version_keeps_its_last_1000_ids() -> None:
    """0.1.0 stored every id in full under `ids`; the first touch converts it."""
    current = CaseState.from_bytes(apply_event(
        None, parse_event(orjson.dumps(ev("case_opened", 0, eid="x"))), partition=0,
        offset=0, watermark_us=None, windows=WindowPolicy()).state.to_bytes())
    old = orjson.loads(current.to_bytes())
    del old["seen"]
    old["ids"] = [f"id-{i}" for i in range(1500)]
    state = CaseState.from_bytes(orjson.dumps(old))
    assert len(state.seen) == 1000 and len(state.to_bytes()) < 25_000

    def duplicate(event_id: str) -> bool:
        event = parse_event(orjson.dumps(ev("response_sent", 1, eid=event_id, latency_ms=5)))
        return apply_event(copy.deepcopy(state), event, partition=0, offset=9,
                           watermark_us=None, windows=WindowPolicy()).duplicate

    assert duplicate("id-1499") and duplicate("id-500")
    assert not duplicate("id-499") and not duplicate("id-1500")


def test_the_duplicate_memory_is_bounded_whatever_the_ids() -> None:
    longest = ["\U0001f600" * 124 + f"{i:04d}" for i in range(3000)]  # 128 code points
    state = None
    for offset, event_id in enumerate(longest):
        event = parse_event(orjson.dumps(ev("response_sent", offset, eid=event_id,
                                             latency_ms=5)))
        state = apply_event(state, event, partition=0, offset=offset, watermark_us=None,
                            windows=WindowPolicy()).state
    assert len(state.seen) == 1000
    assert len(orjson.dumps(state.seen)) < 20_000  # 1,000 x 19 bytes, not 1,000 x 512

"""Annotation items, priorities, the random sample and the resend guard (no broker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core import kpis
from streams.core.annotations import (
    PRIORITIES,
    RANDOM_SAMPLE,
    SCHEMA_VERSION,
    CaseView,
    ItemError,
    ResendGuard,
    Source,
    TailRecord,
    build_item,
    decode,
    encode,
    encode_within,
    item_id,
    priority,
    sample_point,
    sampled,
)
from streams.core.events import parse_event
from streams.core.kpis import Aggregate, Fact
from streams.core.ledger import RECORD_LIMIT, Ledger
from streams.core.windows import WindowPolicy
from streams.metrics.exporter import GroupCollector, GroupFigures, LabelBounds

TS = 1_795_352_400_000
ROUTING_REASONS = {"thumbs_down", "low_csat", "low_ces", "escalated", "unverified_resolution",
                   "human_override", "reopened", "knowledge_missing", "low_score"}


def ev(event_type: str, n: int, case: str = "c1", **fields: Any) -> bytes:
    return orjson.dumps({"event_id": f"{case}-{n}", "type": event_type, "case_id": case,
                         "ts": TS + n * 1000, **fields})


# --- priorities -----------------------------------------------------------------------------


def test_every_reason_has_a_priority_and_overrides_come_first() -> None:
    assert set(PRIORITIES) == ROUTING_REASONS | {RANDOM_SAMPLE}
    assert priority("human_override") == priority("unverified_resolution") == 1
    assert priority("human_override") < priority("escalated") < priority("low_score") \
        < priority(RANDOM_SAMPLE)
    assert priority("no_such_reason") == max(PRIORITIES.values())


def test_the_metric_carries_the_priority_of_its_reason() -> None:
    agg = Aggregate()
    for reason in ("human_override", "escalated", "low_csat", "low_csat"):
        agg.add_fact(Fact(kpis.ANNOTATION, (reason,), 1.0, ("refund", "web", "v1")))
    samples = {(s.labels["reason"], s.labels["priority"]): s.value
               for metric in GroupCollector(GroupFigures(agg), LabelBounds()).collect()
               for s in metric.samples
               if s.name == "acsr_annotation_routed_total"}
    assert samples == {("human_override", "1"): 1, ("escalated", "2"): 1, ("low_csat", "3"): 2}


# --- item ids and the sample ----------------------------------------------------------------


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
       st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_item_ids_are_stable_and_never_shared(case_a: str, reason_a: str, case_b: str,
                                              reason_b: str) -> None:
    assert item_id(case_a, reason_a) == item_id(case_a, reason_a)
    if (case_a, reason_a) != (case_b, reason_b):
        assert item_id(case_a, reason_a) != item_id(case_b, reason_b)


def test_ids_do_not_collide_when_a_separator_moves() -> None:
    assert item_id("a/b", "c") != item_id("a", "b/c")


def test_sample_rate_holds_on_ten_thousand_cases() -> None:
    cases = [f"case-{i:05d}" for i in range(10_000)]
    for rate in (0.01, 0.1, 0.5):
        n = sum(sampled(case, rate) for case in cases)
        sigma = (10_000 * rate * (1 - rate)) ** 0.5
        assert abs(n - 10_000 * rate) <= 4 * sigma, (rate, n)
    assert not any(sampled(case, 0.0) for case in cases)
    assert all(sampled(case, 1.0) for case in cases)


@given(st.text(min_size=1, max_size=128), st.floats(0, 1), st.floats(0, 1))
def test_the_sample_is_fixed_by_the_case_and_nested_in_larger_rates(case_id: str, low: float,
                                                                   high: float) -> None:
    low, high = sorted((low, high))
    assert 0 <= sample_point(case_id) < 1
    assert sampled(case_id, low) == sampled(case_id, low)
    if sampled(case_id, low):
        assert sampled(case_id, high)


# --- items ----------------------------------------------------------------------------------


def _item(reason: str, trigger: dict[str, Any], **case: Any) -> dict[str, Any]:
    view = CaseView(dims=("refund", "web", "v7"), outcome=case.get("outcome"),
                    policy_failed=case.get("policy_failed", False),
                    failed_actions=case.get("failed_actions", ()))
    return build_item("c1", reason, trigger, view, Source("acsr.events", 3, 42))


def test_an_override_item_carries_the_corrective_triad() -> None:
    trigger = orjson.loads(ev("human_override", 1, original_action="refund",
                              final_action="deny", rationale="over limit", policy_clause="4.2"))
    item = _item("human_override", trigger, outcome=None)
    assert item["correction"] == {"original_action": "refund", "final_action": "deny",
                                  "rationale": "over limit", "policy_clause": "4.2"}
    assert item["priority"] == 1
    assert item["trigger"] == trigger
    assert (item["intent"], item["channel"], item["agent_version"]) == ("refund", "web", "v7")
    assert item["source"] == {"topic": "acsr.events", "partition": 3, "offset": 42}
    assert item["ts"] == "2026-11-22T13:00:01Z"
    assert item["item_id"] == item_id("c1", "human_override")
    assert item["schema_version"] == SCHEMA_VERSION


def test_an_item_too_large_for_the_broker_is_cut_never_dropped() -> None:
    """A valid override of nearly 1 MiB would make an item of nearly 2 MB (its texts are
    copied twice): over the limit, the item keeps every field but long texts are cut."""
    rationale = "r" * 700_000
    trigger = orjson.loads(ev("human_override", 1, original_action="refund",
                              final_action="deny", rationale=rationale, note="n" * 200_000))
    item = _item("human_override", trigger)
    assert len(encode(item)) > RECORD_LIMIT
    assert encode_within(item, 10**7) == encode(item)  # small enough: unchanged
    cut = decode(encode_within(item, RECORD_LIMIT))
    assert len(encode(cut)) <= RECORD_LIMIT and cut["truncated"] is True
    assert cut["correction"]["rationale"] == rationale[:4096] + "…"
    assert cut["trigger"]["note"] == "n" * 4096 + "…"
    assert cut["correction"]["final_action"] == "deny"
    assert {name: cut[name] for name in item if name not in ("trigger", "correction")} == {
        name: item[name] for name in item if name not in ("trigger", "correction")}

    # Thousands of short unknown fields: only the trigger's identifying fields stay.
    crowded = orjson.loads(ev("thumbs_submitted", 2, vote="down",
                              **{f"f{i}": "x" * 90 for i in range(11_000)}))
    item = _item("thumbs_down", crowded)
    cut = decode(encode_within(item, RECORD_LIMIT))
    assert len(encode(cut)) <= RECORD_LIMIT < len(encode(item))
    assert cut["trigger"] == {name: crowded[name]
                              for name in ("event_id", "type", "case_id", "ts")}


def test_other_items_have_no_correction_and_say_why_the_case_is_there() -> None:
    trigger = orjson.loads(ev("case_resolved", 2, by="agent"))
    item = _item("unverified_resolution", trigger, outcome="unverified", policy_failed=True,
                 failed_actions=("refund",))
    assert item["correction"] is None
    assert item["outcome"] == "unverified"
    assert item["signals"] == {"policy_failed": True, "overridden": False,
                               "failed_actions": ["refund"]}


def test_items_round_trip_and_other_versions_are_refused() -> None:
    item = _item("low_csat", orjson.loads(ev("csat_submitted", 1, score=1)))
    assert decode(encode(item)) == item
    with pytest.raises(ItemError):
        decode(encode({**item, "schema_version": 2}))
    with pytest.raises(ItemError):
        decode(b"not json")


# --- routing through the ledger -------------------------------------------------------------


def _ledger_routes(lines: list[bytes], rate: float) -> list[tuple[str, str]]:
    ledger = Ledger(WindowPolicy(sizes_s=(3600,)), retention_us=7 * 86_400_000_000,
                    sample_rate=rate)
    cases: dict[str, bytes] = {}
    routes = []
    for offset, line in enumerate(lines):
        event = parse_event(line)
        step = ledger.apply_event(cases, {}, event, 0, offset)
        if step is not None:
            routes.extend((event.case_id, r.reason) for r in step.routes)
    return routes


def _resolved(case: str, by: str = "agent", intent: bool = True) -> list[bytes]:
    first = ev("intent_classified", 1, case, intent="refund", confidence=0.9) if intent \
        else ev("case_opened", 1, case)
    return [first, ev("case_resolved", 2, case, by=by)]


def test_only_sampled_autonomous_resolutions_are_routed_as_random_sample() -> None:
    lines = [line for i in range(200) for line in _resolved(f"a{i}")]
    lines += _resolved("h1", by="human") + _resolved("u1", intent=False)
    routes = _ledger_routes(lines, 0.3)
    sampled_cases = {case for case, reason in routes if reason == RANDOM_SAMPLE}
    assert sampled_cases == {f"a{i}" for i in range(200) if sampled(f"a{i}", 0.3)}
    assert ("u1", "unverified_resolution") in routes
    assert _ledger_routes(lines, 0.0) == [("u1", "unverified_resolution")]


def test_planning_writes_nothing_until_committed() -> None:
    ledger = Ledger(WindowPolicy(sizes_s=(3600,)), retention_us=1, sample_rate=1.0)
    cases: dict[str, bytes] = {}
    first, resolved = (parse_event(line) for line in _resolved("c1"))
    ledger.apply_event(cases, {}, first, 0, 0)
    before = dict(cases)
    plan = ledger.plan_batch(cases, {}, 0, [(1, resolved)])
    [applied] = plan.applied
    assert [r.reason for r in applied.step.routes] == [RANDOM_SAMPLE]
    assert cases == before and ledger.aggregates[0].series.get(
        (kpis.ANNOTATION, (RANDOM_SAMPLE,), ("refund", "unknown", "unknown"))) is None
    ledger.commit_batch(cases, plan)
    assert cases != before
    assert ledger.plan_batch(cases, {}, 0, [(1, resolved)]).applied == []  # a redelivery now


# --- the resend guard -----------------------------------------------------------------------


@dataclass
class _Logged:
    offset: int  # source offset
    horizon: int


def _scan(log: list[_Logged], first_offset: int, chunk: int) -> ResendGuard:
    guard = ResendGuard(first_offset)
    end = len(log)
    while end > 0:
        start = max(0, end - chunk)
        records = [TailRecord(f"c{r.offset}", "r", r.offset, r.horizon)
                   for r in reversed(log[start:end])]
        if guard.take(records):
            break
        end = start
    return guard


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_crashes_anywhere_never_send_an_item_twice_nor_lose_one(data: st.DataObject) -> None:
    """A model of the worker: sessions start at the committed offset, send each routed
    event's item unless the guard has it, and crash with any suffix of their writes lost.
    A session may route more than the one before it (e.g. restarted with a higher sample
    rate): that is what the items' horizon is for."""
    events = data.draw(st.integers(1, 40))
    chunk = data.draw(st.integers(1, 8))
    routed = data.draw(st.lists(st.booleans(), min_size=events, max_size=events))
    log: list[_Logged] = []
    persisted: set[int] = set()  # events whose case write (recording its items) survived
    recorded: set[int] = set()  # events whose persisted write records an item
    committed = 0
    for session in range(8):
        if session and data.draw(st.booleans()):  # this session routes more events
            routed = [r or data.draw(st.booleans()) for r in routed]
        guard = _scan(log, committed, chunk)
        last = session == 7
        end = events if last else data.draw(st.integers(committed, events))
        for offset in range(committed, end):  # processed, then a crash (or the end)
            if offset in persisted:
                continue  # a redelivery of an applied event: skipped by its case's offset
            if routed[offset] and not guard.already_sent(f"c{offset}", "r"):
                log.append(_Logged(offset, guard.horizon))
        # The changelog got the writes up to `landed` (in order); the committed offset is
        # never past them (Faust commits after a complete flush).
        landed = end if last else data.draw(st.integers(committed, end))
        recorded.update(o for o in range(committed, landed)
                        if routed[o] and o not in persisted)
        persisted.update(range(landed))
        committed = landed if last else data.draw(st.integers(committed, landed))
        if committed == events:
            break
    sent = [r.offset for r in log]
    assert len(sent) == len(set(sent)), "an item was sent twice"
    assert recorded <= set(sent), "a recorded item was never sent"

"""What makes the pure core fast must change nothing it computes: the one-pass validation
(msgspec) gives what the rule-by-rule checks give, a case kept decoded between batches is
never a stale one, case records are the same bytes, and a batch with an invalid message
is freed without the garbage collector."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core import cases as cases_module
from streams.core.cases import CaseState
from streams.core.events import (
    EVENT_TYPES,
    READER_CLOCK,
    Event,
    InvalidEvent,
    _valid_at_once,
    parse_event,
    validate_event,
)
from streams.core.kpis import Aggregate, build_report
from streams.core.ledger import Ledger
from streams.core.state_bytes import dump_state
from streams.core.units import SECOND_US
from streams.core.windows import WindowPolicy
from streams.tools.bench import generate_events

from .conftest import report_mismatches
from .test_events import VALID

NAMES = sorted({"event_id", "case_id", "ts", "type", "schema_version", "intent", "channel",
                "agent_version", "unknown", "customer_id", "related_case_id", "confidence",
                "policy", "passed", "clause", "action", "success", "latency_ms", "error",
                "cost_usd", "tokens_in", "tokens_out", "turn_id", "fallback", "reason", "note",
                "by", "original_action", "final_action", "rationale", "policy_clause", "score",
                "vote", "adopted", "kind", "document_id", "name", "evaluator"})
TRICKY = st.sampled_from([
    None, True, False, 0, -1, 1, 2, 3, 5, 7, 8, 1.0, 0.5, 1.5, 5.0, -0.0, 1.0000001, 1e300,
    2**63, 2**64 - 1, -(2**63), 1_795_352_709_120, 946_684_799_999, -62_135_596_800_001,
    253_402_300_800_000, "", "x", "x" * 32, "x" * 33, "x" * 64, "x" * 65, "x" * 129,
    "😀" * 64, "😀" * 65, [], {}, [1], {"a": 1}, "2026-11-22T13:05:09Z", "2026-11-22T25:05:09Z",
    "agent", "human", "up", "down", "missing", "irrelevant", "teleport", *EVENT_TYPES])


def outcome(check: Any, doc: dict[str, Any]) -> Event | str | None:
    try:
        return check(doc)
    except InvalidEvent as invalid:
        return invalid.reason


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([*EVENT_TYPES, "teleport"]),
       st.lists(st.tuples(st.sampled_from(NAMES), TRICKY | st.just(KeyError)), max_size=4))
def test_one_pass_validation_takes_only_what_the_checks_take(
        event_type: str, changes: list[tuple[str, Any]]) -> None:
    """A message the msgspec struct takes is valid, with the same event; every other goes
    through the checks, which name its reason (and may still find it valid)."""
    doc: dict[str, Any] = {"event_id": "e", "type": event_type, "case_id": "c",
                           "ts": 1_795_352_709_120, **VALID.get(event_type, {})}
    for name, value in changes:
        if value is KeyError:
            doc.pop(name, None)
        else:
            doc[name] = value
    doc = orjson.loads(orjson.dumps(doc))
    checked = outcome(lambda d: validate_event(d, READER_CLOCK), doc)
    at_once = outcome(lambda d: _valid_at_once(d, READER_CLOCK), doc)
    assert at_once is None or at_once == checked
    if isinstance(checked, Event):
        assert at_once == checked  # and every valid one takes the fast way
    assert outcome(parse_event, orjson.dumps(doc)) == checked


def test_simulated_traffic_parses_in_one_pass() -> None:
    docs = []
    for line in generate_events(2000, seed=5)[0]:
        try:
            docs.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    docs = [doc for doc in docs if isinstance(doc, dict)]
    valid = [outcome(validate_event, doc) for doc in docs]
    fast = [outcome(lambda d: _valid_at_once(d, READER_CLOCK), doc) for doc in docs]
    assert len([v for v in valid if isinstance(v, Event)]) > 1900
    assert [f for f, v in zip(fast, valid, strict=True) if isinstance(v, Event)] == [
        v for v in valid if isinstance(v, Event)]


# --- cases kept decoded between batches ---------------------------------------------------

DAY_US = 86_400 * SECOND_US


def ledger() -> Ledger:
    return Ledger(WindowPolicy(sizes_s=(60, 3600)), retention_us=7 * DAY_US)


def feed(led: Ledger, table: dict[str, bytes], records: dict[int, bytes],
         lines: list[bytes], start: int, partition: int = 0) -> None:
    """The worker's order for one batch (BatchProcessor.batch and _land)."""
    batch: list[tuple[int, Any]] = []
    for offset, line in enumerate(lines, start):
        try:
            batch.append((offset, parse_event(line)))
        except InvalidEvent as invalid:
            batch.append((offset, invalid))
    plan = led.plan_batch(table, records, partition, batch)
    if plan.applied or plan.invalid:
        led.mark_batch(records, plan)
    led.commit_batch(table, plan)


def report(led: Ledger) -> dict[str, Any]:
    total = Aggregate()
    for agg in led.aggregates.values():
        total.merge(agg)
    return build_report(total)


@pytest.fixture(scope="module")
def traffic() -> list[bytes]:
    return generate_events(3000, seed=3)[0]


def test_a_case_is_decoded_once_while_it_stays_hot(traffic: list[bytes],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []
    from_bytes = CaseState.from_bytes
    monkeypatch.setattr(CaseState, "from_bytes",
                        classmethod(lambda cls, raw: decoded.append(raw) or from_bytes(raw)))
    led, table, records = ledger(), {}, {}
    for start in range(0, 3000, 500):
        feed(led, table, records, traffic[start:start + 500], start)
    assert not decoded
    cold, cold_table, cold_records = Ledger(led.windows, led.retention_us, hot_cases=0), {}, {}
    for start in range(0, 3000, 500):
        feed(cold, cold_table, cold_records, traffic[start:start + 500], start)
    assert decoded  # without the cache, every batch reads its cases again
    assert (cold_table, cold_records, report(cold)) == (table, records, report(led))


def test_a_partition_lost_and_regained_is_read_again(traffic: list[bytes]) -> None:
    """A worker loses a partition, another owner applies events to it, and the partition
    comes back: the worker reads the tables, never the cases it kept."""
    mine, table, records = ledger(), {}, {}
    feed(mine, table, records, traffic[:1500], 0)
    mine.drop({0})  # revoked
    assert not mine.hot.entries
    other = ledger()
    other.build(table.items(), records.items(), {0})
    feed(other, table, records, traffic[1500:2500], 1500)
    mine.build(table.items(), records.items(), {0})  # assigned again
    feed(mine, table, records, traffic[2500:], 2500)
    reference, ref_table, ref_records = ledger(), {}, {}
    for start, end in ((0, 1500), (1500, 2500), (2500, 3000)):
        feed(reference, ref_table, ref_records, traffic[start:end], start)
    assert (table, records) == (ref_table, ref_records)
    assert report_mismatches(report(reference), report(mine)) == []


def test_a_kept_case_is_used_only_while_the_table_holds_its_record(
        traffic: list[bytes]) -> None:
    led, table, records = ledger(), {}, {}
    feed(led, table, records, traffic[:1500], 0)
    case_id, (_, raw, state) = next(iter(led.hot.entries.items()))
    other = CaseState.from_bytes(raw)
    other.offset += 1  # what the table holds now: written by someone else
    table[case_id] = other.to_bytes()
    loaded = led._load(table, 0, case_id, [])
    assert loaded is not state and loaded == other
    assert case_id not in led.hot.entries


def test_revoked_or_rebuilt_partitions_leave_the_cache(traffic: list[bytes]) -> None:
    led, table, records = ledger(), {}, {}
    feed(led, table, records, traffic[:1000], 0, partition=0)
    feed(led, table, records, traffic[1000:2000], 1000, partition=1)
    held = {entry[0] for entry in led.hot.entries.values()}
    assert held == {0, 1}
    led.drop({1})
    assert {entry[0] for entry in led.hot.entries.values()} == {0}
    led.rebuild(table.items(), records.items(), {0})
    assert not led.hot.entries


def test_a_write_that_did_not_land_is_not_kept(traffic: list[bytes]) -> None:
    """A case write lost in a crash: the next batch starts from what the table holds."""

    class Losing(dict):
        def __setitem__(self, key: str, value: bytes) -> None:
            if key != lost:
                super().__setitem__(key, value)

    led, table, records = ledger(), {}, {}
    feed(led, table, records, traffic[:1000], 0)
    lost = orjson.loads(traffic[1000])["case_id"]
    before = table[lost]
    losing = Losing(table)
    feed(led, losing, records, traffic[1000:1001], 1000)
    assert losing[lost] == before
    kept = led.hot.entries[lost]
    assert kept[1] != before  # the ledger holds the write it made...
    assert led._load(losing, 0, lost, []) == CaseState.from_bytes(before)  # ...and reads this


def test_the_kept_cases_are_bounded(traffic: list[bytes]) -> None:
    led = Ledger(WindowPolicy(), retention_us=DAY_US, hot_cases=50)
    table: dict[str, bytes] = {}
    feed(led, table, {}, traffic, 0)
    assert len(led.hot.entries) == 50 < len(table)


# --- records ------------------------------------------------------------------------------


def bytes_as_before(state: CaseState) -> bytes:
    """A case record as the version before kept figures as rows wrote it."""
    agg = state.figures.aggregate()
    dims: dict[Any, int] = {}
    series = [[n, list(lb), dims.setdefault(d, len(dims)), c, s]
              for (n, lb, d), (c, s) in agg.series.items()]
    histograms = [[n, list(lb), dims.setdefault(d, len(dims)), b]
                  for (n, lb, d), b in agg.histograms.items()]
    doc = {name: getattr(state, name) for name in CaseState.__dataclass_fields__}
    doc["figures"] = {"dims": [list(d) for d in dims], "series": series,
                      "histograms": histograms}
    return dump_state(doc)


def test_case_records_are_the_bytes_they_were(traffic: list[bytes]) -> None:
    led, table, records = ledger(), {}, {}
    for start in range(0, 3000, 1000):
        feed(led, table, records, traffic[start:start + 1000], start)
    for raw in table.values():
        state = CaseState.from_bytes(raw)
        assert raw == bytes_as_before(state) == state.to_bytes()
    hot = [entry[2] for entry in led.hot.entries.values()]
    assert hot and all(state.to_bytes() == bytes_as_before(state) for state in hot)


def test_figures_of_a_case_are_not_anything_else() -> None:
    with pytest.raises(TypeError):
        cases_module._figures_doc(object())


# --- garbage ------------------------------------------------------------------------------


def test_a_batch_with_an_invalid_message_is_freed_at_once() -> None:
    """A caught InvalidEvent holds the frames that parsed its batch: without the ledger
    dropping its traceback, the batch and its plan would wait for a full collection."""

    def parse(raw: bytes) -> Event | InvalidEvent:
        try:
            return parse_event(raw)
        except InvalidEvent as invalid:
            return invalid

    def one_batch(led: Ledger) -> weakref.ref[Any]:
        lines = [*generate_events(20, seed=4)[0], b'{"a":1e400', b"[1]"]
        batch = [(offset, parse(line)) for offset, line in enumerate(lines)]
        plan = led.plan_batch({}, {}, 0, batch)
        return weakref.ref(plan)

    led = ledger()
    gc.disable()
    try:
        plan = one_batch(led)
        assert plan() is None
    finally:
        gc.enable()

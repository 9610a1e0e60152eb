"""No case can stop the processor: what is stored per case and per partition stays bounded,
and every figure is kept (KPIS.md, Bounded state; docs/architecture.md)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.config import ConfigError, from_env
from streams.core import archive
from streams.core import ledger as ledger_module
from streams.core.cases import (
    FAILED_ACTION_MEMORY,
    TIME_MEMORY,
    CaseState,
    related_case,
    remember_time,
)
from streams.core.events import InvalidEvent, parse_event
from streams.core.kpis import Aggregate, build_report
from streams.core.ledger import RECORD_LIMIT, Ledger, PartitionRecord, RecordTooLarge
from streams.core.units import DAY_US, SECOND_US
from streams.core.windows import WindowPolicy

from .conftest import report_mismatches
from .loop_traffic import mixed

DATA = Path(__file__).parent / "data"
# The largest case record the design allows, with the longest ids and names the contract
# allows (docs/architecture.md, Bounded state).
WORST_CASE_BYTES = 256 * 1024
T0_MS = 1_795_352_400_000


def _ledger(**bounds: int) -> Ledger:
    ledger = Ledger(WindowPolicy(sizes_s=(3600,)), retention_us=7 * 86_400 * SECOND_US)
    for name, value in bounds.items():
        setattr(ledger, name, value)
    return ledger


def _unbounded() -> Ledger:
    """The rules without spills: every case keeps all its figures in its own record."""
    return _ledger(spill_entries=10**9, spill_bytes=10**12, record_limit=10**12)


def _parse(line: bytes) -> Any:
    try:
        return parse_event(line)
    except InvalidEvent as invalid:
        return invalid


class Tables:
    """One worker's tables and ledger, fed batch by batch as the worker does."""

    def __init__(self, ledger: Ledger, cases: dict | None = None, records: dict | None = None,
                 partitions: int = 2) -> None:
        self.ledger, self.partitions = ledger, partitions
        self.cases: dict[str, bytes] = {} if cases is None else cases
        self.records: dict[int, bytes] = {} if records is None else records
        self.offsets: dict[int, int] = {}
        self.written: list[bytes] = []  # every value written, to check sizes

    def partition(self, case_id: str) -> int:
        return zlib.crc32(case_id.encode()) % self.partitions

    def feed(self, lines: Iterable[bytes], batch: int = 500) -> Tables:
        pending: dict[int, list[tuple[int, Any]]] = {}
        for line in lines:
            parsed = _parse(line)
            partition = 0 if isinstance(parsed, InvalidEvent) else self.partition(
                parsed.case_id)
            offset = self.offsets[partition] = self.offsets.get(partition, -1) + 1
            pending.setdefault(partition, []).append((offset, parsed))
            if len(pending[partition]) >= batch:
                self.batch(partition, pending.pop(partition))
        for partition, items in sorted(pending.items()):
            self.batch(partition, items)
        return self

    def batch(self, partition: int, items: list[tuple[int, Any]],
              landed: set[str] | None = None, spills_landed: bool = True) -> None:
        """One batch; `landed` names the only cases whose writes reach the table (the
        figures records of a landed case, written before it, land too; the others' with
        `spills_landed`)."""
        for _, parsed in items:
            related = None if isinstance(parsed, InvalidEvent) else related_case(parsed)
            if related is not None:
                self.ledger.apply_link(self.cases, related, self.partition(related),
                                       parsed.ts_us)
        plan = self.ledger.plan_batch(self.cases, self.records, partition, items)
        self.ledger.mark_batch(self.records, plan)
        if landed is None:
            self.ledger.commit_batch(self.cases, plan)
        else:
            for key, raw in plan.spilled.items():
                if spills_landed or key.split("\x00")[0] in landed:
                    self.cases[key] = raw
            for case_id in plan.encoded.keys() & landed:
                self.cases[case_id] = plan.encoded[case_id]
        self.written += [*plan.spilled.values(), *plan.encoded.values(),
                         *self.records.values()]

    def report(self) -> dict[str, Any]:
        total = Aggregate(window_sizes=())
        for agg in self.ledger.aggregates.values():
            total.merge(agg)
        return build_report(total)

    def rebuilt(self) -> Tables:
        """A new worker on these tables (after a crash or a rebalance)."""
        again = Tables(_ledger(**_bounds(self.ledger)), self.cases, self.records,
                       self.partitions)
        again.ledger.rebuild(self.cases.items(), self.records.items(),
                             set(range(self.partitions)))
        again.offsets = dict(self.offsets)
        return again


def _bounds(ledger: Ledger) -> dict[str, int]:
    return {"spill_entries": ledger.spill_entries, "spill_bytes": ledger.spill_bytes,
            "record_limit": ledger.record_limit}


@pytest.fixture(scope="module")
def loops() -> list[bytes]:
    return list(mixed(cases=120, replies=3000, actions=700, reopens=300, resends=200))


@pytest.fixture(scope="module")
def unbounded_report(loops: list[bytes]) -> dict[str, Any]:
    return Tables(_unbounded()).feed(loops).report()


# --- the pieces of a case's memory ------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(times=st.lists(st.integers(0, 20 * 24), max_size=200),
       concluded=st.integers(-24, 21 * 24))
def test_kept_times_answer_like_every_time(times: list[int], concluded: int) -> None:
    """Whether a reopen (or link) came within a day after the conclusion: the pruned times
    give the answer all the times give, and stay at most two per day of spread."""
    hour = 3600 * SECOND_US
    kept: list[int] = []
    for t in times:
        remember_time(kept, t * hour)
    conclusion = concluded * hour
    within = [0 <= t * hour - conclusion <= DAY_US for t in times]
    assert any(0 <= t - conclusion <= DAY_US for t in kept) == any(within)
    assert kept == sorted(set(kept)) and set(kept) <= {t * hour for t in times}
    if times:
        assert len(kept) <= 2 * ((max(times) - min(times)) // 24 + 1) + 1


def test_times_past_the_memory_forget_the_oldest() -> None:
    kept: list[int] = []
    for day in range(3 * TIME_MEMORY):
        remember_time(kept, day * DAY_US * 2)  # each two days from the next: all kept
    assert len(kept) == TIME_MEMORY and kept[-1] == (3 * TIME_MEMORY - 1) * DAY_US * 2


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d" * 300, "é" * 80]),
                               st.booleans()), max_size=60))
def test_failed_actions_follow_each_actions_last_result(runs: list[tuple[str, bool]]) -> None:
    state, last = CaseState(partition=0), {}
    for action, success in runs:
        state.record_action(action, success)
        last[action] = success
    assert state.actions_all_succeeded() == all(last.values())
    assert len(state.failed_actions) == sum(not ok for ok in last.values())
    assert all(len(name) <= 64 for name in state.failed_names)


def test_a_case_with_more_failed_actions_than_it_remembers_is_never_autonomous() -> None:
    state = CaseState(partition=0)
    for i in range(FAILED_ACTION_MEMORY + 1):
        state.record_action(f"tool-{i}", False)
    for i in range(1, FAILED_ACTION_MEMORY + 1):
        state.record_action(f"tool-{i}", True)
    assert len(state.failed_actions) == 0 and state.actions_forgotten
    assert not state.actions_all_succeeded()  # tool-0 was forgotten, not known to succeed


# --- the whole case: bounded, and every figure kept ---------------------------------------


def _hostile_case(events: int, seed: int) -> list[bytes]:
    """One case sent everything that grows state, with the longest ids and names allowed
    (128 and 64 characters of 4 UTF-8 bytes, escaped characters, 300-character actions)."""
    import random

    rng = random.Random(seed)
    wide = "\U0001f600"
    case = wide * 128
    lines = []
    for i in range(events):
        kind = rng.choice(["reply", "action", "reopen", "eval", "policy", "csat", "open"])
        doc: dict[str, Any] = {"event_id": f"{i:08d}" + wide * 120, "case_id": case,
                               "ts": T0_MS - rng.randint(0, 400) * 86_400_000 + i}
        if kind == "reply":
            doc |= {"type": "response_sent", "latency_ms": rng.randint(0, 90_000),
                    "cost_usd": 0.01}
        elif kind == "action":
            doc |= {"type": "action_executed", "success": rng.random() < 0.5,
                    "action": f"{i:05d}" + "\u0001" * 295, "cost_usd": 0.2}
        elif kind == "reopen":
            doc |= {"type": "case_reopened"}
        elif kind == "eval":
            doc |= {"type": "evaluation_scored", "name": f"{i:05d}" + wide * 59,
                    "score": rng.random()}
        elif kind == "policy":
            doc |= {"type": "policy_checked", "policy": "p", "passed": rng.random() < 0.9}
        elif kind == "csat":
            doc |= {"type": "csat_submitted", "score": rng.randint(1, 5)}
        else:
            doc |= {"type": "case_opened", "intent": wide * 64, "channel": wide * 32,
                    "agent_version": wide * 64}
        lines.append(orjson.dumps(doc))
    return lines


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), batch=st.sampled_from([1, 37, 500]))
def test_a_case_record_stays_under_the_bound_whatever_it_receives(seed: int, batch: int
                                                                    ) -> None:
    lines = _hostile_case(5000, seed)
    lines.append(orjson.dumps({"event_id": "end", "type": "case_resolved",
                               "case_id": "\U0001f600" * 128, "ts": T0_MS, "by": "agent"}))
    bounded = Tables(_ledger()).feed(lines, batch=batch)
    assert bounded.report()["events"]["valid"] == len(lines)
    largest = max(len(raw) for raw in bounded.written)
    assert largest <= WORST_CASE_BYTES < RECORD_LIMIT
    assert max(len(raw) for raw in bounded.cases.values()) <= WORST_CASE_BYTES
    unbounded = Tables(_unbounded()).feed(lines, batch=1000)  # one record, rewritten
    assert max(len(raw) for raw in unbounded.cases.values()) > WORST_CASE_BYTES
    assert report_mismatches(unbounded.report(), bounded.report()) == []
    assert report_mismatches(bounded.report(), bounded.rebuilt().report()) == []


def test_loops_keep_every_figure_and_stay_small(loops: list[bytes],
                                                unbounded_report: dict[str, Any]) -> None:
    bounded = Tables(_ledger()).feed(loops)
    assert report_mismatches(unbounded_report, bounded.report()) == []
    assert bounded.report()["events"]["duplicate"] >= 200
    spills = sum(agg.pipeline.get(("spilled", ""), 0) for agg in bounded.ledger.aggregates.values())
    assert spills >= 2  # the case with 700 actions
    assert max(len(raw) for raw in bounded.written) < 64 * 1024
    assert report_mismatches(unbounded_report, bounded.rebuilt().report()) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_crash_after_a_spill_counts_each_figure_once(
        loops: list[bytes], unbounded_report: dict[str, Any], data: st.DataObject) -> None:
    """A batch that spilled wrote its marker, then only some of its cases' records: a new
    worker re-applies it (from any cut) and counts every figure once."""
    tables = Tables(_ledger(spill_entries=data.draw(st.sampled_from([4, 16, 64]))),
                    partitions=1)
    parsed = [(offset, _parse(line)) for offset, line in enumerate(loops)]
    start = data.draw(st.integers(0, len(parsed) - 2))
    end = data.draw(st.integers(start + 1, min(len(parsed), start + 3000)))
    if start:
        tables.batch(0, parsed[:start])
    plan_cases = {p.case_id for _, p in parsed[start:end] if not isinstance(p, InvalidEvent)}
    landed = set(data.draw(st.lists(st.sampled_from(sorted(plan_cases)), unique=True)))
    tables.batch(0, parsed[start:end], landed=landed, spills_landed=data.draw(st.booleans()))
    again = tables.rebuilt()
    cut = data.draw(st.integers(start, len(parsed)))
    for piece in (parsed[start:cut], parsed[cut:]):
        if piece:
            again.batch(0, piece)
    assert report_mismatches(unbounded_report, again.report()) == []
    assert report_mismatches(unbounded_report, again.rebuilt().report()) == []


# --- the guard ----------------------------------------------------------------------------


class Refusing(dict):
    """A table that fails the test if a value over `limit` is ever written."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: bytes) -> None:
        assert len(value) <= self.limit, f"{len(value)} bytes sent for {key!r}"
        super().__setitem__(key, value)


def test_a_record_over_the_limit_never_reaches_the_table() -> None:
    """Forced: a limit below what the duplicate memory alone takes. Planning refuses the
    batch (the worker then dead-letters the event as state_too_large) and writes nothing."""
    limit = 8_000
    ledger = _ledger(record_limit=limit, spill_bytes=limit // 2)
    cases, records = Refusing(limit), Refusing(limit)
    lines = [orjson.dumps({"event_id": f"e-{i}", "type": "response_sent", "case_id": "c",
                           "ts": T0_MS + i, "latency_ms": 5}) for i in range(1000)]
    batch = [(offset, parse_event(line)) for offset, line in enumerate(lines)]
    with pytest.raises(RecordTooLarge, match="the state of case 'c' would take"):
        ledger.plan_batch(cases, records, 0, batch)
    assert cases == {} and records == {}
    # Fewer ids fit: the same events go through, the figures spilled as the record grows.
    plan = ledger.plan_batch(cases, records, 0, batch[:300])
    ledger.mark_batch(records, plan)
    ledger.commit_batch(cases, plan)
    assert plan.spilled and 4_000 < len(cases["c"]) <= limit


def test_every_write_of_a_loop_stays_under_a_forced_limit(loops: list[bytes],
                                                          unbounded_report: dict[str, Any]
                                                          ) -> None:
    limit = 40_000
    tables = Tables(_ledger(record_limit=limit, spill_bytes=limit // 2, spill_entries=64),
                    cases=Refusing(limit), records=Refusing(limit))
    tables.feed(loops)
    assert report_mismatches(unbounded_report, tables.report()) == []


# --- the partition's archive ----------------------------------------------------------------


def test_the_archive_splits_into_shards_that_survive_a_crash(
        loops: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Expired cases' figures go to the archive's shards; a fold whose shards were written
    but whose partition record was not (a crash) leaves the figures where they were."""
    monkeypatch.setattr(archive, "SHARD_BYTES", 3000)
    monkeypatch.setattr(ledger_module, "FOLD_CHUNK", 15)
    tables = Tables(_ledger(), partitions=1).feed(loops)
    before = tables.report()
    ledger = tables.ledger
    assert ledger.maybe_expire(tables.cases, tables.records, 0) == 0
    ledger.watermarks[0] += 8 * DAY_US
    for _ in range(3):
        ledger.maybe_expire(tables.cases, tables.records, 0)
    record = PartitionRecord.from_bytes(tables.records[0])
    assert len(record.shards) >= 4
    assert max(len(raw) for key, raw in tables.records.items() if key < 0) <= 3000
    records_before, cases_before = dict(tables.records), dict(tables.cases)
    assert ledger.maybe_expire(tables.cases, tables.records, 0) == 15
    crashed = {**tables.records, 0: records_before[0]}  # the shards landed, not the record
    assert crashed != records_before
    again = Tables(_ledger(), dict(cases_before), crashed, partitions=1)
    again.ledger.rebuild(again.cases.items(), again.records.items(), {0})
    assert report_mismatches(before, again.report()) == []
    again.ledger.expire(again.cases, again.records, 0, before_us=ledger.watermarks[0])
    assert not [key for key in again.cases if len(key) <= 128]
    assert report_mismatches(before, again.rebuilt().report()) == []


def test_expiry_folds_in_chunks_and_a_crash_before_the_deletes_counts_once(
        loops: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "FOLD_CHUNK", 10)
    tables = Tables(_ledger(), partitions=1).feed(loops)
    before = tables.report()
    newest = max(tables.ledger.watermarks.values())
    ledger = tables.ledger
    assert ledger.maybe_expire(tables.cases, tables.records, 0) == 0  # the first sweep's time
    ledger.watermarks[0] = newest + 8 * DAY_US  # a week and a day later, in event time
    folded = [ledger.maybe_expire(tables.cases, tables.records, 0) for _ in range(5)]
    assert folded == [10] * 5 and ledger.sweeps
    record = PartitionRecord.from_bytes(tables.records[0])
    assert len(record.folded_digests) == 10
    snapshot = dict(tables.cases)
    ledger.maybe_expire(tables.cases, tables.records, 0)
    # The deletes of that fold never landed: a new worker counts those cases once, and
    # its next fold deletes them.
    again = Tables(_ledger(), snapshot, dict(tables.records), partitions=1)
    again.ledger.rebuild(snapshot.items(), again.records.items(), {0})
    assert report_mismatches(before, again.report()) == []
    assert again.ledger.expire(snapshot, again.records, 0, before_us=newest + 1) > 0
    assert snapshot == {}
    assert report_mismatches(before, again.report()) == []
    assert report_mismatches(before, again.rebuilt().report()) == []
    while ledger.maybe_expire(tables.cases, tables.records, 0):
        pass
    assert tables.cases == {} and not ledger.sweeps
    assert report_mismatches(before, tables.rebuilt().report()) == []


# --- stored formats ---------------------------------------------------------------------


def test_tables_written_by_0_1_recover_and_convert(sample_events: Path) -> None:
    """Tables written by 0.1.0 (every id and fact of a case in its record, the archive in the
    partition record, archived cases by id, here with their deletes never landed): this
    version derives the same figures, converts each record when it next writes it, and
    goes on to count the rest of the file as a worker that ran this version throughout."""
    stored = json.loads(gzip.decompress((DATA / "tables-0.1.json.gz").read_bytes()))
    lines = [line for line in sample_events.read_bytes().splitlines() if line.strip()]
    legacy_cases = {k: v.encode() for k, v in stored["cases"].items()}
    legacy_records = {int(k): v.encode() for k, v in stored["partitions"].items()}
    assert b'"facts"' in next(iter(legacy_cases.values()))
    upgraded = Tables(_ledger(), legacy_cases, legacy_records)
    upgraded.ledger.rebuild(upgraded.cases.items(), upgraded.records.items(), {0, 1})
    upgraded.offsets = {int(k): v for k, v in stored["offsets"].items()}
    throughout = Tables(_ledger()).feed(lines[:stored["lines"]], batch=1)
    throughout.ledger.expire(throughout.cases, throughout.records, stored["folded_partition"],
                             stored["folded_before_us"])
    assert report_mismatches(throughout.report(), upgraded.report()) == []
    upgraded.feed(lines[stored["lines"]:], batch=1)
    throughout.feed(lines[stored["lines"]:], batch=1)
    assert report_mismatches(throughout.report(), upgraded.report()) == []
    record = PartitionRecord.from_bytes(upgraded.records[1])
    assert record.shards and not record.archive.get("series")
    assert report_mismatches(throughout.report(), upgraded.rebuilt().report()) == []
    converted = [CaseState.from_bytes(raw) for raw in upgraded.cases.values()]
    assert all(b'"facts"' not in state.to_bytes() for state in converted)


def test_a_batch_larger_than_its_stored_bookkeeping_allows_fails_at_start() -> None:
    with pytest.raises(ConfigError, match=r"\(ACSR_BATCH_MAX\) 20001 must be at most 20,000"):
        from_env({"ACSR_BATCH_MAX": "20001"}).validate()
    assert from_env({"ACSR_BATCH_MAX": "20000"}).validate().batch_max == 20_000

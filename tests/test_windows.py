"""Event-time windows, pure logic: folding, lateness, closing, emission, retention, gauges."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.config import ConfigError, Settings, from_env
from streams.core.events import READER_CLOCK, InvalidEvent, parse_event
from streams.core.kpis import Aggregate, Fact, window_start
from streams.core.ledger import BatchPlan, Ledger
from streams.core.units import SECOND_US
from streams.core.windows import (
    SCHEMA_VERSION,
    Cell,
    PartitionWindows,
    WindowKey,
    WindowPolicy,
    WindowRules,
    aggregate_rows,
    closed_message,
    gauge_values,
    message_key,
)
from streams.kafka.partitioners import CRC32, CaseRouting
from streams.metrics.exporter import GroupCollector, GroupFigures, LabelBounds
from streams.metrics.group import RECENT_WINDOWS, GroupState, Snapshot
from streams.worker.batches import BatchProcessor

from .batch_fakes import Outputs, Table, records, run_now
from .fact_windows import FactWindows
from .traffic import generate

T0_MS = 1_795_352_400_000  # 2026-11-22T13:00:00Z
MIN_MS = 60_000
HOUR_MS = 60 * MIN_MS
DAY_US = 86_400 * SECOND_US
RULES = WindowRules(WindowPolicy(sizes_s=(60, 3600), grace_s=600), retention_s=2 * 86_400)

_ids = itertools.count()


def ev(type_: str, at_ms: int, case: str = "c1", **fields: Any) -> bytes:
    """An event `at_ms` milliseconds after 13:00Z, as a message value."""
    return orjson.dumps({"event_id": f"e{next(_ids)}", "type": type_, "case_id": case,
                         "ts": T0_MS + at_ms, **fields})


def concluded(case: str, at_ms: int, intent: str = "refund", version: str = "v7"
              ) -> list[bytes]:
    """A case classified, then resolved by the agent at `at_ms` (autonomous)."""
    return [ev("intent_classified", at_ms - MIN_MS, case, intent=intent, confidence=0.9,
               agent_version=version),
            ev("case_resolved", at_ms, case, by="agent")]


class PureWindows:
    """The window tables' steps on PartitionWindows alone (the WindowSink of the batch
    protocol): fold a batch's facts, then after it emit closed windows and drop expired
    ones, at the partition's event time."""

    def __init__(self, rules: WindowRules, ledger: Ledger) -> None:
        self.rules, self.ledger = rules, ledger
        self.partitions: dict[int, PartitionWindows] = {}
        self.emitted: list[tuple[int, WindowKey, dict[str, Any]]] = []
        self.max_cells = 0

    def build(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.partitions.setdefault(partition, PartitionWindows(partition, self.rules))

    def fold(self, plan: BatchPlan) -> None:
        windows = self.partitions[plan.partition]
        for applied in plan.applied:
            windows.fold(applied.offset, applied.event.ts_us, applied.step.late,
                         applied.step.facts)

    async def acknowledged(self, partition: int) -> None:
        pass

    async def advance(self, partition: int, offset: int) -> None:
        windows, watermark = self.partitions[partition], self.ledger.watermarks.get(partition)
        for key in windows.closing(watermark):
            self.emitted.append((partition, key, windows.mark_emitted(key).figures()))
        windows.drop(windows.expiring(watermark))
        self.max_cells = max(self.max_cells, sum(len(w) for w in self.partitions.values()))


class Driver:
    """Events through the worker's own batch protocol, one batch each, with the window
    steps of `PureWindows`; `fact_windows` sums the facts' windows too, as the
    independent reference."""

    def __init__(self, rules: WindowRules = RULES, partitions: int = 1) -> None:
        self.rules = rules
        self.ledger = Ledger(rules.policy, retention_us=7 * DAY_US)
        self.sink = PureWindows(rules, self.ledger)
        self.windows = self.sink.partitions
        self.offsets: dict[int, int] = {}
        self.fact_windows = FactWindows(rules.policy.sizes_s)
        self.processor = BatchProcessor(
            self.ledger, Table(), Table(), self.sink, Outputs(partitions),
            bounds=READER_CLOCK, repartitions=False, writes_on=lambda message: nullcontext(),
            applied=lambda plan: [self.fact_windows.add_facts(applied.step.facts)
                                  for applied in plan.applied])

    @property
    def emitted(self) -> list[tuple[int, WindowKey, dict[str, Any]]]:
        return self.sink.emitted

    @property
    def max_cells(self) -> int:
        return self.sink.max_cells

    def feed(self, lines: Iterable[bytes], partitions: int = 1) -> Driver:
        self.processor.outputs.routing = CaseRouting(CRC32, partitions)
        for line in lines:
            try:
                case_id = parse_event(line).case_id
            except InvalidEvent:
                continue
            partition = zlib.crc32(case_id.encode()) % partitions
            offset = self.offsets.get(partition, 0)
            self.offsets[partition] = offset + 1
            self.apply(partition, offset, line)
        return self

    def apply(self, partition: int, offset: int, line: bytes) -> None:
        run_now(self.processor.batch(partition, records([(offset, line)], partition)))

    def cell(self, size: int, at_ms: int, intent: str = "refund", version: str = "v7",
             partition: int = 0) -> Cell | None:
        start = window_start((T0_MS + at_ms) * 1000, size)
        return self.windows[partition].cells.get(WindowKey(size, start, intent, version))

    def messages(self, size: int) -> list[dict[str, Any]]:
        return [figures for _, key, figures in self.emitted if key.size == size]

    def late(self, size: int) -> int:
        return sum(agg.pipeline.get(("late", str(size)), 0)
                   for agg in self.ledger.aggregates.values())


# --- folding ---------------------------------------------------------------------------------


def test_an_event_folds_into_one_window_per_size_by_intent_and_version() -> None:
    d = Driver().feed([*concluded("c1", 5 * MIN_MS), *concluded("c2", 6 * MIN_MS, "billing"),
                       *concluded("c3", 6 * MIN_MS + 10_000, version="v8")])
    assert d.cell(3600, 0).concluded == 1
    assert d.cell(3600, 0, "billing").concluded == 1
    assert d.cell(3600, 0, version="v8").autonomous == 1
    assert d.cell(60, 5 * MIN_MS).aht_count == 1
    assert d.cell(60, 6 * MIN_MS, "billing").concluded == 1
    assert d.cell(60, 6 * MIN_MS) is None  # refund/v7 concluded in minute 5 only


def test_a_cell_holds_every_listed_counter() -> None:
    d = Driver().feed([
        ev("case_opened", 0, "c1", intent="refund", agent_version="v7"),
        ev("policy_checked", MIN_MS, "c1", policy="p", passed=True),
        ev("policy_checked", MIN_MS, "c1", policy="q", passed=False),
        ev("case_escalated", 2 * MIN_MS, "c1", reason="tool_failure"),
        ev("csat_submitted", 3 * MIN_MS, "c1", score=2),
        *concluded("c2", 4 * MIN_MS),
    ])
    cell = d.cell(3600, 0)
    assert cell.outcomes == {"escalated": 1, "autonomous": 1}
    assert cell.escalations == {"tool_failure": 1}
    assert (cell.checks, cell.passed) == (2, 1)
    assert (cell.csat_count, cell.csat_sum) == (1, 2.0)
    assert (cell.aht_count, cell.aht_sum) == (1, 60.0)
    assert Cell.from_bytes(cell.to_bytes()) == cell


def test_a_redelivered_event_is_not_folded_twice() -> None:
    windows = PartitionWindows(0, RULES)
    ts_us = (T0_MS + MIN_MS) * 1000
    facts = [Fact("concluded", ("autonomous",), 1.0, ("refund", "web", "v7"), ts_us),
             Fact("aht", (), 30.0, ("refund", "web", "v7"), ts_us)]
    assert len(windows.fold(7, ts_us, (), facts)) == 2  # one key per size, both facts
    assert windows.fold(7, ts_us, (), facts) == []
    assert windows.fold(5, ts_us, (), facts) == []
    cell = windows.cells[WindowKey(3600, T0_MS // 1000, "refund", "v7")]
    assert (cell.concluded, cell.aht_count, cell.offset) == (1, 1, 7)
    assert len(windows.fold(8, ts_us, (), facts)) == 2
    assert cell.concluded == 2


def test_figures_without_a_window_are_not_folded() -> None:
    d = Driver().feed([ev("thumbs_submitted", 0, vote="up"),
                       ev("response_sent", 0, latency_ms=10, cost_usd=0.1)])
    assert d.windows[0].cells == {}


# --- lateness and closing ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10 * 86_400_000_000), st.integers(-86_400_000_000, 86_400_000_000),
       st.sampled_from([(60, 3600), (300,), (60, 900, 86_400)]), st.integers(0, 3600))
def test_a_window_is_closed_exactly_when_an_event_for_it_is_late(
    ts_us: int, delta_us: int, sizes: tuple[int, ...], grace: int
) -> None:
    rules = WindowRules(WindowPolicy(sizes_s=sizes, grace_s=grace), retention_s=10 * 86_400)
    watermark = ts_us + delta_us
    late = rules.policy.late_sizes(ts_us, watermark)
    for size in sizes:
        closed = watermark > rules.closes_after_us(size, window_start(ts_us, size))
        assert (size in late) is closed


def late_lines(watermark_at_ms: int) -> list[bytes]:
    """c1 concludes at 13:05:30; c2 moves event time to `watermark_at_ms`; c3's conclusion
    stamped 13:05:40 arrives (out of order); later event time passes 14:10 and c4's
    conclusion stamped 13:30 arrives."""
    return [
        *concluded("c1", 5 * MIN_MS + 30_000),
        ev("csat_submitted", watermark_at_ms, "c2", score=4),
        ev("intent_classified", 0, "c3", intent="refund", confidence=0.9, agent_version="v7"),
        ev("case_resolved", 5 * MIN_MS + 40_000, "c3", by="agent"),
        ev("csat_submitted", 80 * MIN_MS, "c2", score=5),
        ev("intent_classified", 80 * MIN_MS, "c4", intent="refund", confidence=0.9,
           agent_version="v7"),
        ev("case_resolved", 30 * MIN_MS, "c4", by="agent"),
    ]


def _late_run(watermark_at_ms: int) -> Driver:
    return Driver().feed(late_lines(watermark_at_ms))


def _concluding(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["cases_concluded"]]


def test_an_out_of_order_event_within_grace_changes_its_window() -> None:
    d = _late_run(14 * MIN_MS)  # 13:14 <= 13:06 + 10 min: the minute window is still open
    [minute] = _concluding(d.messages(60))
    assert minute["cases_concluded"] == 2
    [hour] = _concluding(d.messages(3600))
    assert hour["cases_concluded"] == 2  # c1 and c3; c4 came after the hour closed
    assert (d.late(60), d.late(3600)) == (2, 1)  # c3's intent (13:00) and c4's conclusion


def test_a_late_event_beyond_grace_is_counted_late_and_leaves_the_window() -> None:
    d = _late_run(17 * MIN_MS)  # 13:17 > 13:16: minute 13:05 closed before c3 arrived
    [minute] = _concluding(d.messages(60))
    assert minute["cases_concluded"] == 1  # c1 only
    assert d.cell(60, 5 * MIN_MS).concluded == 1
    [hour] = _concluding(d.messages(3600))
    assert hour["cases_concluded"] == 2
    assert d.cell(3600, 0).concluded == 2  # c4 (13:30, arrived at 14:20) left it unchanged
    assert (d.late(60), d.late(3600)) == (3, 1)
    totals = Aggregate.sum_of((a.to_json() for a in d.ledger.aggregates.values()), (60, 3600))
    assert totals.series[("concluded", ("autonomous",), ("refund", "unknown", "v7"))][0] == 3


def test_each_window_and_key_is_emitted_once_with_its_final_cell() -> None:
    lines = list(generate(150, seed=3))
    d = Driver().feed(lines, partitions=3)
    keys = [(p, key) for p, key, _ in d.emitted]
    assert len(keys) == len(set(keys)) > 100
    for partition, key, figures in d.emitted:
        cell = d.windows[partition].cells.get(key)
        if cell is not None:  # still held: nothing changed it after it was emitted
            assert cell.emitted and cell.figures() == figures
    # everything still held and not emitted is in a window that has not closed
    for partition, windows in d.windows.items():
        watermark = d.ledger.watermarks[partition]
        for key, cell in windows.cells.items():
            assert cell.emitted == (watermark > RULES.closes_after_us(key.size, key.start))


# --- the report's windows --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_cells_sum_to_the_windows_of_the_case_facts(seed: int) -> None:
    """The window tables and the facts of the case states count the same windows."""
    d = Driver(WindowRules(RULES.policy, retention_s=366 * 86_400)).feed(
        generate(200, seed=seed), partitions=4)
    from_cells = Aggregate.from_json({"windows": aggregate_rows(
        (key, cell) for w in d.windows.values() for key, cell in w.cells.items())})
    from_facts = d.fact_windows
    figures = {"concluded", "aht", "policy_check"}
    cells = {k: v for k, v in from_cells.windows.items() if k[2] in figures}
    assert cells.keys() == from_facts.windows.keys()
    for key, (count, total) in from_facts.windows.items():
        assert cells[key] == [count, pytest.approx(total)]
    assert len(cells) > 100


# --- retention and memory ------------------------------------------------------------------


def test_memory_stays_flat_as_event_time_runs_far_past_the_retention() -> None:
    """10 days of event time, a conclusion every 5 minutes, three intents."""
    rules = WindowRules(WindowPolicy(sizes_s=(60, 3600), grace_s=600), retention_s=6 * 3600)
    d = Driver(rules)
    intents = ["refund", "billing", "shipping"]
    held: list[int] = []
    for n in range(10 * 288):
        d.feed(concluded(f"c{n}", n * 5 * MIN_MS, intents[n % 3]))
        if n % 288 == 287:  # once a day, at the same time of day
            held.append(len(d.windows[0]))
    # 6 h of retention: at most 73 minute cells (one per 5 minutes) and 7 hours x 3 intents
    assert max(held) <= 73 + 21
    assert max(held) == min(held)  # flat, not growing with event time
    assert d.max_cells <= 73 + 21 + 2
    assert len(d.emitted) > 3000  # every window closed and was emitted before its drop


def test_recovered_windows_past_the_retention_are_dropped_at_the_next_event() -> None:
    d = Driver().feed([*concluded("c1", 0), *concluded("c2", 3 * HOUR_MS)])
    recovered = PartitionWindows(0, RULES)
    for key, cell in d.windows[0].cells.items():  # as a restarted worker loads them
        recovered.load(key, Cell.from_bytes(cell.to_bytes()))
    assert len(recovered) == 4
    far = (T0_MS + 3 * 86_400_000) * 1000
    expiring = recovered.expiring(far)
    assert len(expiring) == 4
    recovered.drop(expiring)
    assert len(recovered) == 0 and recovered.expiring(far) == []


def test_a_window_is_kept_until_its_retention_has_passed() -> None:
    windows = PartitionWindows(0, RULES)
    ts_us = T0_MS * 1000
    windows.fold(0, ts_us, (), [Fact("policy_check", ("passed",), 1.0, ("a", "b", "c"), ts_us)])
    hour_end_us = (T0_MS + HOUR_MS) * 1000
    retention_us = RULES.retention_s * SECOND_US
    assert [k.size for k in windows.expiring(hour_end_us + retention_us - 1)] == [60]
    assert [k.size for k in windows.expiring(hour_end_us + retention_us)] == [60, 3600]


def test_retention_must_cover_the_largest_window_and_the_grace() -> None:
    with pytest.raises(ConfigError, match="window_retention_s"):
        Settings(window_retention_s=4199).validate()
    assert Settings(window_retention_s=4200).validate().window_retention_s == 4200
    env = from_env({"ACSR_WINDOWS_TOPIC": "kpi.w", "ACSR_WINDOW_RETENTION_S": "90000",
                    "ACSR_WINDOW_SIZES_S": "300,3600"})
    assert (env.windows_topic, env.window_retention_s, env.window_sizes_s) == \
        ("kpi.w", 90000, (300, 3600))
    assert Settings().window_sizes_s == (60, 3600)


# --- the message and the gauges ------------------------------------------------------------


def test_the_closed_window_message() -> None:
    key = WindowKey(3600, T0_MS // 1000, "refund", "v7")
    cell = Cell(outcomes={"autonomous": 3, "escalated": 1}, escalations={"other": 1},
                aht_count=3, aht_sum=90.0, checks=4, passed=3)
    message = closed_message(2, key, cell, {"topic": "t", "partition": 2, "offset": 41})
    assert message["schema_version"] == SCHEMA_VERSION
    assert (message["start"], message["end"]) == ("2026-11-22T13:00:00Z", "2026-11-22T14:00:00Z")
    assert (message["window_seconds"], message["partition"]) == (3600, 2)
    assert (message["cases_concluded"], message["autonomous"], message["escalated"]) == (4, 3, 1)
    assert message["arr"] == 0.75 and message["compliance_score"] == 0.75
    assert message["aht_seconds_mean"] == 30.0
    assert message["csat_mean"] is None  # no CSAT: null, not 0
    assert message["source"]["offset"] == 41


def test_message_keys_are_deterministic_and_unambiguous() -> None:
    a = message_key(1, WindowKey(60, 0, "a|b", "c"))
    b = message_key(1, WindowKey(60, 0, "a", "b|c"))
    assert a != b
    assert a == message_key(1, WindowKey(60, 0, "a|b", "c"))
    assert orjson.loads(a) == [60, "1970-01-01T00:00:00Z", 1, "a|b", "c"]


def test_gauges_sum_components_before_taking_ratios() -> None:
    cells = [Cell(outcomes={"autonomous": 1}, checks=1, passed=1, aht_count=1, aht_sum=10.0),
             Cell(outcomes={"human": 3}, checks=3, passed=0)]
    values = gauge_values(cells)
    assert values["compliance"] == 0.25 and values["arr"] == 0.25 and values["aht"] == 10.0
    assert gauge_values([Cell()])["compliance"] is None


def test_the_exporter_shows_the_latest_closed_window_with_bounded_labels() -> None:
    d = Driver().feed([*concluded("c1", 0, "alpha"),
                       ev("policy_checked", 2 * MIN_MS, "c1", policy="p", passed=False),
                       *concluded("c2", 70 * MIN_MS, "alpha"),
                       *concluded("c3", 70 * MIN_MS + 10_000, "beta"),
                       ev("policy_checked", 71 * MIN_MS, "c2", policy="p", passed=True),
                       ev("csat_submitted", 3 * HOUR_MS, "c9", score=3)])
    windows = d.windows[0]
    watermark = d.ledger.watermarks[0]
    group = GroupState()
    group.add(Snapshot.of(0, 0, d.ledger.aggregates[0],
                          windows.recent_closed(watermark, RECENT_WINDOWS)))
    bounds = LabelBounds(limit=1)
    bounds.admit(group.label_values(group.total()))
    figures = GroupFigures(group.total(), group.group_windows(), 1)
    values = {(s.name, s.labels.get("window"), s.labels.get("intent")): s.value
              for family in GroupCollector(figures, bounds).collect()
              for s in family.samples if s.name.startswith("acsr_window")}
    # 16:00: the 14:00 hour is the latest closed; 'beta' is beyond the label limit: 'other'
    assert values[("acsr_window_cases_concluded", "3600", "alpha")] == 1
    assert values[("acsr_window_cases_concluded", "3600", "other")] == 1
    assert values[("acsr_window_compliance_ratio", "3600", "alpha")] == 1.0
    assert ("acsr_window_compliance_ratio", "3600", "other") not in values  # no check: none
    assert values[("acsr_window_end_timestamp_seconds", "3600", None)] == \
        (T0_MS + 2 * HOUR_MS) / 1000
    assert values[("acsr_window_policy_checks_passed", "60", "alpha")] == 1  # 14:11
    assert not any(intent == "beta" for _, _, intent in values)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from((60, 3600)), st.integers(0, 40),
                              st.sampled_from(("billing", "refund"))), max_size=60),
       watermark_s=st.integers(0, 200_000), count=st.integers(1, 8))
def test_recent_closed_and_expiry_match_a_scan_of_every_window(
        ops: list[tuple[bool, int, int, str]], watermark_s: int, count: int) -> None:
    """The sorted window starts kept beside the cells give what a scan of them gives."""
    rules = WindowRules(WindowPolicy((60, 3600), 600), retention_s=7200)
    windows = PartitionWindows(0, rules)
    for add, size, index, intent in ops:
        key = WindowKey(size, index * size, intent, "v1")
        if add:
            windows.load(key, Cell())
        else:
            windows.drop([key])
    watermark_us = watermark_s * SECOND_US
    for size in (60, 3600):
        closed = rules.latest_closed_start(size, watermark_us)
        starts = sorted({key.start for key in windows.cells
                         if key.size == size and key.start <= closed}, reverse=True)[:count]
        got = windows.recent_closed(watermark_us, count)[size]
        assert list(got.cells) == starts
        assert got.covered_from == (starts[-1] if len(starts) == count else None)
    expiries = [rules.expires_at_us(key.size, key.start) for key in windows.cells]
    assert windows._next_expiry_us == min(expiries, default=None)
    for watermark in (watermark_us, *expiries):
        assert windows.expiring(watermark) == sorted(
            key for key in windows.cells if watermark >= rules.expires_at_us(key.size, key.start))

"""Exactness of the per-partition accounting: redelivery, expiry and rebuild."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

from streams.core.cases import related_case
from streams.core.events import InvalidEvent, parse_event
from streams.core.kpis import Aggregate, build_report
from streams.core.ledger import Ledger, Origin
from streams.core.units import SECOND_US
from streams.core.windows import WindowPolicy

from .conftest import report_mismatches
from .fact_windows import FactWindows

DAY_US = 86_400 * SECOND_US


def _feed(ledger: Ledger, cases: dict, records: dict, lines: list[bytes], partitions: int = 3,
          start: int = 0, windows: Aggregate | None = None,
          placement: Callable[[str], int] | None = None) -> None:
    """Apply lines in order, as one worker would, spreading cases over partitions (CRC32,
    or `placement`); the facts' windows summed into `windows` (the window tables' job in a
    worker)."""
    place = placement or (lambda case_id: _partition(case_id, partitions))
    for offset, line in enumerate(lines, start):
        try:
            event = parse_event(line)
        except InvalidEvent as invalid:
            ledger.apply_invalid(records, 0, offset, invalid.reason)
            continue
        related = related_case(event)
        if related is not None:
            ledger.apply_link(cases, related, place(related), event.ts_us)
        step = ledger.apply_event(cases, records, event, place(event.case_id), offset)
        if step is not None and windows is not None:
            windows.add_facts(step.facts)


def _partition(case_id: str, partitions: int) -> int:
    return zlib.crc32(case_id.encode()) % partitions


def _fed(sample: Path, windows: Aggregate | None = None) -> tuple[Ledger, dict, dict]:
    """A ledger, its case table and partition table after the whole worked example."""
    lines = [line for line in sample.read_bytes().splitlines() if line.strip()]
    ledger = _ledger()
    cases: dict = {}
    records: dict = {}
    _feed(ledger, cases, records, lines, partitions=1, windows=windows)
    return ledger, cases, records


def _ledger() -> Ledger:
    return Ledger(WindowPolicy(sizes_s=(3600,)), retention_us=7 * DAY_US)


def _report(ledger: Ledger, windows: Aggregate | None = None) -> dict:
    total = Aggregate()
    for agg in ledger.aggregates.values():
        total.merge(agg)
    if windows is not None:
        total.windows = windows.windows
    return build_report(total)


def test_redelivered_events_are_not_counted_twice(sample_events: Path) -> None:
    """At-least-once redelivery after a crash: applying a prefix again changes nothing."""
    lines = [line for line in sample_events.read_bytes().splitlines() if line.strip()]
    once, twice = _ledger(), _ledger()
    _feed(once, {}, {}, lines, partitions=1)
    cases: dict = {}
    records: dict = {}
    _feed(twice, cases, records, lines[:1500], partitions=1)
    _feed(twice, cases, records, lines, partitions=1)  # offsets 0.. again, then the rest
    assert report_mismatches(_report(once), _report(twice)) == []


def test_rebuild_from_tables_equals_the_live_aggregates(sample_events: Path,
                                                        expected_report: Path) -> None:
    windows = FactWindows()
    live, cases, records = _fed(sample_events, windows)
    recovered = _ledger()
    recovered.rebuild(cases.items(), records.items(), {0})
    assert report_mismatches(_report(live), _report(recovered)) == []
    assert report_mismatches(json.loads(expected_report.read_text()),
                             _report(recovered, windows)) == []


def test_expired_cases_leave_the_table_but_not_the_figures(sample_events: Path) -> None:
    ledger, cases, records = _fed(sample_events)
    before = _report(ledger)
    newest = max(ledger.watermarks.values())
    folded = ledger.expire(cases, records, 0, before_us=newest + 1)
    assert folded > 250
    assert len(cases) == 0
    assert report_mismatches(before, _report(ledger)) == []
    recovered = _ledger()
    recovered.rebuild(cases.items(), records.items(), {0})
    assert report_mismatches(before, _report(recovered)) == []


def test_a_crash_between_archive_and_delete_counts_each_case_once(sample_events: Path) -> None:
    """The partition record names the archived cases, so leftovers are not counted again."""
    ledger, cases, records = _fed(sample_events)
    before = _report(ledger)
    snapshot = dict(cases)
    ledger.expire(cases, records, 0, before_us=max(ledger.watermarks.values()) + 1)
    recovered = _ledger()
    recovered.rebuild(snapshot.items(), records.items(), {0})  # the deletes never landed
    assert report_mismatches(before, _report(recovered)) == []
    recovered.expire(snapshot, records, 0, before_us=0)  # the next sweep finishes the deletes
    assert snapshot == {}
    assert report_mismatches(before, _report(recovered)) == []


def test_sweeps_run_hourly_in_event_time_and_keep_recent_cases() -> None:
    ledger = _ledger()
    cases: dict = {}
    records: dict = {}
    day0 = 1_795_000_000_000
    old = {"event_id": "a", "type": "case_opened", "case_id": "old", "ts": day0}
    new = {"event_id": "b", "type": "case_opened", "case_id": "new", "ts": day0 + 8 * 86_400_000}
    for offset, doc in enumerate([old, new]):
        ledger.apply_event(cases, records, parse_event(json.dumps(doc).encode()), 0, offset)
        ledger.maybe_expire(cases, records, 0)
    assert set(cases) == {"new"}
    assert _report(ledger)["events"]["valid"] == 2


def test_a_refused_dead_letter_write_is_counted_once_and_survives_a_rebuild() -> None:
    from streams.core import kpis

    ledger, records = _ledger(), {}
    assert ledger.apply_invalid(records, 0, 7, "too_large", dead_lettered=False)
    assert not ledger.apply_invalid(records, 0, 7, "too_large", dead_lettered=False)
    rebuilt = _ledger()
    rebuilt.rebuild([], records.items(), {0})
    for source in (ledger, rebuilt):
        agg = source.aggregates[0]
        assert agg.pipeline[(kpis.DEAD_LETTER_FAILED, "too_large")] == 1
        assert agg.pipeline[(kpis.INVALID, "too_large")] == 1


# --- re-keyed events (ACSR_PARTITIONER=repartition) and misrouting -------------------------

def _plan_all(ledger: Ledger, cases: dict, records: dict, batch: list, **kwargs):
    plan = ledger.plan_batch(cases, records, 0, batch, **kwargs)
    ledger.mark_batch(records, plan)
    ledger.commit_batch(cases, plan)
    return plan


def test_a_re_keyed_event_forwarded_twice_counts_once() -> None:
    """A forwarder that crashed before its commit forwards some events again: the copies
    carry the same source positions, later on the re-keyed partition."""
    lines = [json.dumps({"event_id": f"e{i}", "type": "case_opened", "case_id": f"c{i % 3}",
                         "ts": 1_764_000_000_000 + i}).encode() for i in range(6)]
    parsed = [parse_event(line) for line in lines]
    invalid = InvalidEvent("not_json", "x")
    # source partition 2, offsets 10-16; the copy re-sends source offsets 13-16
    first = [(i, parsed[i]) for i in range(6)] + [(6, invalid)]
    copies = [(7 + i, parsed[3 + i]) for i in range(3)] + [(10, invalid)]
    origins = ({i: Origin(2, 10 + i, None) for i in range(7)}
               | {7 + i: Origin(2, 13 + i, None) for i in range(4)})
    ledger, cases, records = _ledger(), {}, {}
    _plan_all(ledger, cases, records, first, origins=origins)
    plan = _plan_all(ledger, cases, records, copies, origins=origins)
    assert plan.applied == [] and plan.invalid == []
    report = build_report(ledger.aggregate(0))
    assert report["events"]["valid"] == 6 and report["events"]["invalid"] == 1
    assert report["events"]["duplicate"] == 0
    # A genuinely new event of the same source partition still counts.
    new = parse_event(json.dumps({"event_id": "e9", "type": "case_opened", "case_id": "c0",
                                  "ts": 1_764_000_000_100}).encode())
    plan = _plan_all(ledger, cases, records, [(11, new)], origins={11: Origin(2, 17, None)})
    assert len(plan.applied) == 1


def test_copies_in_one_batch_with_their_originals_count_once() -> None:
    line = json.dumps({"event_id": "e1", "type": "case_opened", "case_id": "c1",
                       "ts": 1_764_000_000_000}).encode()
    event = parse_event(line)
    ledger, cases, records = _ledger(), {}, {}
    plan = _plan_all(ledger, cases, records, [(0, event), (1, event)],
                     origins={0: Origin(0, 5, None), 1: Origin(0, 5, None)})
    assert [a.offset for a in plan.applied] == [0]
    assert build_report(ledger.aggregate(0))["events"]["duplicate"] == 0


def test_events_on_a_partition_their_case_does_not_belong_to_are_counted_misrouted() -> None:
    lines = [json.dumps({"event_id": f"e{i}", "type": "case_opened", "case_id": f"c{i}",
                         "ts": 1_764_000_000_000 + i}).encode() for i in range(10)]
    batch = [(i, parse_event(line)) for i, line in enumerate(lines)]

    def home(case_id: str) -> int:
        return int(case_id[1:]) % 2  # even cases belong on partition 0

    ledger, cases, records = _ledger(), {}, {}
    plan = _plan_all(ledger, cases, records, batch, home=home)
    assert sorted(plan.misrouted) == [f"c{i}" for i in (1, 3, 5, 7, 9)]
    assert build_report(ledger.aggregate(0))["events"]["misrouted"] == 5
    # counted in the cases' state: a rebuild from the tables finds the same count
    rebuilt = _ledger()
    rebuilt.build(cases.items(), records.items(), {0})
    assert build_report(rebuilt.aggregate(0))["events"]["misrouted"] == 5
    # a redelivery is not counted again
    _plan_all(ledger, cases, records, batch, home=home)
    assert build_report(ledger.aggregate(0))["events"]["misrouted"] == 5

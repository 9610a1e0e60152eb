"""Batches of events: the figures of one event at a time, whatever the batch sizes, and
exact after a crash that landed only some of a batch's case writes."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.core.cases import SECOND_US, WindowPolicy
from streams.core.events import InvalidEvent, parse_event
from streams.core.kpis import Aggregate
from streams.core.ledger import Ledger, Parsed

from .conftest import DATA

DAY_US = 86_400 * SECOND_US
# No grace: the worked example's out-of-order events then make late events, whose count
# depends on the partition's event time at each event.
POLICY = WindowPolicy(sizes_s=(60, 3600), grace_s=0)
SAMPLE = DATA / "sample" / "events.jsonl"


def _parse(line: bytes) -> Parsed:
    try:
        return parse_event(line)
    except InvalidEvent as invalid:
        return invalid


@pytest.fixture(scope="module")
def stream() -> list[tuple[int, Parsed]]:
    lines = [line for line in Path(SAMPLE).read_bytes().splitlines() if line.strip()]
    return [(offset, _parse(line)) for offset, line in enumerate(lines)]


class Worker:
    """One partition's ledger and tables, fed in batches."""

    def __init__(self, cases: dict | None = None, records: dict | None = None) -> None:
        self.ledger = Ledger(POLICY, retention_us=7 * DAY_US)
        self.cases: dict[str, bytes] = {} if cases is None else cases
        self.records: dict[int, bytes] = {} if records is None else records
        if cases is not None:
            self.ledger.rebuild(self.cases.items(), self.records.items(), {0})

    def feed(self, items: list[tuple[int, Parsed]], cuts: list[int]) -> Worker:
        """Apply `items` in batches ending at each of the `cuts` (and at the end)."""
        start = 0
        for end in [*sorted(cut for cut in set(cuts) if 0 < cut < len(items)), len(items)]:
            self.batch(items[start:end])
            start = end
        return self

    def batch(self, items: list[tuple[int, Parsed]], landed: set[str] | None = None) -> None:
        """One batch; `landed` names the only cases whose writes reach the table."""
        plan = self.ledger.plan_batch(self.cases, self.records, 0, items)
        self.ledger.mark_batch(self.records, plan)
        if landed is None:
            self.ledger.commit_batch(self.cases, plan)
            return
        for case_id in plan.states.keys() & landed:
            self.cases[case_id] = plan.states[case_id].to_bytes()

    def figures(self) -> Aggregate:
        return self.ledger.aggregates[0]


def _same(a: Aggregate, b: Aggregate) -> bool:
    """Equal counts, and sums equal up to the order they were added in (a rebuild adds
    case by case, a live worker event by event)."""
    def close(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(
            x[k][0] == y[k][0] and math.isclose(x[k][1], y[k][1], rel_tol=1e-9) for k in x)
    return (a.pipeline == b.pipeline and a.histograms == b.histograms
            and close(a.series, b.series))


def _late(agg: Aggregate) -> int:
    return sum(count for (name, _), count in agg.pipeline.items() if name == "late")


@pytest.fixture(scope="module")
def one_at_a_time(stream: list[tuple[int, Parsed]]) -> Worker:
    return Worker().feed(stream, list(range(len(stream))))


def test_the_example_has_late_events(one_at_a_time: Worker) -> None:
    # The tests below are only as strong as the event-time dependence they can see.
    assert _late(one_at_a_time.figures()) >= 5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, 2732), max_size=40))
def test_any_batching_counts_what_one_at_a_time_counts(
        stream: list[tuple[int, Parsed]], one_at_a_time: Worker, cuts: list[int]) -> None:
    batched = Worker().feed(stream, cuts)
    assert batched.figures() == one_at_a_time.figures()
    assert batched.cases == one_at_a_time.cases


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_crash_inside_a_batch_loses_and_doubles_nothing(
        stream: list[tuple[int, Parsed]], one_at_a_time: Worker, data: st.DataObject) -> None:
    """Before the crash: batches up to `start`, then a batch `start..end` whose side
    effects and marker landed but only some case writes. After it: a new worker rebuilds
    from the tables and takes the events again from a committed offset: one at or before
    `start`, or `end` when every case write landed (the batch was committed)."""
    n = len(stream)
    start = data.draw(st.integers(1, n - 2), "start")
    end = data.draw(st.integers(start + 1, min(n, start + 600)), "end")
    worker = Worker().feed(stream[:start], data.draw(st.lists(st.integers(1, start)), "cuts"))
    touched = sorted(worker.ledger.plan_batch(dict(worker.cases), worker.records, 0,
                                              stream[start:end]).states)
    landed = set(data.draw(st.lists(st.sampled_from(touched), unique=True), "landed")
                 if touched else [])
    worker.batch(stream[start:end], landed)
    committed = start - data.draw(st.integers(0, start), "redelivered")
    if landed == set(touched) and data.draw(st.booleans(), "batch committed"):
        committed = end
    recovered = Worker(worker.cases, worker.records)
    recovered.feed(stream[committed:], data.draw(st.lists(st.integers(1, n)), "cuts after"))
    assert _same(recovered.figures(), one_at_a_time.figures())
    assert _late(recovered.figures()) == _late(one_at_a_time.figures())


def _without_marker(records: dict[int, bytes]) -> dict[int, bytes]:
    doc = orjson.loads(records[0])
    doc["batch"] = None
    return {0: orjson.dumps(doc)}


def test_without_the_marker_a_partial_batch_would_miscount(
        stream: list[tuple[int, Parsed]], one_at_a_time: Worker) -> None:
    """The marker is what keeps the crash above exact: recovering from the case writes
    alone sees the event time of the cases that landed, and counts other late events."""
    differs = 0
    for start in range(100, 2600, 250):
        worker = Worker().feed(stream[:start], [])
        plan = worker.ledger.plan_batch(dict(worker.cases), worker.records, 0,
                                        stream[start:start + 300])
        last = max(plan.states, key=lambda case_id: plan.states[case_id].offset)
        worker.batch(stream[start:start + 300], {last})
        recovered = Worker(dict(worker.cases), _without_marker(worker.records))
        differs += not _same(recovered.feed(stream[start:], []).figures(),
                             one_at_a_time.figures())
    assert differs > 0


def test_a_redelivered_invalid_message_is_neither_counted_nor_dead_lettered_again(
        stream: list[tuple[int, Parsed]]) -> None:
    invalid = [offset for offset, parsed in stream if isinstance(parsed, InvalidEvent)]
    worker = Worker().feed(stream[:invalid[3] + 1], [])
    counted = dict(worker.figures().pipeline)
    again = worker.ledger.plan_batch(worker.cases, worker.records, 0,
                                     stream[invalid[1]:invalid[5] + 1])
    assert [offset for offset, _ in again.invalid] == invalid[4:6]
    worker.ledger.mark_batch(worker.records, again)
    assert sum(worker.figures().pipeline.values()) == sum(counted.values()) + 2

"""Batches of events: the figures of one event at a time, whatever the batch sizes, and
exact after a crash that landed only some of a batch's case writes."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.core.events import READER_CLOCK, InvalidEvent, parse_event
from streams.core.kpis import Aggregate
from streams.core.ledger import Ledger, Parsed
from streams.core.units import SECOND_US
from streams.core.windows import WindowPolicy
from streams.worker.batches import BatchProcessor

from .batch_fakes import Crash, DyingTable, NoWindows, Outputs, Table, records, run_now
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
def lines() -> list[bytes]:
    return [line for line in Path(SAMPLE).read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def raw(lines: list[bytes]) -> list[tuple[int, bytes]]:
    """The messages of one partition: offset and value."""
    return list(enumerate(lines))


@pytest.fixture(scope="module")
def stream(lines: list[bytes]) -> list[tuple[int, Parsed]]:
    return [(offset, _parse(line)) for offset, line in enumerate(lines)]


class Worker:
    """One partition's tables, fed in batches by the worker's own BatchProcessor."""

    def __init__(self, cases: dict | None = None, records: dict | None = None) -> None:
        self.ledger = Ledger(POLICY, retention_us=7 * DAY_US)
        self.cases = Table(cases or {})
        self.records = Table(records or {})
        self.outputs = Outputs()
        if cases is not None:
            self.ledger.rebuild(self.cases.items(), self.records.items(), {0})

    def processor(self) -> BatchProcessor:
        return BatchProcessor(self.ledger, self.cases, self.records, NoWindows(), self.outputs,
                              bounds=READER_CLOCK, repartitions=False,
                              writes_on=lambda message: nullcontext())

    def feed(self, lines: list[tuple[int, bytes]], cuts: list[int]) -> Worker:
        """Apply `lines` in batches ending at each of the `cuts` (and at the end)."""
        start = 0
        for end in [*sorted(cut for cut in set(cuts) if 0 < cut < len(lines)), len(lines)]:
            self.batch(lines[start:end])
            start = end
        return self

    def batch(self, lines: list[tuple[int, bytes]], landed: set[str] | None = None) -> None:
        """One batch; `landed` names the only cases whose writes reach the table before
        the worker dies."""
        if not lines:
            return
        if landed is not None:
            self.cases = DyingTable(self.cases, landed)
        try:
            run_now(self.processor().batch(0, records(lines)))
        except Crash:
            self.cases = Table(self.cases)

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
def one_at_a_time(raw: list[tuple[int, bytes]]) -> Worker:
    return Worker().feed(raw, list(range(len(raw))))


def test_the_example_has_late_events(one_at_a_time: Worker) -> None:
    # The tests below are only as strong as the event-time dependence they can see.
    assert _late(one_at_a_time.figures()) >= 5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, 2732), max_size=40))
def test_any_batching_counts_what_one_at_a_time_counts(
        raw: list[tuple[int, bytes]], one_at_a_time: Worker, cuts: list[int]) -> None:
    batched = Worker().feed(raw, cuts)
    assert batched.figures() == one_at_a_time.figures()
    assert batched.cases == one_at_a_time.cases


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_crash_inside_a_batch_loses_and_doubles_nothing(
        stream: list[tuple[int, Parsed]], raw: list[tuple[int, bytes]], one_at_a_time: Worker,
        data: st.DataObject) -> None:
    """Before the crash: batches up to `start`, then a batch `start..end` whose side
    effects and marker landed but only some case writes. After it: a new worker rebuilds
    from the tables and takes the events again from a committed offset: one at or before
    `start`, or `end` when every case write landed (the batch was committed)."""
    n = len(stream)
    start = data.draw(st.integers(1, n - 2), "start")
    end = data.draw(st.integers(start + 1, min(n, start + 600)), "end")
    worker = Worker().feed(raw[:start], data.draw(st.lists(st.integers(1, start)), "cuts"))
    touched = sorted(worker.ledger.plan_batch(dict(worker.cases), worker.records, 0,
                                              stream[start:end]).states)
    landed = set(data.draw(st.lists(st.sampled_from(touched), unique=True), "landed")
                 if touched else [])
    worker.batch(raw[start:end], landed)
    committed = start - data.draw(st.integers(0, start), "redelivered")
    if landed == set(touched) and data.draw(st.booleans(), "batch committed"):
        committed = end
    recovered = Worker(worker.cases, worker.records)
    recovered.feed(raw[committed:], data.draw(st.lists(st.integers(1, n)), "cuts after"))
    assert _same(recovered.figures(), one_at_a_time.figures())
    assert _late(recovered.figures()) == _late(one_at_a_time.figures())


def _without_marker(records: dict[int, bytes]) -> dict[int, bytes]:
    doc = orjson.loads(records[0])
    doc["batch"] = None
    return {0: orjson.dumps(doc)}


def test_without_the_marker_a_partial_batch_would_miscount(
        stream: list[tuple[int, Parsed]], raw: list[tuple[int, bytes]],
        one_at_a_time: Worker) -> None:
    """The marker is what keeps the crash above exact: recovering from the case writes
    alone sees the event time of the cases that landed, and counts other late events."""
    differs = 0
    for start in range(100, 2600, 250):
        worker = Worker().feed(raw[:start], [])
        plan = worker.ledger.plan_batch(dict(worker.cases), worker.records, 0,
                                        stream[start:start + 300])
        last = max(plan.states, key=lambda case_id: plan.states[case_id].offset)
        worker.batch(raw[start:start + 300], {last})
        recovered = Worker(dict(worker.cases), _without_marker(worker.records))
        differs += not _same(recovered.feed(raw[start:], []).figures(),
                             one_at_a_time.figures())
    assert differs > 0


def test_a_redelivered_invalid_message_is_neither_counted_nor_dead_lettered_again(
        stream: list[tuple[int, Parsed]], raw: list[tuple[int, bytes]]) -> None:
    invalid = [offset for offset, parsed in stream if isinstance(parsed, InvalidEvent)]
    worker = Worker().feed(raw[:invalid[3] + 1], [])
    assert worker.outputs.dead_lettered == invalid[:4]
    counted = _invalid(worker.figures())
    worker.feed(raw[invalid[1]:invalid[5] + 1], [])  # redelivered from invalid[1] on
    assert worker.outputs.dead_lettered == invalid[:6]
    assert _invalid(worker.figures()) == counted + 2


def _invalid(agg: Aggregate) -> int:
    return sum(count for (name, _), count in agg.pipeline.items() if name == "invalid")


def test_a_link_that_fails_is_counted_and_the_count_survives_a_rebuild(
        raw: list[tuple[int, bytes]]) -> None:
    worker = Worker().feed(raw[:50], [])
    broken = SimpleNamespace(partition=0, offset=7, value=b"{not json")
    run_now(worker.processor().apply_link(broken))
    run_now(worker.processor().apply_link(broken))

    def link_errors(agg: Aggregate) -> int:
        return agg.pipeline.get(("processing_error", "link"), 0)

    assert link_errors(worker.figures()) == 2
    assert link_errors(Worker(worker.cases, worker.records).figures()) == 2

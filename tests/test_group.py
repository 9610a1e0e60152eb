"""The group's figures from partitions' snapshots: monotone in any arrival order, windows
closed on every partition, label values stored once (no broker needed)."""

from __future__ import annotations

import asyncio
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core import kpis
from streams.core.kpis import Aggregate, Fact
from streams.core.windows import Cell, RecentClosed, WindowKey, WindowPolicy, WindowRules
from streams.metrics.group import (
    LABELS_KEY,
    GroupState,
    Snapshot,
    SnapshotError,
    labels_record,
    snapshot_key,
)

DIMS = ("refund", "web", "v1")


def _history(increments: list[int]) -> list[Aggregate]:
    """A partition's aggregate after each batch: `n` conclusions and a CSAT per batch."""
    out, agg = [], Aggregate()
    for n in increments:
        for _ in range(n):
            agg.add_fact(Fact(kpis.CONCLUDED, ("autonomous",), 1.0, DIMS))
        agg.add_fact(Fact(kpis.CSAT, (), 4.0, DIMS))
        agg.count(kpis.EVENT, "case_resolved", n)
        out.append(Aggregate.from_json(agg.to_json()))
    return out


def _concluded(agg: Aggregate) -> float:
    return sum(c for (name, _, _), (c, _) in agg.series.items() if name == kpis.CONCLUDED)


def test_a_snapshot_reads_back_as_written() -> None:
    agg = _history([3])[0]
    cell = Cell(outcomes={"autonomous": 2}, checks=3, passed=2, offset=17, emitted=True)
    key = WindowKey(3600, 7200, "refund", "v1")
    snapshot = Snapshot.of(5, 120, agg, {3600: RecentClosed(7200, 3600, {7200: [(key, cell)]})})
    back = Snapshot.from_bytes(snapshot.to_bytes())
    assert (back.partition, back.offset) == (5, 120)
    assert back.aggregate.series == agg.series
    assert back.aggregate.histograms == agg.histograms
    assert (back.windows[3600].closed_start, back.windows[3600].covered_from) == (7200, 3600)
    read = back.windows[3600].cells[7200][("refund", "v1")]
    assert (read.outcomes, read.checks, read.passed) == ({"autonomous": 2}, 3, 2)
    assert read.offset == -1  # the marks of a cell are not figures


def test_a_record_of_another_version_or_not_a_record_is_refused() -> None:
    with pytest.raises(SnapshotError, match="not a group record"):
        Snapshot.from_bytes(b"{}")
    with pytest.raises(SnapshotError, match="schema_version 99"):
        Snapshot.from_bytes(zlib.compress(b'{"schema_version": 99}'))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=6), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_the_group_never_decreases_whatever_order_snapshots_arrive_in(
        partitions: list[list[int]], rnd) -> None:
    """Old owners' late snapshots and new owners' first ones interleave in any order:
    the group's figures only grow, and end at the sum of every partition's last."""
    snapshots = [Snapshot(p, i, agg) for p, increments in enumerate(partitions)
                 for i, agg in enumerate(_history(increments))]
    rnd.shuffle(snapshots)
    state, seen = GroupState(), 0.0
    for snapshot in snapshots:
        state.add(Snapshot.from_bytes(snapshot.to_bytes()))
        now = _concluded(state.total())
        assert now >= seen
        seen = now
    assert seen == sum(sum(increments) for increments in partitions)
    assert state.total().pipeline[(kpis.EVENT, "case_resolved")] == seen


def _digest_snapshot(partition: int, closed: int, cells: dict[int, int],
                     covered_from: int | None = None) -> Snapshot:
    """Closed hour windows up to `closed`, `cells[start]` autonomous conclusions each."""
    recent = {3600: RecentClosed(closed, covered_from, {
        start: [(WindowKey(3600, start, "refund", "v1"), Cell(outcomes={"autonomous": n}))]
        for start, n in cells.items()})}
    return Snapshot.of(partition, 0, Aggregate(), recent)


def test_the_group_window_is_the_latest_closed_on_every_partition() -> None:
    state = GroupState()
    state.add(_digest_snapshot(0, 7200, {3600: 1, 7200: 2}))
    state.add(_digest_snapshot(1, 3600, {3600: 5}))
    window = state.group_windows()[3600]
    assert window.start == 3600  # partition 1 has not closed 7200 yet
    assert sum(c.autonomous for cells in window.cells.values() for c in cells) == 6
    state.add(_digest_snapshot(1, 7200, {3600: 5}))
    window = state.group_windows()[3600]
    assert window.start == 7200
    assert sum(c.autonomous for cells in window.cells.values() for c in cells) == 2


def test_a_partition_far_behind_holds_the_group_window_at_what_all_have_closed() -> None:
    state = GroupState()
    busy = {start * 3600: 1 for start in range(94, 101)}  # more than a snapshot carries
    state.add(_digest_snapshot(0, 100 * 3600, busy, covered_from=94 * 3600))
    state.add(_digest_snapshot(1, 3 * 3600, {3 * 3600: 4}))
    assert 3600 not in state.group_windows()  # no window known on both: none shown
    state.add(_digest_snapshot(1, 100 * 3600, {3 * 3600: 4, 99 * 3600: 2}))
    window = state.group_windows()[3600]
    assert (window.start, sum(c.autonomous for cs in window.cells.values() for c in cs)) == \
        (100 * 3600, 1)


def test_windows_with_cells_long_ago_are_still_the_latest_closed() -> None:
    """Sparse traffic: the latest window holding cells may be far behind event time."""
    state = GroupState()
    state.add(_digest_snapshot(0, 50 * 3600, {2 * 3600: 3}))
    state.add(_digest_snapshot(1, 40 * 3600, {}))
    assert state.group_windows()[3600].start == 2 * 3600


def test_latest_closed_start_is_the_last_window_the_event_time_closed() -> None:
    rules = WindowRules(WindowPolicy(sizes_s=(60,), grace_s=10), retention_s=3600)
    # window [0, 60) closes once event time passes 70 s
    assert rules.latest_closed_start(60, 70 * 1_000_000) == -60
    assert rules.latest_closed_start(60, 70 * 1_000_000 + 1) == 0
    assert rules.latest_closed_start(60, 130 * 1_000_000 + 1) == 60


def test_admitted_label_values_are_read_back_from_the_topic() -> None:
    state = GroupState()
    state.apply(LABELS_KEY, labels_record({"intent": ["refund", "billing"]}))
    state.apply(LABELS_KEY, labels_record({"intent": ["refund", "billing", "shipping"]}))
    state.apply(snapshot_key(0), None)  # a tombstone changes nothing
    assert state.admitted == {"intent": ["refund", "billing", "shipping"]}


class Topic:
    """The group topic's send: each key kept in `sends`, acknowledged at once (the first
    never, with `hang_first`)."""

    def __init__(self, sends: list[bytes], hang_first: bool = False) -> None:
        self.sends, self.hang_first = sends, hang_first

    async def send(self, key: bytes, **kwargs: object) -> asyncio.Future:
        self.sends.append(key)
        sent = asyncio.get_running_loop().create_future()
        if not (self.hang_first and len(self.sends) == 1):
            sent.set_result(None)
        return sent


def _export(**overrides: object) -> object:
    from streams.config import Settings
    from streams.worker import group as worker_group

    class App:
        def topic(self, *args: object, **kwargs: object) -> object:
            return object()

    options = {"owned": lambda: {0}, "ready": lambda: True, "lock": lambda p: asyncio.Lock(),
               "snapshot": lambda p: None, **overrides}
    return worker_group.GroupExport(App(), Settings(), {}, **options)


async def test_following_the_group_topic_starts_again_after_a_failure(monkeypatch) -> None:
    """A failed read or write must not end the exporter's task (it would stop the group's
    exposition for good), nor a CancelledError a client library lets escape: it is logged
    and the topic read again, serving only once caught up. Cancelling the task ends it."""
    from streams.worker import group as worker_group

    export = _export()
    export.serving = True
    calls: list[bool] = []
    reading = asyncio.Event()

    async def flaky() -> None:
        calls.append(export.serving)
        export.serving = True  # as if caught up, before failing again
        if len(calls) == 1:
            raise ConnectionError("broker away")
        if len(calls) == 2:
            raise asyncio.CancelledError  # stray: nobody cancelled the task
        reading.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(export, "_follow", flaky)
    monkeypatch.setattr(worker_group, "FOLLOW_RETRY_S", 0.01)
    task = asyncio.create_task(export.follow())
    await asyncio.wait_for(reading.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [False, False, False]  # read again each time, not serving until caught up


async def test_a_send_never_acknowledged_does_not_stop_publishing(monkeypatch) -> None:
    """A snapshot whose send hangs is given up after SEND_TIMEOUT_S and sent again on the
    next round; the publisher goes on."""
    from streams.metrics.group import Snapshot
    from streams.worker import group as worker_group

    export = _export(snapshot=lambda p: Snapshot(p, 1, Aggregate()))
    export.changed(0)
    sends: list[bytes] = []

    export.topic = Topic(sends, hang_first=True)
    monkeypatch.setattr(worker_group, "SEND_TIMEOUT_S", 0.05)
    task = asyncio.create_task(export.publish_every(0.01))
    for _ in range(200):
        if export.published:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sends[:2] == [snapshot_key(0)] * 2 and export.published == {0: 1}


async def test_the_exposition_is_rendered_at_a_scrape_once_per_change(monkeypatch) -> None:
    """Rendering costs tens of milliseconds: a scrape that finds the figures unchanged gets
    the bytes rendered before; one after a change gets the new figures."""
    from streams.worker import group as worker_group

    export = _export()
    renders: list[int] = []
    render = worker_group.render_group

    def counted(*args: object, **kwargs: object) -> bytes:
        renders.append(1)
        return render(*args, **kwargs)

    export.topic = Topic([])  # the label list, acknowledged
    monkeypatch.setattr(worker_group, "render_group", counted)
    history = _history([2, 3])
    export.apply(snapshot_key(0), Snapshot(0, 1, history[0]).to_bytes())
    assert await export.exposition() == b""  # not caught up yet: nothing served
    export.serving = True
    first = await export.exposition()
    assert b"acsr_cases_concluded_total" in first and len(renders) == 1
    assert await export.exposition() is first and len(renders) == 1  # unchanged
    export.apply(snapshot_key(0), Snapshot(0, 2, history[1]).to_bytes())
    changed = await export.exposition()
    assert changed != first and b"acsr_cases_concluded_total" in changed
    assert (await export.exposition()) is changed


async def test_a_busy_partition_is_published_once_its_batch_landed() -> None:
    """Under load a partition's lock is nearly always held: the publisher waits for it
    (a snapshot only between batches) instead of skipping the partition."""
    from streams.metrics.group import Snapshot

    lock = asyncio.Lock()
    export = _export(lock=lambda p: lock, snapshot=lambda p: Snapshot(p, 1, Aggregate()))
    sends: list[bytes] = []

    export.topic = Topic(sends)
    export.changed(0)
    await lock.acquire()  # a batch is landing
    publishing = asyncio.ensure_future(export.publish())
    await asyncio.sleep(0.01)
    assert sends == [] and not publishing.done()
    lock.release()
    await asyncio.wait_for(publishing, 1)
    assert sends == [snapshot_key(0)] and export.published == {0: 1}

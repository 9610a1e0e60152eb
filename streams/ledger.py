"""Per-partition accounting over the case table: exact across restarts and rebalances.

Every effect of an event lives in exactly one table record (the case's state, or the
partition's record for invalid messages and expired cases), written once per event.
A record remembers the last offset it applied, so a redelivered event (at-least-once
after a crash) is recognised and skipped: figures count each event once. The
in-memory `Aggregate` of a partition is derived from those records: rebuilt from the
table after recovery, then kept up to date as events are applied.

No Faust here: the tables are plain mutable mappings, so this unit-tests without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import kpis
from .annotations import CaseView
from .cases import (
    SECOND_US,
    CaseState,
    Step,
    WindowPolicy,
    apply_event,
    apply_link,
    related_case,
)
from .events import Event, InvalidEvent
from .kpis import Aggregate
from .partitioners import Origin
from .state_bytes import dump_state

SWEEP_EVERY_US = 3600 * SECOND_US


@dataclass
class PendingBatch:
    """The last batch whose case writes may have landed only in part (see `Ledger`)."""

    start: int  # its first and last events offset
    end: int
    before_us: int | None  # the partition's event time before and after it
    after_us: int | None
    duplicates: list[int] = field(default_factory=list)  # offsets that left the time as it was

    def advances(self, offset: int) -> bool:
        """Whether the applied event at `offset` moved the partition's event time."""
        return self.start <= offset <= self.end and offset not in self.duplicates


@dataclass
class PartitionRecord:
    """State of a partition that belongs to no case: invalid messages and expired cases."""

    offset: int = -1  # last applied offset of an invalid message
    watermark_us: int | None = None
    archive: dict[str, Any] = field(default_factory=dict)  # Aggregate of expired cases
    folded: list[str] = field(default_factory=list)  # archived cases whose delete may be pending
    batch: dict[str, Any] | None = None  # the PendingBatch written before its case writes
    # Re-keyed invalid messages: per source partition, the last source offset counted.
    sources: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return dump_state(self.__dict__)

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> PartitionRecord:
        return cls(**orjson.loads(raw)) if raw else cls()


CaseTable = MutableMapping[str, bytes]
PartitionTable = MutableMapping[int, bytes]
Parsed = Event | InvalidEvent
Origins = Mapping[int, Origin]  # offset -> where a re-keyed event came from
CaseHome = Callable[[str], int]  # the partition the producers' partitioner gives a case


@dataclass
class Applied:
    """A valid event of a batch applied to its case (not yet written)."""

    offset: int
    event: Event
    step: Step
    watermark_us: int | None  # the partition's event time before the event
    view: CaseView | None = None  # the case as its annotation items show it (when routed)


@dataclass
class BatchPlan:
    """What a batch of one partition's events does, planned before anything is written.

    Its side effects (links, annotation items, window cells, dead letters, the partition
    record with the batch marker) are sent and acknowledged first; then each touched case
    is written once, with its last state."""

    partition: int
    first: int
    last: int
    applied: list[Applied] = field(default_factory=list)
    invalid: list[tuple[int, InvalidEvent]] = field(default_factory=list)
    links: list[tuple[str, int]] = field(default_factory=list)  # (earlier case, ts_us)
    states: dict[str, CaseState] = field(default_factory=dict)  # touched cases, final states
    before_us: int | None = None
    after_us: int | None = None
    duplicates: list[int] = field(default_factory=list)
    recovered_batch_done: bool = False  # a recovered PendingBatch is behind this batch
    misrouted: list[str] = field(default_factory=list)  # cases of events on a wrong partition
    invalid_sources: dict[str, int] | None = None  # PartitionRecord.sources after the batch

    def marker(self) -> PendingBatch:
        return PendingBatch(self.first, self.last, self.before_us, self.after_us,
                            self.duplicates)


class Ledger:
    """Applies events to the tables and keeps each owned partition's aggregate."""

    def __init__(self, windows: WindowPolicy, retention_us: int, sample_rate: float = 0.0,
                 fact_windows: bool = True) -> None:
        self.windows = windows
        # Aggregates sum windows from case facts unless window tables hold them (the worker:
        # streams/window_tables.py), which also drop them after their retention.
        self.aggregate_window_sizes = windows.sizes_s if fact_windows else ()
        self.retention_us = retention_us
        self.sample_rate = sample_rate
        self.aggregates: dict[int, Aggregate] = {}
        self.watermarks: dict[int, int] = {}
        self.case_keys: dict[int, set[str]] = {}
        self.last_sweep: dict[int, int] = {}
        self.positions: dict[int, int] = {}  # next offset to process, per events partition
        self.pending: dict[int, PendingBatch] = {}  # recovered batch markers

    def aggregate(self, partition: int) -> Aggregate:
        agg = self.aggregates.get(partition)
        if agg is None:
            agg = self.aggregates[partition] = self._empty()
        return agg

    # --- applying ---------------------------------------------------------------------

    def apply_event(self, cases: CaseTable, event: Event, partition: int, offset: int
                    ) -> Step | None:
        """Apply a valid event on its own; None when it is a redelivery of an applied one."""
        plan = self.plan_batch(cases, {}, partition, [(offset, event)])
        self.commit_batch(cases, plan)
        return plan.applied[0].step if plan.applied else None

    def plan_batch(self, cases: CaseTable, records: PartitionTable, partition: int,
                   batch: Sequence[tuple[int, Parsed]], home: CaseHome | None = None,
                   origins: Origins | None = None) -> BatchPlan:
        """Plan a batch of one partition's messages, in offset order; writes nothing.

        Each touched case is decoded once and carried through the batch. An event whose
        case already holds its offset is a redelivery and is skipped; inside a recovered
        pending batch it still moves the partition's event time as it did the first
        time, so the events re-applied there see the times they saw then. An invalid
        message at or below the partition record's offset was counted (and dead-lettered)
        already, and is skipped too.

        `home` gives the partition a case belongs on: an event elsewhere is counted as
        misrouted (and still applied). `origins` names the source position of re-keyed
        messages: one whose source offset was already counted is a second copy, skipped."""
        plan = BatchPlan(partition, batch[0][0], batch[-1][0])
        record = PartitionRecord.from_bytes(records.get(partition))
        counted_invalid = record.offset
        invalid_sources = dict(record.sources)
        watermark = self.watermarks.get(partition)
        pending = self.pending.get(partition)
        if pending is not None and plan.first > pending.end:
            watermark = _later(watermark, pending.after_us)  # it was committed whole
        plan.before_us = watermark
        states = plan.states
        for offset, parsed in batch:
            origin = origins.get(offset) if origins else None
            if isinstance(parsed, InvalidEvent):
                if offset > counted_invalid and not _counted(invalid_sources, origin):
                    _note(invalid_sources, origin)
                    plan.invalid.append((offset, parsed))
                continue
            state = states.get(parsed.case_id)
            if state is None:
                raw = cases.get(parsed.case_id)
                state = CaseState.from_bytes(raw) if raw is not None else None
            if state is not None and state.offset >= offset:
                if pending is not None and pending.advances(offset):
                    watermark = _later(watermark, _later(parsed.ts_us, origin and origin.time_us))
                continue
            if state is not None and _counted(state.sources, origin):
                continue  # a second copy of a re-keyed event
            related = related_case(parsed)
            if related is not None:
                plan.links.append((related, parsed.ts_us))
            # Lateness is judged against the partition the event was produced to.
            judged = watermark if origin is None else origin.time_us
            step = apply_event(state, parsed, partition=partition, offset=offset,
                               watermark_us=judged, windows=self.windows,
                               sample_rate=self.sample_rate)
            _note(step.state.sources, origin)
            if home is not None and home(parsed.case_id) != partition:
                step.count(kpis.MISROUTED)
                plan.misrouted.append(parsed.case_id)
            states[parsed.case_id] = step.state
            # The case goes on changing in the batch: its items show it as of this event.
            view = step.state.annotation_view() if step.routes else None
            plan.applied.append(Applied(offset, parsed, step, judged, view))
            if step.duplicate:
                plan.duplicates.append(offset)
            else:
                watermark = _later(watermark, step.state.watermark_us)
        plan.after_us = watermark
        plan.recovered_batch_done = pending is not None and plan.last >= pending.end
        if origins and invalid_sources != record.sources:
            plan.invalid_sources = invalid_sources
        return plan

    def mark_batch(self, records: PartitionTable, plan: BatchPlan,
                   refused: Iterable[int] = ()) -> None:
        """Write the partition record before the batch's case writes: its invalid messages
        counted once (those at `refused` offsets also as refused by the dead-letter
        topic), and the batch marker that a recovery needs if only some cases land."""
        partition = plan.partition
        record = PartitionRecord.from_bytes(records.get(partition))
        refused = set(refused)
        archive = Aggregate.from_json(record.archive) if record.archive else self._empty()
        for offset, invalid in plan.invalid:
            counters = ((kpis.INVALID,) if offset not in refused
                        else (kpis.INVALID, kpis.DEAD_LETTER_FAILED))
            for name in counters:
                archive.count(name, invalid.reason)
                self.aggregate(partition).count(name, invalid.reason)
            record.offset = offset
        record.archive = archive.to_json()
        record.batch = plan.marker().__dict__ if plan.applied else record.batch
        if plan.invalid_sources is not None:
            record.sources = plan.invalid_sources
        records[partition] = record.to_bytes()
        self.positions[partition] = plan.last + 1

    def commit_batch(self, cases: CaseTable, plan: BatchPlan) -> None:
        """Write each touched case once (after the batch's side effects landed)."""
        partition = plan.partition
        for case_id, state in plan.states.items():
            cases[case_id] = state.to_bytes()
        for applied in plan.applied:
            self._account(partition, applied.event.case_id, applied.step)
        if plan.after_us is not None:
            self.watermarks[partition] = _later(self.watermarks.get(partition), plan.after_us)
        if plan.recovered_batch_done:
            self.pending.pop(partition, None)
        self.positions[partition] = plan.last + 1

    def apply_link(self, cases: CaseTable, case_id: str, partition: int, link_ts_us: int) -> Step:
        """A re-engagement of `case_id`; applying one twice changes nothing more."""
        raw = cases.get(case_id)
        step = apply_link(CaseState.from_bytes(raw) if raw is not None else None,
                          partition=partition, link_ts_us=link_ts_us)
        cases[case_id] = step.state.to_bytes()
        self._account(partition, case_id, step)
        return step

    def apply_invalid(self, records: PartitionTable, partition: int, offset: int, reason: str,
                      counter: str = kpis.INVALID, dead_lettered: bool = True) -> bool:
        """Count an invalid (or unprocessable) message once; False when it is a redelivery.

        A message the dead-letter topic refused is also counted as such, in the same write,
        so the count survives restarts and rebalances like every other figure.
        """
        self.positions[partition] = offset + 1
        record = PartitionRecord.from_bytes(records.get(partition))
        if record.offset >= offset:
            return False
        counters = (counter,) if dead_lettered else (counter, kpis.DEAD_LETTER_FAILED)
        archive = Aggregate.from_json(record.archive) if record.archive else self._empty()
        for name in counters:
            archive.count(name, reason)
            self.aggregate(partition).count(name, reason)
        record.archive = archive.to_json()
        record.offset = offset
        records[partition] = record.to_bytes()
        return True

    def _account(self, partition: int, case_id: str, step: Step) -> None:
        agg = self.aggregate(partition)
        agg.add_facts(step.facts)
        agg.add_pipeline(step.pipeline)
        self.case_keys.setdefault(partition, set()).add(case_id)

    def _empty(self) -> Aggregate:
        return Aggregate(window_sizes=self.aggregate_window_sizes)

    # --- expiry -----------------------------------------------------------------------

    def maybe_expire(self, cases: CaseTable, records: PartitionTable, partition: int) -> int:
        """Fold cases idle for the retention into the partition record, hourly in event time."""
        watermark = self.watermarks.get(partition)
        if watermark is None:
            return 0
        last = self.last_sweep.setdefault(partition, watermark)
        if watermark - last < SWEEP_EVERY_US:
            return 0
        self.last_sweep[partition] = watermark
        return self.expire(cases, records, partition, watermark - self.retention_us)

    def expire(self, cases: CaseTable, records: PartitionTable, partition: int,
               before_us: int) -> int:
        record = PartitionRecord.from_bytes(records.get(partition))
        folded = set(record.folded)
        archive = Aggregate.from_json(record.archive) if record.archive else self._empty()
        keys = self.case_keys.get(partition, set())
        expired = []
        for case_id in keys:
            if case_id in folded:
                continue
            raw = cases.get(case_id)
            if raw is None:
                continue
            state = CaseState.from_bytes(raw)
            if state.last_us is not None and state.last_us < before_us:
                archive.add_facts(state.facts)
                archive.add_pipeline(state.pipeline)
                expired.append(case_id)
        still_present = [case_id for case_id in record.folded if case_id in cases]
        if not expired and not still_present:
            return 0
        # The record names every archived case that may still be in the table, so a crash
        # between this write and the deletes below can never count a case twice.
        record.archive = archive.to_json()
        record.folded = still_present + expired
        record.watermark_us = self.watermarks.get(partition)
        records[partition] = record.to_bytes()
        for case_id in record.folded:
            del cases[case_id]
            keys.discard(case_id)
        return len(expired)

    # --- recovery ---------------------------------------------------------------------

    def rebuild(self, cases: Iterable[tuple[str, bytes]], records: Iterable[tuple[int, bytes]],
                partitions: set[int]) -> None:
        """Derive the owned partitions' state from the tables, forgetting all others."""
        self.drop((set(self.aggregates) | set(self.positions)) - partitions)
        self.build(cases, records, partitions)

    def unbuilt(self, partitions: set[int]) -> set[int]:
        """Owned partitions whose state is not derived from the tables yet."""
        return partitions - self.aggregates.keys()

    def build(self, cases: Iterable[tuple[str, bytes]], records: Iterable[tuple[int, bytes]],
              partitions: set[int]) -> None:
        """Derive these partitions' state from the tables (recovered); others stay as they are."""
        if not partitions:
            return
        for partition in partitions:
            self.aggregates[partition] = self._empty()
            self.case_keys[partition] = set()
            self.watermarks.pop(partition, None)
            self.last_sweep.pop(partition, None)
            self.pending.pop(partition, None)
        folded: set[str] = set()
        for partition, raw in records:
            if partition not in partitions:
                continue
            record = PartitionRecord.from_bytes(raw)
            folded.update(record.folded)
            if record.archive:
                self.aggregates[partition].merge(Aggregate.from_json(record.archive))
            self._raise_watermark(partition, record.watermark_us)
            if record.batch is not None:
                pending = self.pending[partition] = PendingBatch(**record.batch)
                self._raise_watermark(partition, pending.before_us)
        for case_id, raw in cases:
            if case_id in folded:
                continue
            state = CaseState.from_bytes(raw)
            if state.partition not in partitions:
                continue
            agg = self.aggregates[state.partition]
            agg.add_facts(state.facts)
            agg.add_pipeline(state.pipeline)
            self.case_keys[state.partition].add(case_id)
            pending = self.pending.get(state.partition)
            if pending is None or state.offset < pending.start:
                # A case written by the pending batch may be one of only some that
                # landed: its time is the batch's `after_us`, applied once known whole.
                self._raise_watermark(state.partition, state.watermark_us)

    def drop(self, partitions: set[int]) -> None:
        """Forget partitions this worker no longer owns (their new owner rebuilds them)."""
        for table in (self.aggregates, self.watermarks, self.case_keys, self.last_sweep,
                      self.positions, self.pending):
            for partition in partitions:
                table.pop(partition, None)

    def _raise_watermark(self, partition: int, value: int | None) -> None:
        if value is not None:
            self.watermarks[partition] = max(self.watermarks.get(partition, value), value)


def _counted(last: dict[str, int], origin: Origin | None) -> bool:
    """Whether a re-keyed message's source position was counted already: each source
    partition is forwarded in order, so anything at or below the last one is a copy."""
    return origin is not None and last.get(str(origin.partition), -1) >= origin.offset


def _note(last: dict[str, int], origin: Origin | None) -> None:
    if origin is not None:
        last[str(origin.partition)] = origin.offset


def _later(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)

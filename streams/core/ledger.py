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
from typing import Any, NamedTuple

import orjson

from streams.core import archive, kpis
from streams.core.annotations import CaseView
from streams.core.archive import RecordTooLarge, checked, key_partition
from streams.core.cases import (
    CaseState,
    Step,
    apply_event,
    apply_link,
    decode_figures,
    id_digest,
    is_spill_key,
    related_case,
    spill_key,
)
from streams.core.events import Event, InvalidEvent
from streams.core.kpis import Aggregate
from streams.core.state_bytes import dump_state
from streams.core.units import SECOND_US
from streams.core.windows import WindowPolicy

SWEEP_EVERY_US = 3600 * SECOND_US
# Kafka refuses a record over message.max.bytes (1,048,588 by default, key and headers
# included): no table value of ours passes this (docs/architecture.md, Bounded state).
RECORD_LIMIT = 1_000_000
# A case holding more figure cells than this, or encoded larger than SPILL_BYTES, moves
# its figures to a record of their own (a spill, `cases.spill_key`): its record stays
# small, and every figure is kept.
SPILL_ENTRIES = 256
SPILL_BYTES = 128 * 1024
FOLD_CHUNK = 2000  # expired cases folded per write (the rest at the next batch)
# Decoded cases a ledger keeps between batches, all its partitions together: a case
# usually has events in several batches in a row (`HotCases`). A kept case takes about
# 7.5 KB; on simulated traffic 1,000 bought about as much time as 4,000 (which save two
# decodes in three) for a quarter of the memory (7.5 MB, docs/performance.md).
HOT_CASES = 1000

__all__ = ["RECORD_LIMIT", "Ledger", "RecordTooLarge"]


class Origin(NamedTuple):
    """Where a re-keyed event came from, and its source partition's event time before it
    (None: no valid event yet): lateness is judged against that time, as it would be on
    the source partition itself."""

    partition: int
    offset: int
    time_us: int | None


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
    # Counters of invalid messages and archived cases (an Aggregate's JSON). Written by
    # 0.1, it also holds the archive's figures: the next write moves them to
    # the shards.
    archive: dict[str, Any] = field(default_factory=dict)
    shards: list[int] = field(default_factory=list)  # the slot of each archive shard in use
    # How many folds of expired cases were written, and the digests of the cases the last
    # one archived, whose deletes may not have landed (see `Ledger._fold`).
    fold_id: int = 0
    folded_digests: list[str] = field(default_factory=list)
    batch: dict[str, Any] | None = None  # the PendingBatch written before its case writes
    # Re-keyed invalid messages: per source partition, the last source offset counted.
    sources: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return dump_state(self.__dict__)

    def counters(self) -> Aggregate:
        """The record's counters (and, written by 0.1, archived figures)."""
        counters = Aggregate.from_json(self.archive) if self.archive else Aggregate(
            window_sizes=())
        counters.windows = {}  # 0.1 also summed windows here; the window tables hold them
        return counters

    def leftover(self, case_id: str, state: CaseState) -> bool:
        """Whether `state` is a case the last fold archived, found still in the table (its
        delete did not land): written before that fold, and named by it."""
        return state.after_fold < self.fold_id and id_digest(case_id) in self.folded_digests

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> PartitionRecord:
        if not raw:
            return cls()
        doc = orjson.loads(raw)
        folded = doc.pop("folded", None)  # 0.1: the archived cases by id
        if folded:
            doc["fold_id"], doc["folded_digests"] = 1, [id_digest(c) for c in folded]
        return cls(**doc)


class HotCases:
    """Cases kept decoded between batches, each with the record it was read or written as.

    One is used only while the table holds that very record, so a case the table got
    from elsewhere (a recovery, a write that did not land, another owner) is read again,
    never a stale copy. Taking a case removes it: its holder changes it, and puts it back
    with the record it wrote. Past `limit`, the least recently used goes first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[str, tuple[int, bytes, CaseState]] = {}

    def take(self, case_id: str, raw: bytes) -> CaseState | None:
        entry = self.entries.pop(case_id, None)
        return entry[2] if entry is not None and entry[1] == raw else None

    def peek(self, case_id: str, raw: bytes) -> CaseState | None:
        """The kept case, to read only."""
        entry = self.entries.get(case_id)
        return entry[2] if entry is not None and entry[1] == raw else None

    def keep(self, partition: int, case_id: str, raw: bytes, state: CaseState) -> None:
        entries = self.entries
        entries[case_id] = (partition, raw, state)
        if len(entries) > self.limit:
            del entries[next(iter(entries))]

    def forget(self, case_id: str) -> None:
        self.entries.pop(case_id, None)

    def drop(self, partitions: set[int]) -> None:
        """Forget these partitions' cases (revoked, or read again from the tables)."""
        for case_id in [key for key, entry in self.entries.items() if entry[0] in partitions]:
            del self.entries[case_id]


CaseTable = MutableMapping[str, bytes]
PartitionTable = MutableMapping[int, bytes]
Parsed = Event | InvalidEvent
Origins = Mapping[int, Origin]  # offset -> where a re-keyed event came from
CaseHome = Callable[[str], int]  # the partition the producers' partitioner gives a case


@dataclass(slots=True)
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
    # Records to write, in this order: spilled figures (key -> record), then each touched
    # case's state, then the deletes of figure records a restarted case left behind.
    spilled: dict[str, bytes] = field(default_factory=dict)
    encoded: dict[str, bytes] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)

    def marker(self) -> PendingBatch:
        return PendingBatch(self.first, self.last, self.before_us, self.after_us,
                            self.duplicates)


class Ledger:
    """Applies events to the tables and keeps each owned partition's aggregate."""

    def __init__(self, windows: WindowPolicy, retention_us: int, sample_rate: float = 0.0,
                 record_limit: int = RECORD_LIMIT, hot_cases: int = HOT_CASES) -> None:
        self.windows = windows  # lateness; the window tables count windows (window_tables.py)
        self.retention_us = retention_us
        self.sample_rate = sample_rate
        self.record_limit = record_limit
        self.spill_bytes = min(SPILL_BYTES, record_limit // 2)
        self.spill_entries = SPILL_ENTRIES
        self.aggregates: dict[int, Aggregate] = {}
        self.watermarks: dict[int, int] = {}
        # Each partition's cases and their last event time as last written (what an
        # expiry sweep needs, without decoding every case to learn it).
        self.case_keys: dict[int, dict[str, int | None]] = {}
        self.last_sweep: dict[int, int] = {}
        self.positions: dict[int, int] = {}  # next offset to process, per events partition
        self.pending: dict[int, PendingBatch] = {}  # recovered batch markers
        self.sweeps: dict[int, tuple[int, str]] = {}  # a sweep going on: threshold, cursor
        self.stale: dict[int, set[str]] = {}  # archived cases found still in the table
        self.folds: dict[int, PartitionRecord] = {}  # fold_id and folded_digests in effect
        self.hot = HotCases(hot_cases)

    def aggregate(self, partition: int) -> Aggregate:
        agg = self.aggregates.get(partition)
        if agg is None:
            agg = self.aggregates[partition] = self._empty()
        return agg

    # --- applying ---------------------------------------------------------------------

    def apply_event(self, cases: CaseTable, records: PartitionTable, event: Event,
                    partition: int, offset: int) -> Step | None:
        """Apply a valid event on its own; None when it is a redelivery of an applied one."""
        plan = self.plan_batch(cases, records, partition, [(offset, event)])
        if plan.applied:
            self.mark_batch(records, plan)
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
        messages: one whose source offset was already counted is a second copy, skipped.

        A case whose figures grow past SPILL_ENTRIES cells (or its record past SPILL_BYTES)
        moves them to a figures record of its own, numbered by the case (`spills`) and
        written before the case's record in the same changelog partition: a case record
        that landed finds all its figures records, and one lost is applied again from
        the last state that landed, overwriting figures records it had not counted. Every
        record is encoded and checked against the record limit here, before anything is
        sent."""
        plan = BatchPlan(partition, batch[0][0], batch[-1][0])
        record = PartitionRecord.from_bytes(records.get(partition))
        counted_invalid = record.offset
        invalid_sources = dict(record.sources)
        watermark = self.watermarks.get(partition)
        pending = self.pending.get(partition)
        if pending is not None and plan.first > pending.end:
            watermark = _later(watermark, pending.after_us)  # it was committed whole
        plan.before_us = watermark
        states, applied = plan.states, plan.applied
        for offset, parsed in batch:
            origin = origins.get(offset) if origins else None
            if isinstance(parsed, InvalidEvent):
                # Caught, its traceback (and its context's) holds the frames that parsed the
                # batch, and their locals the batch: a cycle that kept every batch with an
                # invalid message (and its plan) alive until a full garbage collection.
                parsed.__traceback__ = parsed.__context__ = None
                if offset > counted_invalid and not _counted(invalid_sources, origin):
                    _note(invalid_sources, origin)
                    plan.invalid.append((offset, parsed))
                continue
            case_id = parsed.case_id
            state = states.get(case_id)
            if state is None:
                state = self._load(cases, partition, case_id, plan.orphans)
            if state is not None:
                if state.offset >= offset:
                    if pending is not None and pending.advances(offset):
                        watermark = _later(watermark,
                                           _later(parsed.ts_us, origin and origin.time_us))
                    continue
                if _counted(state.sources, origin):
                    continue  # a second copy of a re-keyed event
            related = related_case(parsed)
            if related is not None:
                plan.links.append((related, parsed.ts_us))
            # Lateness is judged against the partition the event was produced to.
            judged = watermark if origin is None else origin.time_us
            step = apply_event(state, parsed, partition=partition, offset=offset,
                               watermark_us=judged, windows=self.windows,
                               sample_rate=self.sample_rate)
            state = states[case_id] = step.state
            if origin is not None:
                _note(state.sources, origin)
            if home is not None and home(case_id) != partition:
                step.count(kpis.MISROUTED)
                plan.misrouted.append(case_id)
            if state.figure_entries() > self.spill_entries:
                self._spill(plan, case_id, state)
            # The case goes on changing in the batch: its items show it as of this event.
            view = state.annotation_view() if step.routes else None
            applied.append(Applied(offset, parsed, step, judged, view))
            if step.duplicate:
                plan.duplicates.append(offset)
            elif watermark is None or state.watermark_us > watermark:
                watermark = state.watermark_us
        plan.after_us = watermark
        plan.recovered_batch_done = pending is not None and plan.last >= pending.end
        if origins and invalid_sources != record.sources:
            plan.invalid_sources = invalid_sources
        self._encode_states(plan)
        return plan

    def _encode_states(self, plan: BatchPlan) -> None:
        """Each touched case's record, spilled if large, refused if still over the limit."""
        fold_id = self._fold_id(plan.partition)
        encoded, limit = plan.encoded, self.record_limit
        for case_id, state in plan.states.items():
            state.after_fold = fold_id
            raw = state.to_bytes()
            if len(raw) > self.spill_bytes and state.figure_entries():
                self._spill(plan, case_id, state)
                raw = state.to_bytes()
            if len(raw) > limit:  # the message is made only then
                raise RecordTooLarge(f"the state of case {case_id!r}", len(raw), limit)
            encoded[case_id] = raw

    def _spill(self, plan: BatchPlan, case_id: str, state: CaseState) -> None:
        """Move the case's figures to its next figures record (see `plan_batch`)."""
        key = spill_key(case_id, state.spills)
        plan.spilled[key] = checked(dump_state(state.take_figures().doc()),
                                    f"figures record {state.spills} of case {case_id!r}",
                                    self.record_limit)
        state.spills += 1
        state.count(kpis.SPILLED)

    def mark_batch(self, records: PartitionTable, plan: BatchPlan,
                   refused: Iterable[int] = ()) -> None:
        """Write the partition record before the batch's case writes: its invalid messages
        counted once (those at `refused` offsets also as refused by the dead-letter
        topic), and the batch marker that a recovery needs if only some cases land."""
        partition = plan.partition
        record = PartitionRecord.from_bytes(records.get(partition))
        refused = set(refused)
        counters = record.counters()
        for offset, invalid in plan.invalid:
            names = ((kpis.INVALID,) if offset not in refused
                     else (kpis.INVALID, kpis.DEAD_LETTER_FAILED))
            for name in names:
                counters.count(name, invalid.reason)
                self.aggregate(partition).count(name, invalid.reason)
            record.offset = offset
        self._archive(records, partition, record, counters, self._empty())
        record.batch = plan.marker().__dict__ if plan.applied else record.batch
        if plan.invalid_sources is not None:
            record.sources = plan.invalid_sources
        self._write_record(records, partition, record)
        self.positions[partition] = plan.last + 1

    def _archive(self, records: PartitionTable, partition: int, record: PartitionRecord,
                 counters: Aggregate, figures: Aggregate) -> None:
        """Add `figures` to the archive's shards and keep `counters` in the record (which
        the caller writes next: the write that makes both count)."""
        if counters.series or counters.histograms:  # archived figures written by 0.1
            figures.merge(counters)
            counters.series, counters.histograms = {}, {}
        record.shards = archive.add(records, partition, record.shards, figures,
                                    self.record_limit)
        record.archive = counters.to_json()

    def _write_record(self, records: PartitionTable, partition: int,
                      record: PartitionRecord) -> None:
        records[partition] = checked(record.to_bytes(), f"the record of partition {partition}",
                                     self.record_limit)

    def commit_batch(self, cases: CaseTable, plan: BatchPlan) -> None:
        """Write each touched case once (after the batch's side effects landed)."""
        partition = plan.partition
        for key, raw in plan.spilled.items():
            cases[key] = raw
        states, hot = plan.states, self.hot
        for case_id, raw in plan.encoded.items():
            cases[case_id] = raw
            hot.keep(partition, case_id, raw, states[case_id])
        for key in plan.orphans:
            cases.pop(key, None)
        self._account(partition, ((applied.event.case_id, applied.step)
                                  for applied in plan.applied))
        if plan.spilled:
            self.aggregate(partition).count(kpis.SPILLED, n=len(plan.spilled))
        if plan.after_us is not None:
            self.watermarks[partition] = _later(self.watermarks.get(partition), plan.after_us)
        if plan.recovered_batch_done:
            self.pending.pop(partition, None)
        self.positions[partition] = plan.last + 1

    def apply_link(self, cases: CaseTable, case_id: str, partition: int, link_ts_us: int) -> Step:
        """A re-engagement of `case_id`; applying one twice changes nothing more."""
        orphans: list[str] = []
        step = apply_link(self._load(cases, partition, case_id, orphans), partition=partition,
                          link_ts_us=link_ts_us)
        step.state.after_fold = self._fold_id(partition)
        for key in orphans:
            cases.pop(key, None)
        raw = cases[case_id] = checked(step.state.to_bytes(), f"the state of case {case_id!r}",
                                       self.record_limit)
        self.hot.keep(partition, case_id, raw, step.state)
        self._account(partition, ((case_id, step),))
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
        names = (counter,) if dead_lettered else (counter, kpis.DEAD_LETTER_FAILED)
        record.offset = offset
        self._count_in_record(records, partition, record, names, reason)
        return True

    def count_link_error(self, records: PartitionTable, partition: int) -> None:
        """A link that could not be applied (a bug: links are our own messages), counted in
        the partition record like an invalid message, so a rebuild keeps the count."""
        record = PartitionRecord.from_bytes(records.get(partition))
        self._count_in_record(records, partition, record, (kpis.PROCESSING_ERROR,), "link")

    def _count_in_record(self, records: PartitionTable, partition: int,
                         record: PartitionRecord, names: Iterable[str], reason: str) -> None:
        counters = record.counters()
        for name in names:
            counters.count(name, reason)
            self.aggregate(partition).count(name, reason)
        self._archive(records, partition, record, counters, self._empty())
        self._write_record(records, partition, record)

    def _load(self, cases: CaseTable, partition: int, case_id: str, orphans: list[str]
              ) -> CaseState | None:
        """The case's state; None for a new case, or a leftover of a fold (archived: the
        case starts again, as it would have had its delete landed, and its figures
        records go in `orphans`, to delete)."""
        raw = cases.get(case_id)
        if raw is None:
            self.hot.forget(case_id)
            return None
        state = self.hot.take(case_id, raw) or CaseState.from_bytes(raw)
        fold = self.folds.get(partition)
        if fold is not None and fold.leftover(case_id, state):
            self.stale.get(partition, set()).discard(case_id)  # rewritten, not deleted
            orphans += [spill_key(case_id, index) for index in range(state.spills)]
            return None
        return state

    def case_figures(self, cases: Mapping[str, bytes], case_id: str, state: CaseState
                     ) -> Aggregate:
        """Everything the case counted: its own figures and its figures records'."""
        figures = state.figures.aggregate()
        for index in range(state.spills):
            raw = cases.get(spill_key(case_id, index))
            if raw is None:
                raise LookupError(f"figures record {index} of case {case_id!r} is missing")
            figures.merge(decode_figures(orjson.loads(raw)))
        return figures

    def _fold_id(self, partition: int) -> int:
        fold = self.folds.get(partition)
        return fold.fold_id if fold is not None else 0

    def _account(self, partition: int, steps: Iterable[tuple[str, Step]]) -> None:
        """Add applied steps (case, step) to the partition's aggregate."""
        agg = self.aggregate(partition)
        keys = self.case_keys.setdefault(partition, {})
        for case_id, step in steps:
            agg.add_facts(step.facts)
            agg.add_pipeline(step.pipeline)
            keys[case_id] = step.state.last_us

    @staticmethod
    def _empty() -> Aggregate:
        return Aggregate(window_sizes=())

    # --- expiry -----------------------------------------------------------------------

    def maybe_expire(self, cases: CaseTable, records: PartitionTable, partition: int) -> int:
        """Fold cases idle for the retention into the archive, hourly in event time; a
        sweep folds FOLD_CHUNK cases a batch until it is done."""
        watermark = self.watermarks.get(partition)
        if watermark is None:
            return 0
        before_us, after = self.sweeps.pop(partition, (None, ""))
        if before_us is None:
            last = self.last_sweep.setdefault(partition, watermark)
            if watermark - last < SWEEP_EVERY_US:
                return 0
            self.last_sweep[partition] = watermark
            before_us = watermark - self.retention_us
        folded, cursor = self._fold(cases, records, partition, before_us, after)
        if cursor is not None:
            self.sweeps[partition] = (before_us, cursor)
        return folded

    def expire(self, cases: CaseTable, records: PartitionTable, partition: int,
               before_us: int) -> int:
        """Fold every case idle since before `before_us` (in chunks of FOLD_CHUNK)."""
        total, cursor = self._fold(cases, records, partition, before_us)
        while cursor is not None:
            folded, cursor = self._fold(cases, records, partition, before_us, cursor)
            total += folded
        return total

    def _fold(self, cases: CaseTable, records: PartitionTable, partition: int,
              before_us: int, after: str = "") -> tuple[int, str | None]:
        """Archive up to FOLD_CHUNK cases idle since before `before_us`, in case id order
        from `after` on, then delete them: how many, and where to go on (None: done).

        The record names the archived cases (by digest) that may still be in the table,
        and counts its folds; every case written carries the count it was written under.
        A case named by the last fold and written before it is a leftover whose delete did
        not land (a crash): a rebuild does not count it, the next fold deletes it, and an
        event for it starts the case again. A case written after the fold is counted."""
        record = PartitionRecord.from_bytes(records.get(partition))
        keys = self.case_keys.get(partition, {})
        leftovers = {case_id for case_id in self.stale.pop(partition, set()) if case_id in cases}
        figures, counters = self._empty(), record.counters()
        expired: list[str] = []
        cursor = None
        # Only cases last written idle enough can be: the others are not even decoded.
        idle = sorted(key for key, last_us in keys.items() if key > after
                      and (last_us is None or last_us < before_us) and key not in leftovers)
        for case_id in idle:
            raw = cases.get(case_id)
            if raw is None:
                continue
            state = self.hot.peek(case_id, raw) or CaseState.from_bytes(raw)
            if state.last_us is not None and state.last_us < before_us:
                figures.merge(self.case_figures(cases, case_id, state))
                counters.add_pipeline(state.pipeline)
                expired.append(case_id)
                if len(expired) == FOLD_CHUNK:
                    cursor = case_id
                    break
        if not expired and not leftovers:
            return 0, cursor
        self._archive(records, partition, record, counters, figures)
        record.fold_id += 1
        record.folded_digests = [id_digest(case_id) for case_id in (*leftovers, *expired)]
        record.watermark_us = self.watermarks.get(partition)
        self._write_record(records, partition, record)
        self.folds[partition] = record
        for case_id in (*leftovers, *expired):
            raw = cases[case_id]
            spills = (self.hot.peek(case_id, raw) or CaseState.from_bytes(raw)).spills
            self.hot.forget(case_id)
            del cases[case_id]
            for index in range(spills):
                cases.pop(spill_key(case_id, index), None)
            keys.pop(case_id, None)
        return len(expired), cursor

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
        self.hot.drop(partitions)
        for partition in partitions:
            self.aggregates[partition] = self._empty()
            self.case_keys[partition] = {}
            for table in (self.watermarks, self.last_sweep, self.pending, self.sweeps,
                          self.stale, self.folds):
                table.pop(partition, None)
        owned = {key: raw for key, raw in records if key_partition(key) in partitions}
        partition_records = {}
        for partition in partitions & owned.keys():
            record = partition_records[partition] = PartitionRecord.from_bytes(owned[partition])
            self.folds[partition] = record
            agg = self.aggregates[partition]
            agg.merge(record.counters())
            for shard in archive.load(owned, partition, record.shards):
                agg.merge(shard)
            self._raise_watermark(partition, record.watermark_us)
            if record.batch is not None:
                pending = self.pending[partition] = PendingBatch(**record.batch)
                self._raise_watermark(partition, pending.before_us)
        table = dict(cases)
        for case_id, raw in table.items():
            if is_spill_key(case_id):
                continue  # read with its case
            state = CaseState.from_bytes(raw)
            partition = state.partition
            if partition not in partitions:
                continue
            record = partition_records.get(partition)
            if record is not None and record.leftover(case_id, state):
                self.stale.setdefault(partition, set()).add(case_id)
                continue
            agg = self.aggregates[partition]
            agg.merge(self.case_figures(table, case_id, state))
            agg.add_pipeline(state.pipeline)
            self.case_keys[partition][case_id] = state.last_us
            pending = self.pending.get(partition)
            if pending is None or state.offset < pending.start:
                # A case written by the pending batch may be one of only some that
                # landed: its time is the batch's `after_us`, applied once known whole.
                self._raise_watermark(partition, state.watermark_us)

    def drop(self, partitions: set[int]) -> None:
        """Forget partitions this worker no longer owns (their new owner rebuilds them)."""
        self.hot.drop(partitions)
        for table in (self.aggregates, self.watermarks, self.case_keys, self.last_sweep,
                      self.positions, self.pending, self.sweeps, self.stale, self.folds):
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

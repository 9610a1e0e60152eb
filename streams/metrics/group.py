"""The group's figures: each partition's snapshots merged into one monotone view.

Every worker publishes, for each partition it owns, a snapshot of the partition's
aggregate (monotone counters, derived from durable table state) and of its recently closed
event-time windows to the group topic (one partition, compacted, keyed by partition).
Every worker follows that topic into a `GroupState`; the one exporter of the moment
renders it (streams/worker/group.py). The rules that keep the series monotone live here:

- a partition's figures are the most each counter ever reached in any of its snapshots
  (an old owner's last snapshot and the new owner's first can arrive in any order);
- the group's figures are the sum over partitions, so no rebalance, restart or worker
  count can lower them;
- the label values admitted (first come, first kept) are stored in the same topic and
  never given back, so a value never moves between its own series and `other`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.core.kpis import Aggregate
from streams.core.metric_labels import BOUNDED, FIGURE_LABELS
from streams.core.windows import Cell, RecentClosed

SNAPSHOT_VERSION = 1  # of the group topic's records; bump on any incompatible change
LABELS_KEY = b"labels"
RECENT_WINDOWS = 6  # closed windows per size a snapshot carries
KEPT_WINDOWS = 30  # closed windows with cells per size and partition the group keeps:
# how far (in such windows) two partitions may drift apart and the group still show one
_COUNTERS_ONLY = ("offset", "emitted")  # a cell's marks, not figures


class SnapshotError(ValueError):
    """A group topic record this version cannot read."""


def snapshot_key(partition: int) -> bytes:
    return f"partition/{partition}".encode()


@dataclass
class WindowDigest:
    """One size's closed windows known on one partition: every window from `covered_from`
    (None: from any) to `closed_start` is closed; those not in `cells` hold nothing."""

    closed_start: int
    covered_from: int | None = None
    cells: dict[int, dict[tuple[str, str], Cell]] = field(default_factory=dict)  # by start

    def merge(self, other: WindowDigest, size: int) -> WindowDigest:
        """Both digests' knowledge (closed windows never change), if their ranges touch;
        else the later one."""
        def starts(d: WindowDigest) -> float:
            return -math.inf if d.covered_from is None else d.covered_from

        if starts(other) > self.closed_start + size or starts(self) > other.closed_start + size:
            return other if other.closed_start >= self.closed_start else self
        lowest = min(starts(self), starts(other))
        merged = WindowDigest(max(self.closed_start, other.closed_start),
                              None if math.isinf(lowest) else int(lowest),
                              {**self.cells, **other.cells})
        if len(merged.cells) > KEPT_WINDOWS:  # bounded: only the latest windows with cells
            kept = sorted(merged.cells, reverse=True)[:KEPT_WINDOWS]
            merged.covered_from = max(merged.covered_from or kept[-1], kept[-1])
            merged.cells = {start: merged.cells[start] for start in kept}
        return merged


@dataclass
class Snapshot:
    """One partition's figures after a batch whose writes the broker acknowledged."""

    partition: int
    offset: int  # the events offset after the last batch applied
    aggregate: Aggregate
    windows: dict[int, WindowDigest] = field(default_factory=dict)  # by size

    def to_bytes(self) -> bytes:
        agg = self.aggregate.to_json()
        agg.pop("windows", None)
        doc = {
            "schema_version": SNAPSHOT_VERSION, "partition": self.partition,
            "offset": self.offset, "aggregate": agg,
            "windows": [[size, digest.closed_start, digest.covered_from,
                         [[start, intent, version, _cell_figures(cell)]
                          for start, cells in sorted(digest.cells.items())
                          for (intent, version), cell in sorted(cells.items())]]
                        for size, digest in sorted(self.windows.items())],
        }
        return zlib.compress(orjson.dumps(doc), 1)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Snapshot:
        doc = _load(raw)
        windows = {}
        for size, closed_start, covered_from, rows in doc.get("windows", ()):
            digest = windows[int(size)] = WindowDigest(
                int(closed_start), None if covered_from is None else int(covered_from))
            for start, intent, version, figures in rows:
                digest.cells.setdefault(int(start), {})[(intent, version)] = Cell(**figures)
        return cls(int(doc["partition"]), int(doc["offset"]),
                   Aggregate.from_json(doc["aggregate"]), windows)

    @classmethod
    def of(cls, partition: int, offset: int, aggregate: Aggregate,
           recent: dict[int, RecentClosed]) -> Snapshot:
        """From a partition's aggregate and `PartitionWindows.recent_closed`."""
        windows = {
            size: WindowDigest(closed, covered_from,
                               {start: {(k.intent, k.agent_version): cell for k, cell in cells}
                                for start, cells in by_start.items()})
            for size, (closed, covered_from, by_start) in recent.items()}
        return cls(partition, offset, aggregate, windows)


def labels_record(admitted: dict[str, list[str]]) -> bytes:
    return zlib.compress(orjson.dumps({"schema_version": SNAPSHOT_VERSION,
                                       "admitted": admitted}), 1)


def _load(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(zlib.decompress(raw))
    except (zlib.error, orjson.JSONDecodeError) as err:
        raise SnapshotError(f"not a group record: {err}") from None
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(f"group record of schema_version {version!r}; this version reads "
                            f"{SNAPSHOT_VERSION}")
    return doc


def _cell_figures(cell: Cell) -> dict[str, Any]:
    return {k: v for k, v in cell.__dict__.items() if k not in _COUNTERS_ONLY}


@dataclass
class GroupWindow:
    """The group's latest closed window of one size: cells summed over partitions."""

    size: int
    start: int
    cells: dict[tuple[str, str], list[Cell]]

    @property
    def end(self) -> int:
        return self.start + self.size


class GroupState:
    """What the group topic says so far (see the module doc)."""

    def __init__(self) -> None:
        self.figures: dict[int, Aggregate] = {}
        self.offsets: dict[int, int] = {}
        self.windows: dict[int, dict[int, WindowDigest]] = {}  # partition -> size -> known
        self.admitted: dict[str, list[str]] = {}
        self.version = 0  # changes with every record that changed something

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the group topic (a tombstone or a foreign key changes nothing)."""
        if value is None or key is None:
            return
        if key == LABELS_KEY:
            self.admit(_load(value).get("admitted", {}))
        elif key.startswith(b"partition/"):
            self.add(Snapshot.from_bytes(value))

    def add(self, snapshot: Snapshot) -> None:
        partition = snapshot.partition
        mine = self.figures.setdefault(partition, Aggregate())
        mine.merge(snapshot.aggregate, max)
        self.offsets[partition] = max(self.offsets.get(partition, -1), snapshot.offset)
        # A closed window never changes (a late event leaves it as it was): what any
        # snapshot said of one stays true, whatever order snapshots arrive in.
        held = self.windows.setdefault(partition, {})
        for size, digest in snapshot.windows.items():
            known = held.get(size)
            held[size] = (known or digest).merge(digest, size)
        self.version += 1

    def admit(self, admitted: dict[str, Iterable[str]]) -> bool:
        """Add admitted label values (in their order); True if any is new."""
        changed = False
        for label, values in admitted.items():
            mine = self.admitted.setdefault(label, [])
            for value in values:
                if value not in mine:
                    mine.append(value)
                    changed = True
        if changed:
            self.version += 1
        return changed

    def total(self) -> Aggregate:
        total = Aggregate()
        for figures in self.figures.values():
            total.merge(figures)
        return total

    def group_windows(self) -> dict[int, GroupWindow]:
        """Per size, the latest window that every partition with an event time has closed
        and known, with cells on at least one."""
        out: dict[int, GroupWindow] = {}
        reporting = [held for held in self.windows.values() if held]
        for size in sorted({size for held in reporting for size in held}):
            if any(size not in held for held in reporting):
                continue  # a partition has not closed a window of this size yet
            digests = [held[size] for held in reporting]
            newest = min(d.closed_start for d in digests)
            oldest = max(-math.inf if d.covered_from is None else d.covered_from
                         for d in digests)
            starts = sorted({start for d in digests for start in d.cells
                             if oldest <= start <= newest}, reverse=True)
            if starts:
                cells: dict[tuple[str, str], list[Cell]] = {}
                for digest in digests:
                    for label_key, cell in digest.cells.get(starts[0], {}).items():
                        cells.setdefault(label_key, []).append(cell)
                out[size] = GroupWindow(size, starts[0], cells)
        return out

    def label_values(self, total: Aggregate) -> dict[str, list[str]]:
        """The bounded labels' values in `total`, sorted (the order they are admitted in)."""
        found = series_label_values(total.series)
        for held in self.windows.values():
            for digest in held.values():
                for cells in digest.cells.values():
                    for intent, version in cells:
                        found["intent"].add(intent)
                        found["agent_version"].add(version)
        return {label: sorted(values) for label, values in found.items()}


def series_label_values(keys: Iterable[tuple[str, tuple[str, ...], tuple[str, ...]]]
                        ) -> dict[str, set[str]]:
    """The bounded labels' values in these aggregate series keys (figure, labels, dims)."""
    found: dict[str, set[str]] = {label: set() for label in BOUNDED}
    for name, labels, dims in keys:
        found["intent"].add(dims[0])
        found["channel"].add(dims[1])
        found["agent_version"].add(dims[2])
        for label, value in zip(FIGURE_LABELS.get(name, ()), labels, strict=False):
            if label in found:
                found[label].add(value)
    return found

"""Event-time tumbling windows: cells, closing, lateness, retention and the closed-window message.

Pure (no Faust, no Kafka), so every rule unit-tests in milliseconds; streams/worker/window_tables.py
keeps the cells in Faust windowed tables and does the I/O.

A *cell* is what one window holds for one (intent, agent_version) of one events partition.
An event's windowed facts are folded into the cells of the windows holding the event's
`ts` (one per size), unless that window had already closed when the event arrived (the
late rule of `WindowPolicy`, the one the case state machine counts late events with).
A window closes when its partition's event time passes its end plus the grace period,
and is dropped once the partition's event time is the retention past its end.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from streams.core import kpis
from streams.core.events import format_ts
from streams.core.kpis import Fact, ratio
from streams.core.state_bytes import dump_state, sorted_json
from streams.core.units import SECOND_US

SCHEMA_VERSION = 1  # of the closed-window message; bump on any incompatible change
FIGURES = frozenset({kpis.CONCLUDED, kpis.ESCALATION, kpis.AHT, kpis.POLICY_CHECK, kpis.CSAT})


class WindowKey(NamedTuple):
    """One window of one size, for one (intent, agent_version), within a partition."""

    size: int  # seconds
    start: int  # epoch seconds, aligned to the UTC epoch
    intent: str
    agent_version: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class Cell:
    """The counters of one window and key, and the redelivery and emission marks."""

    outcomes: dict[str, int] = field(default_factory=dict)  # conclusions by outcome
    escalations: dict[str, int] = field(default_factory=dict)  # concluding, by reason
    aht_count: int = 0
    aht_sum: float = 0.0
    checks: int = 0
    passed: int = 0
    csat_count: int = 0
    csat_sum: float = 0.0
    offset: int = -1  # last events offset folded in: a redelivered event is not folded twice
    emitted: bool = False  # published to the windows topic

    @property
    def concluded(self) -> int:
        return sum(self.outcomes.values())

    @property
    def autonomous(self) -> int:
        return self.outcomes.get("autonomous", 0)

    @property
    def escalated(self) -> int:
        return self.outcomes.get("escalated", 0)

    def add(self, fact: Fact) -> None:
        name = fact.name
        if name == kpis.CONCLUDED:
            self.outcomes[fact.labels[0]] = self.outcomes.get(fact.labels[0], 0) + 1
        elif name == kpis.ESCALATION:
            self.escalations[fact.labels[0]] = self.escalations.get(fact.labels[0], 0) + 1
        elif name == kpis.AHT:
            self.aht_count += 1
            self.aht_sum += fact.value
        elif name == kpis.POLICY_CHECK:
            self.checks += 1
            self.passed += fact.labels[0] == "passed"
        elif name == kpis.CSAT:
            self.csat_count += 1
            self.csat_sum += fact.value

    def figures(self) -> dict[str, Any]:
        """Counters and the ratios derived from them (null when the denominator is 0)."""
        return {
            "cases_concluded": self.concluded,
            "outcomes": dict(sorted(self.outcomes.items())),
            "autonomous": self.autonomous,
            "escalated": self.escalated,
            "escalations_by_reason": dict(sorted(self.escalations.items())),
            "arr": ratio(self.autonomous, self.concluded),
            "aht_count": self.aht_count,
            "aht_seconds_sum": self.aht_sum,
            "aht_seconds_mean": ratio(self.aht_sum, self.aht_count),
            "policy_checks": self.checks,
            "policy_checks_passed": self.passed,
            "compliance_score": ratio(self.passed, self.checks),
            "csat_count": self.csat_count,
            "csat_sum": self.csat_sum,
            "csat_mean": ratio(self.csat_sum, self.csat_count),
        }

    @classmethod
    def summed(cls, cells: Iterable[Cell]) -> Cell:
        """The counters of `cells` added up (marks left unset)."""
        total = cls()
        for cell in cells:
            for outcome, n in cell.outcomes.items():
                total.outcomes[outcome] = total.outcomes.get(outcome, 0) + n
            for reason, n in cell.escalations.items():
                total.escalations[reason] = total.escalations.get(reason, 0) + n
            total.aht_count += cell.aht_count
            total.aht_sum += cell.aht_sum
            total.checks += cell.checks
            total.passed += cell.passed
            total.csat_count += cell.csat_count
            total.csat_sum += cell.csat_sum
        return total

    def to_bytes(self) -> bytes:
        return dump_state(self.__dict__)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Cell:
        return cls(**orjson.loads(raw))


@dataclass(frozen=True)
class WindowPolicy:
    """Event-time tumbling windows: sizes in seconds and the grace before one closes."""

    sizes_s: tuple[int, ...] = (60, 3600)
    grace_s: int = 600

    def late_sizes(self, ts_us: int, watermark_us: int) -> tuple[int, ...]:
        """Sizes whose window holding `ts_us` closed before this event arrived."""
        if watermark_us <= ts_us + self.grace_s * SECOND_US:
            return ()  # every window holding `ts_us` ends after it: none closed yet
        late = []
        for size in self.sizes_s:
            end_us = (kpis.window_start(ts_us, size) + size) * SECOND_US
            if watermark_us > end_us + self.grace_s * SECOND_US:
                late.append(size)
        return tuple(late)


@dataclass(frozen=True)
class WindowRules:
    """When a window takes an event, closes, and is dropped (all in event time)."""

    policy: WindowPolicy
    retention_s: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.policy.sizes_s

    def closes_after_us(self, size: int, start: int) -> int:
        """The window is closed once the partition's event time is above this: exactly
        when an event for it would be late (`WindowPolicy.late_sizes`)."""
        return (start + size + self.policy.grace_s) * SECOND_US

    def latest_closed_start(self, size: int, watermark_us: int) -> int:
        """The start of the latest window of `size` that event time `watermark_us` closed:
        the largest aligned start with `watermark_us > closes_after_us(size, start)`."""
        latest = (watermark_us - 1) // SECOND_US - size - self.policy.grace_s
        return (latest // size) * size

    def expires_at_us(self, size: int, start: int) -> int:
        """The window is dropped once the partition's event time reaches this."""
        return (start + size + self.retention_s) * SECOND_US


def size_label(size: int) -> str:
    """The `window` label value: the size in seconds, as `acsr_events_late_total` has it."""
    return str(size)


class RecentClosed(NamedTuple):
    """One size's recently closed windows of a partition (`PartitionWindows.recent_closed`)."""

    closed_start: int  # the latest window the partition's event time closed
    covered_from: int | None  # windows from here on are all known (None: every one held)
    cells: dict[int, list[tuple[WindowKey, Cell]]]  # by start: the windows holding cells


class PartitionWindows:
    """The window cells of one events partition, and which windows are still open."""

    def __init__(self, partition: int, rules: WindowRules) -> None:
        self.partition = partition
        self.rules = rules
        self.cells: dict[WindowKey, Cell] = {}
        self._members: dict[tuple[int, int], set[WindowKey]] = {}  # (size, start) -> keys
        self._starts: dict[int, list[int]] = {size: [] for size in rules.sizes}  # sorted
        self._open: set[tuple[int, int]] = set()  # windows with a cell not emitted yet
        self._next_expiry_us: int | None = None

    def __len__(self) -> int:
        return len(self.cells)

    def load(self, key: WindowKey, cell: Cell) -> None:
        """Take a cell as recovered from a table."""
        self.cells[key] = cell
        window = (key.size, key.start)
        members = self._members.get(window)
        if members is None:
            members = self._members[window] = set()
            insort(self._starts.setdefault(key.size, []), key.start)
        members.add(key)
        if not cell.emitted:
            self._open.add(window)
        expiry = self.rules.expires_at_us(*window)
        if self._next_expiry_us is None or expiry < self._next_expiry_us:
            self._next_expiry_us = expiry

    def fold(self, offset: int, ts_us: int, late: tuple[int, ...], facts: Iterable[Fact]
             ) -> list[WindowKey]:
        """Fold one event's facts into its windows; the keys whose cell changed.

        A cell that already holds `offset` (a redelivery after a crash) is left alone."""
        changed: dict[WindowKey, Cell] = {}
        for fact in facts:
            if fact.name not in FIGURES:
                continue
            for size in self.rules.sizes:
                if size in late:
                    continue
                key = WindowKey(size, kpis.window_start(ts_us, size), fact.dims[0], fact.dims[2])
                cell = changed.get(key) or self.cells.get(key)
                if cell is None:
                    cell = Cell()
                    self.load(key, cell)
                elif key not in changed and cell.offset >= offset:
                    continue
                cell.add(fact)
                cell.offset = offset
                changed[key] = cell
        return list(changed)

    def closing(self, watermark_us: int | None) -> list[WindowKey]:
        """Cells of closed windows not emitted yet, in window end order."""
        if watermark_us is None:
            return []
        due = [w for w in self._open if watermark_us > self.rules.closes_after_us(*w)]
        keys = [key for window in due for key in self._members[window]
                if not self.cells[key].emitted]
        return sorted(keys, key=lambda k: (k.end, k.size, k.intent, k.agent_version))

    def mark_emitted(self, key: WindowKey) -> Cell:
        cell = self.cells[key]
        cell.emitted = True
        window = (key.size, key.start)
        if all(self.cells[k].emitted for k in self._members[window]):
            self._open.discard(window)
        return cell

    def expiring(self, watermark_us: int | None) -> list[WindowKey]:
        """Cells of windows past the retention (dropped from the table by the caller)."""
        if watermark_us is None or self._next_expiry_us is None \
                or watermark_us < self._next_expiry_us:
            return []
        # A window of `size` has expired once its start is at most this (expires_at_us).
        keys = []
        for size, starts in self._starts.items():
            latest = watermark_us // SECOND_US - size - self.rules.retention_s
            for start in starts[:bisect_right(starts, latest)]:
                keys.extend(self._members[(size, start)])
        return sorted(keys)

    def drop(self, keys: Iterable[WindowKey]) -> None:
        dropped = False
        for key in keys:
            dropped = True
            self.cells.pop(key, None)
            window = (key.size, key.start)
            members = self._members.get(window)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._members[window]
                    self._open.discard(window)
                    starts = self._starts[key.size]
                    del starts[bisect_left(starts, key.start)]
        if dropped:
            self._next_expiry_us = min(
                (self.rules.expires_at_us(size, starts[0])
                 for size, starts in self._starts.items() if starts), default=None)

    def recent_closed(self, watermark_us: int | None, count: int) -> dict[int, RecentClosed]:
        """Per size: the start of the latest window the partition's event time has closed,
        and the cells of the latest `count` closed windows that hold any. Every closed
        window from the earliest of those on (from any, if fewer) that is not among them
        holds none. The group's windows are summed from these (streams/metrics/group.py)."""
        if watermark_us is None:
            return {}
        out: dict[int, RecentClosed] = {}
        for size in self.rules.sizes:
            closed = self.rules.latest_closed_start(size, watermark_us)
            held = self._starts.get(size, [])
            end = bisect_right(held, closed)
            starts = held[max(0, end - count):end][::-1]  # the latest first
            recent = {start: sorted((key, self.cells[key]) for key in self._members[(size, start)])
                      for start in starts}
            out[size] = RecentClosed(closed, starts[-1] if len(starts) == count else None,
                                     recent)
        return out


def message_key(partition: int, key: WindowKey) -> bytes:
    """The same bytes for the same window and key, whoever emits it: a JSON array (never
    ambiguous, whatever characters an intent or agent version holds)."""
    return orjson.dumps([key.size, format_ts(key.start * SECOND_US), partition, key.intent,
                         key.agent_version])


def closed_message(partition: int, key: WindowKey, cell: Cell, source: dict[str, Any]
                   ) -> dict[str, Any]:
    """The closed-window message (schema version 1, see docs/kpis.md), for a warehouse."""
    return {
        "schema_version": SCHEMA_VERSION,
        "window_seconds": key.size,
        "start": format_ts(key.start * SECOND_US),
        "end": format_ts(key.end * SECOND_US),
        "partition": partition,
        "intent": key.intent,
        "agent_version": key.agent_version,
        **cell.figures(),
        "source": source,
    }


encode = sorted_json  # a closed window's message as it goes on the topic


def aggregate_rows(cells: Iterable[tuple[WindowKey, Cell]]) -> list[list[Any]]:
    """Cells as `Aggregate.windows` JSON rows ([size, start, figure, labels, count, sum]),
    summed over intent and agent version: the replay report reads these."""
    sums: dict[tuple[int, int, str, tuple[str, ...]], list[float]] = {}

    def add(key: WindowKey, name: str, labels: tuple[str, ...], count: int, total: float
            ) -> None:
        if count:
            cell = sums.setdefault((key.size, key.start, name, labels), [0, 0.0])
            cell[0] += count
            cell[1] += total

    for key, cell in cells:
        for outcome, n in cell.outcomes.items():
            add(key, kpis.CONCLUDED, (outcome,), n, n)
        for reason, n in cell.escalations.items():
            add(key, kpis.ESCALATION, (reason,), n, n)
        add(key, kpis.AHT, (), cell.aht_count, cell.aht_sum)
        add(key, kpis.POLICY_CHECK, ("passed",), cell.passed, cell.passed)
        add(key, kpis.POLICY_CHECK, ("failed",), cell.checks - cell.passed,
            cell.checks - cell.passed)
        add(key, kpis.CSAT, (), cell.csat_count, cell.csat_sum)
    return [[size, start, name, list(labels), count, total]
            for (size, start, name, labels), (count, total) in sorted(sums.items())]


# Gauges of the latest closed window: (metric, help, value of summed components or None).
GAUGES: tuple[tuple[str, str, str], ...] = (
    ("acsr_window_compliance_ratio", "Policy checks passed / checks in the latest closed "
     "window (event time).", "compliance"),
    ("acsr_window_arr_ratio", "Autonomous / concluded cases in the latest closed window.", "arr"),
    ("acsr_window_aht_seconds", "Mean handling time of the latest closed window's autonomous "
     "conclusions.", "aht"),
    ("acsr_window_policy_checks", "Policy checks in the latest closed window.", "checks"),
    ("acsr_window_policy_checks_passed", "Policy checks passed in the latest closed window.",
     "passed"),
    ("acsr_window_cases_concluded", "Cases concluded in the latest closed window.", "concluded"),
    ("acsr_window_cases_autonomous", "Autonomous resolutions in the latest closed window.",
     "autonomous"),
    ("acsr_window_handling_seconds", "Sum of handling times of the latest closed window's "
     "autonomous conclusions (AHT = this / cases autonomous).", "aht_sum"),
)


def gauge_values(cells: Iterable[Cell]) -> dict[str, float | None]:
    """The gauges of one label set: components summed, ratios from the sums."""
    figures = Cell.summed(cells).figures()
    return {gauge: figures[figure] for gauge, figure in GAUGE_FIGURES.items()}


# gauge_values' names for a cell's figures
GAUGE_FIGURES = {"compliance": "compliance_score", "arr": "arr", "aht": "aht_seconds_mean",
                 "checks": "policy_checks", "passed": "policy_checks_passed",
                 "concluded": "cases_concluded", "autonomous": "autonomous",
                 "aht_sum": "aht_seconds_sum"}

"""OpenMetrics text with timestamped samples: the group's exposition over event time.

A `Chunk` gathers the metric families of many moments (e.g. one UTC day at every step)
and writes them as one OpenMetrics document: each family once, each metric (a label set;
a histogram's buckets, count and sum together) with its points in time order, `# EOF` at
the end. That is the form `promtool tsdb create-blocks-from openmetrics` turns into
blocks; a chunk holds one block range, so memory and promtool's work stay bounded by it.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.utils import floatToGoString

_TIMESTAMP_LIMIT_S = 2**53 // 1000  # far beyond any event time, well within a float
WRITE_BUFFER = 1 << 20


Values = tuple[float, ...]


@dataclass(frozen=True)
class Header:
    name: str
    type: str
    help: str
    unit: str


@dataclass(frozen=True)
class Frame:
    """Metric families at one moment: each metric's id (`Frames`) with its values; an
    unchanged metric shares its values with the frame before."""

    metrics: tuple[tuple[int, Values], ...]


@dataclass
class Changes:
    """What changed in an exposition since the moment before: the metrics with new values
    (or new metrics), and those gone. A chunk keeps changes, not samples: its memory and
    work grow with what changes, not with the series times the moments."""

    values: dict[int, Values] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.values or self.gone)


class Exposition:
    """The exposition now (metric id -> values), and its changes since it was last taken."""

    def __init__(self) -> None:
        self.now: dict[int, Values] = {}
        self.changes = Changes()

    def set(self, metric_id: int, values: Values) -> None:
        if self.now.get(metric_id) is not values:
            self.now[metric_id] = values
            self.changes.values[metric_id] = values
            self.changes.gone.discard(metric_id)

    def remove(self, metric_id: int) -> None:
        if self.now.pop(metric_id, None) is not None:
            self.changes.values.pop(metric_id, None)
            self.changes.gone.add(metric_id)

    def take(self) -> Changes:
        changes, self.changes = self.changes, Changes()
        return changes


class Frames:
    """Makes frames from prometheus_client metric families, numbering each metric (a
    label set; a histogram's buckets, count and sum together) once and for all."""

    def __init__(self) -> None:
        self.ids: dict[tuple[Any, ...], int] = {}
        self.prefixes: list[tuple[str, ...]] = []  # by id: the sample lines' beginnings
        self.family: list[str] = []  # by id
        self.headers: dict[str, Header] = {}  # in the order families were first seen
        self.last: list[Values] = []  # by id: the values of the latest frame holding it

    def of(self, families: Iterable[Any]) -> Frame:
        metrics: list[tuple[int, Values]] = []
        for family in families:
            name = family.name
            self.header(name, family.type, family.documentation, family.unit)
            groups: dict[tuple[Any, ...], list[Any]] = {}
            for sample in family.samples:
                labels = sample.labels
                key = tuple(item for item in labels.items() if item[0] != "le") \
                    if "le" in labels else tuple(labels.items())
                group = groups.get(key)
                if group is None:
                    groups[key] = [sample]
                else:
                    group.append(sample)
            header = self.headers[name]
            for key, samples in groups.items():
                metric_id = self.metric_id(header, key, samples)
                metrics.append((metric_id, self.shared(metric_id, tuple(s.value for s in samples))))
        return Frame(tuple(metrics))

    def header(self, name: str, type_: str, help_text: str, unit: str = "") -> Header:
        """The family's header, remembered in the order families come."""
        header = self.headers.get(name)
        if header is None:
            header = self.headers[name] = Header(name, type_, help_text, unit)
        return header

    def metric_id(self, header: Header, key: tuple[Any, ...], samples: Sequence[Any]) -> int:
        """The id of the family's metric `key` (its labels without `le`) whose samples are
        `samples` (anything with a `name` and `labels`: only their layout is read)."""
        layout = (header.name, key, len(samples))
        metric_id = self.ids.get(layout)
        if metric_id is None:
            metric_id = self.ids[layout] = len(self.prefixes)
            self.prefixes.append(tuple(_prefix(s.name, s.labels) for s in samples))
            self.family.append(header.name)
            self.last.append(())
        return metric_id

    def shared(self, metric_id: int, values: Values) -> Values:
        """`values`, or the equal tuple of the metric's last frame (kept once in memory)."""
        if self.last[metric_id] == values:
            return self.last[metric_id]
        self.last[metric_id] = values
        return values


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _prefix(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return f"{name} "
    rendered = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
    return f"{name}{{{rendered}}} "


class Chunk:
    """Timestamped samples of one range of time, written as one OpenMetrics document."""

    def __init__(self, frames: Frames) -> None:
        self.frames = frames
        self.moments = array("q")
        # By metric: its runs, each (first moment index, values; None: absent from then).
        self.runs: dict[int, list[tuple[int, Values | None]]] = {}
        self.points = 0
        self.first_s: int | None = None
        self.last_s: int | None = None

    def __len__(self) -> int:
        return self.points

    def add(self, ts_s: int, changes: Changes, exposition: Exposition) -> None:
        """The exposition at `ts_s` (later than every moment added before), given what
        changed since the moment before; the chunk's first moment takes it whole."""
        if self.last_s is not None and ts_s <= self.last_s:
            raise ValueError(f"samples at {ts_s} after samples at {self.last_s}: "
                             "moments must be added in time order")
        if not 0 <= ts_s < _TIMESTAMP_LIMIT_S:
            raise ValueError(f"timestamp {ts_s} out of range")
        index = len(self.moments)
        self.moments.append(ts_s)
        self.first_s = ts_s if self.first_s is None else self.first_s
        self.last_s = ts_s
        runs = self.runs
        if not index:
            for metric_id, values in exposition.now.items():
                runs[metric_id] = [(0, values)]
        else:
            for metric_id, values in changes.values.items():
                runs.setdefault(metric_id, []).append((index, values))
            for metric_id in changes.gone:
                if metric_id in runs:
                    runs[metric_id].append((index, None))
        self.points += len(exposition.now)

    def render(self) -> Iterator[str]:
        """The OpenMetrics document, in pieces: each family once, each metric's points in
        time order."""
        frames, moments = self.frames, self.moments
        stamps = [f" {ts_s}\n" for ts_s in moments]
        by_family: dict[str, list[int]] = {}
        for metric_id in sorted(self.runs):
            by_family.setdefault(frames.family[metric_id], []).append(metric_id)
        for name, header in frames.headers.items():
            ids = by_family.get(name)
            if ids is None:
                continue
            yield f"# TYPE {name} {header.type}\n"
            if header.unit:
                yield f"# UNIT {name} {header.unit}\n"
            yield f"# HELP {name} {escape_label_value(header.help)}\n"
            for metric_id in ids:
                prefixes = frames.prefixes[metric_id]
                runs = self.runs[metric_id]
                for number, (first, values) in enumerate(runs):
                    if values is None:
                        continue
                    last = runs[number + 1][0] if number + 1 < len(runs) else len(moments)
                    heads = [prefix + floatToGoString(value)
                             for prefix, value in zip(prefixes, values, strict=True)]
                    yield "".join([head + stamp for stamp in stamps[first:last]
                                   for head in heads])
        yield "# EOF\n"

    def write(self, path: Path) -> int:
        """Write the document to `path` (whole or not at all); its size in bytes."""
        temporary = path.with_name(f".{path.name}.partial")
        with temporary.open("w", encoding="utf-8", buffering=WRITE_BUFFER) as out:
            for piece in self.render():
                out.write(piece)
        size = temporary.stat().st_size
        os.replace(temporary, path)
        return size

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
from dataclasses import dataclass
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
    """Metric families at one moment: each metric's id (`Frames`) with its values. A chunk
    keeps frames, not lines: a frame is made once and stands for every moment the figures
    stay the same, and an unchanged metric shares its values with the frame before."""

    metrics: tuple[tuple[int, Values], ...]


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
        self.timeline: list[tuple[Frame, array]] = []  # each frame, and its moments
        self.points = 0
        self.first_s: int | None = None
        self.last_s: int | None = None

    def __len__(self) -> int:
        return self.points

    def add(self, ts_s: int, frame: Frame) -> None:
        """The frame's samples at `ts_s`, later than every moment added before."""
        if self.last_s is not None and ts_s <= self.last_s:
            raise ValueError(f"samples at {ts_s} after samples at {self.last_s}: "
                             "moments must be added in time order")
        if not 0 <= ts_s < _TIMESTAMP_LIMIT_S:
            raise ValueError(f"timestamp {ts_s} out of range")
        self.first_s = ts_s if self.first_s is None else self.first_s
        self.last_s = ts_s
        if self.timeline and self.timeline[-1][0] is frame:
            self.timeline[-1][1].append(ts_s)
        else:
            self.timeline.append((frame, array("q", (ts_s,))))
        self.points += len(frame.metrics)

    def _runs(self) -> dict[int, list[tuple[Values, array]]]:
        """By metric: its runs of equal values, each with its moments, in time order."""
        runs: dict[int, list[tuple[Values, array]]] = {}
        for frame, times in self.timeline:
            for metric_id, values in frame.metrics:
                mine = runs.get(metric_id)
                if mine is None:
                    runs[metric_id] = [(values, array("q", times))]
                elif mine[-1][0] is values or mine[-1][0] == values:
                    mine[-1][1].extend(times)
                else:
                    mine.append((values, array("q", times)))
        return runs

    def render(self) -> Iterator[str]:
        """The OpenMetrics document, in pieces: each family once, each metric's points in
        time order."""
        frames, runs = self.frames, self._runs()
        stamps: dict[int, str] = {}
        for _, times in self.timeline:
            for ts_s in times:
                stamps[ts_s] = f" {ts_s}\n"
        by_family: dict[str, list[int]] = {}
        for metric_id in sorted(runs):
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
                for values, times in runs[metric_id]:
                    heads = [prefix + floatToGoString(value)
                             for prefix, value in zip(prefixes, values, strict=True)]
                    yield "".join([head + stamps[ts_s] for ts_s in times for head in heads])
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

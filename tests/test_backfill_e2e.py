"""`acsr-metrics backfill` end to end: its report is `replay`'s (the real pipeline's) to the
figure, its OpenMetrics chunks hold the same figures at their last timestamp, promtool and
a real Prometheus accept and serve its TSDB blocks and recording rules, and the command
fails cleanly on what it cannot read."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from streams.tools.replay import run_replay

from .conftest import BrokerInfo, report_mismatches
from .prometheus_helpers import query_range
from .test_tsdb import instant, meta, prometheus, promtool, serve

REPOSITORY = Path(__file__).resolve().parents[1]
RECORDING_RULES = REPOSITORY / "alerts" / "recording.rules.yml"
ARR_RULE = "intent:acsr_autonomous_resolution:ratio_rate1h"
START = "2026-09-01T00:00:00Z"
SAMPLE_PARTITIONS = 4
SAMPLE_STEP = 900  # the sample's 2 days at 15 min: 3 chunks, 51 MB (60 s: 760 MB)
COUNTER_LIKE = ("counter", "histogram")  # series that never go down nor disappear


# --- running the commands -------------------------------------------------------------


def streams(*args: str | Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams", *map(str, args)],
                          capture_output=True, timeout=timeout, cwd=REPOSITORY, **kwargs)


def backfill(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return streams("backfill", *args, "--quiet", **kwargs)


def backfilled(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    done = backfill(*args, **kwargs)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done


def simulate(out: Path, *, rate: float, duration: float, speed: float, seed: int) -> Path:
    """rate * duration messages over duration * speed seconds of event time from START."""
    done = streams("simulate", "--rate", str(rate), "--duration", str(duration), "--speed",
                   str(speed), "--seed", str(seed), "--start", START, "--output", out,
                   "--quiet")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return out


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def same_report(expected: dict, actual: dict) -> list[str]:
    """Mismatches both ways (report_mismatches walks the expected report's keys only)."""
    return report_mismatches(expected, actual) + report_mismatches(actual, expected)


# --- reading the chunks -------------------------------------------------------------------


@dataclass
class Chunks:
    """Every sample of a backfill's chunks, read line by line in file order."""

    files: list[Path]
    types: dict[str, str] = field(default_factory=dict)  # family -> type
    family: dict[str, str] = field(default_factory=dict)  # series -> family
    points: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    by_file: dict[Path, list[int]] = field(default_factory=dict)  # each file's timestamps

    @classmethod
    def read(cls, out: Path) -> Chunks:
        chunks = cls(sorted(out.glob("acsr-*.om")))
        for path in chunks.files:
            stamps: set[int] = set()
            lines = path.read_text().splitlines()
            assert lines[-1] == "# EOF" and "# EOF" not in lines[:-1], path
            current = None
            for line in lines[:-1]:
                if line.startswith("# TYPE "):
                    _, _, current, kind = line.split(" ")
                    chunks.types[current] = kind
                    continue
                if line.startswith("#"):
                    continue
                series, value, ts = line.rsplit(" ", 2)
                assert current is not None and series.startswith(current), line
                chunks.family[series] = current
                chunks.points[series].append((int(ts), float(value)))
                stamps.add(int(ts))
            chunks.by_file[path] = sorted(stamps)
        return chunks

    @property
    def moments(self) -> list[int]:
        return sorted({ts for stamps in self.by_file.values() for ts in stamps})

    def kind(self, series: str) -> str:
        return self.types[self.family[series]]


def moments_of(chunk: Path) -> dict[int, list]:
    """The chunk's metric families at each of its timestamps, parsed by prometheus_client.

    One document a timestamp (each family's header, its samples at that time, `# EOF`):
    prometheus_client 0.26's parser drops every bucket but the first of a histogram's
    second and later points (it remembers the group's series across timestamps), then
    fails with '+Inf bucket missing', so it cannot take a whole chunk in one go."""
    docs: dict[int, list[str]] = defaultdict(list)
    headed: dict[int, str] = {}  # the family whose header each document has last
    header: list[str] = []
    name = ""
    for line in chunk.read_text().splitlines():
        if line == "# EOF":
            break
        if line.startswith("# TYPE "):
            name, header = line.split(" ")[2], [line]
        elif line.startswith("#"):
            header.append(line)
        else:
            ts = int(line.rsplit(" ", 1)[1])
            if headed.get(ts) != name:
                docs[ts] += header
                headed[ts] = name
            docs[ts].append(line)
    return {ts: list(text_string_to_metric_families("\n".join(lines) + "\n# EOF\n"))
            for ts, lines in sorted(docs.items())}


def total(families: list, family: str, sample: str) -> float:
    [found] = [f for f in families if f.name == family]
    return sum(s.value for s in found.samples if s.name == sample)


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Run:
    out: Path
    report: dict
    stderr: str


@pytest.fixture(scope="module")
def sample_backfill(sample_events: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The worked example as `replay` takes it by default: 4 partitions, murmur2."""
    tmp = tmp_path_factory.mktemp("sample")
    done = backfilled(sample_events, "--openmetrics", tmp / "om", "--step", str(SAMPLE_STEP),
                      "--partitions", str(SAMPLE_PARTITIONS), "--partitioner", "murmur2",
                      "--report", tmp / "report.json")
    return Run(tmp / "om", report(tmp / "report.json"), done.stderr.decode())


# --- 1. the report is replay's ------------------------------------------------------------


def test_the_samples_backfill_report_is_the_expected_report(
        sample_backfill: Run, expected_report: Path) -> None:
    # one way: the contract's file predates `events.misrouted`
    assert report_mismatches(report(expected_report), sample_backfill.report) == []
    assert "2,708 valid, 12 invalid, 13 duplicate" in sample_backfill.stderr


@pytest.mark.integration
async def test_the_samples_backfill_report_is_replays(
        kafka: BrokerInfo, sample_events: Path, sample_backfill: Run, tmp_path: Path) -> None:
    settings = kafka.settings(partitions=SAMPLE_PARTITIONS, partitioner="murmur2")
    replayed = await run_replay(sample_events, settings, workers=1, start_broker=False,
                                log_dir=tmp_path)
    assert report_mismatches(replayed.report, sample_backfill.report) == []
    assert same_report(replayed.report, sample_backfill.report) == []


@pytest.mark.integration
async def test_a_generated_archive_backfills_to_replays_report(
        kafka: BrokerInfo, tmp_path: Path) -> None:
    """Some 3,000 messages over 2.5 days (noise, duplicates, late feedback included), on 3
    partitions placed by crc32, at the default step (60 s)."""
    events = simulate(tmp_path / "events.jsonl", rate=100, duration=30, speed=7200, seed=7)
    out = tmp_path / "om"
    done = backfilled(events, "--openmetrics", out, "--partitions", "3", "--partitioner",
                      "crc32", "--report", tmp_path / "backfill.json")
    assert "(3 partitions, crc32)" in done.stderr.decode()
    days = sorted(path.name[5:15] for path in out.glob("acsr-*.om"))
    assert days == ["2026-09-01", "2026-09-02", "2026-09-03"]
    for path in out.glob("acsr-*.om"):
        path.unlink()  # 450 MB at a 60 s step: only the report is compared here

    settings = kafka.settings(partitions=3, partitioner="crc32")
    replayed = await run_replay(events, settings, workers=1, start_broker=False,
                                log_dir=tmp_path)
    backfill_report = report(tmp_path / "backfill.json")
    assert replayed.report["events"]["valid"] > 2500
    assert replayed.report["events"]["misrouted"] == 0
    assert report_mismatches(replayed.report, backfill_report) == []
    assert same_report(replayed.report, backfill_report) == []


# --- 2. the chunks ---------------------------------------------------------------------------


def test_the_last_timestamp_holds_the_reports_figures(sample_backfill: Run) -> None:
    chunks = Chunks.read(sample_backfill.out)
    last_chunk = chunks.files[-1]
    moments = moments_of(last_chunk)  # every moment of it is valid OpenMetrics
    assert list(moments) == chunks.by_file[last_chunk]
    for ts, families in moments.items():
        assert {s.timestamp.sec for f in families for s in f.samples} == {ts}

    last = max(moments)
    assert last == chunks.moments[-1]
    families = moments[last]
    events, totals = sample_backfill.report["events"], sample_backfill.report["totals"]
    assert total(families, "acsr_cases_concluded", "acsr_cases_concluded_total") \
        == totals["cases_concluded"] == 300
    assert total(families, "acsr_events", "acsr_events_total") == events["valid"] == 2708
    assert total(families, "acsr_events_invalid", "acsr_events_invalid_total") \
        == events["invalid"] == 12
    assert total(families, "acsr_events_duplicate", "acsr_events_duplicate_total") \
        == events["duplicate"] == 13
    [outcomes] = [f for f in families if f.name == "acsr_cases_concluded"]
    autonomous = sum(s.value for s in outcomes.samples if s.labels["outcome"] == "autonomous")
    assert autonomous == totals["autonomous"]
    # the day before, fewer: the chunks are history, not the end repeated
    day_before = chunks.by_file[chunks.files[-2]][0]
    assert sum(value for series, points in chunks.points.items()
               if series.startswith("acsr_events_total{")
               for ts, value in points if ts == day_before) < events["valid"]


def test_every_series_moves_forward_one_step_at_a_time(sample_backfill: Run) -> None:
    step = SAMPLE_STEP
    chunks = Chunks.read(sample_backfill.out)
    moments = chunks.moments
    assert len(chunks.files) == 3 and len(moments) > 150
    assert {b - a for a, b in itertools.pairwise(moments)} == {step}
    # one chunk a UTC day, named after its first timestamp
    for path, stamps in chunks.by_file.items():
        assert {ts // 86_400 for ts in stamps} == {stamps[0] // 86_400}, path
        first = datetime.fromtimestamp(stamps[0], UTC).strftime("%Y-%m-%dT%H%M%SZ")
        assert path.name == f"acsr-{first}.om"

    counters = 0
    for series, points in chunks.points.items():
        times = [ts for ts, _ in points]
        assert all(a < b for a, b in itertools.pairwise(times)), series
        if chunks.kind(series) in COUNTER_LIKE:
            counters += 1
            # counted from its first point to the end, at every step, never lower
            assert all(b - a == step for a, b in itertools.pairwise(times)), series
            assert times[-1] == moments[-1], series
            values = [value for _, value in points]
            assert all(a <= b for a, b in itertools.pairwise(values)), series
    assert counters > 1000


# --- 3. TSDB blocks in a real Prometheus ---------------------------------------------------


def arr_rule() -> str:
    """The ARR rule's expression, as alerts/recording.rules.yml records it."""
    groups = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    [expr] = [rule["expr"] for group in groups for rule in group["rules"]
              if rule.get("record") == ARR_RULE]
    return expr


def same_values(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
        for x, y in zip(a, b, strict=True))


@pytest.mark.integration
def test_tsdb_blocks_serve_the_reports_figures_and_the_recording_rules(
        tmp_path: Path) -> None:
    promtool(), prometheus()  # skip without them
    step = 300
    events = simulate(tmp_path / "events.jsonl", rate=40, duration=20, speed=16_000, seed=3)
    out, tsdb = tmp_path / "om", tmp_path / "tsdb"
    done = backfilled(events, "--openmetrics", out, "--step", str(step), "--tsdb", tsdb,
                      "--report", tmp_path / "report.json", timeout=300)
    stderr = done.stderr.decode()
    assert "out of order" not in stderr and "promtool kept" not in stderr
    figures = report(tmp_path / "report.json")
    chunks = Chunks.read(out)
    first, last = chunks.moments[0], chunks.moments[-1]
    assert last - first >= 3 * 86_400 and len(chunks.files) == 4

    # only complete blocks in DIR (no staging or serving directory left), and the raw
    # blocks (promtool made them before the rules') hold every sample the chunks hold
    blocks = sorted(tsdb.iterdir())
    assert all(re.fullmatch(r"[0-9A-Z]{26}", b.name) and (b / "meta.json").is_file()
               for b in blocks)
    counts = re.search(r"(\d+) block\(s\) of raw series and (\d+) of recording rules", stderr)
    assert counts is not None, stderr
    raw, rules = int(counts[1]), int(counts[2])
    assert raw + rules == len(blocks) and raw >= 4 * 4 - 1 and rules > 0
    written = sum(len(points) for points in chunks.points.values())
    assert sum(meta(block)["stats"]["numSamples"] for block in blocks[:raw]) == written

    with serve(blocks, tmp_path / "prometheus") as url:
        for promql, expected in [
            ("sum(acsr_cases_concluded_total)", figures["totals"]["cases_concluded"]),
            ("sum(acsr_events_total)", figures["events"]["valid"]),
            ("sum(acsr_events_invalid_total)", figures["events"]["invalid"]),
        ]:
            [result] = instant(url, promql, last)
            assert float(result["value"][1]) == expected > 0, promql

        # the rule's values as promtool recorded them: one an evaluation, `step` apart,
        # offset within the interval as a live Prometheus offsets the group
        end = last + step
        recorded = {series["metric"]["intent"]: [(float(t), float(v)) for t, v in
                                                 series["values"]]
                    for series in instant(url, f"{ARR_RULE}[{end - first + 1}s]", end)}
        assert len(recorded) >= 3
        offsets = set()
        for intent, samples in recorded.items():
            times = [t for t, _ in samples]
            assert all(round(b - a, 3) == step for a, b in itertools.pairwise(times)), intent
            assert first <= times[0] and end - step < times[-1] <= end, intent
            offsets |= {round((t - first) % step, 3) for t in times}
        [offset] = offsets
        assert len(max(recorded.values(), key=len)) >= (last - first) // step - 24

        # a range query over the backfilled days at the evaluation times: one value a
        # step for each intent, the value the rule's expression gives on the raw series
        start = first + offset
        ranged = {labels["intent"]: points
                  for labels, points in query_range(url, ARR_RULE, start, end, step)}
        live = {labels["intent"]: points
                for labels, points in query_range(url, arr_rule(), start, end, step)}
        assert ranged.keys() == recorded.keys() == live.keys()
        for intent, points in ranged.items():
            times = [round(t, 3) for t, _ in points]
            assert times == [round(t, 3) for t, _ in recorded[intent]], intent
            assert times == [round(t, 3) for t, _ in live[intent]], intent
            assert same_values([v for _, v in points], [v for _, v in live[intent]]), intent
        assert any(not math.isnan(v) for points in ranged.values() for _, v in points)


# --- 4. the command line ---------------------------------------------------------------------


def left_in(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*")) if directory.exists() else []


def test_a_gzip_archive_gives_the_plain_files_report(
        sample_events: Path, sample_backfill: Run, tmp_path: Path) -> None:
    packed = tmp_path / "events.jsonl.gz"
    packed.write_bytes(gzip.compress(sample_events.read_bytes()))
    backfilled(packed, "--openmetrics", tmp_path / "om", "--step", str(SAMPLE_STEP),
               "--partitions", str(SAMPLE_PARTITIONS), "--report", tmp_path / "r.json")
    assert report(tmp_path / "r.json") == sample_backfill.report
    assert [p.name for p in Chunks.read(tmp_path / "om").files] \
        == [p.name for p in Chunks.read(sample_backfill.out).files]


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_dash_reads_standard_input(sample_events: Path, sample_backfill: Run,
                                   tmp_path: Path, packed: bool) -> None:
    data = sample_events.read_bytes()
    backfilled("-", "--openmetrics", tmp_path / "om", "--step", str(SAMPLE_STEP),
               "--partitions", str(SAMPLE_PARTITIONS), "--report", tmp_path / "r.json",
               input=gzip.compress(data) if packed else data)
    assert report(tmp_path / "r.json") == sample_backfill.report


def png(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(200))


def json_arrays(lines: int):
    def write(path: Path) -> None:
        path.write_text('[{"event_id":"e1","type":"case_opened","case_id":"c1",'
                        '"ts":"2026-09-01T00:00:00Z"}]\n' * lines)
    return write


def truncated_gzip(sample_events: Path):
    def write(path: Path) -> None:
        packed = gzip.compress(sample_events.read_bytes())
        path.write_bytes(packed[: len(packed) * 3 // 4])
    return write


@pytest.mark.parametrize("kind", ["missing", "png", "arrays", "few arrays", "truncated gzip"])
@pytest.mark.parametrize("after_the_sample", [False, True], ids=["alone", "after-sample"])
def test_an_unreadable_file_fails_naming_it_and_leaves_no_chunk(
        sample_events: Path, tmp_path: Path, kind: str, after_the_sample: bool) -> None:
    """Alone, or after a good file whose chunks were already written: exit 1, one line
    naming the file, nothing left in OUT."""
    bad = tmp_path / f"bad {kind}.jsonl"
    writers = {"missing": None, "png": png, "arrays": json_arrays(150),
               "few arrays": json_arrays(3), "truncated gzip": truncated_gzip(sample_events)}
    if writers[kind] is not None:
        writers[kind](bad)
    out = tmp_path / "om"
    files = [sample_events, bad] if after_the_sample else [bad]
    done = backfill(*files, "--openmetrics", out, "--step", "3600", "--report",
                    tmp_path / "r.json")
    stderr = done.stderr.decode()
    assert done.returncode != 0, stderr
    [message] = stderr.strip().splitlines()
    assert message.startswith("acsr-metrics: backfill failed: ") and str(bad) in message
    assert left_in(out) == []
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("variable", ["PROMTOOL", "PROMETHEUS"])
def test_a_missing_promtool_fails_before_reading_an_event(
        sample_events: Path, tmp_path: Path, variable: str) -> None:
    """Standard input stays open and empty: a backfill that read it would wait."""
    out, tsdb = tmp_path / "om", tmp_path / "tsdb"
    reader, writer = os.pipe()
    try:
        done = backfill("-", "--openmetrics", out, "--tsdb", tsdb, stdin=reader, timeout=60,
                        env={**os.environ, variable: "/nonexistent"})
    finally:
        os.close(reader)
        os.close(writer)
    stderr = done.stderr.decode()
    assert done.returncode != 0, stderr
    [message] = stderr.strip().splitlines()
    assert f"{variable}='/nonexistent' is not an executable" in message
    assert left_in(out) == [] and left_in(tsdb) == []


def test_the_chunks_of_a_run_are_only_its_own(sample_backfill: Run) -> None:
    """Nothing but the day chunks in OUT: no partial directory or temporary file left."""
    assert left_in(sample_backfill.out) == Chunks.read(sample_backfill.out).files

"""`acsr-metrics backfill` without a broker: its reading, its engine, its OpenMetrics.

The end-to-end proofs (against `replay`, promtool and a real Prometheus) are in
tests/test_backfill_e2e.py."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import _parse_sample, text_string_to_metric_families

from streams.config import Settings
from streams.core.events import Event
from streams.metrics.exporter import GroupCollector
from streams.metrics.openmetrics import Chunk, Exposition, Frames
from streams.metrics.timeline import GroupTimeline
from streams.tools.backfill import (
    Backfill,
    BadInput,
    Options,
    Reading,
    Source,
    _checked_lines,
    read_lines,
)
from streams.tools.cli import main
from streams.tools.history import History
from streams.tools.simulate import SCENARIOS, Simulation, horizon

from .conftest import report_mismatches

START_MS = 1_788_220_800_000  # 2026-09-01T00:00:00Z


def traffic(seed: int, seconds: float, rate: float = 20, speed: float = 30) -> list[bytes]:
    simulation = Simulation(SCENARIOS["steady"], seed=seed, rate=rate, speed=speed,
                            start_ms=START_MS)
    return [message.value for message in horizon(iter(simulation), seconds * speed)]


def flat(frames: Frames, metrics: Iterable[tuple[int, tuple[float, ...]]]) -> dict[str, float]:
    """An exposition as sample line beginnings -> values."""
    out = {}
    for metric_id, values in metrics:
        for prefix, value in zip(frames.prefixes[metric_id], values, strict=True):
            assert prefix not in out, prefix
            out[prefix] = value
    return out


# --- the engine ---------------------------------------------------------------------


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), partitions=st.integers(1, 5))
def test_the_timeline_shows_what_the_collector_renders_at_every_moment(
        seed: int, partitions: int) -> None:
    """The incremental exposition equals the scrape-time collector's, bit for bit, whether
    it is told which series moved or finds them itself."""
    history = History(Settings(), partitions)
    scanning_frames = Frames()
    scanning = GroupTimeline(history.labels, history.drops, scanning_frames)
    moments = 0
    next_us = None
    for line in traffic(seed, 60):
        partition, parsed = history.parse(line)
        if isinstance(parsed, Event):
            if next_us is None:
                next_us = parsed.ts_us + 60_000_000
            elif parsed.ts_us > next_us:
                history.apply()
                rendered = history.frames.of(GroupCollector(
                    history.figures(), history.labels, history.drops).collect())
                expected = flat(history.frames, rendered.metrics)
                history.update()
                assert flat(history.frames, history.exposition.now.items()) == expected
                scanning.update(history.figures())
                assert flat(scanning_frames, scanning.exposition.now.items()) == expected
                moments += 1
                next_us = parsed.ts_us + 60_000_000
        history.add(partition, parsed)
    assert moments > 5


def test_the_sample_gives_the_worked_example_report(sample_events: Path,
                                                    expected_report: Path) -> None:
    history = History(Settings(partitions=4))
    for line in sample_events.read_bytes().splitlines():
        if line.strip():
            history.add(*history.parse(line))
    history.apply()
    assert report_mismatches(json.loads(expected_report.read_text()), history.report()) == []


def _event(kind: str, case: str, minute: int, **fields: object) -> bytes:
    ts = f"2026-09-01T{minute // 60:02d}:{minute % 60:02d}:00Z"
    return orjson.dumps({"event_id": f"{case}-{kind}-{minute}", "type": kind, "case_id": case,
                         "ts": ts, **fields})


STORY = {  # each case's own events, in the order its producer sends them
    "a": [_event("case_opened", "a", 0, channel="web", agent_version="v1"),
          _event("intent_classified", "a", 1, intent="refund", confidence=0.9),
          _event("case_resolved", "a", 5, by="agent")],
    "b": [_event("case_reopened", "a", 30)],  # the customer reopens a, from elsewhere
    "c": [_event("case_opened", "c", 60, channel="web", agent_version="v1",
                 related_case_id="a"),
          _event("case_resolved", "c", 70, by="agent")],
}


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(["a", "a", "a", "b", "c", "c"]), partitions=st.integers(1, 4))
def test_reopens_and_comebacks_count_whatever_order_they_arrive_in(
        order: list[str], partitions: int) -> None:
    """KPIS.md: reopened_24h and fcr_failures_24h count once per case, whatever order the
    conclusion, the reopen and the comeback arrive in, whichever partition they are on."""
    queues = {case: iter(lines) for case, lines in STORY.items()}
    history = History(Settings(partitions=partitions))
    for case in order:
        history.add(*history.parse(next(queues[case])))
    history.apply()
    totals = history.report()["totals"]
    assert (totals["reopened_24h"], totals["fcr_failures_24h"]) == (1, 1)


def test_invalid_and_keyless_lines_are_counted_and_spread(tmp_path: Path) -> None:
    history = History(Settings(partitions=3))
    for line in (b"not json", b"[1]", b'{"case_id": "x", "type": "nope"}', b"{}"):
        history.add(*history.parse(line))
    history.apply()
    events = history.report()["events"]
    assert events["invalid"] == 4
    assert sum(1 for log in history.logs if log.next_offset) >= 2  # keyless ones spread


# --- a run, chunk by chunk --------------------------------------------------------------


def run(tmp_path: Path, lines: list[bytes], step_s: int = 60, chunk_s: int = 86_400,
        partitions: int = 4) -> Backfill:
    options = Options([], tmp_path / "om", step_s, chunk_s)
    options.out.mkdir(exist_ok=True)
    backfill = Backfill(Settings(partitions=partitions), options)
    backfill.run(iter(lines))
    return backfill


def test_chunks_are_openmetrics_with_every_series_in_time_order(tmp_path: Path) -> None:
    lines = traffic(3, 400, rate=5, speed=600)  # about 2.8 days of event time
    backfill = run(tmp_path, lines, step_s=1800)
    result = backfill.result
    assert len(result.chunks) >= 3
    assert not list(backfill.options.out.glob(".partial*"))
    last_seen: dict[tuple, tuple[float, float]] = {}
    kinds: dict[str, str] = {}
    for chunk in result.chunks:
        text = chunk.read_text()
        assert text.endswith("# EOF\n")
        families: dict[str, str] = {}
        family = kind = ""
        for line in text.splitlines()[:-1]:
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(" ")
                assert family not in families, f"{family} twice in {chunk.name}"
                families[family] = kind
                continue
            if line.startswith("#"):
                continue
            # prometheus_client's OpenMetrics parser refuses a histogram with several
            # timestamps (promtool takes them, tests/test_backfill_e2e.py): one line at a time.
            sample = _parse_sample(line)
            assert sample.name.startswith(family)
            key = (sample.name, tuple(sorted(sample.labels.items())))
            ts = float(sample.timestamp)
            assert ts % 1800 == 0
            if key in last_seen:
                before_ts, before_value = last_seen[key]
                assert ts > before_ts
                if kind in ("counter", "histogram"):
                    assert sample.value >= before_value, key
            last_seen[key] = (ts, sample.value)
        kinds.update(families)
    assert kinds["acsr_cases_concluded"] == "counter"
    assert kinds["acsr_response_latency_seconds"] == "histogram"
    # The last moment holds the report's figures.
    totals = backfill.result.report["totals"]
    concluded = sum(value for (name, _), (ts, value) in last_seen.items()
                    if name == "acsr_cases_concluded_total" and ts == result.last_s)
    assert concluded == totals["cases_concluded"]
    assert result.samples > 0 and result.bytes_written == sum(
        chunk.stat().st_size for chunk in result.chunks)


def test_a_moment_holds_the_events_at_or_before_it(tmp_path: Path) -> None:
    """Events up to a step's time count at that step; the next step gets the rest."""
    lines = [_event("case_opened", "a", 0, channel="web", agent_version="v1"),
             _event("case_opened", "b", 1, channel="web", agent_version="v1"),
             _event("case_opened", "c", 3, channel="web", agent_version="v1")]
    backfill = run(tmp_path, lines, step_s=60, partitions=1)
    opened = {}
    for family in text_string_to_metric_families(backfill.result.chunks[0].read_text()):
        for sample in family.samples:
            if sample.name == "acsr_events_total" and sample.labels["type"] == "case_opened":
                opened[int(float(sample.timestamp)) - START_MS // 1000] = sample.value
    assert opened == {0: 1, 60: 2, 120: 2, 180: 3}


def test_a_run_that_fails_leaves_no_chunk(tmp_path: Path) -> None:
    def lines():
        yield from traffic(5, 200, rate=5, speed=600)
        raise BadInput("broken on purpose")

    options = Options([], tmp_path / "om", 60)
    options.out.mkdir()
    with pytest.raises(BadInput):
        Backfill(Settings(), options).run(lines())
    assert list(options.out.iterdir()) == []


# --- OpenMetrics -------------------------------------------------------------------------


def test_label_values_are_escaped_and_moments_must_go_forward() -> None:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily("acsr_x", 'help with "quotes"', labels=("intent",))
    family.add_metric(('a "b"\\c\nd',), 2)
    frames = Frames()
    chunk = Chunk(frames)
    exposition = Exposition()
    for metric_id, values in frames.of([family]).metrics:
        exposition.set(metric_id, values)
    chunk.add(100, exposition.take(), exposition)
    chunk.add(160, exposition.take(), exposition)
    with pytest.raises(ValueError, match="time order"):
        chunk.add(160, exposition.take(), exposition)
    text = "".join(chunk.render())
    parsed = list(text_string_to_metric_families(text))
    assert [s.labels["intent"] for s in parsed[0].samples] == ['a "b"\\c\nd'] * 2
    assert [float(s.timestamp) for s in parsed[0].samples] == [100, 160]


# --- reading -----------------------------------------------------------------------------


def _read(tmp_path: Path, name: str, data: bytes) -> list[bytes]:
    path = tmp_path / name
    path.write_bytes(data)
    return list(read_lines([Source.of(str(path))], Reading(None)))


def test_plain_and_gzip_files_read_alike_blank_lines_skipped(tmp_path: Path) -> None:
    data = b'{"a":1}\r\n\n  \n{"b":2}\nnot json\n'
    assert _read(tmp_path, "plain.jsonl", data) == [b'{"a":1}', b'{"b":2}', b"not json"]
    assert _read(tmp_path, "packed.jsonl.gz", gzip.compress(data)) == \
        [b'{"a":1}', b'{"b":2}', b"not json"]


@pytest.mark.parametrize("data, words", [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "NUL bytes"),
    (b"[1, 2, 3]\n" * 150, "none of the first 100 lines"),
    (b"a,b,c\n1,2,3\n", "no line is a JSON object"),
    (gzip.compress(b'{"a":1}\n' * 1000)[:-20], "cannot read"),
])
def test_what_is_not_json_lines_is_refused_by_name(tmp_path: Path, data: bytes,
                                                   words: str) -> None:
    with pytest.raises(BadInput, match=re.escape(words)) as caught:
        _read(tmp_path, "bad.jsonl", data)
    assert "bad.jsonl" in str(caught.value)


def test_a_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"nope\.jsonl: no such file"):
        Source.of(str(tmp_path / "nope.jsonl"))
    with pytest.raises(BadInput, match="not a file"):
        Source.of(str(tmp_path))


def test_dead_letters_among_good_lines_are_no_reason_to_refuse() -> None:
    lines = [b"garbage"] * 99 + [b'{"ok": 1}'] + [b"more garbage"] * 50
    assert len(list(_checked_lines("x", io.BytesIO(b"\n".join(lines))))) == 150


# --- the command -------------------------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    (["--step", "0"], "--step must be"),
    (["--step", "7"], "must divide the chunk"),
    (["--chunk-hours", "5"], "--chunk-hours must be"),
    (["--tsdb-only"], "--tsdb-only needs --tsdb"),
])
def test_bad_options_fail_at_start_with_exit_code_2(tmp_path: Path, sample_events: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    extra: list[str], words: str) -> None:
    out = tmp_path / "om"
    code = main(["backfill", str(sample_events), "--openmetrics", str(out), *extra])
    assert code == 2
    assert words in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_the_command_writes_chunks_and_the_report(tmp_path: Path, sample_events: Path,
                                                  expected_report: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "om", tmp_path / "report.json"
    code = main(["backfill", str(sample_events), "--openmetrics", str(out), "--partitions",
                 "4", "--report", str(report), "--step", "300", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2,708 valid, 12 invalid, 13 duplicate" in err
    assert "invalid by reason:" in err and "not_json 1" in err
    assert report_mismatches(json.loads(expected_report.read_text()),
                             json.loads(report.read_text())) == []
    assert sorted(p.name for p in out.iterdir()) == [
        "acsr-2026-11-22T120500Z.om", "acsr-2026-11-23T000000Z.om",
        "acsr-2026-11-24T000000Z.om"]



@pytest.mark.skipif(not (shutil.which("promtool") and shutil.which("prometheus")),
                    reason="needs promtool and prometheus (apt-get install prometheus)")
def test_an_alerting_rule_is_refused_before_any_event_is_read(
        tmp_path: Path, sample_events: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text("groups:\n- name: g\n  rules:\n  - alert: Down\n    expr: up == 0\n")
    out, tsdb = tmp_path / "om", tmp_path / "tsdb"
    code = main(["backfill", str(sample_events), "--openmetrics", str(out), "--tsdb",
                 str(tsdb), "--rules", str(rules), "--quiet"])
    assert code == 2
    assert "alert" in capsys.readouterr().err.lower()
    assert not out.exists()
    assert not tsdb.exists()

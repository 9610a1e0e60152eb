"""`acsr-metrics bench`: its pure computation (no broker), its flags, and one tiny run."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streams.config import ConfigError, Settings
from streams.core.events import parse_event
from streams.kafka.otlp import decode_spans
from streams.tools import backfill_bench, bench, otel_bench
from streams.tools.cli import build_parser, main
from streams.tools.replay import proc_status_kb

from .conftest import BrokerInfo

LAST_LINE = re.compile(
    r"bench: processor (\d+) ev/s, raw ceiling (\d+) ev/s, ratio (\d+\.\d{3})")
NUMBER = r"\d[\d,]*(?:\.\d+)?"
BACKFILL_LINE = re.compile(
    rf"backfill: ({NUMBER})/({NUMBER})/({NUMBER}) events/s \(min/median/max over (\d+) runs\), "
    rf"target 100,000; OpenMetrics ({NUMBER}) MB per day of event time")


def test_percentile_is_the_nearest_rank() -> None:
    values = list(range(100, 0, -1))  # order does not matter
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 99) == 99
    assert bench.percentile(values, 100) == 100
    assert bench.percentile(values, 0) == 1
    assert bench.percentile([0.3], 99) == 0.3
    assert math.isnan(bench.percentile([], 50))
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_summary_of_repeats() -> None:
    assert bench.summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert bench.summarize([1.0, 4.0]) == {"min": 1.0, "median": 2.5, "max": 4.0}
    assert all(math.isnan(v) for v in bench.summarize([]).values())


def test_latency_of_each_event_is_the_first_scrape_that_covers_it() -> None:
    sent_at = [0.0, 0.0, 1.0, 1.0, 2.0]
    # (time, processed so far): a lower count later (a partition moving) never un-covers.
    scrapes = [(0.25, 0), (0.5, 1), (1.5, 3), (1.75, 2), (3.0, 4)]
    assert bench.latencies(sent_at, scrapes) == [0.5, 1.5, 0.5, 2.0]  # the 5th: never seen
    assert bench.latencies(sent_at, []) == []
    assert bench.latencies([], scrapes) == []


def test_timeline_counts_what_was_sent_by_each_scrape() -> None:
    assert bench.timeline([10.0, 10.0, 11.0], [(10.5, 1), (11.5, 3)]) == [
        (0.5, 2, 1), (1.5, 3, 3)]
    assert bench.timeline([], [(1.0, 0)]) == []


def test_final_line_format() -> None:
    line = bench.final_line(342.4, 555198.6)
    assert line == "bench: processor 342 ev/s, raw ceiling 555199 ev/s, ratio 0.001"
    assert LAST_LINE.fullmatch(line)
    assert bench.final_line(500.0, 1000.0).endswith("ratio 0.500")
    assert bench.final_line(1.0, 0.0).endswith("ratio nan")


def test_generated_events_are_the_same_for_the_same_seed() -> None:
    lines, hours = bench.generate_events(300, seed=3)
    assert (lines, hours) == bench.generate_events(300, seed=3)
    assert lines != bench.generate_events(300, seed=4)[0]
    assert len(lines) == 300 and hours > 0


def test_open_cases_are_distinct_valid_first_events() -> None:
    lines = bench.open_case_events(50, "r1")
    events = [parse_event(line) for line in lines]  # raises on a contract breach
    assert {event.type for event in events} == {"case_opened"}
    assert len({event.case_id for event in events}) == 50


def test_memory_per_100k_cases() -> None:
    assert bench.mb_per_100k(60.0, 65.0, 20_000) == pytest.approx(25.0)


EXPOSITION = """\
# HELP acsr_events_total Valid events counted, by type.
# TYPE acsr_events_total counter
acsr_events_total{partition="0",type="case_opened"} 3.0
acsr_events_total{partition="1",type="case_opened"} 4.0
# TYPE acsr_events_invalid_total counter
acsr_events_invalid_total{partition="0",reason="not_json"} 2.0
# TYPE acsr_events_late_total counter
acsr_events_late_total{partition="0",window="1m"} 100.0
# TYPE acsr_events_duplicate_total counter
acsr_events_duplicate_total{partition="1"} 1.0
# TYPE acsr_partitions_owned gauge
acsr_partitions_owned 4.0
# TYPE acsr_table_recovery_in_progress gauge
acsr_table_recovery_in_progress 0.0
"""


def test_processed_count_sums_valid_invalid_and_duplicate_only() -> None:
    assert bench.processed_count(EXPOSITION) == 10  # late events are among the valid ones
    assert bench.processed_count("") == 0


def test_ready_means_every_partition_owned_and_recovered() -> None:
    assert bench.is_ready(EXPOSITION, 4)
    assert not bench.is_ready(EXPOSITION, 8)
    assert not bench.is_ready(EXPOSITION.replace("in_progress 0.0", "in_progress 1.0"), 4)


def test_a_group_is_ready_when_its_workers_own_every_partition_between_them() -> None:
    half = EXPOSITION.replace("owned 4.0", "owned 2.0")
    recovering = half.replace("in_progress 0.0", "in_progress 1.0")
    assert bench.group_ready([half, half], 4)
    assert not bench.group_ready([half], 4)
    assert not bench.group_ready([EXPOSITION, half], 4)  # a revoke not yet seen
    assert not bench.group_ready([half, recovering], 4)
    assert not bench.group_ready([half, None], 4)  # one worker does not answer yet


def test_a_rate_starts_after_the_first_batch_unless_that_batch_held_every_event() -> None:
    assert bench.rate_span(10.0, 300, 8.0, 1500) == (10.0, 1200)
    assert bench.rate_span(10.0, 1500, 8.0, 1500) == (8.0, 1500)
    assert bench.rate_span(10.0, 1500, None, 1500) == (10.0, 0)  # readiness never seen


def test_proc_status_memory_lines() -> None:
    text = "Name:\tpython\nVmHWM:\t  70000 kB\nVmRSS:\t  65536 kB\nThreads:\t3\n"
    assert proc_status_kb(text) == {"VmHWM": 70000, "VmRSS": 65536}


def _options(*flags: str) -> bench.BenchOptions:
    return bench.options_from_args(build_parser().parse_args(["bench", *flags]))


def test_flags_become_options() -> None:
    options = _options("--events", "1500", "--repeats", "1", "--no-memory", "--seed", "7")
    assert (options.events, options.repeats, options.memory, options.latency,
            options.seed) == (1500, 1, False, True, 7)
    assert _options().events == 500_000
    assert (_options().workers, _options("--workers", "2").workers) == (1, 2)


@pytest.mark.parametrize(("flags", "message"), [
    (["--events", "0"], "--events must be > 0"),
    (["--repeats", "-1"], "--repeats must be > 0"),
    (["--partitions", "0"], "--partitions must be > 0"),
    (["--workers", "0"], "--workers must be 1 to --partitions (4), got 0"),
    (["--workers", "3", "--partitions", "2"], "--workers must be 1 to --partitions (2), got 3"),
    (["--latency-seconds", "0"], "--latency-seconds must be > 0"),
    (["--open-cases", "0"], "--open-cases must be > 0"),
    (["--scrape-interval", "0"], "--scrape-interval must be > 0"),
    (["--tansu"], "--tansu describes a --broker"),
    (["--out", "/no/such/dir/r.json"], "directory /no/such/dir does not exist"),
])
def test_bad_flags_fail_with_what_to_fix(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _options(*flags)


def test_skipped_runs_need_no_valid_figures() -> None:
    assert not _options("--latency-seconds", "0", "--no-latency").latency
    assert not _options("--open-cases", "0", "--no-memory").memory
    assert _options().repartition and not _options("--no-repartition").repartition


def test_bad_flags_exit_2_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--events", "-5"]) == 2
    assert "configuration error: --events must be > 0" in capsys.readouterr().err


def test_summary_table() -> None:
    summary = {"min": 1.0, "median": 2.0, "max": 3.0}
    results = {
        "config": {"partitions": 4},
        "throughput": {"events": 1500, "simulated_hours": 0.1, "ratio": 0.001,
                       "raw": {"summary": summary},
                       "processor": {"summary": summary, "start_summary": summary,
                                     "peak_rss_summary": summary,
                                     "samples_summary": {"min": 4000.0, "median": 4100.0,
                                                         "max": 4200.0},
                                     "render_ms_summary": summary,
                                     "scrape_ms_summary": summary}},
        "latency": {"skipped": True}, "memory": {"skipped": True},
    }
    table = bench.format_table(results)
    assert "raw ceiling (ev/s)" in table and "processor, 1 worker (ev/s)" in table
    assert "4,100" in table and "group exposition render (ms)" in table
    assert "processor, 2 workers (ev/s)" in bench.format_table(
        {**results, "config": {"partitions": 4, "workers": 2}})
    assert "latency: skipped" in table and "memory: skipped" in table
    assert "repartition: skipped" in table
    results["repartition"] = {"summary": summary,
                              "ratio_summary": {"min": 0.41, "median": 0.5, "max": 0.6}}
    assert "repartition / direct, per run" in bench.format_table(results)
    assert "0.410" in bench.format_table(results)
    results["latency"] = {"rate": 230.0, "sent": 3450, "covered": 3450, "p50_s": 1.05,
                          "p99_s": 1.74, "scrape_interval_s": 1.0, "scrape_p50_s": 0.039,
                          "scrape_busy_share": 0.04}
    results["memory"] = {"open_cases": 20_000, "rss_before_mb": 62.5, "rss_after_mb": 229.3,
                         "mb_per_100k_cases": 834.0, "case_retention_s": 604_800}
    table = bench.format_table(results)
    assert "p50 1,050 ms, p99 1,740 ms" in table
    assert "834.0 MB per 100k open cases" in table and "7 days" in table


@pytest.mark.integration
def test_a_tiny_bench_run(kafka: BrokerInfo, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    flags = ["--broker", kafka.bootstrap, *(["--tansu"] if kafka.embedded else []),
             "--events", "1500", "--repeats", "1", "--latency-seconds", "3",
             "--open-cases", "500", "--workers", "2", "--backfill-events", "2000",
             "--otel-messages", "5", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "streams", "bench", *flags],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, last
    processor, raw = int(match.group(1)), int(match.group(2))
    assert processor > 0 and raw > 0
    assert "bench: worker 1/1" in done.stderr  # progress goes to stderr
    assert "processor, 2 workers (ev/s)" in done.stdout
    results = json.loads(out.read_text())
    assert results["line"] == last
    throughput = results["throughput"]
    assert throughput["events"] == 1500
    assert sum(throughput["raw"]["runs"][0]["by_type"].values()) == 1500
    run = throughput["processor"]["runs"][0]
    assert run["peak_rss_mb"] > 0
    # 1,500 events on two workers often fit in their first batches: then the rate runs
    # from the group's readiness and covers every event.
    assert run["measured_from"] == "the first event" or run["events_after_t0"] == 1500
    assert run["rate"] == pytest.approx(run["events_after_t0"] / run["seconds"])
    # what the two workers expose once every event is processed, and a scrape's time
    exposition = run["exposition"]
    assert exposition["samples"] > 100 and exposition["bytes"] > exposition["samples"]
    assert exposition["render_s"] > 0
    assert "acsr_ samples the group exposes" in done.stdout
    assert results["latency"]["covered"] == results["latency"]["sent"] > 0
    assert results["latency"]["p99_s"] >= results["latency"]["p50_s"] > 0
    assert results["memory"]["open_cases"] == 500
    assert results["memory"]["case_retention_s"] > 0
    rekeyed = results["repartition"]["runs"][0]
    assert rekeyed["events"] == 1500 and rekeyed["rate"] > 0
    assert "repartition / direct, per run" in done.stdout
    assert any(BACKFILL_LINE.fullmatch(line) for line in done.stdout.splitlines())
    assert results["backfill"]["runs"][0]["lines"] == 2000
    assert results["otel"]["runs"]["otlp_json"][0]["spans"] == 500
    assert "otel-bridge otlp_proto, spans/s" in done.stdout
    # the real bridge through the broker: every span's events published, none refused
    for encoding in ("otlp_proto", "otlp_json"):
        run, = results["otel"]["via_broker"]["runs"][encoding]
        assert (run["spans"], run["events"]) == (500, 375)
        assert run["events_invalid"] == run["messages_invalid"] == 0
        assert run["rate"] == pytest.approx(500 / run["seconds"]) and run["start_s"] > 0
    assert results["otel"]["via_broker"]["one_record_batches"] == kafka.embedded
    assert "otel-bridge otlp_json via broker, spans/s" in done.stdout


# --- the backfill's rate (streams/tools/backfill_bench.py) ------------------------------


def _table(**extra: object) -> str:
    summary = {"min": 1.0, "median": 2.0, "max": 3.0}
    processor = dict.fromkeys(("summary", "start_summary", "peak_rss_summary",
                               "samples_summary", "render_ms_summary", "scrape_ms_summary"),
                              summary)
    return bench.format_table({
        "config": {"partitions": 4},
        "throughput": {"events": 10, "simulated_hours": 0.1, "ratio": 0.5,
                       "raw": {"summary": summary}, "processor": processor},
        "latency": {"skipped": True}, "memory": {"skipped": True}, **extra})


@pytest.fixture(scope="module")
def backfilled() -> dict[str, object]:
    """3,000 simulator events backfilled once: a few seconds."""
    return backfill_bench.backfill_benchmark(Settings(), events=3000, repeats=1, seed=1)


def test_the_backfill_bench_measures_rate_bytes_and_decode(
        backfilled: dict[str, Any]) -> None:
    assert backfilled["archive"]["events"] == 3000 and backfilled["archive"]["bytes"] > 0
    run, = backfilled["runs"]
    assert run["lines"] == 3000 and 0 < run["invalid"] < 100  # the simulator's few
    # Invalid messages break the contract; only some of them are not JSON at all.
    assert 3000 - run["invalid"] <= run["decoded"] <= 3000
    assert run["seconds"] > 0 and run["rate"] == pytest.approx(3000 / run["seconds"])
    assert run["decode_rate"] > run["rate"] and run["ratio"] > 1
    assert run["bytes_written"] == sum(run["chunk_bytes"].values()) > 0
    assert run["first_s"] == 1_788_220_800  # the archive starts at 2026-09-01T00:00:00Z
    days = (run["last_s"] - run["first_s"] + 60) / 86_400
    assert run["mb_per_day"] == pytest.approx(run["bytes_written"] / 1e6 / days)
    assert backfilled["rate_summary"]["median"] == run["rate"]
    assert backfilled["process_peak_rss_mb"] >= backfilled["process_peak_rss_before_mb"] > 0
    assert backfilled["partitions"] == Settings().partitions and backfilled["step_s"] == 60


def test_the_same_seed_writes_the_same_archive(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert backfill_bench.write_archive(first, 200)["events"] == 200
    backfill_bench.write_archive(second, 200)
    assert first.read_bytes() == second.read_bytes()
    assert len(first.read_bytes().splitlines()) == 200
    with pytest.raises(ValueError):
        backfill_bench.backfill_benchmark(Settings(), events=0)


def test_mb_per_day_of_event_time() -> None:
    assert backfill_bench.mb_per_day(12_000_000, 0, 86_400 - 60) == pytest.approx(12.0)
    assert backfill_bench.mb_per_day(6_000_000, 0, 43_200 - 60) == pytest.approx(12.0)
    assert math.isnan(backfill_bench.mb_per_day(0, None, None))


def test_the_backfill_row_is_printed_with_numbers(backfilled: dict[str, Any]) -> None:
    table = _table(backfill=backfilled)
    matches = [BACKFILL_LINE.fullmatch(line) for line in table.splitlines()]
    match, = [m for m in matches if m]
    low, median, high = (float(match.group(i).replace(",", "")) for i in (1, 2, 3))
    assert 0 < low <= median <= high and match.group(4) == "1"
    assert float(match.group(5).replace(",", "")) > 0
    rows = {line[:32].strip(): line[32:].split() for line in table.splitlines()}
    assert len(rows["backfill (ev/s)"]) == 3
    assert len(rows["backfill / orjson decode, CPU"]) == 3
    assert "3,000 events over" in table and "process peak RSS" in table


def test_no_backfill_skips_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _options().backfill and _options().backfill_events == 500_000
    options = _options("--backfill-events", "3000", "--no-latency")
    assert (options.backfill, options.backfill_events) == (True, 3000)
    assert not _options("--no-backfill").backfill
    assert not _options("--no-backfill", "--backfill-events", "0").backfill
    with pytest.raises(ConfigError, match="--backfill-events must be > 0"):
        _options("--backfill-events", "0")
    table = _table(backfill={"skipped": True})
    assert "backfill" not in table and table == _table()
    # The command runs it first, before any broker starts, unless told not to.
    calls: list[int] = []

    class BrokerStarted(Exception):
        pass

    def measured(settings: Settings, events: int, repeats: int, seed: int, say: Any
                 ) -> dict[str, Any]:
        calls.append(events)
        raise KeyboardInterrupt  # stop before the broker starts

    def broker() -> None:
        raise BrokerStarted

    monkeypatch.setattr(bench, "measure_backfill", measured)
    monkeypatch.setattr(bench, "EmbeddedBroker", broker)
    parse = build_parser().parse_args
    client_level = logging.getLogger("aiokafka").level
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench_command(parse(["bench", "--backfill-events", "3000"]), Settings())
    assert calls == [3000]
    with pytest.raises(BrokerStarted):
        bench.run_bench_command(parse(["bench", "--no-backfill", "--no-otel"]), Settings())
    assert calls == [3000]
    # The client's logger is quietened for the run only: a caller's logging is its own.
    assert logging.getLogger("aiokafka").level == client_level


# --- the OTLP bridge's rate (streams/tools/otel_bench.py) --------------------------------


@pytest.fixture(scope="module")
def bridged() -> dict[str, Any]:
    """Three messages of 100 spans in each encoding, twice: well under a second."""
    return otel_bench.otel_benchmark(messages=3, repeats=2)


def test_the_otel_bench_times_both_encodings_on_the_same_spans(
        bridged: dict[str, Any]) -> None:
    for encoding in ("otlp_proto", "otlp_json"):
        runs = bridged["runs"][encoding]
        assert len(runs) == 2
        # every turn (4 spans) is a reply, a tool call and a score, each within the contract
        assert all((run["spans"], run["events"]) == (300, 225) for run in runs)
        assert all(run["rate"] == pytest.approx(300 / run["seconds"]) for run in runs)
        summary = bridged["summaries"][encoding]
        assert 0 < summary["min"] <= summary["median"] <= summary["max"]
    built = otel_bench.otlp_message(0, 1_795_352_400_000_000_000)
    assert (decode_spans(built.SerializeToString(), "otlp_proto")
            == decode_spans(otel_bench.otlp_json(built), "otlp_json"))
    with pytest.raises(ValueError):
        otel_bench.otel_benchmark(messages=0)


def test_the_otel_rows_are_printed_and_no_otel_skips_them(bridged: dict[str, Any]) -> None:
    table = _table(otel=bridged)
    rows = {line[:32].strip(): line[32:].split() for line in table.splitlines()}
    assert len(rows["otel-bridge otlp_proto, spans/s"]) == 3
    assert len(rows["otel-bridge otlp_json, spans/s"]) == 3
    assert "of 3 messages of 100 spans" in table and "via broker" not in table
    # The rows through the broker: their longer labels widen the label column.
    summary = {"min": 1000.0, "median": 2000.0, "max": 3000.0}
    via_broker = {"one_record_batches": True,
                  "summaries": {"otlp_proto": summary, "otlp_json": summary}}
    table = _table(otel={**bridged, "via_broker": via_broker})
    rows = {label.strip(): figures for label, *figures
            in (line.rsplit(None, 3) for line in table.splitlines()[1:] if "  " in line)}
    assert rows["otel-bridge otlp_json via broker, spans/s"] == ["1,000", "2,000", "3,000"]
    assert len(rows["otel-bridge otlp_proto, spans/s"]) == 3
    header, *_ = table.splitlines()
    assert all(len(line) == len(header) for line in table.splitlines()
               if line.startswith(("otel-bridge", "raw ceiling")))
    assert ("via the broker: otlp_proto 2,000, otlp_json 2,000 spans/s" in table
            and "one record per producer batch (Tansu)" in table)
    assert _table(otel={"skipped": True}) == _table()
    assert _options().otel and not _options("--no-otel").otel
    assert _options("--otel-messages", "7").otel_messages == 7
    with pytest.raises(ConfigError, match="--otel-messages must be > 0"):
        _options("--otel-messages", "0")

"""`acsr-metrics bench`: its pure computation (no broker), its flags, and one tiny run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streams.config import ConfigError
from streams.core.events import parse_event
from streams.tools import bench
from streams.tools.cli import build_parser, main
from streams.tools.replay import proc_status_kb

from .conftest import BrokerInfo

LAST_LINE = re.compile(
    r"bench: processor (\d+) ev/s, raw ceiling (\d+) ev/s, ratio (\d+\.\d{3})")


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
             "--open-cases", "500", "--workers", "2", "--out", str(out)]
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

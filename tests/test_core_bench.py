"""`streams/tools/core_bench.py`: the pure core timed beside orjson's decode, and its place
in `acsr-metrics bench`."""

from __future__ import annotations

import pytest

from streams.core.events import InvalidEvent, parse_event
from streams.tools import bench
from streams.tools.cli import build_parser
from streams.tools.core_bench import core_benchmark


def test_the_core_counts_every_event_and_each_figure_is_positive() -> None:
    lines, _ = bench.generate_events(400, seed=2)
    lines += [b"not json", b'{"event_id":"x","type":"teleport","case_id":"x","ts":1}']
    result = core_benchmark(lines, repeats=2)
    assert (result["events"], result["repeats"], len(result["runs"])) == (len(lines), 2, 2)
    for name in ("decode_us", "core_us", "ratio"):
        summary = result[f"{name}_summary"]
        assert 0 < summary["min"] <= summary["median"] <= summary["max"]
    parsed = []
    for line in lines:
        try:
            parsed.append(parse_event(line))
        except InvalidEvent:
            parsed.append(None)
    events = [event for event in parsed if event is not None]
    distinct = len({(event.case_id, event.event_id) for event in events})
    for run in result["runs"]:
        assert run["decode_us"] > 0 and run["core_us"] > 0
        assert run["ratio"] == pytest.approx(run["core_us"] / run["decode_us"])
        # every line reached the ledger's figures: each valid event once, copies as
        # duplicates, the rest as invalid
        assert run["counted"] == {"valid": distinct, "duplicate": len(events) - distinct,
                                  "invalid": len(lines) - len(events)}


def test_no_events_or_no_repeat_is_refused() -> None:
    with pytest.raises(ValueError):
        core_benchmark([], 1)
    with pytest.raises(ValueError):
        core_benchmark([b"{}"], 0)


def test_the_bench_runs_it_unless_told_not_to() -> None:
    def options(*flags: str) -> bench.BenchOptions:
        return bench.options_from_args(build_parser().parse_args(["bench", *flags]))

    assert options().core and options("--no-latency", "--no-memory").core
    assert not options("--no-core").core


def test_its_rows_in_the_summary_table() -> None:
    summary = {"min": 1.0, "median": 2.0, "max": 3.0}
    processor = {f"{name}summary": summary for name in
                 ("", "start_", "peak_rss_", "samples_", "render_ms_", "scrape_ms_")}
    results = {"config": {"partitions": 4}, "latency": {"skipped": True},
               "memory": {"skipped": True},
               "throughput": {"events": 1500, "simulated_hours": 0.1, "ratio": 0.001,
                              "raw": {"summary": summary}, "processor": processor}}
    assert "pure core" not in bench.format_table(results)
    results["core"] = {"ratio_summary": {"min": 12.0, "median": 14.5, "max": 19.0},
                       "core_us_summary": {"min": 7.5, "median": 8.25, "max": 9.0},
                       "decode_us_summary": {"min": 0.5, "median": 0.57, "max": 0.61}}
    rows = {line[:32].strip(): line[32:].split()
            for line in bench.format_table(results).splitlines()}
    assert rows["pure core / orjson decode"] == ["12.0", "14.5", "19.0"]
    assert rows["pure core (µs/event)"] == ["7.50", "8.25", "9.00"]
    assert rows["orjson decode (µs/event)"] == ["0.50", "0.57", "0.61"]

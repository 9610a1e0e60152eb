"""One bad clock cannot poison event time: implausibly dated events are dead-lettered
(`future_ts`, `past_ts`) and move nothing, through the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from streams.tools.replay import read_lines, run_replay

from .conftest import BrokerInfo, report_mismatches

pytestmark = pytest.mark.integration

FIVE_YEARS_AHEAD = "2031-11-22T13:00:00Z"
YEAR_2100_MS = 4_102_444_800_000
LIVE_CASE = "case-7-000076"  # opened at line 56 of the sample, concluded later


def event(event_type: str, case_id: str, ts: str | int, n: int, **fields: object) -> bytes:
    return orjson.dumps({"event_id": f"bad-clock-{n}", "type": event_type, "case_id": case_id,
                         "ts": ts, **fields})


BAD_CLOCKS = [
    # a new case from a host whose clock is five years ahead
    event("case_opened", "clock-ahead", FIVE_YEARS_AHEAD, 1, channel="web", agent_version="v7"),
    # feedback for a live case, from that host
    event("csat_submitted", LIVE_CASE, FIVE_YEARS_AHEAD, 2, score=1),
    # epoch milliseconds in 2100
    event("thumbs_submitted", LIVE_CASE, YEAR_2100_MS, 3, vote="down"),
    # a case whose producer sends epoch seconds: January 1970
    event("case_opened", "in-seconds", 1_795_349_544, 4, channel="web", agent_version="v7"),
    event("case_resolved", "in-seconds", 1_795_349_844, 5, by="agent"),
]


async def test_implausibly_dated_events_change_no_figure(
        kafka: BrokerInfo, sample_events: Path, expected_report: Path, tmp_path: Path) -> None:
    lines = read_lines(sample_events)
    mixed = [*lines[:60], *BAD_CLOCKS, *lines[60:]]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(mixed) + b"\n")
    result = await run_replay(path, kafka.settings(partitions=4), workers=1,
                              start_broker=False, log_dir=tmp_path)
    expected = json.loads(expected_report.read_text())
    events = expected["events"]
    events["invalid"] += len(BAD_CLOCKS)
    events["invalid_by_reason"].update(future_ts=3, past_ts=2)
    # the same windows, totals and groups as the traffic without them, plus the reasons
    assert report_mismatches(expected, result.report) == []
    assert result.report["events"]["invalid_by_reason"]["future_ts"] == 3

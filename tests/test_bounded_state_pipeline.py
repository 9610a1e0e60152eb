"""No case can stop the processor, through the real pipeline: agents stuck in loops (20,000
replies, 2,000 distinct actions, hundreds of reopens and re-sent ids, an old id sent again
after 20,000 newer ones) mixed into generated traffic, replayed by two workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streams.config import Settings
from streams.kafka.partitioners import partition_for
from streams.tools.replay import (
    REPLAY_WINDOW_RETENTION_S,
    read_lines,
    run_replay,
)

from .cluster_helpers import replay_with_a_kill, run_settings
from .conftest import BrokerInfo, report_mismatches
from .fact_windows import FactWindows
from .loop_traffic import mixed
from .test_ledger import _feed, _ledger, _report
from .traffic import generate

pytestmark = pytest.mark.integration

PARTITIONS = 4
ORDINARY_CASES = 300


def offline_report(lines: list[bytes], settings: Settings) -> dict[str, Any]:
    """The contract's figures, by the rules alone: one in-memory ledger, the cases placed
    as the configured partitioner places them (lateness is judged per partition)."""
    ledger, windows = _ledger(), FactWindows()
    _feed(ledger, {}, {}, lines, windows=windows, placement=lambda case_id: partition_for(
        settings.partitioner, case_id.encode(), settings.partitions))
    return _report(ledger, windows)


def exported(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith((f"{name} ", f"{name}{{")))


@pytest.fixture(scope="module")
def loops_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loops") / "loops.jsonl"
    path.write_bytes(b"\n".join(mixed(cases=ORDINARY_CASES)) + b"\n")
    return path


async def test_agents_stuck_in_loops_replay_exactly_with_two_workers(
        kafka: BrokerInfo, loops_file: Path, tmp_path: Path) -> None:
    settings = kafka.settings(partitions=PARTITIONS)
    result = await run_replay(loops_file, settings, workers=2, start_broker=False,
                              log_dir=tmp_path)
    lines = read_lines(loops_file)
    assert report_mismatches(offline_report(lines, settings), result.report) == []

    # What the contract says the loops add to the ordinary traffic, counted directly.
    ordinary = offline_report(list(generate(ORDINARY_CASES, seed=11)), settings)
    got, before = result.report["events"], ordinary["events"]
    # 20,000 replies, and the first one again after 20,000 newer ids: a new event
    assert got["by_type"]["response_sent"] == before["by_type"]["response_sent"] + 20_001
    # 300 re-sent ids of the reopened case, and the last reply sent twice
    assert got["duplicate"] == before["duplicate"] + 301
    assert got["by_type"]["action_executed"] == before["by_type"]["action_executed"] + 2_201
    totals, base = result.report["totals"], ordinary["totals"]
    assert totals["cases_concluded"] == base["cases_concluded"] + 3
    assert totals["actions_failed"] == base["actions_failed"] + 200
    assert totals["reopened_24h"] == base["reopened_24h"] + 1
    # The case with 2,000 action names outgrew its record: its figures moved out, counted.
    assert exported(result.metrics, "acsr_case_spills_total") >= 1
    assert exported(result.metrics, "acsr_processing_errors_total") == 0


@pytest.mark.faults
async def test_a_worker_killed_amid_the_loops_loses_and_doubles_nothing(
        kafka: BrokerInfo, loops_file: Path, tmp_path: Path) -> None:
    # the loops span days of event time: every window stays until the report, as in replay
    settings = run_settings(kafka, partitions=PARTITIONS,
                            window_retention_s=REPLAY_WINDOW_RETENTION_S)
    lines = read_lines(loops_file)
    _, report = await replay_with_a_kill(settings, lines, 2, tmp_path, 180)
    mismatches = report_mismatches(offline_report(lines, settings), report)
    assert mismatches == [], "\n".join(mismatches)

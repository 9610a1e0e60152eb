"""The worked example through the real pipeline: broker, Faust workers, tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streams.tools.replay import run_replay

from .conftest import BrokerInfo, report_mismatches

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("workers", [1, 2])
async def test_replay_reproduces_the_worked_example(
    kafka: BrokerInfo, sample_events: Path, expected_report: Path, workers: int, tmp_path: Path
) -> None:
    settings = kafka.settings(partitions=4)
    result = await run_replay(sample_events, settings, workers=workers, start_broker=False,
                              log_dir=tmp_path)
    expected = json.loads(expected_report.read_text())
    assert report_mismatches(expected, result.report) == []
    assert result.lines == 2733


def test_replay_command_on_its_own_embedded_broker(
    sample_events: Path, expected_report: Path, tmp_path: Path
) -> None:
    """What the README shows: no broker named, so the command starts and stops its own."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "streams", "replay", str(sample_events), "--report", str(out),
         "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "2708 valid, 12 invalid, 13 duplicate" in done.stderr
    assert report_mismatches(json.loads(expected_report.read_text()),
                             json.loads(out.read_text())) == []


def test_replay_of_a_missing_file_fails_with_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streams", "replay", str(tmp_path / "nope.jsonl"),
         "--report", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "nope.jsonl is not a file" in done.stderr


def test_a_bad_broker_address_fails_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streams", "worker", "--broker", "not a broker"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "is not host:port" in done.stderr

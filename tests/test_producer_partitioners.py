"""Exact figures whatever client the producers use: a real librdkafka producer (confluent-kafka)
with its default partitioner, replayed through two workers.

librdkafka places keys by CRC32; the workers must follow `ACSR_PARTITIONER` (or re-key the
events with `repartition`), and with the wrong setting they must say so: every misplaced
event is counted, and the alert fires.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from streams.config import Settings
from streams.core.events import InvalidEvent, message_key, parse_event
from streams.kafka.partitioners import CRC32, MURMUR2, REPARTITION, partition_for
from streams.tools.replay import (
    Cluster,
    create_topics,
    end_offsets,
    isolated,
    read_lines,
    run_replay,
)

from .cluster_helpers import kill_one_mid_run
from .conftest import BrokerInfo, report_mismatches
from .metrics_helpers import samples, total

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4


async def librdkafka_default(settings: Settings, lines: list[bytes],
                             on_sent: Callable[[int], None]) -> dict[int, int]:
    """Send as a producer team would: confluent-kafka, keyed by case_id, default settings."""

    def send() -> dict[int, int]:
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        ends: dict[int, int] = {}
        errors: list[str] = []

        def delivered(err, msg) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

        for line in lines:
            producer.produce(settings.events_topic, value=line, key=message_key(line),
                             on_delivery=delivered)
            producer.poll(0)
        assert producer.flush(60) == 0 and not errors, errors
        on_sent(len(lines))
        return ends

    return await asyncio.to_thread(send)


def misplaced(lines: list[bytes], configured: str) -> int:
    """Valid events that librdkafka's CRC32 puts on a partition `configured` does not give."""
    count = 0
    for line in lines:
        try:
            event = parse_event(line)
        except InvalidEvent:
            continue
        key = event.case_id.encode()
        count += partition_for(CRC32, key, PARTITIONS) != partition_for(configured, key,
                                                                         PARTITIONS)
    return count


@pytest.mark.parametrize("partitioner", [CRC32, REPARTITION])
async def test_librdkafka_producers_replay_exactly_with_the_matching_setting(
        kafka: BrokerInfo, sample_events: Path, expected_report: Path, tmp_path: Path,
        partitioner: str) -> None:
    settings = kafka.settings(partitions=PARTITIONS, partitioner=partitioner)
    result = await run_replay(sample_events, settings, workers=2, start_broker=False,
                              log_dir=tmp_path, load=librdkafka_default)
    expected = json.loads(expected_report.read_text())
    assert report_mismatches(expected, result.report) == []
    assert result.report["events"]["misrouted"] == 0
    assert "acsr_events_misrouted_total" in result.metrics


async def test_the_wrong_setting_counts_every_misplaced_event_and_the_alert_fires(
        kafka: BrokerInfo, sample_events: Path, tmp_path: Path) -> None:
    lines = read_lines(sample_events)
    due = misplaced(lines, MURMUR2)
    assert due > 100  # the two hashes disagree on about three events in four
    settings = kafka.settings(partitions=PARTITIONS)  # murmur2, the default
    result = await run_replay(sample_events, settings, workers=2, start_broker=False,
                              log_dir=tmp_path, load=librdkafka_default)
    assert result.report["events"]["misrouted"] == due
    assert total(result.metrics, "acsr_events_misrouted_total") == due
    logs = "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))
    assert "set ACSR_PARTITIONER=crc32" in logs
    assert_alert_fires(result.metrics, tmp_path)


def alert_expression(name: str) -> str:
    rules = yaml.safe_load((ROOT / "alerts" / "alerts.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return rule["expr"]
    raise AssertionError(f"no alert {name} in alerts/alerts.rules.yml")


def assert_alert_fires(exposition: str, tmp_path: Path) -> None:
    """The run's misrouted counters, as Prometheus would scrape them, make the expression of
    AcsrEventsMisrouted true (promtool evaluates it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    counters = [(labels, value) for name, labels, value in samples(exposition)
                if name == "acsr_events_misrouted_total"]
    assert counters
    # Each series starts at 0 and holds the run's count from the next scrape on.
    inputs = [{"series": "acsr_events_misrouted_total{" + ",".join(
                   f'{k}="{v}"' for k, v in {**labels, "job": "acsr-group",
                                             "instance": "group"}.items()) + "}",
               "values": f"0 {float(value):g}x20"} for labels, value in counters]
    fires = f"vector(1) and on() count({alert_expression('AcsrEventsMisrouted')})"
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": inputs,
        "promql_expr_test": [{"expr": fires, "eval_time": "5m",
                              "exp_samples": [{"labels": "{}", "value": 1}]}],
    }]}
    path = tmp_path / "misrouted.test.yml"
    path.write_text(yaml.safe_dump(test))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_a_worker_killed_while_re_keying_loses_and_doubles_nothing(
        kafka: BrokerInfo, sample_events: Path, expected_report: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle: the new owner forwards again from the committed offsets (some
    events twice) and reads the source partitions' event time back; each counts once."""
    settings = isolated(kafka.settings(partitions=PARTITIONS, partitioner=REPARTITION,
                                       batch_max=100, window_retention_s=400 * 86_400),
                        uuid.uuid4().hex[:8])
    await create_topics(settings)
    lines = read_lines(sample_events)
    cluster = Cluster(settings, 2, tmp_path)
    cluster.start()
    try:
        ends = await librdkafka_default(settings, lines, lambda n: None)
        report = await kill_one_mid_run(cluster, ends, len(lines), 120)
        forwarded = sum((await end_offsets(settings.bootstrap_servers, {},
                                           settings.cases_topic, PARTITIONS)).values())
    finally:
        cluster.stop()
    assert cluster.workers[0].process.returncode == -signal.SIGKILL
    assert report_mismatches(json.loads(expected_report.read_text()), report) == []
    assert forwarded >= len(lines)  # more when the kill came between forwarding and commit
    print(f"forwarded {forwarded} records for {len(lines)} events")

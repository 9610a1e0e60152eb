"""A real Prometheus scraping a real worker agrees with the report."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from streams.tools.replay import (
    Cluster,
    create_topics,
    gather_aggregates,
    isolated,
    produce,
    read_lines,
    wait_processed,
)

from .conftest import BrokerInfo
from .prometheus_helpers import prometheus_binary, running_prometheus, wait_for_value

pytestmark = pytest.mark.integration


async def test_prometheus_sees_what_the_report_says(
    kafka: BrokerInfo, sample_events: Path, expected_report: Path, tmp_path: Path
) -> None:
    prometheus_binary()
    settings = isolated(kafka.settings(partitions=4), uuid.uuid4().hex[:8])
    await create_topics(settings)
    expected = json.loads(expected_report.read_text())
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic,
                             read_lines(sample_events), settings.tansu)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 120)
        await gather_aggregates(cluster, settings.partitions)  # every partition recovered
        target = f"127.0.0.1:{cluster.workers[0].settings.web_port}"
        with running_prometheus([target], tmp_path) as url:
            concluded = wait_for_value(url, "sum(acsr_cases_concluded_total)",
                                       expected["totals"]["cases_concluded"])
            autonomous = wait_for_value(
                url, 'sum(acsr_cases_concluded_total{outcome="autonomous"})',
                expected["totals"]["autonomous"])
            invalid = wait_for_value(url, "sum(acsr_events_invalid_total)",
                                     expected["events"]["invalid"])
    finally:
        cluster.stop()
    assert concluded == expected["totals"]["cases_concluded"]
    assert autonomous == expected["totals"]["autonomous"]
    assert invalid == expected["events"]["invalid"]

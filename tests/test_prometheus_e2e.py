"""A real Prometheus scraping real workers agrees with the report.

Scraped as the shipped configuration does: the group's KPI series come once, from job
`acsr-group` (`instance="group"`, no `partition`), whichever worker serves them; each
worker's own /metrics (job `acsr`) holds no KPI series.
"""

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
from .prometheus_helpers import prometheus_binary, query, running_prometheus, wait_for_value

pytestmark = pytest.mark.integration


async def test_prometheus_sees_what_the_report_says(
    kafka: BrokerInfo, sample_events: Path, expected_report: Path, tmp_path: Path
) -> None:
    prometheus_binary()
    settings = isolated(kafka.settings(partitions=4), uuid.uuid4().hex[:8])
    await create_topics(settings)
    expected = json.loads(expected_report.read_text())
    cluster = Cluster(settings, 2, tmp_path)
    cluster.start()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic,
                             read_lines(sample_events), settings.tansu)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 120)
        await gather_aggregates(cluster, settings.partitions)  # every partition recovered
        targets = [f"127.0.0.1:{worker.settings.web_port}" for worker in cluster.workers]
        with running_prometheus(targets, tmp_path) as url:
            concluded = wait_for_value(url, 'sum(acsr_cases_concluded_total{job="acsr-group"})',
                                       expected["totals"]["cases_concluded"])
            autonomous = wait_for_value(
                url, 'sum(acsr_cases_concluded_total{job="acsr-group", outcome="autonomous"})',
                expected["totals"]["autonomous"])
            invalid = wait_for_value(url, 'sum(acsr_events_invalid_total{job="acsr-group"})',
                                     expected["events"]["invalid"])
            exporters = wait_for_value(url, 'sum(acsr_group_exporter{job="acsr"})', 1)
            partitions = wait_for_value(url, 'acsr_group_partitions{job="acsr-group"}',
                                        settings.partitions)
            workers_up = wait_for_value(url, 'count(acsr_worker_up{job="acsr"})', 2)
            # one group series per label set, under one identity, with no partition label
            instances = query(url, 'count by (job, instance) ({__name__=~"acsr_cases_.*"})')
            partitioned = query(url, 'count({__name__=~"acsr_cases_.*", partition!=""})')
            on_workers = query(url, 'count({job="acsr", __name__=~"acsr_(cases|events)_.*"})')
    finally:
        cluster.stop()
    assert concluded == expected["totals"]["cases_concluded"]
    assert autonomous == expected["totals"]["autonomous"]
    assert invalid == expected["events"]["invalid"]
    assert exporters == 1
    assert partitions == settings.partitions
    assert workers_up == 2
    assert [r["metric"] for r in instances] == [{"job": "acsr-group", "instance": "group"}]
    assert partitioned == []
    assert on_workers == []

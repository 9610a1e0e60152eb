"""Worker faults mid-replay: the final report and metrics stay exact every time.

Each scenario replays the worked example, injects its fault once 30% of the events are
committed, lets the cluster finish, and compares the report with the expected one and
the summed metrics with the report. Run with `make test-faults` (marked `faults`).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.core.kpis import build_report
from streams.tools.replay import (
    Cluster,
    create_topics,
    gather_aggregates,
    gather_metrics,
    produce,
    read_lines,
    wait_processed,
)

from .cluster_helpers import run_settings, wait_committed
from .conftest import BrokerInfo, report_mismatches
from .metrics_helpers import total

pytestmark = [pytest.mark.integration, pytest.mark.faults]


async def _kill_and_restart(cluster: Cluster) -> None:
    _stop(cluster, signal.SIGKILL)
    cluster.add_worker(len(cluster.workers))


async def _terminate_and_restart(cluster: Cluster) -> None:
    _stop(cluster, signal.SIGTERM)
    cluster.add_worker(len(cluster.workers))


async def _terminate(cluster: Cluster) -> None:
    _stop(cluster, signal.SIGTERM)


async def _restart_and_join_during_recovery(cluster: Cluster) -> None:
    """A new worker joins while the restarted one is still recovering its tables."""
    _stop(cluster, signal.SIGKILL)
    cluster.add_worker(len(cluster.workers))
    cluster.add_worker(len(cluster.workers))


def _stop(cluster: Cluster, signum: int) -> None:
    victim = cluster.workers[0]
    victim.signal(signum)
    assert victim.process is not None
    victim.process.wait(timeout=30)
    assert victim.process.returncode in (-signum, 0)


@dataclass(frozen=True)
class Scenario:
    name: str
    workers: int
    partitions: int
    fault: Callable[[Cluster], Awaitable[None]]


SCENARIOS = [
    Scenario("sigkill-the-only-worker", 1, 4, _kill_and_restart),
    Scenario("sigterm-the-only-worker", 1, 4, _terminate_and_restart),
    Scenario("sigkill-one-of-two", 2, 4, _kill_and_restart),
    Scenario("sigterm-one-of-two", 2, 4, _terminate),
    Scenario("join-while-another-recovers", 1, 4, _restart_and_join_during_recovery),
    Scenario("more-workers-than-partitions", 3, 2, _kill_and_restart),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_figures_stay_exact_through_a_worker_fault(
    scenario: Scenario, kafka: BrokerInfo, sample_events: Path, expected_report: Path,
    tmp_path: Path
) -> None:
    settings = run_settings(kafka, scenario.partitions)
    await create_topics(settings)
    lines = read_lines(sample_events)
    cluster = Cluster(settings, scenario.workers, tmp_path)
    cluster.start()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic, lines,
                             settings.tansu)
        await wait_committed(settings, 0.3, len(lines))
        await scenario.fault(cluster)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 120)
        report = build_report(await gather_aggregates(cluster, settings.partitions))
        metrics, _ = await gather_metrics(cluster, report)
    finally:
        cluster.stop()
    assert report_mismatches(json.loads(expected_report.read_text()), report) == []
    kpi, events = report["totals"], report["events"]
    assert total(metrics, "acsr_cases_concluded_total") == kpi["cases_concluded"]
    assert total(metrics, "acsr_policy_checks_total") == kpi["policy_checks"]
    assert total(metrics, "acsr_events_total") == events["valid"]
    assert total(metrics, "acsr_events_invalid_total") == events["invalid"]
    assert total(metrics, "acsr_events_duplicate_total") == events["duplicate"]

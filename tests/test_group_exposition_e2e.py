"""A real Prometheus scrapes a group of workers while one stops and a third joins.

Two workers process generated traffic in rounds; Prometheus scrapes every worker's port,
the third's too before it runs (a target that is down is fine), with both jobs of the
shipped configuration: `acsr` (each worker's /metrics) and `acsr-group` (/metrics/group,
`instance="group"`). After the first round the exporter (the worker serving the group's
figures) is stopped with SIGTERM while the second round is produced, so the role must move
to the other worker; a third worker joins during the third round. Over the whole run:

- no KPI counter or histogram series under `acsr-group` resets, and none of its scraped
  values is below the one before it, whichever worker served it;
- after each round, and at the end, the last scraped concluded-cases and valid-events
  counts equal the report the workers' tables give;
- no series has a `partition` label, at most one worker at a time says it is the
  exporter, and the role moved off the stopped worker;
- the figures grew on both sides of each change (rounds 2 and 3 are produced at a pace
  that outlasts a handover), so the handovers are exercised with figures in motion.

The longest time without a scraped sample of the group's figures (the handover gap) is
printed (`pytest -s`) and only bounded generously.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.core.kpis import build_report
from streams.kafka.broker import free_port
from streams.tools.replay import (
    Cluster,
    WorkerProcess,
    create_topics,
    gather_aggregates,
    produce,
    wait_processed,
)

from .cluster_helpers import produce_paced, run_settings, worker_metrics
from .conftest import BrokerInfo
from .metrics_helpers import total
from .prometheus_helpers import (
    prometheus_binary,
    query,
    query_range,
    raw_samples,
    running_prometheus,
    wait_for_value,
)
from .traffic import generate

pytestmark = pytest.mark.integration

PARTITIONS = 4
PUBLISH_S = 0.5  # ACSR_GROUP_PUBLISH_S: snapshots every half second
CASES_PER_ROUND = 250
GROUP = 'job="acsr-group"'
CONCLUDED = f"sum(acsr_cases_concluded_total{{{GROUP}}})"
VALID = f"sum(acsr_events_total{{{GROUP}}})"
HANDOVER_GAP_BOUND_S = 60.0
PACE_PER_S = 90  # rounds 2 and 3 take about 26 s to produce, longer than a handover
CHANGE_AFTER_S = 6.0  # into rounds 2 and 3: the exporter stops, a third worker joins


@dataclass
class Run:
    """What happened when (wall-clock seconds, as Prometheus stamps its samples)."""

    started: float = 0.0
    stopped: WorkerProcess | None = None
    stopped_at: float = 0.0
    joined_at: float = 0.0
    ended: float = 0.0
    totals: list[dict[str, Any]] = field(default_factory=list)  # each round's report
    settled: list[float] = field(default_factory=list)  # when each round's was read


async def _exporter(cluster: Cluster, timeout_s: float = 60) -> WorkerProcess:
    """The running worker whose /metrics says it serves the group's figures."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for worker in cluster.running():
            try:
                text = await worker_metrics(worker)
            except (AssertionError, TimeoutError, aiohttp.ClientError):
                continue
            if total(text, "acsr_group_exporter") == 1:
                return worker
        await asyncio.sleep(0.5)
    raise AssertionError("no worker became the exporter; logs in "
                         f"{cluster.log_dir}:\n" + "\n".join(
                             f"--- worker {w.index}:\n{w.log_tail()}" for w in cluster.workers))


async def _group_exposition(worker: WorkerProcess) -> str:
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"{worker.url}/metrics/group") as response):
        assert response.status == 200
        return await response.text()


async def _produce(cluster: Cluster, lines: list[bytes], ends: dict[int, int]) -> None:
    settings = cluster.settings
    sent = await produce(settings.bootstrap_servers, settings.events_topic, lines,
                         settings.tansu)
    for partition, end in sent.items():
        ends[partition] = max(ends.get(partition, 0), end)


async def _settled_report(cluster: Cluster, ends: dict[int, int], url: str) -> dict[str, Any]:
    """Once every event is processed and the group settled: the report its tables give,
    after Prometheus last scraped the same concluded-cases and valid-events counts."""
    settings = cluster.settings
    await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 120)
    report = build_report(await gather_aggregates(cluster, settings.partitions))
    concluded = wait_for_value(url, CONCLUDED, report["totals"]["cases_concluded"], 60)
    assert concluded == report["totals"]["cases_concluded"], (
        f"Prometheus' last concluded count {concluded}, the tables say "
        f"{report['totals']['cases_concluded']}; logs in {cluster.log_dir}")
    valid = wait_for_value(url, VALID, report["events"]["valid"], 30)
    assert valid == report["events"]["valid"]
    return report


def _counter_and_histogram_samples(exposition: str) -> list[str]:
    """The sample names of the exposition's counter and histogram families."""
    return sorted({sample.name for family in text_string_to_metric_families(exposition)
                   if family.type in ("counter", "histogram") for sample in family.samples
                   if family.name.startswith("acsr_")})


def _longest_gap(stamps: list[float], since: float, until: float) -> tuple[float, float]:
    """The longest time between two consecutive stamps of which the later is after `since`
    and the earlier before `until` (`until` itself closes a gap still open then), and
    when that gap began."""
    points = sorted({*stamps, until})
    gap, at = 0.0, since
    for before, after in itertools.pairwise(points):
        if after > since and before < until and after - before > gap:
            gap, at = after - before, before
    return gap, at


async def _paced(cluster: Cluster, lines: list[bytes], ends: dict[int, int]
                 ) -> asyncio.Task[None]:
    """Produce `lines` at PACE_PER_S in the background."""
    return asyncio.create_task(produce_paced(cluster.settings, lines, PACE_PER_S, ends))


async def _stop(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGTERM)
    assert worker.process is not None
    returncode = await asyncio.to_thread(worker.process.wait, 30)
    assert returncode in (0, -signal.SIGTERM), f"worker {worker.index} exited {returncode}"


async def test_the_group_series_stay_monotone_through_a_stop_and_a_join(
    kafka: BrokerInfo, tmp_path: Path
) -> None:
    prometheus_binary()
    settings = run_settings(kafka, PARTITIONS, group_publish_s=PUBLISH_S)
    await create_topics(settings)
    rounds = [list(generate(CASES_PER_ROUND, seed=seed)) for seed in (21, 22, 23)]
    cluster = Cluster(settings, 2, tmp_path / "workers")
    cluster.start()
    third_port = free_port()
    targets = [f"127.0.0.1:{port}" for port in
               (*(w.settings.web_port for w in cluster.workers), third_port)]
    ends: dict[int, int] = {}
    run = Run()
    try:
        with running_prometheus(targets, tmp_path) as url:
            run.started = time.time()
            # Round 1: two workers.
            await _produce(cluster, rounds[0], ends)
            run.totals.append(await _settled_report(cluster, ends, url))
            run.settled.append(time.time())

            # Round 2: the exporter stops (SIGTERM) while the round is produced.
            run.stopped = await _exporter(cluster)
            producing = await _paced(cluster, rounds[1], ends)
            await asyncio.sleep(CHANGE_AFTER_S)
            run.stopped_at = time.time()
            await _stop(run.stopped)
            await producing
            run.totals.append(await _settled_report(cluster, ends, url))
            run.settled.append(time.time())
            assert await _exporter(cluster) is not run.stopped

            # Round 3: a third worker joins while the round is produced.
            producing = await _paced(cluster, rounds[2], ends)
            await asyncio.sleep(CHANGE_AFTER_S)
            run.joined_at = time.time()
            cluster.add_worker(len(cluster.workers), web_port=third_port)
            await producing
            run.totals.append(await _settled_report(cluster, ends, url))
            run.settled.append(time.time())
            names = _counter_and_histogram_samples(
                await _group_exposition(await _exporter(cluster)))
            await asyncio.sleep(2)  # a last few scrapes of the final figures
            run.ended = time.time()
            _check(url, names, run)
    finally:
        cluster.stop()


def _check(url: str, names: list[str], run: Run) -> None:
    seconds = math.ceil(run.ended - run.started) + 5
    report = run.totals[-1]
    stopped, stopped_at, joined_at = run.stopped, run.stopped_at, run.joined_at
    assert stopped is not None
    assert "acsr_cases_concluded_total" in names and "acsr_events_total" in names, names
    assert any(name.endswith("_bucket") for name in names), names
    selector = f'{{__name__=~"{"|".join(map(re.escape, names))}",{GROUP}}}'

    # 1. No counter or histogram series reset over the run (one query a name: `resets`
    # drops the name, and two names' series may have the same labels).
    resets = [(name, series["metric"], float(series["value"][1])) for name in names
              for series in query(url, f"resets({name}{{{GROUP}}}[{seconds}s])")]
    assert resets, "no group series in Prometheus"
    reset = [found for found in resets if found[2] != 0]
    assert reset == [], f"{len(reset)} of {len(resets)} series reset: {reset[:5]}"

    # 2. No scraped value below the one before it.
    series = raw_samples(url, selector, seconds)
    assert len(series) == len(resets)
    decreases = [(labels, before, after) for labels, values in series
                 for (_, before), (_, after) in itertools.pairwise(values)
                 if after < before]
    assert decreases == [], f"{len(decreases)} decreasing samples: {decreases[:5]}"

    # 3. The last scraped figures are the true ones.
    (last,) = query(url, CONCLUDED)
    assert float(last["value"][1]) == report["totals"]["cases_concluded"]
    (last,) = query(url, VALID)
    assert float(last["value"][1]) == report["events"]["valid"]

    # 4. One series per figure for the group (no partition label, instance "group"), at
    # most one exporter at a time, and the role left the stopped worker.
    assert query(url, f'count({{{GROUP},partition!=""}})') == []
    assert {s[0]["instance"] for s in series} == {"group"}
    (most,) = query(url, f'max_over_time(sum(acsr_group_exporter{{job="acsr"}})'
                         f"[{seconds}s:1s])")
    assert float(most["value"][1]) == 1, f"{most['value'][1]} exporters at once"
    roles = raw_samples(url, 'acsr_group_exporter{job="acsr"}', seconds)
    stopped_instance = f"127.0.0.1:{stopped.settings.web_port}"
    before = {labels["instance"] for labels, values in roles
              for t, v in values if v == 1 and t < stopped_at}
    after = {labels["instance"] for labels, values in roles
             for t, v in values if v == 1 and t > stopped_at}
    assert stopped_instance in before, before
    assert after - {stopped_instance}, after

    # 5. The handover gaps: the longest time without a scraped sample of the group's
    # figures after the stop, and after the join (its rebalance pauses the exporter too).
    stamps = sorted({t for _, values in raw_samples(
        url, f"acsr_cases_concluded_total{{{GROUP}}}", seconds) for t, _ in values})
    stop_gap, stop_gap_at = _longest_gap(stamps, stopped_at, joined_at)
    join_gap, join_gap_at = _longest_gap(stamps, joined_at, run.ended)
    serving = query_range(url, 'sum(acsr_group_exporter{job="acsr"}) or vector(0)',
                          stamps[0], run.ended, 0.5)
    (points,) = [values for _, values in serving]
    no_exporter = _longest_gap([t for t, v in points if v >= 1], stamps[0], run.ended)[0]
    print(f"\nhandover gap: {stop_gap:.1f}s (from {stop_gap_at - stopped_at:+.1f}s after the "
          f"stop); after the join: {join_gap:.1f}s (from {join_gap_at - joined_at:+.1f}s); "
          f"longest time no worker said it was the exporter: {no_exporter:.1f}s; "
          f"run {run.ended - run.started:.0f}s, {len(series)} series, "
          f"{sum(len(values) for _, values in series)} samples checked")
    assert stop_gap < HANDOVER_GAP_BOUND_S
    assert join_gap < HANDOVER_GAP_BOUND_S

    # 6. The figures grew on both sides of each change: the old exporter served some of
    # round 2 before the stop and its successor served some but not all of it, and likewise
    # around the join (the exporter resumed once the gap was over).
    r1, r2, r3 = (totals["totals"]["cases_concluded"] for totals in run.totals)
    (sums,) = [values for _, values in query_range(url, CONCLUDED, run.started, run.ended,
                                                    0.5)]
    timeline = [(round(t - run.started, 1), v) for t, v in sums]
    resumed, rejoined = stop_gap_at + stop_gap, join_gap_at + join_gap
    assert any(run.settled[0] < t < stopped_at and r1 < v for t, v in sums), \
        f"no figure of round 2 before the stop ({r1=}, {r2=}): {timeline}"
    assert any(resumed <= t and r1 < v < r2 for t, v in sums), \
        f"no figure of round 2 after the handover ({r1=}, {r2=}): {timeline}"
    assert any(run.settled[1] < t < joined_at and r2 < v for t, v in sums), \
        f"no figure of round 3 before the join ({r2=}, {r3=}): {timeline}"
    assert any(rejoined <= t and r2 < v < r3 for t, v in sums), \
        f"no figure of round 3 after the join ({r2=}, {r3=}): {timeline}"

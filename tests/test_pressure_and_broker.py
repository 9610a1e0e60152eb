"""Back-pressure and a broker restart under a running worker (docs/reliability.md).

- A burst of ten times the steady rate: the worker's consumer lag rises, drains back to
  about 0 once the burst is over, its memory stays bounded, and every event is counted.
- The embedded broker stopped and restarted under a running worker: the worker logs the
  outage, keeps serving /metrics, re-joins the restarted broker and processes events
  again, but the broker lost its log and offsets, so some later events are not counted
  (a known limit of a broker without durable storage, docs/reliability.md).

Run with `make test-faults` (marked `faults`).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.core.kpis import build_report
from streams.kafka.broker import EmbeddedBroker
from streams.tools.replay import (
    Cluster,
    WorkerProcess,
    create_topics,
    gather_aggregates,
    gather_metrics,
    produce,
    wait_processed,
)

from .cluster_helpers import group_total, produce_paced, rss_mb, run_settings, worker_metrics
from .conftest import BrokerInfo
from .metrics_helpers import total
from .traffic import generate

pytestmark = [pytest.mark.integration, pytest.mark.faults]

STEADY_RATE = 40  # events per second
BURST_RATE = 10 * STEADY_RATE
RSS_GROWTH_LIMIT_MB = 150  # measured: see docs/reliability.md
DRAINED_LAG = 150  # the lag at the steady rate stays below (measured: up to 57)
OUTAGE_S = 10  # how long the broker stays down


@dataclass
class Sample:
    phase: str
    at_s: float
    lag: float
    rss_mb: float


async def wait_ready(worker: WorkerProcess, partitions: int, timeout_s: float = 60) -> str:
    """The worker's /metrics once it owns every partition and has recovered its tables."""
    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while time.monotonic() < deadline:
        assert worker.alive(), f"worker exited:\n{worker.log_tail()}"
        try:
            metrics = await worker_metrics(worker)
        except (OSError, TimeoutError, AssertionError) as err:
            problem = str(err) or type(err).__name__
        else:
            if (total(metrics, "acsr_partitions_owned") == partitions
                    and total(metrics, "acsr_table_recovery_in_progress") == 0):
                return metrics
            problem = "partitions not all owned yet"
        await asyncio.sleep(0.5)
    raise AssertionError(f"worker not ready within {timeout_s}s ({problem}):\n"
                         f"{worker.log_tail()}")


async def test_lag_rises_in_a_burst_drains_after_and_memory_stays_bounded(
    kafka: BrokerInfo, tmp_path: Path
) -> None:
    # Five events per batch keep the worker's capacity (a few hundred events/s) between
    # the steady rate and the burst's, which is what this test is about.
    settings = run_settings(kafka, 4, batch_max=5)
    await create_topics(settings)
    lines = list(generate(250, seed=23, invalid_share=0, duplicate_share=0))
    steady, burst, after = (lines[:8 * STEADY_RATE], lines[8 * STEADY_RATE:][:4 * BURST_RATE],
                            lines[8 * STEADY_RATE + 4 * BURST_RATE:])
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    worker = cluster.workers[0]
    assert worker.process is not None
    samples: list[Sample] = []
    phase = {"now": "idle"}
    started = time.monotonic()

    async def sample() -> None:
        while True:
            metrics = await worker_metrics(worker)
            samples.append(Sample(phase["now"], time.monotonic() - started,
                                  total(metrics, "acsr_consumer_lag_messages"),
                                  rss_mb(worker.process.pid)))
            await asyncio.sleep(0.5)

    sampler: asyncio.Task[None] | None = None
    try:
        await wait_ready(worker, settings.partitions)
        sampler = asyncio.create_task(sample())
        ends: dict[int, int] = {}
        await asyncio.sleep(1.0)
        for phase["now"], part, rate in (("steady", steady, STEADY_RATE),
                                         ("burst", burst, BURST_RATE),
                                         ("after", after, STEADY_RATE)):
            await produce_paced(settings, part, rate, ends)
        phase["now"] = "drain"
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 60)
        await asyncio.sleep(1.5)
        if sampler.done():
            sampler.result()  # a sampling failure (no /metrics answer) fails the test
        report = build_report(await gather_aggregates(cluster, settings.partitions))
        metrics, _ = await gather_metrics(cluster, report)
    finally:
        if sampler is not None:
            sampler.cancel()
        cluster.stop()

    def of(name: str) -> list[Sample]:
        return [s for s in samples if s.phase == name]

    burst_start, burst_end = of("burst")[0].at_s, of("after")[0].at_s
    steady_max = max(s.lag for s in of("steady"))
    peak = max(s.lag for s in of("burst") + of("after"))
    # Drained: back to the steady level while the steady stream still flows.
    drained = next((s for s in of("after") if s.lag <= DRAINED_LAG), None)
    rss_before = of("idle")[0].rss_mb
    rss_peak = max(s.rss_mb for s in samples)
    print(f"\nlag: steady max {steady_max:.0f}, peak {peak:.0f}, back to <= {DRAINED_LAG} "
          f"{drained.at_s - burst_end if drained else float('nan'):.1f}s after the "
          f"{burst_end - burst_start:.1f}s burst, end {samples[-1].lag:.0f}; "
          f"rss before {rss_before:.0f} MB, peak {rss_peak:.0f} MB, "
          f"end {samples[-1].rss_mb:.0f} MB; {len(lines)} events, {len(samples)} samples, "
          f"{samples[-1].at_s:.0f}s")
    assert steady_max < DRAINED_LAG, f"the worker lags at the steady rate ({steady_max})"
    assert peak >= 300 and peak > 3 * steady_max, f"lag did not rise in the burst ({peak})"
    assert drained is not None, "lag did not fall back while the steady stream went on"
    assert samples[-1].lag == 0
    assert rss_peak - rss_before < RSS_GROWTH_LIMIT_MB
    assert total(metrics, "acsr_events_total") == len(lines)


async def wait_log_line(worker: WorkerProcess, pattern: re.Pattern[str], timeout_s: float,
                        start: int = 0) -> str:
    """The first match of `pattern` in the worker's log from character `start` on, waited
    for up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = pattern.search(worker.log_path.read_text(errors="replace"), start)
        if match:
            return match.group(0)
        await asyncio.sleep(0.5)
    raise AssertionError(f"no log line matching {pattern.pattern!r} within {timeout_s}s:\n"
                         f"{worker.log_tail()}")


async def test_broker_restart_under_a_running_worker(tmp_path: Path) -> None:
    """The embedded broker keeps everything in memory: its restart loses topics, offsets
    and the group. The worker reports the outage and keeps serving /metrics; once the
    broker is back it finds its committed offsets gone and stops loudly (non-zero exit)
    instead of counting the new log against old state (docs/reliability.md)."""
    broker = EmbeddedBroker().start()
    port = broker.port
    # At info level the log shows the group re-join and table recovery.
    settings = run_settings(BrokerInfo(broker.bootstrap, "embedded"), 4, log_level="info")
    lines = list(generate(120, seed=5, invalid_share=0, duplicate_share=0))
    before, after = lines[:300], lines[300:]
    cluster = Cluster(settings, 1, tmp_path)
    try:
        await create_topics(settings)
        cluster.start()
        worker = cluster.workers[0]
        ends = await produce(settings.bootstrap_servers, settings.events_topic, before, True)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 60)
        assert await group_total(worker, "acsr_events_total", len(before)) == len(before)

        broker.stop()
        stopped = time.monotonic()
        failure = await wait_log_line(worker, re.compile(
            rf"\[(ERROR|WARNING)\][^\n]*(127\.0\.0\.1:{port}|'127\.0\.0\.1', {port}\))[^\n]*"),
            20)
        reported_s = time.monotonic() - stopped
        await asyncio.sleep(max(0.0, OUTAGE_S - reported_s))
        await worker_metrics(worker)  # /metrics keeps answering, and /metrics/group:
        assert await group_total(worker, "acsr_events_total", len(before), 5) == len(before)
        assert worker.alive(), f"worker exited without its broker:\n{worker.log_tail()}"

        broker = EmbeddedBroker(port=port).start()
        restarted = time.monotonic()
        await create_topics(settings)
        await produce(settings.bootstrap_servers, settings.events_topic, after, True)
        stop_line = await wait_log_line(worker, re.compile(
            r"\[CRITICAL\][^\n]*the broker lost the committed offsets[^\n]*"), 60)
        assert worker.process is not None
        worker.process.wait(timeout=30)
        stopped_s = time.monotonic() - restarted
        assert worker.process.returncode != 0
        cluster.workers.remove(worker)  # stopped as designed, not a failure of the run
    finally:
        cluster.stop()
        broker.stop()
    print(f"\noutage reported after {reported_s:.1f}s: {failure[:160]}\n"
          f"worker stopped {stopped_s:.1f}s after the restart: {stop_line[:200]}")


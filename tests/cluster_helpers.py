"""Running worker clusters in tests: isolated settings, waiting for progress, faults."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from streams.config import Settings
from streams.core.kpis import build_report
from streams.tools.replay import (
    Cluster,
    WorkerProcess,
    committed,
    create_topics,
    gather_aggregates,
    group_offsets,
    isolated,
    proc_status_kb,
    produce,
    wait_processed,
)

from .conftest import BrokerInfo
from .metrics_helpers import total


def run_settings(kafka: BrokerInfo, partitions: int = 4, **overrides: Any) -> Settings:
    """Settings of a run of its own: topics and consumer group named for it alone."""
    return isolated(kafka.settings(partitions=partitions, **overrides), uuid.uuid4().hex[:8])


async def wait_committed(settings: Settings, share: float, total_lines: int,
                         timeout_s: float = 120) -> None:
    """Return once the group has committed `share` of `total_lines` events."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with group_offsets(settings.bootstrap_servers, settings.app_id) as consumer:
        while True:
            assert asyncio.get_running_loop().time() < deadline, "workers made no progress"
            done = sum((await committed(consumer, settings.events_topic,
                                        settings.partitions)).values())
            if done >= share * total_lines:
                return
            await asyncio.sleep(0.1)


async def produce_paced(settings: Settings, lines: list[bytes], rate: float,
                        ends: dict[int, int], slice_s: float = 0.5) -> None:
    """Produce `lines` at about `rate` per second, one `produce` call per `slice_s` slice;
    `ends` gets each partition's end offset."""
    loop = asyncio.get_running_loop()
    per_slice = max(1, round(rate * slice_s))
    next_slice = loop.time()
    for start in range(0, len(lines), per_slice):
        sent = await produce(settings.bootstrap_servers, settings.events_topic,
                             lines[start:start + per_slice], settings.tansu)
        for partition, end in sent.items():
            ends[partition] = max(ends.get(partition, 0), end)
        next_slice += slice_s
        await asyncio.sleep(max(0.0, next_slice - loop.time()))


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MB."""
    status = proc_status_kb(Path(f"/proc/{pid}/status").read_text())
    assert "VmRSS" in status, f"no VmRSS for process {pid}"
    return status["VmRSS"] / 1024


async def worker_metrics(worker: WorkerProcess, timeout_s: float = 5.0) -> str:
    """One worker's /metrics page."""
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
                session.get(f"{worker.url}/metrics") as response):
        assert response.status == 200, f"/metrics answered {response.status}"
        return await response.text()


async def group_total(worker: WorkerProcess, name: str, expected: float,
                      timeout_s: float = 30.0) -> float:
    """`name` summed in the worker's /metrics/group (the group's figures, when it is the
    exporter), polled until it is `expected` (they follow each batch within a few
    seconds); the last value seen."""
    deadline = time.monotonic() + timeout_s
    value = float("nan")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TimeoutError, aiohttp.ClientError):
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
                        as session, session.get(f"{worker.url}/metrics/group") as response):
                value = total(await response.text(), name)
            if value == expected:
                break
        await asyncio.sleep(0.25)
    return value


SETTLE_AFTER_KILL_S = 180.0


async def kill_one_mid_run(cluster: Cluster, ends: dict[int, int], total_lines: int,
                           stall_timeout_s: float) -> dict[str, Any]:
    """SIGKILL the first worker once 40% of the events are committed, start another in
    its place, wait for every event: the report the group's tables give."""
    settings = cluster.settings
    await wait_committed(settings, 0.4, total_lines)
    cluster.workers[0].signal(signal.SIGKILL)
    assert cluster.workers[0].process is not None
    cluster.workers[0].process.wait()
    cluster.add_worker(len(cluster.workers))
    await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None,
                         stall_timeout_s)
    # After a kill and a join the group rebalances twice; on this shared machine a member
    # has been seen to take over a minute to give its partitions up: wait longer for the
    # group to settle than replay does by default.
    return build_report(await gather_aggregates(cluster, settings.partitions,
                                                timeout_s=SETTLE_AFTER_KILL_S))


async def replay_with_a_kill(settings: Settings, lines: list[bytes], workers: int,
                             log_dir: Path, stall_timeout_s: float
                             ) -> tuple[Cluster, dict[str, Any]]:
    """Produce `lines` to a group of `workers` and kill one mid-run (`kill_one_mid_run`):
    the cluster, stopped, and the report its tables give."""
    await create_topics(settings)
    cluster = Cluster(settings, workers, log_dir)
    cluster.start()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic, lines,
                             settings.tansu)
        report = await kill_one_mid_run(cluster, ends, len(lines), stall_timeout_s)
    finally:
        cluster.stop()
    return cluster, report

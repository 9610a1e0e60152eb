"""A worker that was given no partition takes one over when its owner stops.

With more workers than partitions some get nothing at a rebalance; that worker's table
recovery must still run when a later rebalance gives it a partition (it once died of a
recovery with nothing to recover: streams/kafka/reader.py, `_stop`).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from streams.core.kpis import build_report
from streams.tools.replay import (
    Cluster,
    WorkerProcess,
    create_topics,
    gather_aggregates,
    produce,
    wait_processed,
)

from .cluster_helpers import run_settings
from .conftest import BrokerInfo
from .traffic import generate

pytestmark = pytest.mark.integration


async def _owner(cluster: Cluster, timeout_s: float = 60) -> WorkerProcess:
    """The worker that owns the only partition, recovered."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while asyncio.get_running_loop().time() < deadline:
            for worker in cluster.running():
                try:
                    async with session.get(f"{worker.url}/kpis/") as response:
                        kpis = await response.json()
                except (TimeoutError, aiohttp.ClientError):
                    continue
                if kpis["owned"] == [0] and not kpis["recovering"]:
                    return worker
            await asyncio.sleep(0.2)
    raise AssertionError("no worker owned the partition")


async def test_a_worker_given_no_partition_takes_one_over(kafka: BrokerInfo,
                                                          tmp_path: Path) -> None:
    settings = run_settings(kafka, 1)
    await create_topics(settings)
    lines = list(generate(300, seed=3, invalid_share=0, duplicate_share=0))
    first, rest = lines[:150], lines[150:]
    cluster = Cluster(settings, 2, tmp_path)
    cluster.start()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic, first,
                             settings.tansu)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 60)
        owner = await _owner(cluster)
        owner.signal(signal.SIGTERM)
        assert owner.process is not None
        owner.process.wait(timeout=30)
        (idle,) = cluster.running()
        ends = await produce(settings.bootstrap_servers, settings.events_topic, rest,
                             settings.tansu)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 60)
        assert await _owner(cluster) is idle
        report = build_report(await gather_aggregates(cluster, 1))
    finally:
        cluster.stop()
    assert report["events"]["valid"] == len(lines)

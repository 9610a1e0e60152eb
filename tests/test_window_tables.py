"""Window tables through real workers and the broker: lateness, a crash, retention."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from streams.config import Settings
from streams.core.kpis import build_report
from streams.core.windows import WindowPolicy, WindowRules, closed_message, encode, message_key
from streams.kafka.publisher import producer_options
from streams.kafka.reader import high_watermarks, partition_count, read_range, reader
from streams.tools.replay import (
    Cluster,
    WorkerProcess,
    create_topics,
    gather_aggregates,
    gather_metrics,
    isolated,
    produce,
    read_lines,
    wait_processed,
)

from .cluster_helpers import replay_with_a_kill
from .conftest import BrokerInfo, report_mismatches
from .metrics_helpers import total
from .test_windows import HOUR_MS, MIN_MS, Driver, ev, late_lines

pytestmark = pytest.mark.integration

# Fields of a closed-window message that come from its cell (the rest is its envelope).
ENVELOPE = {"schema_version", "window_seconds", "start", "end", "partition", "intent",
            "agent_version", "source"}


def _settings(kafka: BrokerInfo, **overrides: Any) -> Settings:
    return isolated(kafka.settings(**overrides), uuid.uuid4().hex[:8])


def _rules(settings: Settings) -> WindowRules:
    return WindowRules(WindowPolicy(settings.window_sizes_s, settings.window_grace_s),
                       settings.window_retention_s)


async def _read_topic(settings: Settings, topic: str) -> dict[int, list[Any]]:
    """Every record of every partition, in offset order."""
    async with reader(settings.bootstrap_servers) as consumer:
        tps = [TopicPartition(topic, p) for p in range(await partition_count(consumer, topic))]
        ends = await high_watermarks(consumer, tps)
        begins = await consumer.beginning_offsets(tps)
        return {tp.partition: await read_range(consumer, tp, begins[tp], ends[tp])
                for tp in tps}


async def _windows_topic(settings: Settings) -> list[tuple[bytes, dict[str, Any]]]:
    records = await _read_topic(settings, settings.windows_topic)
    return [(r.key, orjson.loads(r.value)) for rs in records.values() for r in rs]


async def _offline(settings: Settings) -> Driver:
    """The pure logic over the events exactly as the broker partitioned and ordered them."""
    driver = Driver(_rules(settings))
    for partition, records in sorted((await _read_topic(settings, settings.events_topic))
                                     .items()):
        for record in records:
            driver.apply(partition, record.offset, record.value)
    return driver


def _expected(driver: Driver) -> dict[bytes, dict[str, Any]]:
    return {message_key(p, key): figures for p, key, figures in driver.emitted}


def _figures(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k not in ENVELOPE}


async def _metrics(worker: WorkerProcess) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(f"{worker.url}/metrics") as response:
        return await response.text()


async def _ready_metrics(worker: WorkerProcess, timeout_s: float = 60) -> str:
    """/metrics once the worker owns partitions and has loaded them from its tables."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            text = await _metrics(worker)
            if total(text, "acsr_partitions_owned") and \
                    not total(text, "acsr_table_recovery_in_progress") and \
                    "acsr_window_cells{" in text:
                return text
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.3)
    raise AssertionError(f"worker {worker.index} never became ready:\n{worker.log_tail()}")


async def _run(settings: Settings, lines: list[bytes], cluster: Cluster) -> dict[int, int]:
    ends = await produce(settings.bootstrap_servers, settings.events_topic, lines,
                         settings.tansu)
    await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 90)
    return ends


async def test_late_and_out_of_order_events_through_a_worker(kafka: BrokerInfo,
                                                             tmp_path: Path) -> None:
    """Event time 13:17 closes minute 13:05 before c3 (13:05:40) arrives: late for the
    minute, within grace for the hour, which it changes. c4 (13:30) arrives after event
    time 14:20 closed the hour: counted late, the hour stays as it was emitted."""
    settings = _settings(kafka, partitions=1)
    await create_topics(settings)
    lines = late_lines(17 * MIN_MS)
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    try:
        await _run(settings, lines, cluster)
        report = build_report(await gather_aggregates(cluster, settings.partitions))
        text, _ = await gather_metrics(cluster, report)
    finally:
        cluster.stop()
    published = await _windows_topic(settings)
    by_start = {(m["window_seconds"], m["start"]): m for _, m in published
                if m["intent"] == "refund"}
    assert by_start[(60, "2026-11-22T13:05:00Z")]["cases_concluded"] == 1  # c1 only
    assert by_start[(3600, "2026-11-22T13:00:00Z")]["cases_concluded"] == 2  # c1 and c3
    assert total(text, "acsr_events_late_total", window="60") == 3
    assert total(text, "acsr_events_late_total", window="3600") == 1
    [hour] = report["windows"]["items"]
    assert (hour["start"], hour["cases_concluded"]) == ("2026-11-22T13:00:00Z", 2)
    assert report["totals"]["cases_concluded"] == 3  # c4 still counts in the totals
    # the latest closed hour, as exported for alerts, with its end time
    labels = {"window": "3600", "intent": "refund", "agent_version": "v7"}
    assert total(text, "acsr_window_cases_concluded", **labels) == 2
    assert total(text, "acsr_window_arr_ratio", **labels) == 1.0
    assert total(text, "acsr_window_end_timestamp_seconds", window="3600") == 1_795_356_000
    # the same messages as the pure logic computes from the same input
    assert {key: _figures(m) for key, m in published} == _expected(await _offline(settings))


async def test_a_window_already_on_the_topic_is_not_published_again(
    kafka: BrokerInfo, tmp_path: Path
) -> None:
    """What a worker killed after publishing a window, before its mark reached the
    changelog, leaves behind: the next worker finds it on the topic's tail and skips it."""
    settings = _settings(kafka, partitions=1)
    await create_topics(settings)
    lines = late_lines(17 * MIN_MS)
    offline = Driver(_rules(settings)).feed(lines)
    partition, key, _ = offline.emitted[0]
    wire_key = message_key(partition, key)
    sent_before = closed_message(partition, key, offline.windows[0].cells[key],
                                 {"topic": settings.events_topic, "partition": 0, "offset": 1})
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                **producer_options(settings.tansu))
    await producer.start()
    try:
        await producer.send_and_wait(settings.windows_topic, encode(sent_before), key=wire_key,
                                     partition=0)
    finally:
        await producer.stop()
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    try:
        await _run(settings, lines, cluster)
    finally:
        cluster.stop()
    published = await _windows_topic(settings)
    assert [m["source"]["offset"] for k, m in published if k == wire_key] == [1]
    assert {k: _figures(m) for k, m in published} == _expected(offline)


async def test_a_worker_killed_mid_replay_recovers_its_windows_and_emits_each_once(
    kafka: BrokerInfo, sample_events: Path, expected_report: Path, tmp_path: Path
) -> None:
    """Emission is idempotent: one message per closed window and key, none missing."""
    settings = _settings(kafka, partitions=4, window_retention_s=3 * 86_400)
    lines = read_lines(sample_events)
    cluster, report = await replay_with_a_kill(settings, lines, 1, tmp_path, 90)
    assert cluster.workers[0].process.returncode == -signal.SIGKILL
    assert report_mismatches(json.loads(expected_report.read_text()), report) == []
    published = await _windows_topic(settings)
    keys = [key for key, _ in published]
    assert len(keys) == len(set(keys)), "a window was published twice"
    expected = _expected(await _offline(settings))
    assert len(expected) > 500
    assert {key: _figures(m) for key, m in published} == expected


async def test_window_memory_stays_flat_and_recovered_windows_expire(
    kafka: BrokerInfo, tmp_path: Path
) -> None:
    """Two days of event time with a 70-minute retention: the cells held stay bounded.
    After a restart the worker recovers its cells from the changelog; the next event, ten
    days later, drops every one of them. Expiry runs after each batch, so the cells held
    are bounded by the retention plus one batch's cells (small batches here)."""
    # Test data runs days ahead of the real clock: allowed as the docs say (kpis.md).
    settings = _settings(kafka, partitions=1, window_retention_s=4200, batch_max=10,
                         max_clock_skew_s=366 * 86_400)
    await create_topics(settings)
    lines = [line for n in range(2 * 288)
             for line in (ev("case_opened", n * 5 * MIN_MS, f"m{n}", intent="refund",
                             agent_version="v7"),
                          ev("case_resolved", n * 5 * MIN_MS + 30_000, f"m{n}", by="agent"))]
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    held: list[float] = []
    try:
        await _ready_metrics(cluster.workers[0])
        producing = asyncio.create_task(_run(settings, lines, cluster))
        while not producing.done():
            held.append(total(await _metrics(cluster.workers[0]), "acsr_window_cells"))
            await asyncio.sleep(0.2)
        await producing
        before = total(await _metrics(cluster.workers[0]), "acsr_window_cells")
        cluster.workers[0].stop()
        restarted = cluster.add_worker(1)
        recovered = total(await _ready_metrics(restarted), "acsr_window_cells")
        await _run(settings, [ev("policy_checked", 12 * 24 * HOUR_MS, "late-comer",
                                 policy="p", passed=True)], cluster)
        after = total(await _metrics(restarted), "acsr_window_cells")
    finally:
        cluster.stop()
    # a retention of 70 min keeps ~15 minute cells and 2-3 hour cells (of 576 + 48), and a
    # batch of 10 events adds at most 5 minute cells and 1 hour cell
    assert len(held) > 3 and max(held) <= 26
    assert 10 <= before <= 20
    assert recovered == before
    assert after == 2  # only the new event's minute and hour

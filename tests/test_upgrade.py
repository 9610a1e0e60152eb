"""Stored formats are a promise: data written by an earlier version recovers with the same
figures.

Users upgrade workers in place: the new code recovers its tables from changelogs, annotation
items and closed windows that the old code wrote, and reads the events topic, the links and
the output topics the old code left. `tests/data/upgrade/topics.json.gz` holds every record
of every topic of one run of the worked example (2 workers, 4 partitions, embedded broker):
events, dead letters, links, annotation queue, closed windows and each Faust changelog
(cases, partition records, the window tables), and `expected-report.json` the report those
workers' tables gave; `tests/data/upgrade/expiry/` the same for a run whose cases expire.
They were written by the code before streams/ was split into sub-packages (commit 5b22a3a),
by `tests/data/upgrade/capture.py` run against a worktree of that commit. Never regenerate
them with newer code: a capture written by the code under test proves nothing about the
data users already have.

The test writes every captured record back, to topics renamed for a run of its own, at its
own partition and offset, then starts ONE worker of the current code on them, which
recovers the tables. The figures must be those of the capture, and no annotation item,
closed window, dead letter or link may be sent again.

- `redelivered`: the group has no committed offsets, so the worker reads every event and
  link again: each is a redelivery that the stored offsets must skip.
- `resumed` (`tests/data/upgrade/expiry`, cases kept 45 h instead of 7 days): the sweep
  folded some cases into an archive shard and deleted them, so the stored formats of folds
  and archives are there too. A deleted case no longer holds its events' offsets, so the
  group resumes where the old workers committed, as an upgrade in place does.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.config import Settings
from streams.core import kpis
from streams.tools import replay

from .conftest import DATA, BrokerInfo, report_mismatches

pytestmark = pytest.mark.integration

CAPTURE = DATA / "upgrade"
# The settings that decide the figures, as the capture ran (its "settings").
FIGURE_SETTINGS = ("partitioner", "window_sizes_s", "window_grace_s", "window_retention_s",
                   "case_retention_s", "report_window_s", "sample_resolved_rate")
# Fields of Settings naming a topic of the run: the captured topics are renamed through them.
TOPIC_SETTINGS = ("events_topic", "dlq_topic", "links_topic", "annotation_topic",
                  "windows_topic", "repartition_topic")
POLL_MS = 200




def _decode(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def load_capture(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = json.loads(gzip.decompress((folder / "topics.json.gz").read_bytes()))
    assert doc["format"] == 1
    return doc, json.loads((folder / "expected-report.json").read_text())


def renamed(doc: dict[str, Any], settings: Settings) -> dict[str, str]:
    """Each captured topic's name in this run: a settings topic by its field, a Faust topic
    (changelogs, the assignor's) by its app id prefix."""
    old = doc["settings"]
    names = {old[field]: getattr(settings, field) for field in TOPIC_SETTINGS}
    out = {}
    for topic in doc["topics"]:
        if topic in names:
            out[topic] = names[topic]
        elif topic.startswith(old["app_id"] + "-"):
            out[topic] = settings.app_id + topic[len(old["app_id"]):]
        else:
            pytest.fail(f"captured topic {topic} belongs to no setting and no app id")
    return out


async def read_all(bootstrap: str, topic: str, partitions: int, timeout_s: float = 120
                   ) -> dict[int, list[Any]]:
    """Every record of each partition, in offset order, up to the end a fetch response
    gives (the embedded broker's ListOffsets can answer short)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=POLL_MS)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: dict[int, list[Any]] = {p: [] for p in range(partitions)}
        deadline = time.monotonic() + timeout_s
        while True:
            assert time.monotonic() < deadline, f"{topic}: could not read to the end"
            for tp, got in (await consumer.getmany(timeout_ms=POLL_MS)).items():
                records[tp.partition].extend(got)
            ends = {tp: consumer.highwater(tp) for tp in tps}
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(end is not None and positions[tp] >= end for tp, end in ends.items()):
                return records
    finally:
        await consumer.stop()


async def restore(doc: dict[str, Any], names: dict[str, str], settings: Settings) -> None:
    """Create the renamed topics (the captured partition counts) and produce every record
    to its partition in offset order; check that each landed at its captured offset."""
    bootstrap = settings.bootstrap_servers
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(names[topic], len(parts), settings.replication_factor)
            for topic, parts in doc["topics"].items()
        ])
    finally:
        await admin.close()
    # The embedded broker's workarounds as every producer of ours applies them: one record
    # per batch (its ListOffsets is wrong for larger ones), no idempotence (it refuses it).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=not settings.tansu,
                                max_batch_size=1 if settings.tansu else 16384, linger_ms=5)
    await producer.start()
    try:
        sent = []
        for topic, parts in doc["topics"].items():
            for partition, rows in parts.items():
                for offset, _ts, key, value, headers in rows:
                    # The capture's timestamps are not sent: a broker's time retention
                    # would delete records that old; nothing of ours reads them.
                    future = await producer.send(
                        names[topic], _decode(value), key=_decode(key),
                        partition=int(partition),
                        headers=[(name, _decode(raw)) for name, raw in headers] or None)
                    sent.append((topic, int(partition), offset, future))
        landed = await asyncio.gather(*(future for *_, future in sent))
    finally:
        await producer.stop()
    moved = [(topic, partition, offset, meta.offset)
             for (topic, partition, offset, _), meta in zip(sent, landed, strict=True)
             if meta.offset != offset]
    assert moved == [], f"records not at their captured offsets: {moved[:10]}"
    # Read back: every record as captured (nulls, headers), nothing more.
    for topic, parts in doc["topics"].items():
        found = await read_all(bootstrap, names[topic], len(parts))
        for partition, rows in parts.items():
            got = [[r.offset, _b64(r.key), _b64(r.value),
                    [[name, _b64(raw)] for name, raw in r.headers or ()]]
                   for r in found[int(partition)]]
            want = [[offset, key, value, headers] for offset, _ts, key, value, headers in rows]
            assert got == want, f"{names[topic]}[{partition}] reads back differently"


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


async def commit_as_captured(doc: dict[str, Any], names: dict[str, str],
                             settings: Settings) -> None:
    """Give the run's group the offsets the old workers' group had committed."""
    offsets = {TopicPartition(names[topic], int(p)): offset
               for topic, parts in doc["committed"].items() for p, offset in parts.items()}
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                                group_id=settings.app_id, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
        assert {tp: await consumer.committed(tp) for tp in offsets} == offsets
    finally:
        await consumer.stop()


@pytest.mark.parametrize("capture", ["redelivered", "resumed"])
async def test_data_written_before_the_restructuring_recovers_with_the_same_figures(
    kafka: BrokerInfo, tmp_path: Path, capture: str
) -> None:
    resume = capture == "resumed"
    doc, captured_report = load_capture(CAPTURE / "expiry" if resume else CAPTURE)
    old = doc["settings"]
    # Redelivery can be exact only for cases still held; folds are what `resumed` is for.
    assert (doc["expired_cases"] > 0) == resume
    settings = replay.isolated(
        kafka.settings(partitions=old["partitions"], data_dir=str(tmp_path / "data"),
                       **{name: (tuple(old[name]) if isinstance(old[name], list) else old[name])
                          for name in FIGURE_SETTINGS}),
        uuid.uuid4().hex[:8],
    )
    names = renamed(doc, settings)
    await restore(doc, names, settings)
    events = doc["topics"][old["events_topic"]]
    ends = {int(p): len(rows) for p, rows in events.items()}
    assert sum(ends.values()) == doc["sample"]["lines"]
    if resume:
        await commit_as_captured(doc, names, settings)

    cluster = replay.Cluster(settings, 1, tmp_path / "logs")
    cluster.start()
    try:
        await replay.wait_processed(cluster, settings.bootstrap_servers, ends,
                                    lambda done: None, stall_timeout_s=240)
        aggregate = await replay.gather_aggregates(cluster, settings.partitions,
                                                   timeout_s=120)
        report = kpis.build_report(aggregate, settings.report_window_s)
    finally:
        cluster.stop()
    assert report_mismatches(captured_report, report) == []

    # Nothing sent twice (annotation items by case and reason, closed windows by window and
    # key, dead letters, links): the output topics hold what the old workers left, no more.
    for field in ("annotation_topic", "windows_topic", "dlq_topic", "links_topic"):
        parts = doc["topics"][old[field]]
        after = await read_all(settings.bootstrap_servers, getattr(settings, field),
                               len(parts))
        again = [(p, r.offset, r.key, (r.value or b"")[:200])
                 for p, records in after.items() for r in records[len(parts[str(p)]):]]
        assert again == [], f"{field}: sent again after the upgrade: {again[:5]}"

"""The annotation queue through a real broker and real workers: one item per case and
reason, also when a worker is killed mid-stream, and the export reads every item back."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from streams.config import Settings
from streams.core.annotations import (
    HORIZON_HEADER,
    RANDOM_SAMPLE,
    CaseView,
    Source,
    build_item,
    decode,
    encode,
    priority,
    sampled,
)
from streams.core.kpis import build_report
from streams.kafka.broker import ONE_RECORD_BATCH_BYTES
from streams.kafka.reader import high_watermarks, read_range, reader
from streams.tools.replay import (
    Cluster,
    WorkerProcess,
    committed,
    create_topics,
    gather_aggregates,
    gather_metrics,
    group_offsets,
    produce,
    wait_processed,
)

from .cluster_helpers import run_settings
from .conftest import BrokerInfo
from .metrics_helpers import samples

pytestmark = pytest.mark.integration

PARTITIONS = 4
TS = 1_795_352_400_000
RATE = 0.5
OVERRIDE = {"original_action": "refund", "final_action": "deny", "rationale": "over limit",
            "policy_clause": "4.2"}


def ev(event_type: str, case: str, n: int, **fields: Any) -> bytes:
    return orjson.dumps({"event_id": f"{case}-{n}", "type": event_type, "case_id": case,
                         "ts": TS + n * 1000, **fields})


def autonomous(case: str, start: int = 0) -> list[bytes]:
    return [ev("intent_classified", case, start, intent="refund", confidence=0.9),
            ev("case_resolved", case, start + 1, by="agent")]


# Each routing rule, its trigger repeated where it can be: one item per case and reason.
RULES: dict[str, list[bytes]] = {
    "thumbs_down": [ev("thumbs_submitted", "td", 1, vote="down"),
                    ev("thumbs_submitted", "td", 2, vote="down"),
                    ev("thumbs_submitted", "td", 3, vote="up")],
    "low_csat": [ev("csat_submitted", "csat", 1, score=1), ev("csat_submitted", "csat", 2,
                                                               score=2)],
    "low_ces": [ev("ces_submitted", "ces", 1, score=3), ev("ces_submitted", "ces", 2, score=1)],
    "escalated": [ev("case_opened", "esc", 1, channel="web", agent_version="v8",
                     intent="refund"),
                  ev("case_escalated", "esc", 2, reason="tool_failure"),
                  ev("case_escalated", "esc", 3, reason="other")],
    "unverified_resolution": [ev("case_opened", "unv", 1), ev("case_resolved", "unv", 2,
                                                              by="agent")],
    "human_override": [ev("intent_classified", "ovr", 1, intent="refund", confidence=0.8),
                       ev("human_override", "ovr", 2, **OVERRIDE),
                       ev("human_override", "ovr", 3, **OVERRIDE),
                       ev("case_resolved", "ovr", 4, by="human")],
    "reopened": [*autonomous("reo", 1), ev("case_reopened", "reo", 5),
                 ev("case_reopened", "reo", 6)],
    "knowledge_missing": [ev("knowledge_flagged", "km", 1, kind="missing"),
                          ev("knowledge_flagged", "km", 2, kind="missing")],
    "low_score": [ev("evaluation_scored", "ls", 1, name="tone", score=0.2),
                  ev("evaluation_scored", "ls", 2, name="tone", score=0.1)],
}
QUIET = [ev("csat_submitted", "fine", 1, score=5), ev("ces_submitted", "fine", 2, score=7),
         ev("evaluation_scored", "fine", 3, name="tone", score=0.5)]
SAMPLED_CASES = [f"auto-{i:03d}" for i in range(40)]
SEEDED = "seeded"  # its item is on the topic before the worker starts (a crash's leftover)


def case_partition(case_id: str) -> int:
    """The partition a producer keyed by case_id uses (the default partitioner)."""
    return DefaultPartitioner()(case_id.encode(), list(range(PARTITIONS)),
                                list(range(PARTITIONS)))


async def read_items(settings: Settings) -> list[tuple[int, dict[str, Any]]]:
    """Every item on the annotation topic, with the partition it is on."""
    tps = [TopicPartition(settings.annotation_topic, p) for p in range(settings.partitions)]
    out = []
    async with reader(settings.bootstrap_servers) as consumer:
        ends = await high_watermarks(consumer, tps)
        for tp in tps:
            out.extend((tp.partition, decode(r.value))
                       for r in await read_range(consumer, tp, 0, ends[tp]))
    return out


async def seed_item(settings: Settings, case_id: str, reason: str, trigger: bytes) -> None:
    """An item as a worker killed after its acknowledgement (case write lost) left it."""
    partition = case_partition(case_id)
    item = build_item(case_id, reason, orjson.loads(trigger),
                      CaseView(("unknown",) * 3, None), Source(settings.events_topic,
                                                                partition, 0))
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                max_batch_size=ONE_RECORD_BATCH_BYTES)
    await producer.start()
    try:
        await producer.send_and_wait(settings.annotation_topic, encode(item),
                                     key=case_id.encode(), partition=partition,
                                     headers=[(HORIZON_HEADER, b"-1")])
    finally:
        await producer.stop()


@dataclass
class Routed:
    settings: Settings
    items: list[tuple[int, dict[str, Any]]]
    report: dict[str, Any]
    metrics: str


async def _route(kafka: BrokerInfo, log_dir: Path) -> Routed:
    settings = run_settings(kafka, PARTITIONS, sample_resolved_rate=RATE)
    await create_topics(settings)
    seeded_trigger = ev("thumbs_submitted", SEEDED, 1, vote="down")
    await seed_item(settings, SEEDED, "thumbs_down", seeded_trigger)
    lines = [line for rule in RULES.values() for line in rule] + QUIET + [seeded_trigger]
    lines += [line for case in SAMPLED_CASES for line in autonomous(case)]
    cluster = Cluster(settings, 1, log_dir)
    cluster.start()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic, lines,
                             settings.tansu)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 120)
        report = build_report(await gather_aggregates(cluster, settings.partitions))
        metrics, _ = await gather_metrics(cluster, report)
    finally:
        cluster.stop()
    return Routed(settings, await read_items(settings), report, metrics)


@pytest.fixture(scope="module")
def routed(kafka: BrokerInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    yield asyncio.run(_route(kafka, tmp_path_factory.mktemp("routed")))


def _expected() -> set[tuple[str, str]]:
    cases = {"thumbs_down": "td", "low_csat": "csat", "low_ces": "ces", "escalated": "esc",
             "unverified_resolution": "unv", "human_override": "ovr", "reopened": "reo",
             "knowledge_missing": "km", "low_score": "ls"}
    expected = {(case, reason) for reason, case in cases.items()}
    expected |= {(case, RANDOM_SAMPLE) for case in [*SAMPLED_CASES, "reo"]
                 if sampled(case, RATE)}
    return expected | {(SEEDED, "thumbs_down")}


def test_each_routing_rule_sends_exactly_one_item_per_case_and_reason(routed: Routed) -> None:
    keys = [(item["case_id"], item["reason"]) for _, item in routed.items]
    assert Counter(keys).most_common(1)[0][1] == 1, "an item was sent twice"
    assert set(keys) == _expected()
    assert len({item["item_id"] for _, item in routed.items}) == len(keys)
    sampled_now = {case for case, reason in keys if reason == RANDOM_SAMPLE}
    assert 5 < len(sampled_now) < 35  # rate 0.5 of 41 autonomous cases, fixed by the hash


def test_items_carry_what_an_annotator_needs(routed: Routed) -> None:
    by_key = {(item["case_id"], item["reason"]): (partition, item)
              for partition, item in routed.items}
    _, override = by_key[("ovr", "human_override")]
    assert override["correction"] == OVERRIDE
    assert override["trigger"]["event_id"] == "ovr-2"  # the first override routed the case
    assert (override["priority"], override["outcome"], override["intent"]) == (1, None,
                                                                               "refund")
    _, escalated = by_key[("esc", "escalated")]
    assert (escalated["intent"], escalated["channel"], escalated["agent_version"]) == (
        "refund", "web", "v8")
    assert (escalated["outcome"], escalated["priority"], escalated["correction"]) == (
        "escalated", 2, None)
    assert escalated["trigger"]["reason"] == "tool_failure"
    _, unverified = by_key[("unv", "unverified_resolution")]
    assert unverified["outcome"] == "unverified"
    for partition, item in routed.items:
        assert item["source"]["partition"] == partition == case_partition(item["case_id"])
        assert item["source"]["topic"] == routed.settings.events_topic
        assert item["priority"] == priority(item["reason"])


def test_an_item_already_on_the_topic_is_not_sent_again(routed: Routed) -> None:
    seeded = [item for _, item in routed.items if item["case_id"] == SEEDED]
    assert len(seeded) == 1
    assert seeded[0]["source"]["offset"] == 0 and seeded[0]["intent"] == "unknown"
    prevented = sum(value for name, _, value in samples(routed.metrics)
                    if name == "acsr_annotation_resends_prevented_total")
    assert prevented == 1
    # ... and still counted once, like every routed case.
    assert routed.report["totals"]["annotation_routed"]["thumbs_down"] == 2


def test_routed_counts_by_reason_and_priority_match_the_items(routed: Routed) -> None:
    counted: Counter[tuple[str, str]] = Counter()
    for name, labels, value in samples(routed.metrics):
        if name == "acsr_annotation_routed_total" and value:
            counted[(labels["reason"], labels["priority"])] += int(value)
    items = Counter((item["reason"], str(item["priority"])) for _, item in routed.items)
    assert counted == items
    assert routed.report["totals"]["annotation_routed"] == Counter(
        item["reason"] for _, item in routed.items)


# --- export-queue ---------------------------------------------------------------------------


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams", "export-queue", "--quiet",
                           *args], capture_output=True, text=True, timeout=120)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_export_reads_back_every_item_and_resumes_with_a_group(routed: Routed,
                                                               tmp_path: Path) -> None:
    settings = routed.settings
    out = tmp_path / "queue.jsonl"
    base = ["--broker", settings.bootstrap_servers, "--topic", settings.annotation_topic,
            "--out", str(out)]
    done = _export(*base, "--group", "labelling")
    assert done.returncode == 0, done.stderr
    exported = _lines(out)
    assert sorted(i["item_id"] for i in exported) == sorted(
        i["item_id"] for _, i in routed.items)
    assert f"exported {len(routed.items)} items" in done.stderr

    again = _export(*base, "--group", "labelling")  # nothing new since: appends nothing
    assert again.returncode == 0, again.stderr
    assert "exported 0 items" in again.stderr
    assert len(_lines(out)) == len(routed.items)

    later = tmp_path / "later.jsonl"
    since = _export("--broker", settings.bootstrap_servers, "--topic",
                    settings.annotation_topic, "--out", str(later),
                    "--since", "2026-11-22T13:00:02+00:00")
    assert since.returncode == 0, since.stderr
    assert {i["item_id"] for i in _lines(later)} == {
        i["item_id"] for _, i in routed.items if i["ts"] >= "2026-11-22T13:00:02Z"}
    assert 0 < len(_lines(later)) < len(routed.items)


def test_export_errors_are_clear(routed: Routed, tmp_path: Path) -> None:
    out = str(tmp_path / "q.jsonl")
    unreachable = _export("--broker", "127.0.0.1:1", "--out", out)
    assert unreachable.returncode == 3
    assert "broker unavailable" in unreachable.stderr
    bad_since = _export("--broker", routed.settings.bootstrap_servers, "--out", out,
                        "--since", "last tuesday")
    assert bad_since.returncode == 2
    assert "--since 'last tuesday' is not an RFC 3339 time" in bad_since.stderr
    missing = _export("--broker", routed.settings.bootstrap_servers, "--out", out,
                      "--topic", "no.such.topic")
    assert missing.returncode == 2
    assert "no topic 'no.such.topic'" in missing.stderr


# --- a worker killed mid-stream ---------------------------------------------------------------


async def _kill_midway(cluster: Cluster, done_at_kill: float) -> WorkerProcess:
    """SIGKILL the only worker once `done_at_kill` events are committed; start another."""
    settings = cluster.settings
    deadline = asyncio.get_running_loop().time() + 120
    async with group_offsets(settings.bootstrap_servers, settings.app_id) as consumer:
        while sum((await committed(consumer, settings.events_topic,
                                   settings.partitions)).values()) < done_at_kill:
            assert asyncio.get_running_loop().time() < deadline, "no progress"
            await asyncio.sleep(0.1)
    victim = cluster.workers[0]
    victim.signal(signal.SIGKILL)
    assert victim.process is not None
    victim.process.wait()
    cluster.add_worker(1)
    return victim


async def test_a_worker_killed_and_restarted_sends_no_item_twice_and_loses_none(
    kafka: BrokerInfo, tmp_path: Path
) -> None:
    """10,000 autonomous cases, a quarter sampled for review; the only worker is SIGKILLed
    mid-stream and restarted."""
    rate = 0.25
    settings = run_settings(kafka, PARTITIONS, sample_resolved_rate=rate)
    await create_topics(settings)
    cases = [f"case-{i:05d}" for i in range(10_000)]
    lines = [line for i, case in enumerate(cases) for line in autonomous(case, 2 * i)]
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic, lines,
                             settings.tansu)
        victim = await _kill_midway(cluster, 0.4 * len(lines))
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 120)
        report = build_report(await gather_aggregates(cluster, settings.partitions))
    finally:
        cluster.stop()
    assert victim.process is not None and victim.process.returncode == -signal.SIGKILL
    items = await read_items(settings)
    keys = Counter((item["case_id"], item["reason"]) for _, item in items)
    assert [key for key, n in keys.items() if n > 1] == []
    expected = {case for case in cases if sampled(case, rate)}
    assert {case for case, _ in keys} == expected  # stable: exactly the hash's choice
    sigma = (len(cases) * rate * (1 - rate)) ** 0.5
    assert abs(len(expected) - rate * len(cases)) <= 4 * sigma
    assert report["totals"]["annotation_routed"] == {RANDOM_SAMPLE: len(expected)}
    assert report["totals"]["autonomous"] == len(cases)

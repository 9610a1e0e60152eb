"""The simulator: contract-valid, realistic, deterministic traffic, and scenarios that move
the KPI they name, after their delay. KPIs are counted by the processor's own ledger."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.core.events import EVENT_TYPES, InvalidEvent, parse_event
from streams.tools.simulate import SCENARIOS, Message, Simulation, horizon, pace, past_start_ms

from .conftest import BrokerInfo
from .fact_windows import FactWindows
from .test_ledger import _feed, _ledger, _report

START_MS = 1_795_352_400_000
SPEED = 60.0
CHANGE_AFTER_S = 60.0  # wall seconds: one simulated hour, the first report window
WALL_S = 240.0


@lru_cache
def run(scenario: str, seed: int = 11) -> tuple[list[Message], dict[str, Any]]:
    """Four simulated hours of a scenario at 60 msg/s, and the processor's report on them."""
    simulation = Simulation(SCENARIOS[scenario], seed=seed, rate=60, speed=SPEED,
                            start_ms=START_MS, change_after_s=CHANGE_AFTER_S)
    messages = list(horizon(iter(simulation), WALL_S * SPEED))
    ledger, windows = _ledger(), FactWindows()
    _feed(ledger, {}, {}, [m.value for m in messages], partitions=2, windows=windows)
    return messages, _report(ledger, windows)


def docs(messages: list[Message]) -> list[dict[str, Any]]:
    return [orjson.loads(m.value) for m in messages if not m.invalid]


def test_every_message_follows_the_contract_but_the_deliberately_invalid_ones() -> None:
    messages, report = run("steady")
    kinds: Counter[str] = Counter()
    for message in messages:
        if message.invalid:
            with pytest.raises(InvalidEvent):
                parse_event(message.value)
        else:
            kinds[parse_event(message.value).type] += 1
    assert set(kinds) == set(EVENT_TYPES)  # every event type of the contract occurs
    invalid = sum(m.invalid for m in messages) / len(messages)
    ids = Counter(doc["event_id"] for doc in docs(messages))
    duplicate = sum(n - 1 for n in ids.values()) / len(messages)
    assert 0.001 < invalid < 0.01 and 0.001 < duplicate < 0.01
    events = report["events"]
    assert events["invalid"] == sum(m.invalid for m in messages)
    assert events["duplicate"] == sum(n - 1 for n in ids.values())


def test_time_runs_forward_and_stamps_every_event() -> None:
    messages, _ = run("steady")
    times = [m.t_s for m in messages]
    assert times == sorted(times)
    for message, doc in zip((m for m in messages if not m.invalid), docs(messages),
                            strict=True):
        assert doc["ts"] == START_MS + round(message.t_s * 1000)


def test_dimensions_handling_times_and_feedback_are_realistic() -> None:
    items = docs(run("steady")[0])
    opened = {d["case_id"]: d for d in items if d["type"] == "case_opened"}
    assert {d["agent_version"] for d in opened.values()} == {"v7", "v8"}
    assert len({d["channel"] for d in opened.values()}) >= 4
    intent = {d["case_id"]: d["intent"] for d in items if d["type"] == "intent_classified"}
    assert len(set(intent.values())) == 5
    concluded: dict[str, int] = {}
    for d in items:
        if d["type"] in ("case_resolved", "case_escalated"):
            concluded.setdefault(d["case_id"], d["ts"])
    handling: dict[str, list[float]] = defaultdict(list)
    for case, end in concluded.items():
        if case in intent:
            handling[intent[case]].append((end - opened[case]["ts"]) / 1000)
    medians = {name: statistics.median(values) for name, values in handling.items()}
    assert medians["order_status"] < medians["refund"] < medians["billing_dispute"]
    # log-normal: a long right tail, the mean above the median
    times = sorted(t for values in handling.values() for t in values)
    assert times[int(0.95 * len(times))] > 3 * statistics.median(times)
    assert statistics.mean(times) > statistics.median(times)
    delays = [(d["ts"] - concluded[d["case_id"]]) / 1000 for d in items
              if d["type"] in ("csat_submitted", "ces_submitted", "thumbs_submitted")]
    assert delays and min(delays) >= 60 and max(delays) <= 8 * 3600
    assert 10 * 60 < statistics.median(delays) < 2 * 3600  # minutes to hours later


def test_customers_come_back_about_earlier_cases() -> None:
    items = docs(run("steady")[0])
    first_seen: dict[str, int] = {}
    customers: dict[str, str] = {}
    comebacks = 0
    for index, d in enumerate(items):
        if d["type"] != "case_opened":
            continue
        first_seen.setdefault(d["case_id"], index)
        customers[d["case_id"]] = d["customer_id"]
        related = d.get("related_case_id")
        if related is not None:
            comebacks += 1
            assert first_seen[related] < index
            assert customers[related] == d["customer_id"]
    assert comebacks >= 10
    reopened = [d for d in items if d["type"] == "case_reopened"]
    assert reopened and all(d["case_id"] in first_seen for d in reopened)


def test_the_same_seed_gives_the_same_messages() -> None:
    def first(seed: int) -> list[Message]:
        simulation = Simulation(SCENARIOS["steady"], seed=seed, rate=50, speed=SPEED,
                                start_ms=START_MS)
        return list(horizon(iter(simulation), 30 * SPEED))

    assert first(3) == first(3)
    assert first(3) != first(4)


def test_the_rate_is_messages_per_wall_second() -> None:
    simulation = Simulation(SCENARIOS["steady"], seed=2, rate=20, speed=SPEED, start_ms=0)
    messages = list(horizon(iter(simulation), 1800 * SPEED))
    # once feedback and comebacks of earlier cases arrive as well (after 10 minutes)
    settled = [m for m in messages if m.t_s >= 600 * SPEED]
    assert len(settled) / 1200 == pytest.approx(20, rel=0.1)


def windows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return report["windows"]["items"]


@pytest.mark.parametrize("scenario", ["compliance-drop", "escalation-spike", "version-rollout"])
def test_before_the_delay_a_scenario_is_steady(scenario: str) -> None:
    steady, changed = run("steady")[0], run(scenario)[0]
    change_at = CHANGE_AFTER_S * SPEED
    before = [m for m in changed if m.t_s < change_at]
    assert len(before) > 2000
    assert before == [m for m in steady if m.t_s < change_at]
    assert windows(run(scenario)[1])[0] == windows(run("steady")[1])[0]
    assert changed != steady


def test_steady_traffic_meets_the_objectives() -> None:
    report = run("steady")[1]
    totals, versions = report["totals"], report["by_agent_version"]
    assert totals["cases_concluded"] > 1200
    assert totals["compliance_score"] >= 0.999
    assert 0.7 < totals["arr"] < 0.9 and 0.1 < totals["escalation_rate"] < 0.25
    assert abs(versions["v7"]["arr"] - versions["v8"]["arr"]) < 0.1
    assert 0.05 < versions["v8"]["cases_concluded"] / totals["cases_concluded"] < 0.15


def test_compliance_drop_takes_refund_compliance_below_its_objective() -> None:
    steady, dropped = run("steady")[1], run("compliance-drop")[1]
    assert steady["by_intent"]["refund"]["compliance_score"] >= 0.999
    assert dropped["by_intent"]["refund"]["compliance_score"] < 0.98
    for intent, kpi in dropped["by_intent"].items():
        if intent != "refund" and kpi["policy_checks"]:
            assert kpi["compliance_score"] >= 0.995, intent
    assert all(w["compliance_score"] < 0.995 for w in windows(dropped)[1:])


def test_escalation_spike_makes_tool_failure_the_top_reason() -> None:
    steady, spiked = run("steady")[1]["totals"], run("escalation-spike")[1]["totals"]
    reasons = spiked["escalations_by_reason"]
    assert max(reasons, key=reasons.get) == "tool_failure"
    assert max(steady["escalations_by_reason"], key=steady["escalations_by_reason"].get) \
        != "tool_failure"
    assert reasons["tool_failure"] > 4 * steady["escalations_by_reason"]["tool_failure"]
    assert spiked["escalation_rate"] > steady["escalation_rate"] + 0.15
    assert spiked["arr"] < steady["arr"] - 0.15
    assert all(w["arr"] < 0.55 for w in windows(run("escalation-spike")[1])[1:])


def test_version_rollout_gives_v8_traffic_and_a_worse_arr() -> None:
    steady, rolled = run("steady")[1], run("version-rollout")[1]
    v7, v8 = rolled["by_agent_version"]["v7"], rolled["by_agent_version"]["v8"]
    assert v8["cases_concluded"] / rolled["totals"]["cases_concluded"] > 0.4
    assert v8["arr"] < v7["arr"] - 0.15
    assert v8["escalation_rate"] > 1.5 * v7["escalation_rate"]
    assert v8["compliance_score"] < v7["compliance_score"]
    assert rolled["totals"]["arr"] < steady["totals"]["arr"] - 0.05


def test_output_files_are_deterministic_and_the_command_checks_its_options(
        tmp_path: Path) -> None:
    def simulate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streams", "simulate", *args],
                              capture_output=True, text=True, timeout=60)

    common = ["--rate", "40", "--speed", "60", "--seed", "9", "--duration", "20"]
    for name, start in (("a", "2026-11-22T12:00:00Z"), ("b", "1795348800000")):
        done = simulate(*common, "--start", start, "--output", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert len((tmp_path / "a").read_bytes().splitlines()) > 500
    bad = simulate("--rate", "0", "--output", str(tmp_path / "c"), "--duration", "1")
    assert bad.returncode == 2 and "--rate must be > 0" in bad.stderr
    bad = simulate("--output", str(tmp_path / "c"))
    assert bad.returncode == 2 and "--output needs --duration" in bad.stderr


async def consume_all(bootstrap: str, topic: str) -> list[tuple[int, bytes | None, bytes]]:
    """Every record of `topic` as (partition, key, value), in partition order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # fetches the cluster's metadata
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[tuple[int, bytes | None, bytes]] = []
        deadline = time.monotonic() + 30
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            assert time.monotonic() < deadline, "could not read the topic back"
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                out.extend((tp.partition, r.key, r.value) for r in records)
        return out
    finally:
        await consumer.stop()


@pytest.mark.integration
def test_simulate_publishes_at_its_pace_what_it_would_write(kafka: BrokerInfo,
                                                            tmp_path: Path) -> None:
    topic = f"acsr.sim-{uuid.uuid4().hex[:8]}"
    common = ["--rate", "150", "--speed", "60", "--seed", "5", "--start",
              "2026-11-22T12:00:00Z", "--duration", "3"]
    offline = tmp_path / "offline.jsonl"
    done = subprocess.run([sys.executable, "-m", "streams", "simulate", *common,
                           "--output", str(offline)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    live = subprocess.run(
        [sys.executable, "-m", "streams", "simulate", "--broker", kafka.bootstrap,
         "--events-topic", topic, "--partitions", "3", *(["--tansu"] if kafka.embedded else []),
         *common], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert live.returncode == 0, live.stderr
    assert elapsed > 2.5  # paced over --duration, not sent at once
    records = asyncio.run(consume_all(kafka.bootstrap, topic))
    expected = offline.read_bytes().splitlines()
    assert sorted(value for _, _, value in records) == sorted(expected)
    assert f"sent {len(expected)} messages" in live.stderr
    by_partition: dict[int, list[bytes]] = defaultdict(list)
    for partition, key, value in records:
        try:
            case_id = parse_event(value).case_id
        except InvalidEvent:
            continue
        assert key == case_id.encode()
        by_partition[partition].append(value)
    # a case's events keep their order: they share a partition
    position = {value: index for index, value in enumerate(expected)}
    for values in by_partition.values():
        cases: dict[str, list[int]] = defaultdict(list)
        for value in values:
            cases[orjson.loads(value)["case_id"]].append(position[value])
        assert all(order == sorted(order) for order in cases.values())


def test_without_a_start_the_simulated_clock_starts_far_enough_back() -> None:
    now_ms = 1_795_352_400_000
    assert past_start_ms(300, 60, now_ms) == now_ms - 300 * 60 * 1000
    assert past_start_ms(None, 60, now_ms) == now_ms - 86_400_000  # open-ended: a day back
    simulation = Simulation(SCENARIOS["steady"], seed=1, rate=20, speed=60)
    assert simulation.start_ms <= time.time() * 1000 - 86_000_000


async def test_a_simulated_clock_that_caught_up_runs_at_real_time() -> None:
    """Ten simulated seconds back at 100x: those go out in a tenth of a second, then no
    message is sent before its ts on the real clock (none is ever future_ts)."""
    start_ms = int(time.time() * 1000) - 10_000
    simulation = Simulation(SCENARIOS["steady"], seed=4, rate=4000, speed=100,
                            start_ms=start_ms, invalid_share=0.0, duplicate_share=0.0)
    ahead_ms: list[float] = []
    stamps: list[int] = []

    async def send(message: Message) -> None:
        ts = orjson.loads(message.value)["ts"]
        stamps.append(ts)
        ahead_ms.append(ts - time.time() * 1000)

    await pace(simulation, send, duration_s=2.0)
    assert max(ahead_ms) <= 5  # scheduling slack only
    assert max(stamps) > start_ms + 10_000  # it went on past the catch-up, at real time
    assert max(stamps) < start_ms + 10_000 + 2_500

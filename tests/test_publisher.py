"""The publisher API: events checked against the contract before sending, keyed by case."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from streams import InvalidEventError, Publisher, build_event
from streams.core.events import parse_event
from streams.kafka.broker import ONE_RECORD_BATCH_BYTES, BrokerUnavailable, ensure_topics
from streams.kafka.publisher import producer_options

from .conftest import BrokerInfo
from .test_simulate import consume_all

README = Path(__file__).resolve().parents[1] / "README.md"


def test_build_event_fills_the_envelope_and_leaves_out_nulls() -> None:
    before = int(time.time() * 1000)
    doc = build_event("case_escalated", "c-1", reason="tool_failure", note=None)
    assert re.fullmatch(r"[0-9a-f]{32}", doc["event_id"])
    assert before <= doc["ts"] <= int(time.time() * 1000)
    assert "note" not in doc
    assert parse_event(orjson.dumps(doc)).fields["reason"] == "tool_failure"
    at = datetime(2026, 11, 22, 13, 0, tzinfo=UTC)
    assert build_event("case_opened", "c-1", event_id="e-1", ts=at)["ts"] == 1_795_352_400_000
    assert build_event("case_opened", "c-1", ts="2026-11-22T13:00:00Z")["ts"] == \
        "2026-11-22T13:00:00Z"


@pytest.mark.parametrize(("event_type", "fields", "reason"), [
    ("csat_submitted", {"score": 6}, "bad_field"),
    ("case_escalated", {}, "missing_field"),
    ("teleport", {}, "unknown_type"),
    ("case_opened", {"ts": "noon"}, "bad_ts"),
    ("case_opened", {"ts": datetime(2026, 11, 22, 13, 0)}, "bad_ts"),  # no timezone
    ("case_opened", {"note": "x" * 1_100_000}, "too_large"),
    ("case_opened", {"channel": object()}, "not_json"),
    ("case_resolved", {"by": "bot"}, "bad_field"),
])
def test_an_event_that_breaks_the_contract_is_refused(event_type: str, fields: dict,
                                                     reason: str) -> None:
    with pytest.raises(InvalidEventError) as refused:
        build_event(event_type, "c-9", **fields)
    assert refused.value.reason == reason
    message = str(refused.value)
    assert f"refusing to publish {event_type!r} for case 'c-9'" in message
    assert reason in message and "docs/events.md" in message


def test_producer_settings_are_idempotent_except_on_the_embedded_broker() -> None:
    kafka = producer_options(embedded=False)
    assert kafka["acks"] == "all" and kafka["enable_idempotence"] is True
    assert "max_batch_size" not in kafka
    tansu = producer_options(embedded=True)
    assert tansu["enable_idempotence"] is False
    assert tansu["max_batch_size"] == ONE_RECORD_BATCH_BYTES


async def test_sending_needs_a_started_publisher() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        await Publisher("127.0.0.1:9").send("case_opened", "c-1")


@pytest.mark.integration
async def test_events_arrive_keyed_by_case_and_an_invalid_one_is_never_sent(
        kafka: BrokerInfo) -> None:
    topic = f"acsr.pub-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka.bootstrap, {topic: 2})
    async with Publisher(kafka.bootstrap, topic, embedded=kafka.embedded) as events:
        await events.send("case_opened", "c-1", channel="web", agent_version="v7")
        await events.send_and_wait("intent_classified", "c-2", intent="refund", confidence=0.9)
        with pytest.raises(InvalidEventError):
            await events.send("csat_submitted", "c-1", score=0)
        await events.send_value(b'{"not": "an event"}', checked=False)  # test traffic only
    records = await consume_all(kafka.bootstrap, topic)
    assert len(records) == 3
    valid = [(key, parse_event(value)) for _, key, value in records if b"not" not in value]
    assert sorted((key, event.case_id) for key, event in valid) == [(b"c-1", "c-1"),
                                                                     (b"c-2", "c-2")]
    assert [key for _, key, value in records if b"not" in value] == [None]


@pytest.mark.integration
async def test_the_readme_example_for_agents_runs(kafka: BrokerInfo) -> None:
    snippet = README.read_text().split("## Sending events from your own agent", 1)[1]
    code = snippet.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    topic = f"acsr.readme-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka.bootstrap, {topic: 2})
    code = code.replace('Publisher("kafka:9092")',
                        f'Publisher("{kafka.bootstrap}", "{topic}", embedded={kafka.embedded})')
    body = "\n".join("    " + line for line in code.splitlines())
    namespace: dict = {}
    exec(f"async def example():\n{body}\n", namespace)
    await namespace["example"]()
    records = await consume_all(kafka.bootstrap, topic)
    events = [parse_event(value) for _, _, value in records]
    assert {event.case_id for event in events} == {"c-42"}
    assert {key for _, key, _ in records} == {b"c-42"}
    assert sorted(event.type for event in events) == ["case_opened", "case_resolved",
                                                      "intent_classified"]


@pytest.mark.integration
async def test_the_embedded_broker_refuses_an_idempotent_producer_with_a_clear_error(
        kafka: BrokerInfo) -> None:
    """Measured on Tansu 0.6.0: InitProducerId fails, hence `embedded=True` turns
    idempotence off (and on real Kafka it stays on)."""
    if not kafka.embedded:
        pytest.skip("a limit of the embedded broker only")
    with pytest.raises(BrokerUnavailable, match="refuses idempotent producers"):
        await Publisher(kafka.bootstrap, embedded=False).start()


def test_implausible_times_are_refused_before_sending_with_the_likely_mistake() -> None:
    now_ms = int(time.time() * 1000)
    with pytest.raises(InvalidEventError, match=r"future_ts .*clock ahead") as ahead:
        build_event("case_opened", "c-1", ts=now_ms + 3_600_000)
    assert ahead.value.reason == "future_ts"
    with pytest.raises(InvalidEventError, match=r"past_ts .*epoch seconds") as seconds:
        build_event("case_opened", "c-1", ts=now_ms // 1000)
    assert seconds.value.reason == "past_ts"
    assert build_event("case_opened", "c-1", ts=now_ms + 590_000)["ts"] == now_ms + 590_000
    # the publisher follows ACSR_MAX_CLOCK_SKEW_S
    relaxed = Publisher(max_clock_skew_s=7200)
    assert relaxed.bounds.max_skew_s == 7200
    build_event("case_opened", "c-1", ts=now_ms + 3_600_000, bounds=relaxed.bounds)

"""Hostile input: whatever bytes a producer sends, nothing but the contract's answer.

The parser answers any bytes with an event or a contract reason. Through a real broker and
a real worker, garbage mixed into valid traffic is counted invalid by reason and lands on
the dead-letter topic (or, when the dead-letter topic cannot take it, is counted and
logged as a dead-letter failure), while the valid traffic's figures stay exactly those of
the valid traffic alone and the worker never restarts.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.config import Settings
from streams.core import kpis
from streams.core.cases import related_case
from streams.core.events import (
    EVENT_TYPES,
    INVALID_REASONS,
    MAX_MESSAGE_BYTES,
    Event,
    InvalidEvent,
    parse_event,
)
from streams.core.kpis import Aggregate, build_report
from streams.core.ledger import Ledger
from streams.core.units import SECOND_US
from streams.core.windows import WindowPolicy
from streams.tools.replay import (
    Cluster,
    create_topics,
    gather_aggregates,
    isolated,
    wait_processed,
)
from streams.worker.app import REASON_HEADER

from .conftest import BrokerInfo, report_mismatches
from .fact_windows import FactWindows
from .traffic import generate

VALID = orjson.dumps({"event_id": "e-1", "type": "csat_submitted", "case_id": "c-1",
                      "ts": "2026-11-22T13:05:09.120Z", "score": 5, "channel": "web"})
# Faust's producer refuses a request above this (producer_max_request_size): such a
# message cannot reach the dead-letter topic and is counted as a dead-letter failure.
FAUST_MAX_REQUEST_BYTES = 1_000_000


def outcome(raw: bytes | None) -> Event | str:
    """The event, or the contract reason; any other exception escapes and fails the test."""
    try:
        return parse_event(raw)
    except InvalidEvent as invalid:
        assert invalid.reason in INVALID_REASONS, invalid.reason
        return invalid.reason


# --- the parser, property-tested on hostile mutations of a valid event ------------------


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid event damaged the ways real producers and networks damage messages."""
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["cut", "flip", "insert", "splice"]))
        if kind == "cut":
            del raw[at:]
        elif kind == "flip" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            raw[at:at] = draw(st.sampled_from([
                b"NaN", b"-Infinity", b"1e400", b"\xff\xfe", b"\\ud800", b'"', b"{", b"]",
                b"null", b"99999999999999999999999", b"[" * 2000, b'"ts":true,',
                b'"schema_version":2,', b'"type":"teleport",', b"\x00",
            ]))
    return bytes(raw)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_events_give_an_event_or_a_contract_reason(raw: bytes) -> None:
    result = outcome(raw)
    if isinstance(result, Event):
        assert result.type in EVENT_TYPES
        assert 1 <= len(result.case_id) <= 128 and 1 <= len(result.event_id) <= 128


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200_000), st.sampled_from([b"[", b'{"a":', b'{"event_id":[']))
def test_deep_nesting_is_not_json_or_valid_never_a_crash(depth: int, opener: bytes) -> None:
    closer = {b"[": b"]", b'{"a":': b"}", b'{"event_id":[': b"]}"}[opener]
    raw = opener * depth + b"1" + closer * depth
    assert outcome(raw) in INVALID_REASONS


@pytest.mark.parametrize("size", [MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES])
def test_size_limit_is_exact_whatever_the_bytes(size: int) -> None:
    filler = b'{"note":"' + b"x" * (size - 11) + b'"}'
    assert len(filler) == size
    expected = "too_large" if size > MAX_MESSAGE_BYTES else "missing_field"
    assert outcome(filler) == expected
    assert outcome(b"\xff" * size) == ("too_large" if size > MAX_MESSAGE_BYTES else "not_json")


# --- a garbage corpus --------------------------------------------------------------------


@dataclass(frozen=True)
class Garbage:
    kind: str
    key: bytes | None
    value: bytes | None

    @property
    def reason(self) -> str:
        result = outcome(self.value)
        assert isinstance(result, str), f"{self.kind} garbage parsed as a valid event"
        return result


def _event(**fields: Any) -> bytes:
    """A csat event with `fields` changed (json, not orjson: it writes 10**400)."""
    return json.dumps({"event_id": "g-1", "type": "csat_submitted", "case_id": "g-case",
                       "ts": 1, "score": 3, **fields}).encode()


# What each kind of garbage must be counted as, when the contract decides it alone.
PREDICTABLE = {
    "nan": {"not_json"}, "deep_nesting": {"not_json"}, "huge_string": {"bad_field"},
    "wrong_type": {"bad_field"}, "absurd_ts": {"bad_ts"}, "unknown_type": {"unknown_type"},
    "schema_version": {"bad_schema_version"}, "too_large": {"too_large"},
    "under_limit_but_undeliverable": {"bad_field"}, "tombstone": {"not_json"},
    "truncated": {"not_json"}, "random_bytes": set(INVALID_REASONS),
}


def _one(rng: random.Random, kind: str, valid_lines: list[bytes]) -> bytes | None:
    if kind == "random_bytes":
        return rng.randbytes(rng.randint(0, 300))
    if kind == "truncated":
        line = rng.choice(valid_lines)
        return line[: rng.randint(0, len(line) - 1)]
    if kind == "nan":
        return rng.choice([b"NaN", b"Infinity", b"-Infinity"]).join(
            [b'{"event_id":"g","type":"csat_submitted","case_id":"c","ts":1,"score":', b"}"])
    if kind == "deep_nesting":
        depth = rng.choice([1_100, 5_000, 100_000])
        return b'{"event_id":' + b"[" * depth + b"]" * depth + b"}"
    if kind == "huge_string":
        name = rng.choice(["event_id", "case_id", "intent", "channel", "agent_version"])
        return _event(**{name: "\u00e9" * rng.choice([200, 5_000, 60_000])})
    if kind == "wrong_type":
        return _event(**rng.choice([
            {"score": "5"}, {"score": 2.5}, {"score": True}, {"score": 6}, {"channel": 7},
            {"intent": ""}, {"score": 10**400}, {"agent_version": ["v7"]},
        ]))
    if kind == "absurd_ts":
        return _event(ts=rng.choice([
            10**20, -(10**20), 253_402_300_800_000, "2026-13-01T00:00:00Z",
            "2026-11-22T13:00:00", "2026-11-22T13:00:00+24:00", True, [], "yesterday", 1.5,
        ]))
    if kind == "unknown_type":
        return _event(type=rng.choice(["teleport", "", "CASE_OPENED", "x" * 500]))
    if kind == "schema_version":
        return _event(schema_version=rng.choice([2, 0, "1", 1.5, True, -1]))
    raise AssertionError(kind)


def garbage_corpus(rng: random.Random, count: int, valid_lines: list[bytes],
                   case_ids: list[str]) -> list[Garbage]:
    """`count` invalid messages of every kind, keyed every way a producer gets keys wrong
    (none, random bytes, another case's id, the id of a case of the valid traffic)."""
    kinds = [k for k in PREDICTABLE if k not in ("too_large", "under_limit_but_undeliverable",
                                                   "tombstone")]
    out: list[Garbage] = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        key = rng.choice([None, rng.randbytes(rng.randint(1, 40)), b"not-the-case-id",
                          rng.choice(case_ids).encode()])
        out.append(Garbage(kind, key, _one(rng, kind, valid_lines)))
    # Sizes around the limits: above 1 MiB (too_large), and under it but above what the
    # dead-letter producer takes; and tombstones (no value) keyed by real cases.
    for size in (MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES):
        out.append(Garbage("too_large", b"big", b"x" * size))
    out.append(Garbage("under_limit_but_undeliverable", rng.choice(case_ids).encode(),
                       _event(intent="i" * (FAUST_MAX_REQUEST_BYTES + 100))))
    out.extend(Garbage("tombstone", case_id.encode(), None) for case_id in case_ids[:3])
    return out


def test_every_garbage_kind_gives_its_predicted_reason() -> None:
    lines = list(generate(40, seed=3, invalid_share=0.0, duplicate_share=0.0))
    corpus = garbage_corpus(random.Random(5), 600, lines, [f"case-{i}" for i in range(5)])
    for item in corpus:
        assert item.reason in PREDICTABLE[item.kind], (item.kind, item.value and item.value[:80])
    assert {item.kind for item in corpus} == set(PREDICTABLE)


# --- through a real broker and a real worker --------------------------------------------


def expected_report(valid: list[tuple[bytes, int, int]], partition_of: dict[str, int],
                    window_sizes: tuple[int, ...], window_s: int) -> dict[str, Any]:
    """The valid traffic alone, applied offline to the pure ledger on the partitions and
    offsets the broker gave it (so per-partition event time, and lateness, match)."""
    ledger = Ledger(WindowPolicy(sizes_s=window_sizes), retention_us=7 * 86_400 * SECOND_US)
    cases: dict[str, bytes] = {}
    records: dict[int, bytes] = {}
    windows = FactWindows(window_sizes)
    for value, partition, offset in valid:
        event = parse_event(value)
        related = related_case(event)
        if related is not None:
            ledger.apply_link(cases, related, partition_of[related], event.ts_us)
        step = ledger.apply_event(cases, records, event, partition, offset)
        if step is not None:
            windows.add_facts(step.facts)  # the window tables' job in a worker
    total = Aggregate(window_sizes=window_sizes)
    for aggregate in ledger.aggregates.values():
        total.merge(aggregate)
    total.windows = windows.windows
    return build_report(total, window_s)


def without_invalid(report: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(report))
    copy["events"].pop("invalid")
    copy["events"].pop("invalid_by_reason")
    return copy


async def produce_all(settings: Settings, messages: list[tuple[bytes | None, bytes | None]]
                      ) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """Send each (key, value) in order; return each one's (partition, offset) and the ends."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all",
        enable_idempotence=not settings.tansu, max_request_size=4 * MAX_MESSAGE_BYTES,
        max_batch_size=1 if settings.tansu else 16384, linger_ms=5)
    await producer.start()
    try:
        pending = [await producer.send(settings.events_topic, value, key=key)
                   for key, value in messages]
        metadata = await asyncio.gather(*pending)
    finally:
        await producer.stop()
    placed = [(meta.partition, meta.offset) for meta in metadata]
    ends: dict[int, int] = {}
    for partition, offset in placed:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return placed, ends


async def dead_letters(settings: Settings, expected: int) -> Counter[tuple[Any, ...]]:
    """(key, value, reason) of every record on the dead-letter topic."""
    consumer = AIOKafkaConsumer(settings.dlq_topic, bootstrap_servers=settings.bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * MAX_MESSAGE_BYTES,
                                fetch_max_bytes=16 * MAX_MESSAGE_BYTES)
    await consumer.start()
    seen: Counter[tuple[Any, ...]] = Counter()
    try:
        while sum(seen.values()) < expected:
            batch = await consumer.getmany(timeout_ms=5000)
            if not batch:
                break
            for records in batch.values():
                for record in records:
                    seen[(record.key, record.value,
                          dict(record.headers)[REASON_HEADER].decode())] += 1
        extra = await consumer.getmany(timeout_ms=500)  # nothing beyond what was expected
        for records in extra.values():
            for record in records:
                seen[(record.key, record.value, "unexpected")] += 1
    finally:
        await consumer.stop()
    return seen


@dataclass
class FuzzRun:
    garbage: int
    valid: int
    invalid_counted: int
    dead_lettered: int
    dead_letter_failed: int
    lost: int
    double_counted: int
    seconds: float


async def fuzz_through_worker(kafka: BrokerInfo, log_dir: Path, cases: int, garbage: int,
                              seed: int) -> FuzzRun:
    started = time.monotonic()
    settings = isolated(kafka.settings(partitions=4), uuid.uuid4().hex[:8])
    valid_lines = list(generate(cases, seed=seed, invalid_share=0.0))
    case_ids = sorted({orjson.loads(line)["case_id"] for line in valid_lines})
    rng = random.Random(seed)
    corpus = garbage_corpus(rng, garbage, valid_lines, case_ids)
    # Garbage goes anywhere between valid messages; the valid ones keep their order.
    messages: list[tuple[bytes | None, bytes | None, Garbage | None]] = [
        (orjson.loads(line)["case_id"].encode(), line, None) for line in valid_lines]
    for item in corpus:
        messages.insert(rng.randint(0, len(messages)), (item.key, item.value, item))

    await create_topics(settings)
    cluster = Cluster(settings, 1, log_dir)
    cluster.start()
    try:
        placed, ends = await produce_all(settings, [(k, v) for k, v, _ in messages])
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None,
                             stall_timeout_s=60)
        aggregate = await gather_aggregates(cluster, settings.partitions)
        worker = cluster.workers[0]
        assert worker.alive(), f"the worker exited:\n{worker.log_tail()}"
    finally:
        cluster.stop()
    report = build_report(aggregate, settings.report_window_s)

    # Invalid, by the reason the contract gives each garbage message.
    expected_reasons = Counter(item.reason for item in corpus)
    assert report["events"]["invalid_by_reason"] == dict(expected_reasons)
    for item in corpus:
        assert item.reason in PREDICTABLE[item.kind]

    # The valid traffic's report is that of the valid traffic alone.
    partition_of: dict[str, int] = {}
    valid: list[tuple[bytes, int, int]] = []
    for (key, value, item), (partition, offset) in zip(messages, placed, strict=True):
        if item is None:
            assert key is not None and value is not None
            partition_of[key.decode()] = partition
            valid.append((value, partition, offset))
    alone = expected_report(valid, partition_of, settings.window_sizes_s,
                            settings.report_window_s)
    assert report_mismatches(without_invalid(alone), without_invalid(report)) == []

    # Every garbage message is on the dead-letter topic, unchanged, with its reason;
    # those too large for the dead-letter producer are counted and logged instead.
    undeliverable = [item for item in corpus
                     if item.value is not None and len(item.value) > FAUST_MAX_REQUEST_BYTES]
    deliverable = Counter((item.key, item.value, item.reason) for item in corpus
                          if item not in undeliverable)
    on_dlq = await dead_letters(settings, sum(deliverable.values()))
    assert on_dlq == deliverable
    failed = {label: n for (name, label), n in aggregate.pipeline.items()
              if name == kpis.DEAD_LETTER_FAILED}
    assert failed == dict(Counter(item.reason for item in undeliverable))

    log = worker.log_path.read_text(errors="replace")
    assert log.count("dead-letter write failed") == len(undeliverable)
    assert "Traceback" not in log
    assert not re.search(r"restart", log, re.IGNORECASE)

    counted = report["events"]["valid"] + report["events"]["duplicate"]
    return FuzzRun(
        garbage=len(corpus), valid=len(valid), invalid_counted=report["events"]["invalid"],
        dead_lettered=sum(on_dlq.values()), dead_letter_failed=sum(failed.values()),
        lost=max(0, len(valid) - counted) + max(0, len(corpus) - report["events"]["invalid"]),
        double_counted=max(0, counted - len(valid))
        + max(0, report["events"]["invalid"] - len(corpus)),
        seconds=time.monotonic() - started,
    )


@pytest.mark.integration
async def test_garbage_mixed_into_traffic_is_dead_lettered_and_changes_no_figure(
    kafka: BrokerInfo, tmp_path: Path
) -> None:
    run = await fuzz_through_worker(kafka, tmp_path, cases=250, garbage=2_000, seed=11)
    print(f"hostile input: {run}")
    assert run.lost == 0 and run.double_counted == 0
    assert run.invalid_counted == run.garbage == run.dead_lettered + run.dead_letter_failed


@pytest.mark.integration
@pytest.mark.faults
async def test_a_bigger_fuzz_run(kafka: BrokerInfo, tmp_path: Path) -> None:
    run = await fuzz_through_worker(kafka, tmp_path, cases=1_500, garbage=15_000, seed=23)
    print(f"hostile input: {run}")
    assert run.lost == 0 and run.double_counted == 0
    assert run.invalid_counted == run.garbage == run.dead_lettered + run.dead_letter_failed

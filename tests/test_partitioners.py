"""Each partitioner pinned against the clients producers use: aiokafka and librdkafka."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.kafka.broker import ensure_topics
from streams.kafka.partitioners import (
    CRC32,
    FNV1A,
    MURMUR2,
    REPARTITION,
    CaseRouting,
    ClientPartitioner,
    Origin,
    event_time_after,
    fnv1a_hash,
    parse_source,
    partition_for,
    source_header,
)

from .conftest import BrokerInfo

keys = st.binary(min_size=1, max_size=160)
partition_counts = st.integers(min_value=1, max_value=64)


@given(keys, partition_counts)
def test_murmur2_is_aiokafkas_default_partitioner(key: bytes, partitions: int) -> None:
    every = list(range(partitions))
    assert partition_for(MURMUR2, key, partitions) == DefaultPartitioner()(key, every, every)


@given(keys, partition_counts, st.sampled_from([MURMUR2, CRC32, FNV1A]))
def test_our_producers_place_keys_as_the_setting_says(key: bytes, partitions: int,
                                                      name: str) -> None:
    every = list(range(partitions))
    assert ClientPartitioner(name)(key, every, every) == partition_for(name, key, partitions)


def test_fnv1a_known_values() -> None:
    # 32-bit FNV-1a of "a" is 0xe40c292c: its top bit set, so the signed value is negated.
    assert fnv1a_hash(b"a") == 0x1_0000_0000 - 0xE40C292C
    assert fnv1a_hash(b"") == 0x1_0000_0000 - 0x811C9DC5  # the offset basis, top bit set
    assert 0 <= fnv1a_hash(b"c-42") < 2**31 + 1


@given(st.text(min_size=1, max_size=128), partition_counts)
def test_case_partition_hashes_the_utf8_key(case_id: str, partitions: int) -> None:
    for name in (MURMUR2, CRC32, FNV1A):
        assert CaseRouting(name, partitions).home(case_id) == partition_for(
            name, case_id.encode(), partitions)


@given(st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=60), partition_counts)
def test_remembered_case_partitions_stay_right_past_the_bound(case_ids: list[str],
                                                              partitions: int) -> None:
    """CaseRouting remembers each case's partition, forgetting all past HOMES_KEPT: asked
    again and again, in any order, it answers what the hash gives."""
    import streams.kafka.partitioners as partitioners

    routing = CaseRouting(MURMUR2, partitions)
    kept = partitioners.HOMES_KEPT
    partitioners.HOMES_KEPT = 7
    try:
        for case_id in case_ids * 3:
            assert routing.home(case_id) == partition_for(MURMUR2, case_id.encode(), partitions)
            assert len(routing.homes) <= 7
    finally:
        partitioners.HOMES_KEPT = kept


# --- against librdkafka (confluent-kafka) through a real broker -----------------------------

LIBRDKAFKA = {CRC32: "consistent", MURMUR2: "murmur2", FNV1A: "fnv1a"}
TOPIC_PARTITIONS = (1, 2, 3, 5, 8, 13, 16)


def librdkafka_partitions(bootstrap: str, topic: str, keys: list[bytes],
                          partitioner: str | None) -> list[int]:
    """Where a confluent-kafka producer put each key (None: the client's default)."""
    config = {"bootstrap.servers": bootstrap, "linger.ms": 5}
    if partitioner is not None:
        config["partitioner"] = partitioner
    producer = Producer(config)
    placed: dict[int, int] = {}

    def delivered(index: int):
        def report(err, msg) -> None:
            assert err is None, err
            placed[index] = msg.partition()
        return report

    for index, key in enumerate(keys):
        producer.produce(topic, value=b"x", key=key, on_delivery=delivered(index))
        producer.poll(0)
    assert producer.flush(30) == 0
    return [placed[i] for i in range(len(keys))]


@pytest.fixture(scope="module")
def topics(kafka: BrokerInfo) -> dict[int, str]:
    run = uuid.uuid4().hex[:8]
    names = {n: f"acsr.test-partitioners-{run}-{n}" for n in TOPIC_PARTITIONS}
    asyncio.run(ensure_topics(kafka.bootstrap, {names[n]: n for n in TOPIC_PARTITIONS}))
    return names


@pytest.mark.integration
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(keys, min_size=1, max_size=40), st.sampled_from(TOPIC_PARTITIONS),
       st.sampled_from([CRC32, MURMUR2, FNV1A]))
def test_each_hash_places_keys_where_librdkafka_does(kafka: BrokerInfo, topics: dict[int, str],
                                                     sample: list[bytes], partitions: int,
                                                     name: str) -> None:
    placed = librdkafka_partitions(kafka.bootstrap, topics[partitions], sample, LIBRDKAFKA[name])
    assert placed == [partition_for(name, key, partitions) for key in sample]


@pytest.mark.integration
def test_librdkafkas_default_partitioner_is_crc32(kafka: BrokerInfo,
                                                  topics: dict[int, str]) -> None:
    sample = [f"case-{i}".encode() for i in range(200)]
    placed = librdkafka_partitions(kafka.bootstrap, topics[13], sample, None)
    assert placed == [partition_for(CRC32, key, 13) for key in sample]
    # and it is not murmur2: a worker assuming murmur2 would look for cases elsewhere
    assert placed != [partition_for(MURMUR2, key, 13) for key in sample]


def test_rekey_routes_by_case_id_with_our_hash() -> None:
    routing = CaseRouting(REPARTITION, 8)
    value = b'{"event_id":"e","type":"case_opened","case_id":"c-42","ts":1}'
    assert routing.rekey(value, b"something-else", 3) == (b"c-42",
                                                          partition_for(MURMUR2, b"c-42", 8))
    # not JSON: by the producer's key, else it stays with its source partition's share
    assert routing.rekey(b"\xff", b"k", 3) == (b"k", partition_for(MURMUR2, b"k", 8))
    assert routing.rekey(b"\xff", None, 11) == (None, 3)


def test_source_positions_round_trip_through_a_header() -> None:
    for origin in (Origin(3, 1234, 1_764_000_000_000_000), Origin(0, 0, None)):
        assert parse_source([("other", b"x"), source_header(origin)]) == origin
    assert parse_source(None) is None and parse_source([("other", b"1:2:3")]) is None


def test_a_partitions_event_time_moves_with_valid_events_only() -> None:
    def event(ts: int) -> bytes:
        return orjson.dumps({"event_id": "e", "type": "case_opened", "case_id": "c", "ts": ts})

    assert event_time_after(None, event(1_764_000_000_000)) == 1_764_000_000_000_000
    assert event_time_after(5 * 10**15, event(1_764_000_000_000)) == 5 * 10**15
    assert event_time_after(7, b"not json") == 7 and event_time_after(None, None) is None


def test_the_remedy_names_the_partitioner_that_fits() -> None:
    routing = CaseRouting(MURMUR2, 4)
    cases = [f"case-{i}" for i in range(40)]
    on_two = [c for c in cases if partition_for(CRC32, c.encode(), 4) == 2
              and partition_for(MURMUR2, c.encode(), 4) != 2]
    assert on_two and "ACSR_PARTITIONER=crc32" in routing.remedy(on_two, 2)
    assert "repartition" in routing.remedy(["a", "b", "c", "d", "e", "f", "g", "h"], 99)

"""Which partition a producer's client puts a keyed message on.

A case's state lives on the partition its producer chose for its `case_id`. Anything we
route by key (re-engagement links, our own producers, the misrouting check) must pick the
same partition, so it computes it here with the producers' hash, never through a
client's default (docs/events.md, "Producers").

- `murmur2`: `murmur2(key) & 0x7fffffff`: Java, aiokafka, kafkajs, franz-go;
- `crc32`: `crc32(key)`: librdkafka (confluent-kafka for Python, Go, .NET; node-rdkafka);
- `fnv1a`: `abs(int32(fnv1a_32(key)))`: sarama's hash partitioner, librdkafka's `fnv1a`;
- `repartition`: any other deterministic one: events are re-keyed with ours (`murmur2`)
  onto an internal topic first.

The partition is that hash modulo the topic's partition count.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka.partitioner import murmur2 as _java_murmur2

from streams.core.events import READER_CLOCK, Event, EventTimeBounds, InvalidEvent, parse_event
from streams.core.ledger import Origin

MURMUR2 = "murmur2"
CRC32 = "crc32"
FNV1A = "fnv1a"
REPARTITION = "repartition"
PARTITIONERS = (MURMUR2, CRC32, FNV1A, REPARTITION)

KeyHash = Callable[[bytes], int]

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def murmur2_hash(key: bytes) -> int:
    """The Java client's partition hash (aiokafka's implementation of it)."""
    return _java_murmur2(key) & 0x7FFFFFFF


def crc32_hash(key: bytes) -> int:
    """librdkafka's `consistent` and `consistent_random` partitioners."""
    return zlib.crc32(key)


def fnv1a_hash(key: bytes) -> int:
    """sarama's hash partitioner (librdkafka's `fnv1a` matches it): 32-bit FNV-1a, read as
    a signed integer, its absolute value."""
    h = _FNV_OFFSET
    for byte in key:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return (0x1_0000_0000 - h) if h & 0x8000_0000 else h


_HASHES: dict[str, KeyHash] = {
    MURMUR2: murmur2_hash,
    CRC32: crc32_hash,
    FNV1A: fnv1a_hash,
    # Re-keyed events are written by us, with our own hash.
    REPARTITION: murmur2_hash,
}


def key_hash(partitioner: str) -> KeyHash:
    """The hash that places keys in the topic the worker's tables follow."""
    try:
        return _HASHES[partitioner]
    except KeyError:
        raise ValueError(f"unknown partitioner {partitioner!r}: one of "
                         f"{', '.join(PARTITIONERS)}") from None


def partition_for(partitioner: str, key: bytes, partitions: int) -> int:
    return key_hash(partitioner)(key) % partitions


class ClientPartitioner:
    """An aiokafka `partitioner=` that places keys as the setting `partitioner` says
    producers do, so our own producers publish as the configured ones would (for
    `repartition`, any deterministic hash will do: ours). Keyless messages pick at random,
    as every client does."""

    def __init__(self, partitioner: str) -> None:
        self.hash_of = key_hash(partitioner)
        self.name = partitioner

    def __call__(self, key: bytes | None, all_partitions: Sequence[int],
                 available: Sequence[int]) -> int:
        if key is None:
            return random.choice(list(available) or list(all_partitions))
        return all_partitions[self.hash_of(key) % len(all_partitions)]


HOMES_KEPT = 100_000  # case partitions CaseRouting remembers

# On re-keyed events: b"<source partition>:<source offset>:<source event time, us>".
SOURCE_HEADER = "acsr-source"


@dataclass(frozen=True)
class CaseRouting:
    """Where cases live: the configured partitioner over the real partition count of the
    topic the worker's tables follow (the events topic, or the re-keyed topic)."""

    partitioner: str
    partitions: int
    hash_of: KeyHash = field(init=False, repr=False, compare=False)
    homes: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash_of", key_hash(self.partitioner))
        object.__setattr__(self, "homes", {})

    def home(self, case_id: str) -> int:
        """The case's partition; remembered, as each event of a batch asks it again (the
        Java hash is pure Python: a few microseconds a call)."""
        homes = self.homes
        found = homes.get(case_id)
        if found is None:
            if len(homes) >= HOMES_KEPT:  # bounded: forget all, the next ones come back
                homes.clear()
            found = homes[case_id] = self.hash_of(case_id.encode()) % self.partitions
        return found

    def rekey(self, value: bytes | None, key: bytes | None, source_partition: int,
              event: Event | None = None) -> tuple[bytes | None, int]:
        """Key and partition of an event on the re-keyed topic: by its `case_id` (our hash),
        else by the producer's key; a message with neither stays with its source partition's
        share (it is invalid, and only needs to be counted once). `event`: the message
        already parsed, when it is valid."""
        if event is not None:
            case_id: Any = event.case_id
        else:
            try:
                doc = orjson.loads(value) if value else None
            except orjson.JSONDecodeError:
                doc = None
            case_id = doc.get("case_id") if isinstance(doc, dict) else None
        if isinstance(case_id, str) and case_id:
            key = case_id.encode()
        if key is None:
            return None, source_partition % self.partitions
        return key, murmur2_hash(key) % self.partitions

    def matching(self, case_ids: Sequence[str], partition: int) -> list[str]:
        """The hash partitioners that put every one of `case_ids` on `partition`."""
        return [name for name in (MURMUR2, CRC32, FNV1A)
                if all(partition_for(name, c.encode(), self.partitions) == partition
                       for c in case_ids)]

    def remedy(self, case_ids: Sequence[str], partition: int) -> str:
        """What to set, judged from events found on `partition`."""
        fits = [name for name in self.matching(case_ids, partition) if name != self.partitioner]
        if fits:
            return f"set ACSR_PARTITIONER={fits[0]} (the producers' partitioner)"
        return ("set ACSR_PARTITIONER=repartition (no known hash fits: a custom partitioner), "
                "or key the producers by case_id if they do not")


def parse_source(headers: Iterable[tuple[str, bytes]] | None) -> Origin | None:
    """The origin a re-keyed event carries (None on any other message)."""
    for name, value in headers or ():
        if name == SOURCE_HEADER:
            partition, offset, time_us = value.split(b":")
            return Origin(int(partition), int(offset), int(time_us) if time_us else None)
    return None


def source_header(origin: Origin) -> tuple[str, bytes]:
    time_us = "" if origin.time_us is None else str(origin.time_us)
    return SOURCE_HEADER, f"{origin.partition}:{origin.offset}:{time_us}".encode()


def valid_event(value: bytes | None, bounds: EventTimeBounds = READER_CLOCK) -> Event | None:
    try:
        return parse_event(value, bounds)
    except InvalidEvent:
        return None


def time_after(time_us: int | None, event: Event | None) -> int | None:
    """A partition's event time after a message: moved by the `ts` of a valid event.
    (A repeated `event_id` moves it too: a producer's retry repeats its `ts`.)"""
    if event is None:
        return time_us
    return event.ts_us if time_us is None else max(time_us, event.ts_us)


def event_time_after(time_us: int | None, value: bytes | None,
                     bounds: EventTimeBounds = READER_CLOCK) -> int | None:
    """`time_after` of a message value."""
    return time_after(time_us, valid_event(value, bounds))

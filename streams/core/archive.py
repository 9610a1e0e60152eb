"""The figures of a partition that no case record holds, stored in bounded records.

The figures of expired cases (with the figure records their spills made, see
`Ledger`) are summed into the partition's *archive*. At production label shapes that sum passes a
megabyte, over Kafka's default record limit, so it is cut into shards: each series goes
to the shard its key hashes to, and the number of shards doubles whenever one would pass
SHARD_BYTES. Shards live in the partition table under keys of their own (negative, so
they never meet a partition number).

A write never overwrites the shard the partition record points at: it goes to the
other of the shard's two slots, and the partition record, written after it, points at
the new slot. A crash in between leaves the record pointing at the old, complete
shards, so figures move into the archive exactly when the record naming them lands.

Pure logic over a mutable mapping: no Faust, no Kafka.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, MutableMapping

import orjson

from streams.core.kpis import Aggregate
from streams.core.state_bytes import dump_state

SHARD_BYTES = 256 * 1024  # a shard past this is split (the number of shards doubles)
MAX_SHARDS = 1 << 13
_PARTITION_BITS = 16
_SHARD_BITS = 13


class RecordTooLarge(RuntimeError):
    """A table record would pass the limit a broker accepts: it is never sent."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} would take {size:,} bytes, over the {limit:,}-byte record "
                         "limit (Kafka's message.max.bytes): not written")
        self.what, self.size, self.limit = what, size, limit


def checked(raw: bytes, what: str, limit: int) -> bytes:
    """`raw`, or RecordTooLarge when a broker would refuse it."""
    if len(raw) > limit:
        raise RecordTooLarge(what, len(raw), limit)
    return raw


def shard_key(partition: int, index: int, slot: int) -> int:
    """The partition-table key of one slot of one shard of `partition`'s archive."""
    return -(1 + partition + (index << _PARTITION_BITS)
             + (slot << (_PARTITION_BITS + _SHARD_BITS)))


def key_partition(key: int) -> int:
    """The partition a partition-table key belongs to (its own number, or its shard's)."""
    return key if key >= 0 else (-key - 1) & ((1 << _PARTITION_BITS) - 1)


def _shard_of(key: tuple[str, tuple[str, ...], tuple[str, str, str]], shards: int) -> int:
    if shards == 1:
        return 0
    name, labels, dims = key
    return zlib.crc32("\x1f".join((name, *labels, *dims)).encode()) % shards


def _encode(agg: Aggregate) -> bytes:
    doc = agg.to_json()
    return dump_state({"series": doc["series"], "histograms": doc["histograms"]})


def load(records: Mapping[int, bytes], partition: int, slots: list[int]) -> list[Aggregate]:
    """The archive's shards as the partition record points at them."""
    shards = []
    for index, slot in enumerate(slots):
        raw = records.get(shard_key(partition, index, slot))
        shards.append(Aggregate.from_json(orjson.loads(raw)) if raw else Aggregate(
            window_sizes=()))
    return shards


def add(records: MutableMapping[int, bytes], partition: int, slots: list[int],
        added: Aggregate, limit: int) -> list[int]:
    """Write the shards `added` changes, each to its free slot; the slots the partition
    record must then point at (the write that makes the change count)."""
    if not added.series and not added.histograms:
        return slots
    count = max(1, len(slots))
    slots = slots or [1]  # the first write of a shard goes to slot 0
    touched = {_shard_of(key, count) for key in (*added.series, *added.histograms)}
    shards = load(records, partition, slots)
    for index in touched:
        _merge_into(shards[index], added, count, index)
    encoded = {index: _encode(shards[index]) for index in touched}
    if any(len(raw) > min(SHARD_BYTES, limit) for raw in encoded.values()):
        return _resplit(records, partition, slots, shards, limit)
    new_slots = list(slots)
    for index, raw in encoded.items():
        new_slots[index] = 1 - slots[index]
        records[shard_key(partition, index, new_slots[index])] = checked(
            raw, f"archive shard {index} of partition {partition}", limit)
    return new_slots


def _merge_into(shard: Aggregate, added: Aggregate, count: int, index: int) -> None:
    part = Aggregate(window_sizes=())
    part.series = {k: v for k, v in added.series.items() if _shard_of(k, count) == index}
    part.histograms = {k: v for k, v in added.histograms.items()
                       if _shard_of(k, count) == index}
    shard.merge(part)


def _resplit(records: MutableMapping[int, bytes], partition: int, slots: list[int],
             shards: list[Aggregate], limit: int) -> list[int]:
    """Every series again, over twice as many shards (or more) until each fits."""
    whole = Aggregate(window_sizes=())
    for shard in shards:
        whole.merge(shard)
    count = len(slots)
    while True:
        count *= 2
        if count > MAX_SHARDS:
            raise RecordTooLarge(f"the archive of partition {partition}",
                                 sum(len(_encode(s)) for s in shards), SHARD_BYTES * MAX_SHARDS)
        split = [Aggregate(window_sizes=()) for _ in range(count)]
        for index in range(count):
            _merge_into(split[index], whole, count, index)
        encoded = [_encode(shard) for shard in split]
        if all(len(raw) <= min(SHARD_BYTES, limit) for raw in encoded):
            break
    new_slots = [1 - slots[index] if index < len(slots) else 0 for index in range(count)]
    for index, raw in enumerate(encoded):
        records[shard_key(partition, index, new_slots[index])] = checked(
            raw, f"archive shard {index} of partition {partition}", limit)
    return new_slots

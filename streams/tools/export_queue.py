"""`acsr-metrics export-queue`: the annotation topic as JSON Lines, for a labelling tool or
an eval set.

Reads every partition from its start (or, with `--group`, from the group's committed
offsets) up to the end it had when the export began, writes one item per line, and with
a group commits the offsets of the lines once they are written and flushed to disk: an
interrupted export resumes where it stopped, and a later run exports only new items.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from streams.config import ConfigError, Settings
from streams.core.annotations import ItemError, decode
from streams.core.events import InvalidEvent, parse_ts
from streams.kafka.broker import BrokerUnavailable
from streams.kafka.reader import POLL_MS, high_watermarks, partition_count, reader
from streams.kafka.security import kafka_client_kwargs


@dataclass
class ExportResult:
    written: int = 0
    before_since: int = 0  # items left out by --since
    not_items: int = 0  # messages on the topic that are no annotation item
    read: int = 0


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "export-queue", help="write the annotation queue to a JSON Lines file")
    parser.add_argument("--broker", help="Kafka bootstrap servers, host:port[,host:port] "
                        "(env ACSR_BROKER)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON Lines file to write")
    parser.add_argument("--since", help="only items whose triggering event time (the item's "
                        "`ts`) is at or after this RFC 3339 time, e.g. 2026-11-22T00:00:00Z")
    parser.add_argument("--group", help="consumer group: resume from, and commit, its offsets "
                        "(the file is appended to); without it the whole topic is written")
    parser.add_argument("--topic", help="annotation topic (env ACSR_ANNOTATION_TOPIC, "
                        "default acsr.annotation.queue)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_since(value: str | None) -> int | None:
    """--since (RFC 3339 with an offset) as epoch microseconds."""
    if value is None:
        return None
    try:
        return parse_ts(value)
    except InvalidEvent:
        raise ConfigError(
            f"--since {value!r} is not an RFC 3339 time with an offset "
            "(e.g. 2026-11-22T00:00:00Z)") from None


async def export_queue(bootstrap: str, topic: str, out: Path, *, since_us: int | None = None,
                       group: str | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       stall_timeout_s: float = 60.0,
                       client: Mapping[str, Any] | None = None) -> ExportResult:
    """Write the topic's items (up to its end at the start) to `out`; see the module doc."""
    result = ExportResult()
    async with reader(bootstrap, group, client) as consumer:
        count = await partition_count(consumer, topic)
        if count == 0:
            raise ConfigError(f"the broker at {bootstrap} has no topic {topic!r} (see --topic)")
        tps = [TopicPartition(topic, p) for p in range(count)]
        ends = await high_watermarks(consumer, tps)
        begins = await consumer.beginning_offsets(tps)
        nexts = {}
        for tp in tps:
            committed = await consumer.committed(tp) if group else None
            nexts[tp] = min(ends[tp], max(committed or 0, begins[tp]))
            consumer.seek(tp, nexts[tp])
        total = sum(ends[tp] - nexts[tp] for tp in tps)
        report = progress or (lambda done, total: None)
        report(0, total)
        last_change = time.monotonic()
        with out.open("ab" if group else "wb") as handle:
            while pending := [tp for tp in tps if nexts[tp] < ends[tp]]:
                batch = await consumer.getmany(*pending, timeout_ms=POLL_MS)
                lines = []
                for tp, records in batch.items():
                    for record in records:
                        if not nexts[tp] <= record.offset < ends[tp]:
                            continue
                        nexts[tp] = record.offset + 1
                        result.read += 1
                        line = _line(record.value, since_us, result)
                        if line is not None:
                            lines.append(line)
                if not batch:
                    if time.monotonic() - last_change > stall_timeout_s:
                        raise BrokerUnavailable(
                            f"no records from {topic} for {stall_timeout_s:.0f}s at "
                            f"{result.read}/{total}")
                    continue
                last_change = time.monotonic()
                handle.write(b"".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
                result.written += len(lines)
                if group:  # only once the lines are on disk: a crash re-exports, never skips
                    await consumer.commit({tp: OffsetAndMetadata(nexts[tp], "")
                                           for tp in batch})
                report(result.read, total)
    return result


def _line(value: bytes | None, since_us: int | None, result: ExportResult) -> bytes | None:
    try:
        item = decode(value)
        ts_us = parse_ts(item["ts"])
    except (ItemError, InvalidEvent):
        result.not_items += 1
        return None
    if since_us is not None and ts_us < since_us:
        result.before_since += 1
        return None
    return (value or b"").rstrip(b"\r\n") + b"\n"


def run_export_command(args: argparse.Namespace, base: Settings) -> int:
    """The CLI command: flags checked first (exit 2), broker trouble is exit 3."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    settings = base.with_overrides(broker=args.broker, annotation_topic=args.topic)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # errors are reported below
    since_us = parse_since(args.since)
    if not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {args.out.parent} does not exist")
    if args.group is not None and not args.group.strip():
        raise ConfigError("--group must not be empty")
    with Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(),
                  disable=args.quiet, transient=True) as bar:
        task = bar.add_task("export", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = asyncio.run(export_queue(
                settings.bootstrap_servers, settings.annotation_topic, args.out,
                since_us=since_us, group=args.group, progress=progress,
                client=kafka_client_kwargs(settings)))
        except (KafkaError, OSError, TimeoutError) as err:
            if isinstance(err, OSError) and err.filename:
                raise ConfigError(f"cannot write {err.filename}: {err.strerror}") from None
            raise BrokerUnavailable(f"{settings.bootstrap_servers}: {err}") from None
    notes = []
    if result.before_since:
        notes.append(f"{result.before_since} before --since")
    if result.not_items:
        notes.append(f"{result.not_items} not annotation items")
    extra = f" ({', '.join(notes)} left out)" if notes else ""
    print(f"exported {result.written} items{extra} -> {args.out}", file=sys.stderr)
    return 0

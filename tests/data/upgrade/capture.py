#!/usr/bin/env python3
"""Capture every topic of one replay run, written by the code on PYTHONPATH, for the
stored-format upgrade test (tests/test_upgrade.py).

    git worktree add /tmp/pre20 5b22a3a     # the code whose formats are to be kept
    PYTHONPATH=/tmp/pre20 .venv/bin/python tests/data/upgrade/capture.py tests/data/upgrade
    PYTHONPATH=/tmp/pre20 .venv/bin/python tests/data/upgrade/capture.py --expire \
        tests/data/upgrade/expiry
    (from the repository's root)

Run ONCE, with the code whose stored formats are to be kept readable (here 5b22a3a, the
last commit before streams/ was split into sub-packages). Never run it again with newer
code: the point of the files is that they were written by the old code.

What it does: an embedded broker (Tansu); settings of an isolated run (`isolated`, 4
partitions, the replay's window retention so every window of the file is kept, batches of
at most 250 events so that partition records, cases and window cells are written several
times); the topics; the bundled sample (tests/data/sample/events.jsonl) produced as
`replay` does; 2 workers (`Cluster`) until every event and link is processed; the report
their tables give (`build_report(gather_aggregates(...))`, checked against the worked
example's expected report); the group's committed offsets; the workers stopped; then EVERY
record of EVERY topic of the run (events, dead letters, links, annotation queue, windows,
every Faust changelog and internal topic: whatever the broker lists under the run's prefix
or app id), with partition, offset, timestamp, key, value and headers.

`--expire`: cases are kept 45 h of event time after their last event instead of 7 days
(the sample spans 50 h), so the hourly sweep folds some: a partition record with a fold
and an archive shard, and the folded cases' tombstones. (Shorter, 30 h or 40 h, and some
re-engagements arrive after their earlier case expired: the FCR figures then differ from
the worked example's.) A folded case no longer holds the offsets of its events, so its
events read again would count again: the test resumes that capture at the committed
offsets, as an upgrade does, and reads the other one again from the start.

Writes OUTDIR/topics.json.gz (format: `FORMAT`, `doc` below) and OUTDIR/expected-report.json
(not `report.json`: .gitignore leaves out `report*.json`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

FORMAT = 1
WORKERS = 2
PARTITIONS = 4
BATCH_MAX = 250  # several batch markers per partition record, cases written several times
EXPIRE_CASE_RETENTION_S = 45 * 3600  # --expire (docstring)
HERE = Path(__file__).resolve().parent
TESTS_DATA = HERE.parent
SAMPLE = TESTS_DATA / "sample" / "events.jsonl"
EXPECTED_REPORT = TESTS_DATA / "sample" / "expected-report.json"
POLL_MS = 200


def b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def frozen_code_root() -> Path:
    """The checkout whose `streams` this run imports; refuses anything but PYTHONPATH's."""
    import streams

    root = Path(streams.__file__).resolve().parent.parent
    wanted = [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in wanted:
        sys.exit(f"streams is imported from {root}, not from PYTHONPATH {wanted}: "
                 "run with PYTHONPATH=<worktree of the old commit>")
    return root


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


async def read_topic(bootstrap: str, topic: str, client: dict[str, Any]
                     ) -> dict[str, list[list[Any]]]:
    """Every record of every partition of `topic`, in offset order:
    [offset, timestamp_ms, key_b64|null, value_b64|null, [[header, value_b64], ...]].

    End offsets come from fetch responses (Tansu's ListOffsets can answer short)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=POLL_MS,
                                **client)
    await consumer.start()
    try:
        partitions = None
        deadline = time.monotonic() + 30
        while not partitions:
            assert time.monotonic() < deadline, f"no metadata for {topic}"
            if topic in await consumer.topics():  # a metadata request for every topic
                partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: dict[TopicPartition, list[Any]] = {tp: [] for tp in tps}
        ends: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, f"{topic}: could not read to the end"
            batch = await consumer.getmany(timeout_ms=POLL_MS)
            for tp, got in batch.items():
                records[tp].extend(got)
            for tp in tps:
                high = consumer.highwater(tp)
                if high is not None:
                    ends[tp] = high
            if len(ends) == len(tps) and all(
                    [await consumer.position(tp) >= ends[tp] for tp in tps]):
                break
        out: dict[str, list[list[Any]]] = {}
        for tp in tps:
            rows = records[tp]
            offsets = [r.offset for r in rows]
            # Contiguous from 0: the test reproduces the offsets by producing in order.
            assert offsets == list(range(ends[tp])), (
                f"{tp.topic}[{tp.partition}]: offsets are not 0..{ends[tp] - 1}")
            out[str(tp.partition)] = [
                [r.offset, r.timestamp, b64(r.key), b64(r.value),
                 [[name, b64(value)] for name, value in (r.headers or ())]]
                for r in rows
            ]
        return out
    finally:
        await consumer.stop()


def load_compare() -> Any:
    spec = importlib.util.spec_from_file_location("compare_report",
                                                  TESTS_DATA / "compare_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def capture(out_dir: Path, work: Path, expire: bool) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    import streams
    from streams.broker import EmbeddedBroker
    from streams.config import Settings
    from streams.kpis import build_report
    from streams.replay import (
        REPLAY_WINDOW_RETENTION_S,
        Cluster,
        committed,
        create_topics,
        gather_aggregates,
        group_offsets,
        isolated,
        load_lines,
        read_lines,
        wait_processed,
    )
    from streams.security import kafka_client_kwargs

    code = frozen_code_root()
    case_retention_s = EXPIRE_CASE_RETENTION_S if expire else Settings().case_retention_s
    lines = read_lines(SAMPLE)
    run = uuid.uuid4().hex[:8]
    started = time.monotonic()
    with EmbeddedBroker() as broker:
        settings = isolated(
            Settings().with_overrides(
                partitions=PARTITIONS, window_retention_s=REPLAY_WINDOW_RETENTION_S,
                case_retention_s=case_retention_s, batch_max=BATCH_MAX,
                data_dir=str(work / "data"),
            ).for_embedded(broker.bootstrap),
            run,
        )
        client = kafka_client_kwargs(settings)
        await create_topics(settings)
        cluster = Cluster(settings, WORKERS, work / "logs")
        cluster.start()
        try:
            ends = await load_lines(settings, lines, lambda n: None)
            print(f"produced {len(lines)} events: ends {ends}", flush=True)
            await wait_processed(cluster, settings.bootstrap_servers, ends, lambda d: None,
                                 stall_timeout_s=300)
            report = build_report(await gather_aggregates(cluster, settings.partitions,
                                                          timeout_s=180),
                                  settings.report_window_s)
        finally:
            cluster.stop()
        # Where the stopped group left its topics: an upgraded worker resumes there.
        async with group_offsets(settings.bootstrap_servers, settings.app_id,
                                 client) as consumer:
            group = {topic: await committed(consumer, topic, settings.partitions)
                     for topic in (settings.events_topic, settings.links_topic)}
        print(f"processed in {time.monotonic() - started:.0f}s; workers stopped", flush=True)
        mismatches: list[str] = []
        load_compare().walk(json.loads(EXPECTED_REPORT.read_text()), report, "", mismatches,
                            set())
        if mismatches:
            sys.exit("the run's report differs from the worked example's:\n"
                     + "\n".join(mismatches[:20]))

        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client)
        await admin.start()
        try:
            listed = sorted(await admin.list_topics())
        finally:
            await admin.close()
        prefix = settings.events_topic.removesuffix(".events")
        ours = [t for t in listed if t.startswith((prefix + ".", settings.app_id))]
        others = [t for t in listed if t not in ours]
        assert not others, f"topics of no run of ours on a fresh broker: {others}"
        topics = {}
        for topic in ours:
            topics[topic] = await read_topic(settings.bootstrap_servers, topic, client)
            counts = {p: len(rows) for p, rows in topics[topic].items()}
            print(f"{topic}: {counts}", flush=True)

    # What the settings above are for: check the capture holds it.
    records = topics[f"{settings.app_id}-partitions-changelog"]
    folds = [json.loads(base64.b64decode(row[3])).get("fold_id", 0)
             for rows in records.values() for row in rows
             if row[3] is not None and int(base64.b64decode(row[2])) >= 0]
    tombstones = sum(row[3] is None for rows in topics[f"{settings.app_id}-cases-changelog"]
                     .values() for row in rows)
    markers = max(len(rows) for rows in records.values())
    if markers < 2 or (max(folds) > 0) != expire or bool(tombstones) != expire:
        sys.exit(f"folds {max(folds)}, expired cases {tombstones}, batches per partition "
                 f"{markers}: not what the settings are for, run again")
    for topic, offsets in group.items():
        short = {p: (offsets[p], len(rows)) for p, rows in topics[topic].items()
                 if offsets[int(p)] != len(rows)}
        assert not short, f"{topic}: committed offsets short of the end {short}"

    named = ("app_id", "events_topic", "dlq_topic", "links_topic", "annotation_topic",
             "windows_topic", "repartition_topic", "partitioner", "partitions",
             "window_sizes_s", "window_grace_s", "window_retention_s", "case_retention_s",
             "report_window_s", "sample_resolved_rate", "max_clock_skew_s", "label_limit",
             "batch_max")
    doc = {
        "format": FORMAT,
        "about": "Every record of every topic of one replay run of tests/data/sample/"
                 "events.jsonl (2 workers, 4 partitions, embedded broker"
                 + (", cases expiring after 45 h" if expire else "") + "), written by the "
                 "commit below through tests/data/upgrade/capture.py. Never regenerate it "
                 "with newer code: tests/test_upgrade.py recovers it with the current code.",
        "written_by": {
            "commit": git(code, "rev-parse", "HEAD"),
            "subject": git(code, "log", "-1", "--format=%s"),
            "version": streams.__version__,
            "python": platform.python_version(),
            "broker": "embedded (Tansu)",
            "captured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "sample": {"path": "tests/data/sample/events.jsonl", "lines": len(lines),
                   "sha256": hashlib.sha256(SAMPLE.read_bytes()).hexdigest()},
        "run": run,
        "prefix": prefix,
        "workers": WORKERS,
        "settings": {name: getattr(settings, name) for name in named},
        "produced_ends": {str(p): end for p, end in sorted(ends.items())},
        "expired_cases": tombstones,
        # The group's committed offsets once the workers stopped (each topic's end).
        "committed": {topic: {str(p): offset for p, offset in sorted(offsets.items())}
                      for topic, offsets in group.items()},
        "record_fields": ["offset", "timestamp_ms", "key_b64", "value_b64",
                          "headers [[name, value_b64]]"],
        "topics": topics,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    # mtime=0: the same capture gives the same bytes.
    (out_dir / "topics.json.gz").write_bytes(gzip.compress(raw, 9, mtime=0))
    (out_dir / "expected-report.json").write_text(
        json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out_dir}/topics.json.gz ({len(raw):,} bytes of JSON) and "
          "expected-report.json")


def main() -> None:
    args = sys.argv[1:]
    expire = "--expire" in args
    args = [arg for arg in args if arg != "--expire"]
    if len(args) != 1:
        sys.exit(__doc__)
    out_dir = Path(args[0]).resolve()
    frozen_code_root()
    work = Path(tempfile.mkdtemp(prefix="acsr-capture-"))
    # Workers run `python -m streams.cli`, which puts the working directory first on
    # sys.path: an empty one, so they import PYTHONPATH's (the old) code, as we do.
    os.chdir(work)
    asyncio.run(capture(out_dir, work, expire))
    shutil.rmtree(work)  # kept (worker logs) when the capture failed


if __name__ == "__main__":
    main()

"""`acsr-metrics replay`: a JSON Lines file through the real pipeline, then the report.

The file's lines go to the events topic keyed by `case_id`; N worker processes in one
consumer group process them; once the group has committed every offset of the events
and links topics, each worker's per-partition aggregates are fetched and summed. The
report is read off the workers' tables: the CLI computes no figure of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streams.config import Settings
from streams.core.events import message_key
from streams.core.kpis import Aggregate, build_report
from streams.kafka.broker import (
    ONE_RECORD_BATCH_BYTES,
    EmbeddedBroker,
    ensure_topics,
    free_port,
    stop_process,
)
from streams.kafka.partitioners import MURMUR2, ClientPartitioner
from streams.kafka.reader import high_watermarks, reader
from streams.kafka.security import kafka_client_kwargs
from streams.metrics.exporter import merge_expositions, metric_sums

REPLAY_WINDOW_RETENTION_S = 366 * 86_400
SETTLED_S = 2.0  # how long the group's view must hold still before it is the report


class ReplayError(RuntimeError):
    """The replay could not finish; the message says why and what to look at."""


def read_lines(path: Path) -> list[bytes]:
    """Non-blank lines of a JSON Lines file, as message values."""
    try:
        with path.open("rb") as handle:
            return [line.rstrip(b"\r\n") for line in handle if line.strip()]
    except OSError as err:
        raise ReplayError(f"cannot read {path}: {err.strerror}") from None


def proc_status_kb(text: str) -> dict[str, int]:
    """The memory lines (VmRSS, VmHWM, ...) of a `/proc/<pid>/status`, in kB."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if name.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0])
    return out


@dataclass
class WorkerProcess:
    """One `acsr-metrics worker` subprocess with its own web port and log file."""

    index: int
    settings: Settings
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web_port}"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.settings.to_env())
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # stopped in order by us, not by the terminal's Ctrl-C
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s)

    def memory_kb(self) -> dict[str, int]:
        """Its memory lines of /proc/<pid>/status (VmRSS, VmHWM, ...); empty once gone."""
        if self.process is None:
            return {}
        try:
            return proc_status_kb(Path(f"/proc/{self.process.pid}/status").read_text())
        except OSError:
            return {}

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    """The workers of one consumer group, started together."""

    settings: Settings
    count: int
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            self.add_worker(index)

    def add_worker(self, index: int, web_port: int | None = None) -> WorkerProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        worker = WorkerProcess(
            index,
            self.settings.with_overrides(web_port=web_port or free_port()),
            self.log_dir / f"worker-{index}.log",
        )
        worker.start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop()

    def check_alive(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() not in (None, 0, -9, -15):
                raise ReplayError(
                    f"worker {worker.index} exited with {worker.process.returncode}; "
                    f"its log ({worker.log_path}) ends with:\n{worker.log_tail()}"
                )

    def running(self) -> list[WorkerProcess]:
        return [worker for worker in self.workers if worker.alive()]


async def produce(bootstrap: str, topic: str, lines: list[bytes], tansu: bool,
                  on_sent: Callable[[int], None] | None = None,
                  client: dict[str, Any] | None = None,
                  partitioner: str = MURMUR2) -> dict[int, int]:
    """Send each line keyed by its `case_id`, placed as `partitioner` places keys; return
    the end offset of every partition."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=not tansu,
        max_batch_size=ONE_RECORD_BATCH_BYTES if tansu else 16384, linger_ms=5,
        partitioner=ClientPartitioner(partitioner), **(client or {}),
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        pending = []
        for line in lines:
            pending.append(await producer.send(topic, line, key=message_key(line)))
            if len(pending) >= 1000:
                _record_ends(ends, await asyncio.gather(*pending))
                if on_sent:
                    on_sent(len(pending))
                pending = []
        _record_ends(ends, await asyncio.gather(*pending))
        if on_sent:
            on_sent(len(pending))
    finally:
        await producer.stop()
    return ends


def _record_ends(ends: dict[int, int], metadata: list[Any]) -> None:
    for meta in metadata:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)


@contextlib.asynccontextmanager
async def group_offsets(bootstrap: str, group: str, client: dict[str, Any] | None = None
                        ) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, **(client or {}))
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def committed(consumer: AIOKafkaConsumer, topic: str, partitions: int) -> dict[int, int]:
    out = {}
    for partition in range(partitions):
        offset = await consumer.committed(TopicPartition(topic, partition))
        out[partition] = offset if offset is not None else 0
    return out


async def end_offsets(bootstrap: str, client: dict[str, Any], topic: str, partitions: int
                      ) -> dict[int, int]:
    """From fetch responses: the embedded broker's ListOffsets can answer short (workers
    write in multi-record batches, streams/faust_patches/tables.py)."""
    async with reader(bootstrap, client=client) as fetcher:
        found = await high_watermarks(fetcher, [TopicPartition(topic, p)
                                                for p in range(partitions)])
    return {tp.partition: offset for tp, offset in found.items()}


async def wait_processed(cluster: Cluster, bootstrap: str, ends: dict[int, int],
                         on_progress: Callable[[int], None], stall_timeout_s: float) -> None:
    """Return once the group has committed every event and every link it produced."""
    settings = cluster.settings
    total = sum(ends.values())
    last_done, last_change = -1, time.monotonic()
    client = kafka_client_kwargs(settings)
    async with group_offsets(bootstrap, settings.app_id, client) as consumer:
        while True:
            cluster.check_alive()
            done_events = await committed(consumer, settings.events_topic, settings.partitions)
            done = sum(min(done_events[p], end) for p, end in ends.items())
            on_progress(done)
            if done >= total and await internal_topics_done(consumer, bootstrap, settings):
                return
            if done != last_done:
                last_done, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > stall_timeout_s:
                logs = "\n".join(f"--- worker {w.index} ({w.log_path}):\n{w.log_tail()}"
                                 for w in cluster.workers)
                raise ReplayError(
                    f"no progress for {stall_timeout_s:.0f}s at {done}/{total} events; "
                    f"worker logs:\n{logs}"
                )
            await asyncio.sleep(0.5)


async def internal_topics_done(consumer: AIOKafkaConsumer, bootstrap: str,
                               settings: Settings) -> bool:
    """Whether the group committed the end of the re-keyed events, then of the links (read
    in that order: the first feeds the second)."""
    client = kafka_client_kwargs(settings)
    topics = [settings.cases_topic] if settings.repartitions else []
    for topic in [*topics, settings.links_topic]:
        ends = await end_offsets(bootstrap, client, topic, settings.partitions)
        done = await committed(consumer, topic, settings.partitions)
        if any(done[p] < end for p, end in ends.items()):
            return False
    return True


async def gather_metrics(cluster: Cluster, report: dict[str, Any], timeout_s: float = 60.0
                         ) -> tuple[str, int]:
    """The group's exposition (from the worker that exports it, once it holds what the
    report counts), then every worker's own /metrics summed; and the `acsr_` samples
    Prometheus scrapes from the group (the group's once, each worker's own)."""
    deadline = time.monotonic() + timeout_s
    wanted = _exposition_counts(report)
    found: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < deadline:
            group, own = "", []
            for worker in cluster.running():
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(f"{worker.url}/metrics/group") as response:
                        text = await response.text()
                        group = text if text.strip() else group
                    async with session.get(f"{worker.url}/metrics") as response:
                        own.append(await response.text())
            if group and (found := metric_sums(group, wanted)) == wanted:
                scraped = sum(line.startswith("acsr_") for text in (group, *own)
                              for line in text.splitlines())
                return group + merge_expositions(own), scraped
            await asyncio.sleep(0.5)
    raise ReplayError(f"the group's exposition never showed the report's counts {wanted} "
                      f"(last seen: {found or 'no exporter'})")


def _exposition_counts(report: dict[str, Any]) -> dict[str, float]:
    events = report["events"]
    return {"acsr_events_total": events["valid"], "acsr_events_invalid_total": events["invalid"],
            "acsr_events_duplicate_total": events["duplicate"],
            "acsr_cases_concluded_total": report["totals"]["cases_concluded"]}


async def gather_aggregates(cluster: Cluster, partitions: int, timeout_s: float = 60.0
                            ) -> Aggregate:
    """Sum the workers' partition aggregates, once every partition is owned exactly once
    and the group has settled: the same owners and figures for SETTLED_S in a row. A group
    that just processed the last event may still be rebalancing (a worker joined or
    left), and a view read mid-way could hold a partition whose owner has not yet read
    the last writes of the one before."""
    deadline = time.monotonic() + timeout_s
    problem = "no worker answered"
    seen: tuple[Any, float] | None = None  # a complete view, and since when it holds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < deadline:
            snapshots = []
            try:
                for worker in cluster.running():
                    async with session.get(f"{worker.url}/kpis/") as response:
                        snapshots.append(await response.json())
            except (TimeoutError, aiohttp.ClientError) as err:
                problem = f"a worker did not answer: {err}"
                seen = None
                await asyncio.sleep(0.5)
                continue
            owned = [p for snap in snapshots if not snap["recovering"] for p in snap["owned"]]
            if sorted(owned) != list(range(partitions)):
                problem = (f"partitions owned {sorted(owned)}, expected each of "
                           f"0..{partitions - 1} once")
                seen = None
                await asyncio.sleep(0.5)
                continue
            docs = {key: doc for snap in snapshots for key, doc in snap["partitions"].items()
                    if int(key) in snap["owned"]}
            view = orjson.dumps([sorted(snap["owned"]) for snap in snapshots] + [docs],
                                option=orjson.OPT_SORT_KEYS)
            now = time.monotonic()
            if seen is None or seen[0] != view:
                seen = (view, now)
            elif now - seen[1] >= SETTLED_S:
                return Aggregate.sum_of(docs.values(), cluster.settings.window_sizes_s)
            problem = "the group did not settle (owners or figures kept changing)"
            await asyncio.sleep(0.5)
    raise ReplayError(f"could not gather the workers' tables: {problem}")


def isolated(settings: Settings, run: str) -> Settings:
    """Topics and a consumer group of one run only, so a shared cluster's data never mixes."""
    prefix = f"acsr.replay-{run}"
    return settings.with_overrides(
        app_id=f"acsr-replay-{run}", events_topic=f"{prefix}.events",
        repartition_topic=f"{prefix}.events.by-case",
        dlq_topic=f"{prefix}.events.dlq", links_topic=f"{prefix}.case-links",
        annotation_topic=f"{prefix}.annotation.queue", windows_topic=f"{prefix}.kpi.windows",
        group_topic=f"{prefix}.kpi.group",
    )


async def create_topics(settings: Settings) -> None:
    await ensure_topics(settings.bootstrap_servers, settings.topics, settings.replication_factor,
                        settings.broker_wait_s, kafka_client_kwargs(settings),
                        settings.topic_configs)


# Sends the lines to the events topic; returns the end offset of every partition.
Loader = Callable[[Settings, list[bytes], Callable[[int], None]], Awaitable[dict[int, int]]]


async def load_lines(settings: Settings, lines: list[bytes], on_sent: Callable[[int], None]
                     ) -> dict[int, int]:
    """Our own producer, placing each case as ACSR_PARTITIONER says the producers do."""
    return await produce(settings.bootstrap_servers, settings.events_topic, lines,
                         settings.tansu, on_sent, kafka_client_kwargs(settings),
                         settings.partitioner)


@dataclass
class ReplayResult:
    report: dict[str, Any]
    lines: int
    seconds: float
    timings: dict[str, float]
    settings: Settings
    metrics: str = ""
    scraped_samples: int = 0  # `acsr_` samples Prometheus scrapes from the group


async def run_replay(
    path: Path,
    settings: Settings,
    workers: int = 1,
    start_broker: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    stall_timeout_s: float = 120.0,
    log_dir: Path | None = None,
    load: Loader = load_lines,
) -> ReplayResult:
    """Replay `path` through `workers` worker processes, on an embedded broker or
    `settings.broker`, in topics and a consumer group of this run only. `load` sends the
    lines (e.g. with another client, as a producer team would)."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    lines = read_lines(path)
    report_progress = progress or (lambda stage, done, total: None)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="acsr-replay-"))
    run = uuid.uuid4().hex[:8]
    # The report lists every window of the file: none may reach its retention meanwhile.
    settings = settings.with_overrides(
        window_retention_s=max(settings.window_retention_s, REPLAY_WINDOW_RETENTION_S))
    broker: EmbeddedBroker | None = None
    if start_broker:
        broker = EmbeddedBroker().start()
        settings = settings.for_embedded(broker.bootstrap)
    else:
        settings = isolated(settings, run)
    timings["broker_start_s"] = time.monotonic() - started
    cluster = Cluster(settings, workers, log_dir)
    try:
        await create_topics(settings)
        cluster.start()
        sent = 0

        def on_sent(n: int) -> None:
            nonlocal sent
            sent += n
            report_progress("produce", sent, len(lines))

        t0 = time.monotonic()
        ends = await load(settings, lines, on_sent)
        timings["produce_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        await wait_processed(cluster, settings.bootstrap_servers, ends,
                             lambda done: report_progress("process", done, len(lines)),
                             stall_timeout_s)
        timings["process_s"] = time.monotonic() - t0
        aggregate = await gather_aggregates(cluster, settings.partitions)
        report = build_report(aggregate, settings.report_window_s)
        metrics, scraped = await gather_metrics(cluster, report)
    except KafkaError as err:
        raise ReplayError(f"broker error: {err}") from None
    finally:
        cluster.stop()
        if broker is not None:
            broker.stop()
    return ReplayResult(report, len(lines), time.monotonic() - started, timings, settings,
                        metrics, scraped)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())

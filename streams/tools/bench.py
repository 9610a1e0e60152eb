"""`acsr-metrics bench`: how fast one worker processes events, against what the broker
and a bare consumer allow, and what it costs in latency and memory.

One run, on the embedded broker (or `--broker`), every topic and consumer group its own:

1. N simulator events (deterministic: same seed, same events) are loaded into a fresh
   events topic; loading is not measured. Before that, the pure core (parsing and the
   ledger, no broker) is timed on the first 20,000 against orjson's decode of the same
   lines, `--repeats` times (streams/tools/core_bench.py; `--no-core` skips it).
2. Throughput, `--repeats` times side by side: (a) the raw ceiling, a bare consumer that
   reads and decodes every event and counts it by type; (b) one real worker (or
   `--workers N` in one group, to measure scale-out), from the first processed event
   (start, group join and the first batch's one-off costs are excluded) until the
   consumer group has committed every offset. Each repeat uses a consumer group of its
   own. A run too small to outlast its first batch is measured from the moment the group
   owned every partition instead, start costs included. Then (c) the exposition: the
   `acsr_` samples the group's /metrics hold, and how long an idle scrape takes. With
   `--processes-compare`, (d) `worker --processes 2` (one supervisor, two processes) on
   the same events in a group of its own, against that repeat's one-process run.
3. Latency: a fresh, warmed-up worker fed at half the median worker rate; an event's
   latency runs from its send to the first /metrics scrape whose event counters cover it.
4. Memory: a fresh, warmed-up worker's RSS before and after N distinct cases are opened;
   the case retention (event time) is what bounds the number of open cases.

Before all of that, and before the broker starts: the backfill (`acsr-metrics backfill`,
no broker) on an archive of `--backfill-events` simulator events, `--repeats` times beside
orjson's decode of the same lines; its rate and the OpenMetrics it writes per day of event
time (streams/tools/backfill_bench.py; `--no-backfill` skips it). Then the OTLP bridge's
spans a second through decode, map and contract check, no broker either, in both
encodings; once the broker is up, the real bridge's spans a second through it, on topics
and a consumer group of each run's own (streams/tools/otel_bench.py; `--no-otel` skips
both).

The last stdout line is `bench: processor X ev/s, raw ceiling Y ev/s, ratio Z`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from streams.config import ConfigError, Settings
from streams.core.state_bytes import dump_state, exact_size
from streams.kafka.broker import BrokerUnavailable, EmbeddedBroker
from streams.kafka.partitioners import REPARTITION
from streams.kafka.publisher import Publisher, build_event
from streams.kafka.reader import reader
from streams.kafka.security import kafka_client_kwargs
from streams.metrics.exporter import metric_sums
from streams.tools.backfill_bench import EVENTS as BACKFILL_EVENTS
from streams.tools.backfill_bench import backfill_line, measure_backfill
from streams.tools.core_bench import measure_core
from streams.tools.otel_bench import MESSAGES as OTEL_MESSAGES
from streams.tools.otel_bench import measure_otel, otel_broker_benchmark, otel_line
from streams.tools.replay import (
    Cluster,
    ReplayError,
    WorkerProcess,
    committed,
    create_topics,
    group_offsets,
    internal_topics_done,
    isolated,
    produce,
    wait_processed,
)
from streams.tools.simulate import SCENARIOS, Simulation
from streams.tools.supervised import SupervisedCluster

# Simulated traffic: 1000 msg/s at 60x time puts 500,000 events over about 8 simulated
# hours, so cases conclude, feedback arrives and hourly windows close.
START_MS = 1_795_352_400_000  # 2026-11-22T13:00:00Z: where the simulated clock starts
SIM_RATE = 1000.0
SIM_SPEED = 60.0
INVALID_SHARE = 0.003  # the dead-letter path stays exercised
DUPLICATE_SHARE = 0.003
POLL_S = 0.1  # throughput: how often the worker's progress is read
COMMIT_S = 0.1  # the workers' commit interval in the bench (the default is 1 s)
LATENCY_BATCH_BYTES = 16_384  # the latency run's producer batches (aiokafka's default)
EXPOSITION_SCRAPES = 5  # /metrics scrapes per worker timed after each throughput run
GROUP_PATH = "/metrics/group"  # the group's figures (streams/worker/group.py)
SCRAPE_BUSY_WARNING = 0.2  # warn when a scrape was in flight this share of the latency run
SLICE_S = 0.1  # latency: events are sent in one slice per SLICE_S
SETTLE_S = 1.0  # memory: wait before reading RSS so the worker is idle
PROGRESS_S = 5.0  # seconds between progress lines
RAW_MAX_RECORDS = 100_000
UNDECODABLE = "<undecodable>"  # raw ceiling: a value that is not JSON
UNTYPED = "<untyped>"  # raw ceiling: JSON without a string `type`
# Counters that together count every message a worker has processed.
PROCESSED_METRICS = ("acsr_events_total", "acsr_events_invalid_total",
                     "acsr_events_duplicate_total")
PROCESSES_COMPARED = 2  # --processes-compare: `worker --processes 2` against one process

Say = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    events: int = 500_000
    partitions: int = 4
    repeats: int = 3
    workers: int = 1  # in the processor's consumer group
    latency_s: float = 30.0
    open_cases: int = 100_000
    latency: bool = True
    memory: bool = True
    repartition: bool = True  # also each repeat with ACSR_PARTITIONER=repartition
    core: bool = True  # the pure core against orjson's decode (streams/tools/core_bench.py)
    processes_compare: bool = False  # also each repeat with `worker --processes 2`
    backfill: bool = True  # the backfill's rate (streams/tools/backfill_bench.py)
    backfill_events: int = BACKFILL_EVENTS
    otel: bool = True  # the OTLP bridge's rate (streams/tools/otel_bench.py)
    otel_messages: int = OTEL_MESSAGES
    seed: int = 1
    scrape_s: float = 1.0  # latency: how often /metrics is scraped (a scrape costs ~0.1 s)
    stall_timeout_s: float = 120.0
    out: Path = Path("bench-results.json")
    broker: str | None = None  # None: an embedded broker of the run's own
    tansu: bool = False  # `broker` is Tansu: apply its workarounds


# --- the command line -------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`acsr-metrics bench`."""
    bench = commands.add_parser(
        "bench", help="measure worker throughput, latency and memory on a fresh topic",
        description="Throughput of one worker against a bare consumer (the raw ceiling), "
        "event-to-metric latency and memory per open case. Without --broker it runs on "
        "its own embedded broker.")
    defaults = BenchOptions()
    bench.add_argument("--broker", help="an existing broker, host:port[,host:port] "
                       "(default: start an embedded one)")
    bench.add_argument("--tansu", action="store_true",
                       help="the --broker is Tansu (the embedded broker): apply its workarounds")
    bench.add_argument("--events", type=int, default=defaults.events,
                       help=f"events for the throughput runs (default {defaults.events})")
    bench.add_argument("--partitions", type=int, default=defaults.partitions,
                       help=f"partitions of the events topic (default {defaults.partitions})")
    bench.add_argument("--repeats", type=int, default=defaults.repeats,
                       help=f"throughput runs of each kind (default {defaults.repeats})")
    bench.add_argument("--workers", type=int, default=defaults.workers,
                       help="workers in the processor's consumer group, to measure scale-out "
                       f"(default {defaults.workers}: the throughput of one worker)")
    bench.add_argument("--latency-seconds", type=float, default=defaults.latency_s,
                       help=f"length of the latency run (default {defaults.latency_s:g})")
    bench.add_argument("--open-cases", type=int, default=defaults.open_cases,
                       help=f"cases opened for the memory run (default {defaults.open_cases})")
    bench.add_argument("--no-latency", action="store_true", help="skip the latency run")
    bench.add_argument("--no-memory", action="store_true", help="skip the memory run")
    bench.add_argument("--no-repartition", action="store_true",
                       help="skip the runs with ACSR_PARTITIONER=repartition (what re-keying "
                       "every event through an internal topic costs)")
    bench.add_argument("--no-core", action="store_true",
                       help="skip timing the pure core (parse and ledger, no broker) against "
                       "orjson's decode of the same events")
    bench.add_argument("--no-backfill", action="store_true",
                       help="skip timing `acsr-metrics backfill` (no broker) on an archive of "
                       "simulator events against orjson's decode of the same lines")
    bench.add_argument("--backfill-events", type=int, default=defaults.backfill_events,
                       help="events in the backfill's archive (default "
                       f"{defaults.backfill_events})")
    bench.add_argument("--no-otel", action="store_true",
                       help="skip timing the OTLP bridge (decode, map and contract check of "
                       "spans, no broker; then the real bridge through the broker)")
    bench.add_argument("--otel-messages", type=int, default=defaults.otel_messages,
                       help="OTLP messages of 100 spans the bridge's timings take in each "
                       f"encoding, in process and through the broker (default "
                       f"{defaults.otel_messages})")
    bench.add_argument("--processes-compare", action="store_true",
                       help=f"also run `worker --processes {PROCESSES_COMPARED}` in each repeat "
                       "(a supervisor and its processes, the same events, a group of its "
                       "own): its rate against the one-process run's")
    bench.add_argument("--seed", type=int, default=defaults.seed,
                       help=f"simulator seed: same seed, same events (default {defaults.seed})")
    bench.add_argument("--scrape-interval", type=float, default=defaults.scrape_s,
                       help="seconds between /metrics scrapes in the latency run (default "
                       f"{defaults.scrape_s:g}); a scrape costs the worker time, see the "
                       "scrape figures in the results")
    bench.add_argument("--stall-timeout", type=float, default=defaults.stall_timeout_s,
                       help="fail when a worker makes no progress for this many seconds "
                       f"(default {defaults.stall_timeout_s:g})")
    bench.add_argument("--out", type=Path, default=defaults.out,
                       help=f"where to write the results as JSON (default {defaults.out})")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The options, checked before anything starts; ConfigError says what to fix."""
    if args.events <= 0:
        raise ConfigError(f"--events must be > 0, got {args.events}")
    if args.partitions <= 0:
        raise ConfigError(f"--partitions must be > 0, got {args.partitions}")
    if args.repeats <= 0:
        raise ConfigError(f"--repeats must be > 0, got {args.repeats}")
    if not 0 < args.workers <= args.partitions:
        raise ConfigError(f"--workers must be 1 to --partitions ({args.partitions}), got "
                          f"{args.workers}: a worker without a partition is idle")
    if not args.no_latency and not args.latency_seconds > 0:
        raise ConfigError(f"--latency-seconds must be > 0, got {args.latency_seconds:g} "
                          "(or skip the run with --no-latency)")
    if not args.no_memory and args.open_cases <= 0:
        raise ConfigError(f"--open-cases must be > 0, got {args.open_cases} "
                          "(or skip the run with --no-memory)")
    if not args.no_backfill and args.backfill_events <= 0:
        raise ConfigError(f"--backfill-events must be > 0, got {args.backfill_events} "
                          "(or skip the run with --no-backfill)")
    if not args.no_otel and args.otel_messages <= 0:
        raise ConfigError(f"--otel-messages must be > 0, got {args.otel_messages} "
                          "(or skip the run with --no-otel)")
    if not args.scrape_interval > 0:
        raise ConfigError(f"--scrape-interval must be > 0 seconds, got {args.scrape_interval:g}")
    if not args.stall_timeout > 0:
        raise ConfigError(f"--stall-timeout must be > 0 seconds, got {args.stall_timeout:g}")
    if args.processes_compare and (args.workers != 1 or args.partitions < PROCESSES_COMPARED):
        raise ConfigError(f"--processes-compare compares {PROCESSES_COMPARED} processes with "
                          f"one worker: it needs --workers 1 and --partitions >= "
                          f"{PROCESSES_COMPARED}")
    if args.tansu and not args.broker:
        raise ConfigError("--tansu describes a --broker; without one the embedded broker "
                          "is used and its workarounds apply anyway")
    parent = args.out.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {parent} does not exist")
    return BenchOptions(events=args.events, partitions=args.partitions, repeats=args.repeats,
                        workers=args.workers,
                        latency_s=args.latency_seconds, open_cases=args.open_cases,
                        latency=not args.no_latency, memory=not args.no_memory,
                        repartition=not args.no_repartition, core=not args.no_core,
                        processes_compare=args.processes_compare,
                        backfill=not args.no_backfill, backfill_events=args.backfill_events,
                        otel=not args.no_otel, otel_messages=args.otel_messages,
                        seed=args.seed, scrape_s=args.scrape_interval,
                        stall_timeout_s=args.stall_timeout, out=args.out,
                        broker=args.broker, tansu=args.tansu)


def run_bench_command(args: argparse.Namespace, base: Settings) -> int:
    """The CLI command: flags checked first (exit 2), an unreachable broker is exit 3, a
    worker that fails or stalls exit 1 (ReplayError)."""
    options = options_from_args(args)
    settings = base.with_overrides(partitions=options.partitions)
    if options.broker:  # checked (host:port) before anything starts
        settings = (settings.for_embedded(options.broker) if options.tansu
                    else settings.with_overrides(broker=options.broker))
    # A SIGTERM (e.g. `timeout make bench`) stops the workers and the broker like Ctrl-C:
    # they run in sessions of their own, so nothing else would.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.ERROR)  # retries would drown progress
    try:
        return _run_bench_command(options, settings, base)
    finally:
        signal.signal(signal.SIGTERM, previous)
        client_log.setLevel(level)  # as it was: the caller's logging is the caller's


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run_bench_command(options: BenchOptions, settings: Settings, base: Settings) -> int:
    say = _stderr_say
    # First, with no broker yet to share the machine: the backfill needs none, and runs
    # with the settings `acsr-metrics backfill` would have (its partitions, not --partitions).
    backfill = (measure_backfill(base, options.backfill_events, options.repeats,
                                 options.seed, say) if options.backfill else {"skipped": True})
    otel = (measure_otel(options.otel_messages, options.repeats, say) if options.otel
            else {"skipped": True})
    work_dir = Path(tempfile.mkdtemp(prefix="acsr-bench-"))
    broker: EmbeddedBroker | None = None
    ok = False
    try:
        if not options.broker:
            broker = EmbeddedBroker().start()
            settings = settings.for_embedded(broker.bootstrap)
        say(f"bench: broker {settings.bootstrap_servers} "
            f"({'embedded' if broker else 'given'}{', tansu' if settings.tansu else ''}); "
            f"worker logs in {work_dir}")
        try:
            if options.otel:  # first, on a broker not yet loaded, after the in-process rows
                otel["via_broker"] = asyncio.run(otel_broker_benchmark(
                    settings, f"bench-{uuid.uuid4().hex[:8]}-otel", options.otel_messages,
                    options.repeats, say, options.stall_timeout_s))
            results = asyncio.run(run_bench(options, settings, work_dir, say))
        except KafkaError as err:
            raise BrokerUnavailable(f"{settings.bootstrap_servers}: {err}") from None
        ok = True
    finally:
        if broker is not None:
            broker.stop()
        if ok:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            say(f"bench: worker logs kept in {work_dir}")
    line = results.pop("line")
    results.update(backfill=backfill, otel=otel, line=line)
    print(format_table(results))
    try:
        options.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    except OSError as err:  # the table above still shows the figures
        raise ConfigError(f"cannot write --out {options.out}: {err.strerror}") from None
    print(f"results: {options.out}")
    print(results["line"])
    return 0


def _stderr_say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- pure computation -------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank: a value that was observed."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0-100")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """min, median and max of the repeats of one measurement."""
    if not values:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def latencies(sent_at: Sequence[float], scrapes: Sequence[tuple[float, float]]
              ) -> list[float]:
    """Event-to-metric latency of each event that a scrape covers.

    `sent_at[i]` is when event i was sent (events numbered in send order); `scrapes` are
    (time, events processed so far) in time order. Event i counts as covered by the first
    scrape whose count exceeds i: events of different partitions are processed out of
    send order, so this is the latency of the i-th event processed, which is what a
    dashboard's counters show. Events no scrape covers get no latency."""
    out: list[float] = []
    covered = 0.0
    index = 0
    for at, count in scrapes:
        covered = max(covered, count)  # counters never go back
        while index < len(sent_at) and index < covered:
            out.append(max(0.0, at - sent_at[index]))
            index += 1
    return out


def timeline(sent_at: Sequence[float], scrapes: Sequence[tuple[float, float]]
             ) -> list[tuple[float, int, int]]:
    """(seconds since the first send, events sent, events processed) at each scrape,
    to see where latency builds up."""
    if not sent_at:
        return []
    start = sent_at[0]
    return [(round(at - start, 3), bisect.bisect_right(sent_at, at), round(count))
            for at, count in scrapes]


def rate(events: float, seconds: float) -> float:
    return events / seconds if seconds > 0 else math.nan


def ratio(processor: float, raw: float) -> float:
    return processor / raw if raw > 0 else math.nan


def final_line(processor: float, raw: float) -> str:
    """The last line of the output, for scripts: medians as integers, their ratio."""
    return (f"bench: processor {_integer(processor)} ev/s, raw ceiling {_integer(raw)} ev/s, "
            f"ratio {ratio(processor, raw):.3f}")


def _integer(value: float) -> str:
    return "nan" if math.isnan(value) else str(round(value))


def mb_per_100k(before_mb: float, after_mb: float, cases: int) -> float:
    """Resident memory the open cases added, scaled to 100,000 cases."""
    return (after_mb - before_mb) * 100_000 / cases


def processed_count(text: str) -> int:
    """Messages a worker has processed: valid, invalid and duplicate together."""
    return round(sum(metric_sums(text, PROCESSED_METRICS).values()))


def is_ready(text: str, partitions: int) -> bool:
    """The worker owns every partition and has recovered its tables."""
    return group_ready([text], partitions)


def group_ready(texts: Sequence[str | None], partitions: int) -> bool:
    """The group's workers (each /metrics exposition, None while one does not answer)
    own every partition between them and none is recovering its tables."""
    if any(text is None for text in texts):
        return False
    sums = [metric_sums(text, ("acsr_partitions_owned", "acsr_table_recovery_in_progress"))
            for text in texts if text is not None]
    return (sum(each["acsr_partitions_owned"] for each in sums) == partitions
            and not any(each["acsr_table_recovery_in_progress"] for each in sums))


def format_table(results: dict[str, Any]) -> str:
    """The summary table printed before the last line."""
    throughput = results["throughput"]
    rows: list[tuple[str, str, str, str]] = [("", "min", "median", "max")]

    def add(label: str, summary: dict[str, float], digits: int = 0) -> None:
        rows.append((label, *(f"{summary[k]:,.{digits}f}" for k in ("min", "median", "max"))))

    add("raw ceiling (ev/s)", throughput["raw"]["summary"])
    workers = results["config"].get("workers", 1)
    add(f"processor, {workers} worker{'s' if workers > 1 else ''} (ev/s)",
        throughput["processor"]["summary"])
    add("worker start to 1st event (s)", throughput["processor"]["start_summary"], 1)
    add("worker peak RSS, VmHWM (MB)", throughput["processor"]["peak_rss_summary"], 0)
    add("acsr_ samples the group exposes", throughput["processor"]["samples_summary"])
    add("group exposition render (ms)", throughput["processor"]["render_ms_summary"], 1)
    add("scrape, idle (ms)",
        throughput["processor"]["scrape_ms_summary"], 1)
    rekeyed = results.get("repartition", {"skipped": True})
    if not rekeyed.get("skipped"):
        add("processor, repartition (ev/s)", rekeyed["summary"])
        add("repartition / direct, per run", rekeyed["ratio_summary"], 3)
    compared = results.get("processes", {"skipped": True})
    if not compared.get("skipped"):
        add(f"processor, --processes {compared['processes']} (ev/s)", compared["summary"])
        add(f"--processes {compared['processes']} / 1, per run", compared["ratio_summary"], 3)
    core = results.get("core", {"skipped": True})
    if not core.get("skipped"):
        add("pure core / orjson decode", core["ratio_summary"], 1)
        add("  pure core (µs/event)", core["core_us_summary"], 2)
        add("  orjson decode (µs/event)", core["decode_us_summary"], 2)
    backfill = results.get("backfill", {"skipped": True})
    if not backfill.get("skipped"):
        add("backfill (ev/s)", backfill["rate_summary"])
        add("backfill / orjson decode, CPU", backfill["ratio_summary"], 1)
        add("  orjson decode (ev/s)", backfill["decode_rate_summary"])
    otel = results.get("otel", {"skipped": True})
    if not otel.get("skipped"):
        for encoding, summary in otel["summaries"].items():
            add(f"otel-bridge {encoding}, spans/s", summary)
        for encoding, summary in otel.get("via_broker", {}).get("summaries", {}).items():
            add(f"otel-bridge {encoding} via broker, spans/s", summary)
    width = max(32, *(len(label) + 2 for label, *_ in rows))  # labels stay apart from figures
    lines = [f"{label:<{width}}{a:>12}{b:>12}{c:>12}" for label, a, b, c in rows]
    lines.append(f"{'ratio of medians':<{width}}{throughput['ratio']:>36.3f}")
    if rekeyed.get("skipped"):
        lines.append("repartition: skipped")
    lines.append(f"events per run: {throughput['events']:,} on {results['config']['partitions']} "
                 f"partitions, {throughput['simulated_hours']:.1f} simulated hours")
    latency = results["latency"]
    if latency.get("skipped"):
        lines.append("latency: skipped")
    else:
        lines.append(f"latency at {latency['rate']:,.0f} ev/s ({latency['sent']:,} events, "
                     f"{latency['covered']:,} seen): p50 {latency['p50_s'] * 1000:,.0f} ms, "
                     f"p99 {latency['p99_s'] * 1000:,.0f} ms")
        lines.append(f"  /metrics/group every {latency['scrape_interval_s'] * 1000:g} ms, "
                     f"{latency['scrape_p50_s'] * 1000:,.0f} ms per scrape (median): a scrape "
                     f"was in flight {latency['scrape_busy_share']:.0%} of the run")
    memory = results["memory"]
    if memory.get("skipped"):
        lines.append("memory: skipped")
    else:
        lines.append(f"memory: {memory['open_cases']:,} open cases, RSS "
                     f"{memory['rss_before_mb']:,.1f} -> {memory['rss_after_mb']:,.1f} MB: "
                     f"{memory['mb_per_100k_cases']:,.1f} MB per 100k open cases")
        lines.append(f"  bounded by the case retention: {memory['case_retention_s']:,} s "
                     f"({memory['case_retention_s'] / 86_400:g} days) of event time, after "
                     "which an idle case is folded away")
    if not backfill.get("skipped"):
        archive = backfill["archive"]
        lines.append(backfill_line(backfill))
        lines.append(f"  {archive['events']:,} events over {archive['event_time_days']:.2f} days "
                     f"of event time, every {backfill['step_s']} s on "
                     f"{backfill['partitions']} partitions: "
                     f"{backfill['seconds_summary']['median']:,.1f} s and "
                     f"{backfill['bytes_written_summary']['median'] / 1e6:,.1f} MB a run "
                     f"(median); process peak RSS {backfill['process_peak_rss_mb']:,.0f} MB")
    if not otel.get("skipped"):
        lines.append(otel_line(otel))
    return "\n".join(lines)


# --- measurements -----------------------------------------------------------------------


def generate_events(count: int, seed: int) -> tuple[list[bytes], float]:
    """`count` simulator messages (same seed, same messages) and the simulated hours they
    span."""
    simulation = Simulation(SCENARIOS["steady"], seed=seed, rate=SIM_RATE, speed=SIM_SPEED,
                            start_ms=START_MS, invalid_share=INVALID_SHARE,
                            duplicate_share=DUPLICATE_SHARE)
    values: list[bytes] = []
    last_s = 0.0
    for message in itertools.islice(iter(simulation), count):
        values.append(exact_size(message.value))  # 500k held: 0.1 GB, not 2 GB
        last_s = message.t_s
    return values, last_s / 3600


def open_case_events(count: int, run: str) -> list[bytes]:
    """The first event (`case_opened`) of `count` distinct cases, a millisecond apart in
    event time, so none reaches the case retention."""
    return [dump_state(build_event(
        "case_opened", f"bench-{run}-{index:07d}", event_id=f"bench-{run}-{index:07d}.1",
        ts=START_MS + index, channel="web", agent_version="v7",
        customer_id=f"cust-{index:07d}")) for index in range(count)]


class Progress:
    """Progress lines to stderr, at most one every PROGRESS_S."""

    def __init__(self, say: Say, label: str) -> None:
        self.say = say
        self.label = label
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last >= PROGRESS_S:
            self.last = time.monotonic()
            return True
        return False

    def maybe(self, text: Callable[[], str]) -> None:
        """Say `text()` when a line is due (built only then)."""
        if self.due():
            self.say(f"bench: {self.label}: {text()}")


async def scrape(session: aiohttp.ClientSession, worker: WorkerProcess, path: str = "/metrics"
                 ) -> str | None:
    """The worker's /metrics (or `path`: /metrics/group, the group's figures, served by
    the exporter only), or None while it does not answer (starting)."""
    try:
        async with session.get(f"{worker.url}{path}") as response:
            if response.status != 200:
                return None
            return await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def wait_ready(cluster: Cluster, worker: WorkerProcess, session: aiohttp.ClientSession,
                     partitions: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cluster.check_alive()
        text = await scrape(session, worker)
        if text is not None and is_ready(text, partitions):
            return
        await asyncio.sleep(0.2)
    raise ReplayError(f"the worker did not own all {partitions} partitions within "
                      f"{timeout_s:.0f}s; its log ({worker.log_path}) ends with:\n"
                      f"{worker.log_tail()}")


@contextlib.asynccontextmanager
async def worker_group(settings: Settings, log_dir: Path, workers: int = 1,
                       processes: int = 1) -> AsyncIterator[tuple[Cluster, WorkerProcess]]:
    """A consumer group of its own (one worker unless said; with `processes` > 1 one
    `worker --processes N`, whose processes are the workers) and its first worker,
    stopped however the block ends."""
    await create_topics(settings)
    cluster = (SupervisedCluster(settings, processes, log_dir) if processes > 1
               else Cluster(settings, workers, log_dir))
    try:
        cluster.start()
        yield cluster, cluster.workers[0]
    finally:
        cluster.stop()


async def raw_ceiling(settings: Settings, ends: dict[int, int], stall_s: float,
                      progress: Progress | None = None) -> dict[str, Any]:
    """A bare consumer reads every event up to `ends`, decodes it and counts it by type:
    what the broker and the client library allow, without any processing. Timed from the
    first fetch (the consumer's start excluded) to the last record counted."""
    total = sum(ends.values())
    counts: dict[str, int] = {}
    tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
    nexts = dict.fromkeys(tps, 0)
    stops = {tp: ends.get(tp.partition, 0) for tp in tps}
    read = 0
    async with reader(settings.bootstrap_servers, None, kafka_client_kwargs(settings)
                      ) as consumer:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        first = last_change = time.monotonic()
        while pending := [tp for tp in tps if nexts[tp] < stops[tp]]:
            batch = await consumer.getmany(*pending, timeout_ms=1000,
                                           max_records=RAW_MAX_RECORDS)
            if not batch:
                if time.monotonic() - last_change > stall_s:
                    raise ReplayError(f"raw consumer: no records for {stall_s:.0f}s at "
                                      f"{read}/{total}")
                continue
            last_change = time.monotonic()
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= stops[tp]:
                        continue
                    nexts[tp] = record.offset + 1
                    read += 1
                    kind = _event_type(record.value)
                    counts[kind] = counts.get(kind, 0) + 1
            if progress is not None:
                progress.maybe(lambda done=read: f"{done:,}/{total:,} events read")
        done = time.monotonic()
    seconds = done - first
    return {"events": read, "seconds": seconds, "rate": rate(read, seconds),
            "by_type": dict(sorted(counts.items()))}


def _event_type(value: bytes | None) -> str:
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return UNDECODABLE
    kind = doc.get("type") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else UNTYPED


async def worker_throughput(settings: Settings, ends: dict[int, int], log_dir: Path,
                            label: str, say: Say, stall_s: float, workers: int = 1,
                            processes: int = 1) -> dict[str, Any]:
    """The group's workers (one unless said; `processes`: see `worker_group`) process
    every event: rate from the first processed event (see `rate_span`) until every offset
    is committed."""
    total = sum(ends.values())
    progress = Progress(say, label)
    t0: float | None = None
    processed_at_t0 = 0
    ready_at: float | None = None
    rss_max_kb = 0
    async with (worker_group(settings, log_dir, workers, processes) as (cluster, worker),
                group_offsets(settings.bootstrap_servers, settings.app_id,
                              kafka_client_kwargs(settings)) as offsets,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session):
        started = last_change = time.monotonic()
        last_done = -1
        while True:
            cluster.check_alive()
            polled = time.monotonic()
            texts = ([await scrape(session, each) for each in cluster.workers]
                     if t0 is None else [])
            groups = ([await scrape(session, each, GROUP_PATH) for each in cluster.workers]
                      if t0 is None else [])
            done = sum(min(offset, ends.get(partition, 0)) for partition, offset in
                       (await committed(offsets, settings.events_topic,
                                        settings.partitions)).items())
            if t0 is None:
                count = sum(processed_count(text) for text in groups if text)
                if done > 0 or count > 0:
                    t0, processed_at_t0 = polled, max(done, count)
                elif group_ready(texts, settings.partitions):
                    ready_at = polled
            rss_max_kb = max(rss_max_kb, *(each.memory_kb().get("VmRSS", 0)
                                           for each in cluster.workers))
            # ... and, re-keyed, the events on the internal topic too (then links)
            if done >= total and await internal_topics_done(offsets, settings.bootstrap_servers,
                                                            settings):
                finished = time.monotonic()
                break
            if done != last_done:
                last_done, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                raise ReplayError(f"{label}: no progress for {stall_s:.0f}s at {done}/{total} "
                                  f"events; the worker's log ({worker.log_path}) ends with:\n"
                                  f"{worker.log_tail()}")
            if progress.due():
                say(f"bench: {label}: {_throughput_progress(done, total, t0, processed_at_t0)}")
            await asyncio.sleep(max(0.0, polled + POLL_S - time.monotonic()))
        peak_kb = max(each.memory_kb().get("VmHWM", 0) for each in cluster.workers)
        await wait_group_figures(session, cluster.workers, total)
        exposition = await measure_exposition(session, cluster.workers)
    assert t0 is not None  # done >= total > 0 sets it
    since, measured = rate_span(t0, processed_at_t0, ready_at, total)
    if not measured:
        say(f"bench: {label}: every event was processed before a poll saw the group ready "
            f"or busy: no rate; raise --events")
    elif since != t0:
        say(f"bench: {label}: the first batch held every event: the rate is measured from "
            f"the group's readiness, start costs included; raise --events for a steady rate")
    seconds = finished - since
    return {"events": total, "events_after_t0": measured, "seconds": seconds,
            "measured_from": "the first event" if since == t0 else "readiness",
            "rate": rate(measured, seconds) if measured else math.nan,
            "start_s": t0 - started,
            "rss_max_mb": rss_max_kb / 1024, "peak_rss_mb": max(peak_kb, rss_max_kb) / 1024,
            "exposition": exposition}


async def wait_group_figures(session: aiohttp.ClientSession, workers: Sequence[WorkerProcess],
                             total: int, timeout_s: float = 60.0) -> None:
    """Until the group's exposition counts every processed message (the workers publish
    their figures every ACSR_GROUP_PUBLISH_S, the exporter renders them after)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        texts = [await scrape(session, worker, GROUP_PATH) for worker in workers]
        if sum(processed_count(text) for text in texts if text) >= total:
            return
        await asyncio.sleep(0.25)
    raise ReplayError(f"the group's exposition did not count all {total:,} events within "
                      f"{timeout_s:.0f}s")


async def measure_exposition(session: aiohttp.ClientSession, workers: Sequence[WorkerProcess],
                             scrapes: int = EXPOSITION_SCRAPES) -> dict[str, float]:
    """What Prometheus would scrape from the group once every event is processed: the
    `acsr_` samples and bytes of the group's exposition (once) and of every worker's own
    /metrics; how long a scrape takes (the median of `scrapes` in a row of each path on
    each worker, the group idle), and how long the exporter took to render the group's
    exposition (at the first scrape after the figures changed; an idle scrape reads bytes)."""
    samples = size = 0
    scrape_s: list[float] = []
    render_s = 0.0
    for worker in workers:
        for path in ("/metrics", GROUP_PATH):
            text = None
            for _ in range(scrapes):
                begun = time.monotonic()
                text = await scrape(session, worker, path)
                scrape_s.append(time.monotonic() - begun)
            if text:
                samples += sum(line.startswith("acsr_") for line in text.splitlines())
                size += len(text.encode())
                render_s = max(render_s, metric_sums(text, ("acsr_group_render_seconds",))
                               .get("acsr_group_render_seconds", 0.0))
    return {"samples": samples, "bytes": size, "scrape_s": percentile(scrape_s, 50),
            "render_s": render_s}


def rate_span(first_seen: float, processed_then: int, ready_at: float | None,
              total: int) -> tuple[float, int]:
    """Where a throughput rate starts, and the events it covers. From the first poll that
    saw events processed, without them: the worker's one-off costs (its first fetch, the
    readers each partition sets up) are then behind it. When that poll saw them all (the
    run fit in one batch), from the last poll that saw the group own every partition with
    nothing processed yet; with neither, no span (0 events)."""
    if processed_then < total or ready_at is None:
        return first_seen, total - processed_then
    return ready_at, total


def _throughput_progress(done: int, total: int, t0: float | None, at_t0: int) -> str:
    if t0 is None:
        return "waiting for the worker's first processed event"
    return (f"{done:,}/{total:,} events committed, "
            f"{rate(done - at_t0, time.monotonic() - t0):,.0f} ev/s")


async def measure_latency(settings: Settings, warmup: list[bytes], lines: list[bytes],
                          send_rate: float, scrape_every_s: float, log_dir: Path, say: Say,
                          stall_s: float) -> dict[str, Any]:
    """Send `lines` at `send_rate` to a fresh worker while scraping its /metrics every
    `scrape_every_s`; the latencies come from `latencies`. A scrape is no free look: the
    worker renders its whole exposition meanwhile, so the share of the run spent in
    scrapes is reported with the latencies. `warmup` goes first, at once, and is
    waited for: a worker's first event on each partition sets up its readers, a one-off
    cost that is no steady-state latency."""
    scrapes: list[tuple[float, float]] = []  # (time, processed count), every scrape
    scrape_s: list[float] = []  # how long each scrape took
    sent_at: list[float] = []
    progress = Progress(say, "latency")
    async with (worker_group(settings, log_dir) as (cluster, worker),
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session):
        await wait_ready(cluster, worker, session, settings.partitions, stall_s)

        async def scraper() -> None:
            while True:
                begun = time.monotonic()
                text = await scrape(session, worker, GROUP_PATH)
                if text is not None:
                    scrapes.append((time.monotonic(), processed_count(text)))
                    scrape_s.append(time.monotonic() - begun)
                await asyncio.sleep(max(0.0, begun + scrape_every_s - time.monotonic()))

        async def wait_count(target: float, what: str) -> None:
            last_count, last_change = -1.0, time.monotonic()
            while not scrapes or scrapes[-1][1] < target:
                cluster.check_alive()
                if task.done():
                    task.result()  # a scraper failure ends the run
                count = scrapes[-1][1] if scrapes else 0.0
                if count != last_count:
                    last_count, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > stall_s:
                    raise ReplayError(f"latency: no progress for {stall_s:.0f}s at {count:.0f}/"
                                      f"{target:.0f} events ({what}); the worker's log "
                                      f"({worker.log_path}) ends with:\n{worker.log_tail()}")
                await asyncio.sleep(scrape_every_s)

        task = asyncio.create_task(scraper())
        try:
            # Batched as producers batch: one record per batch (the embedded broker's
            # setting for our producers) caps a sender near 1,000 events/s, below half
            # a worker's rate; the worker reads no end offset of the events topic.
            async with Publisher.from_settings(
                    settings, max_batch_size=LATENCY_BATCH_BYTES) as publisher:
                await asyncio.gather(*[await publisher.send_value(value, checked=False)
                                       for value in warmup])
                await wait_count(len(warmup), "warm-up")
                baseline, first_scrape = scrapes[-1][1], len(scrapes)
                per_slice = max(1, round(send_rate * SLICE_S))
                started = next_slice = time.monotonic()
                deliveries = []
                for start in range(0, len(lines), per_slice):
                    for value in lines[start:start + per_slice]:
                        sent_at.append(time.monotonic())
                        deliveries.append(await publisher.send_value(value, checked=False))
                    progress.maybe(lambda: f"{len(sent_at):,}/{len(lines):,} sent, "
                                   f"{scrapes[-1][1] - baseline:,.0f} processed")
                    next_slice += SLICE_S
                    await asyncio.sleep(max(0.0, next_slice - time.monotonic()))
                sending_s = time.monotonic() - started
                await asyncio.gather(*deliveries)
            await wait_count(baseline + len(lines), "paced")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    measured = [(at, count - baseline) for at, count in scrapes[first_scrape:]]
    values = latencies(sent_at, measured)
    span = measured[-1][0] - sent_at[0] if measured and sent_at else 0.0
    return {"rate": rate(len(lines), sending_s), "target_rate": send_rate, "sent": len(lines),
            "warmup": len(warmup), "covered": len(values), "scrapes": len(measured),
            "scrape_interval_s": scrape_every_s,
            "scrape_p50_s": percentile(scrape_s, 50), "scrape_max_s": max(scrape_s, default=0.0),
            "scrape_busy_share": min(1.0, sum(scrape_s[first_scrape:]) / span) if span else 0.0,
            "p50_s": percentile(values, 50), "p99_s": percentile(values, 99),
            "max_s": max(values, default=math.nan),
            "timeline": timeline(sent_at, measured)}


async def measure_memory(settings: Settings, cases: int, run: str, log_dir: Path, say: Say,
                         stall_s: float) -> dict[str, Any]:
    """A fresh worker's RSS when idle, then after `cases` more distinct cases were opened
    and committed. A few cases are opened first, before the first reading: a worker's
    first event on each partition sets up readers and buffers, a one-off cost that would
    otherwise be charged to the cases."""
    warm = max(10 * settings.partitions, cases // 100)
    lines = open_case_events(warm + cases, run)
    progress = Progress(say, "memory")

    async def open_cases(values: list[bytes], before: int) -> None:
        ends = await produce(settings.bootstrap_servers, settings.events_topic, values,
                             settings.tansu, client=kafka_client_kwargs(settings))
        await wait_processed(cluster, settings.bootstrap_servers, ends,
                             lambda done: progress.maybe(
                                 lambda: f"{done - before:,}/{len(values):,} cases committed"),
                             stall_s)
        await asyncio.sleep(SETTLE_S)  # idle again: the reading is not mid-batch

    async with (worker_group(settings, log_dir) as (cluster, worker),
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session):
        await wait_ready(cluster, worker, session, settings.partitions, stall_s)
        await open_cases(lines[:warm], 0)
        before = worker.memory_kb()
        await open_cases(lines[warm:], warm)
        after = worker.memory_kb()
    before_mb, after_mb = before.get("VmRSS", 0) / 1024, after.get("VmRSS", 0) / 1024
    return {"open_cases": cases, "warmup_cases": warm, "rss_before_mb": before_mb,
            "rss_after_mb": after_mb, "peak_rss_mb": after.get("VmHWM", 0) / 1024,
            "mb_per_100k_cases": mb_per_100k(before_mb, after_mb, cases),
            "case_retention_s": settings.case_retention_s}


async def rekeyed_throughput(settings: Settings, run: str, events_topic: str,
                             ends: dict[int, int], work_dir: Path, label: str, say: Say,
                             options: BenchOptions) -> dict[str, Any]:
    """The same events with ACSR_PARTITIONER=repartition: each is re-keyed through the
    internal topic before it is processed."""
    group = _run_settings(settings, run, work_dir, events_topic=events_topic,
                          partitioner=REPARTITION)
    await create_topics(group)
    say(f"bench: {label}: starting (group {group.app_id})")
    result = await worker_throughput(group, ends, work_dir, label, say,
                                     options.stall_timeout_s, options.workers)
    say(f"bench: {label}: {result['events_after_t0']:,} events in {result['seconds']:.1f}s, "
        f"{result['rate']:,.0f} ev/s")
    return result


async def processes_throughput(settings: Settings, run: str, events_topic: str,
                               ends: dict[int, int], work_dir: Path, label: str, say: Say,
                               options: BenchOptions) -> dict[str, Any]:
    """The same events through `worker --processes 2`: one supervisor, two processes of
    a group of its own (tools/supervised.py), measured as any worker run."""
    group = _run_settings(settings, run, work_dir, events_topic=events_topic)
    say(f"bench: {label}: starting (group {group.app_id})")
    result = await worker_throughput(group, ends, work_dir, label, say,
                                     options.stall_timeout_s, processes=PROCESSES_COMPARED)
    say(f"bench: {label}: {result['events_after_t0']:,} events in {result['seconds']:.1f}s, "
        f"{result['rate']:,.0f} ev/s")
    return result


def beside(runs: list[dict[str, Any]], single: list[dict[str, Any]], **extra: Any
           ) -> dict[str, Any]:
    """Runs of another kind against the one-worker runs, repeat by repeat (each pair side
    by side): their rates, and each run's rate over its repeat's one-worker rate."""
    if not runs:
        return {"skipped": True}
    return {**extra, "runs": runs, "summary": summarize([r["rate"] for r in runs]),
            "ratio_summary": summarize([ratio(r["rate"], w["rate"]) for r, w
                                        in zip(runs, single, strict=True)])}


def _run_settings(settings: Settings, run: str, work_dir: Path, **overrides: Any) -> Settings:
    """Topics and a consumer group of this run only; the worker's files in `work_dir`.
    Offsets committed every COMMIT_S: a run ends when every offset is committed, so that
    is how precisely its end is known (a 20,000-event run lasts a few seconds)."""
    return isolated(settings, run).with_overrides(
        data_dir=str(work_dir / "data"), **{"commit_interval_s": COMMIT_S, **overrides})


async def run_bench(options: BenchOptions, settings: Settings, work_dir: Path, say: Say
                    ) -> dict[str, Any]:
    """Every phase in turn; the results as one JSON-able dict (see the module doc)."""
    run = f"bench-{uuid.uuid4().hex[:8]}"
    say(f"bench: generating {options.events:,} events (seed {options.seed})")
    lines, hours = generate_events(options.events, options.seed)
    core = measure_core(lines, options.repeats, say) if options.core else {"skipped": True}
    loaded = _run_settings(settings, run, work_dir)
    await create_topics(loaded)
    say(f"bench: loading them into {loaded.events_topic} ({options.partitions} partitions, "
        "not measured)")
    sent = 0
    load_progress = Progress(say, "load")

    def on_sent(count: int) -> None:
        nonlocal sent
        sent += count
        load_progress.maybe(lambda: f"{sent:,}/{options.events:,} events sent")

    started = time.monotonic()
    ends = await produce(loaded.bootstrap_servers, loaded.events_topic, lines, loaded.tansu,
                         on_sent, kafka_client_kwargs(loaded))
    load_s = time.monotonic() - started
    del lines
    say(f"bench: loaded {sum(ends.values()):,} events in {load_s:.1f}s "
        f"({hours:.1f} simulated hours)")
    raw_runs, worker_runs, rekeyed_runs, processes_runs = [], [], [], []
    for repeat in range(1, options.repeats + 1):
        raw = await raw_ceiling(loaded, ends, options.stall_timeout_s,
                                Progress(say, f"raw ceiling {repeat}/{options.repeats}"))
        raw_runs.append(raw)
        say(f"bench: raw ceiling {repeat}/{options.repeats}: {raw['events']:,} events in "
            f"{raw['seconds']:.2f}s, {raw['rate']:,.0f} ev/s")
        label = f"worker {repeat}/{options.repeats}"
        # Its own consumer group and output topics; the same loaded events topic.
        group = _run_settings(settings, f"{run}-w{repeat}", work_dir,
                              events_topic=loaded.events_topic)
        say(f"bench: {label}: starting (group {group.app_id})")
        result = await worker_throughput(group, ends, work_dir, label, say,
                                         options.stall_timeout_s, options.workers)
        worker_runs.append(result)
        say(f"bench: {label}: {result['events_after_t0']:,} events in {result['seconds']:.1f}s"
            f" from {result['measured_from']}, {result['rate']:,.0f} ev/s"
            f" (started in {result['start_s']:.1f}s, peak RSS {result['peak_rss_mb']:.0f} MB)")
        if options.repartition:
            rekeyed_runs.append(await rekeyed_throughput(
                settings, f"{run}-r{repeat}", loaded.events_topic, ends, work_dir,
                f"repartition {repeat}/{options.repeats}", say, options))
        if options.processes_compare:
            processes_runs.append(await processes_throughput(
                settings, f"{run}-p{repeat}", loaded.events_topic, ends, work_dir,
                f"--processes {PROCESSES_COMPARED} {repeat}/{options.repeats}", say, options))
    raw_summary = summarize([r["rate"] for r in raw_runs])
    worker_summary = summarize([r["rate"] for r in worker_runs])
    results: dict[str, Any] = {
        "config": {**asdict(options), "out": str(options.out),
                   "broker": settings.bootstrap_servers, "tansu": settings.tansu,
                   "sim_rate": SIM_RATE, "sim_speed": SIM_SPEED,
                   "invalid_share": INVALID_SHARE, "duplicate_share": DUPLICATE_SHARE},
        "throughput": {
            "events": sum(ends.values()), "load_seconds": load_s, "simulated_hours": hours,
            "raw": {"runs": raw_runs, "summary": raw_summary},
            "processor": {"runs": worker_runs, "summary": worker_summary,
                          "start_summary": summarize([r["start_s"] for r in worker_runs]),
                          "peak_rss_summary": summarize([r["peak_rss_mb"]
                                                         for r in worker_runs]),
                          "samples_summary": summarize([r["exposition"]["samples"]
                                                        for r in worker_runs]),
                          "render_ms_summary": summarize([r["exposition"]["render_s"] * 1000
                                                          for r in worker_runs]),
                          "scrape_ms_summary": summarize([r["exposition"]["scrape_s"] * 1000
                                                          for r in worker_runs])},
            "ratio": ratio(worker_summary["median"], raw_summary["median"]),
        },
        "latency": {"skipped": True},
        "memory": {"skipped": True},
        "repartition": beside(rekeyed_runs, worker_runs),  # re-keyed rate / direct rate
        "processes": beside(processes_runs, worker_runs, processes=PROCESSES_COMPARED),
        "core": core,
    }
    if options.latency:
        send_rate = worker_summary["median"] / 2
        count = max(1, round(send_rate * options.latency_s))
        say(f"bench: latency: {count:,} events at {send_rate:,.0f} ev/s (half the median "
            f"worker rate) for {options.latency_s:g}s, /metrics every "
            f"{options.scrape_s * 1000:g} ms")
        warm = max(10 * options.partitions, round(send_rate))  # about a second's worth
        latency_lines, _ = generate_events(warm + count, options.seed + 1)
        results["latency"] = await measure_latency(
            _run_settings(settings, f"{run}-lat", work_dir), latency_lines[:warm],
            latency_lines[warm:], send_rate, options.scrape_s, work_dir, say,
            options.stall_timeout_s)
        latency = results["latency"]
        say(f"bench: latency: p50 {latency['p50_s'] * 1000:,.0f} ms, "
            f"p99 {latency['p99_s'] * 1000:,.0f} ms")
        if latency["scrape_busy_share"] > SCRAPE_BUSY_WARNING:
            say(f"bench: latency: warning: a /metrics scrape was in flight "
                f"{latency['scrape_busy_share']:.0%} of the run (median "
                f"{latency['scrape_p50_s'] * 1000:,.0f} ms each): the figures include the cost "
                "of measuring them; compare with a longer --scrape-interval")
    if options.memory:
        say(f"bench: memory: opening {options.open_cases:,} cases on a fresh worker "
            f"(case retention {settings.case_retention_s:,} s of event time bounds them)")
        results["memory"] = await measure_memory(
            _run_settings(settings, f"{run}-mem", work_dir), options.open_cases, run,
            work_dir, say, options.stall_timeout_s)
        say(f"bench: memory: {results['memory']['mb_per_100k_cases']:,.1f} MB per 100k "
            "open cases")
    results["line"] = final_line(worker_summary["median"], raw_summary["median"])
    return results


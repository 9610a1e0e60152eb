"""The `acsr-metrics` command line: worker, replay, backfill and the tools."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from streams import __version__
from streams.config import ConfigError, Settings, from_env
from streams.kafka.broker import BrokerUnavailable, ensure_topics
from streams.kafka.partitioners import PARTITIONERS
from streams.tools.backfill import add_parser as add_backfill_parser
from streams.tools.backfill import run_backfill_command
from streams.tools.bench import add_parser as add_bench_parser
from streams.tools.bench import run_bench_command
from streams.tools.demo import add_demo_arguments, run_demo_command
from streams.tools.export_queue import add_parser as add_export_parser
from streams.tools.export_queue import run_export_command
from streams.tools.replay import ReplayError
from streams.tools.simulate import add_simulate_parser, run_simulate_command


def _settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", help="Kafka bootstrap servers, host:port[,host:port] "
                        "(env ACSR_BROKER)")
    parser.add_argument("--app-id", help="consumer group and table prefix (env ACSR_APP_ID)")
    parser.add_argument("--partitions", type=int,
                        help="partitions of the events topic when it is created")
    parser.add_argument("--events-topic", help="default acsr.events")
    parser.add_argument("--dlq-topic", help="dead-letter topic, default acsr.events.dlq")
    parser.add_argument("--log-level", choices=("crit", "error", "warn", "info", "debug"))
    parser.add_argument("--partitioner", choices=PARTITIONERS,
                        help="how the producers place a case_id on a partition: murmur2 (Java, "
                        "aiokafka, kafkajs), crc32 (librdkafka: confluent-kafka), fnv1a "
                        "(sarama), repartition (any other; env ACSR_PARTITIONER, default "
                        "murmur2; docs/events.md)")


def _sample_resolved_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-resolved", type=float, metavar="RATE",
                        help="share (0-1) of autonomous resolutions sent to the annotation "
                        "queue as random_sample, fixed by a hash of case_id "
                        "(env ACSR_SAMPLE_RESOLVED_RATE, default 0)")


def _settings(args: argparse.Namespace, base: Settings) -> Settings:
    return base.with_overrides(
        broker=getattr(args, "broker", None),
        app_id=args.app_id,
        partitions=args.partitions,
        events_topic=args.events_topic,
        dlq_topic=args.dlq_topic,
        log_level=args.log_level,
        partitioner=args.partitioner,
        web_host=getattr(args, "web_host", None),
        web_port=getattr(args, "web_port", None),
        sample_resolved_rate=getattr(args, "sample_resolved", None),
        processes=getattr(args, "processes", None),
        otel_mapping=getattr(args, "mapping", None),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acsr-metrics",
        description="Real-time KPIs for autonomous customer-support agents.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run one stream-processing worker")
    _settings_args(worker)
    worker.add_argument("--web-host", help="address of /metrics and /kpis (default 127.0.0.1)")
    worker.add_argument("--web-port", type=int, help="port of /metrics and /kpis (default 6066)")
    worker.add_argument("--processes", metavar="N",
                        help="worker processes of the group on this machine, under a "
                        "supervisor: process i serves on --web-port + i, its tables in "
                        "<data dir>/process-<i>; 'auto': one per CPU this process may use "
                        "(env ACSR_PROCESSES, default 1: the worker runs in this process)")
    worker.add_argument("--tansu", action="store_true",
                        help="apply the embedded (Tansu) broker workarounds")
    _sample_resolved_arg(worker)

    replay = commands.add_parser(
        "replay", help="replay a JSON Lines file through the pipeline and write the report")
    replay.add_argument("file", type=Path, help="JSON Lines, one message value per line")
    replay.add_argument("--report", type=Path, required=True, help="where to write the report")
    _settings_args(replay)
    replay.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    replay.add_argument("--metrics-out", type=Path,
                        help="also write the final Prometheus exposition of all workers, summed")
    replay.add_argument("--stall-timeout", type=float, default=120.0,
                        help="fail when no event is processed for this many seconds")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    _sample_resolved_arg(replay)

    add_export_parser(commands)
    add_backfill_parser(commands)
    bridge = commands.add_parser(
        "otel-bridge", help="OTLP spans and logs from the OpenTelemetry Collector's Kafka "
        "exporter into the events topic (docs/otel.md)")
    _settings_args(bridge)
    bridge.add_argument("--web-port", type=int, help="port of its /metrics (default 6066)")
    bridge.add_argument("--mapping", metavar="FILE",
                        help="a YAML file overriding the span mapping (env ACSR_OTEL_MAPPING; "
                        "docs/otel.md)")

    demo = commands.add_parser(
        "demo", help="embedded broker, one worker, live traffic and a terminal view")
    add_demo_arguments(demo)

    add_simulate_parser(commands)
    add_bench_parser(commands)
    return parser


def use_uvloop() -> None:
    """uvloop's event loop: Faust hands each record over through the loop, and uvloop
    runs a busy worker about a third faster (docs/performance.md). The consumer's own
    thread takes it too, as it creates its loop from the policy."""
    try:
        import uvloop
    except ImportError:  # a platform without uvloop wheels: asyncio's loop works too
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(settings: Settings) -> int:
    from faust.worker import Worker

    from streams.faust_patches import FaustPatchError, self_check
    from streams.kafka.security import kafka_client_kwargs
    from streams.tools.otel_bridge import BridgeTopics, worker_bridge
    from streams.worker.app import build_app

    try:
        self_check()  # before anything else: never run unpatched
    except FaustPatchError as err:
        print(f"acsr-metrics: {err}", file=sys.stderr)
        return 4
    bridge, bridge_topics = None, dict[str, int]()
    if settings.otel_bridge:  # its mapping read now (a bad file: exit 2), its topics ensured
        bridge = worker_bridge(settings)
        bridge_topics = BridgeTopics.of(settings).to_ensure(settings)
    use_uvloop()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(ensure_topics(settings.bootstrap_servers, {
            settings.events_topic: settings.partitions,
            settings.dlq_topic: settings.partitions,
            settings.group_topic: 1,
            **settings.rekeying_topics,
            **bridge_topics,
        }, settings.replication_factor, settings.broker_wait_s, kafka_client_kwargs(settings),
            settings.topic_configs))
    finally:
        loop.close()
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = build_app(settings, bridge)
    worker = Worker(app, loglevel=settings.log_level, quiet=True)
    # Faust's start-up spinner sets the root logger to DEBUG to animate on every log call,
    # and so every debug call of Faust and aiokafka builds a record: 10-15% of a busy
    # worker's time (docs/performance.md). The level stays the one asked for.
    worker.spinner = None
    worker.execute_from_commandline()
    return 0


def run_worker_command(settings: Settings) -> int:
    """One worker in this process, or with ACSR_PROCESSES > 1 a supervisor of that many
    (streams/worker/processes.py)."""
    from streams.worker.processes import process_count, supervise

    count = process_count(settings.processes)
    return supervise(settings, count) if count > 1 else run_worker(settings)


def run_replay_command(args: argparse.Namespace, settings: Settings) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from streams.tools.replay import run_replay, write_report

    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if not args.file.is_file():
        raise ConfigError(f"{args.file} is not a file")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  disable=args.quiet, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = asyncio.run(run_replay(args.file, settings, workers=args.workers,
                                        start_broker=not args.broker, progress=progress,
                                        stall_timeout_s=args.stall_timeout))
    write_report(result.report, args.report)
    if args.metrics_out:
        args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
        args.metrics_out.write_text(result.metrics)
    events = result.report["events"]
    print(
        f"replayed {result.lines} lines in {result.seconds:.1f}s "
        f"({events['valid']} valid, {events['invalid']} invalid, "
        f"{events['duplicate']} duplicate) -> {args.report}",
        file=sys.stderr,
    )
    if events["misrouted"]:
        print(f"acsr-metrics: warning: {events['misrouted']} events were on a partition that "
              f"ACSR_PARTITIONER={settings.partitioner} does not give their case: figures "
              "that join cases may be wrong (docs/events.md, Producers)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        base = from_env()
        if args.command != "worker":  # replay, demo and bench run one process per worker
            base = base.with_overrides(processes="1")
        if args.command == "worker":
            settings = _settings(args, base)
            if args.tansu:
                settings = settings.with_overrides(tansu=True)
            return run_worker_command(settings)
        if args.command == "demo":
            return run_demo_command(args, base)
        if args.command == "simulate":
            return run_simulate_command(args, base)
        if args.command == "replay":
            replay_base = base.with_overrides(partitions=args.partitions or 4)
            return run_replay_command(args, _settings(args, replay_base))
        if args.command == "otel-bridge":
            from streams.tools.otel_bridge import run_bridge_command

            return run_bridge_command(_settings(args, base))
        if args.command == "backfill":
            return run_backfill_command(args, base)
        if args.command == "export-queue":
            return run_export_command(args, base)
        if args.command == "bench":
            return run_bench_command(args, base)
    except ConfigError as err:
        print(f"acsr-metrics: configuration error: {err}", file=sys.stderr)
        return 2
    except BrokerUnavailable as err:
        print(f"acsr-metrics: broker unavailable: {err}", file=sys.stderr)
        return 3
    except ReplayError as err:  # the workers could not finish (replay, demo, bench)
        print(f"acsr-metrics: {args.command} failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

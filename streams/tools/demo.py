"""`acsr-metrics demo`: embedded broker, one worker, the simulator and a live terminal view.

Everything runs on this machine and stops together: Ctrl-C (or `--duration`) stops the
simulator, Prometheus (with `--with-prometheus`), the worker, then the broker.
The view reads the worker's `/kpis/`, the same aggregates `/metrics/group` exposes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Group
from rich.live import Live
from rich.table import Table

from streams.config import ConfigError, Settings
from streams.core.kpis import Aggregate, build_report
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.publisher import Publisher
from streams.tools.replay import Cluster, create_topics
from streams.tools.simulate import (
    SCENARIOS,
    Progress,
    Simulation,
    add_traffic_arguments,
    past_start_ms,
    publish,
    traffic_simulation,
)

COMPLIANCE_OBJECTIVE = 0.999
RULES_DIR = Path(__file__).resolve().parents[2] / "alerts"
RULE_FILES = ("recording.rules.yml", "alerts.rules.yml")


@dataclass(frozen=True)
class DemoOptions:
    rate: float = 50.0  # messages per second
    duration_s: float | None = None  # None: until Ctrl-C
    refresh_s: float = 3.0
    scenario: str = "steady"
    speed: float = 60.0  # simulated time runs this many times faster
    seed: int | None = None
    change_after_s: float = 60.0
    with_prometheus: bool = False
    prometheus_port: int = 9090


@dataclass
class Rates:
    """Per-second pipeline rates between two views."""

    last: tuple[float, int, int, int, int] | None = None
    text: str = "pipeline: waiting for the first figures"

    def update(self, events: dict[str, int], sent: int) -> str:
        now = (time.monotonic(), events["valid"], events["invalid"], events["duplicate"], sent)
        if self.last is not None:
            elapsed = max(1e-9, now[0] - self.last[0])
            valid, invalid, duplicate, produced = ((a - b) / elapsed
                                                   for a, b in zip(now[1:], self.last[1:],
                                                                   strict=True))
            self.text = (f"pipeline: sent {produced:.0f}/s, processed {valid:.0f}/s valid, "
                         f"{invalid:.1f}/s invalid, {duplicate:.1f}/s duplicate")
        self.last = now
        return self.text


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def _compliance(value: float | None) -> str:
    if value is None:
        return "-"
    return _pct(value) if value >= COMPLIANCE_OBJECTIVE else f"[red]{value:.2%}[/]"


def render(report: dict[str, Any], header: str, rates: str) -> Group:
    """The terminal view: KPIs per intent and agent version, escalation reasons."""
    intents = Table(title="KPIs by intent (compliance objective "
                          f"{COMPLIANCE_OBJECTIVE:.1%}, red below)", expand=True)
    intents.add_column("intent", no_wrap=True)
    for column in ("cases", "ARR", "escal.", "compl.", "AHT", "CSAT", "FCR"):
        intents.add_column(column, justify="right", no_wrap=True)
    groups = [("all", report["totals"]), *report["by_intent"].items(), *(
        (f"agent {version}", kpi) for version, kpi in report["by_agent_version"].items())]
    for name, kpi in groups:
        intents.add_row(name, str(kpi["cases_concluded"]), _pct(kpi["arr"]),
                        _pct(kpi["escalation_rate"]), _compliance(kpi["compliance_score"]),
                        _num(kpi["aht_seconds_mean"], "s"), _num(kpi["csat_mean"]),
                        _pct(kpi["fcr"]))
    reasons = Table(title="Escalations by reason", min_width=30)
    reasons.add_column("reason")
    reasons.add_column("cases", justify="right")
    for reason, n in sorted(report["totals"]["escalations_by_reason"].items(),
                            key=lambda item: -item[1]):
        reasons.add_row(reason, str(n))
    events = report["events"]
    status = Table.grid(padding=(0, 2))
    status.add_row(header)
    status.add_row(f"events: {events['valid']} valid, {events['invalid']} invalid, "
                   f"{events['duplicate']} duplicate; {rates}")
    implausible = {reason: n for reason, n in events["invalid_by_reason"].items()
                   if reason in ("future_ts", "past_ts") and n}
    if implausible:
        status.add_row("[bold red]events dated implausibly (dead-lettered): "
                       + ", ".join(f"{n} {reason}" for reason, n in sorted(implausible.items()))
                       + ": a producer's clock or ts unit is wrong[/]")
    if events.get("misrouted"):
        status.add_row(f"[bold red]{events['misrouted']} events misrouted: the producers "
                       "partition otherwise than ACSR_PARTITIONER says (docs/events.md)[/]")
    return Group(status, intents, reasons)


async def fetch_report(session: aiohttp.ClientSession, url: str, settings: Settings
                       ) -> dict[str, Any] | None:
    try:
        async with session.get(f"{url}/kpis/") as response:
            snap = await response.json()
    except (TimeoutError, aiohttp.ClientError):
        return None
    total = Aggregate.sum_of(snap["partitions"].values(), settings.window_sizes_s)
    return build_report(total, settings.report_window_s)


@contextlib.contextmanager
def prometheus(target: str, port: int, workdir: Path) -> Iterator[str]:
    """Debian's Prometheus scraping `target` with the bundled rules; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ConfigError("--with-prometheus needs Prometheus on PATH "
                          "(Debian: apt-get install prometheus)")
    rules = [RULES_DIR / name for name in RULE_FILES]
    if not all(path.is_file() for path in rules):
        raise ConfigError(f"--with-prometheus needs the rules in {RULES_DIR} (a source checkout)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML: no YAML writer needed
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(path) for path in rules],
        "scrape_configs": [
            {"job_name": "acsr", "static_configs": [{"targets": [target]}]},
            # the group's figures, one series whichever worker serves them
            {"job_name": "acsr-group", "metrics_path": "/metrics/group",
             "static_configs": [{"targets": [target]}],
             "metric_relabel_configs": [{"target_label": "instance", "replacement": "group"}]},
        ],
    }, indent=2))
    with (workdir / "prometheus.log").open("wb") as log, subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    ) as process:
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()  # Prometheus shuts down within a second; leaving waits for it


async def run_demo(settings: Settings, options: DemoOptions, log_dir: Path) -> None:
    """Run until `options.duration_s` passes or SIGINT/SIGTERM, then stop everything."""
    scenario = SCENARIOS[options.scenario]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker())
        settings = settings.for_embedded(broker.bootstrap)
        await create_topics(settings)
        cluster = Cluster(settings, 1, log_dir)
        stack.callback(cluster.stop)
        worker = cluster.add_worker(0, web_port=settings.web_port)
        metrics_url = f"http://{settings.web_host}:{settings.web_port}/metrics/group"
        print(f"worker starting; metrics at {metrics_url} (Ctrl-C stops)", flush=True)
        if options.with_prometheus:
            url = stack.enter_context(prometheus(
                f"{settings.web_host}:{settings.web_port}",
                free_prometheus_port(options.prometheus_port), log_dir / "prometheus"))
            print(f"Prometheus at {url} (rules: {RULES_DIR})", flush=True)
        seed = options.seed if options.seed is not None else int(time.time())
        simulation = Simulation(scenario, seed=seed, rate=options.rate, speed=options.speed,
                                start_ms=past_start_ms(options.duration_s, options.speed),
                                change_after_s=options.change_after_s)
        header = (f"scenario {scenario.name} (seed {seed}, {options.speed:g}x time"
                  + ("" if scenario.name == "steady" else
                     f", changes after {options.change_after_s:g}s: {scenario.summary}")
                  + f"); metrics {metrics_url}")
        progress = Progress()
        publisher = await Publisher.from_settings(settings).start()
        feeder = asyncio.create_task(
            publish(simulation, publisher, options.duration_s, stop, progress))
        try:
            await _view(settings, worker.url, cluster, options, stop, header, progress)
        finally:
            stop.set()
            # bounded, should the broker have died under us
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(feeder, 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.stop(), 10)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)


async def _view(settings: Settings, worker_url: str, cluster: Cluster, options: DemoOptions,
                stop: asyncio.Event, header: str, progress: Progress) -> None:
    deadline = None if options.duration_s is None else time.monotonic() + options.duration_s
    rates = Rates()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        with Live(refresh_per_second=1, transient=False) as live:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                cluster.check_alive()
                report = await fetch_report(session, worker_url, settings)
                if report is not None:
                    live.update(render(report, header, rates.update(report["events"],
                                                                    progress.sent)))
                wait = options.refresh_s
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)


def free_prometheus_port(preferred: int) -> int:
    """`preferred` when nothing listens there, else a free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    """The options of `acsr-metrics demo`."""
    add_traffic_arguments(demo, rate=50.0, speed=60.0)
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument("--web-port", type=int, help="port of /metrics (default 6066)")
    demo.add_argument("--refresh", type=float, default=3.0, help="seconds between view updates")
    demo.add_argument("--with-prometheus", action="store_true",
                      help="also run Prometheus (on PATH) with the bundled rules")
    demo.add_argument("--prometheus-port", type=int, default=9090,
                      help="Prometheus port (default 9090; a free one when it is taken)")


def run_demo_command(args: argparse.Namespace, base: Settings) -> int:
    simulation = traffic_simulation(args)  # checks the traffic options before anything starts
    if args.refresh <= 0:
        raise ConfigError("--refresh must be > 0 seconds")
    settings = base.with_overrides(web_port=args.web_port, partitions=4)
    options = DemoOptions(rate=args.rate, duration_s=args.duration, refresh_s=args.refresh,
                          scenario=args.scenario, speed=args.speed, seed=simulation.seed,
                          change_after_s=args.change_after,
                          with_prometheus=args.with_prometheus,
                          prometheus_port=args.prometheus_port)
    log_dir = Path(tempfile.mkdtemp(prefix="acsr-demo-"))
    print(f"worker log: {log_dir / 'worker-0.log'}", file=sys.stderr)
    asyncio.run(run_demo(settings, options, log_dir))
    return 0

"""`acsr-metrics demo`: embedded broker, one worker, live traffic and a terminal view.

Traffic is the bundled worked example played in a loop: each round renames its cases
(so they are new cases) and stamps events with the current time, so the windows and
rates on /metrics are live. Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from .broker import ONE_RECORD_BATCH_BYTES, EmbeddedBroker
from .config import Settings
from .kpis import Aggregate, build_report
from .replay import Cluster, create_topics

COMPLIANCE_OBJECTIVE = 0.999


def sample_lines() -> list[bytes]:
    data = resources.files("streams") / "data" / "sample-events.jsonl"
    return [line for line in data.read_bytes().splitlines() if line.strip()]


def live_traffic(lines: list[bytes]) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) messages: the sample, round after round, with fresh case ids and
    current timestamps; invalid lines go out unchanged (and unkeyed)."""
    round_no = 0
    while True:
        round_no += 1
        suffix = f"-r{round_no}"
        for line in lines:
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict):
                yield None, line
                continue
            for key in ("case_id", "event_id", "related_case_id"):
                if isinstance(doc.get(key), str):
                    doc[key] = doc[key] + suffix
            if isinstance(doc.get("ts"), str | int):
                doc["ts"] = int(time.time() * 1000)
            case_id = doc.get("case_id")
            yield (case_id.encode() if isinstance(case_id, str) else None), orjson.dumps(doc)


async def feed(settings: Settings, rate: float, stop: asyncio.Event) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                max_batch_size=ONE_RECORD_BATCH_BYTES, linger_ms=5)
    await producer.start()
    try:
        interval = 1.0 / rate
        next_at = time.monotonic()
        for key, value in live_traffic(sample_lines()):
            if stop.is_set():
                return
            await producer.send(settings.events_topic, value, key=key)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await producer.stop()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def render(report: dict[str, Any], metrics_url: str) -> Group:
    intents = Table(title="KPIs by intent", expand=True)
    for column in ("intent", "concluded", "ARR", "escalation", "compliance", "AHT", "CSAT",
                   "FCR"):
        intents.add_column(column, justify="left" if column == "intent" else "right")
    for name, kpi in [("all", report["totals"]), *report["by_intent"].items()]:
        intents.add_row(name, str(kpi["cases_concluded"]), _pct(kpi["arr"]),
                        _pct(kpi["escalation_rate"]), _pct(kpi["compliance_score"]),
                        _num(kpi["aht_seconds_mean"], "s"), _num(kpi["csat_mean"]),
                        _pct(kpi["fcr"]))
    reasons = Table(title="Escalations by reason")
    reasons.add_column("reason")
    reasons.add_column("cases", justify="right")
    for reason, n in sorted(report["totals"]["escalations_by_reason"].items(),
                            key=lambda item: -item[1]):
        reasons.add_row(reason, str(n))
    events = report["events"]
    compliance = report["totals"]["compliance_score"]
    status = Table.grid(padding=(0, 2))
    status.add_row(
        f"events valid {events['valid']}", f"invalid {events['invalid']}",
        f"duplicate {events['duplicate']}",
        f"compliance {_pct(compliance)} vs objective {COMPLIANCE_OBJECTIVE:.1%}"
        + ("" if compliance is None or compliance >= COMPLIANCE_OBJECTIVE else "  [red]BELOW[/]"),
        f"metrics: {metrics_url}",
    )
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


async def run_demo(settings: Settings, rate: float, duration_s: float | None,
                   refresh_s: float, log_dir: Path) -> None:
    with EmbeddedBroker() as broker:
        settings = settings.for_embedded(broker.bootstrap)
        await create_topics(settings)
        cluster = Cluster(settings, 1, log_dir)
        worker = cluster.add_worker(0, web_port=settings.web_port)
        metrics_url = f"http://{settings.web_host}:{settings.web_port}/metrics"
        print(f"worker starting; metrics at {metrics_url} (Ctrl-C stops)", flush=True)
        stop = asyncio.Event()
        feeder = asyncio.create_task(feed(settings, rate, stop))
        deadline = None if duration_s is None else time.monotonic() + duration_s
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                with Live(refresh_per_second=1, transient=False) as live:
                    while deadline is None or time.monotonic() < deadline:
                        cluster.check_alive()
                        report = await fetch_report(session, worker.url, settings)
                        if report is not None:
                            live.update(render(report, metrics_url))
                        await asyncio.sleep(refresh_s)
        finally:
            stop.set()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
            cluster.stop()

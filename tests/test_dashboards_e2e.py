"""Every dashboard panel query returns data from a real Prometheus scraping a real worker.

The worker is fed simulated traffic (tests/traffic.py) whose event times are moved to the
last minutes, in a few batches while Prometheus scrapes every second, so the counters
grow inside the queries' rate windows. Panels listed in dashboards/build.py
EVENT_DRIVEN_PANELS (late events, processing errors) may be empty on healthy traffic.
The KPI series come from the group's exposition (job `acsr-group`); the panels that read
a histogram (no `channel` label) must keep their data when a channel is picked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import orjson
import pytest

from streams.tools.replay import Cluster, create_topics, isolated, produce, wait_processed

from .conftest import BrokerInfo
from .prometheus_helpers import get_json, prometheus_binary, query, running_prometheus
from .test_dashboards import DASHBOARDS, HISTOGRAMS, build, panels, substitute
from .traffic import generate

pytestmark = pytest.mark.integration

CASES = 600
BATCHES = 6
SPAN_MS = 20 * 60 * 1000  # the traffic's event times are squeezed into the last 20 minutes


def recent_traffic(cases: int, seed: int) -> list[bytes]:
    """Simulated traffic with every event time moved into [now - SPAN_MS, now]."""
    lines = list(generate(cases, seed))
    docs: list[dict | None] = []
    for line in lines:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            doc = None
        docs.append(doc if isinstance(doc, dict) and isinstance(doc.get("ts"), int) else None)
    stamps = [doc["ts"] for doc in docs if doc is not None]
    low, high = min(stamps), max(stamps)
    now = int(time.time() * 1000)
    out = []
    for line, doc in zip(lines, docs, strict=True):
        if doc is None or doc["ts"] < 1_000_000_000_000:  # invalid samples stay invalid
            out.append(line)
            continue
        doc["ts"] = now - SPAN_MS + (doc["ts"] - low) * SPAN_MS // max(high - low, 1)
        out.append(orjson.dumps(doc))
    return out


def panel_queries(channel: str | None = None) -> list[tuple[str, str, str]]:
    """Every panel query with its variables at `.*` (`$channel` at `channel` if given)."""
    def expr(text: str) -> str:
        return substitute(text.replace("$channel", channel) if channel else text, "1m")

    return [(uid, panel["title"], expr(target["expr"]))
            for uid, doc in DASHBOARDS.items() for panel in panels(doc)
            for target in panel.get("targets", [])]


def reads_histogram(expr: str) -> bool:
    return any(f"{name}_{suffix}" in expr for name in HISTOGRAMS
               for suffix in ("bucket", "sum", "count"))


async def test_every_panel_query_returns_data(kafka: BrokerInfo, tmp_path: Path) -> None:
    prometheus_binary()
    settings = isolated(kafka.settings(partitions=4), uuid.uuid4().hex[:8])
    await create_topics(settings)
    lines = recent_traffic(CASES, seed=11)
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    try:
        target = f"127.0.0.1:{cluster.workers[0].settings.web_port}"
        with running_prometheus([target], tmp_path) as url:
            ends: dict[int, int] = {}
            size = -(-len(lines) // BATCHES)
            for index in range(0, len(lines), size):
                sent = await produce(settings.bootstrap_servers, settings.events_topic,
                                     lines[index:index + size], settings.tansu)
                for partition, end in sent.items():
                    ends[partition] = max(ends.get(partition, 0), end)
                await asyncio.sleep(3)
            await wait_processed(cluster, settings.bootstrap_servers, ends,
                                 lambda done: None, 120)
            await asyncio.sleep(5)  # a few more scrapes of the final counts
            empty = _empty_queries(url)
            if empty:  # a series seen in only one scrape so far: give it a few more
                await asyncio.sleep(5)
                empty = _empty_queries(url)
            # a channel picked in the dashboards: the histogram panels keep their data
            channels = get_json(f"{url}/api/v1/label/channel/values"
                                "?match[]=acsr_cases_concluded_total")["data"]
            picked = [(uid, title, expr) for uid, title, expr in panel_queries(channels[0])
                      if reads_histogram(expr)]
            empty_picked = [(uid, title, expr) for uid, title, expr in picked
                            if not query(url, expr)]
    finally:
        cluster.stop()
    assert not empty, "panel queries without data:\n" + "\n".join(
        f"{uid} / {title}: {expr}" for uid, title, expr in empty)
    assert picked and not empty_picked, f"with channel {channels[0]!r}:\n" + "\n".join(
        f"{uid} / {title}: {expr}" for uid, title, expr in empty_picked)


def _empty_queries(url: str) -> list[tuple[str, str, str]]:
    empty = []
    for uid, title, expr in panel_queries():
        result = query(url, expr)
        if not result and (uid, title) not in build.EVENT_DRIVEN_PANELS:
            empty.append((uid, title, expr))
    return empty

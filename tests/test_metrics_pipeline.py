"""Metrics of real workers agree with the report: two workers, a crash, a rebalance."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from streams.tools.replay import (
    Cluster,
    create_topics,
    produce,
    run_replay,
    wait_processed,
)

from .cluster_helpers import run_settings, wait_committed
from .conftest import BrokerInfo
from .metrics_helpers import by_label, samples, total
from .traffic import generate

pytestmark = pytest.mark.integration


def _nonzero(counts: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in counts.items() if value}


async def test_every_metric_total_matches_the_report(kafka: BrokerInfo, tmp_path: Path) -> None:
    source = tmp_path / "held-out.jsonl"
    source.write_bytes(b"\n".join(generate(400, seed=11)) + b"\n")
    result = await run_replay(source, kafka.settings(partitions=4), workers=2,
                              start_broker=False, log_dir=tmp_path)
    report, text = result.report, result.metrics
    kpi = report["totals"]
    assert kpi["cases_concluded"] > 300

    assert total(text, "acsr_cases_concluded_total") == kpi["cases_concluded"]
    for outcome in ("autonomous", "unverified", "human", "escalated"):
        assert total(text, "acsr_cases_concluded_total", outcome=outcome) == kpi[outcome]
    assert _nonzero(by_label(text, "acsr_escalations_total", "reason")) == \
        kpi["escalations_by_reason"]
    assert total(text, "acsr_policy_checks_total") == kpi["policy_checks"]
    assert total(text, "acsr_policy_checks_total", result="passed") == \
        kpi["policy_checks_passed"]
    assert total(text, "acsr_handling_time_seconds_count") == kpi["aht_count"]
    assert total(text, "acsr_handling_time_seconds_sum") == pytest.approx(
        kpi["aht_seconds_mean"] * kpi["aht_count"])
    assert total(text, "acsr_reopens_total") == kpi["reopened_24h"]
    assert total(text, "acsr_fcr_failures_total") == kpi["fcr_failures_24h"]
    assert total(text, "acsr_csat_score_count") == kpi["csat_count"]
    assert total(text, "acsr_ces_score_count") == kpi["ces_count"]
    assert total(text, "acsr_thumbs_total", vote="up") == kpi["thumbs_up"]
    assert total(text, "acsr_thumbs_total", vote="down") == kpi["thumbs_down"]
    assert total(text, "acsr_overridden_cases_total") == kpi["overridden_cases"]
    assert total(text, "acsr_cost_usd_total") == pytest.approx(kpi["cost_usd_total"])
    assert total(text, "acsr_case_cost_usd_total", outcome="autonomous") == pytest.approx(
        kpi["cost_usd_autonomous"])
    assert total(text, "acsr_response_latency_seconds_sum") / total(
        text, "acsr_response_latency_seconds_count") == pytest.approx(
        kpi["response_latency_seconds_mean"])
    assert total(text, "acsr_fallback_responses_total") == kpi["fallback_responses"]
    assert total(text, "acsr_actions_total") == kpi["actions"]
    assert total(text, "acsr_actions_total", result="failure") == kpi["actions_failed"]
    assert total(text, "acsr_suggestions_reviewed_total") == kpi["suggestions_reviewed"]
    assert total(text, "acsr_suggestions_reviewed_total", adopted="true") == \
        kpi["suggestions_adopted"]
    assert total(text, "acsr_knowledge_flags_total", kind="missing") == kpi["knowledge_missing"]
    assert _nonzero(by_label(text, "acsr_annotation_routed_total", "reason")) == \
        kpi["annotation_routed"]
    assert {name: int(n) for name, n in
            _nonzero(by_label(text, "acsr_evaluation_score_count", "name")).items()} == \
        {name: fig["count"] for name, fig in kpi["evaluations_by_name"].items()}
    events = report["events"]
    assert _nonzero(by_label(text, "acsr_events_total", "type")) == events["by_type"]
    assert _nonzero(by_label(text, "acsr_events_invalid_total", "reason")) == \
        events["invalid_by_reason"]
    assert total(text, "acsr_events_duplicate_total") == events["duplicate"]
    assert total(text, "acsr_worker_up") == 1  # merged gauges: max, not sum
    assert total(text, "acsr_event_time_lag_seconds_count") == \
        events["valid"] + events["duplicate"]


async def _scrape(session: aiohttp.ClientSession, url: str, path: str = "/metrics/group"
                  ) -> str | None:
    try:
        async with session.get(f"{url}{path}") as response:
            return await response.text() if response.status == 200 else None
    except (TimeoutError, aiohttp.ClientError):
        return None


async def _owns_partitions(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/kpis/") as response:
            return bool((await response.json())["owned"])
    except (TimeoutError, aiohttp.ClientError):
        return False


async def test_counters_never_jump_when_a_partition_moves(kafka: BrokerInfo, tmp_path: Path
                                                          ) -> None:
    """A second worker joins mid-stream: every series of the group's exposition only grows,
    and no two workers serve it at once."""
    settings = run_settings(kafka)
    await create_topics(settings)
    lines = list(generate(600, seed=5, invalid_share=0, duplicate_share=0))
    first, rest = lines[: len(lines) // 3], lines[len(lines) // 3:]
    cluster = Cluster(settings, 1, tmp_path)
    cluster.start()
    history: dict[tuple, list[float]] = {}
    sums: list[float] = []
    servers: set[int] = set()
    try:
        ends = await produce(settings.bootstrap_servers, settings.events_topic, first,
                             settings.tansu)
        await wait_committed(settings, 0.9, len(first))
        newcomer = cluster.add_worker(1)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def produce_rest_after_rebalance() -> None:
                for _ in range(600):
                    if await _owns_partitions(session, newcomer.url):
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError("the new worker never owned a partition")
                for start in range(0, len(rest), 300):
                    more = await produce(settings.bootstrap_servers, settings.events_topic,
                                         rest[start:start + 300], settings.tansu)
                    for partition, end in more.items():
                        ends[partition] = max(ends.get(partition, 0), end)
                    await asyncio.sleep(0.3)
                await wait_processed(cluster, settings.bootstrap_servers, ends,
                                     lambda done: None, 120)

            processing = asyncio.create_task(produce_rest_after_rebalance())
            while not processing.done():
                scrape_sum, serving = 0.0, 0
                for worker in cluster.workers:
                    text = await _scrape(session, worker.url)
                    if not text:
                        continue
                    serving += 1
                    servers.add(worker.index)
                    for name, labels, value in samples(text):
                        assert "partition" not in labels
                        if name == "acsr_events_total":
                            history.setdefault((labels["type"],), []).append(value)
                            scrape_sum += value
                assert serving <= 1, "two workers served the group's figures at once"
                sums.append(scrape_sum)
                await asyncio.sleep(0.2)
            await processing
    finally:
        cluster.stop()
    assert servers, "no worker served the group's figures"
    for key, values in history.items():
        assert values == sorted(values), f"series {key} went down: a counter reset"
    assert max(sums) <= len(lines)
    assert len(sums) > 10

"""End to end: a compliance drop reaches Alertmanager.

A real worker processes a compliance-drop scenario, a real Prometheus scrapes it and
evaluates a copy of alerts/*.rules.yml, and a real Alertmanager (configured with a copy of
alerts/alertmanager.yml) must list AcsrComplianceErrorBudgetBurnFast on its API. Prometheus
scrapes as the shipped configuration does (jobs `acsr` and `acsr-group`), so the rules
read the group's KPI series; the group exposition's own alerts (AcsrGroup*) must be
silent once the exporter serves.

The rule copy is shortened so the test runs in about a minute: every range selector
(`[5m]`, `[1h]`, `[3d]`, ...) becomes `[30s]` and every `for:` becomes `5s`; nothing else
changes (`offset 1w` stays and simply finds no data; the minimum-traffic guards keep their
per-second thresholds, which the burst of checks below clears easily).

Counters only show a rate once Prometheus has seen them before the drop, so the worker
first gets a warm-up of compliant cases; once Prometheus has scraped those, the failing
cases follow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from streams.kafka.broker import free_port, stop_process
from streams.tools.replay import Cluster, create_topics, isolated, produce, wait_processed

from .conftest import BrokerInfo
from .prometheus_helpers import (
    get_json,
    prometheus_binary,
    query,
    scrape_configs,
    wait_for_value,
)

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parents[1] / "alerts"
ALERT = "AcsrComplianceErrorBudgetBurnFast"
SHORT_WINDOW = "30s"
SHORT_FOR = "5s"


def shortened_rules(source: Path, out: Path) -> Path:
    """A copy of a rule file with every range selector and every `for:` shortened."""
    text = re.sub(r"\[\d+[smhdwy]\]", f"[{SHORT_WINDOW}]", source.read_text())
    text = re.sub(r"(?m)^(\s+for:\s*)\S+\s*$", rf"\g<1>{SHORT_FOR}", text)
    out.write_text(text)
    return out


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    """Wait for `/-/ready` (Prometheus and Alertmanager both serve it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready: {log.read_text()[-2000:]}")


@contextmanager
def _process(args: list[str], url: str, log_path: Path) -> Iterator[str]:
    log = log_path.open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, process, log_path)
        yield url
    finally:
        stop_process(process, timeout_s=10)
        log.close()


@contextmanager
def running_alertmanager(workdir: Path) -> Iterator[str]:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.skip("Alertmanager is not installed (Debian package `prometheus-alertmanager`)")
    config = workdir / "alertmanager.yml"
    config.write_text((ALERTS / "alertmanager.yml").read_text())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _process([binary, f"--config.file={config}", f"--storage.path={workdir / 'am-data'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                  url, workdir / "alertmanager.log") as ready:
        yield ready


@contextmanager
def running_prometheus_with_alerting(target: str, alertmanager: str, rule_files: list[Path],
                                     workdir: Path) -> Iterator[str]:
    config = workdir / "prometheus.yml"
    rules = "".join(f"\n  - {path}" for path in rule_files)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:{rules}\n"
        "alerting:\n  alertmanagers:\n    - static_configs:\n"
        f"        - targets: ['{alertmanager.removeprefix('http://')}']\n"
        + scrape_configs([target])
    )
    port = free_port()
    with _process([prometheus_binary(), f"--config.file={config}",
                   f"--storage.tsdb.path={workdir / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{port}"],
                  f"http://127.0.0.1:{port}", workdir / "prometheus.log") as url:
        yield url


def cases(run: str, first: int, count: int, passed: bool) -> list[bytes]:
    """`count` refund cases, each with three policy checks that all pass or all fail."""
    now = int(time.time() * 1000)
    lines = []
    for index in range(first, first + count):
        case = f"e2e-{run}-{index:04d}"
        ts = now - 60_000 + index * 10
        events = [
            {"type": "case_opened", "channel": "web", "agent_version": "v7"},
            {"type": "intent_classified", "intent": "refund", "confidence": 0.9},
            *({"type": "policy_checked", "policy": f"p-refund-{n}", "passed": passed}
              for n in range(3)),
            {"type": "case_resolved", "by": "agent"},
        ]
        for n, event in enumerate(events):
            lines.append(orjson.dumps({**event, "case_id": case, "event_id": f"{case}-{n}",
                                       "ts": ts + n}))
    return lines


def firing(alertmanager: str) -> list[dict]:
    return [alert for alert in get_json(f"{alertmanager}/api/v2/alerts")
            if alert["labels"].get("alertname") == ALERT]


async def test_compliance_drop_reaches_alertmanager(kafka: BrokerInfo, tmp_path: Path) -> None:
    prometheus_binary()
    run = uuid.uuid4().hex[:8]
    settings = isolated(kafka.settings(partitions=4), run)
    await create_topics(settings)
    rules = [shortened_rules(ALERTS / name, tmp_path / name)
             for name in ("recording.rules.yml", "alerts.rules.yml")]
    cluster = Cluster(settings, 1, tmp_path / "workers")
    cluster.start()
    try:
        target = f"127.0.0.1:{cluster.workers[0].settings.web_port}"
        with running_alertmanager(tmp_path) as alertmanager, \
                running_prometheus_with_alerting(target, alertmanager, rules, tmp_path) as url:
            warm = cases(run, 0, 20, passed=True)
            ends = await produce(settings.bootstrap_servers, settings.events_topic, warm,
                                 settings.tansu)
            await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None,
                                 120)
            checks = 'sum(acsr_policy_checks_total{job="acsr-group"})'
            assert wait_for_value(url, checks, 60, 60) == 60
            time.sleep(3)  # a few scrapes of the compliant baseline
            assert firing(alertmanager) == []

            drop = cases(run, 20, 40, passed=False)
            ends = await produce(settings.bootstrap_servers, settings.events_topic, drop,
                                 settings.tansu)
            await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None,
                                 120)
            deadline = time.monotonic() + 45
            alerts = firing(alertmanager)
            while not alerts and time.monotonic() < deadline:
                time.sleep(1)
                alerts = firing(alertmanager)
            group_alerts = query(url, 'ALERTS{alertname=~"AcsrGroup.*", alertstate="firing"}')
    finally:
        cluster.stop()
    assert group_alerts == [], group_alerts
    assert alerts, f"{ALERT} never reached Alertmanager; see {tmp_path}/prometheus.log"
    (alert,) = alerts
    assert alert["labels"]["intent"] == "refund"
    assert alert["labels"]["severity"] == "critical"
    assert alert["status"]["state"] == "active"
    assert alert["annotations"]["runbook_url"].endswith(f"#{ALERT.lower()}")
    assert [receiver["name"] for receiver in alert["receivers"]] == ["pager"]

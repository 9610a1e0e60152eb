"""A real Prometheus server (Debian's package) for end-to-end tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from streams.kafka.broker import free_port


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed "
                    "(Debian package `prometheus`; .ci/run installs it)")
    return binary


def scrape_configs(targets: list[str]) -> str:
    """The `scrape_configs:` section of the shipped configuration
    (deploy/prometheus/prometheus.yml) with static `targets`: job `acsr` each worker's
    /metrics, job `acsr-group` the group's /metrics/group with `instance="group"`."""
    return (
        "scrape_configs:\n  - job_name: acsr\n    static_configs:\n"
        + f"      - targets: {targets!r}\n"
        + "  - job_name: acsr-group\n    metrics_path: /metrics/group\n"
        + "    static_configs:\n"
        + f"      - targets: {targets!r}\n"
        + "    metric_relabel_configs:\n      - target_label: instance\n"
        + "        replacement: group\n"
    )


@contextmanager
def running_prometheus(targets: list[str], workdir: Path, rule_files: list[Path] | None = None
                       ) -> Iterator[str]:
    """Prometheus scraping `targets` every second as the shipped configuration does
    (`scrape_configs`); yields its base URL."""
    binary = prometheus_binary()
    config = workdir / "prometheus.yml"
    rules = "".join(f"\n  - {path}" for path in rule_files or [])
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:{rules}\n" if rules else "")
        + scrape_configs(targets)
    )
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def query(url: str, promql: str) -> list[dict]:
    params = urllib.parse.urlencode({"query": promql})
    return get_json(f"{url}/api/v1/query?{params}")["data"]["result"]


def wait_for_value(url: str, promql: str, expected: float, timeout_s: float = 60) -> float:
    """Poll an instant query until it returns `expected`; return the last value seen."""
    deadline = time.monotonic() + timeout_s
    value = float("nan")
    while time.monotonic() < deadline:
        result = query(url, promql)
        if result:
            value = float(result[0]["value"][1])
            if value == expected:
                return value
        time.sleep(0.5)
    return value


Series = tuple[dict[str, str], list[tuple[float, float]]]


def raw_samples(url: str, selector: str, seconds: int) -> list[Series]:
    """Every sample Prometheus stored for `selector` over the last `seconds` (a range
    selector queried at the present: the raw samples, staleness markers left out), as each
    series' labels and its (time, value) pairs in time order."""
    return [(series["metric"], [(float(t), float(v)) for t, v in series["values"]])
            for series in query(url, f"{selector}[{seconds}s]")]


def query_range(url: str, promql: str, start: float, end: float, step: float) -> list[Series]:
    """A range query: each series' labels and its (time, value) points, one a `step`."""
    params = urllib.parse.urlencode({"query": promql, "start": start, "end": end,
                                     "step": step})
    return [(series["metric"], [(float(t), float(v)) for t, v in series["values"]])
            for series in get_json(f"{url}/api/v1/query_range?{params}")["data"]["result"]]

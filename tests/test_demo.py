"""`acsr-metrics demo` as a user runs it: concluded cases on its /metrics, Prometheus with
the bundled rules when asked, and a Ctrl-C that stops every process it started."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from streams.kafka.broker import free_port

from .metrics_helpers import total

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.read().decode()


def test_demo_serves_concluded_cases_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    prometheus_port = free_port() if shutil.which("prometheus") else None
    command = [sys.executable, "-m", "streams", "demo", "--web-port", str(port),
               "--rate", "100", "--seed", "3", "--refresh", "1"]
    if prometheus_port:
        command += ["--with-prometheus", "--prometheus-port", str(prometheus_port)]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp_path)  # as a terminal's job
    try:
        concluded = 0.0
        deadline = time.monotonic() + 90
        while concluded < 20 and time.monotonic() < deadline:
            assert demo.poll() is None, demo.communicate()
            with contextlib.suppress(OSError):
                concluded = total(get(f"http://127.0.0.1:{port}/metrics/group"),
                                  "acsr_cases_concluded_total")
            time.sleep(0.5)
        assert concluded >= 20
        # Its simulated clock runs 60 times faster than the real one and starts in the
        # past: nothing it sends is dated ahead of the real clock.
        metrics = get(f"http://127.0.0.1:{port}/metrics/group")
        assert total(metrics, "acsr_events_invalid_total", reason="future_ts") == 0
        assert total(metrics, "acsr_events_invalid_total", reason="past_ts") == 0
        if prometheus_port:
            assert_prometheus_scrapes_the_worker(prometheus_port)
        children = descendants(demo.pid)
        assert len(children) >= 2 + bool(prometheus_port)  # broker, worker (, prometheus)
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's job
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 0, err
    assert "Traceback" not in err
    assert f"metrics at http://127.0.0.1:{port}/metrics/group" in out
    assert "KPIs by intent" in out and "Escalations by reason" in out
    assert "pipeline: sent" in out
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], "the demo left processes running"


def assert_prometheus_scrapes_the_worker(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    query = urllib.parse.urlencode({"query": 'up{job="acsr"}'})
    deadline = time.monotonic() + 30
    result: list = []
    while time.monotonic() < deadline:
        try:
            result = json.loads(get(f"{base}/api/v1/query?{query}"))["data"]["result"]
        except OSError:
            result = []
        if result and result[0]["value"][1] == "1":
            break
        time.sleep(0.5)
    assert result and result[0]["value"][1] == "1", result
    groups = json.loads(get(f"{base}/api/v1/rules"))["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert "AcsrComplianceErrorBudgetBurnFast" in names
    assert "intent:acsr_policy_checks_errors:ratio_rate5m" in names


def test_demo_refuses_bad_options_before_starting_anything() -> None:
    done = subprocess.run([sys.executable, "-m", "streams", "demo", "--rate", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--rate must be > 0" in done.stderr


def test_the_view_shows_misrouted_events_only_when_there_are_some() -> None:
    from rich.console import Console

    from streams.core.kpis import Aggregate, build_report
    from streams.tools.demo import render

    def shown(misrouted: int) -> str:
        agg = Aggregate()
        agg.count("misrouted", n=misrouted)
        console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(render(build_report(agg), "demo", "rates"))
        return console.export_text()

    assert "3 events misrouted" in shown(3)
    assert "misrouted" not in shown(0)


def test_the_view_shows_implausibly_dated_events() -> None:
    from rich.console import Console

    from streams.core.kpis import Aggregate, build_report
    from streams.tools.demo import render

    agg = Aggregate()
    agg.count("invalid", "future_ts", 2)
    agg.count("invalid", "past_ts", 1)
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(build_report(agg), "demo", "rates"))
    text = console.export_text()
    assert "2 future_ts" in text and "1 past_ts" in text

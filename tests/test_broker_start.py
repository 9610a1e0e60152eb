"""A worker started before (or without) its broker waits, says so, then gives up cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streams.config import ConfigError, Settings, from_env
from streams.kafka.broker import BrokerUnavailable, EmbeddedBroker, ensure_topics, free_port

RETRY_LINE = re.compile(
    r"broker 127\.0\.0\.1:(\d+) unreachable, retrying in (\d+\.\d)s \((\d+\.\d)s left\)")


def run_worker(port: int, wait_s: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "ACSR_BROKER_WAIT_S": wait_s}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "streams", "worker", "--broker", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    return done, time.monotonic() - started


def test_worker_on_a_closed_port_retries_then_exits_3_in_time() -> None:
    port = free_port()  # nothing listens there
    done, elapsed = run_worker(port, "3")

    assert done.returncode == 3, done.stderr
    # The wait is 3 s; the rest is the interpreter and imports starting.
    assert elapsed < 3 + 8, f"took {elapsed:.1f}s"
    attempts = RETRY_LINE.findall(done.stderr)
    assert len(attempts) >= 2, done.stderr
    assert {int(p) for p, _, _ in attempts} == {port}
    pauses = [float(pause) for _, pause, _ in attempts]
    left = [float(remaining) for _, _, remaining in attempts]
    assert pauses[1] > pauses[0]  # backoff
    assert left == sorted(left, reverse=True) and left[0] <= 3.0
    assert f"cannot reach the broker at 127.0.0.1:{port} within 3s" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("raw", ["0", "-1", "soon"])
def test_a_bad_broker_wait_is_a_configuration_error(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"ACSR_BROKER_WAIT_S|broker_wait_s"):
        from_env({"ACSR_BROKER_WAIT_S": raw})


def test_broker_wait_default_and_env() -> None:
    assert Settings().broker_wait_s == 60.0
    assert from_env({"ACSR_BROKER_WAIT_S": "2.5"}).broker_wait_s == 2.5
    assert from_env(Settings(broker_wait_s=7).to_env()).broker_wait_s == 7


async def test_ensure_topics_gives_up_within_the_wait(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="acsr_metrics")
    port = free_port()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"within 1\.5s"):
        await ensure_topics(f"127.0.0.1:{port}", {"t": 1}, timeout_s=1.5)
    assert time.monotonic() - started < 1.5 + 1.0
    assert len(RETRY_LINE.findall(caplog.text)) >= 2


@pytest.mark.integration
async def test_a_broker_that_comes_up_late_is_waited_for() -> None:
    """The retry is real: a broker started two seconds after the worker is used."""
    port = free_port()
    broker = EmbeddedBroker(port=port)
    creating = asyncio.create_task(
        ensure_topics(broker.bootstrap, {"acsr.late.events": 2}, timeout_s=30))
    await asyncio.sleep(2)
    assert not creating.done()
    await asyncio.to_thread(broker.start)
    try:
        await asyncio.wait_for(creating, 30)
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            assert "acsr.late.events" in await admin.list_topics()
        finally:
            await admin.close()
    finally:
        broker.stop()


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("ACSR_MAX_CLOCK_SKEW_S", "0", "max_clock_skew_s must be > 0"),
    ("ACSR_MAX_CLOCK_SKEW_S", "ten minutes", "ACSR_MAX_CLOCK_SKEW_S='ten minutes'"),
    ("ACSR_PARTITIONER", "java", "ACSR_PARTITIONER='java' must be one of murmur2, crc32, fnv1a"),
])
def test_bad_event_settings_fail_at_start_naming_the_setting(name: str, raw: str,
                                                             message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_env({name: raw})


def test_event_settings_reach_the_worker_processes() -> None:
    settings = Settings(max_clock_skew_s=30, partitioner="crc32")
    again = from_env(settings.to_env())
    assert (again.max_clock_skew_s, again.partitioner) == (30, "crc32")
    assert again.event_time_bounds.max_skew_s == 30

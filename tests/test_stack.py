"""The docker compose stack, checked without a Docker engine: the compose file, the images,
the mounted files as the containers will see them, and the settings handed to the code."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.config import Settings, env_name, from_env
from streams.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> str:
    """A compose value with every ${NAME:-default} at its default, as with no .env file."""
    text = _VARIABLE.sub(lambda m: m.group(2) or "", str(value))
    return text.replace("$$", "$")


def bind_mounts(service: str) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts."""
    out = []
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((ROOT / source).resolve(), target))
    return out


def container_view(service: str, root: Path) -> Path:
    """Copy the service's bind mounts under `root` at their container paths."""
    for host, target in bind_mounts(service):
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if host.is_dir():
            shutil.copytree(host, destination)
        else:
            shutil.copy(host, destination)
    return root


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: prometheus / prometheus-alertmanager)")
    return path


def test_the_stack_has_every_service_with_health_checks_and_named_volumes() -> None:
    assert set(SERVICES) == {"kafka", "topics", "worker", "simulator", "prometheus",
                             "alertmanager", "grafana"}
    for name in ("kafka", "worker", "prometheus", "alertmanager", "grafana"):
        assert "test" in SERVICES[name]["healthcheck"], name
    declared = set(COMPOSE["volumes"])
    used = {volume.split(":")[0] for service in SERVICES.values()
            for volume in service.get("volumes", []) if not volume.startswith((".", "/"))}
    assert used == declared == {"kafka-data", "prometheus-data", "alertmanager-data",
                                "grafana-data"}
    # scalable: no fixed name and no host port for the worker
    assert "container_name" not in SERVICES["worker"]
    assert "ports" not in SERVICES["worker"]
    assert SERVICES["topics"]["restart"] == "no"
    assert SERVICES["worker"]["depends_on"]["topics"]["condition"] == \
        "service_completed_successfully"


def test_kafka_runs_in_kraft_single_node_mode() -> None:
    env = SERVICES["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert not any("ZOOKEEPER" in key for key in env)
    assert "INTERNAL://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])  # a base64 UUID


def test_the_topic_service_creates_the_topics_with_the_configured_partitions() -> None:
    topics = SERVICES["topics"]
    script = interpolate(topics["command"][0])
    settings = Settings()
    for topic in (settings.events_topic, settings.dlq_topic, settings.links_topic,
                  settings.annotation_topic):
        assert topic in script
    assert '--partitions "$PARTITIONS"' in script
    assert "--if-not-exists" in script
    assert topics["environment"]["PARTITIONS"] == SERVICES["worker"]["environment"][
        "ACSR_PARTITIONS"] == "${PARTITIONS:-8}"


def test_every_image_is_pinned() -> None:
    images = {name: service["image"] for name, service in SERVICES.items()}
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not a pinned version"
    assert images["grafana"].startswith("grafana/grafana:12.")
    assert images["kafka"].startswith("apache/kafka:")
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert base is not None
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1))
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${PYTHON_IMAGE}"] * 2


def test_the_worker_image_runs_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["acsr-metrics"\]', dockerfile, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignored and "!streams/" in ignored and "!pyproject.toml" in ignored


def test_every_mounted_path_and_build_context_exists() -> None:
    mounts = [(name, host) for name in SERVICES for host, _ in bind_mounts(name)]
    assert len(mounts) >= 7
    for name, host in mounts:
        assert host.exists(), f"{name} mounts {host}, which does not exist"
    for name in ("worker", "simulator"):
        assert (ROOT / SERVICES[name]["build"]["context"] / "Dockerfile").is_file()


def test_promtool_accepts_the_prometheus_config_as_the_container_sees_it(tmp_path: Path) -> None:
    promtool = tool("promtool")
    root = container_view("prometheus", tmp_path)
    config = root / "etc/prometheus/prometheus.yml"
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 2 rule files found" in done.stdout + done.stderr
    command = SERVICES["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command


def test_prometheus_discovers_every_worker_replica_and_sends_to_alertmanager() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    dns = jobs["acsr"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["type"] == "A"
    assert str(dns["port"]) == SERVICES["worker"]["environment"]["ACSR_WEB_PORT"]
    assert SERVICES["worker"]["expose"] == [str(dns["port"])]
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]
    assert "127.0.0.1:9093:9093" in SERVICES["alertmanager"]["ports"]


def test_amtool_accepts_the_alertmanager_config() -> None:
    amtool = tool("amtool")
    (host, target), = [m for m in bind_mounts("alertmanager") if m[1].endswith(".yml")]
    assert f"--config.file={target}" in SERVICES["alertmanager"]["command"]
    done = subprocess.run([amtool, "check-config", str(host)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_parses_and_points_at_the_dashboards(tmp_path: Path) -> None:
    root = container_view("grafana", tmp_path)
    provisioning = root / "etc/grafana/provisioning"
    datasources = yaml.safe_load(next((provisioning / "datasources").glob("*.yml")).read_text())
    source, = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"  # the compose service and its port
    assert "127.0.0.1:9090:9090" in SERVICES["prometheus"]["ports"]
    providers = yaml.safe_load(next((provisioning / "dashboards").glob("*.yml")).read_text())
    provider, = providers["providers"]
    folder = root / provider["options"]["path"].lstrip("/")
    dashboards = sorted(folder.glob("*.json"))
    assert len(dashboards) == 5
    for path in dashboards:
        doc = json.loads(path.read_text())
        assert doc["uid"] and doc["panels"], path.name
        kinds = {v["name"]: v for v in doc["templating"]["list"]}
        assert kinds["datasource"]["query"] == source["type"]
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (root / home.lstrip("/")).is_file()


def _acsr_environment(service: str) -> dict[str, str]:
    return {key: interpolate(value) for key, value in
            SERVICES[service]["environment"].items() if key.startswith("ACSR_")}


def test_the_settings_compose_hands_to_the_code_exist_and_are_valid() -> None:
    known = {env_name(item.name) for item in fields(Settings)}
    for service in ("worker", "simulator"):
        env = _acsr_environment(service)
        assert env and set(env) <= known, f"{service}: unknown {set(env) - known}"
        settings = from_env(env)  # raises on a malformed value
        assert settings.broker == "kafka:9092"
    worker = from_env(_acsr_environment("worker"))
    assert (worker.web_host, worker.web_port, worker.partitions) == ("0.0.0.0", 6066, 8)


def test_the_services_commands_are_ones_the_cli_accepts() -> None:
    parser = build_parser()
    for service in ("worker", "simulator"):
        argv = [interpolate(arg) for arg in SERVICES[service]["command"]]
        args = parser.parse_args(argv)
        assert args.command == argv[0]
    sim = parser.parse_args([interpolate(a) for a in SERVICES["simulator"]["command"]])
    assert (sim.scenario, sim.rate, sim.speed) == ("steady", 20.0, 60.0)


def test_every_setting_and_simulator_option_is_documented_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    configuration = readme[readme.index("## Configuration"):]
    defaults = Settings().to_env()
    for item in fields(Settings):
        name = env_name(item.name)
        row = next((line for line in configuration.splitlines() if f"`{name}`" in line),
                   None)
        assert row is not None, f"{name} is not in the README's configuration reference"
        if item.name == "data_dir":  # the system's temporary directory: said in words
            continue
        shown = f"`{defaults[name]}`" if defaults[name] else "empty"
        assert shown in row, f"{name}: default {shown} is not in its row"
    doc = (ROOT / "docs/configuration.md").read_text()
    commands = next(action for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    for command in ("simulate", "demo"):
        for action in commands.choices[command]._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}`" in doc, f"{command} {flag} is not in docs/configuration.md"

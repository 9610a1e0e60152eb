"""The alert rules, their promtool unit tests and the Alertmanager configuration.

The promtool/amtool tests skip only when the binary is missing (Debian packages
`prometheus` for promtool, `prometheus-alertmanager` for amtool). The lint tests read
the rule file with a small line-based parser (the project does not depend on a YAML
library); they rely on the layout of alerts/alerts.rules.yml: one `- alert:` item per
rule with `labels:` and `annotations:` maps of scalar values.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "alerts"
RULE_FILES = [ALERTS / "recording.rules.yml", ALERTS / "alerts.rules.yml"]
TEST_FILES = [ALERTS / "recording.rules.test.yml", ALERTS / "alerts.rules.test.yml"]
RUNBOOKS = ROOT / "docs" / "runbooks.md"
SEVERITIES = {"critical", "warning", "info"}


def _binary(name: str, package: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        pytest.skip(f"{name} is not installed (Debian package `{package}`)")
    return binary


def _run(args: list[str], cwd: Path = ALERTS) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(rule_file: Path) -> None:
    _run([_binary("promtool", "prometheus"), "check", "rules", str(rule_file)])


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(test_file: Path) -> None:
    _run([_binary("promtool", "prometheus"), "test", "rules", test_file.name])


def test_amtool_check_config() -> None:
    _run([_binary("amtool", "prometheus-alertmanager"), "check-config",
          str(ALERTS / "alertmanager.yml")])


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_alerts(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """{alert name: {"labels": {...}, "annotations": {...}}} from the rule file's layout."""
    alerts: dict[str, dict[str, dict[str, str]]] = {}
    current: dict[str, dict[str, str]] | None = None
    section: str | None = None
    section_indent = 0
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        alert = re.match(r"-\s+alert:\s*(.+)$", stripped)
        if alert:
            current = alerts.setdefault(_unquote(alert.group(1)), {"labels": {},
                                                                   "annotations": {}})
            section = None
            continue
        if stripped.startswith("- "):  # a recording rule or a new group
            current, section = None, None
            continue
        if current is None:
            continue
        if stripped in ("labels:", "annotations:"):
            section, section_indent = stripped[:-1], indent
            continue
        if section is not None and indent > section_indent:
            key, _, value = stripped.partition(":")
            current[section][key.strip()] = _unquote(value)
        else:
            section = None
    return alerts


ALERT_RULES = parse_alerts((ALERTS / "alerts.rules.yml").read_text())


def _anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_the_rule_file_has_alerts() -> None:
    assert len(ALERT_RULES) >= 15, sorted(ALERT_RULES)


@pytest.mark.parametrize("name", sorted(ALERT_RULES))
def test_alert_is_well_formed(name: str) -> None:
    rule = ALERT_RULES[name]
    assert re.fullmatch(r"(?:[A-Z][a-z0-9]+)+", name), f"{name} is not CamelCase"
    assert rule["labels"].get("severity") in SEVERITIES, rule["labels"]
    for key in ("summary", "description", "runbook_url"):
        assert rule["annotations"].get(key), f"{name} has no {key} annotation"
    assert "{{ $value" in rule["annotations"]["description"], "description shows no value"
    path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
    assert path == "docs/runbooks.md", rule["annotations"]["runbook_url"]
    assert anchor == name.lower(), f"anchor {anchor!r} should be {name.lower()!r}"
    assert anchor in _anchors(RUNBOOKS.read_text()), f"no section #{anchor} in docs/runbooks.md"


@pytest.mark.parametrize("name", sorted(ALERT_RULES))
def test_alert_is_unit_tested(name: str) -> None:
    tested = "".join(path.read_text() for path in TEST_FILES)
    fires = re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tested)
    silent = re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tested)
    assert fires, f"no promtool test where {name} fires"
    assert silent, f"no promtool test where {name} stays silent"

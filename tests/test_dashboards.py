"""The Grafana dashboards (dashboards/build.py): committed JSON, lint rules, valid PromQL."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams.core.kpis import Aggregate, Fact
from streams.core.metric_labels import FIGURE_LABELS, METRICS
from streams.metrics import exporter
from streams.metrics.exporter import (
    GroupFigures,
    LabelBounds,
    WorkerView,
    build_registry,
    render_group,
)

promql_parser = pytest.importorskip("promql_parser")
pytest.importorskip("grafana_foundation_sdk")

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "dashboards" / "build.py"
ALERTS = ROOT / "alerts"
COUNTER_FUNCTIONS = {"rate", "increase"}
KPI_VARIABLES = ("intent", "channel", "agent_version")


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("acsr_dashboards_build", BUILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = load_build()
DASHBOARDS: dict[str, dict[str, Any]] = build.build_all()


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


def all_targets() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) of every panel query."""
    return [(uid, panel["title"], target["expr"])
            for uid, doc in DASHBOARDS.items()
            for panel in panels(doc) if panel["type"] != "row"
            for target in panel.get("targets", [])]


def substitute(expr: str, rate_interval: str = "5m") -> str:
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


# --- the metric names the group and a worker expose, from real expositions ----------

def _names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text)
            for sample in family.samples}


def group_metric_names() -> set[str]:
    """Sample names of a /metrics/group exposition where every counter, histogram and
    pipeline figure has a value (so no family is empty)."""
    dims = ("refund", "web", "v1")
    agg = Aggregate()
    for metric in METRICS:
        labels = tuple("x" for _ in FIGURE_LABELS.get(metric.figure, ()))
        agg.add_fact(Fact(metric.figure, labels, 1.0, dims))
    for _, _, name, _, _ in exporter.PIPELINE:
        agg.count(name, "x")
    for _, _, name in exporter.PIPELINE_UNLABELLED:
        agg.count(name, "")
    return _names(render_group(GroupFigures(agg, partitions=4), LabelBounds()).decode())


def worker_metric_names() -> set[str]:
    """Sample names of a worker's own /metrics."""
    registry, lag = build_registry(WorkerView(owned=lambda: {0}, lag=lambda: {0: 3},
                                              exporting=lambda: True,
                                              cells_held=lambda: {0: 2}))
    lag.observe(1.0)
    return _names(generate_latest(registry).decode())


def recording_rule_names() -> set[str]:
    if not ALERTS.is_dir():
        return set()
    names: set[str] = set()
    for path in sorted(ALERTS.glob("*.rules.yml")):
        # Plain text, so the test needs no YAML library: `- record: name` lines.
        names.update(re.findall(r"^\s*-?\s*record:\s*['\"]?([A-Za-z_:][\w:]*)",
                                path.read_text(), flags=re.MULTILINE))
    return names


GROUP_EXPORTED = group_metric_names()
WORKER_EXPORTED = worker_metric_names()
EXPORTED = GROUP_EXPORTED | WORKER_EXPORTED
HISTOGRAMS = {metric.name for metric in METRICS if metric.histogram}


def test_the_expositions_hold_every_kpi_pipeline_and_worker_family() -> None:
    for name in ("acsr_cases_concluded_total", "acsr_handling_time_seconds_bucket",
                 "acsr_events_late_total", "acsr_evaluation_score_count",
                 "acsr_group_partitions"):
        assert name in GROUP_EXPORTED
        assert name not in WORKER_EXPORTED
    for name in ("acsr_event_time_lag_seconds_bucket", "acsr_consumer_lag_messages",
                 "acsr_worker_up", "acsr_partitions_owned", "acsr_table_recovery_in_progress",
                 "acsr_group_exporter"):
        assert name in WORKER_EXPORTED
        assert name not in GROUP_EXPORTED


def test_the_build_knows_the_kpi_histograms() -> None:
    assert set(build.HISTOGRAMS) == HISTOGRAMS


# --- committed JSON --------------------------------------------------------------------

def test_five_dashboards() -> None:
    assert set(DASHBOARDS) == {"acsr-overview", "acsr-escalations", "acsr-quality",
                               "acsr-agent-versions", "acsr-pipeline"}


def test_committed_json_equals_generated() -> None:
    for path, text in build.expected_files().items():
        assert path.exists(), f"{path} is missing: run make dashboards"
        assert path.read_text() == text, f"{path} is stale: run make dashboards"
    committed = {p.name for p in (ROOT / "dashboards" / "json").glob("*.json")}
    assert committed == {f"{uid}.json" for uid in DASHBOARDS}


def test_build_check_exits_0_when_up_to_date() -> None:
    done = subprocess.run([sys.executable, str(BUILD), "--check"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_build_check_lists_a_file_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(build, "OUT", tmp_path)
    assert build.main([]) == 0
    (tmp_path / "acsr-quality.json").write_text("{}\n")
    (tmp_path / "stray.json").write_text("{}\n")
    capsys.readouterr()
    assert build.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "acsr-quality.json" in out and "stray.json" in out
    assert "acsr-overview.json" not in out


def test_generated_files_are_sorted_with_a_trailing_newline() -> None:
    for path, text in build.expected_files().items():
        assert text.endswith("}\n"), path
        assert '"annotations"' in text.split('"panels"')[0], "keys are sorted"


# --- lint ---------------------------------------------------------------------------------

def test_every_panel_has_title_description_and_unit() -> None:
    for uid, doc in DASHBOARDS.items():
        for panel in panels(doc):
            if panel["type"] == "row":
                continue
            where = f"{uid}: {panel.get('title')!r}"
            assert panel.get("title"), where
            assert panel.get("description"), where
            assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), where
            assert panel.get("targets"), where


def test_panel_titles_are_unique_per_dashboard() -> None:
    for uid, doc in DASHBOARDS.items():
        titles = [p["title"] for p in panels(doc)]
        assert len(titles) == len(set(titles)), uid


def test_variables() -> None:
    for uid, doc in DASHBOARDS.items():
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        datasource = variables["datasource"]
        assert datasource["type"] == "datasource"
        assert datasource["label"] == "Data source"
        assert datasource["query"] == "prometheus"
        uses_kpi_variables = any("$intent" in expr for u, _, expr in all_targets() if u == uid)
        if uid == "acsr-pipeline":
            assert not uses_kpi_variables  # pipeline metrics carry no KPI dimensions
            continue
        assert uses_kpi_variables, uid
        for name in KPI_VARIABLES:
            variable = variables[name]
            assert variable["type"] == "query", (uid, name)
            assert variable["multi"] and variable["includeAll"], (uid, name)
            assert variable["allValue"] == ".*", (uid, name)
            assert f"label_values(acsr_cases_concluded_total, {name})" in str(variable["query"])
            assert variable["datasource"]["uid"] == "${datasource}"


def test_panels_and_queries_use_the_datasource_variable() -> None:
    for uid, doc in DASHBOARDS.items():
        for panel in panels(doc):
            assert panel["datasource"]["uid"] == "${datasource}", (uid, panel["title"])
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${datasource}", (uid, panel["title"])


def test_overview_has_alert_annotations() -> None:
    annotations = DASHBOARDS["acsr-overview"]["annotations"]["list"]
    alerts = [a for a in annotations if "ALERTS" in a.get("expr", "")]
    assert alerts and alerts[0]["enable"]
    assert alerts[0]["datasource"]["uid"] == "${datasource}"
    assert 'alertstate="firing"' in alerts[0]["expr"]


def test_overview_stats_have_thresholds() -> None:
    stats = [p for p in panels(DASHBOARDS["acsr-overview"]) if p["type"] == "stat"]
    assert len(stats) >= 10
    for panel in stats:
        assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"], panel["title"]


def test_the_pipeline_shows_the_group_exporter() -> None:
    stats = {p["title"]: p for p in panels(DASHBOARDS["acsr-pipeline"]) if p["type"] == "stat"}
    exporter_panel = stats["Group exporter"]
    assert [t["expr"] for t in exporter_panel["targets"]] == ["sum(acsr_group_exporter)"]
    steps = exporter_panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s.get("value"), s["color"]) for s in steps] == [(None, "red"), (1, "green"),
                                                             (2, "red")]


def test_event_driven_panels_exist() -> None:
    titles = {(uid, p["title"]) for uid, doc in DASHBOARDS.items() for p in panels(doc)}
    assert titles >= build.EVENT_DRIVEN_PANELS


# --- PromQL ---------------------------------------------------------------------------------

def _children(node: Any) -> list[Any]:
    pp = promql_parser
    if isinstance(node, pp.AggregateExpr):
        return [node.expr] + ([node.param] if node.param is not None else [])
    if isinstance(node, pp.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pp.Call):
        return list(node.args)
    if isinstance(node, pp.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, pp.ParenExpr | pp.SubqueryExpr | pp.UnaryExpr):
        return [node.expr]
    return []


def walk(node: Any, ancestors: tuple[Any, ...] = ()) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    yield node, ancestors
    for child in _children(node):
        yield from walk(child, (*ancestors, node))


def selectors(expr: str) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    ast = promql_parser.parse(substitute(expr))
    for node, ancestors in walk(ast):
        if isinstance(node, promql_parser.VectorSelector):
            yield node, ancestors


def test_there_are_queries() -> None:
    assert len(all_targets()) >= 60


@pytest.mark.parametrize(("uid", "title", "expr"), all_targets())
def test_query_parses_as_promql(uid: str, title: str, expr: str) -> None:
    promql_parser.parse(substitute(expr))


@pytest.mark.parametrize(("uid", "title", "expr"), all_targets())
def test_query_names_only_exported_or_recorded_metrics(uid: str, title: str, expr: str) -> None:
    known = EXPORTED | recording_rule_names()
    for node, _ in selectors(expr):
        assert node.name in known, f"{uid} / {title}: {node.name} is neither exported nor recorded"


@pytest.mark.parametrize(("uid", "title", "expr"), all_targets())
def test_counters_only_through_rate_or_increase(uid: str, title: str, expr: str) -> None:
    for node, ancestors in selectors(expr):
        if not node.name.endswith("_total") and not node.name.endswith(("_bucket", "_sum",
                                                                          "_count")):
            continue
        assert len(ancestors) >= 2, f"{uid} / {title}: bare counter {node.name}"
        matrix, call = ancestors[-1], ancestors[-2]
        assert isinstance(matrix, promql_parser.MatrixSelector), (uid, title, node.name)
        assert isinstance(call, promql_parser.Call), (uid, title, node.name)
        assert call.func.name in COUNTER_FUNCTIONS, (uid, title, node.name)


@pytest.mark.parametrize(("uid", "title", "expr"), all_targets())
def test_ranges_are_the_rate_interval(uid: str, title: str, expr: str) -> None:
    ranges = re.findall(r"\[([^\]]*)\]", expr)
    assert all(r == "$__rate_interval" for r in ranges), (uid, title, ranges)


@pytest.mark.parametrize(("uid", "title", "expr"), all_targets())
def test_series_are_summed_without_partition_and_instance(uid: str, title: str,
                                                          expr: str) -> None:
    """The KPI series have no `partition`; `instance` is a worker's (or `group`)."""
    for node, ancestors in selectors(expr):
        aggregations = [a for a in ancestors if isinstance(a, promql_parser.AggregateExpr)]
        assert aggregations, f"{uid} / {title}: {node.name} is not aggregated"
        modifier = aggregations[-1].modifier
        labels = set(modifier.labels) if modifier is not None else set()
        if modifier is not None:
            assert modifier.type == promql_parser.AggModifierType.By, (uid, title)
        assert "instance" not in labels, (uid, title)
        if node.name != "acsr_consumer_lag_messages":  # lag per partition is the point
            assert "partition" not in labels, (uid, title)


def _family(name: str) -> str:
    return (name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            .removesuffix("_total"))


def _matched_labels(expr: str) -> list[tuple[str, set[str], set[str]]]:
    """(metric, labels matched by their variable, every label matched) per KPI selector;
    read from the query before the variables are substituted."""
    ast = promql_parser.parse(expr.replace("$__rate_interval", "5m").replace("$", "VAR_"))
    out = []
    for node, _ in walk(ast):
        if isinstance(node, promql_parser.VectorSelector) and node.name.startswith(KPI_PREFIXES):
            by_variable = {m.name for m in node.matchers.matchers
                           if m.value == f"VAR_{m.name}"}
            out.append((node.name, by_variable, {m.name for m in node.matchers.matchers}))
    return out


@pytest.mark.parametrize(("uid", "title", "expr"), all_targets())
def test_kpi_queries_filter_by_the_variables(uid: str, title: str, expr: str) -> None:
    """Counters by intent, channel and agent version; histograms (no `channel` label) by
    intent and agent version only, and a query that reads a histogram filters nothing
    by channel (a ratio of a channel's counter to every channel's histogram is wrong)."""
    selected = _matched_labels(expr)
    reads_histogram = any(_family(name) in HISTOGRAMS for name, _, _ in selected)
    for name, by_variable, matched in selected:
        if reads_histogram:
            assert by_variable == {"intent", "agent_version"}, (uid, title, name)
            assert "channel" not in matched, (uid, title, name)
        else:
            assert by_variable == set(KPI_VARIABLES), (uid, title, name)


def test_histogram_panels_say_they_are_not_split_by_channel() -> None:
    for uid, doc in DASHBOARDS.items():
        for panel in panels(doc):
            exprs = [target["expr"] for target in panel.get("targets", [])]
            if any(_family(name) in HISTOGRAMS for expr in exprs
                   for name, _, _ in _matched_labels(expr)):
                assert "not split by channel" in panel["description"].lower(), \
                    (uid, panel["title"])


KPI_PREFIXES = tuple(metric.name for metric in METRICS)


def test_dashboards_name_every_kpi_family() -> None:
    used = {node.name for _, _, expr in all_targets() for node, _ in selectors(expr)}
    families = {_family(name) for name in used}
    missing = {name for name in KPI_PREFIXES if name not in families}
    assert not missing, f"no panel shows {sorted(missing)}"

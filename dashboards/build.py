"""Grafana dashboards as code (grafana-foundation-sdk), written to dashboards/json/<uid>.json.

    python dashboards/build.py            # (re)write the JSON files
    python dashboards/build.py --check    # exit 1, listing the files that differ

Every query aggregates with `sum by (...)` (so `instance` and `job` never split a
panel), reads counters only through `rate()`/`increase()` over `$__rate_interval`, and
filters KPI series by the `$intent`, `$channel` and `$agent_version` variables. The KPI
series are the consumer group's (job `acsr-group`, served once at /metrics/group) and
carry no `partition`; only the workers' own gauges (consumer lag) are by partition. The
KPI histograms carry `intent` and `agent_version` but no `channel`: their queries filter
by `$intent` and `$agent_version` only (a `channel` matcher would empty them), and their
panels say they are not split by channel. Metric names are the ones
`streams/metrics/exporter.py` exposes (see docs/kpis.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    LegendDisplayMode,
    LegendPlacement,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    GridPos,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
OUT = HERE / "json"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
COMPLIANCE_OBJECTIVE = 0.999

# Panels that only show data when something unusual happens (an event for a closed
# window, a processing failure, a refused dead letter): an empty result is expected on
# healthy traffic, so the end-to-end test does not require data from them.
EVENT_DRIVEN_PANELS: frozenset[tuple[str, str]] = frozenset({
    ("acsr-pipeline", "Late events by window size"),
    ("acsr-pipeline", "Processing errors and refused dead letters"),
})

# --- PromQL helpers ---------------------------------------------------------------

KPI_FILTER = 'intent=~"$intent", channel=~"$channel", agent_version=~"$agent_version"'
# The KPI histograms (and what is divided by their counts) are not split by channel.
HIST_FILTER = 'intent=~"$intent", agent_version=~"$agent_version"'
HISTOGRAMS = ("acsr_handling_time_seconds", "acsr_csat_score", "acsr_ces_score",
              "acsr_response_latency_seconds", "acsr_evaluation_score")
NO_CHANNEL = ("Not split by channel: the histogram has no channel label, so the Channel "
              "filter does not apply.")


def is_histogram(metric: str) -> bool:
    return metric.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") \
        in HISTOGRAMS


def sel(metric: str, matchers: str = "", kpi: bool = True, channel: bool = True) -> str:
    """`metric{...}` with the KPI filter (without `channel` for a histogram, or when
    `channel` is False) and `matchers`."""
    kpi_filter = KPI_FILTER if channel and not is_histogram(metric) else HIST_FILTER
    parts = [m for m in (kpi_filter if kpi else "", matchers) if m]
    return f"{metric}{{{', '.join(parts)}}}" if parts else metric


def _by(labels: Iterable[str]) -> str:
    labels = list(labels)
    return f"sum by ({', '.join(labels)}) " if labels else "sum "


def rate(metric: str, matchers: str = "", by: Iterable[str] = (), kpi: bool = True,
         fn: str = "rate", offset: str = "", channel: bool = True) -> str:
    off = f" offset {offset}" if offset else ""
    return f"{_by(by)}({fn}({sel(metric, matchers, kpi, channel)}[{RATE}]{off}))"


def ratio(num: str, den: str) -> str:
    return f"{num}\n/\n{den}"


def quantile(q: float, metric: str, by: Iterable[str] = (), kpi: bool = True) -> str:
    return f"histogram_quantile({q}, {rate(metric + '_bucket', by=(*by, 'le'), kpi=kpi)})"


def mean(metric: str, by: Iterable[str] = ()) -> str:
    return ratio(rate(metric + "_sum", by=by), rate(metric + "_count", by=by))


CONCLUDED = "acsr_cases_concluded_total"


def outcome_share(outcome_matcher: str, by: Iterable[str] = ()) -> str:
    return ratio(rate(CONCLUDED, outcome_matcher, by), rate(CONCLUDED, by=by))


def arr(by: Iterable[str] = ()) -> str:
    return outcome_share('outcome="autonomous"', by)


def claimed(by: Iterable[str] = ()) -> str:
    return outcome_share('outcome=~"autonomous|unverified"', by)


def escalation_rate(by: Iterable[str] = ()) -> str:
    return outcome_share('outcome="escalated"', by)


def compliance(by: Iterable[str] = ()) -> str:
    return ratio(rate("acsr_policy_checks_total", 'result="passed"', by),
                 rate("acsr_policy_checks_total", by=by))


def error_budget_left(by: Iterable[str] = ()) -> str:
    failed = ratio(rate("acsr_policy_checks_total", 'result="failed"', by),
                   rate("acsr_policy_checks_total", by=by))
    return f"1 - (\n{failed}\n) / {1 - COMPLIANCE_OBJECTIVE:.3f}"


def fcr(by: Iterable[str] = ()) -> str:
    autonomous = rate(CONCLUDED, 'outcome="autonomous"', by)
    # A group with no FCR failure has no acsr_fcr_failures_total series: count it as 0.
    failures = f"({rate('acsr_fcr_failures_total', by=by)} or {autonomous} * 0)"
    return f"({autonomous} - {failures})\n/\n{autonomous}"


def cost_per_resolution(by: Iterable[str] = ()) -> str:
    return ratio(rate("acsr_case_cost_usd_total", 'outcome="autonomous"', by),
                 rate(CONCLUDED, 'outcome="autonomous"', by))


def override_rate(by: Iterable[str] = ()) -> str:
    return ratio(rate("acsr_overridden_cases_total", by=by), rate(CONCLUDED, by=by))


def adoption_rate(by: Iterable[str] = ()) -> str:
    return ratio(rate("acsr_suggestions_reviewed_total", 'adopted="true"', by),
                 rate("acsr_suggestions_reviewed_total", by=by))


def thumbs_down_share(by: Iterable[str] = ()) -> str:
    return ratio(rate("acsr_thumbs_total", 'vote="down"', by), rate("acsr_thumbs_total", by=by))


def fallback_rate(by: Iterable[str] = ()) -> str:
    """Over the responses the latency histogram counts, which has no channel: the
    numerator is not filtered by channel either, so the ratio stays one of like for like."""
    return ratio(rate("acsr_fallback_responses_total", by=by, channel=False),
                 rate("acsr_response_latency_seconds_count", by=by))


# --- panel helpers ----------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = "__auto"
    instant: bool = False
    fmt: PromQueryFormat | None = None


def _targets(queries: list[Q]) -> list[prom.Dataquery]:
    out = []
    for index, q in enumerate(queries):
        target = (prom.Dataquery().expr(q.expr).legend_format(q.legend)
                  .ref_id(chr(ord("A") + index)).datasource(DATASOURCE))
        target = target.instant() if q.instant else target.range()
        if q.fmt is not None:
            target = target.format(q.fmt)
        out.append(target)
    return out


def _thresholds(steps: list[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=value, color=color) for value, color in steps])


GOOD_HIGH = [(None, "red"), (0.6, "orange"), (0.75, "green")]


def stat_panel(title: str, description: str, unit: str, queries: list[Q],
               steps: list[tuple[float | None, str]], decimals: int | None = None,
               minimum: float | None = None, maximum: float | None = None) -> stat.Panel:
    panel = (stat.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).targets(_targets(queries))
             .thresholds(_thresholds(steps))
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if decimals is not None:
        panel = panel.decimals(decimals)
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    return panel


def ts_panel(title: str, description: str, unit: str, queries: list[Q],
             minimum: float | None = None, maximum: float | None = None,
             stacked: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).targets(_targets(queries))
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM).show_legend(True))
             .line_width(1).fill_opacity(40 if stacked else 10))
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    return panel


def bar_panel(title: str, description: str, unit: str, queries: list[Q]) -> bargauge.Panel:
    return (bargauge.Panel().title(title).description(description).unit(unit)
            .datasource(DATASOURCE).targets(_targets(queries))
            .display_mode(BarGaugeDisplayMode.BASIC).orientation(VizOrientation.HORIZONTAL)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .thresholds(_thresholds([(None, "blue")])))


Row = list[tuple[Any, int]]  # (panel builder, width); a row is 24 wide


def _dashboard(uid: str, title: str, description: str, rows: list[tuple[Row, int]],
               kpi_variables: bool = True, alerts: bool = False) -> db.Dashboard:
    dash = (db.Dashboard(title).uid(uid).description(description)
            .tags(["acsr", "customer-support", "ai-agents"]).timezone("utc")
            .time("now-6h", "now").refresh("1m").tooltip(DashboardCursorSync.CROSSHAIR)
            .editable()
            .with_variable(db.DatasourceVariable("datasource").label("Data source")
                           .type("prometheus")))
    if kpi_variables:
        for name, label in (("intent", "Intent"), ("channel", "Channel"),
                            ("agent_version", "Agent version")):
            dash = dash.with_variable(
                db.QueryVariable(name).label(label).datasource(DATASOURCE)
                .query({"qryType": 1,
                        "query": f"label_values(acsr_cases_concluded_total, {name})",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery"})
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                .multi(True).include_all(True).all_value(".*"))
    if alerts:
        dash = dash.annotation(
            db.AnnotationQuery().name("Firing alerts").datasource(DATASOURCE).enable(True)
            .icon_color("red").expr('ALERTS{alertstate="firing"}'))
    y = 0
    for row, height in rows:
        x = 0
        for panel, width in row:
            dash = dash.with_panel(panel.grid_pos(GridPos(h=height, w=width, x=x, y=y)))
            x += width
        y += height
    return dash


# --- the dashboards ---------------------------------------------------------------


def overview() -> db.Dashboard:
    stats: Row = [
        (stat_panel("ARR (strict)",
                    "Autonomous resolution rate: autonomous conclusions / all conclusions, "
                    "by the strict test (intent known, no failed policy check, no override, "
                    "last attempt of every action succeeded).",
                    "percentunit", [Q(arr())], GOOD_HIGH, 1), 3),
        (stat_panel("Claimed resolutions",
                    "Share of conclusions the agent claimed as resolved (autonomous + "
                    "unverified). The gap to ARR (strict) is claims the strict test rejects.",
                    "percentunit", [Q(claimed())], GOOD_HIGH, 1), 3),
        (stat_panel("Escalation rate", "Escalated conclusions / all conclusions.",
                    "percentunit", [Q(escalation_rate())],
                    [(None, "green"), (0.15, "orange"), (0.25, "red")], 1), 3),
        (stat_panel("AHT p50", "Median handling time of autonomous cases (opened to "
                    f"concluded), from the histogram. {NO_CHANNEL}", "s",
                    [Q(quantile(0.5, "acsr_handling_time_seconds"))],
                    [(None, "green"), (300, "orange"), (900, "red")]), 3),
        (stat_panel("AHT p90", "90th percentile handling time of autonomous cases. "
                    + NO_CHANNEL, "s",
                    [Q(quantile(0.9, "acsr_handling_time_seconds"))],
                    [(None, "green"), (600, "orange"), (1800, "red")]), 3),
        (stat_panel("Compliance score",
                    "Passed policy checks / all policy checks; objective 99.9%.",
                    "percentunit", [Q(compliance())],
                    [(None, "red"), (COMPLIANCE_OBJECTIVE, "green")], 2), 3),
        (stat_panel("Error budget left",
                    "Share of the compliance error budget (0.1% failed checks) not consumed "
                    "at the current failure rate: 1 - failure rate / 0.001. Below 0 the "
                    "objective is missed.",
                    "percentunit", [Q(error_budget_left())],
                    [(None, "red"), (0, "orange"), (0.5, "green")], 0), 3),
        (stat_panel("FCR", "First-contact resolution: autonomous cases not reopened or "
                    "re-engaged within 24 h / autonomous cases.", "percentunit", [Q(fcr())],
                    [(None, "red"), (0.8, "orange"), (0.9, "green")], 1), 3),
    ]
    stats2: Row = [
        (stat_panel("CSAT", f"Mean CSAT score (1-5) of the surveys submitted. {NO_CHANNEL}",
                    "none",
                    [Q(mean("acsr_csat_score"))],
                    [(None, "red"), (3.5, "orange"), (4.2, "green")], 2, 1, 5), 4),
        (stat_panel("CES", f"Mean customer effort score (1-7, 7 = very easy). {NO_CHANNEL}",
                    "none",
                    [Q(mean("acsr_ces_score"))],
                    [(None, "red"), (4, "orange"), (5.5, "green")], 2, 1, 7), 4),
        (stat_panel("Cost per autonomous resolution",
                    "Cost of autonomous cases (USD) / autonomous conclusions.",
                    "currencyUSD", [Q(cost_per_resolution())],
                    [(None, "green"), (0.05, "orange"), (0.1, "red")], 3), 4),
        (stat_panel("Conclusions / s", "Cases concluded per second, every outcome.", "cps",
                    [Q(rate(CONCLUDED))], [(None, "blue")], 2), 4),
        (stat_panel("Override rate", "Cases with a human override / conclusions.",
                    "percentunit", [Q(override_rate())],
                    [(None, "green"), (0.05, "orange"), (0.1, "red")], 1), 4),
        (stat_panel("Response latency p90", "90th percentile agent response latency. "
                    + NO_CHANNEL, "s",
                    [Q(quantile(0.9, "acsr_response_latency_seconds"))],
                    [(None, "green"), (2, "orange"), (5, "red")], 2), 4),
    ]
    series1: Row = [
        (ts_panel("ARR (strict) vs claimed resolutions",
                  "Strict autonomous resolution rate beside the share the agent claimed "
                  "resolved.", "percentunit",
                  [Q(arr(), "ARR (strict)"), Q(claimed(), "claimed")], 0, 1), 12),
        (ts_panel("Conclusions by outcome", "Cases concluded per second by outcome.", "cps",
                  [Q(rate(CONCLUDED, by=("outcome",)), "{{outcome}}")], stacked=True), 12),
    ]
    series2: Row = [
        (ts_panel("Escalation rate over time", "Escalated conclusions / all conclusions.",
                  "percentunit", [Q(escalation_rate(), "escalation rate")], 0, 1), 8),
        (ts_panel("AHT p50 / p90", f"Handling time quantiles of autonomous cases. {NO_CHANNEL}",
                  "s",
                  [Q(quantile(0.5, "acsr_handling_time_seconds"), "p50"),
                   Q(quantile(0.9, "acsr_handling_time_seconds"), "p90")], 0), 8),
        (ts_panel("Compliance vs objective", "Compliance score against its 99.9% objective.",
                  "percentunit", [Q(compliance(), "compliance"),
                                  Q(f"vector({COMPLIANCE_OBJECTIVE})", "objective")]), 8),
    ]
    series3: Row = [
        (ts_panel("FCR over time", "First-contact resolution of autonomous cases.", "percentunit",
                  [Q(fcr(), "FCR")], 0, 1), 8),
        (ts_panel("CSAT and CES", f"Mean CSAT (1-5) and CES (1-7) over time. {NO_CHANNEL}",
                  "none",
                  [Q(mean("acsr_csat_score"), "CSAT"), Q(mean("acsr_ces_score"), "CES")],
                  0, 7), 8),
        (ts_panel("Cost per autonomous resolution over time", "USD per autonomous conclusion.",
                  "currencyUSD", [Q(cost_per_resolution(), "cost / resolution")], 0), 8),
    ]
    return _dashboard(
        "acsr-overview", "ACSR / Overview",
        "What a team lead opens every morning: resolution, escalation, handling time, "
        "compliance, satisfaction and cost of the customer-support AI agents.",
        [(stats, 4), (stats2, 4), (series1, 8), (series2, 8), (series3, 8)], alerts=True)


def escalations() -> db.Dashboard:
    esc = "acsr_escalations_total"
    movers = (f"topk(5,\n{rate(esc, by=('reason',))}\n-\n"
              f"({rate(esc, by=('reason',), offset='1d')} or {rate(esc, by=('reason',))} * 0)\n)")
    rows: list[tuple[Row, int]] = [
        ([(bar_panel("Escalations by reason (Pareto)",
                     "Concluding escalations per second by reason code, largest first.",
                     "cps", [Q(f"sort_desc({rate(esc, by=('reason',))})", "{{reason}}",
                               instant=True)]), 12),
          (bar_panel("Escalations by intent",
                     "Concluding escalations per second by intent, largest first.",
                     "cps", [Q(f"sort_desc({rate(esc, by=('intent',))})", "{{intent}}",
                               instant=True)]), 12)], 10),
        ([(ts_panel("Escalation trend by reason", "Concluding escalations per second by "
                    "reason code.", "cps", [Q(rate(esc, by=("reason",)), "{{reason}}")],
                    stacked=True), 12),
          (ts_panel("Escalation rate by intent", "Escalated conclusions / conclusions, per "
                    "intent.", "percentunit",
                    [Q(escalation_rate(by=("intent",)), "{{intent}}")], 0, 1), 12)], 9),
        ([(bar_panel("Top movers (rising) vs a day ago",
                     "The five reasons whose escalation rate rose most against the same "
                     "time yesterday (a reason absent yesterday counts from 0).", "cps",
                     [Q(movers, "{{reason}}", instant=True)]), 12),
          (ts_panel("Escalation rate by channel", "Escalated conclusions / conclusions, per "
                    "channel.", "percentunit",
                    [Q(escalation_rate(by=("channel",)), "{{channel}}")], 0, 1), 12)], 9),
    ]
    return _dashboard("acsr-escalations", "ACSR / Escalations",
                      "Why and where the agents hand cases to humans.", rows)


def quality() -> db.Dashboard:
    dist = PromQueryFormat.HEATMAP
    rows: list[tuple[Row, int]] = [
        ([(ts_panel("Thumbs votes", "Thumbs votes per second by vote.", "cps",
                    [Q(rate("acsr_thumbs_total", by=("vote",)), "{{vote}}")], stacked=True), 8),
          (ts_panel("Thumbs-down share", "Thumbs-down votes / all votes.", "percentunit",
                    [Q(thumbs_down_share(), "thumbs down")], 0, 1), 8),
          (ts_panel("Override rate", "Cases with a human override / conclusions.",
                    "percentunit", [Q(override_rate(), "override rate")], 0, 1), 8)], 8),
        ([(bar_panel("CSAT distribution", "CSAT surveys per second by score bucket (le). "
                     + NO_CHANNEL, "cps", [Q(rate("acsr_csat_score_bucket", by=("le",)), "{{le}}",
                               instant=True, fmt=dist)]), 12),
          (bar_panel("CES distribution", "CES surveys per second by score bucket (le). "
                     + NO_CHANNEL, "cps", [Q(rate("acsr_ces_score_bucket", by=("le",)), "{{le}}",
                               instant=True, fmt=dist)]), 12)], 8),
        ([(ts_panel("Annotation queue inflow by reason",
                    "Cases routed to the annotation queue per second, by reason.", "cps",
                    [Q(rate("acsr_annotation_routed_total", by=("reason",)), "{{reason}}")],
                    stacked=True), 12),
          (ts_panel("Suggestion adoption rate",
                    "AI-drafted replies adopted / reviewed by a human.", "percentunit",
                    [Q(adoption_rate(), "adoption rate")], 0, 1), 12)], 8),
        ([(ts_panel("Missing knowledge by intent",
                    "Knowledge flagged missing per second, by intent.", "cps",
                    [Q(rate("acsr_knowledge_flags_total", 'kind="missing"', ("intent",)),
                       "{{intent}}")], stacked=True), 12),
          (ts_panel("Knowledge flags by kind", "Knowledge flagged per second, by kind.", "cps",
                    [Q(rate("acsr_knowledge_flags_total", by=("kind",)), "{{kind}}")]), 12)],
         8),
        ([(ts_panel("Evaluation scores", "Mean evaluation score (0-1) by evaluation name. "
                    + NO_CHANNEL, "percentunit",
                    [Q(mean("acsr_evaluation_score", ("name",)), "{{name}}")], 0, 1), 12),
          (ts_panel("Fallback responses and reopens",
                    "Safe fallback answers / responses sent, and reopened autonomous cases "
                    "/ autonomous conclusions. The fallback rate is not split by channel: "
                    "responses are counted by the response latency histogram, which has no "
                    "channel label, so the Channel filter applies to the reopen rate only.",
                    "percentunit",
                    [Q(fallback_rate(), "fallback rate"),
                     Q(ratio(rate("acsr_reopens_total"),
                             rate(CONCLUDED, 'outcome="autonomous"')), "reopen rate")],
                    0), 12)], 8),
        ([(ts_panel("Action failure rate by action",
                    "Failed action executions / action executions, per action (a failed "
                    "attempt retried successfully still counts here).", "percentunit",
                    [Q(ratio(rate("acsr_actions_total", 'result="failure"', ("action",)),
                             rate("acsr_actions_total", by=("action",))), "{{action}}")],
                    0, 1), 12),
          (ts_panel("Spend by channel", "Every cost_usd as it arrives, USD per second, by "
                    "channel.", "currencyUSD",
                    [Q(rate("acsr_cost_usd_total", by=("channel",)), "{{channel}}")],
                    0, stacked=True), 12)], 8),
    ]
    return _dashboard("acsr-quality", "ACSR / Quality and feedback loop",
                      "Customer feedback, human corrections and what goes to annotation.", rows)


def agent_versions() -> db.Dashboard:
    v = ("agent_version",)
    legend = "{{agent_version}}"

    def panel(title: str, description: str, unit: str, expr: str, lo: float | None = 0,
              hi: float | None = None) -> timeseries.Panel:
        return ts_panel(f"{title} by agent version", description, unit, [Q(expr, legend)],
                        lo, hi)

    kpis = [
        panel("ARR (strict)", "Autonomous conclusions / conclusions.", "percentunit", arr(v),
              0, 1),
        panel("Claimed resolutions", "Autonomous + unverified conclusions / conclusions.",
              "percentunit", claimed(v), 0, 1),
        panel("Escalation rate", "Escalated conclusions / conclusions.", "percentunit",
              escalation_rate(v), 0, 1),
        panel("AHT p50", f"Median handling time of autonomous cases. {NO_CHANNEL}", "s",
              quantile(0.5, "acsr_handling_time_seconds", v)),
        panel("AHT p90", f"90th percentile handling time of autonomous cases. {NO_CHANNEL}",
              "s",
              quantile(0.9, "acsr_handling_time_seconds", v)),
        panel("Compliance score", "Passed policy checks / policy checks (objective 99.9%).",
              "percentunit", compliance(v), None, 1),
        panel("FCR", "First-contact resolution of autonomous cases.", "percentunit", fcr(v),
              0, 1),
        panel("CSAT", f"Mean CSAT score (1-5). {NO_CHANNEL}", "none",
              mean("acsr_csat_score", v), 1, 5),
        panel("CES", f"Mean CES score (1-7). {NO_CHANNEL}", "none", mean("acsr_ces_score", v),
              1, 7),
        panel("Cost per autonomous resolution", "USD per autonomous conclusion.",
              "currencyUSD", cost_per_resolution(v)),
        panel("Override rate", "Overridden cases / conclusions.", "percentunit",
              override_rate(v), 0, 1),
        panel("Thumbs-down share", "Thumbs-down votes / votes.", "percentunit",
              thumbs_down_share(v), 0, 1),
        panel("Response latency p90", f"90th percentile response latency. {NO_CHANNEL}", "s",
              quantile(0.9, "acsr_response_latency_seconds", v)),
        panel("Fallback rate", "Fallback answers / responses sent. Not split by channel: "
              "responses are counted by the response latency histogram, which has no channel "
              "label, so the Channel filter does not apply.", "percentunit",
              fallback_rate(v), 0, 1),
        panel("Suggestion adoption rate", "Adopted / reviewed AI-drafted replies.",
              "percentunit", adoption_rate(v), 0, 1),
        panel("Conclusions", "Cases concluded per second.", "cps", rate(CONCLUDED, by=v)),
    ]
    rows: list[tuple[Row, int]] = [
        ([(bar_panel("ARR (strict) now, by agent version",
                     "Autonomous resolution rate per agent version, last rate interval.",
                     "percentunit", [Q(arr(v), legend, instant=True)]), 12),
          (bar_panel("Escalation rate now, by agent version",
                     "Escalation rate per agent version, last rate interval.", "percentunit",
                     [Q(escalation_rate(v), legend, instant=True)]), 12)], 6),
    ]
    for index in range(0, len(kpis), 3):
        rows.append(([(p, 8) for p in kpis[index:index + 3]], 8))
    return _dashboard("acsr-agent-versions", "ACSR / Agent versions",
                      "A/B comparison of every KPI by agent_version.", rows)


def pipeline() -> db.Dashboard:
    def r(metric: str, by: Iterable[str] = ()) -> str:
        return rate(metric, by=by, kpi=False)

    rows: list[tuple[Row, int]] = [
        ([(stat_panel("Workers up", "Workers answering scrapes (acsr_worker_up).", "none",
                      [Q("sum(acsr_worker_up)")], [(None, "red"), (1, "green")], 0), 3),
          (stat_panel("Partitions owned", "Events partitions owned by the workers, summed.",
                      "none", [Q("sum(acsr_partitions_owned)")], [(None, "red"), (1, "green")],
                      0), 3),
          (stat_panel("Group exporter",
                      "Workers serving the group's KPI figures at /metrics/group (sum of "
                      "acsr_group_exporter): 1 is right. 0 (or no value): no worker serves "
                      "them, every KPI panel stops (runbook AcsrGroupExporterMissing); more "
                      "than 1: two sources under one identity (AcsrGroupExporterDuplicated).",
                      "none", [Q("sum(acsr_group_exporter)")],
                      [(None, "red"), (1, "green"), (2, "red")], 0), 3),
          (stat_panel("Tables recovering", "Workers recovering tables from changelogs "
                      "(1 while a worker recovers).", "none",
                      [Q("sum(acsr_table_recovery_in_progress)")],
                      [(None, "green"), (1, "orange")], 0), 3),
          (stat_panel("Consumer lag", "Messages of the events topic not yet processed, all "
                      "partitions.", "short", [Q("sum(acsr_consumer_lag_messages)")],
                      [(None, "green"), (1000, "orange"), (10000, "red")], 0), 4),
          (stat_panel("Events / s", "Valid events processed per second.", "cps",
                      [Q(r("acsr_events_total"))], [(None, "blue")], 1), 4),
          (stat_panel("Event-time lag p99", "99th percentile processing time minus event "
                      "time.", "s", [Q(quantile(0.99, "acsr_event_time_lag_seconds", kpi=False))],
                      [(None, "green"), (60, "orange"), (300, "red")], 1), 4)], 4),
        ([(ts_panel("Events / s by type", "Valid events processed per second, by type.",
                    "cps", [Q(r("acsr_events_total", ("type",)), "{{type}}")], stacked=True),
           8),
          (ts_panel("Invalid and duplicate events",
                    "Invalid messages (dead-lettered) per second by reason, and duplicates "
                    "dropped.", "cps",
                    [Q(r("acsr_events_invalid_total", ("reason",)), "invalid: {{reason}}"),
                     Q(r("acsr_events_duplicate_total"), "duplicate")]), 8),
          (ts_panel("Misrouted events",
                    "Valid events per second found on a partition that ACSR_PARTITIONER does "
                    "not give their case_id: 0 unless the producers use another partitioner "
                    "(fcr is then wrong). The worker log names the partitions and the value "
                    "that fits (runbook AcsrEventsMisrouted).",
                    "cps", [Q(r("acsr_events_misrouted_total"), "misrouted")], 0), 8)], 8),
        ([(ts_panel("Late events by window size",
                    "Events for an already closed window per second (event-driven: empty "
                    "while nothing arrives late).", "cps",
                    [Q(r("acsr_events_late_total", ("window",)), "window {{window}} s")]), 8),
          (ts_panel("Processing errors and refused dead letters",
                    "Valid messages that failed processing, and invalid messages the "
                    "dead-letter topic refused (event-driven: empty while healthy).", "cps",
                    [Q(r("acsr_processing_errors_total", ("reason",)), "error: {{reason}}"),
                     Q(r("acsr_dead_letter_failed_total", ("reason",)),
                       "dead letter refused: {{reason}}")]), 8),
          (ts_panel("Fields normalised", "Fields normalised per second (e.g. an unknown "
                    "escalation reason).", "cps",
                    [Q(r("acsr_events_normalised_total", ("field",)), "{{field}}")]), 8)], 8),
        ([(ts_panel("Consumer lag by partition", "Messages not yet processed, per events "
                    "partition.", "short",
                    [Q("sum by (partition) (acsr_consumer_lag_messages)",
                       "partition {{partition}}")],
                    0), 8),
          (ts_panel("Event-time lag", "Processing time minus event time: p50 and p99.", "s",
                    [Q(quantile(0.5, "acsr_event_time_lag_seconds", kpi=False), "p50"),
                     Q(quantile(0.99, "acsr_event_time_lag_seconds", kpi=False), "p99")], 0), 8),
          (ts_panel("Workers, partitions and recovery",
                    "Workers up, partitions owned, workers recovering tables, workers serving "
                    "the group's KPI figures (1 is right) and the partitions those figures "
                    "hold (acsr_group_partitions: as many as the partitions owned).", "none",
                    [Q("sum(acsr_worker_up)", "workers up"),
                     Q("sum(acsr_partitions_owned)", "partitions owned"),
                     Q("sum(acsr_table_recovery_in_progress)", "recovering"),
                     Q("sum(acsr_group_exporter)", "group exporters"),
                     Q("sum(acsr_group_partitions)", "partitions in the group's figures")],
                    0), 8)], 8),
    ]
    return _dashboard("acsr-pipeline", "ACSR / Pipeline health",
                      "Is the stream processor keeping up, and is its input clean?", rows,
                      kpi_variables=False)


def build_all() -> dict[str, dict[str, Any]]:
    """Every dashboard as a JSON document, by uid."""
    out = {}
    for builder in (overview(), escalations(), quality(), agent_versions(), pipeline()):
        doc = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
        for index, panel in enumerate(doc["panels"], start=1):
            panel["id"] = index
        out[doc["uid"]] = doc
    return out


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files() -> dict[Path, str]:
    return {OUT / f"{uid}.json": render(doc) for uid, doc in build_all().items()}


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a committed file differs from the generated one")
    args = parser.parse_args(argv)
    files = expected_files()
    stale = sorted(OUT.glob("*.json"))
    if args.check:
        differ = [path for path, text in files.items()
                  if not path.exists() or path.read_text() != text]
        differ += [path for path in stale if path not in files]
        for path in differ:
            print(f"differs from the generated: {_show(path)}")
        if differ:
            print("run `python dashboards/build.py` (make dashboards) to regenerate")
        return 1 if differ else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for path in stale:
        if path not in files:
            path.unlink()
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {_show(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The OpenTelemetry bridge end to end: an agent's traces give the report of its story.

An agent script instrumented with the OpenTelemetry SDK (GenAI attributes, LLM calls
nested in agent spans, tool spans, an evaluation event, `acsr.*` attributes for intent,
policy and resolution, the case id and channel as baggage) serves three cases. Its spans
go onto the broker as the Collector's Kafka exporter writes them: unkeyed
ExportTraceServiceRequest messages of several traces each, in end order, in either
encoding. The bridge (standalone, or run by the worker itself) and a worker turn them into
a report, which must equal the report of the contract events a producer would have sent
for the same story, written out by hand below (not made by the mapper under test).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from streams.config import Settings
from streams.kafka.broker import ensure_topics
from streams.kafka.security import kafka_client_kwargs
from streams.metrics.exporter import metric_sums
from streams.tools.history import History
from streams.tools.otel_bridge import BridgeMetrics, BridgeTopics, run_bridge
from streams.tools.replay import (
    REPLAY_WINDOW_RETENTION_S,
    Loader,
    end_offsets,
    run_replay,
)

from .conftest import BrokerInfo, report_mismatches
from .test_otel_bridge import read_all, send_all
from .test_otlp import as_json, as_proto

pytestmark = pytest.mark.integration

PARTITIONS = 2
MESSAGES = 5  # the exporter's batches the spans are split into
# The story happened two hours ago, on the minute: every `ts` is in the past (no
# future_ts) and both the spans and the hand-written events are timed from here.
BASE_MS = (int(time.time()) // 60 - 120) * 60_000
NS_PER_MS = 1_000_000
# Cases overlap in time, so each exporter batch holds spans of several cases and traces.
A, B, C = 0, 1_500, 3_000  # when each case starts, ms after BASE_MS
TURN_2 = 60_000  # a customer's second message, a minute after the case opened


def at(offset_ms: int) -> int:
    """Epoch milliseconds `offset_ms` after the story's start."""
    return BASE_MS + offset_ms


# --- the agent script ------------------------------------------------------------------


class Agent:
    """One deployment of the support agent, as its team instruments it: a TracerProvider
    whose resource names the build (`acsr.agent_version`), the SDK's baggage span
    processor copying the case id and channel onto every span (docs/otel.md, The case)."""

    def __init__(self, version: str, exporter: InMemorySpanExporter) -> None:
        provider = TracerProvider(resource=Resource.create(
            {"service.name": "support-agent", "acsr.agent_version": version}))
        provider.add_span_processor(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = provider.get_tracer("support-agent")

    @contextlib.contextmanager
    def case(self, case_key: str, case_id: str, channel: str) -> Iterator[None]:
        """Everything within runs under the case's baggage."""
        ctx = baggage.set_baggage(case_key, case_id)
        token = context.attach(baggage.set_baggage("acsr.channel", channel, context=ctx))
        try:
            yield
        finally:
            context.detach(token)

    @contextlib.contextmanager
    def span(self, name: str, start_ms: int, end_ms: int, attributes: dict[str, Any],
             error: str | None = None) -> Iterator[trace.Span]:
        """A span from `start_ms` to `end_ms` after BASE_MS, current within."""
        span = self.tracer.start_span(name, start_time=at(start_ms) * NS_PER_MS,
                                      attributes=attributes)
        with trace.use_span(span, end_on_exit=False):
            yield span
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=at(end_ms) * NS_PER_MS)

    def open_case(self, t: int) -> None:
        with self.span("open_case", t, t + 20, {}) as span:
            span.add_event("case_opened", {"acsr.customer_id": "cust-1"},
                           timestamp=at(t) * NS_PER_MS)

    @contextlib.contextmanager
    def invoke_agent(self, start: int, end: int, tokens: tuple[int, int], cost: float,
                     evaluation: tuple[str, float] | None = None) -> Iterator[None]:
        """One reply to the customer; its evaluation is scored as the reply is sent."""
        with self.span("invoke_agent support-agent", start, end, {
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support-agent",
                "gen_ai.usage.input_tokens": tokens[0],
                "gen_ai.usage.output_tokens": tokens[1], "acsr.cost_usd": cost}) as span:
            yield
            if evaluation is not None:
                span.add_event("gen_ai.evaluation.result",
                               {"gen_ai.evaluation.name": evaluation[0],
                                "gen_ai.evaluation.score.value": evaluation[1]},
                               timestamp=at(end) * NS_PER_MS)

    def chat(self, start: int, end: int, **support: Any) -> None:
        """An LLM call (prompt and completion recorded, as instrumentations do)."""
        with self.span("chat gpt-4o", start, end, {
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                "gen_ai.input.messages": '[{"role": "user", "content": "my card no 4111"}]',
                **{f"acsr.{key}": value for key, value in support.items()}}):
            pass

    def tool(self, name: str, start: int, end: int, error: str | None = None) -> None:
        with self.span(f"execute_tool {name}", start, end, {
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name},
                error=error):
            pass

    def support(self, name: str, start: int, end: int, event: str, **fields: Any) -> None:
        """A step of the support flow that stands for a contract event (`acsr.event`)."""
        with self.span(name, start, end, {
                "acsr.event": event, **{f"acsr.{key}": value for key, value in fields.items()}}):
            pass


def agent_script() -> list[ReadableSpan]:
    """The story: case A (web, v7) a refund resolved in two replies; case B (email, v7) a
    disputed bill escalated after a policy check failed and a tool failed; case C (chat,
    v8, its id as `gen_ai.conversation.id`) an order status resolved in two replies. Spans
    come out in the order they end, as an exporter batches them."""
    exporter = InMemorySpanExporter()
    v7, v8 = Agent("v7", exporter), Agent("v8", exporter)

    with v7.case("acsr.case_id", "story-a", "web"):
        v7.open_case(A)
        with v7.invoke_agent(A + 100, A + 2_600, (820, 140), 0.0042, ("relevance", 0.9)):
            v7.chat(A + 150, A + 700, event="intent_classified", intent="refund",
                    confidence=0.93)
            v7.tool("lookup_order", A + 750, A + 1_100)
            v7.support("check_policy refund_limit", A + 1_150, A + 1_200, "policy_checked",
                       policy="refund_limit", passed=True)
            v7.tool("issue_refund", A + 1_250, A + 1_900)
            v7.chat(A + 1_950, A + 2_550)
        with v7.invoke_agent(A + TURN_2, A + TURN_2 + 1_500, (400, 90), 0.0021):
            v7.chat(A + TURN_2 + 50, A + TURN_2 + 700)
            v7.chat(A + TURN_2 + 750, A + TURN_2 + 1_450)
        v7.support("resolve_case", A + TURN_2 + 1_600, A + TURN_2 + 1_650, "case_resolved",
                   by="agent")

    with v7.case("acsr.case_id", "story-b", "email"):
        v7.open_case(B)
        with v7.invoke_agent(B + 100, B + 3_100, (900, 60), 0.005, ("relevance", 0.4)):
            v7.chat(B + 150, B + 650, event="intent_classified", intent="billing_dispute",
                    confidence=0.81)
            v7.support("check_policy dispute_window", B + 700, B + 760, "policy_checked",
                       policy="dispute_window", passed=False)
            v7.tool("lookup_invoice", B + 800, B + 2_300, error="billing API timed out")
            v7.chat(B + 2_350, B + 3_050)
        v7.support("escalate", B + 3_200, B + 3_250, "case_escalated", reason="tool_failure")

    with v8.case("gen_ai.conversation.id", "story-c", "chat"):
        v8.open_case(C)
        with v8.invoke_agent(C + 100, C + 2_100, (500, 120), 0.0018, ("groundedness", 0.75)):
            v8.chat(C + 150, C + 600, event="intent_classified", intent="order_status",
                    confidence=0.97)
            v8.tool("track_shipment", C + 650, C + 1_000)
            v8.chat(C + 1_050, C + 2_050)
        with v8.invoke_agent(C + TURN_2, C + TURN_2 + 1_800, (300, 80), 0.0011):
            v8.chat(C + TURN_2 + 50, C + TURN_2 + 800)
            v8.chat(C + TURN_2 + 850, C + TURN_2 + 1_750)
        v8.support("resolve_case", C + TURN_2 + 1_900, C + TURN_2 + 1_950, "case_resolved",
                   by="agent")

    spans = list(exporter.get_finished_spans())
    return sorted(spans, key=lambda span: span.end_time or 0)


# --- the same story as a producer would send it ------------------------------------------

WEB_V7 = {"channel": "web", "agent_version": "v7"}
EMAIL_V7 = {"channel": "email", "agent_version": "v7"}
CHAT_V8 = {"channel": "chat", "agent_version": "v8"}

STORY_EVENTS: list[dict[str, Any]] = [
    # case A: refund, resolved by the agent in two replies
    {"event_id": "a-1", "type": "case_opened", "case_id": "story-a", "ts": at(A),
     "customer_id": "cust-1", **WEB_V7},
    {"event_id": "a-2", "type": "intent_classified", "case_id": "story-a", "ts": at(A + 700),
     "intent": "refund", "confidence": 0.93, **WEB_V7},
    {"event_id": "a-3", "type": "action_executed", "case_id": "story-a", "ts": at(A + 1_100),
     "action": "lookup_order", "success": True, "latency_ms": 350, **WEB_V7},
    {"event_id": "a-4", "type": "policy_checked", "case_id": "story-a", "ts": at(A + 1_200),
     "policy": "refund_limit", "passed": True, **WEB_V7},
    {"event_id": "a-5", "type": "action_executed", "case_id": "story-a", "ts": at(A + 1_900),
     "action": "issue_refund", "success": True, "latency_ms": 650, **WEB_V7},
    {"event_id": "a-6", "type": "response_sent", "case_id": "story-a", "ts": at(A + 2_600),
     "latency_ms": 2_500, "tokens_in": 820, "tokens_out": 140, "cost_usd": 0.0042,
     "turn_id": "a-turn-1", **WEB_V7},
    {"event_id": "a-7", "type": "evaluation_scored", "case_id": "story-a",
     "ts": at(A + 2_600), "name": "relevance", "score": 0.9, "turn_id": "a-turn-1", **WEB_V7},
    {"event_id": "a-8", "type": "response_sent", "case_id": "story-a",
     "ts": at(A + 61_500), "latency_ms": 1_500, "tokens_in": 400, "tokens_out": 90,
     "cost_usd": 0.0021, "turn_id": "a-turn-2", **WEB_V7},
    {"event_id": "a-9", "type": "case_resolved", "case_id": "story-a", "ts": at(A + 61_650),
     "by": "agent", **WEB_V7},
    # case B: a disputed bill, escalated after a failed policy check and a failed tool
    {"event_id": "b-1", "type": "case_opened", "case_id": "story-b", "ts": at(B),
     "customer_id": "cust-1", **EMAIL_V7},
    {"event_id": "b-2", "type": "intent_classified", "case_id": "story-b", "ts": at(B + 650),
     "intent": "billing_dispute", "confidence": 0.81, **EMAIL_V7},
    {"event_id": "b-3", "type": "policy_checked", "case_id": "story-b", "ts": at(B + 760),
     "policy": "dispute_window", "passed": False, **EMAIL_V7},
    {"event_id": "b-4", "type": "action_executed", "case_id": "story-b", "ts": at(B + 2_300),
     "action": "lookup_invoice", "success": False, "latency_ms": 1_500, **EMAIL_V7},
    {"event_id": "b-5", "type": "response_sent", "case_id": "story-b", "ts": at(B + 3_100),
     "latency_ms": 3_000, "tokens_in": 900, "tokens_out": 60, "cost_usd": 0.005,
     "turn_id": "b-turn-1", **EMAIL_V7},
    {"event_id": "b-6", "type": "evaluation_scored", "case_id": "story-b",
     "ts": at(B + 3_100), "name": "relevance", "score": 0.4, "turn_id": "b-turn-1",
     **EMAIL_V7},
    {"event_id": "b-7", "type": "case_escalated", "case_id": "story-b", "ts": at(B + 3_250),
     "reason": "tool_failure", **EMAIL_V7},
    # case C: order status, resolved by the agent in two replies
    {"event_id": "c-1", "type": "case_opened", "case_id": "story-c", "ts": at(C),
     "customer_id": "cust-1", **CHAT_V8},
    {"event_id": "c-2", "type": "intent_classified", "case_id": "story-c", "ts": at(C + 600),
     "intent": "order_status", "confidence": 0.97, **CHAT_V8},
    {"event_id": "c-3", "type": "action_executed", "case_id": "story-c", "ts": at(C + 1_000),
     "action": "track_shipment", "success": True, "latency_ms": 350, **CHAT_V8},
    {"event_id": "c-4", "type": "response_sent", "case_id": "story-c", "ts": at(C + 2_100),
     "latency_ms": 2_000, "tokens_in": 500, "tokens_out": 120, "cost_usd": 0.0018,
     "turn_id": "c-turn-1", **CHAT_V8},
    {"event_id": "c-5", "type": "evaluation_scored", "case_id": "story-c",
     "ts": at(C + 2_100), "name": "groundedness", "score": 0.75, "turn_id": "c-turn-1",
     **CHAT_V8},
    {"event_id": "c-6", "type": "response_sent", "case_id": "story-c",
     "ts": at(C + 61_800), "latency_ms": 1_800, "tokens_in": 300, "tokens_out": 80,
     "cost_usd": 0.0011, "turn_id": "c-turn-2", **CHAT_V8},
    {"event_id": "c-7", "type": "case_resolved", "case_id": "story-c", "ts": at(C + 61_950),
     "by": "agent", **CHAT_V8},
]


def story_lines() -> list[bytes]:
    """The events in the order a live producer sends them: as they happen."""
    ordered = sorted(STORY_EVENTS, key=lambda event: event["ts"])  # stable: ties kept
    return [orjson.dumps(event) for event in ordered]


def replay_settings(settings: Settings) -> Settings:
    return settings.with_overrides(
        window_retention_s=max(settings.window_retention_s, REPLAY_WINDOW_RETENTION_S))


@pytest.fixture(scope="module")
def story_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("story") / "events.jsonl"
    path.write_bytes(b"\n".join(story_lines()) + b"\n")
    return path


@pytest.fixture(scope="module")
def expected_report() -> dict[str, Any]:
    """The hand-written events' report from the backfill engine (no broker: the same pure
    core the worker runs, placed on partitions as `replay` places them)."""
    history = History(replay_settings(Settings(partitions=PARTITIONS)))
    for line in story_lines():
        history.add(*history.parse(line))
    history.apply()
    return history.report()


def test_the_hand_written_story_is_the_story_told(expected_report: dict[str, Any]) -> None:
    """The expected side is worth comparing against: every event valid, the figures the
    story says."""
    events, totals = expected_report["events"], expected_report["totals"]
    assert (events["valid"], events["invalid"], events["duplicate"]) == (len(STORY_EVENTS),
                                                                         0, 0)
    assert events["by_type"]["response_sent"] == 5
    assert (totals["cases_concluded"], totals["escalated"]) == (3, 1)
    assert totals["actions_failed"] == 1
    assert set(expected_report["by_agent_version"]) == {"v7", "v8"}


# --- the exporter's messages and the run through the broker ------------------------------


def exporter_messages(encoding: str) -> list[bytes]:
    """The spans in MESSAGES unkeyed batches, each encoded as the Kafka exporter does."""
    spans = agent_script()
    size = -(-len(spans) // MESSAGES)
    parts = [spans[i:i + size] for i in range(0, len(spans), size)]
    assert len(parts) == MESSAGES
    # each batch mixes traces, and a trace's spans span batches (children first)
    assert all(len({span.context.trace_id for span in part}) > 1 for part in parts)
    encode = as_proto if encoding == "otlp_proto" else as_json
    return [encode(part) for part in parts]


@dataclass
class Landing:
    """What reached the events topic: the bridge's events, and the end offsets."""

    events: list[dict[str, Any]] = field(default_factory=list)
    ends: dict[int, int] = field(default_factory=dict)
    metrics: BridgeMetrics | None = None  # the standalone bridge's counters


def otlp_loader(messages: list[bytes], landing: Landing, standalone: bool) -> Loader:
    """A replay `load`: instead of the hand-written lines, the exporter's OTLP messages on
    the spans topic; the bridge (run here, or by the worker) publishes the events. Returns
    once as many events as hand-written lines are on the events topic."""

    async def load(settings: Settings, lines: list[bytes], on_sent: Callable[[int], None]
                   ) -> dict[int, int]:
        topics = BridgeTopics.of(settings)
        await ensure_topics(settings.bootstrap_servers,
                            {topics.spans: 1, topics.logs: 1, topics.dead_letters: 1},
                            client=kafka_client_kwargs(settings))
        await send_all(settings, topics.spans, messages)
        stop = asyncio.Event()
        bridge = None
        if standalone:
            landing.metrics = BridgeMetrics()
            bridge = asyncio.create_task(run_bridge(settings, topics, landing.metrics, stop,
                                                    group=f"{settings.app_id}-story-bridge"))
        try:
            landing.events = [orjson.loads(record.value) for record in
                              await read_all(settings, settings.events_topic, len(lines))]
        finally:
            stop.set()
            if bridge is not None:
                await asyncio.wait_for(bridge, 30)
        landing.ends = await end_offsets(settings.bootstrap_servers,
                                         kafka_client_kwargs(settings),
                                         settings.events_topic, settings.partitions)
        on_sent(len(lines))
        return landing.ends

    return load


def same_report(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Mismatches both ways (report_mismatches walks the expected report's keys only)."""
    return report_mismatches(expected, actual) + report_mismatches(actual, expected)


@pytest.mark.parametrize("encoding, standalone", [("otlp_proto", True), ("otlp_json", False)],
                         ids=["proto-standalone-bridge", "json-worker-bridge"])
async def test_an_agents_traces_give_the_report_of_its_story(
        kafka: BrokerInfo, story_file: Path, expected_report: dict[str, Any],
        tmp_path: Path, encoding: str, standalone: bool) -> None:
    run = uuid.uuid4().hex[:8]
    settings = kafka.settings(
        partitions=PARTITIONS, otel_encoding=encoding,
        otel_spans_topic=f"acsr.story-{run}.otlp-spans",
        otel_logs_topic=f"acsr.story-{run}.otlp-logs",
        otel_dlq_topic=f"acsr.story-{run}.otlp-dlq")
    if not standalone:
        settings = settings.with_overrides(otel_bridge=True)
    landing = Landing()
    replayed = await run_replay(story_file, settings, workers=1, start_broker=False,
                                log_dir=tmp_path,
                                load=otlp_loader(exporter_messages(encoding), landing,
                                                 standalone))
    report = replayed.report

    assert same_report(expected_report, report) == []
    # the bridge published exactly the story's events, nothing twice or extra
    assert sum(landing.ends.values()) == len(STORY_EVENTS)
    assert sorted(event["type"] for event in landing.events) == sorted(
        event["type"] for event in STORY_EVENTS)
    # each event carries its span's (baggage) channel and its resource's agent version
    dimensions = {"story-a": WEB_V7, "story-b": EMAIL_V7, "story-c": CHAT_V8}
    for event in landing.events:
        wanted = dimensions[event["case_id"]]
        assert {key: event.get(key) for key in wanted} == wanted, event
        assert "gen_ai.input.messages" not in orjson.dumps(event).decode()
    # a few figures directly: five replies, one failed tool, one escalation for it
    totals = report["totals"]
    assert report["events"]["by_type"]["response_sent"] == 5
    assert report["events"]["invalid"] == 0 and report["events"]["duplicate"] == 0
    assert (totals["cases_concluded"], totals["autonomous"], totals["escalated"]) == (3, 2, 1)
    assert totals["escalations_by_reason"] == {"tool_failure": 1}
    assert totals["actions_failed"] == 1 and totals["policy_checks_passed"] == 1
    assert report["by_agent_version"]["v8"]["cases_concluded"] == 1
    # the bridge's counters: every span had its case, every event was published
    if standalone:
        assert landing.metrics is not None
        assert landing.metrics.unmapped.labels("no_case")._value.get() == 0
        assert landing.metrics.events.labels("response_sent")._value.get() == 5
    else:  # served at the worker's own /metrics
        counted = metric_sums(replayed.metrics, ["acsr_otel_events_total",
                                                 "acsr_otel_spans_unmapped_total"])
        assert counted == {"acsr_otel_events_total": len(STORY_EVENTS),
                           "acsr_otel_spans_unmapped_total": 0}

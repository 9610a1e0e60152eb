"""OTLP as the Collector's Kafka exporter writes it: both encodings decode to the same spans.

Spans come from the OpenTelemetry SDK and are encoded with the OTLP exporter's own encoder
(`encode_spans`), then written as `otlp_proto` (its bytes) or `otlp_json` (OTLP/JSON:
protobuf's JSON mapping with hex trace and span ids, as the Collector writes it)."""

from __future__ import annotations

import base64
import contextlib
import json

import orjson
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from streams.core.events import parse_event
from streams.core.otel import SpanMapping
from streams.kafka.otlp import JSON, PROTO, OtlpError, decode_spans

IDS = ("traceId", "spanId", "parentSpanId")


def agent_turn() -> list:
    """An agent's reply: an invoke_agent span around two LLM calls and a failed tool."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "support-agent",
                                                        "acsr.case_id": "case-1"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("invoke_agent support") as agent:
        agent.set_attribute("gen_ai.conversation.id", "case-1")
        agent.set_attribute("gen_ai.usage.input_tokens", 120)
        for _ in range(2):
            with tracer.start_as_current_span("chat gpt") as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
        with tracer.start_as_current_span("execute_tool refund") as tool:
            tool.set_attribute("gen_ai.tool.name", "refund")
            tool.set_status(Status(StatusCode.ERROR, "declined"))
        agent.add_event("gen_ai.evaluation.result",
                        {"gen_ai.evaluation.name": "relevance",
                         "gen_ai.evaluation.score.value": 0.8})
    return list(exporter.get_finished_spans())


def as_proto(spans: list) -> bytes:
    return encode_spans(spans).SerializeToString()


def as_json(spans: list) -> bytes:
    """OTLP/JSON: the canonical mapping, with the ids turned from base64 into hex."""
    doc = json_format.MessageToDict(encode_spans(spans))

    def hex_ids(node):
        if isinstance(node, list):
            return [hex_ids(item) for item in node]
        if isinstance(node, dict):
            return {key: (base64.b64decode(value).hex() if key in IDS else hex_ids(value))
                    for key, value in node.items()}
        return node

    return json.dumps(hex_ids(doc)).encode()


def test_both_encodings_give_the_same_spans() -> None:
    spans = agent_turn()
    from_proto = decode_spans(as_proto(spans), PROTO)
    from_json = decode_spans(as_json(spans), JSON)
    assert from_proto == from_json
    assert [span.name for span in from_proto] == [
        "chat gpt", "chat gpt", "execute_tool refund", "invoke_agent support"]
    agent = from_proto[-1]
    assert agent.attributes == {"gen_ai.conversation.id": "case-1",
                                "gen_ai.usage.input_tokens": 120}
    assert agent.resource["acsr.case_id"] == "case-1"
    assert agent.events[0].attributes["gen_ai.evaluation.score.value"] == 0.8
    assert agent.trace_id == f"{spans[-1].context.trace_id:032x}"
    assert agent.span_id == f"{spans[-1].context.span_id:016x}"
    assert from_proto[0].parent_span_id == agent.span_id
    assert from_proto[2].failed and not agent.failed
    assert agent.end_ns >= agent.start_ns > 0


@pytest.mark.parametrize("raw, encoding, reason", [
    (b"\xff\xff\xff", PROTO, "not_otlp_proto"),
    (b"{not json", JSON, "not_json"),
    (b"[1, 2]", JSON, "not_otlp_json"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}', JSON,
     "bad_id"),
    (b'{"resourceSpans": 5}', JSON, "not_otlp_json"),
])
def test_what_is_not_otlp_is_refused_with_a_reason(raw: bytes, encoding: str,
                                                   reason: str) -> None:
    with pytest.raises(OtlpError) as caught:
        decode_spans(raw, encoding)
    assert caught.value.reason == reason


def test_a_truncated_message_is_refused() -> None:
    raw = as_proto(agent_turn())
    with pytest.raises(OtlpError, match="not_otlp_proto"):
        decode_spans(raw[: len(raw) // 2], PROTO)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_are_refused_never_crash(raw: bytes) -> None:
    for encoding in (PROTO, JSON):
        with contextlib.suppress(OtlpError):
            decode_spans(raw, encoding)


# --- the mapping (streams/core/otel.py) --------------------------------------------------


def mapped(spans: list) -> tuple[list[dict], list[str]]:
    events, unmapped = [], []
    for span in decode_spans(as_proto(spans), PROTO):
        found, reason = SpanMapping().events(span)
        events += found
        if reason:
            unmapped.append(reason)
    return events, unmapped


def test_an_agent_turn_is_one_reply_one_tool_call_and_one_score() -> None:
    events, unmapped = mapped(agent_turn())
    assert unmapped == []
    assert sorted(event["type"] for event in events) == [
        "action_executed", "evaluation_scored", "response_sent"]
    parsed = {event["type"]: parse_event(orjson.dumps(event)) for event in events}
    assert {p.case_id for p in parsed.values()} == {"case-1"}
    reply = next(e for e in events if e["type"] == "response_sent")
    assert reply["tokens_in"] == 120 and reply["latency_ms"] >= 0
    tool = next(e for e in events if e["type"] == "action_executed")
    assert tool["action"] == "refund" and tool["success"] is False
    score = next(e for e in events if e["type"] == "evaluation_scored")
    assert (score["name"], score["score"]) == ("relevance", 0.8)
    assert "gen_ai.input.messages" not in str(events)


def test_a_batch_delivered_twice_gives_the_same_event_ids() -> None:
    spans = agent_turn()
    assert [e["event_id"] for e in mapped(spans)[0]] == [e["event_id"] for e in mapped(spans)[0]]


def test_a_span_without_a_case_is_unmapped_never_guessed() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("chat gpt"):
        pass
    events, unmapped = mapped(list(exporter.get_finished_spans()))
    assert (events, unmapped) == ([], ["no_case"])


def test_a_root_chat_span_is_a_reply_and_support_events_come_from_span_events() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("chat gpt") as chat:
        chat.set_attribute("acsr.case_id", "case-9")
        chat.add_event("intent_classified", {"acsr.intent": "refund", "acsr.confidence": 0.9})
        chat.add_event("case_resolved", {"acsr.by": "agent"})
    events, _ = mapped(list(exporter.get_finished_spans()))
    assert [e["type"] for e in events] == ["response_sent", "intent_classified",
                                           "case_resolved"]
    for event in events:
        parse_event(orjson.dumps(event))  # each one valid per the contract
    assert events[1]["intent"] == "refund"

"""OTLP as the Collector's Kafka exporter writes it: both encodings decode to the same spans.

Spans come from the OpenTelemetry SDK and are encoded with the OTLP exporter's own encoder
(`encode_spans`), then written as `otlp_proto` (its bytes) or `otlp_json` (OTLP/JSON:
protobuf's JSON mapping with hex trace and span ids, as the Collector writes it)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from streams.config import ConfigError, Settings, from_env
from streams.core.events import parse_event
from streams.core.otel import NS_PER_MS, LogRecord, Span, SpanEvent, SpanMapping
from streams.kafka.otlp import JSON, PROTO, OtlpError, decode_spans
from streams.tools.cli import main
from streams.tools.otel_bench import otlp_json
from streams.tools.otel_bridge import load_mapping


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
    return otlp_json(encode_spans(spans))


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


# --- acsr.* span attributes, dimensions and the mapping file -------------------------------

TRACE, SPAN_ID = "ab" * 16, "cd" * 8


def span(attributes: dict, resource: dict | None = None, name: str = "work",
         events: tuple = ()) -> Span:
    """A span of 2 s ending at 1_795_352_402_000 ms, its case on the resource."""
    return Span(TRACE, SPAN_ID, "ef" * 8, name, 1_795_352_400_000 * NS_PER_MS,
                1_795_352_402_000 * NS_PER_MS, 0, attributes,
                {"acsr.case_id": "case-7"} if resource is None else resource, events)


def test_a_span_with_acsr_event_is_that_event_at_its_end() -> None:
    events, reason = SpanMapping().events(span(
        {"acsr.event": "case_resolved", "acsr.by": "agent", "acsr.confidence": 0.7,
         "acsr.case_id": "case-7", "gen_ai.input.messages": "secret"}))
    assert reason is None
    assert events == [{"event_id": f"otel-{TRACE}-{SPAN_ID}-span", "type": "case_resolved",
                       "case_id": "case-7", "ts": 1_795_352_402_000, "by": "agent",
                       "confidence": 0.7}]
    parse_event(orjson.dumps(events[0]))


def test_acsr_event_is_besides_the_reply_and_the_span_events() -> None:
    agent = span({"gen_ai.operation.name": "invoke_agent", "acsr.event": "intent_classified",
                  "acsr.intent": "refund", "acsr.confidence": 0.9},
                 events=(SpanEvent("policy_checked", 1_795_352_401_000 * NS_PER_MS,
                                   {"acsr.policy": "refund_limit", "acsr.passed": True}),))
    events, reason = SpanMapping().events(agent)
    assert reason is None
    assert [e["type"] for e in events] == ["response_sent", "policy_checked",
                                           "intent_classified"]
    assert len({e["event_id"] for e in events}) == 3
    assert events[2]["intent"] == "refund" and events[2]["confidence"] == 0.9
    for event in events:
        parse_event(orjson.dumps(event))


def test_a_root_chat_span_with_acsr_event_is_no_reply() -> None:
    """A classifier's LLM call made outside any agent span is the intent, not a reply:
    counted as one it would add a reply, its latency and cost."""
    classify = replace(span({"gen_ai.operation.name": "chat",
                             "acsr.event": "intent_classified", "acsr.intent": "refund",
                             "acsr.confidence": 0.9}), parent_span_id="")
    assert [e["type"] for e in SpanMapping().events(classify)[0]] == ["intent_classified"]
    plain = replace(classify, attributes={"gen_ai.operation.name": "chat"})
    assert [e["type"] for e in SpanMapping().events(plain)[0]] == ["response_sent"]


@pytest.mark.parametrize("declared", ["case_closed", "", 3, ["case_resolved"]])
def test_an_acsr_event_that_is_no_event_type_is_counted_unknown(declared: object) -> None:
    tool = span({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "refund",
                 "acsr.event": declared})
    events, reason = SpanMapping().events(tool)
    assert reason == "unknown_event"
    assert [e["type"] for e in events] == ["action_executed"]  # the tool call still counts


def test_an_attribute_never_replaces_the_envelope() -> None:
    events, _ = SpanMapping().events(span({"acsr.event": "case_reopened", "acsr.type": "x",
                                           "acsr.ts": 0, "acsr.event_id": "mine"}))
    assert (events[0]["type"], events[0]["event_id"][-5:]) == ("case_reopened", "-span")
    assert events[0]["ts"] == 1_795_352_402_000


def test_every_event_takes_the_dimensions_the_span_or_its_resource_names() -> None:
    resource = {"acsr.case_id": "case-7", "acsr.channel": "voice", "acsr.agent_version": "v2"}
    agent = span({"gen_ai.operation.name": "invoke_agent", "acsr.channel": "web",
                  "acsr.intent": 5},  # not a string: not a dimension
                 resource, events=(SpanEvent("intent_classified", 1, {
                     "acsr.intent": "billing", "acsr.confidence": 0.5}),))
    reply, classified = SpanMapping().events(agent)[0]
    assert (reply["channel"], reply["agent_version"]) == ("web", "v2")  # span over resource
    assert "intent" not in reply
    assert classified["intent"] == "billing"  # its own field stays
    assert classified["channel"] == "web"


def test_a_log_record_takes_its_dimensions_too() -> None:
    record = LogRecord(1_795_352_400_000 * NS_PER_MS, TRACE, SPAN_ID, "csat_submitted", None,
                       {"acsr.score": 4, "acsr.channel": "sms"},
                       {"acsr.case_id": "case-7", "acsr.agent_version": "v3"})
    (event,), reason = SpanMapping().log_events(record)
    assert reason is None
    assert (event["score"], event["channel"], event["agent_version"]) == (4, "sms", "v3")
    parse_event(orjson.dumps(event))


ATTRIBUTE = st.sampled_from(["a.x", "a.y", "b.z"])
VALUES = st.one_of(st.text(max_size=3), st.integers(), st.none())


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(ATTRIBUTE, VALUES), st.dictionaries(ATTRIBUTE, VALUES),
       st.lists(ATTRIBUTE, min_size=1, max_size=3, unique=True))
def test_a_dimension_is_the_first_string_on_the_span_then_its_resource(
        on_span: dict, on_resource: dict, names: list[str]) -> None:
    mapping = SpanMapping.from_dict({"dimensions": {"channel": names}})
    found = mapping.dimensions_of(span(on_span, on_resource)).get("channel")
    strings = [source[name] for source in (on_span, on_resource) for name in names
               if isinstance(source.get(name), str) and source[name]]
    assert found == (strings[0] if strings else None)


DEFAULTS_DOC = {
    "case_attributes": ["gen_ai.conversation.id", "acsr.case_id"],
    "reply_operations": ["invoke_agent"], "root_reply_operations": ["chat"],
    "tool_operations": ["execute_tool"], "cost_attribute": "acsr.cost_usd",
    "dimensions": {"channel": ["acsr.channel"], "agent_version": ["acsr.agent_version"],
                   "intent": ["acsr.intent"]}}


def test_from_dict_keeps_the_defaults_it_is_not_given() -> None:
    assert SpanMapping.from_dict({}) == SpanMapping() == SpanMapping.from_dict(DEFAULTS_DOC)
    mapping = SpanMapping.from_dict({"reply_operations": ["invoke_agent", "agent"],
                                     "dimensions": {"intent": []}})
    assert mapping.reply_operations == ("invoke_agent", "agent")
    assert dict(mapping.dimensions) == {"channel": ("acsr.channel",),
                                        "agent_version": ("acsr.agent_version",),
                                        "intent": ()}
    assert mapping.tool_operations == SpanMapping().tool_operations


@pytest.mark.parametrize("doc, message", [
    ({"reply_operation": ["x"]}, "unknown key 'reply_operation': one of case_attributes"),
    ({"tool_operations": "execute_tool"}, "tool_operations must be a list of attribute"),
    ({"case_attributes": ["a", 3]}, "case_attributes must be a list"),
    ({"case_attributes": []}, "case_attributes must name at least one attribute"),
    ({"cost_attribute": ["acsr.cost"]}, "cost_attribute must be an attribute name"),
    ({"dimensions": ["channel"]}, "dimensions must map channel, agent_version, intent"),
    ({"dimensions": {"region": ["x"]}}, "dimensions: unknown key 'region'"),
    ({"dimensions": {"channel": "acsr.channel"}}, "dimensions.channel must be a list"),
    (["case_attributes"], "the mapping must be a mapping"),
])
def test_from_dict_names_the_key_and_what_it_takes(doc: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SpanMapping.from_dict(doc)


YAMLISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=8)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=3)),
                       max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from([*DEFAULTS_DOC, "dimensions"]),
                                 st.text(max_size=8), st.integers()),
                       st.one_of(YAMLISH, st.dictionaries(
                           st.sampled_from(["channel", "intent", "x"]), YAMLISH)),
                       max_size=4))
def test_from_dict_raises_nothing_but_value_error(doc: dict) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(SpanMapping.from_dict(doc), SpanMapping)


def test_the_mapping_file_fails_at_start_naming_the_file_and_key(tmp_path: Path) -> None:
    good = tmp_path / "mapping.yaml"
    good.write_text("tool_operations: [execute_tool, call_tool]\n"
                    "dimensions:\n  channel: [channel, acsr.channel]\n")
    mapping = load_mapping(good)
    assert mapping.tool_operations == ("execute_tool", "call_tool")
    assert dict(mapping.dimensions)["channel"] == ("channel", "acsr.channel")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_mapping(empty) == SpanMapping()
    cases = {"typo.yaml": ("tool_operation: [x]\n", "unknown key 'tool_operation'"),
             "broken.yaml": ("tool_operations: [x\n", "is not YAML"),
             "list.yaml": ("- x\n", "must be a mapping")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)) as caught:
            load_mapping(tmp_path / name)
        assert f"ACSR_OTEL_MAPPING '{tmp_path / name}'" in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_mapping(tmp_path / "missing.yaml")


def test_the_documented_mapping_file_is_the_defaults() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "otel.md").read_text()
    block = re.search(r"```yaml\n(# ACSR_OTEL_MAPPING.*?)```", docs, re.S)
    assert block, "docs/otel.md shows the mapping file with its defaults"
    assert SpanMapping.from_dict(yaml.safe_load(block.group(1))) == SpanMapping()


def test_the_settings_of_the_mapping_file_and_the_worker_bridge(tmp_path: Path) -> None:
    assert (Settings().otel_mapping, Settings().otel_bridge) == ("", False)
    path = tmp_path / "mapping.yaml"
    path.write_text("{}\n")
    settings = from_env({"ACSR_OTEL_BRIDGE": "true", "ACSR_OTEL_MAPPING": str(path)})
    assert settings.otel_bridge and settings.otel_mapping == str(path)
    assert from_env(settings.to_env()) == settings
    assert not from_env({"ACSR_OTEL_BRIDGE": "off"}).otel_bridge
    with pytest.raises(ConfigError, match="ACSR_OTEL_BRIDGE='maybe'"):
        from_env({"ACSR_OTEL_BRIDGE": "maybe"})
    with pytest.raises(ConfigError, match=r"ACSR_OTEL_MAPPING=.* is not a readable file"):
        from_env({"ACSR_OTEL_MAPPING": str(tmp_path / "missing.yaml")})


@pytest.mark.parametrize("command", [["otel-bridge", "--mapping"], ["worker"]])
def test_a_bad_mapping_file_is_a_configuration_error_at_start(
        command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "mapping.yaml"
    bad.write_text("dimensions:\n  region: [acsr.region]\n")
    monkeypatch.setenv("ACSR_OTEL_BRIDGE", "1")
    monkeypatch.setenv("ACSR_BROKER", "127.0.0.1:1")  # never reached
    if command == ["worker"]:
        monkeypatch.setenv("ACSR_OTEL_MAPPING", str(bad))
    assert main([*command, *([str(bad)] if command[-1] == "--mapping" else [])]) == 2
    error = capsys.readouterr().err
    assert "configuration error" in error and str(bad) in error and "'region'" in error


@pytest.mark.parametrize("doc", ["README.md", "docs/otel.md"])
def test_the_documented_collector_writes_where_the_bridge_reads(doc: str) -> None:
    """The Collector configuration users copy names the bridge's default topics and
    encoding, and sends both signals through the Kafka exporter."""
    text = (Path(__file__).parent.parent / doc).read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "exporters:" in b)
    config = yaml.safe_load(block)
    kafka, defaults = config["exporters"]["kafka"], Settings()
    assert kafka["traces"] == {"topic": defaults.otel_spans_topic,
                               "encoding": defaults.otel_encoding}
    assert kafka["logs"] == {"topic": defaults.otel_logs_topic,
                             "encoding": defaults.otel_encoding}
    for signal in ("traces", "logs"):
        assert "kafka" in config["service"]["pipelines"][signal]["exporters"]

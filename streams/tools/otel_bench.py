"""The OTLP bridge's rate: spans a second through decode, map and contract check.

`acsr-metrics otel-bridge` (streams/tools/otel_bridge.py) does, for every message of the
Collector's Kafka exporter: decode it (streams/kafka/otlp.py), map each span
(streams/core/otel.py), and check each event against the contract as the `Publisher` does
(`encode`: the JSON and `parse_event` on it) before it is sent. This times those three,
with no broker, on messages of SPANS_PER_MESSAGE spans in both encodings, `repeats` times:
what one bridge process can do, whatever the broker allows.

Then, once the bench's broker is up, the same messages through it (`otel_broker_benchmark`):
put on a spans topic of the run's own, read by the real `run_bridge` in a consumer group
of its own, published to an events topic of its own; timed from the bridge's first event
(the group join, about 3 s on the embedded broker, left out) until the group's committed
offset of the spans topic reaches the end (the bridge commits a batch only once every
event of it is acknowledged). On the embedded broker (Tansu) every producer, the bridge's
`Publisher` too, sends one record per batch (`producer_options`), which caps that rate.

The messages are what an instrumented agent's SDK exports (tests/test_otlp.py's
`agent_turn`: an `invoke_agent` span around two `chat` calls and a failed `execute_tool`,
with an evaluation span event), built here as `ExportTraceServiceRequest` protobufs
directly: the OpenTelemetry SDK is a test dependency only.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status
from prometheus_client import Counter

from streams.config import Settings
from streams.core.events import READER_CLOCK, EventTimeBounds
from streams.core.otel import NS_PER_MS, SpanMapping
from streams.kafka.broker import ensure_topics
from streams.kafka.otlp import ENCODINGS, PROTO, decode_spans
from streams.kafka.publisher import encode, producer_options
from streams.kafka.security import kafka_client_kwargs
from streams.tools.otel_bridge import BridgeMetrics, BridgeTopics, run_bridge
from streams.tools.replay import ReplayError, committed, group_offsets

SPANS_PER_MESSAGE = 100
SPANS_PER_TURN = 4  # invoke_agent, two chat calls, execute_tool
EVENTS_PER_TURN = 3  # response_sent, action_executed, evaluation_scored
MESSAGES = 200  # `acsr-metrics bench --otel-messages` default: 20,000 spans a run
HEX_IDS = frozenset({"traceId", "spanId", "parentSpanId"})
FIRST_EVENT_POLL_S = 0.005  # via the broker: the clock starts at the first event counted
COMMIT_POLL_S = 0.025  # via the broker: how precisely the end (the last commit) is known
STALL_S = 120.0  # `acsr-metrics bench --stall-timeout`'s default

Say = Callable[[str], None]


def otlp_message(index: int, now_ns: int) -> ExportTraceServiceRequest:
    """Message `index`: SPANS_PER_MESSAGE spans, a turn each of distinct cases, ending
    before `now_ns` (their events must be within the contract's clock bounds)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    _attributes(resource_spans.resource.attributes, {
        "service.name": "support-agent", "acsr.channel": "web", "acsr.agent_version": "v7"})
    for turn in range(SPANS_PER_MESSAGE // SPANS_PER_TURN):
        _agent_turn(resource_spans, f"case-{index}-{turn}",
                    trace=(index * 1000 + turn + 1).to_bytes(16, "big"),
                    end_ns=now_ns - (turn + 1) * 1000 * NS_PER_MS)
    return request


def _agent_turn(resource_spans: ResourceSpans, case_id: str, trace: bytes,
                end_ns: int) -> None:
    """One turn as the SDK exports it: children first, the agent span last."""
    spans = resource_spans.scope_spans.add()
    spans.scope.name = "support-agent"
    agent_id = trace[:7] + b"\x01"

    def child(number: int, name: str, attributes: dict[str, Any]) -> Span:
        span = spans.spans.add(trace_id=trace, span_id=trace[:7] + bytes([number + 1]),
                               parent_span_id=agent_id, name=name,
                               start_time_unix_nano=end_ns - (500 - 100 * number) * NS_PER_MS,
                               end_time_unix_nano=end_ns - (450 - 100 * number) * NS_PER_MS)
        _attributes(span.attributes, {"gen_ai.conversation.id": case_id, **attributes})
        return span

    for number in (1, 2):
        child(number, "chat gpt", {"gen_ai.operation.name": "chat",
                                   "gen_ai.usage.input_tokens": 800})
    tool = child(3, "execute_tool refund", {"gen_ai.tool.name": "refund"})
    tool.status.code = Status.STATUS_CODE_ERROR
    agent = spans.spans.add(trace_id=trace, span_id=agent_id, name="invoke_agent support",
                            start_time_unix_nano=end_ns - 600 * NS_PER_MS,
                            end_time_unix_nano=end_ns)
    _attributes(agent.attributes, {"gen_ai.conversation.id": case_id,
                                   "gen_ai.usage.input_tokens": 1600,
                                   "gen_ai.usage.output_tokens": 240, "acsr.cost_usd": 0.004})
    evaluation = agent.events.add(name="gen_ai.evaluation.result",
                                  time_unix_nano=end_ns - NS_PER_MS)
    _attributes(evaluation.attributes, {"gen_ai.evaluation.name": "relevance",
                                        "gen_ai.evaluation.score.value": 0.8})


def _attributes(target: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        kind = ("string_value" if isinstance(value, str) else
                "int_value" if isinstance(value, int) else "double_value")
        target.append(KeyValue(key=key, value=AnyValue(**{kind: value})))


def otlp_json(request: Any) -> bytes:
    """OTLP/JSON as the Collector writes it: protobuf's JSON mapping, but trace and span
    ids as lowercase hex where the mapping has base64."""
    def hex_ids(node: Any) -> Any:
        if isinstance(node, list):
            return [hex_ids(item) for item in node]
        if isinstance(node, dict):
            return {key: (base64.b64decode(value).hex() if key in HEX_IDS else hex_ids(value))
                    for key, value in node.items()}
        return node

    return orjson.dumps(hex_ids(json_format.MessageToDict(request)))


def encoded(messages: list[ExportTraceServiceRequest], encoding: str) -> list[bytes]:
    return [message.SerializeToString() if encoding == PROTO else otlp_json(message)
            for message in messages]


def encoded_messages(messages: int) -> dict[str, list[bytes]]:
    """`messages` messages (`otlp_message`, ending now) in each encoding: the same spans."""
    if messages <= 0:
        raise ValueError("the OTLP benchmarks need at least one message")
    built = [otlp_message(index, time.time_ns()) for index in range(messages)]
    return {encoding: encoded(built, encoding) for encoding in ENCODINGS}


def bridge_pass(values: list[bytes], encoding: str, mapping: SpanMapping,
                bounds: EventTimeBounds) -> tuple[int, int]:
    """What the bridge does to each message before it sends: decode, map, check each
    event (`encode`, as `Publisher.send_event`); the spans and the events."""
    spans = events = 0
    for value in values:
        for span in decode_spans(value, encoding):
            spans += 1
            found, _ = mapping.events(span)
            for event in found:
                encode(event, bounds)
                events += 1
    return spans, events


def otel_benchmark(messages: int = MESSAGES, repeats: int = 1,
                   say: Say = lambda text: None) -> dict[str, Any]:
    """`messages` messages in each encoding through `bridge_pass`, `repeats` times,
    the encodings back to back in each repeat; rates and their min/median/max."""
    if messages <= 0 or repeats <= 0:
        raise ValueError("otel_benchmark needs messages and at least one repeat")
    from streams.tools.bench import summarize  # bench imports this module

    values = encoded_messages(messages)
    mapping, bounds = SpanMapping(), READER_CLOCK
    runs: dict[str, list[dict[str, Any]]] = {encoding: [] for encoding in ENCODINGS}
    for repeat in range(1, repeats + 1):
        for encoding in ENCODINGS:
            gc.collect()
            started = time.perf_counter()
            spans, events = bridge_pass(values[encoding], encoding, mapping, bounds)
            seconds = time.perf_counter() - started
            runs[encoding].append({"spans": spans, "events": events, "seconds": seconds,
                                   "rate": spans / seconds})
            say(f"bench: otel bridge {repeat}/{repeats}, {encoding}: {spans:,} spans "
                f"({events:,} events) in {seconds:.2f}s, {spans / seconds:,.0f} spans/s")
    return {"messages": messages, "spans_per_message": SPANS_PER_MESSAGE,
            "bytes_per_message": {encoding: sum(map(len, values[encoding])) // messages
                                  for encoding in ENCODINGS},
            "repeats": repeats, "runs": runs,
            "summaries": {encoding: summarize([run["rate"] for run in runs[encoding]])
                          for encoding in ENCODINGS}}


def measure_otel(messages: int, repeats: int, say: Say) -> dict[str, Any]:
    """`otel_benchmark` for `acsr-metrics bench`, with its verdict on stderr."""
    result = otel_benchmark(messages, repeats, say)
    say(otel_line(result))
    return result


def otel_line(result: dict[str, Any]) -> str:
    """The summary's line: each encoding's median rate and what a run was; and a second
    line of the rates through the broker, when measured."""
    def medians(summaries: dict[str, dict[str, float]]) -> str:
        return ", ".join(f"{encoding} {summaries[encoding]['median']:,.0f}"
                         for encoding in ENCODINGS)

    line = (f"otel bridge: {medians(result['summaries'])} spans/s (median of "
            f"{result['repeats']} runs; decode, map and contract check of "
            f"{result['messages']:,} messages of {result['spans_per_message']} spans, no broker)")
    broker = result.get("via_broker")
    if broker:
        batches = ("one record per producer batch (Tansu)" if broker["one_record_batches"]
                   else "batched producers")
        line += (f"\n  via the broker: {medians(broker['summaries'])} spans/s (median; "
                 f"the real bridge from its first event to its last commit, {batches})")
    return line


async def otel_broker_benchmark(settings: Settings, run: str, messages: int = MESSAGES,
                                repeats: int = 1, say: Say = lambda text: None,
                                stall_s: float = STALL_S) -> dict[str, Any]:
    """`messages` messages in each encoding through the broker and the real bridge
    (`bridge_through_broker`), `repeats` times, the encodings back to back in each
    repeat, every run on topics and a group of its own; rates and their min/median/max."""
    if repeats <= 0:
        raise ValueError("otel_broker_benchmark needs at least one repeat")
    from streams.tools.bench import summarize  # bench imports this module

    values = encoded_messages(messages)
    runs: dict[str, list[dict[str, Any]]] = {encoding: [] for encoding in ENCODINGS}
    for repeat in range(1, repeats + 1):
        for encoding in ENCODINGS:
            label = f"otel bridge via the broker {repeat}/{repeats}, {encoding}"
            result = await bridge_through_broker(
                settings, values[encoding], encoding,
                f"{run}-{encoding.removeprefix('otlp_')}-{repeat}", stall_s, label)
            runs[encoding].append(result)
            say(f"bench: {label}: {result['spans']:,} spans ({result['events']:,} events) "
                f"in {result['seconds']:.2f}s, {result['rate']:,.0f} spans/s (the bridge "
                f"started in {result['start_s']:.1f}s)")
    return {"messages": messages, "spans_per_message": SPANS_PER_MESSAGE, "repeats": repeats,
            "one_record_batches": settings.tansu, "runs": runs,
            "summaries": {encoding: summarize([run["rate"] for run in runs[encoding]])
                          for encoding in ENCODINGS}}


async def bridge_through_broker(settings: Settings, values: list[bytes], encoding: str,
                                run: str, stall_s: float = STALL_S, label: str = "otel bridge"
                                ) -> dict[str, Any]:
    """One run: `values` put on a spans topic of `run`'s own, then `run_bridge` in a group
    of its own until that group committed their end. Timed from the first event the
    bridge counts, so its start and group join are left out (`start_s`); ended by the
    last commit, which follows the acknowledgement of every event."""
    prefix = f"acsr.bench-{run}"
    topics = BridgeTopics(f"{prefix}.otlp_spans", f"{prefix}.otlp_logs", f"{prefix}.otlp.dlq",
                          encoding)
    bridged = settings.with_overrides(events_topic=f"{prefix}.events")
    client = kafka_client_kwargs(bridged)
    await ensure_topics(bridged.bootstrap_servers, topics.to_ensure(bridged),
                        bridged.replication_factor, bridged.broker_wait_s, client)
    end = await put_messages(bridged, topics.spans, values)
    metrics, stop, group = BridgeMetrics(), asyncio.Event(), f"{prefix}-bridge"
    launched = time.perf_counter()
    task = asyncio.create_task(run_bridge(bridged, topics, metrics, stop, group=group))
    try:
        async with group_offsets(bridged.bootstrap_servers, group, client) as offsets:
            async def events() -> int:
                return counted(metrics.events)

            async def done() -> int:
                return (await committed(offsets, topics.spans, 1))[0]

            await _until(events, 1, task, FIRST_EVENT_POLL_S, stall_s, f"{label}, group join")
            started = time.perf_counter()
            await _until(done, end, task, COMMIT_POLL_S, stall_s, f"{label}, offsets committed")
            seconds = time.perf_counter() - started
    finally:
        stop.set()  # the bridge ends its poll (at most 0.5 s) and stops its clients
        await asyncio.wait_for(task, stall_s)
    spans = len(values) * SPANS_PER_MESSAGE
    return {"spans": spans, "events": counted(metrics.events),
            "events_invalid": counted(metrics.events_invalid),
            "messages_invalid": counted(metrics.invalid), "seconds": seconds,
            "rate": spans / seconds, "start_s": started - launched}


async def put_messages(settings: Settings, topic: str, values: list[bytes]) -> int:
    """`values` on `topic`, unkeyed as the Collector's exporter writes them, with our
    producers' options; the topic's end offset (it has one partition)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                **producer_options(settings.tansu),
                                **kafka_client_kwargs(settings))
    await producer.start()
    try:
        deliveries = [await producer.send(topic, value) for value in values]
        return max(meta.offset for meta in await asyncio.gather(*deliveries)) + 1
    finally:
        await producer.stop()


def counted(counter: Counter) -> int:
    """A labelled counter's total over its labels."""
    return round(sum(sample.value for family in counter.collect()
                     for sample in family.samples if sample.name.endswith("_total")))


async def _until(progress: Callable[[], Awaitable[int]], target: int,
                 task: asyncio.Task[None], every_s: float, stall_s: float, what: str) -> None:
    """Poll `progress` every `every_s` until it reaches `target`. ReplayError (the bench's
    exit 1) when it stands still for `stall_s` or the bridge ended; its error if it failed."""
    last, since = -1, time.monotonic()
    while (now := await progress()) < target:
        if task.done():
            task.result()
            raise ReplayError(f"{what}: the bridge stopped at {now:,}/{target:,}")
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise ReplayError(f"{what}: no progress for {stall_s:.0f}s at {now:,}/{target:,}")
        await asyncio.sleep(every_s)


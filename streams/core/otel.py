"""OpenTelemetry spans and log records as contract events (pure: no decoding, no I/O).

streams/kafka/otlp.py decodes what the Collector's Kafka exporter writes into the records
below; `SpanMapping` says which contract events a span stands for (docs/otel.md):

- the case: the first of `case_attributes` on the span, then on its resource; a span
  without one is unmapped (`no_case`), never guessed;
- one `response_sent` per customer-facing reply: an `invoke_agent` span, or a `chat` span
  that is the root of its trace (no agent around it), never each nested LLM call;
- `execute_tool` spans -> `action_executed` (success from the span's status);
- `gen_ai.evaluation.result` span events -> `evaluation_scored`;
- span events named after a contract event type (`case_resolved`, `intent_classified`,
  ...) -> that event, its fields from the event's attributes (`acsr.` prefix dropped).

`event_id` derives from the trace and span ids (and the span event's position), so an
OTLP batch delivered twice gives the same events, which the duplicate rule counts once.
Prompt and completion content is never copied: only the fields named here are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streams.core.events import EVENT_TYPES

Attributes = dict[str, Any]
STATUS_ERROR = 2  # OTLP Status.StatusCode.STATUS_CODE_ERROR
NS_PER_MS = 1_000_000
EVALUATION_EVENT = "gen_ai.evaluation.result"
OWN_PREFIX = "acsr."


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Attributes = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    """One span with its resource's attributes (the case id may sit on either)."""

    trace_id: str  # lowercase hex
    span_id: str
    parent_span_id: str  # "" for a trace's root
    name: str
    start_ns: int
    end_ns: int
    status_code: int
    attributes: Attributes
    resource: Attributes
    events: tuple[SpanEvent, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status_code == STATUS_ERROR

    @property
    def operation(self) -> str:
        """`gen_ai.operation.name`, else the span name's first word (`chat gpt-4o`)."""
        named = self.attributes.get("gen_ai.operation.name")
        return named if isinstance(named, str) else self.name.split(" ", 1)[0]


@dataclass(frozen=True)
class LogRecord:
    time_ns: int
    trace_id: str
    span_id: str
    event_name: str
    body: Any
    attributes: Attributes
    resource: Attributes


@dataclass(frozen=True)
class SpanMapping:
    """Which spans and span events become which contract events (defaults: docs/otel.md)."""

    case_attributes: tuple[str, ...] = ("gen_ai.conversation.id", "acsr.case_id")
    reply_operations: tuple[str, ...] = ("invoke_agent",)
    root_reply_operations: tuple[str, ...] = ("chat",)  # a reply when no agent span wraps it
    tool_operations: tuple[str, ...] = ("execute_tool",)
    cost_attribute: str = "acsr.cost_usd"

    def case_of(self, span: Span | LogRecord) -> str | None:
        for source in (span.attributes, span.resource):
            for name in self.case_attributes:
                value = source.get(name)
                if isinstance(value, str) and value:
                    return value
        return None

    def events(self, span: Span) -> tuple[list[dict[str, Any]], str | None]:
        """The span's contract events, and why it maps to none (None: it maps, or it is a
        span of no interest, such as a nested LLM call)."""
        case_id = self.case_of(span)
        if case_id is None:
            return [], "no_case"
        base = {"case_id": case_id}
        out = []
        operation = span.operation
        latency_ms = max(0.0, (span.end_ns - span.start_ns) / NS_PER_MS)
        if operation in self.reply_operations or (
                operation in self.root_reply_operations and not span.parent_span_id):
            out.append(self._event(span, "reply", "response_sent", span.end_ns, base,
                                   latency_ms=latency_ms, turn_id=span.span_id,
                                   tokens_in=span.attributes.get("gen_ai.usage.input_tokens"),
                                   tokens_out=span.attributes.get("gen_ai.usage.output_tokens"),
                                   cost_usd=span.attributes.get(self.cost_attribute)))
        elif operation in self.tool_operations:
            out.append(self._event(span, "tool", "action_executed", span.end_ns, base,
                                   action=span.attributes.get("gen_ai.tool.name", span.name),
                                   success=not span.failed, latency_ms=latency_ms,
                                   cost_usd=span.attributes.get(self.cost_attribute)))
        for index, event in enumerate(span.events):
            mapped = self._span_event(span, index, event, base)
            if mapped is not None:
                out.append(mapped)
        return out, None

    def log_events(self, record: LogRecord) -> tuple[list[dict[str, Any]], str | None]:
        """A log record read as the span event of the same name (an evaluation result,
        or one of our event types), its ids its trace's and span's."""
        case_id = self.case_of(record)
        if case_id is None:
            return [], "no_case"
        name = record.event_name or str(record.attributes.get("event.name", ""))
        span = Span(record.trace_id, record.span_id, "", name, record.time_ns,
                    record.time_ns, 0, {}, record.resource)
        event = SpanEvent(name, record.time_ns, record.attributes)
        mapped = self._span_event(span, record.time_ns, event, {"case_id": case_id})
        return ([mapped], None) if mapped is not None else ([], None)

    def _span_event(self, span: Span, index: int, event: SpanEvent, base: dict[str, Any]
                    ) -> dict[str, Any] | None:
        attributes = event.attributes
        if event.name == EVALUATION_EVENT:
            return self._event(span, f"event-{index}", "evaluation_scored", event.time_ns,
                               base, name=attributes.get("gen_ai.evaluation.name"),
                               score=attributes.get("gen_ai.evaluation.score.value"),
                               turn_id=span.span_id)
        if event.name in EVENT_TYPES:
            fields = {key.removeprefix(OWN_PREFIX): value for key, value in attributes.items()
                      if key.startswith(OWN_PREFIX) and key != "acsr.case_id"}
            return self._event(span, f"event-{index}", event.name, event.time_ns, base,
                               **fields)
        return None

    @staticmethod
    def _event(span: Span, what: str, kind: str, time_ns: int, base: dict[str, Any],
               **fields: Any) -> dict[str, Any]:
        return {"event_id": f"otel-{span.trace_id}-{span.span_id}-{what}", "type": kind,
                "ts": time_ns // NS_PER_MS, **base,
                **{key: value for key, value in fields.items() if value is not None}}

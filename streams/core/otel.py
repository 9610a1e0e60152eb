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
  ...) -> that event, its fields from the event's attributes (`acsr.` prefix dropped);
- a span whose `acsr.event` attribute is a contract event type -> that event at the
  span's end, its fields from the span's `acsr.*` attributes (besides the above);
- every event takes the case's dimensions (`channel`, `agent_version`, `intent`) from the
  span, then its resource, unless it carries them already.

`SpanMapping.from_dict` reads the mapping from a plain document (the YAML file of
ACSR_OTEL_MAPPING), refusing what it does not know with a ValueError.

`event_id` derives from the trace and span ids (and the span event's position), so an
OTLP batch delivered twice gives the same events, which the duplicate rule counts once.
Prompt and completion content is never copied: only the fields named here are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from streams.core.events import EVENT_TYPES

Attributes = dict[str, Any]
STATUS_ERROR = 2  # OTLP Status.StatusCode.STATUS_CODE_ERROR
NS_PER_MS = 1_000_000
EVALUATION_EVENT = "gen_ai.evaluation.result"
OWN_PREFIX = "acsr."
EVENT_ATTRIBUTE = "acsr.event"  # a span that stands for a contract event
UNKNOWN_EVENT = "unknown_event"  # its value is no contract event type
DIMENSIONS = ("channel", "agent_version", "intent")  # the case's, on every event


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


# dimension -> the attributes it is read from, the first found wins (span, then resource)
Dimensions = tuple[tuple[str, tuple[str, ...]], ...]
DEFAULT_DIMENSIONS: Dimensions = tuple((name, (OWN_PREFIX + name,)) for name in DIMENSIONS)


@dataclass(frozen=True)
class SpanMapping:
    """Which spans and span events become which contract events (defaults: docs/otel.md)."""

    case_attributes: tuple[str, ...] = ("gen_ai.conversation.id", "acsr.case_id")
    reply_operations: tuple[str, ...] = ("invoke_agent",)
    root_reply_operations: tuple[str, ...] = ("chat",)  # a reply when no agent span wraps it
    tool_operations: tuple[str, ...] = ("execute_tool",)
    cost_attribute: str = "acsr.cost_usd"
    dimensions: Dimensions = DEFAULT_DIMENSIONS

    @classmethod
    def from_dict(cls, doc: Any) -> SpanMapping:
        """The defaults with `doc`'s keys instead (the YAML file of ACSR_OTEL_MAPPING).

        A key it does not know or a value of the wrong type is a ValueError naming the key
        and what it takes: a typo must fail at start, not silently map nothing."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"the mapping must be a mapping of keys to values, not {_shown(doc)}")
        known = [item.name for item in fields(cls)]
        for key in doc:
            if key not in known:
                raise ValueError(f"unknown key {_shown(key)}: one of {', '.join(known)}")
        values: dict[str, Any] = {}
        for key, value in doc.items():
            if key == "cost_attribute":
                if not isinstance(value, str) or not value:
                    raise ValueError("cost_attribute must be an attribute name (a non-empty "
                                     f"string), not {_shown(value)}")
                values[key] = value
            elif key == "dimensions":
                values[key] = _dimensions(value, dict(cls.dimensions))
            else:
                values[key] = _strings(key, value)
        if values.get("case_attributes") == ():
            raise ValueError("case_attributes must name at least one attribute: a span "
                             "without a case is never mapped")
        return replace(cls(), **values)

    def case_of(self, span: Span | LogRecord) -> str | None:
        return _first_string(self.case_attributes, span)

    def dimensions_of(self, span: Span) -> dict[str, str]:
        """The case's dimensions the span (or its resource) names."""
        found = {}
        for dimension, names in self.dimensions:
            value = _first_string(names, span)
            if value is not None:
                found[dimension] = value
        return found

    def events(self, span: Span) -> tuple[list[dict[str, Any]], str | None]:
        """The span's contract events, and why it maps to none or not all (None: it maps,
        or it is a span of no interest, such as a nested LLM call; `unknown_event`: its
        `acsr.event` is no contract event type)."""
        case_id = self.case_of(span)
        if case_id is None:
            return [], "no_case"
        base = {"case_id": case_id}
        out = []
        operation = span.operation
        latency_ms = max(0.0, (span.end_ns - span.start_ns) / NS_PER_MS)
        if operation in self.reply_operations or (
                operation in self.root_reply_operations and not span.parent_span_id
                and EVENT_ATTRIBUTE not in span.attributes):  # a classifier call, not a reply
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
        reason = None
        declared = span.attributes.get(EVENT_ATTRIBUTE)
        if isinstance(declared, str) and declared in EVENT_TYPES:
            out.append(self._event(span, "span", declared, span.end_ns, base,
                                   **_own_fields(span.attributes)))
        elif declared is not None:
            reason = UNKNOWN_EVENT
        return self._with_dimensions(out, span), reason

    def log_events(self, record: LogRecord) -> tuple[list[dict[str, Any]], str | None]:
        """A log record read as the span event of the same name (an evaluation result,
        or one of our event types), its ids its trace's and span's."""
        case_id = self.case_of(record)
        if case_id is None:
            return [], "no_case"
        name = record.event_name or str(record.attributes.get("event.name", ""))
        span = Span(record.trace_id, record.span_id, "", name, record.time_ns,
                    record.time_ns, 0, record.attributes, record.resource)
        event = SpanEvent(name, record.time_ns, record.attributes)
        mapped = self._span_event(span, record.time_ns, event, {"case_id": case_id})
        return self._with_dimensions([mapped] if mapped is not None else [], span), None

    def _with_dimensions(self, events: list[dict[str, Any]], span: Span
                         ) -> list[dict[str, Any]]:
        """Each event with the span's dimensions it does not carry itself: a case's
        dimension is its first value seen, so every event may be the first."""
        if events:
            dimensions = self.dimensions_of(span)
            for event in events:
                for name, value in dimensions.items():
                    event.setdefault(name, value)
        return events

    def _span_event(self, span: Span, index: int, event: SpanEvent, base: dict[str, Any]
                    ) -> dict[str, Any] | None:
        attributes = event.attributes
        if event.name == EVALUATION_EVENT:
            return self._event(span, f"event-{index}", "evaluation_scored", event.time_ns,
                               base, name=attributes.get("gen_ai.evaluation.name"),
                               score=attributes.get("gen_ai.evaluation.score.value"),
                               turn_id=span.span_id)
        if event.name in EVENT_TYPES:
            return self._event(span, f"event-{index}", event.name, event.time_ns, base,
                               **_own_fields(attributes))
        return None

    @staticmethod
    def _event(span: Span, what: str, kind: str, time_ns: int, base: dict[str, Any],
               **fields: Any) -> dict[str, Any]:
        # The envelope last: an attribute such as `acsr.type` never replaces it.
        return {**{key: value for key, value in fields.items() if value is not None},
                "event_id": f"otel-{span.trace_id}-{span.span_id}-{what}", "type": kind,
                "ts": time_ns // NS_PER_MS, **base}


def _first_string(names: tuple[str, ...], span: Span | LogRecord) -> str | None:
    """The first of `names` that is a non-empty string on the span, then on its resource."""
    for source in (span.attributes, span.resource):
        for name in names:
            value = source.get(name)
            if isinstance(value, str) and value:
                return value
    return None


def _own_fields(attributes: Attributes) -> dict[str, Any]:
    """Our `acsr.*` attributes as event fields, prefix dropped (`acsr.intent` -> `intent`),
    but for the case and the event type, which the envelope holds."""
    return {key.removeprefix(OWN_PREFIX): value for key, value in attributes.items()
            if key.startswith(OWN_PREFIX) and key not in _ENVELOPE_ATTRIBUTES}


_ENVELOPE_ATTRIBUTES = frozenset({"acsr.case_id", EVENT_ATTRIBUTE})


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
            isinstance(item, str) and item for item in value):
        raise ValueError(f"{key} must be a list of attribute names (non-empty strings), "
                         f"not {_shown(value)}")
    return tuple(value)


def _dimensions(value: Any, defaults: dict[str, tuple[str, ...]]) -> Dimensions:
    """`dimensions:` over the defaults: a dimension it does not name keeps its default."""
    if not isinstance(value, Mapping):
        raise ValueError(f"dimensions must map {', '.join(DIMENSIONS)} to lists of "
                         f"attribute names, not {_shown(value)}")
    for name, names in value.items():
        if name not in DIMENSIONS:
            raise ValueError(f"dimensions: unknown key {_shown(name)}: one of "
                             f"{', '.join(DIMENSIONS)}")
        defaults[name] = _strings(f"dimensions.{name}", names)
    return tuple((name, defaults[name]) for name in DIMENSIONS)


def _shown(value: Any, limit: int = 60) -> str:
    """A value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

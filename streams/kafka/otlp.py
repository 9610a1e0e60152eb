"""OTLP messages as the OpenTelemetry Collector's Kafka exporter writes them, decoded.

The exporter writes one message per batch of spans (topic `otlp_spans`) or log records
(`otlp_logs`), unkeyed, encoded as `otlp_proto` (the default: an
`ExportTraceServiceRequest` / `ExportLogsServiceRequest` protobuf) or `otlp_json` (the
same message in OTLP/JSON). Both decode to the same plain records here: trace and span
ids as lowercase hex (OTLP/JSON carries them as hex, protobuf as bytes), times in
nanoseconds, attribute values as Python values. What a span means for a support case
is decided elsewhere (the mapping); this module only reads the wire format.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from streams.core.otel import LogRecord, Span, SpanEvent

PROTO = "otlp_proto"
JSON = "otlp_json"
ENCODINGS = (PROTO, JSON)
Attributes = dict[str, Any]


class OtlpError(ValueError):
    """A message that does not decode as OTLP; `reason` names why (a metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def value_of(value: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value (arrays and maps recursively)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes_of(pairs: Any) -> Attributes:
    return {pair.key: value_of(pair.value) for pair in pairs}


def decode_spans(raw: bytes, encoding: str = PROTO) -> list[Span]:
    """Every span of an `otlp_spans` message."""
    request = _parse(raw, encoding, ExportTraceServiceRequest)
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(Span(
                    span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                    span.name, span.start_time_unix_nano, span.end_time_unix_nano,
                    span.status.code, attributes_of(span.attributes), resource,
                    tuple(SpanEvent(event.name, event.time_unix_nano,
                                    attributes_of(event.attributes))
                          for event in span.events)))
    return spans


def decode_logs(raw: bytes, encoding: str = PROTO) -> list[LogRecord]:
    """Every log record of an `otlp_logs` message."""
    request = _parse(raw, encoding, ExportLogsServiceRequest)
    records = []
    for resource_logs in request.resource_logs:
        resource = attributes_of(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                records.append(LogRecord(
                    record.time_unix_nano or record.observed_time_unix_nano,
                    record.trace_id.hex(), record.span_id.hex(), record.event_name,
                    value_of(record.body), attributes_of(record.attributes), resource))
    return records


# OTLP/JSON differs from protobuf's canonical JSON mapping in its ids: lowercase hex, not
# base64 (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding).
_HEX_IDS = frozenset({"traceId", "spanId", "parentSpanId"})


def _parse(raw: bytes, encoding: str, kind: type[Any]) -> Any:
    request = kind()
    if encoding == PROTO:
        try:
            request.ParseFromString(raw)
        except (DecodeError, ValueError) as err:
            raise OtlpError("not_otlp_proto", f"{kind.__name__}: {err}") from None
        return request
    if encoding != JSON:
        raise ValueError(f"unknown OTLP encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise OtlpError("not_json", str(err)) from None
    if not isinstance(doc, dict):
        raise OtlpError("not_otlp_json", f"a JSON {type(doc).__name__}, not an object")
    doc = _base64_ids(doc)
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as err:
        raise OtlpError("not_otlp_json", f"{kind.__name__}: {err}") from None
    return request


def _base64_ids(node: Any) -> Any:
    """The document with its hex ids as protobuf's JSON mapping wants bytes: base64."""
    if isinstance(node, list):
        return [_base64_ids(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _HEX_IDS and isinstance(value, str) and value:
            try:
                value = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpError("bad_id", f"{key} {value!r} is not hex") from None
        out[key] = _base64_ids(value)
    return out


__all__ = ["ENCODINGS", "JSON", "PROTO", "OtlpError", "decode_logs", "decode_spans"]

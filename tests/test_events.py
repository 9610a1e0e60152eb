"""Parser unit tests: the wire contract of EVENTS.md, rule by rule and in its order."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core.events import (
    EARLIEST_TS_US,
    ESCALATION_REASONS,
    EVENT_TYPES,
    INVALID_REASONS,
    MAX_MESSAGE_BYTES,
    READER_CLOCK,
    Event,
    EventTimeBounds,
    InvalidEvent,
    message_key,
    normalise_reason,
    parse_event,
    parse_ts,
    validate_event,
)

TS = "2026-11-22T13:05:09.120Z"
TS_MS = 1_795_352_709_120  # the same instant as TS, in epoch milliseconds
TS_US = TS_MS * 1000

# A minimal valid event of every type: the required fields of its schema.
VALID: dict[str, dict[str, Any]] = {
    "case_opened": {},
    "intent_classified": {"intent": "refund", "confidence": 0.93},
    "policy_checked": {"policy": "refund_limit", "passed": True},
    "action_executed": {"action": "refund", "success": True},
    "response_sent": {"latency_ms": 420},
    "case_escalated": {"reason": "low_confidence"},
    "case_resolved": {"by": "agent"},
    "case_reopened": {},
    "human_override": {"original_action": "refund", "final_action": "deny", "rationale": "r"},
    "csat_submitted": {"score": 5},
    "ces_submitted": {"score": 7},
    "thumbs_submitted": {"vote": "up"},
    "suggestion_reviewed": {"adopted": True},
    "knowledge_flagged": {"kind": "missing"},
    "evaluation_scored": {"name": "groundedness", "score": 0.8},
}

REQUIRED = [(t, name) for t, fields in VALID.items() for name in fields]

EXAMPLES = [
    b'{"event_id":"e-1","type":"case_opened","case_id":"c-42","ts":"2026-11-22T13:00:00Z",'
    b'"channel":"web","agent_version":"v7"}',
    b'{"event_id":"e-2","type":"intent_classified","case_id":"c-42","ts":"2026-11-22T13:00:02Z",'
    b'"intent":"refund","confidence":0.93}',
    b'{"event_id":"e-3","type":"policy_checked","case_id":"c-42","ts":"2026-11-22T13:00:03Z",'
    b'"policy":"refund_limit","passed":true}',
    b'{"event_id":"e-4","type":"action_executed","case_id":"c-42","ts":"2026-11-22T13:00:05Z",'
    b'"action":"refund","success":true,"latency_ms":420}',
    b'{"event_id":"e-5","type":"case_resolved","case_id":"c-42","ts":"2026-11-22T13:01:30Z",'
    b'"by":"agent"}',
    b'{"event_id":"e-6","type":"csat_submitted","case_id":"c-42","ts":"2026-11-22T15:10:00Z",'
    b'"score":5}',
]


def doc(type_: str = "case_reopened", **fields: Any) -> dict[str, Any]:
    """A valid event of `type_` (required fields filled in), overridden by `fields`."""
    out: dict[str, Any] = {"event_id": "e-1", "type": type_, "case_id": "c-1", "ts": TS}
    out.update(VALID.get(type_, {}))
    out.update(fields)
    return out


def without(d: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in names}


def reason_of(message: dict[str, Any] | bytes | None, bounds: EventTimeBounds = READER_CLOCK
              ) -> InvalidEvent | None:
    """What parse_event refuses `message` with (None when it parses)."""
    raw = message if message is None or isinstance(message, bytes) else orjson.dumps(message)
    try:
        parse_event(raw, bounds)
    except InvalidEvent as invalid:
        assert invalid.reason in INVALID_REASONS
        return invalid
    return None


def reason(message: dict[str, Any] | bytes | None, bounds: EventTimeBounds = READER_CLOCK
           ) -> str:
    """The InvalidEvent reason parse_event gives `message` (fails if it parses)."""
    invalid = reason_of(message, bounds)
    assert invalid is not None, f"{message!r} parsed"
    return invalid.reason


def parse(d: dict[str, Any]) -> Event:
    return parse_event(orjson.dumps(d))


# --- valid input --------------------------------------------------------------------------


def test_valid_covers_every_event_type() -> None:
    """The fixtures below must exercise every type the parser knows."""
    assert set(VALID) == set(EVENT_TYPES)


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_minimal_event_of_every_type_parses(event_type: str) -> None:
    """Only the required fields are needed for each type."""
    event = parse(doc(event_type))
    assert (event.event_id, event.type, event.case_id, event.ts_us) == (
        "e-1",
        event_type,
        "c-1",
        TS_US,
    )


@pytest.mark.parametrize("raw", EXAMPLES)
def test_events_md_examples_parse(raw: bytes) -> None:
    """The contract's own examples are valid."""
    event = parse_event(raw)
    assert event.case_id == "c-42"
    assert event.fields == json.loads(raw)


def test_events_md_example_values() -> None:
    """Field values of an example come through unchanged."""
    event = parse_event(EXAMPLES[1])
    assert event.get("intent") == "refund"
    assert event.get("confidence") == 0.93
    assert event.ts_us == parse_ts("2026-11-22T13:00:02Z")


def test_all_optional_fields_valid() -> None:
    """Every optional field of every type, with a valid value, is accepted."""
    optional = {
        "case_opened": {"related_case_id": "c-0", "customer_id": {"any": ["thing"]}},
        "policy_checked": {"clause": "4.2"},
        "action_executed": {"latency_ms": 0, "error": "", "cost_usd": 0.01},
        "response_sent": {
            "tokens_in": 0,
            "tokens_out": 12,
            "cost_usd": 0,
            "turn_id": "t1",
            "fallback": True,
        },
        "case_escalated": {"confidence": 0, "note": "n"},
        "case_resolved": {"by": "human", "confidence": 1},
        "human_override": {"policy_clause": "7"},
        "thumbs_submitted": {"vote": "down", "turn_id": "t1"},
        "suggestion_reviewed": {"adopted": False, "rationale": "r"},
        "knowledge_flagged": {"kind": "irrelevant", "document_id": "kb-1"},
        "evaluation_scored": {"score": 0, "evaluator": "llm_judge", "turn_id": "t"},
    }
    envelope = {"schema_version": 1, "intent": "i" * 64, "channel": "c" * 32,
                "agent_version": "v" * 64}
    for event_type, fields in optional.items():
        event = parse(doc(event_type, **fields, **envelope))
        for name, value in {**fields, **envelope}.items():
            assert event.fields[name] == value


@pytest.mark.parametrize(
    ("event_type", "fields"),
    [
        ("intent_classified", {"confidence": 0}),
        ("intent_classified", {"confidence": 1}),
        ("intent_classified", {"intent": "x" * 64}),
        ("csat_submitted", {"score": 1}),
        ("csat_submitted", {"score": 5}),
        ("ces_submitted", {"score": 1}),
        ("ces_submitted", {"score": 7}),
        ("evaluation_scored", {"score": 0}),
        ("evaluation_scored", {"score": 1}),
        ("evaluation_scored", {"name": "n" * 64}),
        ("response_sent", {"latency_ms": 0.5}),
        ("action_executed", {"latency_ms": 1e9, "cost_usd": 0.0}),
    ],
)
def test_range_boundaries_are_valid(event_type: str, fields: dict[str, Any]) -> None:
    """Range ends are inclusive."""
    assert parse(doc(event_type, **fields)).type == event_type


def test_unknown_extra_fields_ignored() -> None:
    """Forward compatibility: fields the contract does not know never invalidate."""
    extra = {"future": {"nested": [1, 2.5, None]}, "x-trace": "abc", "ts2": "garbage",
             "score": "not-a-score", "passed": "n/a"}
    event = parse(doc("case_reopened", **extra))
    assert event.type == "case_reopened"
    assert event.fields["future"] == {"nested": [1, 2.5, None]}


def test_bytearray_and_memoryview_accepted() -> None:
    """Kafka clients hand over several buffer types."""
    raw = orjson.dumps(doc())
    assert parse_event(bytearray(raw)).event_id == "e-1"
    assert parse_event(memoryview(raw)).event_id == "e-1"


def test_validate_event_on_decoded_dict() -> None:
    """validate_event applies the same rules to an already decoded object."""
    assert validate_event(doc("csat_submitted")).get("score") == 5
    with pytest.raises(InvalidEvent) as info:
        validate_event(doc("csat_submitted", score=0))
    assert info.value.reason == "bad_field"


# --- too_large ----------------------------------------------------------------------------


def _padded(size: int) -> bytes:
    """A valid event padded with an unknown field to exactly `size` bytes."""
    base = orjson.dumps(doc(pad=""))
    raw = orjson.dumps(doc(pad="x" * (size - len(base))))
    assert len(raw) == size
    return raw


def test_too_large_just_over_the_limit() -> None:
    """1 MiB + 1 byte is too large even though it is a valid event."""
    assert reason(_padded(MAX_MESSAGE_BYTES + 1)) == "too_large"


def test_exactly_one_mib_is_not_too_large() -> None:
    """The limit itself is allowed."""
    assert parse_event(_padded(MAX_MESSAGE_BYTES)).event_id == "e-1"


def test_too_large_comes_before_not_json() -> None:
    assert reason(b"\xff" * (MAX_MESSAGE_BYTES + 1)) == "too_large"


# --- not_json -----------------------------------------------------------------------------

VALID_PREFIX = b'{"event_id":"e-1","type":"response_sent","case_id":"c-1","ts":1,"latency_ms":'


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"   ",
        b"{",
        b"not json",
        b"{'event_id': 'e'}",
        b'{"a":1} trailing',
        b"\xff\xfe{}",
        b'{"event_id":"e-\xff","type":"case_reopened","case_id":"c","ts":1}',
        b'{"event_id":"e-\xc3","type":"case_reopened","case_id":"c","ts":1}',
        b"NaN",
        b"Infinity",
        b"-Infinity",
        VALID_PREFIX + b"NaN}",
        VALID_PREFIX + b"Infinity}",
        VALID_PREFIX + b"-Infinity}",
        b'{"event_id":"e","type":"case_reopened","case_id":"c","ts":1,"x":[NaN]}',
    ],
)
def test_not_json(raw: bytes | None) -> None:
    """Not UTF-8, not JSON, or JSON extended with NaN/Infinity."""
    assert reason(raw) == "not_json"


def test_python_json_nan_output_is_not_json() -> None:
    """json.dumps happily writes NaN; the contract does not accept it."""
    raw = json.dumps(doc("response_sent", latency_ms=float("nan"))).encode()
    assert b"NaN" in raw
    assert reason(raw) == "not_json"


# --- not_object ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"[]", b"1", b"1.5", b'"s"', b"null", b"true", b"false", b'[{"event_id":"e"}]'],
)
def test_not_object(raw: bytes) -> None:
    assert reason(raw) == "not_object"


# --- missing_field ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["event_id", "type", "case_id", "ts"])
def test_missing_envelope_field(name: str) -> None:
    assert reason(without(doc(), name)) == "missing_field"


@pytest.mark.parametrize("name", ["event_id", "type", "case_id", "ts"])
def test_null_envelope_field_is_missing(name: str) -> None:
    """JSON null means absent."""
    assert reason(doc(**{name: None})) == "missing_field"


@pytest.mark.parametrize(("event_type", "name"), REQUIRED)
def test_missing_required_type_field(event_type: str, name: str) -> None:
    assert reason(without(doc(event_type), name)) == "missing_field"


@pytest.mark.parametrize(("event_type", "name"), REQUIRED)
def test_null_required_type_field_is_missing(event_type: str, name: str) -> None:
    assert reason(doc(event_type, **{name: None})) == "missing_field"


@pytest.mark.parametrize(
    ("event_type", "name"),
    [
        ("case_opened", "related_case_id"),
        ("case_opened", "customer_id"),
        ("policy_checked", "clause"),
        ("action_executed", "latency_ms"),
        ("action_executed", "error"),
        ("action_executed", "cost_usd"),
        ("response_sent", "tokens_in"),
        ("response_sent", "tokens_out"),
        ("response_sent", "cost_usd"),
        ("response_sent", "turn_id"),
        ("response_sent", "fallback"),
        ("case_escalated", "confidence"),
        ("case_escalated", "note"),
        ("case_resolved", "confidence"),
        ("human_override", "policy_clause"),
        ("thumbs_submitted", "turn_id"),
        ("suggestion_reviewed", "rationale"),
        ("knowledge_flagged", "document_id"),
        ("evaluation_scored", "evaluator"),
        ("evaluation_scored", "turn_id"),
        ("case_reopened", "intent"),
        ("case_reopened", "channel"),
        ("case_reopened", "agent_version"),
        ("case_reopened", "schema_version"),
    ],
)
def test_null_optional_field_is_absent(event_type: str, name: str) -> None:
    """An optional field set to null is fine, and reads as absent."""
    event = parse(doc(event_type, **{name: None}))
    assert event.get(name) is None
    assert event.get(name, "dflt") == "dflt"


# --- bad_field ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["event_id", "case_id"])
@pytest.mark.parametrize("value", ["", "x" * 129, "é" * 129, "😀" * 129, 5, 1.5, True, ["a"],
                                   {"a": 1}])
def test_bad_id(name: str, value: Any) -> None:
    """Ids are strings of 1-128 code points."""
    assert reason(doc(**{name: value})) == "bad_field"


@pytest.mark.parametrize("name", ["event_id", "case_id"])
@pytest.mark.parametrize("value", ["x", "x" * 128, "é" * 128, "😀" * 128, "日本" * 64])
def test_id_lengths_count_code_points(name: str, value: str) -> None:
    """128 code points is fine even when that is far more than 128 UTF-8 bytes."""
    assert len(value.encode()) >= len(value)
    assert getattr(parse(doc(**{name: value})), name) == value


@pytest.mark.parametrize("value", [5, 1.0, True, ["case_opened"], {"t": "case_opened"}])
def test_type_not_a_string(value: Any) -> None:
    assert reason(doc(type=value)) == "bad_field"


BAD_FIELDS: list[tuple[str, str, Any]] = [
    ("case_opened", "related_case_id", 5),
    ("intent_classified", "intent", 5),
    ("intent_classified", "intent", ""),
    ("intent_classified", "intent", "x" * 65),
    ("intent_classified", "confidence", 1.01),
    ("intent_classified", "confidence", -0.01),
    ("intent_classified", "confidence", "0.5"),
    ("intent_classified", "confidence", True),
    ("policy_checked", "policy", 5),
    ("policy_checked", "passed", "true"),
    ("policy_checked", "passed", 1),
    ("policy_checked", "passed", 0),
    ("policy_checked", "clause", 5),
    ("action_executed", "action", 5),
    ("action_executed", "success", 1),
    ("action_executed", "success", "true"),
    ("action_executed", "latency_ms", -1),
    ("action_executed", "latency_ms", "5"),
    ("action_executed", "error", 5),
    ("action_executed", "cost_usd", -0.01),
    ("action_executed", "cost_usd", True),
    ("response_sent", "latency_ms", -0.001),
    ("response_sent", "latency_ms", True),
    ("response_sent", "latency_ms", "420"),
    ("response_sent", "tokens_in", -1),
    ("response_sent", "tokens_in", 2.0),
    ("response_sent", "tokens_in", True),
    ("response_sent", "tokens_out", 1.5),
    ("response_sent", "tokens_out", "3"),
    ("response_sent", "cost_usd", "1"),
    ("response_sent", "cost_usd", False),
    ("response_sent", "turn_id", 5),
    ("response_sent", "fallback", "yes"),
    ("response_sent", "fallback", 0),
    ("case_escalated", "reason", 5),
    ("case_escalated", "confidence", 2),
    ("case_escalated", "note", 5),
    ("case_resolved", "by", "bot"),
    ("case_resolved", "by", "Agent"),
    ("case_resolved", "by", 5),
    ("case_resolved", "confidence", -1),
    ("human_override", "original_action", 5),
    ("human_override", "final_action", 5),
    ("human_override", "rationale", ["r"]),
    ("human_override", "policy_clause", 5),
    ("csat_submitted", "score", 0),
    ("csat_submitted", "score", 6),
    ("csat_submitted", "score", 2.0),
    ("csat_submitted", "score", 4.5),
    ("csat_submitted", "score", True),
    ("csat_submitted", "score", "5"),
    ("ces_submitted", "score", 0),
    ("ces_submitted", "score", 8),
    ("ces_submitted", "score", 3.0),
    ("ces_submitted", "score", False),
    ("thumbs_submitted", "vote", "sideways"),
    ("thumbs_submitted", "vote", True),
    ("thumbs_submitted", "turn_id", 5),
    ("suggestion_reviewed", "adopted", "yes"),
    ("suggestion_reviewed", "adopted", 1),
    ("suggestion_reviewed", "rationale", 5),
    ("knowledge_flagged", "kind", "wrong"),
    ("knowledge_flagged", "document_id", 5),
    ("evaluation_scored", "name", ""),
    ("evaluation_scored", "name", "x" * 65),
    ("evaluation_scored", "name", 5),
    ("evaluation_scored", "score", 1.01),
    ("evaluation_scored", "score", -0.01),
    ("evaluation_scored", "score", True),
    ("evaluation_scored", "score", "0.9"),
    ("evaluation_scored", "evaluator", 5),
    ("evaluation_scored", "turn_id", 5),
    # envelope dimensions, on any event
    ("case_reopened", "intent", ""),
    ("case_reopened", "intent", "x" * 65),
    ("case_reopened", "intent", True),
    ("case_reopened", "channel", ""),
    ("case_reopened", "channel", "x" * 33),
    ("case_reopened", "channel", 5),
    ("case_reopened", "agent_version", ""),
    ("case_reopened", "agent_version", "x" * 65),
    ("case_reopened", "agent_version", ["v7"]),
]


@pytest.mark.parametrize(("event_type", "name", "value"), BAD_FIELDS)
def test_bad_type_field(event_type: str, name: str, value: Any) -> None:
    """Each field's type and range, including booleans never being numbers."""
    assert reason(doc(event_type, **{name: value})) == "bad_field"


@pytest.mark.parametrize("literal", [b"2.0", b"2e0", b"20E-1", b"2.00"])
@pytest.mark.parametrize("event_type", ["csat_submitted", "ces_submitted"])
def test_score_with_fraction_or_exponent_is_not_an_integer(
    literal: bytes, event_type: str
) -> None:
    """An integer is a JSON number without a fraction or exponent."""
    raw = orjson.dumps(without(doc(event_type), "score"))[:-1] + b',"score":' + literal + b"}"
    assert reason(raw) == "bad_field"
    assert parse_event(raw.replace(b":" + literal + b"}", b":2}")).get("score") == 2


def test_multibyte_dimension_lengths_count_code_points() -> None:
    """64 emoji are a valid intent, 65 are not."""
    assert parse(doc(intent="😀" * 64)).get("intent") == "😀" * 64
    assert reason(doc(intent="😀" * 65)) == "bad_field"


# --- unknown_type -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["case_closed", "", "CASE_OPENED", "case_opened ", "x" * 1000])
def test_unknown_type(value: str) -> None:
    assert reason(doc(type=value)) == "unknown_type"


# --- bad_schema_version -------------------------------------------------------------------


@pytest.mark.parametrize("value", [2, 0, -1, "1", 1.0, True, False, [1], {"v": 1}])
def test_bad_schema_version(value: Any) -> None:
    """Only the integer 1 is version 1 (1.0 and true are not)."""
    assert reason(doc(schema_version=value)) == "bad_schema_version"


def test_schema_version_literal_1_0_is_bad() -> None:
    raw = orjson.dumps(doc())[:-1] + b',"schema_version":1.0}'
    assert reason(raw) == "bad_schema_version"


@pytest.mark.parametrize("fields", [{}, {"schema_version": None}, {"schema_version": 1}])
def test_schema_version_absent_null_or_1_is_ok(fields: dict[str, Any]) -> None:
    assert parse(doc(**fields)).type == "case_reopened"


# --- bad_ts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-22T13:05:09",  # naive
        "2026-11-22T13:05:09.120",  # naive with fraction
        "2026-11-22",  # date only
        "13:05:09Z",  # time only
        "garbage",
        "",
        "1795352709120",  # epoch ms as a string
        "2026-11-22T13:05:09+0200",  # offset without colon
        "2026-11-22T13:05:09+02",
        "2026-11-22T13:05:09 Z",
        "2026-13-01T00:00:00Z",  # month 13
        "2026-02-30T00:00:00Z",  # no such day
        "2026-11-22T25:00:00Z",
        "2026-11-22T13:61:00Z",
        "2026-11-22T13:05:09+24:00",
        "2026-11-22T13:05:09.Z",
        " 2026-11-22T13:05:09Z",
        "2026-11-22T13:05:09Z ",
        float(TS_MS),
        1.5,
        True,
        False,
        [TS],
        {"ms": TS_MS},
        10**16,  # beyond year 9999
        -(10**15),  # before year 1
    ],
)
def test_bad_ts(value: Any) -> None:
    """ts is an RFC 3339 string with an offset, or an integer of epoch milliseconds."""
    assert reason(doc(ts=value)) == "bad_ts"


def test_ts_with_exponent_is_not_an_integer() -> None:
    raw = orjson.dumps(without(doc(), "ts"))[:-1] + b',"ts":1.79535270912e12}'
    assert reason(raw) == "bad_ts"


@pytest.mark.parametrize(
    "value",
    [
        TS,
        TS_MS,
        "2026-11-22T15:05:09.120+02:00",
        "2026-11-22T07:35:09.120-05:30",
        "2026-11-22T13:05:09.120+00:00",
        "2026-11-22T13:05:09.120-00:00",
        "2026-11-22t13:05:09.120z",
        "2026-11-22T13:05:09.12Z",
        "2026-11-22T13:05:09.120000Z",
    ],
)
def test_both_ts_forms_give_the_same_instant(value: str | int) -> None:
    """String with any offset and epoch milliseconds denote the same instant."""
    assert parse(doc(ts=value)).ts_us == TS_US
    assert parse_ts(value) == TS_US


def test_ts_us_matches_datetime() -> None:
    """An independent check of the constant the other tests rely on."""
    expected = datetime(2026, 11, 22, 13, 5, 9, 120000, tzinfo=UTC)
    assert (expected - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) == TS_US


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("2026-11-22T13:05:09Z", 0),
        ("2026-11-22T13:05:09.1Z", 100_000),
        ("2026-11-22T13:05:09.000001Z", 1),
        ("2026-11-22T13:05:09.123456Z", 123_456),
        ("2026-11-22T13:05:09.999999+01:00", 999_999),
    ],
)
def test_fractional_seconds_to_microseconds(value: str, micros: int) -> None:
    assert parse_ts(value) % 1_000_000 == micros


def test_sub_microsecond_digits_do_not_move_to_another_second() -> None:
    """Nanosecond precision is accepted and resolved to a microsecond of the same second."""
    ts = parse_ts("2026-11-22T13:05:09.123456789Z")
    assert ts // 1_000_000 == parse_ts("2026-11-22T13:05:09Z") // 1_000_000
    assert ts % 1_000_000 in (123_456, 123_457)


def test_offset_crossing_midnight_and_epoch() -> None:
    assert parse_ts("2026-11-23T01:00:00+12:00") == parse_ts("2026-11-22T13:00:00Z")
    assert parse_ts("1970-01-01T00:00:00Z") == 0 == parse_ts(0)
    assert parse_ts("1969-12-31T23:59:59.999Z") == -1000 == parse_ts(-1)


# --- reason order -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"[" * (MAX_MESSAGE_BYTES + 1), "too_large"),
        (b"[1,", "not_json"),
        (b'[{"type":"nope"}]', "not_object"),
        (without(doc(case_id=""), "event_id"), "missing_field"),
        (without(doc(type="nope"), "ts"), "missing_field"),
        (without(doc(event_id=5, schema_version=2), "case_id"), "missing_field"),
        (doc(event_id="", type="nope"), "bad_field"),
        (doc(case_id="x" * 129, ts="garbage"), "bad_field"),
        (doc(type=7, schema_version=2, ts="garbage"), "bad_field"),
        (doc(type="nope", ts="garbage"), "unknown_type"),
        (doc(type="nope", schema_version=2), "unknown_type"),
        (doc(schema_version=2, ts="garbage"), "bad_schema_version"),
        (without(doc("csat_submitted", schema_version="1"), "score"), "bad_schema_version"),
        (doc("csat_submitted", schema_version=2, score=9), "bad_schema_version"),
        (without(doc("csat_submitted", ts=1.5), "score"), "bad_ts"),
        (doc("csat_submitted", ts="2026-11-22T13:05:09", score=9), "bad_ts"),
        (doc("case_reopened", ts=True, channel=5), "bad_ts"),
        (without(doc("intent_classified", channel=5), "confidence"), "missing_field"),
        (without(doc("intent_classified", intent=""), "confidence"), "missing_field"),
        (without(doc("policy_checked", policy=5), "passed"), "missing_field"),
        (doc("response_sent", latency_ms=None, tokens_in=-1), "missing_field"),
    ],
)
def test_first_applicable_reason_wins(message: dict[str, Any] | bytes, expected: str) -> None:
    """A message that breaks several rules gets the earliest reason of the list."""
    assert reason(message) == expected


def test_invalid_reasons_are_the_contract_list() -> None:
    assert set(INVALID_REASONS) == {
        "too_large",
        "not_json",
        "not_object",
        "missing_field",
        "bad_field",
        "unknown_type",
        "bad_schema_version",
        "bad_ts",
        "past_ts",
        "future_ts",
    }
    assert INVALID_REASONS[-2:] == ("past_ts", "future_ts")  # last: otherwise valid events


# --- normalise_reason and message_key -----------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "low_confidence",
        "policy_ambiguity",
        "physical_action_required",
        "customer_request",
        "tool_failure",
        "compliance_block",
        "negative_sentiment",
        "other",
    ],
)
def test_normalise_reason_keeps_known_codes(code: str) -> None:
    assert code in ESCALATION_REASONS
    assert normalise_reason(code) == (code, False)


@pytest.mark.parametrize("code", ["", "LOW_CONFIDENCE", "angry_customer", "low_confidence "])
def test_normalise_reason_unknown_is_other(code: str) -> None:
    assert normalise_reason(code) == ("other", True)


def test_unknown_escalation_reason_is_valid() -> None:
    """An unknown reason code is normalised later, not rejected by the parser."""
    assert parse(doc("case_escalated", reason="angry_customer")).get("reason") == "angry_customer"


def test_message_key() -> None:
    """Producers key by the UTF-8 bytes of case_id."""
    assert message_key(orjson.dumps(doc(case_id="c-ü"))) == "c-ü".encode()
    assert message_key(b"not json") is None
    assert message_key(b"[1]") is None
    assert message_key(orjson.dumps(doc(case_id=5))) is None


# --- numbers and text at the edges of the JSON decoders ---------------------------------


def test_integer_beyond_64_bits_is_still_an_integer() -> None:
    """A JSON integer past 2**64 is an integer, not a rounded float (orjson would round it)."""
    raw = orjson.dumps(doc("response_sent"))[:-1] + b',"tokens_in":18446744073709551616}'
    assert parse_event(raw).get("tokens_in") == 2**64
    big_score = orjson.dumps(without(doc("csat_submitted"), "score"))[:-1]
    assert reason(big_score + b',"score":18446744073709551617}') == "bad_field"


def test_huge_integer_in_unknown_field_is_ignored() -> None:
    """An extra field is ignored whatever its value, even a 5000-digit integer."""
    raw = orjson.dumps(doc())[:-1] + b',"x":1' + b"0" * 5000 + b"}"
    assert parse_event(raw).type == "case_reopened"


def test_twenty_digit_strings_parse_the_same() -> None:
    """Long digit runs inside strings must not change how a message is decoded."""
    event = parse(doc(event_id="1" * 20, case_id="2" * 40))
    assert (event.event_id, event.case_id) == ("1" * 20, "2" * 40)


@pytest.mark.parametrize("field", ["cost_usd", "latency_ms"])
def test_number_beyond_a_double_is_bad_field(field: str) -> None:
    """1e400 is no usable amount (it would decode to infinity and poison every sum)."""
    raw = orjson.dumps(doc("action_executed"))[:-1] + f',"{field}":1e400}}'.encode()
    assert reason(raw) == "bad_field"


def test_number_beyond_a_double_in_unknown_field_is_ignored() -> None:
    raw = orjson.dumps(doc())[:-1] + b',"x":1e400}'
    assert parse_event(raw).type == "case_reopened"


@pytest.mark.parametrize("name", ["event_id", "case_id", "intent", "x"])
def test_lone_surrogate_escape_is_not_json(name: str) -> None:
    """A lone surrogate escape is JSON syntax but no Unicode text: never part of an Event."""
    raw = orjson.dumps(without(doc(), name))[:-1] + f',"{name}":"a\\ud800"}}'.encode()
    assert b"\\ud800" in raw
    assert reason(raw) == "not_json"


def test_surrogate_pair_escape_is_one_code_point() -> None:
    """An escaped pair is one character, so it counts once towards the 128 limit."""
    pairs = b"\\ud83d\\ude00" * 128
    raw = orjson.dumps(without(doc(), "event_id"))[:-1] + b',"event_id":"' + pairs + b'"}'
    assert parse_event(raw).event_id == "\U0001f600" * 128


@pytest.mark.parametrize(
    "value",
    [
        "\u0662\u0660\u0662\u0666-11-22T13:00:00Z",  # Arabic-Indic digits
        "\uff12\uff10\uff12\uff16-11-22T13:00:00Z",  # fullwidth digits
        "2026-11-22T13:05:09.\u0661\u0662Z",
    ],
)
def test_ts_with_non_ascii_digits_is_bad_ts(value: str) -> None:
    """RFC 3339 digits are ASCII only."""
    assert reason(doc(ts=value)) == "bad_ts"


# --- properties ---------------------------------------------------------------------------


def _outcome(raw: bytes) -> Event | str:
    """parse_event's result, or the reason; any other exception escapes and fails."""
    try:
        return parse_event(raw)
    except InvalidEvent as err:
        assert err.reason in INVALID_REASONS
        return err.reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_event_or_known_reason(raw: bytes) -> None:
    result = _outcome(raw)
    assert isinstance(result, Event) or result in INVALID_REASONS


FIELD_NAMES = [
    "event_id", "type", "case_id", "ts", "schema_version", "intent", "channel",
    "agent_version", "score", "by", "reason", "passed", "success", "action", "latency_ms",
    "confidence", "vote", "kind", "name", "cost_usd", "tokens_in", "related_case_id",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from([*EVENT_TYPES, TS, TS_MS, "agent", "down", "missing", 1, 0.5]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)),
                        children, max_size=6),
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_gives_event_or_known_reason(value: Any) -> None:
    raw = json.dumps(value).encode()
    result = _outcome(raw)
    assert isinstance(result, Event) or result in INVALID_REASONS
    if not isinstance(value, dict):
        assert result in ("not_object", "not_json")


@st.composite
def contract_like(draw: st.DrawFn) -> dict[str, Any]:
    """An object with (mostly) the envelope and random values for contract fields."""
    envelope = {
        "event_id": st.one_of(st.just("e-1"), scalars),
        "type": st.one_of(st.sampled_from(EVENT_TYPES), scalars),
        "case_id": st.one_of(st.just("c-1"), scalars),
        "ts": st.one_of(st.sampled_from([TS, TS_MS]), scalars),
    }
    others = {name: scalars for name in FIELD_NAMES if name not in envelope}
    out = draw(st.fixed_dictionaries(envelope, optional=others))
    dropped = draw(st.sampled_from([None, None, None, *envelope]))
    out.pop(dropped, None)
    return out


@settings(max_examples=300, deadline=None)
@given(contract_like())
def test_arbitrary_objects_give_event_or_known_reason(value: dict[str, Any]) -> None:
    """Objects keyed by contract field names reach the deeper checks."""
    result = _outcome(json.dumps(value).encode())
    assert isinstance(result, Event) or result in INVALID_REASONS
    if isinstance(result, Event):
        assert result.type in EVENT_TYPES


# Valid events: a strategy per type, then the envelope.
ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=128)
names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=64)
short = st.text(max_size=10, alphabet="abcxyz_-0123")
unit = st.floats(0, 1)
non_negative = st.one_of(st.integers(0, 10**6), st.floats(0, 1e6))


def _optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the fields, each with a valid value or null."""
    return st.fixed_dictionaries(
        {}, optional={k: st.one_of(st.none(), v) for k, v in fields.items()}
    )


TYPE_FIELDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "case_opened": _optional(related_case_id=short, customer_id=short),
    "intent_classified": st.fixed_dictionaries({"intent": names, "confidence": unit}),
    "policy_checked": st.fixed_dictionaries(
        {"policy": short, "passed": st.booleans()}, optional={"clause": short}
    ),
    "action_executed": st.fixed_dictionaries(
        {"action": short, "success": st.booleans()},
        optional={"latency_ms": non_negative, "error": short, "cost_usd": non_negative},
    ),
    "response_sent": st.fixed_dictionaries(
        {"latency_ms": non_negative},
        optional={
            "tokens_in": st.integers(0, 10**9),
            "tokens_out": st.integers(0, 10**9),
            "cost_usd": non_negative,
            "fallback": st.booleans(),
        },
    ),
    "case_escalated": st.fixed_dictionaries(
        {"reason": st.one_of(st.sampled_from(sorted(ESCALATION_REASONS)), short)},
        optional={"confidence": unit, "note": short},
    ),
    "case_resolved": st.fixed_dictionaries(
        {"by": st.sampled_from(["agent", "human"])}, optional={"confidence": unit}
    ),
    "case_reopened": st.just({}),
    "csat_submitted": st.fixed_dictionaries({"score": st.integers(1, 5)}),
    "ces_submitted": st.fixed_dictionaries({"score": st.integers(1, 7)}),
    "thumbs_submitted": st.fixed_dictionaries({"vote": st.sampled_from(["up", "down"])}),
    "evaluation_scored": st.fixed_dictionaries(
        {"name": names, "score": unit}, optional={"evaluator": short}
    ),
}


FIXED_NOW_S = 1_795_352_400.0  # 2026-11-22T13:00:00Z
FIXED_CLOCK = EventTimeBounds(max_skew_s=600, clock=lambda: FIXED_NOW_S)


def test_a_ts_exactly_the_allowed_skew_ahead_is_valid_one_ms_more_is_not() -> None:
    now_ms = int(FIXED_NOW_S * 1000)
    assert reason_of(doc(ts=now_ms + 600_000), FIXED_CLOCK) is None
    assert reason(doc(ts=now_ms + 600_001), FIXED_CLOCK) == "future_ts"
    assert reason(doc(ts="2026-11-22T13:10:00.001Z"), FIXED_CLOCK) == "future_ts"
    assert reason_of(doc(ts="2026-11-22T13:10:00Z"), FIXED_CLOCK) is None
    skewless = EventTimeBounds(max_skew_s=0.5, clock=lambda: FIXED_NOW_S)
    assert reason(doc(ts=now_ms + 501), skewless) == "future_ts"


def test_a_ts_before_2000_is_past_ts() -> None:
    assert reason_of(doc(ts=946_684_800_000), FIXED_CLOCK) is None  # 2000-01-01T00:00:00Z
    assert reason(doc(ts=946_684_799_999), FIXED_CLOCK) == "past_ts"
    # epoch seconds where milliseconds belong: January 1970
    invalid = reason_of(doc(ts=1_795_352_400), FIXED_CLOCK)
    assert invalid.reason == "past_ts" and "epoch seconds" in invalid.detail
    # milliseconds in 2100, and microseconds where milliseconds belong (past year 9999)
    assert reason(doc(ts=4_102_444_800_000), FIXED_CLOCK) == "future_ts"
    assert reason(doc(ts=1_795_352_400_000_000), FIXED_CLOCK) == "bad_ts"


def test_implausible_times_come_after_every_other_reason() -> None:
    """past_ts and future_ts are judged last: an event broken otherwise keeps its reason."""
    assert reason(without(doc("csat_submitted", ts=5), "score"), FIXED_CLOCK) == "missing_field"
    assert reason(doc("csat_submitted", ts=4_102_444_800_000, score=9),
                  FIXED_CLOCK) == "bad_field"


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[str | int, int]:
    """A ts in either form and its expected ts_us, computed with datetime."""
    if draw(st.booleans()):
        ms = draw(st.one_of(st.integers(946_684_800_000, 1_800_000_000_000),
                            st.integers(-(10**13), 10**13)))
        return ms, ms * 1000
    moment = draw(st.one_of(st.datetimes(datetime(2000, 1, 2), datetime(2026, 11, 1)),
                            st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1))))
    offset = timedelta(minutes=draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59)))
    aware = moment.replace(tzinfo=timezone(offset))
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(offset) // timedelta(minutes=1)
    text = aware.strftime("%Y-%m-%dT%H:%M:%S") + f".{moment.microsecond:06d}"
    text += f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    expected = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return text, expected


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    event_type = draw(st.sampled_from(sorted(TYPE_FIELDS)))
    ts, expected = draw(timestamps())
    out: dict[str, Any] = {"event_id": draw(ids), "type": event_type, "case_id": draw(ids),
                           "ts": ts}
    channels = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=32)
    out.update(draw(_optional(intent=names, channel=channels, agent_version=names,
                              schema_version=st.just(1))))
    out.update(draw(TYPE_FIELDS[event_type]))
    return out, expected


@settings(max_examples=250, deadline=None)
@given(valid_events())
def test_generated_valid_events_parse(generated: tuple[dict[str, Any], int]) -> None:
    """Every well-formed event parses; its ts decides whether it is dated plausibly."""
    d, expected_ts_us = generated
    try:
        event = parse_event(orjson.dumps(d), FIXED_CLOCK)
    except InvalidEvent as invalid:
        latest = (FIXED_NOW_S + FIXED_CLOCK.max_skew_s) * 1_000_000
        assert (invalid.reason, expected_ts_us < EARLIEST_TS_US) in (("past_ts", True),
                                                                      ("future_ts", False))
        assert expected_ts_us < EARLIEST_TS_US or expected_ts_us > latest
        return
    assert (event.event_id, event.case_id, event.type) == (d["event_id"], d["case_id"], d["type"])
    assert event.ts_us == expected_ts_us

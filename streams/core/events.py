"""Event parsing and validation: the wire contract of docs/events.md, rule by rule.

`parse_event` either returns an `Event` or raises `InvalidEvent` whose `reason`
is the first applicable reason of the contract's ordered list. Nothing else
escapes it, whatever the bytes (a property test holds it to that).

Each field's rule is declared once (`_Field`) and read two ways: as a Python check, rule
by rule in the contract's order (`validate_event`), and as a msgspec type. A message
passes every rule of its type's msgspec struct in one call in C; only one that fails
goes through the checks, to find its reason.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import orjson

MAX_MESSAGE_BYTES = 1_048_576

ESCALATION_REASONS = frozenset(
    {
        "low_confidence",
        "policy_ambiguity",
        "physical_action_required",
        "customer_request",
        "tool_failure",
        "compliance_block",
        "negative_sentiment",
        "other",
    }
)

INVALID_REASONS = (
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
)

DIMENSIONS = ("intent", "channel", "agent_version")
_DIMENSION_MAX_LEN = {"intent": 64, "channel": 32, "agent_version": 64}

# Timestamps must be representable as a calendar date: years 1..9999.
_MIN_TS_MS = -62_135_596_800_000
_MAX_TS_MS = 253_402_300_799_999


EARLIEST_TS_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z: anything before is a unit mistake
DEFAULT_MAX_CLOCK_SKEW_S = 600


@dataclass(frozen=True)
class EventTimeBounds:
    """A `ts` must be after 2000 and at most `max_skew_s` ahead of the reader's clock: one
    event dated years ahead would move its partition's event time past every open window
    and case (docs/kpis.md, "Event time")."""

    max_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S
    clock: Callable[[], float] = time.time

    def check(self, ts_us: int) -> None:
        if ts_us < EARLIEST_TS_US:
            raise InvalidEvent("past_ts", f"ts {format_ts(ts_us)} is before 2000-01-01: "
                               "epoch seconds where milliseconds belong?")
        ahead_us = ts_us - round(self.clock() * 1_000_000)
        if ahead_us > self.max_skew_s * 1_000_000:
            raise InvalidEvent(
                "future_ts", f"ts {format_ts(ts_us)} is {ahead_us / 1e6:,.0f} s ahead of this "
                f"clock, more than the {self.max_skew_s:g} s allowed (ACSR_MAX_CLOCK_SKEW_S): "
                "is the producer's clock ahead?")


READER_CLOCK = EventTimeBounds()  # the contract's default skew, against this process's clock


class InvalidEvent(ValueError):
    """A message that breaks the contract; `reason` is one of INVALID_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Event(NamedTuple):
    """A valid event. `ts_us` is event time in integer microseconds since the epoch.

    A tuple: made at once, and of no concern to the garbage collector once it has seen
    it (its fields are a dict of plain values), though a batch holds thousands."""

    event_id: str
    type: str
    case_id: str
    ts_us: int
    fields: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.fields.get(name)
        return default if value is None else value


# --- field checks ---------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # 1e400 decodes as infinity: not a usable number
    return _is_integer(value) and abs(value) <= _MAX_NUMBER


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Field:
    """One field's rule: the contract's check, and the msgspec type that takes exactly the
    values the check passes (among those orjson decodes: integers within 64 bits)."""

    check: Callable[[Any], bool]
    type: Any


def _string(max_len: int | None = None, min_len: int = 0) -> _Field:
    def check(value: Any) -> bool:
        return isinstance(value, str) and min_len <= len(value) <= (max_len or len(value))

    return _Field(check, Annotated[str, msgspec.Meta(min_length=min_len, max_length=max_len)])


def _number(low: float | None = None, high: float | None = None) -> _Field:
    def check(value: Any) -> bool:
        return (
            _is_number(value)
            and (low is None or value >= low)
            and (high is None or value <= high)
        )

    # msgspec's float takes integers too, and neither booleans nor non-finite numbers.
    return _Field(check, Annotated[float, msgspec.Meta(ge=low, le=high)])


def _integer(low: int, high: int | None = None) -> _Field:
    def check(value: Any) -> bool:
        return _is_integer(value) and value >= low and (high is None or value <= high)

    return _Field(check, Annotated[int, msgspec.Meta(ge=low, le=high)])


def _one_of(*choices: str) -> _Field:
    def check(value: Any) -> bool:
        return isinstance(value, str) and value in choices

    return _Field(check, Literal[choices])


_boolean = _Field(lambda value: isinstance(value, bool), bool)
_anything = _Field(lambda value: True, Any)
_string_any = _string()
_confidence = _number(0, 1)
_non_negative = _number(0)

# type -> (required fields, optional fields); each field maps to its check.
_SCHEMAS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "case_opened": ({}, {"related_case_id": _string_any, "customer_id": _anything}),
    "intent_classified": ({"intent": _string(64, 1), "confidence": _confidence}, {}),
    "policy_checked": ({"policy": _string_any, "passed": _boolean}, {"clause": _string_any}),
    "action_executed": (
        {"action": _string_any, "success": _boolean},
        {"latency_ms": _non_negative, "error": _string_any, "cost_usd": _non_negative},
    ),
    "response_sent": (
        {"latency_ms": _non_negative},
        {
            "tokens_in": _integer(0),
            "tokens_out": _integer(0),
            "cost_usd": _non_negative,
            "turn_id": _string_any,
            "fallback": _boolean,
        },
    ),
    "case_escalated": (
        {"reason": _string_any},
        {"confidence": _confidence, "note": _string_any},
    ),
    "case_resolved": ({"by": _one_of("agent", "human")}, {"confidence": _confidence}),
    "case_reopened": ({}, {}),
    "human_override": (
        {"original_action": _string_any, "final_action": _string_any, "rationale": _string_any},
        {"policy_clause": _string_any},
    ),
    "csat_submitted": ({"score": _integer(1, 5)}, {}),
    "ces_submitted": ({"score": _integer(1, 7)}, {}),
    "thumbs_submitted": ({"vote": _one_of("up", "down")}, {"turn_id": _string_any}),
    "suggestion_reviewed": ({"adopted": _boolean}, {"rationale": _string_any}),
    "knowledge_flagged": (
        {"kind": _one_of("irrelevant", "missing")},
        {"document_id": _string_any},
    ),
    "evaluation_scored": (
        {"name": _string(64, 1), "score": _number(0, 1)},
        {"evaluator": _string_any, "turn_id": _string_any},
    ),
}

EVENT_TYPES = tuple(_SCHEMAS)

_ENVELOPE_OPTIONAL = {name: _string(max_len, 1) for name, max_len in _DIMENSION_MAX_LEN.items()}
# type -> (required names, every (name, check) in the order they are checked)
_FIELD_CHECKS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]] = {
    event_type: (tuple(required), tuple((name, rule.check)
                                        for rules in (required, optional, _ENVELOPE_OPTIONAL)
                                        for name, rule in rules.items()))
    for event_type, (required, optional) in _SCHEMAS.items()
}

# The envelope's rules (`validate_event` checks them in code) as msgspec types.
_ID = _string(128, 1).type
_TS = Annotated[int, msgspec.Meta(ge=_MIN_TS_MS, le=_MAX_TS_MS)] | str


def _struct(event_type: str, required: dict[str, _Field], optional: dict[str, _Field]
            ) -> type[msgspec.Struct]:
    """Every rule of one event type as one msgspec struct: a document it takes breaks none
    of them (a required field may not be null, an optional one may)."""
    optional = {**optional, **{name: rule for name, rule in _ENVELOPE_OPTIONAL.items()
                               if name not in required}}
    fields: list[Any] = [("event_id", _ID), ("case_id", _ID), ("ts", _TS),
                         ("schema_version", Literal[1] | None, None)]
    fields += [(name, rule.type) for name, rule in required.items()]
    fields += [(name, rule.type | None, None) for name, rule in optional.items()]
    return msgspec.defstruct(f"_{event_type}", fields, kw_only=True, tag_field="type",
                             tag=event_type)


_STRUCTS = {event_type: _struct(event_type, *schema) for event_type, schema in _SCHEMAS.items()}

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


# --- timestamps -------------------------------------------------------------------------


def parse_ts(value: Any) -> int:
    """Event time in microseconds from an RFC 3339 string with an offset or epoch ms."""
    if _is_integer(value):
        if not _MIN_TS_MS <= value <= _MAX_TS_MS:
            raise InvalidEvent("bad_ts", "epoch milliseconds outside years 1-9999")
        return value * 1000
    if not isinstance(value, str):
        raise InvalidEvent("bad_ts", "ts must be an RFC 3339 string or integer epoch ms")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidEvent("bad_ts", "ts is not RFC 3339 with an offset")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction = match.group(7) or ""
    micros = int((fraction + "000000")[:6])
    leap = second == 60  # RFC 3339 allows a leap second; count it as the next second's start
    offset = timedelta(0)
    if match.group(9):
        offset_hours, offset_minutes = int(match.group(10)), int(match.group(11))
        if offset_hours > 23 or offset_minutes > 59:
            raise InvalidEvent("bad_ts", "ts offset out of range")
        offset = timedelta(hours=offset_hours, minutes=offset_minutes)
        if match.group(9) == "-":
            offset = -offset
    try:
        moment = datetime(year, month, day, hour, minute, 59 if leap else second, micros, UTC)
        moment -= offset
    except (ValueError, OverflowError) as err:
        raise InvalidEvent("bad_ts", f"ts is not a valid date-time ({err})") from None
    ts_us = (moment - _EPOCH) // timedelta(microseconds=1)
    return ts_us + 1_000_000 if leap else ts_us


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_NUMBER = 10**300  # beyond this an integer has no float value to sum
# Twenty digits in a row may be an integer beyond 64 bits, which orjson turns to a float:
# the digits all read as "0", then looked for as a run (a regex takes five times as long).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_INTEGER = b"0" * 20
_MAX_INTEGER_DIGITS = 4000  # Python refuses to convert longer digit strings


def format_ts(ts_us: int) -> str:
    """RFC 3339 in UTC with a `Z`, seconds precision (used for window starts)."""
    moment = _EPOCH + timedelta(microseconds=ts_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the parser -------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_int(digits: str) -> int | float:
    if len(digits.lstrip("-")) > _MAX_INTEGER_DIGITS:
        return math.inf  # too long to be any usable value: fails every number check
    return int(digits)


def _decode(raw: bytes) -> tuple[Any, bool]:
    """The message's JSON value, and whether orjson decoded it (then every integer in it
    fits 64 bits: what `_valid_at_once` relies on)."""
    if _LONG_INTEGER not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass
    # The standard library decides what orjson refuses or would round: integers beyond
    # 64 bits, numbers beyond a double (1e400); NaN and Infinity are still refused.
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                         parse_int=_parse_int)
        # A lone surrogate escape ("\ud800") is JSON syntax but no Unicode text.
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as err:
        raise InvalidEvent("not_json", f"not UTF-8 JSON ({type(err).__name__})") from None
    return doc, False


def parse_event(raw: bytes | bytearray | memoryview | None,
                bounds: EventTimeBounds = READER_CLOCK) -> Event:
    """Validate one message value against the contract (`bounds`: the allowed event time)."""
    if raw is None:
        raise InvalidEvent("not_json", "empty message")
    raw = bytes(raw)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent("too_large", f"{len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    doc, by_orjson = _decode(raw)
    if not isinstance(doc, dict):
        raise InvalidEvent("not_object", f"JSON {type(doc).__name__}, not an object")
    event = _valid_at_once(doc, bounds) if by_orjson else None
    return event if event is not None else validate_event(doc, bounds)


def _valid_at_once(doc: dict[str, Any], bounds: EventTimeBounds) -> Event | None:
    """The event, if its type's msgspec struct takes the document (decoded by orjson);
    None sends it through `validate_event`, which finds the reason it breaks."""
    event_type = doc.get("type")
    struct = _STRUCTS.get(event_type) if type(event_type) is str else None
    if struct is None:
        return None
    try:
        msgspec.convert(doc, struct)
    except msgspec.ValidationError:
        return None
    # Every rule before and after `ts` holds: a ts that does not parse is the first reason.
    ts = doc["ts"]
    ts_us = ts * 1000 if type(ts) is int else parse_ts(ts)  # an int is in range already
    bounds.check(ts_us)
    return Event(doc["event_id"], event_type, doc["case_id"], ts_us, doc)


def validate_event(doc: dict[str, Any], bounds: EventTimeBounds = READER_CLOCK) -> Event:
    """Validate an already decoded JSON object."""
    for name in ("event_id", "type", "case_id", "ts"):
        if doc.get(name) is None:
            raise InvalidEvent("missing_field", f"{name} is required")
    for name in ("event_id", "case_id"):
        value = doc[name]
        if not isinstance(value, str) or not 1 <= len(value) <= 128:
            raise InvalidEvent("bad_field", f"{name} must be a string of 1-128 characters")
    event_type = doc["type"]
    if not isinstance(event_type, str):
        raise InvalidEvent("bad_field", "type must be a string")
    schema = _FIELD_CHECKS.get(event_type)
    if schema is None:
        raise InvalidEvent("unknown_type", f"unknown type {event_type[:64]!r}")
    version = doc.get("schema_version")
    if version is not None and not (_is_integer(version) and version == 1):
        raise InvalidEvent("bad_schema_version", "schema_version must be 1")
    ts_us = parse_ts(doc["ts"])
    required, checks = schema
    get = doc.get
    for name in required:
        if get(name) is None:
            raise InvalidEvent("missing_field", f"{event_type} requires {name}")
    for name, check in checks:
        value = get(name)
        if value is not None and not check(value):
            raise InvalidEvent("bad_field", f"{name} has the wrong type or is out of range")
    bounds.check(ts_us)  # last: these reasons apply to otherwise valid events
    return Event(doc["event_id"], event_type, doc["case_id"], ts_us, doc)


def normalise_reason(reason: str) -> tuple[str, bool]:
    """Escalation reason code, and whether it had to be normalised to `other`."""
    if reason in ESCALATION_REASONS:
        return reason, False
    return "other", True


def message_key(raw: bytes) -> bytes | None:
    """The partitioning key a producer should use for a message: its `case_id`."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    case_id = doc.get("case_id") if isinstance(doc, dict) else None
    return case_id.encode() if isinstance(case_id, str) else None

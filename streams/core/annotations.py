"""Annotation queue items: what a reviewer needs, in which order, and the sample of resolutions.

Pure (no Faust, no Kafka), so the item schema, the priorities, the random sample and the
resend guard are unit-tested on their own; streams/worker/app.py does the I/O. The schema is
documented in docs/annotations.md; bump SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.core.events import format_ts, parse_ts
from streams.core.state_bytes import sorted_json

SCHEMA_VERSION = 1
RANDOM_SAMPLE = "random_sample"

# Lower is reviewed first. Compliance risks (an override, a resolution the strict test
# rejects) come first, then cases the agent did not close for good, then low ratings,
# then the unbiased sample nobody rated. A function of the reason alone, so the metric's
# `priority` label adds no series.
PRIORITIES: dict[str, int] = {
    "human_override": 1,
    "unverified_resolution": 1,
    "escalated": 2,
    "reopened": 2,
    "thumbs_down": 3,
    "low_csat": 3,
    "low_ces": 3,
    "low_score": 3,
    "knowledge_missing": 3,
    RANDOM_SAMPLE: 4,
}
LOWEST_PRIORITY = max(PRIORITIES.values())
REASONS = tuple(PRIORITIES)

CORRECTION_FIELDS = ("original_action", "final_action", "rationale", "policy_clause")
# Kafka header of each item: see `ResendGuard` (internal, not part of the item schema).
HORIZON_HEADER = "acsr-resend-horizon"

_ITEM_NAMESPACE = uuid.UUID("6f1c2a4e-3b8d-5e7f-9a10-acc5a11e0001")


def priority(reason: str) -> int:
    """Review priority of a reason (1 first); an unknown reason gets the lowest."""
    return PRIORITIES.get(reason, LOWEST_PRIORITY)


def item_id(case_id: str, reason: str) -> str:
    """The same id for the same case and reason, whoever computes it and however often."""
    return str(uuid.uuid5(_ITEM_NAMESPACE, orjson.dumps([case_id, reason]).decode()))


def sample_point(case_id: str) -> float:
    """A uniform point in [0, 1) fixed by the case id (stable across runs and workers)."""
    digest = hashlib.sha256(case_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sampled(case_id: str, rate: float) -> bool:
    """Whether an autonomous resolution of this case belongs to the random sample."""
    return rate > 0 and sample_point(case_id) < rate


@dataclass(frozen=True)
class Source:
    """Where the triggering event was read: the item's partition has the same number."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class CaseView:
    """The case as known when it was routed."""

    dims: tuple[str, str, str]
    outcome: str | None
    policy_failed: bool = False
    overridden: bool = False
    failed_actions: tuple[str, ...] = ()


def build_item(case_id: str, reason: str, trigger: Mapping[str, Any], case: CaseView,
               source: Source) -> dict[str, Any]:
    """One queue item (schema version 1): everything an annotator needs, nothing to look up."""
    intent, channel, agent_version = case.dims
    correction = None
    if reason == "human_override":
        correction = {name: trigger.get(name) for name in CORRECTION_FIELDS}
    return {
        "schema_version": SCHEMA_VERSION,
        "item_id": item_id(case_id, reason),
        "case_id": case_id,
        "reason": reason,
        "priority": priority(reason),
        "ts": format_ts(parse_ts(trigger["ts"])),
        "intent": intent,
        "channel": channel,
        "agent_version": agent_version,
        "outcome": case.outcome,
        "signals": {
            "policy_failed": case.policy_failed,
            "overridden": case.overridden,
            "failed_actions": sorted(case.failed_actions),
        },
        "trigger": dict(trigger),
        "correction": correction,
        "source": {"topic": source.topic, "partition": source.partition,
                   "offset": source.offset},
    }


encode = sorted_json  # an item as it goes on the topic

# A valid event may take up to 1 MiB; its item copies it (and an override's texts twice),
# so an item can outgrow what the broker takes. Such an item is cut, never dropped.
TEXT_CUT = 4096  # code points kept of a long text in a cut item
KEPT_TRIGGER_FIELDS = ("event_id", "type", "case_id", "ts")


def encode_within(item: Mapping[str, Any], limit: int) -> bytes:
    """The item encoded in at most `limit` bytes: if it is larger, the texts of `trigger`
    and `correction` are cut to TEXT_CUT code points (ending in `…`), then, if that is not
    enough, `trigger` keeps only its identifying fields; `truncated` says so."""
    raw = encode(item)
    if len(raw) <= limit:
        return raw
    cut = {**item, "truncated": True,
           "trigger": _cut_texts(item["trigger"]), "correction": _cut_texts(item["correction"])}
    raw = encode(cut)
    if len(raw) > limit:
        cut["trigger"] = {name: cut["trigger"][name] for name in KEPT_TRIGGER_FIELDS
                          if name in cut["trigger"]}
        raw = encode(cut)
    return raw


def _cut_texts(fields: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if fields is None:
        return None
    return {name: value[:TEXT_CUT] + "…" if isinstance(value, str) and len(value) > TEXT_CUT
            else value for name, value in fields.items()}


class ItemError(ValueError):
    """A message on the annotation topic that is not an item this version understands."""


def decode(raw: bytes | None) -> dict[str, Any]:
    try:
        item = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as err:
        raise ItemError(f"not JSON: {err}") from None
    if not isinstance(item, dict) or item.get("schema_version") != SCHEMA_VERSION:
        raise ItemError("not an annotation item of schema version "
                        f"{SCHEMA_VERSION}")
    for name in ("case_id", "reason", "item_id", "source", "ts"):
        if name not in item:
            raise ItemError(f"item without {name}")
    return item


@dataclass(frozen=True)
class TailRecord:
    """What the resend guard needs of one item already on the annotation topic."""

    case_id: str
    reason: str
    source_offset: int
    horizon: int


@dataclass
class ResendGuard:
    """Items of one partition that may be on the topic although their case write was lost.

    A worker starting on a partition at `first_offset` may re-process events from there
    on; an item sent for such an event before a crash is on the annotation topic, but the
    case state that records it may not have reached the changelog. Reading the topic's
    tail (newest first) until an item whose source offset and horizon are both below
    `first_offset` finds every such item: see docs/annotations.md for why that is enough.
    Every item this session sends carries `horizon` (the highest source offset it relied
    on), so a later session's scan does not stop short of them.
    """

    first_offset: int
    sent: set[tuple[str, str]] = field(default_factory=set)
    horizon: int = -1

    def take(self, newest_first: Iterable[TailRecord]) -> bool:
        """Add records of a chunk read newest first; True once the scan can stop."""
        for record in newest_first:
            if record.source_offset >= self.first_offset:
                self.sent.add((record.case_id, record.reason))
                self.horizon = max(self.horizon, record.source_offset)
            elif record.horizon < self.first_offset:
                return True
        return False

    def already_sent(self, case_id: str, reason: str) -> bool:
        return (case_id, reason) in self.sent

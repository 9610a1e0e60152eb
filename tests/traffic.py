"""Deterministic synthetic agent traffic (per the event contract) for the tests.

`generate(cases, seed)` yields message values in arrival order: whole conversations,
feedback that arrives later, re-engagements of earlier cases, and a small share of
invalid and duplicate messages, so every KPI rule is exercised.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from streams.tools.simulate import with_noise

INTENTS = ("refund", "order_status", "shipping_change", "account_access", "billing_dispute")
CHANNELS = ("web", "email", "voice", "whatsapp")
VERSIONS = ("v7", "v8")
REASONS = ("low_confidence", "policy_ambiguity", "tool_failure", "customer_request",
           "negative_sentiment", "mystery_reason")
START_MS = 1_795_352_400_000  # 2026-11-22T13:00:00Z
EVALUATIONS = ("groundedness", "tone")
ACTIONS = ("refund", "lookup_order", "update_address")


@dataclass(frozen=True)
class Shape:
    """The label values traffic draws from."""

    intents: tuple[str, ...] = INTENTS
    channels: tuple[str, ...] = CHANNELS
    versions: tuple[str, ...] = VERSIONS
    evaluations: tuple[str, ...] = EVALUATIONS
    actions: tuple[str, ...] = ACTIONS


# The exposition budget's shape (docs/kpis.md, Labels): 7 intents, 5 channels, 2 agent
# versions, 3 evaluation names, 6 actions.
WIDE = Shape(intents=(*INTENTS, "cancellation", "warranty"), channels=(*CHANNELS, "chat"),
             evaluations=(*EVALUATIONS, "helpfulness"),
             actions=(*ACTIONS, "cancel_order", "issue_voucher", "reset_password"))


def _case_events(rng: random.Random, case_id: str, start_ms: int, related: str | None,
                 shape: Shape = Shape()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A conversation's events, and its feedback events (which arrive later)."""
    t = start_ms
    seq = 0

    def event(event_type: str, /, **fields: Any) -> dict[str, Any]:
        nonlocal t, seq
        seq += 1
        t += rng.randint(500, 20_000)
        return {"event_id": f"{case_id}-{seq}", "type": event_type, "case_id": case_id, "ts": t,
                **fields}

    opened: dict[str, Any] = {"channel": rng.choice(shape.channels),
                              "agent_version": rng.choice(shape.versions)}
    if related:
        opened["related_case_id"] = related
    out = [event("case_opened", **opened)]
    if rng.random() < 0.95:
        out.append(event("intent_classified", intent=rng.choice(shape.intents),
                         confidence=round(rng.random(), 3)))
    for index in range(rng.randint(0, 3)):
        out.append(event("policy_checked", policy=f"p{index}", passed=rng.random() > 0.05))
    for _ in range(rng.randint(1, 4)):
        out.append(event("response_sent", latency_ms=round(rng.lognormvariate(6.3, 0.5), 1),
                         cost_usd=round(rng.uniform(0.001, 0.02), 5),
                         fallback=rng.random() < 0.05))
    if rng.random() < 0.6:
        action = rng.choice(shape.actions)
        out.append(event("action_executed", action=action, success=rng.random() > 0.1,
                         latency_ms=rng.randint(50, 2000), cost_usd=0.002))
        if rng.random() < 0.3:
            out.append(event("action_executed", action=action, success=True))
    if rng.random() < 0.05:
        out.append(event("human_override", original_action="refund", final_action="deny",
                         rationale="over limit", policy_clause="4.2"))
    roll = rng.random()
    if roll < 0.15:
        out.append(event("case_escalated", reason=rng.choice(REASONS)))
    elif roll < 0.2:
        out.append(event("case_resolved", by="human"))
    elif roll < 0.97:
        out.append(event("case_resolved", by="agent"))
    feedback = []
    if rng.random() < 0.4:
        feedback.append(event("csat_submitted", score=rng.randint(1, 5)))
    if rng.random() < 0.25:
        feedback.append(event("ces_submitted", score=rng.randint(1, 7)))
    if rng.random() < 0.2:
        feedback.append(event("thumbs_submitted", vote=rng.choice(("up", "up", "down"))))
    if rng.random() < 0.1:
        feedback.append(event("suggestion_reviewed", adopted=rng.random() < 0.6))
    if rng.random() < 0.08:
        feedback.append(event("knowledge_flagged", kind=rng.choice(("irrelevant", "missing"))))
    for name in shape.evaluations:
        if rng.random() < 0.3:
            feedback.append(event("evaluation_scored", name=name,
                                  score=round(rng.random(), 3)))
    if rng.random() < 0.05:
        feedback.append(event("case_reopened"))
    return out, feedback


def generate(cases: int, seed: int = 7, invalid_share: float = 0.005,
             duplicate_share: float = 0.005, shape: Shape = Shape()) -> Iterator[bytes]:
    """Message values for `cases` cases, interleaved in arrival order."""
    rng = random.Random(seed)
    timeline: list[tuple[int, int, bytes]] = []
    order = 0
    finished: list[str] = []
    for index in range(cases):
        case_id = f"case-{seed}-{index:06d}"
        start = START_MS + index * rng.randint(2_000, 8_000)
        related = rng.choice(finished) if finished and rng.random() < 0.05 else None
        events, feedback = _case_events(rng, case_id, start, related, shape)
        finished.append(case_id)
        delay = rng.randint(60_000, 4 * 3_600_000)
        for doc in events:
            timeline.append((doc["ts"], order, orjson.dumps(doc)))
            order += 1
        for doc in feedback:
            doc["ts"] += delay
            timeline.append((doc["ts"], order, orjson.dumps(doc)))
            order += 1
    timeline.sort()
    for _, line, _ in with_noise(rng, ((None, line) for _, _, line in timeline),
                                 invalid_share, duplicate_share):
        yield line

"""Traffic of agents stuck in loops, mixed into ordinary generated traffic (bounded state)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from .traffic import START_MS, generate

HOUR_MS = 3_600_000
LONG_ACTION = "x" * 300  # counted under the action label `other`


def _doc(event_id: str, event_type: str, case_id: str, ts: int, **fields: Any) -> bytes:
    return orjson.dumps({"event_id": event_id, "type": event_type, "case_id": case_id,
                         "ts": ts, **fields})


def replies_loop(replies: int, start_ms: int = START_MS) -> list[bytes]:
    """One case answered `replies` times (each with a cost), then resolved; after that the
    first reply once more (older than the last 1,000 ids: a new event) and the last one
    (a duplicate)."""
    case = "loop-replies"
    lines = [_doc("r-open", "case_opened", case, start_ms, channel="web", agent_version="v7"),
             _doc("r-intent", "intent_classified", case, start_ms + 1, intent="billing",
                  confidence=0.9)]
    for i in range(replies):
        lines.append(_doc(f"r-{i}", "response_sent", case, start_ms + 1000 + i * 500,
                          latency_ms=100 + i % 3000, cost_usd=0.001, fallback=i % 97 == 0))
    end = start_ms + 1000 + replies * 500
    lines.append(_doc("r-done", "case_resolved", case, end, by="agent"))
    lines += [lines[2], lines[-2]]
    return lines


def actions_loop(actions: int, start_ms: int = START_MS) -> list[bytes]:
    """One case running `actions` distinct actions (a tenth failing at first and succeeding
    later, and one with a 300-character name), then resolved: autonomous."""
    case = "loop-actions"
    lines = [_doc("a-open", "case_opened", case, start_ms, intent="refund", channel="email",
                  agent_version="v8")]
    for i in range(actions):
        lines.append(_doc(f"a-{i}", "action_executed", case, start_ms + 1000 + i * 100,
                          action=f"tool-{i}", success=i % 10 != 0, cost_usd=0.01))
    for i in range(0, actions, 10):
        lines.append(_doc(f"a-retry-{i}", "action_executed", case,
                          start_ms + 1000 + (actions + i) * 100, action=f"tool-{i}",
                          success=True))
    lines.append(_doc("a-long", "action_executed", case, start_ms + 1000 + 2 * actions * 100,
                      action=LONG_ACTION, success=True))
    lines.append(_doc("a-eval", "evaluation_scored", case, start_ms + 2000 + 2 * actions * 100,
                      name="groundedness", score=0.9))
    lines.append(_doc("a-done", "case_resolved", case, start_ms + 3000 + 2 * actions * 100,
                      by="agent"))
    return lines


def reopens_loop(reopens: int, resends: int, start_ms: int = START_MS) -> list[bytes]:
    """One case reopened `reopens` times before it concludes, at times from hours before to
    hours after its conclusion, with `resends` of its events sent again (duplicates), then
    resolved by the agent; a later case names it as related a day and a half after."""
    case = "loop-reopens"
    concluded = start_ms + 24 * HOUR_MS
    lines = [_doc("o-open", "case_opened", case, start_ms, intent="delivery", channel="sms",
                  agent_version="v7")]
    for i in range(reopens):
        ts = concluded + (i - reopens // 2) * 300_000 + 1
        lines.append(_doc(f"o-{i}", "case_reopened", case, ts))
    lines += lines[1:1 + resends]
    lines.append(_doc("o-done", "case_resolved", case, concluded, by="agent"))
    lines.append(_doc("o-next", "case_opened", "loop-reopens-next", concluded + 36 * HOUR_MS,
                      related_case_id=case))
    return lines


def mixed(cases: int = 300, replies: int = 20_000, actions: int = 2_000, reopens: int = 400,
          resends: int = 300, seed: int = 11) -> Iterator[bytes]:
    """The loops spread through `cases` ordinary generated cases."""
    ordinary = list(generate(cases, seed=seed))
    loops = [replies_loop(replies), actions_loop(actions), reopens_loop(reopens, resends)]
    # Each loop's lines stay in their order, spread evenly through the ordinary ones.
    total = len(ordinary) + sum(len(loop) for loop in loops)
    tagged = [(i * total / len(ordinary), 0, line) for i, line in enumerate(ordinary)]
    for index, loop in enumerate(loops, 1):
        tagged += [(i * total / len(loop), index, line) for i, line in enumerate(loop)]
    tagged.sort(key=lambda item: (item[0], item[1]))
    for _, _, line in tagged:
        yield line

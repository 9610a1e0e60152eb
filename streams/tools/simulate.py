"""`acsr-metrics simulate`: realistic support-agent traffic, per the event contract.

Cases arrive as a Poisson process. Each has an intent with its own escalation,
policy-failure and action-failure rates, escalation reasons and log-normal handling
time; a channel; one of two agent versions. Feedback arrives minutes to hours after
the conclusion; some customers reopen, others come back with a new case naming the old
one (`related_case_id`); a small share of messages is invalid or sent twice. A scenario
changes the conditions for cases that start after a delay.

Time: a simulated clock starts at `start_ms` and runs `speed` times faster than the wall
clock. Events carry simulated time, so handling times and feedback delays keep realistic
values while arriving `speed` times sooner. The same seed gives the same messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

import orjson

from streams.config import ConfigError, Settings
from streams.core.events import InvalidEvent, parse_ts
from streams.kafka.broker import ensure_topics
from streams.kafka.publisher import Publisher
from streams.kafka.security import kafka_client_kwargs

STABLE, CANDIDATE = "v7", "v8"
CHANNELS: Mapping[str, float] = MappingProxyType(
    {"web": 0.45, "whatsapp": 0.2, "email": 0.2, "voice": 0.1, "sms": 0.05})
CHANNEL_PACE: Mapping[str, float] = MappingProxyType({"voice": 0.7, "email": 2.5})
# Messages per arriving case in `steady` (measured over 60,000 cases, with feedback,
# comebacks and noise): turns a message rate into a case arrival rate.
MESSAGES_PER_CASE = 9.65
MINUTE, HOUR = 60.0, 3600.0

T = TypeVar("T")

# What real producers also send now and then (each breaks the contract another way).
INVALID_SAMPLES = (
    b"not json",
    b"[1,2]",
    b'{"type":"case_opened","case_id":"x","ts":1}',
    b'{"event_id":"x","type":"teleport","case_id":"x","ts":1}',
    b'{"event_id":"x","type":"case_opened","case_id":"x","ts":"noon"}',
    b'{"event_id":"x","type":"csat_submitted","case_id":"x","ts":1,"score":6}',
)


def with_noise(rng: random.Random, messages: Iterable[tuple[T, bytes]], invalid_share: float,
               duplicate_share: float) -> Iterator[tuple[T, bytes, bool]]:
    """The messages with what real producers also send: before a message, now and then an
    invalid one (flagged True), or the same message once more (a redelivered duplicate)."""
    for tag, line in messages:
        roll = rng.random()
        if roll < invalid_share:
            yield tag, rng.choice(INVALID_SAMPLES), True
        elif roll < invalid_share + duplicate_share:
            yield tag, line, False
        yield tag, line, False


@dataclass(frozen=True)
class Intent:
    """How cases of one intent go: rates are per case (policy failure: per check)."""

    name: str
    share: float
    escalation: float
    reasons: Mapping[str, float]
    policies: tuple[str, ...]
    policy_failure: float
    action: str
    action_failure: float
    handling_median_s: float
    handling_sigma: float


INTENTS: tuple[Intent, ...] = (
    Intent("order_status", 0.30, 0.05, {"customer_request": 3, "low_confidence": 1},
           ("pii_disclosure",), 0.0002, "lookup_order", 0.01, 70, 0.5),
    Intent("refund", 0.22, 0.12, {"policy_ambiguity": 3, "customer_request": 1,
                                  "negative_sentiment": 1},
           ("refund_limit", "pii_disclosure"), 0.0006, "refund", 0.03, 180, 0.6),
    Intent("shipping_change", 0.16, 0.10, {"physical_action_required": 3, "low_confidence": 1},
           ("address_verification",), 0.0005, "update_address", 0.04, 150, 0.5),
    Intent("account_access", 0.14, 0.18, {"low_confidence": 2, "compliance_block": 1,
                                          "customer_request": 1},
           ("identity_verification",), 0.0008, "reset_password", 0.03, 240, 0.7),
    Intent("billing_dispute", 0.18, 0.26, {"policy_ambiguity": 2, "negative_sentiment": 2,
                                           "customer_request": 1},
           ("refund_limit", "credit_policy"), 0.0008, "issue_credit", 0.05, 300, 0.7),
)
INTENTS_BY_NAME: Mapping[str, Intent] = MappingProxyType({i.name: i for i in INTENTS})


@dataclass(frozen=True)
class Conditions:
    """How the agents do at one moment of a scenario."""

    candidate_share: float = 0.1  # share of new cases the candidate version takes
    candidate_penalty: float = 1.0  # > 1: the candidate escalates and fails more, is slower
    policy_failure: Mapping[str, float] = field(default_factory=dict)  # intent -> rate
    action_failure: float | None = None  # every action's failure rate (a back-end outage)


@dataclass(frozen=True)
class Scenario:
    """Steady conditions, then `after` for the cases that start after the delay."""

    name: str
    summary: str  # what the scenario does to which KPI
    after: Conditions

    def at(self, t_s: float, change_at_s: float) -> Conditions:
        return self.after if t_s >= change_at_s else BASELINE


BASELINE = Conditions()
SCENARIOS: Mapping[str, Scenario] = MappingProxyType({s.name: s for s in (
    Scenario("steady", "no change: v7 takes 90% of cases, v8 10%, both alike", BASELINE),
    Scenario("compliance-drop",
             "refund policy checks fail 5% of the time: refund compliance falls far below "
             "its 99.9% objective", Conditions(policy_failure={"refund": 0.05})),
    Scenario("escalation-spike",
             "a back-end outage fails half of all actions: tool_failure escalations surge "
             "and the autonomous resolution rate falls", Conditions(action_failure=0.5)),
    Scenario("version-rollout",
             "v8 takes 60% of new cases and does worse (more escalations, policy failures "
             "and failed actions, slower, lower CSAT): its ARR falls below v7's",
             Conditions(candidate_share=0.6, candidate_penalty=2.5)),
)})


class Message(NamedTuple):
    """One message value, due at `t_s` simulated seconds after the start."""

    t_s: float
    value: bytes
    invalid: bool  # deliberately breaks the contract (for the dead-letter path)


class _Comeback(NamedTuple):
    """A customer coming back about an earlier case."""

    related_case_id: str
    customer_id: str
    intent: str


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    return rng.choices(tuple(weights), tuple(weights.values()))[0]


def _feedback_delay(rng: random.Random) -> float:
    """Minutes to hours: median 30 minutes, at least 1 minute, at most 8 hours."""
    return min(8 * HOUR, max(MINUTE, rng.lognormvariate(math.log(30 * MINUTE), 1.0)))


CSAT = {"good": {5: 50, 4: 30, 3: 10, 2: 5, 1: 5}, "mixed": {5: 20, 4: 30, 3: 25, 2: 15, 1: 10},
        "bad": {5: 10, 4: 10, 3: 20, 2: 30, 1: 30}}
CES = {"good": {7: 40, 6: 30, 5: 15, 4: 8, 3: 4, 2: 2, 1: 1},
       "mixed": {7: 15, 6: 20, 5: 20, 4: 20, 3: 12, 2: 8, 1: 5},
       "bad": {7: 5, 6: 10, 5: 15, 4: 20, 3: 20, 2: 15, 1: 15}}


class _Case:
    """Stamps one case's events with their ids and event times, and queues them."""

    def __init__(self, sim: Simulation, case_id: str) -> None:
        self.sim = sim
        self.case_id = case_id
        self.seq = 0

    def add(self, t_s: float, event_type: str, **fields: Any) -> None:
        self.seq += 1
        doc = {"event_id": f"{self.case_id}.{self.seq}", "type": event_type,
               "case_id": self.case_id, "ts": self.sim.start_ms + round(t_s * 1000),
               **{name: value for name, value in fields.items() if value is not None}}
        self.sim.push(t_s, orjson.dumps(doc))


DEFAULT_LOOKBACK_S = 86_400  # an open-ended run's simulated clock starts a day back


def past_start_ms(duration_s: float | None, speed: float, now_ms: int | None = None) -> int:
    """Where the simulated clock starts when none is given: far enough back that the run
    never dates an event ahead of the real clock (the processor refuses those as
    future_ts); a day back for an open-ended run, whose clock `pace` slows to real time
    once it has caught up."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    span_s = duration_s * speed if duration_s is not None else DEFAULT_LOOKBACK_S
    return now_ms - round(span_s * 1000)


class Simulation:
    """The endless, deterministic message stream of one scenario, in simulated-time
    order. Iterate it once: generation state (random generators, queue) is consumed."""

    def __init__(self, scenario: Scenario, *, seed: int, rate: float, speed: float = 1.0,
                 start_ms: int | None = None, change_after_s: float = 60.0,
                 invalid_share: float = 0.003, duplicate_share: float = 0.003) -> None:
        if rate <= 0 or speed <= 0:
            raise ValueError("rate and speed must be > 0")
        self.scenario = scenario
        self.seed = seed
        self.speed = speed
        self.start_ms = past_start_ms(None, speed) if start_ms is None else start_ms
        self.change_at_s = change_after_s * speed  # in simulated seconds
        self.arrivals_per_s = rate / MESSAGES_PER_CASE / speed
        self.rng = random.Random(seed)
        self.noise_rng = random.Random(f"{seed}-noise")
        self.invalid_share = invalid_share
        self.duplicate_share = duplicate_share
        self.cases = 0
        self._heap: list[tuple[float, int, bytes | _Comeback]] = []
        self._order = itertools.count()

    def push(self, t_s: float, item: bytes | _Comeback) -> None:
        heapq.heappush(self._heap, (t_s, next(self._order), item))

    def __iter__(self) -> Iterator[Message]:
        for t_s, value, invalid in with_noise(self.noise_rng, self._events(),
                                              self.invalid_share, self.duplicate_share):
            yield Message(t_s, value, invalid)

    def _events(self) -> Iterator[tuple[float, bytes]]:
        next_arrival = 0.0
        while True:
            if not self._heap or next_arrival <= self._heap[0][0]:
                self._open(next_arrival, None)
                next_arrival += self.rng.expovariate(self.arrivals_per_s)
                continue
            t_s, _, item = heapq.heappop(self._heap)
            if isinstance(item, _Comeback):
                self._open(t_s, item)
            else:
                yield t_s, item

    def _open(self, start: float, comeback: _Comeback | None) -> None:
        """Generate one case starting at `start` (simulated seconds)."""
        rng = self.rng
        cond = self.scenario.at(start, self.change_at_s)
        self.cases += 1
        case = _Case(self, f"sim-{self.seed}-{self.cases:07d}")
        version = CANDIDATE if rng.random() < cond.candidate_share else STABLE
        penalty = cond.candidate_penalty if version == CANDIDATE else 1.0
        if comeback is not None:
            intent, customer = INTENTS_BY_NAME[comeback.intent], comeback.customer_id
        else:
            intent = INTENTS_BY_NAME[_pick(rng, {i.name: i.share for i in INTENTS})]
            customer = f"cust-{rng.randrange(1_000_000):06d}"
        channel = _pick(rng, CHANNELS)
        median = intent.handling_median_s * CHANNEL_PACE.get(channel, 1.0) * (0.8 + 0.2 * penalty)
        handling = rng.lognormvariate(math.log(median), intent.handling_sigma)
        end = start + handling
        case.add(start, "case_opened", channel=channel, agent_version=version,
                 customer_id=customer,
                 related_case_id=comeback.related_case_id if comeback else None)
        classified = rng.random() >= 0.02
        confidence = round(rng.betavariate(9, 1.5), 3)
        if classified:
            case.add(start + rng.uniform(0.5, 3), "intent_classified", intent=intent.name,
                     confidence=confidence)
        self._turns(case, start, handling, penalty)
        policy_failed = self._checks(case, intent, cond, start + 0.4 * handling, penalty)
        action_ok = policy_failed or self._act(case, intent, cond, start + 0.7 * handling,
                                               penalty)
        overridden = rng.random() < 0.01 * penalty
        if overridden:
            case.add(end - 1, "human_override", original_action=intent.action,
                     final_action=f"partial_{intent.action}",
                     rationale="goodwill exception beyond the agent's limits",
                     policy_clause="4.2")
        outcome = self._conclude(case, intent, end, penalty, confidence, classified=classified,
                                 policy_failed=policy_failed, action_ok=action_ok,
                                 overridden=overridden)
        self._feedback(case, end, outcome, penalty)
        comeback_p = {"autonomous": 0.04, "unverified": 0.25}.get(outcome, 0.06) * penalty
        if rng.random() < comeback_p:
            back = end + min(3 * 24 * HOUR, max(10 * MINUTE,
                                                 rng.lognormvariate(math.log(3 * HOUR), 1.0)))
            self.push(back, _Comeback(case.case_id, customer, intent.name))

    def _turns(self, case: _Case, start: float, handling: float, penalty: float) -> None:
        rng = self.rng
        turns = 1 + min(6, int(rng.expovariate(1 / 1.5)))
        for turn in range(1, turns + 1):
            tokens_in, tokens_out = rng.randint(400, 3000), rng.randint(40, 400)
            case.add(start + handling * turn / (turns + 1), "response_sent",
                     latency_ms=round(rng.lognormvariate(math.log(900 * penalty), 0.4), 1),
                     tokens_in=tokens_in, tokens_out=tokens_out,
                     cost_usd=round(tokens_in * 2.5e-6 + tokens_out * 1e-5, 6),
                     turn_id=f"t{turn}", fallback=rng.random() < 0.01 * penalty)
            if rng.random() < 0.015:
                case.add(start + handling * turn / (turns + 1) + 0.2, "knowledge_flagged",
                         kind=rng.choice(("irrelevant", "missing")),
                         document_id=f"kb-{rng.randrange(500)}")

    def _checks(self, case: _Case, intent: Intent, cond: Conditions, at: float,
                penalty: float) -> bool:
        """Policy checks; True when one failed."""
        failure = cond.policy_failure.get(intent.name, intent.policy_failure) * penalty ** 2
        failed = False
        for index, policy in enumerate(intent.policies):
            passed = self.rng.random() >= failure
            case.add(at + index, "policy_checked", policy=policy, passed=passed,
                     clause=None if passed else f"{policy}.{self.rng.randint(1, 9)}")
            failed = failed or not passed
        return failed

    def _act(self, case: _Case, intent: Intent, cond: Conditions, at: float,
             penalty: float) -> bool:
        """The intent's action, retried once in a while; True when it finally succeeded."""
        rng = self.rng
        base = intent.action_failure if cond.action_failure is None else cond.action_failure
        failure = min(0.95, base * penalty)
        attempts = 0
        while True:
            attempts += 1
            ok = rng.random() >= failure
            case.add(at + 5 * attempts, "action_executed", action=intent.action, success=ok,
                     latency_ms=round(rng.lognormvariate(math.log(400), 0.6)),
                     error=None if ok else "upstream_timeout", cost_usd=0.001)
            if ok or attempts == 2 or rng.random() >= 0.4:
                return ok

    def _conclude(self, case: _Case, intent: Intent, end: float, penalty: float,
                  confidence: float, *, classified: bool, policy_failed: bool,
                  action_ok: bool, overridden: bool) -> str:
        """The concluding event; returns the outcome the processor will count."""
        rng = self.rng
        reason = None
        if policy_failed and rng.random() < 0.8:
            reason = "compliance_block"
        elif not action_ok and rng.random() < 0.85:
            reason = "tool_failure"
        elif not overridden and rng.random() < min(0.9, intent.escalation * penalty):
            reason = _pick(rng, intent.reasons)
        if reason is not None:
            case.add(end, "case_escalated", reason=reason,
                     confidence=round(min(confidence, rng.uniform(0.2, 0.6)), 3)
                     if reason == "low_confidence" else None)
            if rng.random() < 0.6:
                case.add(end + rng.uniform(2, 15) * MINUTE, "suggestion_reviewed",
                         adopted=rng.random() < 0.65)
            return "escalated"
        if overridden or rng.random() < 0.03:
            case.add(end, "case_resolved", by="human")
            return "human"
        case.add(end, "case_resolved", by="agent", confidence=confidence)
        verified = classified and not policy_failed and action_ok
        return "autonomous" if verified else "unverified"

    def _feedback(self, case: _Case, end: float, outcome: str, penalty: float) -> None:
        rng = self.rng
        mood = {"autonomous": "good", "unverified": "bad"}.get(outcome, "mixed")
        if mood == "good" and rng.random() < 0.15 * (penalty - 1):
            mood = "mixed"
        for name, score in (("groundedness", rng.betavariate(8, 1.5 * penalty)),
                            ("answer_relevance", rng.betavariate(9, 1.2 * penalty))):
            if rng.random() < 0.5:
                case.add(end + rng.uniform(1, 10) * MINUTE, "evaluation_scored", name=name,
                         score=round(score, 3), evaluator="llm_judge")
        if rng.random() < 0.35:
            case.add(end + _feedback_delay(rng), "csat_submitted",
                     score=int(_pick(rng, CSAT[mood])))
        if rng.random() < 0.2:
            case.add(end + _feedback_delay(rng), "ces_submitted", score=int(_pick(rng, CES[mood])))
        if rng.random() < 0.25:
            down = {"good": 0.08, "mixed": 0.35, "bad": 0.6}[mood]
            case.add(end + _feedback_delay(rng), "thumbs_submitted",
                     vote="down" if rng.random() < down else "up", turn_id="t1")
        if outcome == "autonomous" and rng.random() < 0.03 * penalty:
            case.add(end + min(48 * HOUR, max(10 * MINUTE,
                                              rng.lognormvariate(math.log(3 * HOUR), 1.0))),
                     "case_reopened")


def horizon(messages: Iterator[Message], until_s: float) -> Iterator[Message]:
    """The messages before `until_s` simulated seconds."""
    return itertools.takewhile(lambda message: message.t_s < until_s, messages)


@dataclass
class Progress:
    sent: int = 0
    invalid: int = 0
    failed: int = 0  # deliveries the broker refused
    cases: int = 0
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        return self.sent / max(1e-9, time.monotonic() - self.started)


async def pace(simulation: Simulation, send: Callable[[Message], Any],
               duration_s: float | None = None, stop: asyncio.Event | None = None,
               progress: Progress | None = None) -> Progress:
    """Hand each message to `send` (an async callable) when its simulated time comes,
    and never before its `ts` on the real clock (a simulated clock that caught up runs at
    real time), until `duration_s` wall seconds have passed or `stop` is set."""
    progress = progress or Progress()
    stop = stop or asyncio.Event()
    started = time.monotonic()
    behind_s = time.time() - simulation.start_ms / 1000  # how far the clock starts back
    for message in simulation:
        due = max(message.t_s / simulation.speed, message.t_s - behind_s)
        if duration_s is not None and due >= duration_s:
            break
        delay = started + due - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            break
        await send(message)
        progress.sent += 1
        progress.invalid += message.invalid
        progress.cases = simulation.cases
    return progress


async def publish(simulation: Simulation, publisher: Publisher, duration_s: float | None = None,
                  stop: asyncio.Event | None = None, progress: Progress | None = None
                  ) -> Progress:
    """Pace the simulation onto the events topic through `publisher` (valid messages are
    checked against the contract on the way; the deliberately invalid ones are not)."""
    progress = progress or Progress()

    def delivered(delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled() or delivery.exception() is not None:
            progress.failed += 1

    async def send(message: Message) -> None:
        delivery = await publisher.send_value(message.value, checked=not message.invalid)
        delivery.add_done_callback(delivered)

    return await pace(simulation, send, duration_s, stop, progress)


# --- the command line -------------------------------------------------------------------


def add_simulate_parser(commands: argparse._SubParsersAction) -> None:
    """`acsr-metrics simulate`."""
    sim = commands.add_parser(
        "simulate", help="publish realistic agent traffic to the events topic",
        description="Publish realistic agent traffic (docs/configuration.md#simulator). "
        "Scenarios: " + "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values()))
    sim.add_argument("--broker", help="Kafka bootstrap servers, host:port[,host:port] "
                     "(env ACSR_BROKER)")
    sim.add_argument("--events-topic", help="default acsr.events (env ACSR_EVENTS_TOPIC)")
    sim.add_argument("--partitions", type=int,
                     help="partitions of the events topic if it must be created")
    sim.add_argument("--tansu", action="store_true",
                     help="the broker is Tansu (the embedded broker): no idempotent producer")
    add_traffic_arguments(sim, rate=20.0, speed=1.0)
    sim.add_argument("--duration", type=float, help="stop after this many seconds")
    sim.add_argument("--start", help="simulated time of the start, RFC 3339 or epoch ms "
                     "(default: --duration x --speed before now, so that no event is dated "
                     "ahead of the real clock; a day before now without --duration)")
    sim.add_argument("--invalid-share", type=float, default=0.003,
                     help="share of invalid messages (default 0.003)")
    sim.add_argument("--duplicate-share", type=float, default=0.003,
                     help="share of messages sent twice (default 0.003)")
    sim.add_argument("--output", type=Path,
                     help="write --duration seconds of traffic to this JSON Lines file at "
                     "once, instead of publishing")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")


def add_traffic_arguments(parser: argparse.ArgumentParser, rate: float, speed: float) -> None:
    """The traffic options `simulate` and `demo` share."""
    parser.add_argument("--rate", type=float, default=rate,
                        help=f"messages per second (default {rate:g})")
    parser.add_argument("--scenario", choices=tuple(SCENARIOS), default="steady",
                        help="what changes after --change-after (default steady)")
    parser.add_argument("--speed", type=float, default=speed,
                        help="simulated time runs this many times faster than the clock: "
                        f"feedback hours later arrives in minutes (default {speed:g})")
    parser.add_argument("--seed", type=int, help="same seed, same traffic (default: random)")
    parser.add_argument("--change-after", type=float, default=60.0,
                        help="seconds before the scenario's change (default 60)")


def traffic_simulation(args: argparse.Namespace, start_ms: int | None = None,
                       invalid_share: float = 0.003, duplicate_share: float = 0.003
                       ) -> Simulation:
    """The Simulation the traffic arguments describe; ConfigError names a bad one."""
    if args.rate <= 0:
        raise ConfigError("--rate must be > 0 messages per second")
    if args.speed <= 0:
        raise ConfigError("--speed must be > 0")
    if args.change_after < 0:
        raise ConfigError("--change-after must be >= 0 seconds")
    if not (0 <= invalid_share <= 0.5 and 0 <= duplicate_share <= 0.5):
        raise ConfigError("--invalid-share and --duplicate-share must be between 0 and 0.5")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    return Simulation(SCENARIOS[args.scenario], seed=seed, rate=args.rate, speed=args.speed,
                      start_ms=start_ms, change_after_s=args.change_after,
                      invalid_share=invalid_share, duplicate_share=duplicate_share)


def _start_ms(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return parse_ts(int(raw) if raw.lstrip("-").isdigit() else raw) // 1000
    except InvalidEvent:
        raise ConfigError(f"--start {raw!r} is neither RFC 3339 with an offset nor epoch ms"
                          ) from None


def run_simulate_command(args: argparse.Namespace, base: Settings) -> int:
    settings = base.with_overrides(broker=args.broker, events_topic=args.events_topic,
                                   partitions=args.partitions)
    if args.tansu:
        settings = settings.with_overrides(tansu=True)
    start_ms = _start_ms(args.start)
    if start_ms is None:
        start_ms = past_start_ms(args.duration, args.speed)
    simulation = traffic_simulation(args, start_ms, args.invalid_share, args.duplicate_share)
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr,
                                                                       flush=True))
    say(f"simulate: scenario {args.scenario}, seed {simulation.seed}, {args.rate:g} msg/s, "
        f"{args.speed:g}x time")
    if args.output is not None:
        if args.duration is None:
            raise ConfigError("--output needs --duration")
        count = 0
        with args.output.open("wb") as out:
            for message in horizon(iter(simulation), args.duration * args.speed):
                out.write(message.value + b"\n")
                count += 1
        say(f"simulate: wrote {count} messages ({simulation.cases} cases) to {args.output}")
        return 0
    progress = asyncio.run(_publish_live(settings, simulation, args.duration, say))
    say(f"simulate: sent {progress.sent} messages ({progress.invalid} deliberately invalid, "
        f"{progress.failed} refused) for {progress.cases} cases, {progress.rate():.1f}/s")
    return 1 if progress.failed else 0


async def _publish_live(settings: Settings, simulation: Simulation, duration_s: float | None,
                        say: Callable[[str], None]) -> Progress:
    await ensure_topics(settings.bootstrap_servers, {settings.events_topic: settings.partitions},
                        settings.replication_factor, settings.broker_wait_s,
                        kafka_client_kwargs(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    progress = Progress()

    async def report() -> None:
        while True:
            await asyncio.sleep(10)
            say(f"simulate: {progress.sent} sent, {progress.cases} cases, "
                f"{progress.rate():.1f}/s")

    reporter = asyncio.create_task(report())
    try:
        async with Publisher.from_settings(settings) as publisher:
            await publish(simulation, publisher, duration_s, stop, progress)
    finally:
        reporter.cancel()
    return progress

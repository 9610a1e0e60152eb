"""The case state machine: one event in, the case's next state and the figures it counts.

Pure logic (no Faust, no Kafka): `apply_event` and `apply_link` take a case's state
and return a `Step` whose new state already holds the step's facts and pipeline
counts. Persisting that state is then the whole, atomic effect of the event.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.core import kpis
from streams.core.annotations import RANDOM_SAMPLE, CaseView, sampled
from streams.core.events import DIMENSIONS, Event, format_ts, normalise_reason
from streams.core.kpis import HISTOGRAM_BUCKETS, UNKNOWN, Aggregate, Fact, bucket_index
from streams.core.state_bytes import exact_size
from streams.core.units import DAY_US, SECOND_US
from streams.core.windows import WindowPolicy

DUPLICATE_MEMORY = 1000  # event ids a case remembers, the last counted (KPIS.md)
# What else a case remembers is capped too (docs/architecture.md, Bounded state):
FAILED_ACTION_MEMORY = 1000  # action names whose last execution failed (as digests)
FAILED_ACTION_NAMES = 20  # of which annotation items name the first ones
TIME_MEMORY = 1000  # reopen and link times kept until the case concludes
ACTION_LABEL_MAX = 64  # a longer action name is counted under the label `other`


def id_digest(event_id: str) -> str:
    """What a case remembers of an event id: 64 bits of BLAKE2b, in hex (16 characters
    whatever the id's length). Two ids of one case share a digest with a probability of
    about 1000 / 2**64 per event (5e-17): a false duplicate in 10**12 events is 1 in
    20,000 (docs/architecture.md)."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).hexdigest()


def spill_key(case_id: str, index: int) -> str:
    """The case-table key of a case's figures record number `index` (see `Ledger`,
    spills). Longer than any case id (at most 128 characters), so never one."""
    return f"{case_id}\x00{'.' * (128 - len(case_id))}figures/{index}"


def is_spill_key(key: str) -> bool:
    return len(key) > 128


def action_label(action: str) -> str:
    """The label an action is counted under: its name, or `other` for an absurdly long one
    (the contract does not bound its length; a label must stay short)."""
    return action if len(action) <= ACTION_LABEL_MAX else "other"


def remember_time(times: list[int], ts_us: int) -> None:
    """Add `ts_us` to the sorted times a case keeps to ask later "is one of them within a
    day after the conclusion?". A time whose neighbours are at most a day apart never
    changes that answer (any day-long span holding it holds one of them), so it is
    dropped: the list holds at most two times per day of spread. Past TIME_MEMORY times
    (over 500 days of spread) the oldest is forgotten."""
    index = bisect.bisect_left(times, ts_us)
    if index < len(times) and times[index] == ts_us:
        return
    times.insert(index, ts_us)
    # Only the new time and its two neighbours may have become redundant; right to left,
    # so a deletion does not move the positions still to check.
    for i in (index + 1, index, index - 1):
        if 0 < i < len(times) - 1 and times[i + 1] - times[i - 1] <= DAY_US:
            del times[i]
    if len(times) > TIME_MEMORY:
        del times[0]


def decode_figures(doc: dict[str, Any]) -> Aggregate:
    """Figures stored as `CaseFigures` rows, summed by figure, labels and dimensions."""
    agg = Aggregate(window_sizes=())
    dims = [tuple(d) for d in doc["dims"]]
    for n, lb, d, c, s in doc["series"]:
        agg.series[(n, tuple(lb), dims[d])] = [c, s]
    for n, lb, d, b in doc["histograms"]:
        agg.histograms[(n, tuple(lb), dims[d])] = list(b)
    return agg


class CaseFigures:
    """What a case adds to each figure (counts, sums, histogram buckets), kept as the rows
    it is stored as: each distinct dimensions tuple once in `dims`, then series rows
    (figure, labels, dims index, count, sum) and histogram rows (figure, labels, dims
    index, buckets). Writing a case then converts nothing. Rows are tuples, replaced when
    they change: a case kept decoded between batches is then a handful of objects for the
    garbage collector to walk, not one per row. The index that finds a row is built when
    the case first changes after it was read."""

    __slots__ = ("_rows", "dims", "histograms", "series")

    def __init__(self, dims: list[Any] | None = None, series: list[Any] | None = None,
                 histograms: list[Any] | None = None) -> None:
        self.dims = [] if dims is None else dims
        self.series = [] if series is None else series
        self.histograms = [] if histograms is None else histograms
        self._rows: tuple[dict[Any, int], dict[Any, int], dict[Any, int]] | None = None

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> CaseFigures:
        return cls(doc["dims"], doc["series"], doc["histograms"])

    def doc(self) -> dict[str, Any]:
        return {"dims": self.dims, "series": self.series, "histograms": self.histograms}

    def aggregate(self) -> Aggregate:
        return decode_figures(self.doc())

    def __eq__(self, other: object) -> bool:
        """The same figures, whichever rows or tuples hold them."""
        if not isinstance(other, CaseFigures):
            return NotImplemented
        return self.aggregate() == other.aggregate()

    __hash__ = None  # type: ignore[assignment]

    def _index(self) -> tuple[dict[Any, int], dict[Any, int], dict[Any, int]]:
        """Where each dimensions tuple and row is, rows read as lists made tuples."""
        self.dims = [tuple(d) for d in self.dims]
        self._rows = ({d: index for index, d in enumerate(self.dims)},
                      _positions(self.series), _positions(self.histograms))
        return self._rows

    def add_facts(self, facts: Iterable[Fact]) -> None:
        """Count each fact in its row, as `Aggregate.add_fact` counts it in its cell."""
        dims_at, series_at, histograms_at = self._rows or self._index()
        series, histograms = self.series, self.histograms
        for name, labels, value, dims, _, _ in facts:
            index = dims_at.get(dims)
            if index is None:
                index = dims_at[dims] = len(self.dims)
                self.dims.append(dims)
            key = (name, labels, index)
            at = series_at.get(key)
            if at is None:
                series_at[key] = len(series)
                series.append((name, labels, index, 1, value))
            else:
                _, _, _, count, total = series[at]
                series[at] = (name, labels, index, count + 1, total + value)
            bounds = HISTOGRAM_BUCKETS.get(name)
            if bounds is not None:
                at = histograms_at.get(key)
                if at is None:
                    at = histograms_at[key] = len(histograms)
                    histograms.append((name, labels, index, (0,) * (len(bounds) + 1)))
                buckets = list(histograms[at][3])
                buckets[bucket_index(bounds, value)] += 1
                histograms[at] = (name, labels, index, tuple(buckets))


def _positions(rows: list[Any]) -> dict[Any, int]:
    """Each row's position by its key (figure, labels, dims index); rows read as lists
    become tuples, and so do their labels and buckets."""
    positions = {}
    for at, (name, labels, index, *values) in enumerate(rows):
        labels = tuple(labels)
        rows[at] = (name, labels, index, *(tuple(v) if isinstance(v, list) else v
                                             for v in values))
        positions[(name, labels, index)] = at
    return positions


def _figures_doc(value: Any) -> Any:
    """How orjson writes the figures of a case (`CaseState.to_bytes`)."""
    if isinstance(value, CaseFigures):
        return value.doc()
    raise TypeError(f"{type(value).__name__} is not a part of a case")


@dataclass(slots=True)
class CaseState:
    """Everything the processor remembers about one case (stored as JSON in a table)."""

    partition: int
    offset: int = -1  # last applied offset of the events topic
    watermark_us: int | None = None  # the partition's event time after this case's last event
    last_us: int | None = None  # event time of the case's last event (expiry)
    # Digests of the last DUPLICATE_MEMORY event ids counted, oldest first.
    seen: list[str] = field(default_factory=list)
    dims: list[str | None] = field(default_factory=lambda: [None, None, None])
    opened_us: int | None = None
    outcome: str | None = None
    concluded_us: int | None = None
    policy_failed: bool = False
    overridden: bool = False
    # Digests of the action names whose last execution failed, oldest first, and the
    # first of those names (shortened) for annotation items. `actions_forgotten`: more
    # failed than FAILED_ACTION_MEMORY at once, so the case can no longer be autonomous.
    failed_actions: list[str] = field(default_factory=list)
    failed_names: list[str] = field(default_factory=list)
    actions_forgotten: bool = False
    cost: float = 0.0
    reopens: list[int] = field(default_factory=list)  # see `remember_time`
    links: list[int] = field(default_factory=list)
    reopen_counted: bool = False
    fcr_counted: bool = False
    routed: list[str] = field(default_factory=list)
    # What the case adds to each figure (counts, sums, histogram buckets), by labels and
    # dimensions; moved to a figures record of its own when it grows (`Ledger`, spills).
    figures: CaseFigures = field(default_factory=CaseFigures)
    pipeline: dict[str, int] = field(default_factory=dict)
    # Re-keyed events (ACSR_PARTITIONER=repartition): per source partition, the last source
    # offset applied, so a copy forwarded twice (a forwarder crash) counts once.
    sources: dict[str, int] = field(default_factory=dict)
    after_fold: int = 0  # the partition's fold count when written (ledger.PartitionRecord)
    spills: int = 0  # figures records moved out of this record: keys spill_key(case, 0..n-1)

    def to_bytes(self) -> bytes:
        """The fields in their order, as JSON (orjson writes the dataclass itself)."""
        return exact_size(orjson.dumps(self, default=_figures_doc))

    @classmethod
    def from_bytes(cls, raw: bytes) -> CaseState:
        doc = orjson.loads(raw)
        figures = doc.get("figures")
        if figures is not None:
            doc["figures"] = CaseFigures.from_doc(figures)
        else:  # written by 0.1
            doc["figures"] = _legacy_figures(doc)
            _convert_legacy_times(doc)
        _convert_legacy_memory(doc)
        return cls(**doc)

    def annotation_view(self) -> CaseView:
        """The case as an annotation item shows it."""
        return CaseView(dims=self.dims_now(), outcome=self.outcome,
                        policy_failed=self.policy_failed, overridden=self.overridden,
                        failed_actions=tuple(self.failed_names))

    def actions_all_succeeded(self) -> bool:
        return not self.failed_actions and not self.actions_forgotten

    def record_action(self, action: str, success: bool) -> None:
        digest, name = id_digest(action), _display_name(action)
        if success:
            if digest in self.failed_actions:
                self.failed_actions.remove(digest)
                if name in self.failed_names:
                    self.failed_names.remove(name)
            return
        if digest in self.failed_actions:
            return
        self.failed_actions.append(digest)
        if len(self.failed_names) < FAILED_ACTION_NAMES:
            self.failed_names.append(name)
        if len(self.failed_actions) > FAILED_ACTION_MEMORY:
            del self.failed_actions[0]
            self.actions_forgotten = True

    def figure_entries(self) -> int:
        """How many figure cells the case holds (what its stored size grows with)."""
        return len(self.figures.series) + len(self.figures.histograms)

    def take_figures(self) -> CaseFigures:
        """The case's figures so far, leaving it none (they move to a record of their own)."""
        taken, self.figures = self.figures, CaseFigures()
        return taken

    def dims_now(self) -> kpis.Dims:
        intent, channel, version = self.dims
        return (intent or UNKNOWN, channel or UNKNOWN, version or UNKNOWN)

    def count(self, name: str, label: str = "") -> str:
        key = f"{name}/{label}"
        self.pipeline[key] = self.pipeline.get(key, 0) + 1
        return key


def _display_name(action: str) -> str:
    return action if len(action) <= ACTION_LABEL_MAX else action[:ACTION_LABEL_MAX - 1] + "…"


def _legacy_figures(doc: dict[str, Any]) -> CaseFigures:
    """Figures of a case stored by 0.1: every increment in a list `facts`."""
    figures = CaseFigures()
    figures.add_facts(Fact.from_json(item) for item in doc.pop("facts", ()))
    return figures


def _convert_legacy_memory(doc: dict[str, Any]) -> None:
    """Cases stored by 0.1 kept every id and every action's last result."""
    ids = doc.pop("ids", None)  # every id, in full
    if ids is not None:
        doc["seen"] = [id_digest(i) for i in ids[-DUPLICATE_MEMORY:]]
    actions = doc.pop("actions", None)  # action name -> last result
    if actions is not None:
        failed = [action for action, ok in actions.items() if not ok]
        doc["failed_actions"] = [id_digest(a) for a in failed][-FAILED_ACTION_MEMORY:]
        doc["failed_names"] = [_display_name(a) for a in failed[:FAILED_ACTION_NAMES]]
        doc["actions_forgotten"] = len(failed) > FAILED_ACTION_MEMORY


def _convert_legacy_times(doc: dict[str, Any]) -> None:
    """Cases stored by 0.1 kept every reopen and link time."""
    for name in ("reopens", "links"):
        times: list[int] = []
        for ts_us in doc.get(name, ()):
            remember_time(times, ts_us)
        doc[name] = times


@dataclass
class Route:
    """A case sent to the annotation queue: the reason and the event that triggered it."""

    reason: str
    trigger: dict[str, Any]


@dataclass(slots=True)
class Step:
    """What one event did: facts and pipeline counts to add, cases to route, the new state."""

    state: CaseState
    facts: list[Fact] = field(default_factory=list)
    pipeline: dict[str, int] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    duplicate: bool = False
    sample_rate: float = 0.0  # share of autonomous resolutions routed as random_sample
    # Window sizes whose window for this event had closed when it arrived: decided here
    # once, for the facts' windows and the `late` count alike.
    late: tuple[int, ...] = ()
    # The case's dimensions as its facts carry them, taken at the first fact: an event
    # sets them before it counts anything.
    dims: kpis.Dims | None = field(default=None, repr=False, compare=False)

    def fact(self, name: str, *labels: str, value: float = 1.0, ts_us: int | None = None,
             late: tuple[int, ...] = ()) -> None:
        dims = self.dims
        if dims is None:
            dims = self.dims = self.state.dims_now()
        self.facts.append(Fact(name, labels, float(value), dims, ts_us, late))

    def count(self, name: str, label: str = "") -> None:
        key = self.state.count(name, label)
        self.pipeline[key] = self.pipeline.get(key, 0) + 1

    def route(self, reason: str, trigger: dict[str, Any]) -> None:
        if reason in self.state.routed:
            return
        self.state.routed.append(reason)
        self.fact(kpis.ANNOTATION, reason)
        self.routes += (Route(reason, trigger),)

    def finish(self) -> Step:
        if self.facts:
            self.state.figures.add_facts(self.facts)
        return self


def new_case(partition: int) -> CaseState:
    return CaseState(partition=partition)


def apply_event(
    state: CaseState | None,
    event: Event,
    *,
    partition: int,
    offset: int,
    watermark_us: int | None,
    windows: WindowPolicy,
    sample_rate: float = 0.0,
) -> Step:
    """Apply a valid event (already known not to be a redelivery) to its case."""
    state = state if state is not None else new_case(partition)
    state.partition = partition
    ts_us = event.ts_us
    if offset > state.offset:
        state.offset = offset
    if state.last_us is None or ts_us > state.last_us:
        state.last_us = ts_us
    step = Step(state, sample_rate=sample_rate)
    digest = id_digest(event.event_id)
    if digest in state.seen:
        step.duplicate = True
        step.count(kpis.DUPLICATE)
        return step.finish()
    state.seen.append(digest)
    if len(state.seen) > DUPLICATE_MEMORY:
        del state.seen[0]
    step.count(kpis.EVENT, event.type)

    late = step.late = (() if watermark_us is None
                        else windows.late_sizes(ts_us, watermark_us))
    state.watermark_us = ts_us if watermark_us is None else max(watermark_us, ts_us)
    if state.outcome is None and (state.opened_us is None or ts_us < state.opened_us):
        state.opened_us = ts_us
    dims = state.dims
    intent_known_before = dims[0] is not None
    if None in dims:
        for index, name in enumerate(DIMENSIONS):
            value = event.fields.get(name)
            if dims[index] is None and value:
                dims[index] = value

    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(step, event, late, intent_known_before)
    cost = event.get("cost_usd") if event.type in _COSTED else None
    if cost is not None:
        step.fact(kpis.COST, value=cost)
        state.cost += cost
        if state.outcome is not None and cost:
            step.fact(kpis.CASE_COST, state.outcome, value=cost)
    for size in late:
        step.count(kpis.LATE, str(size))
    return step.finish()


def apply_link(state: CaseState | None, *, partition: int, link_ts_us: int) -> Step:
    """A later case named this one as `related_case_id` (a re-engagement) at `link_ts_us`."""
    state = state if state is not None else new_case(partition)
    state.partition = partition
    if state.last_us is None or link_ts_us > state.last_us:
        state.last_us = link_ts_us
    step = Step(state)
    if state.outcome is None:
        remember_time(state.links, link_ts_us)
    elif state.outcome == "autonomous":
        _count_link(step, link_ts_us)
    return step.finish()


# --- handlers ----------------------------------------------------------------------------

_COSTED = frozenset({"action_executed", "response_sent"})


def _within_day(step: Step, ts_us: int) -> bool:
    concluded = step.state.concluded_us
    return concluded is not None and 0 <= ts_us - concluded <= DAY_US


def _count_reopen(step: Step, ts_us: int, trigger: dict[str, Any]) -> None:
    if not _within_day(step, ts_us):
        return
    state = step.state
    if not state.reopen_counted:
        state.reopen_counted = True
        step.fact(kpis.REOPENED)
        step.route("reopened", trigger)
    if not state.fcr_counted:
        state.fcr_counted = True
        step.fact(kpis.FCR_FAILURE)


def _count_link(step: Step, ts_us: int) -> None:
    if _within_day(step, ts_us) and not step.state.fcr_counted:
        step.state.fcr_counted = True
        step.fact(kpis.FCR_FAILURE)


def _conclude(step: Step, event: Event, outcome: str, late: tuple[int, ...]) -> None:
    state = step.state
    state.outcome = outcome
    state.concluded_us = event.ts_us
    step.fact(kpis.CONCLUDED, outcome, ts_us=event.ts_us, late=late)
    if state.cost:
        step.fact(kpis.CASE_COST, outcome, value=state.cost)
    if outcome == "autonomous":
        opened = state.opened_us if state.opened_us is not None else event.ts_us
        seconds = max(0, event.ts_us - opened) / SECOND_US
        step.fact(kpis.AHT, value=seconds, ts_us=event.ts_us, late=late)
        for ts_us in state.reopens:
            # Only the time of a reopen that came before the conclusion is kept: the
            # earliest one within a day after it is the one an item shows.
            trigger = {"type": "case_reopened", "case_id": event.case_id, "ts": format_ts(ts_us)}
            _count_reopen(step, ts_us, trigger)
        for ts_us in state.links:
            _count_link(step, ts_us)
    state.reopens.clear()
    state.links.clear()


def _on_escalated(step: Step, event: Event, late: tuple[int, ...], _: bool) -> None:
    reason, normalised = normalise_reason(event.get("reason"))
    if normalised:
        step.count(kpis.NORMALISED, "reason")
    if step.state.outcome is not None:
        return
    _conclude(step, event, "escalated", late)
    step.fact(kpis.ESCALATION, reason)
    step.route("escalated", event.fields)


def _on_resolved(step: Step, event: Event, late: tuple[int, ...], intent_known: bool) -> None:
    state = step.state
    if state.outcome is not None:
        return
    if event.get("by") == "human":
        outcome = "human"
    elif (
        intent_known
        and not state.policy_failed
        and not state.overridden
        and state.actions_all_succeeded()
    ):
        outcome = "autonomous"
    else:
        outcome = "unverified"
    _conclude(step, event, outcome, late)
    if outcome == "unverified":
        step.route("unverified_resolution", event.fields)
    elif outcome == "autonomous" and sampled(event.case_id, step.sample_rate):
        step.route(RANDOM_SAMPLE, event.fields)


def _on_policy(step: Step, event: Event, late: tuple[int, ...], _: bool) -> None:
    passed = event.get("passed")
    if not passed:
        step.state.policy_failed = True
    step.fact(kpis.POLICY_CHECK, "passed" if passed else "failed", ts_us=event.ts_us, late=late)


def _on_action(step: Step, event: Event, *_: Any) -> None:
    action, success = event.get("action"), bool(event.get("success"))
    step.state.record_action(action, success)
    step.fact(kpis.ACTION, action_label(action), "success" if success else "failure")


def _on_response(step: Step, event: Event, *_: Any) -> None:
    step.fact(kpis.RESPONSE_LATENCY, value=event.get("latency_ms") / 1000)
    if event.get("fallback") is True:
        step.fact(kpis.FALLBACK)


def _on_reopened(step: Step, event: Event, *_: Any) -> None:
    state = step.state
    if state.outcome is None:
        remember_time(state.reopens, event.ts_us)
    elif state.outcome == "autonomous":
        _count_reopen(step, event.ts_us, event.fields)


def _on_override(step: Step, event: Event, *_: Any) -> None:
    if not step.state.overridden:
        step.state.overridden = True
        step.fact(kpis.OVERRIDDEN)
    step.route("human_override", event.fields)


def _on_csat(step: Step, event: Event, *_: Any) -> None:
    score = event.get("score")
    step.fact(kpis.CSAT, value=score)
    if score <= 2:
        step.route("low_csat", event.fields)


def _on_ces(step: Step, event: Event, *_: Any) -> None:
    score = event.get("score")
    step.fact(kpis.CES, value=score)
    if score <= 3:
        step.route("low_ces", event.fields)


def _on_thumbs(step: Step, event: Event, *_: Any) -> None:
    vote = event.get("vote")
    step.fact(kpis.THUMBS, vote)
    if vote == "down":
        step.route("thumbs_down", event.fields)


def _on_suggestion(step: Step, event: Event, *_: Any) -> None:
    step.fact(kpis.SUGGESTION, "true" if event.get("adopted") else "false")


def _on_knowledge(step: Step, event: Event, *_: Any) -> None:
    kind = event.get("kind")
    step.fact(kpis.KNOWLEDGE, kind)
    if kind == "missing":
        step.route("knowledge_missing", event.fields)


def _on_evaluation(step: Step, event: Event, *_: Any) -> None:
    score = event.get("score")
    step.fact(kpis.EVALUATION, event.get("name"), value=score)
    if score < 0.5:
        step.route("low_score", event.fields)


_HANDLERS = {
    "case_escalated": _on_escalated,
    "case_resolved": _on_resolved,
    "policy_checked": _on_policy,
    "action_executed": _on_action,
    "response_sent": _on_response,
    "case_reopened": _on_reopened,
    "human_override": _on_override,
    "csat_submitted": _on_csat,
    "ces_submitted": _on_ces,
    "thumbs_submitted": _on_thumbs,
    "suggestion_reviewed": _on_suggestion,
    "knowledge_flagged": _on_knowledge,
    "evaluation_scored": _on_evaluation,
}


def related_case(event: Event) -> str | None:
    """The earlier case a `case_opened` re-engages, if it names another case."""
    if event.type != "case_opened":
        return None
    related = event.get("related_case_id")
    return related if related and related != event.case_id else None

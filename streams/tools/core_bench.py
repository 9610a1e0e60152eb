"""The pure core's cost per event, side by side with orjson's decode of the same lines.

A worker's ceiling is set by what it does per event in Python: parsing and validating
the message, then planning, marking and committing its batch on the tables. This times
exactly that, on plain dicts (no broker, no Faust), next to `orjson.loads` of the same
lines, back to back in each repeat, so that both meet the same machine (a shared one is
slower or faster by the minute).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from streams.config import Settings
from streams.core.kpis import DUPLICATE, EVENT, INVALID
from streams.core.ledger import Ledger
from streams.core.units import SECOND_US
from streams.core.windows import WindowPolicy
from streams.worker.batches import parse_or_invalid

BATCH = 3000  # events per batch, about the worker's take (Settings.batch_max) under load
PARTITION = 0
EVENTS = 20_000  # what `acsr-metrics bench` times: about a second a repeat


def worker_ledger(settings: Settings) -> Ledger:
    """A ledger configured as the worker configures its own (streams/worker/app.py)."""
    return Ledger(WindowPolicy(sizes_s=settings.window_sizes_s, grace_s=settings.window_grace_s),
                  retention_us=settings.case_retention_s * SECOND_US,
                  sample_rate=settings.sample_resolved_rate)


def run_core(lines: Sequence[bytes], settings: Settings) -> Ledger:
    """The lines through the core as one worker's batches of one partition: parsed, then
    each batch planned, marked and committed (BatchProcessor.batch and _land), then the
    hourly expiry check; the ledger afterwards."""
    ledger = worker_ledger(settings)
    cases: dict[str, bytes] = {}
    records: dict[int, bytes] = {}
    bounds = settings.event_time_bounds
    for start in range(0, len(lines), BATCH):
        batch = [(offset, parse_or_invalid(line, bounds))
                 for offset, line in enumerate(lines[start:start + BATCH], start)]
        plan = ledger.plan_batch(cases, records, PARTITION, batch)
        if plan.applied or plan.invalid:
            ledger.mark_batch(records, plan)
        ledger.commit_batch(cases, plan)
        ledger.maybe_expire(cases, records, PARTITION)
    return ledger


def decode_all(lines: Iterable[bytes]) -> int:
    """orjson's decode of every line: the floor any JSON consumer pays (the raw ceiling's)."""
    decoded = 0
    for line in lines:
        try:
            orjson.loads(line)
            decoded += 1
        except orjson.JSONDecodeError:
            pass
    return decoded


def counted(ledger: Ledger) -> dict[str, int]:
    """Messages the ledger counted, by kind: every line must be one of them."""
    pipeline = ledger.aggregate(PARTITION).pipeline
    return {"valid": sum(n for (name, _), n in pipeline.items() if name == EVENT),
            "duplicate": pipeline.get((DUPLICATE, ""), 0),
            "invalid": sum(n for (name, _), n in pipeline.items() if name == INVALID)}


def _timed(work: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """CPU seconds of `work(*args)`, and its result: the time this process ran, so the
    jobs beside it on a shared machine count less than they would in wall time."""
    gc.collect()  # each side starts from the same heap, not the other's garbage
    started = time.process_time()
    result = work(*args)
    return time.process_time() - started, result


def core_benchmark(events: list[bytes], repeats: int) -> dict[str, Any]:
    """Per-event µs of orjson's decode and of the core on `events`, and their ratio,
    each repeat timing both back to back; min, median and max over the repeats. The
    garbage collector runs as in the worker (its thresholds, `worker.app.tune_gc`): it
    takes a quarter to a third of the core's time at Python's defaults."""
    if not events or repeats <= 0:
        raise ValueError("core_benchmark needs events and at least one repeat")
    from streams.tools.bench import summarize  # bench imports this module
    from streams.worker.app import GC_THRESHOLDS  # Faust with it: imported only to run

    settings = Settings()
    runs = []
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        for _ in range(repeats):
            decode_s, _ = _timed(decode_all, events)
            core_s, ledger = _timed(run_core, events, settings)
            runs.append({"decode_us": decode_s / len(events) * 1e6,
                         "core_us": core_s / len(events) * 1e6, "ratio": core_s / decode_s,
                         "counted": counted(ledger)})
    finally:
        gc.set_threshold(*before)
    return {"events": len(events), "batch": BATCH, "repeats": repeats,
            "gc_thresholds": list(GC_THRESHOLDS), "runs": runs,
            **{f"{name}_summary": summarize([run[name] for run in runs])
               for name in ("decode_us", "core_us", "ratio")}}


def measure_core(lines: Sequence[bytes], repeats: int, say: Callable[[str], None]
                 ) -> dict[str, Any]:
    """`core_benchmark` on the first EVENTS of the bench's own events, with progress."""
    events = list(lines[:EVENTS])
    say(f"bench: pure core: {len(events):,} events, {repeats} times beside orjson's decode")
    result = core_benchmark(events, repeats)
    ratio, core, decode = (result[f"{name}_summary"]["median"]
                           for name in ("ratio", "core_us", "decode_us"))
    say(f"bench: pure core: {ratio:.1f} times orjson's decode (medians: {core:.2f} against "
        f"{decode:.2f} µs an event)")
    return result

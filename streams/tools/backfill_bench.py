"""The backfill's rate, side by side with orjson's decode of the same archive.

`acsr-metrics backfill` (streams/tools/backfill.py) turns an archive of events into
OpenMetrics history without a broker: its rate is what one process of this machine does
with an archive, not what a broker allows. This writes one archive of simulator events
(same seed, same events; writing it is not measured), then, `repeats` times, (a) reads it
as a bare JSON consumer does, `orjson.loads` of every line, and (b) backfills it, as the
command does with its defaults: `--step 60`, the settings' partitions, one chunk a UTC day,
no TSDB. Both read the file the same way (`read_lines`) and run back to back in each
repeat, so both meet the same machine; a shared one is slower or faster by the minute,
which the ratio of the two absorbs better than either rate.

Each repeat writes its chunks to a directory of its own, removed afterwards: the bytes
written, and per day of event time, are what the OpenMetrics history costs on disk.
"""

from __future__ import annotations

import gc
import itertools
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streams.config import Settings
from streams.tools.backfill import Backfill, Options, Reading, Source, read_lines
from streams.tools.core_bench import decode_all
from streams.tools.simulate import SCENARIOS, Simulation

EVENTS = 500_000  # `acsr-metrics bench --backfill-events` default
TARGET_RATE = 100_000  # events/s the backfill should reach (one process)
STEP_S = 60  # the command's default --step
# 50 msg/s at 25x time: 2 messages a second of event time, so 500,000 events span about
# 2.9 days (three UTC days, two of them whole) and windows, retention and feedback hours
# later all happen, as in a real archive.
SIM_RATE = 50.0
SIM_SPEED = 25.0
START_MS = 1_788_220_800_000  # 2026-09-01T00:00:00Z, a UTC midnight: chunks are whole days
SEED = 1
PROGRESS_S = 5.0
DAY_S = 86_400
MB = 1e6

Say = Callable[[str], None]


def write_archive(path: Path, count: int, seed: int = SEED) -> dict[str, Any]:
    """`count` simulator messages as JSON Lines at `path` (same seed, same file): what
    `acsr-metrics simulate --output` writes, cut after `count` messages."""
    simulation = Simulation(SCENARIOS["steady"], seed=seed, rate=SIM_RATE, speed=SIM_SPEED,
                            start_ms=START_MS)
    written, last_s = 0, 0.0
    with path.open("wb") as out:
        for message in itertools.islice(iter(simulation), count):
            out.write(message.value + b"\n")
            written += 1
            last_s = message.t_s
    return {"events": written, "bytes": path.stat().st_size, "cases": simulation.cases,
            "event_time_days": last_s / DAY_S, "seed": seed, "sim_rate": SIM_RATE,
            "sim_speed": SIM_SPEED, "start": _iso(START_MS // 1000)}


def decode_archive(archive: Path) -> int:
    """A bare JSON consumer of the archive: its lines read as the backfill reads them,
    each decoded by orjson; the number that decoded."""
    source = Source.of(str(archive))
    return decode_all(read_lines([source], Reading(source.size)))


def backfill_archive(settings: Settings, archive: Path, out: Path,
                     on_line: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """The archive backfilled into `out` as `acsr-metrics backfill FILE --openmetrics OUT`
    does by default; what it wrote."""
    source = Source.of(str(archive))
    options = Options([source], out, step_s=STEP_S)
    out.mkdir(parents=True, exist_ok=True)
    result = Backfill(settings, options).run(read_lines([source], Reading(source.size)),
                                            on_line)
    chunks = {path.name: path.stat().st_size for path in result.chunks}
    return {"lines": result.lines, "invalid": result.invalid, "samples": result.samples,
            "bytes_written": result.bytes_written, "chunk_bytes": chunks,
            "first_s": result.first_s, "last_s": result.last_s}


def _timed(work: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """Wall and CPU seconds of `work(*args)`, and its result; the garbage of what ran
    before is collected first."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = work(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def mb_per_day(bytes_written: int, first_s: int | None, last_s: int | None,
               step_s: int = STEP_S) -> float:
    """Megabytes (10^6 bytes) of OpenMetrics per day of event time the samples cover
    (`step_s` for the last one)."""
    if first_s is None or last_s is None:
        return math.nan
    return bytes_written / MB / ((last_s - first_s + step_s) / DAY_S)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def backfill_benchmark(settings: Settings, events: int = EVENTS, repeats: int = 1,
                       seed: int = SEED, say: Say = lambda text: None) -> dict[str, Any]:
    """An archive of `events` simulator events, decoded and backfilled `repeats` times
    back to back (see the module doc); every figure, and min, median and max over the
    repeats. Everything is written under a temporary directory, removed at the end."""
    if events <= 0 or repeats <= 0:
        raise ValueError("backfill_benchmark needs events and at least one repeat")
    from streams.tools.bench import summarize  # bench imports this module

    work = Path(tempfile.mkdtemp(prefix="acsr-backfill-bench-"))
    try:
        archive_path = work / "events.jsonl"
        say(f"bench: backfill: writing {events:,} simulator events (seed {seed}, "
            f"{SIM_RATE:g} msg/s at {SIM_SPEED:g}x from {_iso(START_MS // 1000)}) to "
            f"{archive_path} (not measured)")
        started = time.perf_counter()
        archive = write_archive(archive_path, events, seed)
        archive["write_s"] = time.perf_counter() - started
        say(f"bench: backfill: {archive['events']:,} events, {archive['bytes'] / MB:,.1f} MB, "
            f"{archive['event_time_days']:.2f} days of event time, written in "
            f"{archive['write_s']:.1f}s")
        rss_before = peak_rss_mb()
        runs = []
        for repeat in range(1, repeats + 1):
            label = f"bench: backfill {repeat}/{repeats}"
            decode_wall, decode_cpu, decoded = _timed(decode_archive, archive_path)
            out = work / f"openmetrics-{repeat}"
            wall, cpu, written = _timed(backfill_archive, settings, archive_path, out,
                                        _progress(say, label, events))
            shutil.rmtree(out, ignore_errors=True)
            run = {"seconds": wall, "cpu_seconds": cpu, "rate": written["lines"] / wall,
                   "decode_seconds": decode_wall, "decode_cpu_seconds": decode_cpu,
                   "decode_rate": events / decode_wall, "decoded": decoded,
                   "ratio": cpu / decode_cpu if decode_cpu > 0 else math.nan, **written,
                   "mb_per_day": mb_per_day(written["bytes_written"], written["first_s"],
                                            written["last_s"])}
            runs.append(run)
            say(f"{label}: {run['lines']:,} events in {wall:.1f}s, {run['rate']:,.0f} ev/s "
                f"({run['ratio']:.1f} times orjson's decode, CPU); "
                f"{run['bytes_written'] / MB:,.1f} MB of OpenMetrics, "
                f"{run['mb_per_day']:,.1f} MB per day of event time")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"events": events, "repeats": repeats, "step_s": STEP_S,
            "partitions": settings.partitions, "partitioner": settings.partitioner,
            "target_rate": TARGET_RATE, "gc_thresholds": list(gc.get_threshold()),
            "archive": archive, "runs": runs,
            # ru_maxrss: the bench process's peak, whatever held it (not the backfill's own)
            "process_peak_rss_before_mb": rss_before, "process_peak_rss_mb": peak_rss_mb(),
            **{f"{name}_summary": summarize([run[name] for run in runs])
               for name in ("rate", "seconds", "decode_rate", "ratio", "bytes_written",
                            "mb_per_day")}}


def _progress(say: Say, label: str, total: int) -> Callable[[int], None]:
    """A line every PROGRESS_S while the backfill runs (it calls back every 1,024 lines)."""
    started = last = time.monotonic()

    def on_line(count: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_S:
            last = now
            say(f"{label}: {count:,}/{total:,} events, {count / (now - started):,.0f} ev/s")

    return on_line


def measure_backfill(settings: Settings, events: int, repeats: int, seed: int, say: Say
                     ) -> dict[str, Any]:
    """`backfill_benchmark` for `acsr-metrics bench`, with its verdict on stderr."""
    result = backfill_benchmark(settings, events, repeats, seed, say)
    say(f"{backfill_line(result)}; process peak RSS {result['process_peak_rss_mb']:,.0f} MB")
    return result


def backfill_line(result: dict[str, Any]) -> str:
    """The summary's line: the rate's min/median/max over the runs against the target,
    and the OpenMetrics written per day of event time (median)."""
    rates = "/".join(f"{result['rate_summary'][k]:,.0f}" for k in ("min", "median", "max"))
    return (f"backfill: {rates} events/s (min/median/max over {len(result['runs'])} runs), "
            f"target {result['target_rate']:,}; OpenMetrics "
            f"{result['mb_per_day_summary']['median']:,.1f} MB per day of event time")


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

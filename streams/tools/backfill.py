"""`acsr-metrics backfill`: an archive of events as Prometheus history.

    read JSON Lines (plain or gzip, in order) -> the worker's figures in event time
    (streams/tools/history.py) -> at every step, the group's exposition, timestamped ->
    one OpenMetrics chunk per block range (a UTC day) -> optionally TSDB blocks and the
    recording rules over the same range (streams/tools/tsdb.py)

No broker and no Faust: the same pure core the worker runs, so the figures at the last
timestamp are the `replay` report's (docs/backfill.md). Memory is bounded by the open
cases and one chunk, never by the archive.
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from streams.config import Settings
from streams.core.events import Event
from streams.core.units import SECOND_US
from streams.metrics.openmetrics import Changes, Chunk
from streams.tools.history import History
from streams.tools.replay import write_report

DEFAULT_STEP_S = 60
DEFAULT_CHUNK_HOURS = 24
SNIFF_LINES = 100  # a file none of whose first lines is a JSON object is not JSON Lines
READ_BYTES = 1 << 20
REPOSITORY = Path(__file__).resolve().parents[2]
BUNDLED_RULES = REPOSITORY / "alerts" / "recording.rules.yml"
CHUNK_PREFIX = "acsr-"
LIVE_HEAD_S = 3 * 3600  # a live Prometheus's head block: never backfilled


class BackfillError(RuntimeError):
    """The backfill cannot go on; the message says what to fix. Exit code 1: a step
    failed (promtool, prometheus, the disk)."""

    exit_code = 1


class BadInput(BackfillError):
    """The command line or an input file is wrong (exit code 2): nothing was written."""

    exit_code = 2


# --- reading the archive ---------------------------------------------------------------


@dataclass
class Source:
    """One input: a path, or standard input for `-`."""

    name: str
    size: int | None  # bytes on disk (compressed ones too), if known

    @classmethod
    def of(cls, raw: str) -> Source:
        if raw == "-":
            return cls("-", None)
        path = Path(raw)
        if not path.exists():
            raise BadInput(f"{raw}: no such file")
        if not path.is_file():
            raise BadInput(f"{raw}: not a file")
        try:
            with path.open("rb"):
                pass
        except OSError as err:
            raise BadInput(f"cannot read {raw}: {err.strerror}") from None
        return cls(raw, path.stat().st_size)


@dataclass
class Reading:
    """Where reading the sources stands (for the progress bar)."""

    total_bytes: int | None
    done_bytes: int = 0  # of finished sources
    current: Callable[[], int] = lambda: 0  # bytes read of the current source

    @property
    def read_bytes(self) -> int:
        return self.done_bytes + self.current()


def _open(source: Source) -> tuple[IO[bytes], IO[bytes]]:
    """The source's byte stream (gzip undone) and the raw stream under it."""
    raw: IO[bytes]
    if source.name == "-":
        raw = io.BufferedReader(sys.stdin.buffer, READ_BYTES)  # type: ignore[arg-type]
    else:
        raw = open(source.name, "rb", buffering=READ_BYTES)  # noqa: SIM115
    magic = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def read_lines(sources: Sequence[Source], reading: Reading) -> Iterator[bytes]:
    """The non-blank lines of every source, in order (as `replay` reads them)."""
    for source in sources:
        stream, raw = _open(source)
        reading.current = raw.tell if source.name != "-" else (lambda: 0)
        try:
            yield from _checked_lines(source.name, stream)
        except (OSError, EOFError, zlib.error) as err:
            raise BadInput(f"cannot read {source.name}: {err}") from None
        finally:
            if source.size is not None:
                reading.done_bytes += source.size
            reading.current = lambda: 0
            stream.close()


def _checked_lines(name: str, stream: IO[bytes]) -> Iterator[bytes]:
    """Lines without their ends; refuses a source that is not JSON Lines at all."""
    seen, objects = 0, 0
    for number, line in enumerate(stream, 1):
        if seen < SNIFF_LINES:
            if b"\0" in line:
                raise BadInput(f"{name}: line {number} holds NUL bytes: a binary file, "
                                    "not JSON Lines (gzip is read as such)")
            if line.strip():
                seen += 1
                objects += line.lstrip().startswith(b"{")
                if seen == SNIFF_LINES and not objects:
                    raise BadInput(f"{name}: none of the first {SNIFF_LINES} lines is a "
                                        "JSON object: not JSON Lines (one event per line)")
        stripped = line.rstrip(b"\r\n")
        if stripped.strip():
            yield stripped
    if seen and not objects:
        raise BadInput(f"{name}: no line is a JSON object: not JSON Lines "
                            "(one event per line)")


# --- the run ------------------------------------------------------------------------------


@dataclass
class Options:
    sources: list[Source]
    out: Path
    step_s: int = DEFAULT_STEP_S
    chunk_s: int = DEFAULT_CHUNK_HOURS * 3600
    report: Path | None = None
    tsdb: Path | None = None
    rules: list[Path] = field(default_factory=list)
    keep_chunks: bool = True  # False: each chunk is deleted once its blocks are built


@dataclass
class Result:
    """What a backfill wrote, for the summary and the tests."""

    lines: int = 0
    invalid: int = 0
    seconds: float = 0.0
    chunks: list[Path] = field(default_factory=list)
    samples: int = 0  # points written (a histogram's point is all its samples)
    bytes_written: int = 0
    first_s: int | None = None  # the first and last timestamps written
    last_s: int | None = None
    report: dict[str, Any] = field(default_factory=dict)
    raw_blocks: list[Path] = field(default_factory=list)
    rule_blocks: list[Path] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.lines / self.seconds if self.seconds else 0.0


class Backfill:
    """Feeds a `History` and writes its figures at every step, chunk by chunk."""

    def __init__(self, settings: Settings, options: Options, partitions: int | None = None,
                 blocks: Blocks | None = None) -> None:
        self.history = History(settings, partitions)
        self.options = options
        self.blocks = blocks
        self.step_s = options.step_s
        self.next_s: int | None = None  # the next moment whose figures are written
        self.frames = self.history.frames
        self.chunk = Chunk(self.frames)
        self.chunk_index: int | None = None
        self.partial = options.out / f".partial-{int(time.time() * 1000)}"
        self.result = Result()
        self._changes = Changes()
        self._stale = True  # figures changed since the families were made

    def run(self, lines: Iterator[bytes], on_line: Callable[[int], None] = lambda n: None
            ) -> Result:
        started = time.monotonic()
        self.partial.mkdir(parents=True, exist_ok=False)
        try:
            self._consume(lines, on_line)
            self._finish()
        except BaseException:
            shutil.rmtree(self.partial, ignore_errors=True)
            if self.blocks is not None:
                self.blocks.abandon()
            raise
        self.result.seconds = time.monotonic() - started
        return self.result

    def _consume(self, lines: Iterator[bytes], on_line: Callable[[int], None]) -> None:
        history, step_us = self.history, self.step_s * SECOND_US
        count = 0
        for line in lines:
            partition, parsed = history.parse(line)
            if isinstance(parsed, Event):
                ts_us = parsed.ts_us
                if self.next_s is None:
                    self.next_s = -(-ts_us // step_us) * self.step_s  # the step at or after
                elif ts_us > self.next_s * SECOND_US:
                    self._write_until(ts_us)
            history.add(partition, parsed)
            count += 1
            if not count & 1023:
                on_line(count)
        on_line(count)
        self.result.lines = count

    def _write_until(self, ts_us: int) -> None:
        """The figures at every step before `ts_us` (each holds the events at or before it)."""
        assert self.next_s is not None
        self.history.apply()
        self._stale = True
        while self.next_s * SECOND_US < ts_us:
            self._write_moment(self.next_s)
            self.next_s += self.step_s

    def _write_moment(self, ts_s: int) -> None:
        index = ts_s // self.options.chunk_s
        if self.chunk_index is not None and index != self.chunk_index:
            self._close_chunk()
        self.chunk_index = index
        if self._stale:
            self._changes = self.history.update()
            self._stale = False
        else:
            self._changes = Changes()  # the same figures as the moment before
        self.chunk.add(ts_s, self._changes, self.history.exposition)
        result = self.result
        result.first_s = ts_s if result.first_s is None else result.first_s
        result.last_s = ts_s

    def _close_chunk(self) -> None:
        if not len(self.chunk):
            return
        assert self.chunk.first_s is not None
        start = datetime.fromtimestamp(self.chunk.first_s, UTC).strftime("%Y-%m-%dT%H%M%SZ")
        path = self.partial / f"{CHUNK_PREFIX}{start}.om"
        try:
            self.result.bytes_written += self.chunk.write(path)
        except OSError as err:
            raise BackfillError(f"cannot write {path}: {err.strerror or err}") from None
        self.result.samples += len(self.chunk)
        self.chunk = Chunk(self.frames)
        if self.blocks is not None:
            self.blocks.add(path)
            if not self.options.keep_chunks:
                path.unlink()
                return
        self.result.chunks.append(path)

    def _finish(self) -> None:
        """The figures after the last event, at the step at or after it; the chunks moved
        out of the partial directory only now, whole."""
        self.history.apply()
        self._stale = True
        if self.next_s is not None:
            self._write_moment(self.next_s)
        self._close_chunk()
        self.result.invalid = self.history.invalid
        self.result.report = self.history.report()
        if self.blocks is not None:
            if self.result.first_s is None or self.result.last_s is None:
                self.blocks.abandon()  # no sample: no block
            else:
                self.result.raw_blocks, self.result.rule_blocks = self.blocks.finish(
                    self.result.first_s, self.result.last_s + self.step_s)
        final = []  # only now, with everything else done, the chunks appear in OUT
        for path in self.result.chunks:
            target = self.options.out / path.name
            path.replace(target)
            final.append(target)
        self.partial.rmdir()
        self.result.chunks = final


class Blocks:
    """TSDB blocks built chunk by chunk as the backfill goes (promtool's work and, with
    `keep_chunks` off, the disk stay bounded by one chunk), then the recording rules over
    the whole range; all of it appears in the TSDB directory only at the end, whole."""

    def __init__(self, tsdb_dir: Path, rules: Sequence[Path], step_s: int) -> None:
        from streams.tools import tsdb

        self.tsdb, self.rules, self.step_s = tsdb, rules, step_s
        try:  # a missing tool or a bad rule fails now, not after hours of work
            self.promtool = tsdb.find_tool("promtool", tsdb.PROMTOOL_ENV)
            self.prometheus = tsdb.find_tool("prometheus", tsdb.PROMETHEUS_ENV)
            if rules:
                tsdb.check_rule_files(rules, self.promtool)
        except tsdb.TsdbError as err:
            raise BadInput(str(err)) from None
        self.out = tsdb_dir
        tsdb_dir.mkdir(parents=True, exist_ok=True)
        # A hidden name Prometheus never loads as a block.
        self.staging = Path(tempfile.mkdtemp(prefix=".backfill-", dir=tsdb_dir))
        self.raw: list[Path] = []

    def add(self, chunk: Path) -> None:
        try:
            self.raw += self.tsdb.create_blocks([chunk], self.staging, promtool=self.promtool)
        except self.tsdb.TsdbError as err:
            raise BackfillError(str(err)) from None

    def finish(self, start_s: int, end_s: int) -> tuple[list[Path], list[Path]]:
        """The recording rules' blocks, then every block moved into the TSDB directory."""
        try:
            recorded = self.tsdb.backfill_rules(
                self.rules, self.staging, start_s, end_s, promtool=self.promtool,
                prometheus=self.prometheus, eval_interval=f"{self.step_s}s",
                out_dir=self.staging) if self.rules else []
        except self.tsdb.TsdbError as err:
            self.abandon()
            raise BackfillError(str(err)) from None
        raw = [self._publish(block) for block in self.raw]
        rules = [self._publish(block) for block in recorded]
        shutil.rmtree(self.staging, ignore_errors=True)
        return raw, rules

    def _publish(self, block: Path) -> Path:
        target = self.out / block.name
        block.rename(target)
        return target

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


# --- the command --------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "backfill", help="an event archive as Prometheus history: OpenMetrics chunks, "
        "optionally TSDB blocks (docs/backfill.md)")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="JSON Lines, plain or gzip, read in the order given; - for "
                        "standard input")
    parser.add_argument("--openmetrics", type=Path, required=True, metavar="OUT",
                        help="directory for the OpenMetrics chunks (one per day of event time)")
    parser.add_argument("--step", type=int, default=DEFAULT_STEP_S, metavar="SECONDS",
                        help=f"event time between two samples of a series (default "
                        f"{DEFAULT_STEP_S}, like a scrape interval)")
    parser.add_argument("--chunk-hours", type=int, default=DEFAULT_CHUNK_HOURS,
                        help=f"event time per chunk (default {DEFAULT_CHUNK_HOURS}; 6, 12 or "
                        "a multiple of 24)")
    parser.add_argument("--partitions", type=int,
                        help="partitions of the events topic the figures should match (env "
                        "ACSR_PARTITIONS): lateness is judged per partition")
    parser.add_argument("--partitioner", help="how producers place a case_id (env "
                        "ACSR_PARTITIONER, default murmur2)")
    parser.add_argument("--report", type=Path, help="also write the replay report here")
    parser.add_argument("--tsdb", type=Path, metavar="DIR",
                        help="also build TSDB blocks here (needs promtool), then backfill the "
                        "recording rules over the same range (needs prometheus)")
    parser.add_argument("--rules", type=Path, action="append",
                        help="recording rules to backfill with --tsdb (default: the bundled "
                        "alerts/recording.rules.yml); repeat for several files")
    parser.add_argument("--tsdb-only", action="store_true",
                        help="with --tsdb: delete each OpenMetrics chunk once its blocks are "
                        "built, so the disk holds one chunk at a time")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    if args.step <= 0:
        raise BadInput("--step must be a positive number of seconds")
    hours = args.chunk_hours
    if hours not in (6, 12) and (hours <= 0 or hours % 24):
        raise BadInput("--chunk-hours must be 6, 12 or a multiple of 24 (TSDB blocks are "
                       "6 h long: a chunk holds whole blocks)")
    if (hours * 3600) % args.step:
        raise BadInput(f"--step {args.step} must divide the chunk ({hours} h)")
    if args.files.count("-") > 1:
        raise BadInput("standard input (-) can be read once only")
    out: Path = args.openmetrics
    if out.exists() and not out.is_dir():
        raise BadInput(f"--openmetrics {out}: exists and is not a directory")
    rules = args.rules or []
    if args.tsdb is not None and not rules:
        if not BUNDLED_RULES.is_file():
            raise BadInput("the bundled recording rules are not installed here: give "
                                "--rules FILE")
        rules = [BUNDLED_RULES]
    for path in rules:
        if not path.is_file():
            raise BadInput(f"--rules {path}: no such file")
    if args.tsdb_only and args.tsdb is None:
        raise BadInput("--tsdb-only needs --tsdb DIR")
    return Options([Source.of(raw) for raw in args.files], out, args.step, hours * 3600,
                   args.report, args.tsdb, rules, keep_chunks=not args.tsdb_only)


def run_backfill_command(args: argparse.Namespace, base: Settings) -> int:
    settings = base.with_overrides(partitions=args.partitions, partitioner=args.partitioner)
    try:
        options = options_from(args)
        result = backfill_with_progress(settings, options, quiet=args.quiet)
        if options.report is not None:
            write_report(result.report, options.report)
        print(summary(result, options, settings), file=sys.stderr)
    except BackfillError as err:
        print(f"acsr-metrics: backfill failed: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def backfill_with_progress(settings: Settings, options: Options, quiet: bool = False
                           ) -> Result:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    blocks = Blocks(options.tsdb, options.rules, options.step_s) if options.tsdb else None
    options.out.mkdir(parents=True, exist_ok=True)
    total = None if any(s.size is None for s in options.sources) else \
        sum(s.size or 0 for s in options.sources)
    reading = Reading(total)
    backfill = Backfill(settings, options, blocks=blocks)
    started = time.monotonic()
    with Progress(TextColumn("backfill"), BarColumn(), DownloadColumn(),
                  TextColumn("{task.fields[events]:,} events, {task.fields[rate]:,.0f}/s"),
                  TimeRemainingColumn(), disable=quiet or not sys.stderr.isatty(),
                  transient=True) as bar:
        task = bar.add_task("backfill", total=total, events=0, rate=0.0)

        def on_line(count: int) -> None:
            elapsed = time.monotonic() - started
            bar.update(task, completed=reading.read_bytes, events=count,
                       rate=count / elapsed if elapsed else 0.0)

        return backfill.run(read_lines(options.sources, reading), on_line)


def summary(result: Result, options: Options, settings: Settings) -> str:
    events = result.report.get("events", {})
    lines = [f"backfilled {result.lines:,} lines in {result.seconds:.1f} s "
             f"({result.rate:,.0f} lines/s): {events.get('valid', 0):,} valid, "
             f"{events.get('invalid', 0):,} invalid, {events.get('duplicate', 0):,} duplicate"]
    reasons = events.get("invalid_by_reason") or {}
    if reasons:
        lines.append("  invalid by reason: " + ", ".join(
            f"{reason} {n:,}" for reason, n in sorted(reasons.items())))
    if result.first_s is None:
        lines.append("  no valid event: no sample written")
    else:
        lines.append(f"  {len(result.chunks)} OpenMetrics chunk(s) in {options.out}, "
                     f"{result.bytes_written / 1e6:,.1f} MB, {result.samples:,} points, every "
                     f"{options.step_s} s from {_iso(result.first_s)} to {_iso(result.last_s)}"
                     f" ({settings.partitions} partitions, {settings.partitioner})")
    if options.report is not None:
        lines.append(f"  report: {options.report}")
    if result.last_s is not None and result.last_s > time.time() - LIVE_HEAD_S:
        lines.append(f"  warning: the history reaches {_iso(result.last_s)}, within the "
                     f"last {LIVE_HEAD_S // 3600} h: do not load that part into a Prometheus "
                     "that scrapes live (its head block holds it; docs/backfill.md)")
    if options.tsdb is not None and result.first_s is not None and result.last_s is not None:
        from streams.tools.tsdb import handover_text

        lines.append(f"  {len(result.raw_blocks)} block(s) of raw series and "
                     f"{len(result.rule_blocks)} of recording rules in {options.tsdb}")
        lines.append(handover_text(options.tsdb, result.first_s, result.last_s))
    return "\n".join(lines)


def _iso(ts_s: int | None) -> str:
    return "-" if ts_s is None else datetime.fromtimestamp(ts_s, UTC).isoformat()

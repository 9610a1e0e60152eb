"""Prometheus TSDB blocks from the OpenMetrics chunks `acsr-metrics backfill` writes, and
from recording rules evaluated over them (`backfill --tsdb DIR`).

Written against Debian's Prometheus 2.42 (promtool and prometheus 2.42.0+ds); what it
relies on, measured with those binaries:
- `promtool tsdb create-blocks-from openmetrics FILE DIR` takes a hidden
  `--max-block-duration` (default and minimum 2h). It is rounded down to 2h·3^k
  (2h, 6h, 18h, 54h, …; 24h gives 18h) and blocks are aligned to multiples of it since
  the epoch. 6h is the largest size that tiles a UTC day, so the day-long chunks give 4
  blocks each and blocks of two chunks never overlap (18h blocks would straddle days).
- promtool silently drops a sample whose series already holds one at the same or a later
  time in the same block (out of order, or a repeated timestamp), unless one of its
  commits (every 5,000 samples) came in between: then "add sample: out of order sample",
  exit 1. Every chunk's sample count is therefore compared with its blocks' numSamples.
- Timestamps are read as seconds: milliseconds give blocks tens of thousands of years
  ahead, without an error, after a pass over the file per block of the span (25 s for a
  small day); a chunk starting or reaching into the future is refused.
- On an error promtool keeps the blocks of the earlier time ranges it finished: blocks
  are made in a hidden staging directory (`DIR/.partial-*`, not a block name, ignored by
  Prometheus) and moved into DIR, each by an atomic rename, only once all chunks passed.
- `promtool tsdb create-blocks-from rules` (same hidden `--max-block-duration`) queries
  a Prometheus API, so one is started on hard links of the raw blocks. It evaluates
  alerting rules as if they recorded a series named after the alert (its `--help` says
  they are not evaluated), and a rule reading another rule's series sees only what the
  served blocks hold: both are refused before anything runs.
- Since 2.39 overlapping blocks are always allowed and merged by vertical compaction
  (the flag `--storage.tsdb.allow-overlapping-blocks` has no effect); a running server
  loads blocks copied into its data directory at its next block reload (within about a
  minute) or restart.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streams.kafka.broker import free_port, stop_process

PROMTOOL_ENV = "PROMTOOL"
PROMETHEUS_ENV = "PROMETHEUS"
DAY_S = 86_400
HEAD_S = 3 * 3600  # the live head block's span: never backfill it
_WIDTH = 88  # the hand-over text's lines
# promtool and Prometheus name a block directory by its ULID
_ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
# an OpenMetrics sample: name, optional labels (quoted values may hold anything), value, time
_SAMPLE = re.compile(r"""[^\s{]+(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+\S+\s+(?P<ts>\S+)""")
_ALERT = re.compile(r"""^\s*(?:-\s*)?alert\s*:\s*['"]?([^'"#\s]*)""")
_RECORD = re.compile(r"""^\s*(?:-\s*)?record\s*:\s*['"]?([^'"#\s]+)""")
CHUNK_FORMAT = ("a chunk must be OpenMetrics text: a timestamp in Unix seconds on every "
                "sample, each series' samples in time order with no repeated timestamp, "
                "and '# EOF' as its last line")


class TsdbError(RuntimeError):
    """A step of the TSDB conversion failed; the message says what, and what to do."""


def find_tool(name: str, env: str) -> str:
    """The path of `name` (promtool, prometheus): the environment variable `env` when set,
    so another Prometheus release can be chosen without touching PATH, else PATH."""
    configured = os.environ.get(env)
    if configured:
        path = shutil.which(configured)
        if path is None:
            raise TsdbError(f"{env}={configured!r} is not an executable {name}: point {env} "
                            f"at {name} or unset it to use the {name} on PATH")
        return path
    path = shutil.which(name)
    if path is None:
        raise TsdbError(f"{name} not found: install Prometheus's {name} (Debian: apt-get "
                        f"install prometheus) or set {env} to its path")
    return path


def create_blocks(chunks: Sequence[Path], out_dir: Path, *, promtool: str,
                  max_block_duration: str = "6h",
                  progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Turn every OpenMetrics chunk into TSDB blocks in `out_dir`, all or nothing: the
    blocks appear in `out_dir` only once every chunk converted with no sample lost.

    `max_block_duration` is promtool's (rounded down to 2h·3^k); the default 6h tiles
    the day-long chunks. `progress(done, total)` is called after each chunk. Returns the
    block directories created, in name (creation time) order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _staging(out_dir) as staging:
        for done, chunk in enumerate(chunks, 1):
            if not chunk.is_file():
                raise TsdbError(f"chunk {chunk} is not a file; nothing was written to {out_dir}")
            _check_first_timestamp(chunk, out_dir)
            before = _blocks(staging)
            _run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet",
                  f"--max-block-duration={max_block_duration}", str(chunk), str(staging)],
                 failure=f"promtool could not turn chunk {chunk} into blocks",
                 advice=f"nothing was written to {out_dir}; {CHUNK_FORMAT}")
            _check_chunk(chunk, _blocks(staging) - before, out_dir)
            if progress is not None:
                progress(done, len(chunks))
        return _publish(staging, out_dir)


def backfill_rules(rule_files: Sequence[Path], blocks_dir: Path, start_s: int, end_s: int, *,
                   promtool: str, prometheus: str, eval_interval: str = "60s",
                   out_dir: Path, max_block_duration: str = "6h",
                   ready_timeout_s: float = 60.0) -> list[Path]:
    """Evaluate the recording rules over [start_s, end_s] of the blocks in `blocks_dir` and
    write the recorded series as blocks into `out_dir`, all or nothing.

    promtool reads the raw series through a Prometheus API, so a throwaway Prometheus
    serves hard links of the blocks (copies across file systems) for the run. A group's
    `interval` wins over `eval_interval`; evaluations are offset within the interval as a
    live Prometheus offsets the group. Returns the block directories created."""
    if end_s <= start_s:
        raise TsdbError(f"rule backfill range is empty: --end {end_s} is not after "
                        f"--start {start_s}")
    check_rule_files(rule_files, promtool)
    raw = sorted(_blocks(blocks_dir))
    if not raw:
        raise TsdbError(f"no TSDB blocks in {blocks_dir} to evaluate the rules on: create "
                        "them from the chunks first (create_blocks, `backfill --tsdb`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".serving-", dir=out_dir))
    try:
        storage = work / "data"
        storage.mkdir()
        for block in raw:
            shutil.copytree(block, storage / block.name, copy_function=_link_or_copy)
        with _staging(out_dir) as staging:
            with _serving(prometheus, storage, work, ready_timeout_s) as url:
                _run([promtool, "tsdb", "create-blocks-from", "rules", "--quiet",
                      f"--start={start_s}", f"--end={end_s}", f"--url={url}",
                      f"--eval-interval={eval_interval}",
                      f"--max-block-duration={max_block_duration}",
                      f"--output-dir={staging}", *map(str, rule_files)],
                     failure="promtool could not backfill the recording rules "
                     + ", ".join(map(str, rule_files)),
                     advice=f"nothing was written to {out_dir}")
            return _publish(staging, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def handover_text(tsdb_dir: Path, start_s: int, end_s: int, *,
                  now_s: float | None = None) -> str:
    """What the user does with the blocks: the steps a running Prometheus needs to load
    and keep them, which the blocks alone cannot convey."""
    now = time.time() if now_s is None else now_s
    days = max(1, math.ceil((now - start_s) / DAY_S))
    blocks = sorted(_blocks(tsdb_dir)) if tsdb_dir.is_dir() else []
    size_mb = sum(f.stat().st_size for b in blocks for f in b.rglob("*") if f.is_file()) / 1e6
    hours = HEAD_S // 3600
    default_keeps = ("would delete it at the next compaction" if days > 15
                     else f"keeps it {15 - days} more days only")
    steps = [
        "Copy the block directories (named like 01M97BP1NHNCJVCV7P3TTFVRAX; not the hidden "
        "ones) into Prometheus's data directory, its --storage.tsdb.path (Debian: "
        "/var/lib/prometheus/metrics2/), owned by the user Prometheus runs as:",
        f"Set --storage.tsdb.retention.time to at least {days}d (Debian: ARGS in "
        f"/etc/default/prometheus): the oldest block starts {_iso(start_s)}, {days} days "
        f"ago, and the default 15d {default_keeps}. Retention counts "
        "back from the newest data, so the backfilled days go once older than that; a "
        "--storage.tsdb.retention.size must leave room for them too.",
        "Prometheus loads them at its next block reload (about once a minute) or restart, "
        "and merges them into its own blocks at a later compaction. Overlapping blocks are "
        "allowed by default since 2.39: --storage.tsdb.allow-overlapping-blocks is not "
        "needed (and has no effect); before 2.39 it must be set if they overlap its own.",
        "Backfill only time Prometheus did not scrape live for these series: the samples of "
        "both would count the same events, and sums and rates over them would count them twice. "
        f"Never backfill the newest {hours} hours: they belong to the head block the live "
        "server is still writing.",
    ]
    text = [_fill(
        f"TSDB blocks for {_iso(start_s)} to {_iso(end_s)}: {len(blocks)} block directories "
        f"({size_mb:.1f} MB) in {tsdb_dir}. To load them into Prometheus:")]
    for number, step in enumerate(steps, 1):
        text.append(_fill(step, initial_indent=f"  {number}. ", subsequent_indent="     "))
        if number == 1:
            source = shlex.quote(str(tsdb_dir))
            text.append(f"       cp -r {source}/0* /var/lib/prometheus/metrics2/\n"
                        "       chown -R prometheus: /var/lib/prometheus/metrics2/")
    if end_s > now - HEAD_S:
        text.append(_fill(
            f"WARNING: these blocks reach {_iso(end_s)}, less than {hours} h ago: end the "
            f"backfill at least {hours} h before now, or leave the blocks of those hours out."))
    return "\n".join(text) + "\n"


def _fill(text: str, **indents: str) -> str:
    """Wrapped for a terminal, never inside a flag or a path."""
    return textwrap.fill(text, _WIDTH, break_on_hyphens=False, break_long_words=False,
                         **indents)


def _blocks(directory: Path) -> set[Path]:
    """The complete blocks in `directory`: a ULID name and a meta.json (promtool writes a
    block as ULID.tmp-for-creation and renames it once complete)."""
    if not directory.is_dir():
        return set()
    return {entry for entry in directory.iterdir()
            if _ULID.fullmatch(entry.name) and (entry / "meta.json").is_file()}


def _meta(block: Path) -> dict[str, Any]:
    return json.loads((block / "meta.json").read_text())


def _count_samples(chunk: Path) -> int:
    """Samples in an OpenMetrics file: one per line that is no comment (an exemplar shares
    its sample's line; `_created`, `_bucket`, … are samples of their own)."""
    with chunk.open("rb") as lines:
        return sum(1 for line in lines if line.strip() and not line.startswith(b"#"))


def _check_first_timestamp(chunk: Path, out_dir: Path) -> None:
    """Refuse a chunk written in milliseconds before promtool reads it as seconds: it would
    walk a thousand times the span, block by block, each a pass over the whole file."""
    with chunk.open("rb") as lines:
        for line in lines:
            if not line.strip() or line.startswith(b"#"):
                continue
            sample = _SAMPLE.match(line.decode("utf-8", "replace"))
            if sample is None:
                return  # promtool says what is wrong with it
            try:
                first = float(sample["ts"])
            except ValueError:
                return
            if first > time.time() + 3600:
                raise TsdbError(f"chunk {chunk} starts at {_iso(first)}, in the future: "
                                "OpenMetrics timestamps are Unix seconds, not milliseconds; "
                                f"nothing was written to {out_dir}")
            return


def _check_chunk(chunk: Path, blocks: Iterable[Path], out_dir: Path) -> None:
    """Refuse what promtool accepts silently: lost samples and timestamps that are no
    seconds."""
    metas = [_meta(block) for block in blocks]
    kept = sum(meta["stats"]["numSamples"] for meta in metas)
    written = _count_samples(chunk)
    if kept != written:
        raise TsdbError(
            f"promtool kept {kept} of the {written} samples of chunk {chunk}: it drops, "
            "without an error, a sample whose series already has one at the same or a later "
            f"time; nothing was written to {out_dir}. Write each series' samples in time "
            "order, one per timestamp")
    newest = max((meta["maxTime"] for meta in metas), default=0) / 1000
    if newest > time.time() + 3600:
        raise TsdbError(f"chunk {chunk} has samples up to {_iso(newest)}, in the future: "
                        "OpenMetrics timestamps are Unix seconds, not milliseconds; nothing "
                        f"was written to {out_dir}")


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A hidden directory beside the blocks (same file system: the moves are renames),
    removed with whatever is left in it, whether the work succeeded or not."""
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_dir: Path) -> list[Path]:
    """Move the complete blocks into `out_dir`, each by one rename: a block is either
    absent or whole there."""
    published = []
    for block in sorted(_blocks(staging)):
        target = out_dir / block.name
        block.rename(target)
        published.append(target)
    return published


def _run(args: list[str], *, failure: str, advice: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    except OSError as err:
        raise TsdbError(f"{failure}: cannot run {args[0]}: {err}; {advice}") from err
    if done.returncode != 0:
        raise TsdbError(f"{failure} (exit {done.returncode}): "
                        f"{_tail(done.stderr or done.stdout)!r}; {advice}")


def _tail(text: str, lines: int = 8, chars: int = 1500) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f} s after the epoch"


def _link_or_copy(src: str, dst: str) -> None:
    """Hard link a block file (Prometheus replaces, never rewrites, a block's files), or
    copy it across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_rule_files(rule_files: Sequence[Path], promtool: str) -> None:
    """Refuse what promtool would backfill wrong, then let `promtool check rules` judge
    the syntax, before a Prometheus is started. The files are scanned as text (pyyaml is
    no runtime dependency): Prometheus rule files are block-style YAML."""
    if not rule_files:
        raise TsdbError("no rule files to backfill")
    recorded: dict[str, str] = {}
    code: list[tuple[str, str]] = []
    for path in rule_files:
        try:
            text = path.read_text()
        except OSError as err:
            raise TsdbError(f"cannot read rule file {path}: {err}") from err
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{path}:{number}"
            if alert := _ALERT.match(line):
                raise TsdbError(
                    f"{where} is an alerting rule ({alert[1] or 'unnamed'}): promtool 2.42 "
                    "would write its expression as a series named after the alert, and "
                    "alerts cannot be backfilled; pass files of recording rules only "
                    "(e.g. alerts/recording.rules.yml)")
            if record := _RECORD.match(line):
                recorded[record[1]] = where
            elif line.split("#", 1)[0].strip():
                code.append((where, line.split("#", 1)[0]))
    for name, at in recorded.items():
        uses = re.compile(rf"(?<![\w:]){re.escape(name)}(?![\w:])")
        for where, text in code:
            if uses.search(text):
                raise TsdbError(
                    f"{where} reads {name}, recorded by the rule at {at}: promtool evaluates "
                    "every rule on the served blocks only, so it would come out empty or "
                    "partial. Backfill the rules it reads first, copy their blocks beside the "
                    "raw ones, then backfill this rule in a second run")
    _run([promtool, "check", "rules", *map(str, rule_files)],
         failure="the rule files fail `promtool check rules`",
         advice="fix them and run again")


@contextmanager
def _serving(prometheus: str, storage: Path, workdir: Path, ready_timeout_s: float
             ) -> Iterator[str]:
    """A Prometheus with no scrape target serving the blocks in `storage`, until the block
    ends; yields its base URL. Retention 100y: the default 15d would delete old blocks at
    start."""
    config = workdir / "prometheus.yml"
    config.write_text("# serves backfilled blocks to promtool: nothing to scrape\n"
                      "scrape_configs: []\n")
    log_path = workdir / "prometheus.log"
    failure = f"Prometheus ({prometheus}) serving the blocks for the rule backfill"
    for _attempt in range(3):  # a free port can be taken before Prometheus binds it
        url = f"http://127.0.0.1:{free_port()}"
        with log_path.open("wb") as log:
            try:
                process = subprocess.Popen(
                    [prometheus, f"--config.file={config}", f"--storage.tsdb.path={storage}",
                     "--storage.tsdb.retention.time=100y",
                     f"--web.listen-address={url.removeprefix('http://')}"],
                    stdout=log, stderr=subprocess.STDOUT)
            except OSError as err:
                raise TsdbError(f"{failure} cannot start: {err}; install Prometheus (Debian: "
                                f"apt-get install prometheus) or set {PROMETHEUS_ENV}") from err
        try:
            if _wait_ready(url, process, ready_timeout_s):
                yield url
                return
            exited = process.poll()
        finally:
            stop_process(process, timeout_s=20)
        log_tail = _tail(log_path.read_text(errors="replace"))
        if "address already in use" not in log_tail:
            break
    state = (f"exited with {exited}" if exited is not None
             else f"was not ready after {ready_timeout_s:.0f} s")
    raise TsdbError(f"{failure} {state}; its log ends: {log_tail!r}")


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether /-/ready answered (blocks loaded) before the process exited or the time
    ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False



"""streams/tools/tsdb.py with Debian's promtool and Prometheus 2.42: day chunks become
blocks a real Prometheus serves, a bad chunk leaves no block behind, recording rules are
backfilled one value per evaluation, and what is refused before anything runs."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from streams.tools.tsdb import (
    TsdbError,
    backfill_rules,
    create_blocks,
    find_tool,
    handover_text,
)

from .prometheus_helpers import get_json, query_range, running_prometheus

DAY = 86_400
# 00:00 UTC three days ago: both chunk days lie well before any head block, and well
# within the helper Prometheus's default 15 d retention.
DAY0 = int(time.time()) // DAY * DAY - 3 * DAY
COUNTER = 'acsr_cases_concluded_total{outcome="autonomous"}'


def promtool() -> str:
    try:
        return find_tool("promtool", "PROMTOOL")
    except TsdbError as err:
        pytest.skip(str(err))


def prometheus() -> str:
    try:
        return find_tool("prometheus", "PROMETHEUS")
    except TsdbError as err:
        pytest.skip(str(err))


def concluded(t: float) -> int:
    """The counter as the chunks write it: one case a minute since DAY0."""
    return int(t - DAY0) // 60


def day_chunk(day_start: int) -> str:
    """One UTC day as `acsr-metrics backfill` writes it: a sample a minute, seconds."""
    minutes = range(day_start, day_start + DAY, 60)
    return "\n".join([
        "# HELP acsr_cases_concluded Cases concluded.",
        "# TYPE acsr_cases_concluded counter",
        *(f"{COUNTER} {concluded(t)} {t}" for t in minutes),
        "# HELP acsr_open_cases Open cases.",
        "# TYPE acsr_open_cases gauge",
        *(f"acsr_open_cases {concluded(t) % 17} {t}" for t in minutes),
        "# EOF",
    ]) + "\n"


def write_chunks(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    chunks = []
    for day_start in (DAY0, DAY0 + DAY):
        chunk = directory / f"acsr-{time.strftime('%Y-%m-%d', time.gmtime(day_start))}.om"
        chunk.write_text(day_chunk(day_start))
        chunks.append(chunk)
    return chunks


def instant(url: str, promql: str, at: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": promql, "time": at})
    return get_json(f"{url}/api/v1/query?{params}")["data"]["result"]


def serve(blocks: list[Path], workdir: Path):
    """The shared test Prometheus (tests/prometheus_helpers.py, no scrape target) on
    copies of `blocks`."""
    storage = workdir / "tsdb"
    storage.mkdir(parents=True)
    for block in blocks:
        shutil.copytree(block, storage / block.name)
    return running_prometheus([], workdir)


def meta(block: Path) -> dict:
    return json.loads((block / "meta.json").read_text())


@pytest.mark.integration
def test_day_chunks_become_blocks_prometheus_serves(tmp_path: Path) -> None:
    chunks = write_chunks(tmp_path / "om")
    out = tmp_path / "tsdb"
    seen: list[tuple[int, int]] = []
    blocks = create_blocks(chunks, out, promtool=promtool(),
                           progress=lambda done, total: seen.append((done, total)))

    assert seen == [(1, 2), (2, 2)]
    assert sorted(out.iterdir()) == sorted(blocks), "only blocks, no staging left"
    # 6 h blocks tile the UTC days: 4 a chunk, none straddling midnight
    assert len(blocks) == 8
    for block in blocks:
        first, last = meta(block)["minTime"] // 1000, (meta(block)["maxTime"] - 1) // 1000
        assert first // DAY == last // DAY
    assert sum(meta(block)["stats"]["numSamples"] for block in blocks) == 2 * 2 * 1440

    with serve(blocks, tmp_path / "prometheus") as url:
        for at in (DAY0 + 90, DAY0 + DAY + 3600 + 30, DAY0 + 2 * DAY - 1):
            [counter] = instant(url, "acsr_cases_concluded_total", at)
            assert counter["metric"]["outcome"] == "autonomous"
            assert float(counter["value"][1]) == concluded(at)
            [gauge] = instant(url, "acsr_open_cases", at)
            assert float(gauge["value"][1]) == concluded(at) % 17


def out_of_order(text: str) -> str:
    """The day's 10:00 sample moved after the 11:00 one: promtool drops it silently."""
    lines = text.splitlines()
    moved = next(i for i, line in enumerate(lines) if line.endswith(f" {DAY0 + DAY + 36_000}"))
    lines.insert(moved + 61, lines.pop(moved))
    return "\n".join(lines) + "\n"


BROKEN = {
    # Prometheus's text format 0.0.4 has no `# EOF`: promtool refuses it (exit 1)
    "not OpenMetrics": (lambda text: text.replace("# EOF\n", ""), "does not end with # EOF"),
    "out of order": (out_of_order, "kept 2879 of the 2880 samples"),
    "milliseconds": (
        lambda text: "\n".join(
            f"{line}000" if not line.startswith("#") else line for line in text.splitlines()
        ) + "\n",
        "not milliseconds",
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_chunk_leaves_no_block(tmp_path: Path, kind: str) -> None:
    tool = promtool()
    good, bad = write_chunks(tmp_path / "om")
    breaks, says = BROKEN[kind]
    bad.write_text(breaks(bad.read_text()))
    out = tmp_path / "tsdb"
    out.mkdir()
    (out / "kept.txt").write_text("what was there stays")

    with pytest.raises(TsdbError) as raised:
        create_blocks([good, bad], out, promtool=tool)

    message = str(raised.value)
    assert f"chunk {bad}" in message and says in message, message
    assert "nothing was written" in message
    # the good chunk's blocks went with the staging directory
    assert [entry.name for entry in out.iterdir()] == ["kept.txt"]


RULES = """\
groups:
  - name: backfill-test
    rules:
      - record: job:acsr_cases_concluded:sum
        expr: sum(acsr_cases_concluded_total)
"""


@pytest.mark.integration
def test_recording_rules_backfill_one_value_per_evaluation(tmp_path: Path) -> None:
    tool = promtool()
    server = prometheus()
    out = tmp_path / "tsdb"
    raw = create_blocks(write_chunks(tmp_path / "om"), out, promtool=tool)
    rules = tmp_path / "recording.rules.yml"
    rules.write_text(RULES)
    start, end = DAY0 + DAY + 3600, DAY0 + DAY + 3 * 3600

    # into the raw blocks' own directory, as `backfill --tsdb DIR` does
    recorded = backfill_rules([rules], out, start, end, promtool=tool, prometheus=server,
                              eval_interval="60s", out_dir=out)

    assert recorded and not set(recorded) & set(raw)
    assert sorted(out.iterdir()) == sorted(raw + recorded), "no staging or serving left"
    with serve(raw + recorded, tmp_path / "prometheus") as url:
        [series] = instant(url, f"job:acsr_cases_concluded:sum[{end - start + 1}s]", end)
        samples = [(float(t), float(v)) for t, v in series["values"]]
        # evaluated as a live Prometheus would: every 60 s, offset by the group's hash
        assert len(samples) in (120, 121)
        assert all(round(b[0] - a[0], 3) == 60 for a, b in itertools.pairwise(samples))
        assert start <= samples[0][0] < start + 60 and samples[-1][0] <= end
        assert all(value == concluded(t) for t, value in samples)

        steps = range(start + 60, end + 1, 60)
        [(labels, points)] = query_range(url, "job:acsr_cases_concluded:sum",
                                         steps[0], steps[-1], 60)
        assert labels == {"__name__": "job:acsr_cases_concluded:sum"}
        assert [t for t, _ in points] == list(steps)
        for step, value in points:
            assert value == max(s for s in samples if s[0] <= step)[1]


@pytest.mark.parametrize(("rules", "says"), [
    (RULES + "      - alert: TooManyCases\n        expr: job:x > 1\n",
     ":6 is an alerting rule (TooManyCases)"),
    (RULES + "      - record: job:acsr_cases_concluded:double\n"
     "        expr: job:acsr_cases_concluded:sum * 2\n",
     ":7 reads job:acsr_cases_concluded:sum, recorded by the rule at"),
])
def test_rules_promtool_would_backfill_wrong_are_refused(tmp_path: Path, rules: str,
                                                          says: str) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    with pytest.raises(TsdbError, match=re.escape(says)):
        backfill_rules([path], tmp_path, 0, 3600, promtool="/nonexistent/promtool",
                       prometheus="/nonexistent/prometheus", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rule_backfill_needs_blocks_and_a_range(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(RULES)
    with pytest.raises(TsdbError, match="range is empty"):
        backfill_rules([path], tmp_path, 3600, 3600, promtool="promtool",
                       prometheus="prometheus", out_dir=tmp_path)
    with pytest.raises(TsdbError, match=f"no TSDB blocks in {tmp_path}"):
        backfill_rules([path], tmp_path, 0, 3600, promtool=promtool(),
                       prometheus="prometheus", out_dir=tmp_path)


def test_find_tool_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMTOOL", "/nonexistent/bin/promtool")
    with pytest.raises(TsdbError, match=r"PROMTOOL='/nonexistent/bin/promtool' is not an "
                       r"executable promtool"):
        find_tool("promtool", "PROMTOOL")

    monkeypatch.delenv("PROMTOOL")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TsdbError, match=r"promtool not found: install .*apt-get install "
                       r"prometheus\) or set PROMTOOL"):
        find_tool("promtool", "PROMTOOL")

    monkeypatch.setenv("PROMTOOL", shutil.which("true", path="/usr/bin:/bin") or "")
    assert find_tool("promtool", "PROMTOOL").endswith("/true")


def test_handover_text(tmp_path: Path) -> None:
    now = 1_800_000_000
    text = handover_text(tmp_path, now - 40 * DAY - 3600, now - 2 * DAY, now_s=now)
    assert all(len(line) <= 88 for line in text.splitlines() if str(tmp_path) not in line)
    old = " ".join(text.split())
    assert "--storage.tsdb.retention.time to at least 41d" in old
    assert "the default 15d would delete it" in old
    assert "/var/lib/prometheus/metrics2/" in old and "--storage.tsdb.path" in old
    assert "allow-overlapping-blocks is not needed" in old
    assert "newest 3 hours" in old and "WARNING" not in old

    recent = " ".join(handover_text(tmp_path, now - DAY, now - 3600, now_s=now).split())
    assert "at least 1d" in recent and "the default 15d keeps it 14 more days only" in recent
    assert "WARNING: these blocks reach" in recent

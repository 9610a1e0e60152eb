"""The exposition budget: what Prometheus scrapes from a group of two workers, on traffic
of the budget's shape (7 intents, 5 channels, 2 agent versions, 3 evaluation names, 6
actions, 2,000 cases), stays under 5,000 `acsr_` samples at 8 partitions and grows by at
most 10% from 4 partitions (docs/kpis.md, Labels). The render time is in `make bench`."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.tools.replay import run_replay

from .conftest import BrokerInfo
from .metrics_helpers import samples
from .traffic import WIDE, generate

pytestmark = pytest.mark.integration

BUDGET = 5_000


async def test_the_group_exposition_fits_the_budget_whatever_the_partition_count(
        kafka: BrokerInfo, tmp_path: Path) -> None:
    source = tmp_path / "wide.jsonl"
    source.write_bytes(b"\n".join(generate(2_000, seed=21, shape=WIDE)) + b"\n")
    scraped, reports = {}, {}
    for partitions in (4, 8):
        result = await run_replay(source, kafka.settings(partitions=partitions), workers=2,
                                  start_broker=False, log_dir=tmp_path / str(partitions))
        scraped[partitions], reports[partitions] = result.scraped_samples, result.report
        assert not any("partition" in labels for name, labels, _ in samples(result.metrics)
                       if not name.startswith(("acsr_consumer_lag", "acsr_window_cells")))
        print(f"{partitions} partitions, 2 workers: {result.scraped_samples:,} acsr_ samples")
    for figure in ("cases_concluded", "autonomous", "policy_checks", "actions", "csat_count"):
        assert reports[4]["totals"][figure] == reports[8]["totals"][figure]
    assert len(reports[8]["by_intent"]) >= 7  # the shape was really this wide
    assert scraped[8] <= BUDGET
    assert scraped[8] <= 1.10 * scraped[4]

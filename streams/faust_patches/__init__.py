"""Every change acsr-metrics makes to Faust's and aiokafka's behaviour, in one place.

`install_all(app, ...)` checks first that the installed Faust is the one the patches rely
on (checks.py), then installs them in the one order that works. Three of them wrap the
consumer's `seek_to_committed`, each around the one installed before it:

1. `seek_uncommitted_to_beginning` (innermost): a partition without a committed offset
   is sought to its beginning, so the wrappers outside see every partition's position;
2. `keep_seeks_over_stale_reads`: records the positions the seek set, so records fetched
   before it (stale) are dropped, never delivered;
3. `stop_when_offsets_vanish` (outermost): compares what the broker returned with the
   offsets this worker committed, and stops the worker if the broker lost them.

README.md in this folder lists each patch, the Faust or aiokafka symbol it changes, why,
and its test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import faust

from streams.faust_patches.checks import FaustPatchError, self_check
from streams.faust_patches.fixes import (
    Deliveries,
    commit_only_contiguous,
    complete_flushes,
    keep_seeks_over_stale_reads,
    seek_uncommitted_to_beginning,
    stop_when_offsets_vanish,
)
from streams.faust_patches.handover import BatchHandOver, hand_over_eagerly, hand_over_in_batches
from streams.faust_patches.tables import ends_from_fetches

__all__ = ["BatchHandOver", "Deliveries", "FaustPatchError", "install_all", "self_check"]


def install_all(app: faust.App, ordered_topics: Iterable[str],
                on_lost_offsets: Callable[[list[Any]], Awaitable[None]],
                changelog_ends: tuple[str, Mapping[str, Any]] | None = None,
                handovers: Iterable[BatchHandOver] = ()) -> Deliveries:
    """Patch a (not yet started) app's producer and consumer, in the order above.

    `ordered_topics`: the topics whose records the agents check for order (the result
    does); `changelog_ends`: (bootstrap, client options) to read changelog ends from fetch
    responses (the embedded broker, see tables.py); `handovers`: topics whose records
    go to their agent in whole batches (handover.py)."""
    self_check()
    complete_flushes(app.producer)  # offsets are committed only after every table write
    seek_uncommitted_to_beginning(app.consumer)  # no record skipped after a rebalance
    deliveries = keep_seeks_over_stale_reads(app.consumer, ordered_topics)  # nor re-read
    commit_only_contiguous(app.consumer)  # a commit never passes an unprocessed record
    hand_over_eagerly(app.consumer)  # no task per fetched record
    hand_over_in_batches(app, handovers)  # nor an event and a stream pass for most
    stop_when_offsets_vanish(app.consumer, on_lost_offsets)
    if changelog_ends is not None:
        ends_from_fetches(app.consumer, *changelog_ends)
    return deliveries

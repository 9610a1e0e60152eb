"""The group's exposition: every worker publishes its partitions' figures, one serves them.

    batch landed -> (every ACSR_GROUP_PUBLISH_S) snapshot of each changed owned partition
    -> group topic (one partition, compacted) -> every worker follows it (GroupState)
    -> the exporter (the owner of partition 0), at a scrape that finds the figures
       changed: admits new label values, stores them in the topic, renders
    -> /metrics/group

A snapshot is taken only between batches (under the partition's lock), when every write of
the last batch has been acknowledged, so it never holds a figure a crash could take back.
Every worker follows the topic, so a new exporter needs only to read to its end before it
serves: what it serves is then at least what the one before served (docs/architecture.md,
The group's exposition).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka import TopicPartition

from streams.config import Settings
from streams.kafka.reader import reader
from streams.metrics.exporter import GroupFigures, LabelBounds, render_group
from streams.metrics.group import (
    LABELS_KEY,
    GroupState,
    Snapshot,
    SnapshotError,
    labels_record,
    snapshot_key,
)
from streams.worker.topics import RAW

log = logging.getLogger("acsr_metrics")

FOLLOW_POLL_MS = 500
FOLLOW_RETRY_S = 2.0
CAUGHT_UP_AFTER_S = 0.5  # a read that found nothing this long after taking over: at the end
SEND_TIMEOUT_S = 30.0


async def keep_going(what: str, step: Callable[[], Awaitable[None]], retry_s: float) -> None:
    """Run `step` again and again until this task is cancelled. A task that ended would
    stop the group's exposition for good, so a failure is logged and `step` run again
    after `retry_s`: an exception, a send never acknowledged, and a CancelledError that
    client libraries let escape (aiokafka does) while nobody cancelled this task."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            log.warning("%s: a stray cancellation; again in %.0fs", what, retry_s)
        except Exception:
            log.exception("%s failed; again in %.0fs", what, retry_s)
        else:
            continue
        await asyncio.sleep(retry_s)


class GroupExport:
    """Publishes this worker's partitions, follows the group topic, serves the exposition
    while this worker is the exporter."""

    def __init__(self, app: faust.App, settings: Settings, client: dict[str, Any], *,
                 owned: Callable[[], set[int]], ready: Callable[[], bool],
                 lock: Callable[[int], asyncio.Lock],
                 snapshot: Callable[[int], Snapshot | None]
                 ) -> None:
        self.settings, self.client = settings, client
        self.owned, self.ready, self.lock, self.snapshot = owned, ready, lock, snapshot
        self.topic = app.topic(settings.group_topic, partitions=1, **RAW)
        self.state = GroupState()
        self.bounds = LabelBounds(settings.label_limit, settings.label_allow_lists())
        self.drops = settings.metric_drops
        self.changes: dict[int, int] = {}
        self.published: dict[int, int] = {}
        self.rendered, self.rendered_version = b"", -1
        self.rendering = asyncio.Lock()  # one rendering at a time, for concurrent scrapes
        self.exporter_since: float | None = None  # when this worker took the role over
        self.serving = False
        self.unreadable = 0
        self.render_s = 0.0  # how long the last rendering of the exposition took

    # --- publishing -------------------------------------------------------------------

    def changed(self, partition: int) -> None:
        self.changes[partition] = self.changes.get(partition, 0) + 1

    def forget(self, partitions: set[int]) -> None:
        """Revoked: if they come back, their first snapshot is sent again."""
        for partition in partitions:
            self.published.pop(partition, None)

    async def publish_every(self, interval_s: float) -> None:
        """Publish every `interval_s`, for as long as the worker runs (see `keep_going`)."""
        async def publish_then_wait() -> None:
            await self.publish()
            await asyncio.sleep(interval_s)

        await keep_going("publishing to the group topic", publish_then_wait, interval_s)

    async def publish(self) -> None:
        """Send a snapshot of each owned partition changed since its last one, taken under
        the partition's lock: between two batches, once the last one's writes were all
        acknowledged (a busy partition is waited for, not skipped: under load it is
        nearly always busy)."""
        if not self.ready():
            return
        for partition in sorted(self.owned()):
            change = self.changes.get(partition, 0)
            if self.published.get(partition) == change:
                continue
            async with self.lock(partition):
                if partition not in self.owned() or not self.ready():
                    continue  # revoked while its batch landed
                snapshot = self.snapshot(partition)
            if snapshot is None:
                continue
            await self._send(snapshot_key(partition), snapshot.to_bytes())
            self.published[partition] = change

    async def _send(self, key: bytes, value: bytes) -> None:
        """One record to the group topic, acknowledged within SEND_TIMEOUT_S (a send that
        never completes would stall the caller's loop for good)."""
        sent = await self.topic.send(key=key, value=value, partition=0, force=True)
        await asyncio.wait_for(sent, SEND_TIMEOUT_S)

    # --- following and serving --------------------------------------------------------

    async def follow(self) -> None:
        """Read the group topic from its start, for as long as the worker runs. After a
        failure (the broker away, a write refused) the topic is read again from its start:
        the state only takes maxima and admissions, so nothing counts twice, and nothing
        is served until the read is back at the end."""
        async def follow_from_start() -> None:
            self.exporter_since, self.serving = None, False
            await self._follow()

        await keep_going(f"following group topic {self.settings.group_topic}",
                         follow_from_start, FOLLOW_RETRY_S)

    async def _follow(self) -> None:
        tp = TopicPartition(self.settings.group_topic, 0)
        async with reader(self.settings.bootstrap_servers, client=self.client) as consumer:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while True:
                started = time.monotonic()
                batch = await consumer.getmany(tp, timeout_ms=FOLLOW_POLL_MS)
                for record in batch.get(tp, ()):
                    self.apply(record.key, record.value)
                await self.refresh(at_end=not batch, read_started=started)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        try:
            self.state.apply(key, value)
        except (SnapshotError, KeyError, TypeError, ValueError) as err:
            self.unreadable += 1
            log.warning("group topic %s: record %r skipped: %s", self.settings.group_topic,
                        key, err)

    def is_exporter(self) -> bool:
        """The owner of partition 0 of the cases topic, once its tables are recovered."""
        return 0 in self.owned() and self.ready()

    async def refresh(self, at_end: bool, read_started: float) -> None:
        if not self.is_exporter():
            self.exporter_since, self.serving = None, False
            return
        if self.exporter_since is None:
            self.exporter_since = time.monotonic()
        if not self.serving:
            # Serve only once the topic was read to its end by a read begun after the
            # takeover: then this view holds all the previous exporter served.
            self.serving = at_end and read_started >= self.exporter_since + CAUGHT_UP_AFTER_S

    def serves(self) -> bool:
        return self.serving and self.is_exporter()

    async def exposition(self) -> bytes:
        """What /metrics/group serves: the group's figures, or nothing on other workers.
        Rendered when a scrape finds the figures changed since the last rendering, not on
        every change: rendering costs tens of milliseconds, scrapes come every 15-30 s."""
        if not self.serves():
            return b""
        async with self.rendering:
            if self.state.version != self.rendered_version:
                await self._render()
        return self.rendered

    async def _render(self) -> None:
        version = self.state.version
        total = self.state.total()
        # Admit into a copy: the state holds only values the topic acknowledged.
        self.bounds.admitted = {k: list(v) for k, v in self.state.admitted.items()}
        new = self.bounds.admit(self.state.label_values(total))
        if new:  # stored before any series shows them, so every exporter keeps them
            await self._send(LABELS_KEY, labels_record(self.bounds.admitted))
            unchanged = self.state.version == version  # no snapshot came meanwhile
            self.state.admit(new)
            version = self.state.version if unchanged else version
        figures = GroupFigures(total, self.state.group_windows(), len(self.state.figures))
        begun = time.monotonic()
        self.rendered = render_group(figures, self.bounds, self.drops)
        self.rendered_version = version
        self.render_s = time.monotonic() - begun

"""Window cells in Faust tumbling windowed tables; closed windows published exactly once.

One windowed table per size (`windows-<size>s`), keyed by (events partition, intent,
agent_version) and the window, each value a `Cell` as JSON bytes. Every key is written
only while an event of its own partition is processed, so every write lands on the
changelog partition of that event, like the `cases` table. The rules (folding, closing,
lateness, retention, the message) are in streams/core/windows.py; this module does the I/O:

- **Folding**: an event's windowed facts are written to their cells, and the writes are
  acknowledged by the broker *before* the case write that records the event. A
  redelivered event whose case write landed is skipped whole (its cells landed before);
  one whose case write was lost is folded again, and each cell's stored offset skips it
  where the cell already holds it.
- **Closing**: by the partition's event time (the ledger's watermark), never the wall
  clock. Faust's own expiry (`expires=`) is wall-clock and also forgets keys recovered
  from the changelog, so it is not used: windows are deleted here (tombstones) once the
  partition's event time is `window_retention_s` past their end, recovered ones included.
- **Emission**: a closed cell is sent to the windows topic (partition = events partition,
  deterministic key), acknowledged, then marked emitted in its table. A crash between the
  two is covered by the annotation queue's resend guard (streams/kafka/reader.py): the
  first time a session emits on a partition, it reads that windows partition back to the
  first events offset it processed and does not send again what is already there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import faust
import orjson
from aiokafka import ConsumerRecord

from streams.config import Settings
from streams.core.annotations import HORIZON_HEADER, TailRecord
from streams.core.ledger import BatchPlan
from streams.core.windows import (
    SCHEMA_VERSION,
    Cell,
    PartitionWindows,
    WindowKey,
    WindowPolicy,
    WindowRules,
    aggregate_rows,
    closed_message,
    encode,
    message_key,
)
from streams.faust_patches.tables import AcknowledgedTable
from streams.kafka.reader import ResendGuards

log = logging.getLogger("acsr_metrics")

WINDOW_REASON = "window"  # the resend guard's second key part for window messages


def window_tail_record(record: ConsumerRecord) -> TailRecord | None:
    """The resend guard's view of a window message (None for anything else)."""
    try:
        message = orjson.loads(record.value or b"")
        if message.get("schema_version") != SCHEMA_VERSION:
            return None
        horizon = int(dict(record.headers or ()).get(HORIZON_HEADER, b"-1"))
        return TailRecord(record.key.decode(), WINDOW_REASON,
                          int(message["source"]["offset"]), horizon)
    except (orjson.JSONDecodeError, AttributeError, ValueError, KeyError, TypeError):
        return None


class WindowTables:
    """The windowed tables of one worker and the in-memory view of its owned partitions."""

    def __init__(self, app: faust.App, settings: Settings, policy: WindowPolicy,
                 watermark: Callable[[int], int | None],
                 client: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.rules = WindowRules(policy, settings.window_retention_s)
        self.watermark = watermark  # the partition's event time (the ledger's)
        self.client = client or {}
        self.tables: dict[int, AcknowledgedTable] = {}
        self.windowed: dict[int, Any] = {}
        for size in policy.sizes_s:
            table = AcknowledgedTable(
                app, name=f"windows-{size}s", beacon=app.tables.beacon,
                partitions=settings.partitions, value_type=bytes,
                help=f"KPI cells of {size}-second event-time windows",
                # Compacted only: windows are deleted here by event time (tombstones), and
                # broker-side time retention could drop a window that is still open.
                extra_topic_configs={"cleanup.policy": "compact"})
            app.tables.add(table)
            self.tables[size] = table
            self.windowed[size] = table.tumbling(size)  # no `expires`: see the module doc
        self.topic = app.topic(settings.windows_topic, partitions=settings.partitions,
                               key_serializer="raw", value_serializer="raw")
        self.partitions: dict[int, PartitionWindows] = {}
        self.first_offsets: dict[int, int] = {}  # first events offset of this session
        self.guards = ResendGuards(settings, settings.windows_topic, self.client,
                                   parse=window_tail_record)
        self.resends_prevented = 0

    # --- the view of owned partitions -------------------------------------------------

    def build(self, partitions: set[int]) -> None:
        """Load these partitions' cells from the (recovered) tables, once."""
        unbuilt = partitions - self.partitions.keys()
        if not unbuilt:
            return
        for partition in unbuilt:
            self.partitions[partition] = PartitionWindows(partition, self.rules)
        for size, table in self.tables.items():
            for ((partition, intent, version), (start, _)), raw in table.items():
                if partition in unbuilt:
                    self.partitions[partition].load(
                        WindowKey(size, int(start), intent, version), Cell.from_bytes(raw))

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: their new owner loads them from its tables."""
        for partition in partitions:
            self.partitions.pop(partition, None)
            self.first_offsets.pop(partition, None)
            self.guards.forget((partition,))

    def reload(self, partitions: set[int]) -> None:
        """Tables were recovered (a start or a rebalance): the views of these partitions
        from them, and none of others."""
        self.partitions.clear()
        self.build(partitions)

    def built(self, partitions: set[int]) -> bool:
        return partitions <= self.partitions.keys()

    def rows(self, partition: int) -> list[list[Any]]:
        """The partition's windows as `Aggregate.windows` JSON rows (for /kpis/)."""
        windows = self.partitions.get(partition)
        return aggregate_rows(windows.cells.items()) if windows is not None else []

    # --- processing -------------------------------------------------------------------

    def _session(self, partition: int, offset: int) -> PartitionWindows:
        # Below the first offset seen means a redelivery began (a rebalance seeks back to
        # the committed offsets): the resend guard must be read again from there.
        first = self.first_offsets.get(partition)
        if first is None or offset < first:
            self.first_offsets[partition] = offset
            self.guards.forget((partition,))
        self.build({partition})
        return self.partitions[partition]

    def fold(self, plan: BatchPlan) -> None:
        """Write a planned batch's windowed facts to their cells, each cell once; call
        before the batch's case writes and await `acknowledged` (see the module doc)."""
        partition = plan.partition
        windows = self._session(partition, plan.first)
        changed: set[WindowKey] = set()
        for applied in plan.applied:
            changed.update(windows.fold(applied.offset, applied.event.ts_us, applied.step.late,
                                        applied.step.facts))
        for key in changed:
            self._write(partition, key, windows.cells[key])

    async def advance(self, partition: int, offset: int) -> None:
        """After a batch (redelivered ones too) up to `offset`: publish what closed, drop
        what expired."""
        windows = self._session(partition, offset)
        watermark = self.watermark(partition)
        closing = windows.closing(watermark)
        if closing:
            await self._emit(partition, offset, windows, closing)
        expiring = windows.expiring(watermark)
        for key in expiring:
            del self.windowed[key.size].relative_to(float(key.start))[
                (partition, key.intent, key.agent_version)]
        windows.drop(expiring)
        # Emission marks and deletes need no wait: Faust commits this batch's offsets only
        # once they reached the broker, and until then the resend guard covers a crash.
        for table in self.tables.values():
            table.settle()

    async def _emit(self, partition: int, offset: int, windows: PartitionWindows,
                    closing: list[WindowKey]) -> None:
        guard = await self.guards.get(partition, self.first_offsets[partition])
        source = {"topic": self.settings.cases_topic, "partition": partition, "offset": offset}
        headers = [(HORIZON_HEADER, str(guard.horizon).encode())]
        acks = []
        for key in closing:
            wire_key = message_key(partition, key)
            if guard.already_sent(wire_key.decode(), WINDOW_REASON):
                self.resends_prevented += 1
                continue
            value = encode(closed_message(partition, key, windows.cells[key], source))
            acks.append(await self.topic.send(key=wire_key, value=value, partition=partition,
                                              headers=headers, force=True))
        for ack in acks:
            await ack
        for key in closing:  # only once every message is acknowledged
            self._write(partition, key, windows.mark_emitted(key))

    def _write(self, partition: int, key: WindowKey, cell: Cell) -> None:
        # The window is chosen by the cell's own event time, never the message timestamp.
        self.windowed[key.size].relative_to(float(key.start))[
            (partition, key.intent, key.agent_version)] = cell.to_bytes()

    async def acknowledged(self, partition: int) -> None:
        """Wait until every cell of `partition` written so far has reached the broker."""
        for table in self.tables.values():
            await table.acknowledged(partition)

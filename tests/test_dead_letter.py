"""Invalid messages reach the dead-letter topic unchanged, with their reason."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from streams.tools.replay import run_replay
from streams.worker.app import REASON_HEADER

from .conftest import BrokerInfo

pytestmark = pytest.mark.integration

VALID = {"event_id": "e-1", "type": "case_opened", "case_id": "c-1", "ts": 1795352400000}
INVALID = {
    b"not json at all": "not_json",
    b"[1, 2, 3]": "not_object",
    b'{"event_id":"x","type":"case_opened","ts":1}': "missing_field",
    b'{"event_id":"x","type":"warp","case_id":"c","ts":1}': "unknown_type",
    b'{"event_id":"x","type":"case_opened","case_id":"c","ts":"yesterday"}': "bad_ts",
    b'{"event_id":"x","type":"csat_submitted","case_id":"c","ts":1,"score":9}': "bad_field",
    b'{"event_id":"x","type":"case_opened","case_id":"c","ts":1,"schema_version":2}':
        "bad_schema_version",
}


async def test_invalid_messages_go_to_the_dead_letter_topic(kafka: BrokerInfo, tmp_path: Path
                                                            ) -> None:
    lines = [orjson.dumps(VALID), *INVALID]
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    settings = kafka.settings(partitions=2)

    result = await run_replay(source, settings, start_broker=False, log_dir=tmp_path)

    assert result.report["events"]["valid"] == 1
    assert result.report["events"]["invalid_by_reason"] == {
        reason: 1 for reason in INVALID.values()
    }
    consumer = AIOKafkaConsumer(result.settings.dlq_topic, bootstrap_servers=kafka.bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        seen: dict[bytes, str] = {}
        while len(seen) < len(INVALID):
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, f"dead-letter topic has only {len(seen)} of {len(INVALID)} messages"
            for records in batch.values():
                for record in records:
                    seen[record.value] = dict(record.headers)[REASON_HEADER].decode()
    finally:
        await consumer.stop()
    assert seen == INVALID

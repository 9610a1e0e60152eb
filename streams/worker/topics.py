"""The worker's topics, declared once from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust

from streams.config import Settings

RAW = {"key_serializer": "raw", "value_serializer": "raw"}  # our own bytes, as sent


@dataclass(frozen=True)
class Topics:
    events: Any  # what producers send
    cases: Any  # where cases live: `events`, or (partitioner `repartition`) re-keyed events
    links: Any  # re-engagements, on the partition of the earlier case
    dlq: Any  # invalid events and events that failed processing
    annotations: Any  # items of events partition p go to annotation partition p
    source_times: Any | None  # `repartition`: each events partition's forwarded event time


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    partitions = settings.partitions
    events = app.topic(settings.events_topic, partitions=partitions, **RAW)
    cases = (app.topic(settings.repartition_topic, partitions=partitions, internal=True, **RAW)
             if settings.repartitions else events)
    return Topics(
        events=events,
        cases=cases,
        links=app.topic(settings.links_topic, partitions=partitions, internal=True, **RAW),
        dlq=app.topic(settings.dlq_topic, **RAW),
        annotations=app.topic(settings.annotation_topic, partitions=partitions, **RAW),
        source_times=(app.topic(settings.source_times_topic, **RAW)
                      if settings.repartitions else None),
    )

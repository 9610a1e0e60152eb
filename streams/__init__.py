"""acsr-metrics: real-time KPIs for autonomous customer-support AI agents.

For producers: `from streams import Publisher` (see streams/kafka/publisher.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["InvalidEventError", "Publisher", "__version__", "build_event"]

if TYPE_CHECKING:
    from streams.kafka.publisher import InvalidEventError, Publisher, build_event


def __getattr__(name: str) -> Any:
    """The publisher API, imported on first use: the command line need not load Kafka
    clients just to print its version."""
    if name in ("InvalidEventError", "Publisher", "build_event"):
        from streams.kafka import publisher

        return getattr(publisher, name)
    raise AttributeError(f"module 'streams' has no attribute {name!r}")

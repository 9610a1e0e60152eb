"""Faust's hand-over of each fetched record, without a task per record (faust-streaming
0.15); written so it could be offered upstream.

Faust's fetch loop hands each record to the streams with
`await consumer.wait_first(callback(message), consumer.suspend_flow.wait())`: the
callback races a flow stop (a rebalance). mode's `wait_first` wraps each of the two
coroutines, and the service's stopped and crashed events, in a task of its own, and
waits on all four; the callback almost always finishes at once (it puts the event on a
stream's queue). Measured on the busy worker, that race took about a tenth of the main
thread (docs/performance.md).

`hand_over_eagerly(consumer)` runs the callback at once instead, up to its first real
wait; only a callback that does wait (a full stream queue, flow control) becomes a task
and races the flow stop as before. While the flow is stopped, or the consumer is
stopping, Faust's own race runs unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


class _Rest:
    """The rest of a coroutine that ran outside any task until it first yielded
    `pending`: awaited in a task, it goes on from there as if it had run in that task."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # cancellation and the like: the coroutine's
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return done.value


async def _finish(coro: Coroutine[Any, Any, Any], pending: Any) -> Any:
    return await _Rest(coro, pending)


def hand_over_eagerly(consumer: Any) -> None:
    """Patch a (not yet started) Faust consumer: see the module doc."""
    race = consumer.wait_first
    if getattr(race, "eager", False):
        return
    suspended = consumer.suspend_flow.is_set
    stopped, crashed = consumer._stopped.is_set, consumer._crashed.is_set

    async def wait_first(*coros: Any, timeout: Any = None) -> Any:
        callback = coros[0] if len(coros) == 2 and timeout is None else None
        if (not isinstance(callback, Coroutine) or suspended() or stopped()
                or crashed()):
            return await race(*coros, timeout=timeout)
        try:
            pending = callback.send(None)
        except StopIteration:
            coros[1].close()  # the flow-stop wait, never started
            return None
        except BaseException:
            coros[1].close()
            raise
        return await race(asyncio.ensure_future(_finish(callback, pending)), coros[1])

    wait_first.eager = True  # type: ignore[attr-defined]
    consumer.wait_first = wait_first

"""The patch layer as a whole (streams/faust_patches/): the start-up self-check, the order
`install_all` installs the patches in, and the two patches without a test of their own."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from types import SimpleNamespace
from typing import Any

import faust
import faust.transport.consumer
import pytest

from streams.faust_patches import FaustPatchError, install_all, self_check
from streams.faust_patches import checks as checks_module
from streams.faust_patches.checks import RELIANCES, problems
from streams.faust_patches.fixes import complete_flushes, seek_uncommitted_to_beginning


def test_the_installed_faust_is_the_one_the_patches_rely_on() -> None:
    assert problems() == []
    self_check()
    assert {r.patch for r in RELIANCES} >= {
        "complete_flushes", "seek_uncommitted_to_beginning", "keep_seeks_over_stale_reads",
        "commit_only_contiguous", "stop_when_offsets_vanish", "hand_over_eagerly",
        "ends_from_fetches", "AcknowledgedTable", "writes_on", "hand_over_in_batches"}


def _not_calling_new_offset(self: Any, *args: Any) -> None:
    """A Faust whose commit no longer asks `_new_offset` where to commit."""


def test_a_faust_that_stops_calling_a_patched_method_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faust.transport.consumer.Consumer, "_filter_committable_offsets",
                        _not_calling_new_offset)
    found = problems()
    assert len(found) == 1
    assert "commit_only_contiguous" in found[0] and "self._new_offset(" in found[0]
    with pytest.raises(FaustPatchError, match="commit_only_contiguous"):
        self_check()
    app = faust.App(f"t-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:1")
    with pytest.raises(FaustPatchError):
        install_all(app, (), _never)


def test_another_version_is_refused_naming_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = checks_module.metadata.version
    monkeypatch.setattr(checks_module.metadata, "version",
                        lambda name: "0.16.0" if name == "faust-streaming" else real(name))
    assert problems() == [
        "faust-streaming 0.16.0 is installed, the patches are tested with 0.15.3 (pinned in "
        "pyproject.toml): install faust-streaming==0.15.3, or re-test every patch "
        "(streams/faust_patches/README.md)"]


def test_the_worker_does_not_start_on_a_faust_the_patches_do_not_fit() -> None:
    """Exit code 4 and the patch named, before the broker is even contacted (an
    unreachable broker would exit 3)."""
    code = ("import faust.transport.consumer as c\n"
            "c.Consumer._filter_committable_offsets = lambda self, *a: None\n"
            "from streams.tools.cli import main\n"
            "raise SystemExit(main(['worker', '--broker', '127.0.0.1:1']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 4, done.stderr
    assert "commit_only_contiguous" in done.stderr
    assert "the worker does not start" in done.stderr


async def _never(lost: list[Any]) -> None:
    raise AssertionError("no offsets lost here")


def test_install_all_wraps_seek_to_committed_in_the_documented_order() -> None:
    app = faust.App(f"t-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:1")
    install_all(app, {"events"}, _never)
    consumer = app.consumer
    assert consumer._seeks_uncommitted and consumer._commits_contiguous
    assert consumer._watches_offsets and app.producer.buffer._complete_flush
    # outermost the lost-offsets check, then the stale-read tracking, then the seek of
    # uncommitted partitions around Faust's own
    chain = []
    wrapper = consumer.seek_to_committed
    while wrapper.__name__ != "seek_to_committed":
        chain.append(wrapper.__name__)
        wrapper = _wrapped(wrapper)
    assert chain == ["check_committed", "tracked_seek_to_committed", "seek_all_to_committed"]


def _wrapped(wrapper: Any) -> Any:
    """The function a patch's wrapper calls (its closure's `seek_to_committed`)."""
    cells = dict(zip(wrapper.__code__.co_freevars, wrapper.__closure__, strict=True))
    return cells["seek_to_committed"].cell_contents


# --- complete_flushes ------------------------------------------------------------------------


async def test_a_flush_waits_for_the_send_in_flight() -> None:
    """Faust's buffer counts a message as flushed when it leaves the queue, before the send
    returns: a commit could pass a table write still on its way. Patched, flush() returns
    only once every send finished."""
    release = asyncio.Event()
    sent: list[str] = []

    async def send_pending(message: str) -> None:
        await release.wait()
        sent.append(message)

    buffer = SimpleNamespace(_send_pending=send_pending, size=0, state="running")
    complete_flushes(SimpleNamespace(buffer=buffer))
    sending = asyncio.ensure_future(buffer._send_pending("write"))
    await asyncio.sleep(0.01)
    flushing = asyncio.ensure_future(buffer.flush())
    await asyncio.sleep(0.05)
    assert not flushing.done()  # the send is in flight
    release.set()
    await asyncio.wait_for(flushing, 1)
    await sending
    assert sent == ["write"]
    complete_flushes(SimpleNamespace(buffer=buffer))  # installing twice changes nothing
    assert buffer._send_pending.__name__ == "tracked_send"


async def test_a_flush_of_a_stopped_buffer_with_messages_fails() -> None:
    async def send_pending(message: str) -> None:
        pass

    buffer = SimpleNamespace(_send_pending=send_pending, size=2, state="stopping")
    complete_flushes(SimpleNamespace(buffer=buffer))
    with pytest.raises(RuntimeError, match="not Running"):
        await buffer.flush()


# --- seek_uncommitted_to_beginning ----------------------------------------------------------


async def test_partitions_without_a_committed_offset_are_sought_to_their_beginning() -> None:
    """aiokafka seeks only partitions with a committed offset above 0; the others would
    start wherever the fetcher was. Patched, they start at their earliest offset."""
    sought: list[tuple[str, int]] = []

    async def seek_to_committed() -> dict[str, int | None]:
        return {"p0": 5, "p1": -1, "p2": None, "p3": 0}

    async def earliest_offsets(*tps: str) -> dict[str, int]:
        return {"p1": 3, "p2": 0, "p3": 7}

    async def seek(tp: str, offset: int) -> None:
        sought.append((tp, offset))

    consumer = SimpleNamespace(seek_to_committed=seek_to_committed,
                               earliest_offsets=earliest_offsets, seek=seek)
    seek_uncommitted_to_beginning(consumer)
    assert await consumer.seek_to_committed() == {"p0": 5, "p1": -1, "p2": None, "p3": 0}
    assert sorted(sought) == [("p1", 3), ("p2", 0), ("p3", 7)]

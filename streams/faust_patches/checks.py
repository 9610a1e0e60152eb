"""The start-up self-check: the installed Faust and aiokafka still are what the patches of
this folder were written and tested against.

A patch replaces a method that Faust calls from elsewhere; if a new Faust release stops
calling it, the patch silently does nothing and the figures stop being exact. So each
patch names the Faust code it relies on (a method, and what that method must still do),
and the worker refuses to start when one is gone. On an upgrade, the message names the
patch and its test to run again (README.md in this folder).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import import_module, metadata

# The versions every patch is tested with (pinned in pyproject.toml).
TESTED_VERSIONS = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}


class FaustPatchError(RuntimeError):
    """Faust or aiokafka is not what the patches rely on: the worker does not start."""


@dataclass(frozen=True)
class Reliance:
    """`caller` (module:Class.method) must still contain `calls`, for `patch` to work."""

    patch: str
    caller: str
    calls: str
    test: str

    def holds(self) -> bool:
        module, _, path = self.caller.partition(":")
        target: object = import_module(module)
        try:
            for name in path.split("."):
                target = getattr(target, name)
            target = getattr(target, "fun", target)  # a mode Service.task wraps its function
            source = inspect.getsource(target)  # type: ignore[arg-type]
        except (AttributeError, OSError, TypeError):
            return False
        return self.calls in source


C = "faust.transport.consumer:Consumer"
PATCHES, FIXES = "tests/test_faust_patches.py", "tests/test_faust_fixes.py"
HANDOVER, TABLES = "tests/test_faust_handover.py", "tests/test_faust_batches.py"
# patch, the Faust code it relies on, what that code must still call, the patch's test
RELIANCES = tuple(Reliance(*row) for row in (
    ("complete_flushes", "faust.transport.producer:ProducerBuffer._handle_pending",
     "self._send_pending", PATCHES),
    ("seek_uncommitted_to_beginning", f"{C}.perform_seek", "self.seek_to_committed()", PATCHES),
    ("keep_seeks_over_stale_reads", f"{C}._drain_messages", "self.getmany", FIXES),
    ("keep_seeks_over_stale_reads", f"{C}._drain_messages", "self._add_gap(", FIXES),
    ("keep_seeks_over_stale_reads", f"{C}.perform_seek", "self._read_offset", FIXES),
    ("commit_only_contiguous", f"{C}._filter_committable_offsets", "self._new_offset(", FIXES),
    ("stop_when_offsets_vanish", f"{C}._commit_offsets", "self._commit(", FIXES),
    ("hand_over_eagerly", f"{C}._drain_messages", "self.wait_first(", HANDOVER),
    ("hand_over_in_batches", "faust.transport.conductor:Conductor._update_callback_map",
     "self._build_handler(", HANDOVER),
    ("hand_over_in_batches", "faust.transport.conductor:Conductor._compile_message_handler",
     "get_callback_for_tp(message.tp)", HANDOVER),
    ("hand_over_in_batches", "faust.app.base:App._on_partitions_revoked",
     "self.flow_control.clear", HANDOVER),
    ("hand_over_in_batches", f"{C}.ack", "acked_for_tp.append(offset)", HANDOVER),
    ("hand_over_in_batches", f"{C}.track_message", "self._unacked_messages.add(", HANDOVER),
    ("hand_over_in_batches", f"{C}.wait_empty", "self._unacked_messages", HANDOVER),
    ("hand_over_in_batches", "faust.app.base:App._on_partitions_revoked",
     "self._consumer_wait_empty", HANDOVER),
    ("ends_from_fetches", "faust.tables.recovery:Recovery._build_highwaters",
     "consumer.highwaters(", TABLES),
    ("AcknowledgedTable", "faust.tables.table:Table.on_key_set", "self.send_changelog(", TABLES),
    ("AcknowledgedTable", "faust.tables.table:Table.on_key_del", "self.send_changelog(", TABLES),
    ("writes_on", "faust.tables.base:Collection.partition_for_key", "current_event()", TABLES),
    ("writes_on", "faust.streams:current_event", "_current_event.get(", TABLES),
))


def problems(reliances: tuple[Reliance, ...] = RELIANCES) -> list[str]:
    """What is not as the patches expect, one sentence each (empty: all is well)."""
    found = []
    for package, tested in TESTED_VERSIONS.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "none"
        if installed != tested:
            found.append(f"{package} {installed} is installed, the patches are tested with "
                         f"{tested} (pinned in pyproject.toml): install {package}=={tested}, "
                         "or re-test every patch (streams/faust_patches/README.md)")
    for reliance in reliances:
        if not reliance.holds():
            found.append(f"patch {reliance.patch} relies on {reliance.caller} calling "
                         f"{reliance.calls!r}, which it no longer does: re-test it "
                         f"({reliance.test}) and adapt it to this Faust")
    return found


def self_check() -> None:
    """Raise FaustPatchError naming every broken reliance: never run unpatched."""
    found = problems()
    if found:
        raise FaustPatchError("Faust is not what acsr-metrics' patches rely on, so the "
                              "worker does not start:\n- " + "\n- ".join(found))

"""When a worker counts itself as recovering: Faust's own flags, driven as a rebalance
drives them."""

from __future__ import annotations

import faust

from streams.worker.app import tables_recovering


def test_a_worker_is_recovering_in_every_rebalance_until_its_recovery_is_done() -> None:
    app = faust.App("recovery-state", broker="kafka://127.0.0.1:9", store="memory://")
    assert tables_recovering(app)  # before the first assignment
    app.on_rebalance_start()
    app.tables.recovery.completed.set()  # what Faust does when the first recovery ends
    app.on_rebalance_end()
    assert not tables_recovering(app)
    # A later rebalance: Faust never clears `completed`, yet the tables of the partitions
    # just assigned are being read from their changelogs until the recovery ends.
    app.on_rebalance_start()
    assert app.tables.recovery.completed.is_set()
    assert tables_recovering(app)
    app.on_rebalance_end()
    assert not tables_recovering(app)

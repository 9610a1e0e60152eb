"""The pure core: the event contract, the case state machine, the KPI rules, windows,
annotation items and the per-partition ledger. No Faust, no Kafka, no I/O: every rule is
tested in milliseconds, and the worker, the tools and any future backfill share it.
`tests/test_layout.py` enforces that it imports nothing of ours outside `streams.core`."""

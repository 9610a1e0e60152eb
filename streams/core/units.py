"""Event time is kept in integer microseconds since the epoch (exact, and orjson-fast)."""

SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US

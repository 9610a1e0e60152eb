"""Table values are exact-size copies of their JSON."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from streams.core.state_bytes import dump_state

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_the_bytes_are_orjsons(value: object) -> None:
    assert dump_state(value) == orjson.dumps(value)
    assert orjson.loads(dump_state(value)) == orjson.loads(orjson.dumps(value))


def _resident_kb() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])


def test_stored_values_cost_about_their_length_in_memory() -> None:
    state = {"ids": [f"case-7-000123-{i}" for i in range(30)], "facts": [
        ["cost", [], 0.01 * i, ["billing", "web", "v7"], None, []] for i in range(12)]}
    size = len(dump_state(state))
    before = _resident_kb()
    kept = [dump_state(state) for _ in range(20_000)]
    per_value = (_resident_kb() - before) * 1024 / len(kept)
    # orjson's own result keeps its work buffer (about 4 KB, measured) for as long as a
    # table keeps the value.
    assert per_value < size + 512, (per_value, size)

"""The bundled copy of the worked example must be the contract's own."""

import pytest

from .conftest import DATA, SHARED_SPEC


@pytest.mark.parametrize("name", ["sample/events.jsonl", "sample/expected-report.json",
                                  "compare_report.py"])
def test_bundled_sample_matches_shared_spec(name: str) -> None:
    shared = SHARED_SPEC / name
    if not shared.exists():
        pytest.skip(f"{shared} is not beside this checkout")
    assert (DATA / name).read_bytes() == shared.read_bytes()

"""``history.records.iso`` renders a time as ``datetime`` would, without importing it."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.history.records import epoch, iso


def _reference(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False))
def test_iso_as_datetime_renders_it(ts: float) -> None:
    assert iso(ts) == _reference(ts)


def test_iso_rounding_edges() -> None:
    for ts in (0.0, 1.0, 1.9995, 1.9999995, 1796572545.0005, 1796572545.9999996, 59.9999999):
        assert iso(ts) == _reference(ts), ts
    assert abs(epoch(iso(1796572545.123)) - 1796572545.123) < 1e-6

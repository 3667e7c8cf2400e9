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


def _epoch_reference(text: str) -> float:
    value = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    dt = datetime.fromisoformat(value)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=-30610224000, max_value=253402300799, allow_nan=False))
def test_epoch_of_iso_as_datetime_computes_it(ts: float) -> None:
    text = _reference(ts)
    assert epoch(text) == _epoch_reference(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789-T:.Zz +", min_size=20, max_size=26))
def test_epoch_refuses_or_agrees(text: str) -> None:
    _agrees(text)


def _agrees(text: str) -> None:
    """``epoch`` refuses what ``datetime`` refuses and agrees with it on the rest."""
    try:
        want: float | None = _epoch_reference(text.strip())
    except ValueError:
        want = None
    try:
        got: float | None = epoch(text)
    except ValueError:
        got = None
    assert got == want, text


def test_epoch_edges() -> None:
    for text in ("2024-02-29T23:59:59.999Z", "2023-02-29T00:00:00.000Z", "1970-01-01T00:00:00.000Z",
                 "2000-12-31T12:00:00.500z", "2026-13-01T00:00:00.000Z", "0001-01-01T00:00:00.000Z"):  # fmt: skip
        _agrees(text)

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.pki import rotation_state as rs
from dispatcher.pki.rotation_state import RotationState
from dispatcher.statewrite import LocalWriter

T0 = 1_900_000_000.0  # 2030-03-17T17:46:40Z


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class _H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("ctrl-exec")
    h, old = _H(), log.level
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    yield records
    log.removeHandler(h)
    log.setLevel(old)


class RecordingWriter(LocalWriter):
    def __init__(self) -> None:
        self.calls: list[tuple[Path, int]] = []

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        self.calls.append((Path(path), mode))
        super().write(path, data, mode)


def test_iso_helpers() -> None:
    assert rs.format_iso(T0) == "2030-03-17T17:46:40Z"
    assert rs.parse_iso("2030-03-17T17:46:40Z") == T0
    for bad in ["", "2030-03-17 17:46:40", "2030-03-17T17:46:40", "yesterday"]:
        assert rs.parse_iso(bad) is None


def test_new_state() -> None:
    s = RotationState.new("abc1", "def2", 30, now=T0)
    assert s.rotated_at == "2030-03-17T17:46:40Z"
    assert s.overlap_expires == "2030-04-16T17:46:40Z"
    assert s.overlap_expires_at() == T0 + 30 * 86400
    assert s.to_json() == {
        "current_serial": "abc1",
        "previous_serial": "def2",
        "rotated_at": "2030-03-17T17:46:40Z",
        "overlap_expires": "2030-04-16T17:46:40Z",
        "overlap_days": 30,
    }


def test_save_load_roundtrip_mode_and_writer(tmp_path: Path) -> None:
    path = tmp_path / "state" / "rotation.json"
    w = RecordingWriter()
    s = RotationState.new("abc1", "", 7, now=T0)
    rs.save(s, path, w)
    assert w.calls == [(path, 0o640)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert rs.load(path) == s
    assert os.listdir(path.parent) == ["rotation.json"]  # no temp file left
    assert json.loads(path.read_text())["previous_serial"] == ""


def test_retired_drops_previous_serial(tmp_path: Path) -> None:
    path = tmp_path / "rotation.json"
    s = RotationState.new("abc1", "def2", 30, now=T0).retired(now=T0 + 31 * 86400)
    rs.save(s, path, LocalWriter())
    data = json.loads(path.read_text())
    assert "previous_serial" not in data
    assert data["previous_retired"] == "2030-04-17T17:46:40Z"
    loaded = rs.load(path)
    assert loaded is not None and loaded.previous_serial is None
    assert not loaded.retirement_due(now=T0 + 40 * 86400)


def test_loads_upstream_file_and_keeps_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "rotation.json"
    path.write_text(
        '{"overlap_days":30,"current_serial":"0f","previous_serial":"0e",'
        '"rotated_at":"2030-03-17T17:46:40Z","overlap_expires":"2030-04-16T17:46:40Z",'
        '"future_key":[1]}'
    )
    s = rs.load(path)
    assert s is not None and s.current_serial == "0f" and s.overlap_days == 30
    rs.save(s.retired(now=T0), path, LocalWriter())
    data = json.loads(path.read_text())
    assert data["future_key"] == [1] and "previous_serial" not in data


def test_missing_file_is_none_without_error(
    tmp_path: Path, logged: list[logging.LogRecord]
) -> None:
    assert rs.load(tmp_path / "nope.json") is None
    assert logged == []


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b"[1,2]",
        b'"str"',
        b'{"current_serial": 5}',
        b'{"current_serial": "a", "overlap_days": "x"}',
        b'{"current_serial": "a", "overlap_days": true}',
        b'{"current_serial": "a", "previous_serial": 7}',
    ],
)
def test_corrupt_file_logs_error(
    tmp_path: Path, logged: list[logging.LogRecord], content: bytes
) -> None:
    path = tmp_path / "rotation.json"
    path.write_bytes(content)
    assert rs.load(path) is None
    errors = [r for r in logged if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("ACTION=rotation-state-corrupt ")


def test_overlap_over_boundaries() -> None:
    s = RotationState.new("a", "b", 1, now=T0)
    end = T0 + 86400
    assert not s.overlap_over(now=end - 1)
    assert not s.overlap_over(now=end)  # upstream: strictly after
    assert s.overlap_over(now=end + 1)
    assert s.retirement_due(now=end + 1)
    assert not RotationState.new("a", "", 1, now=T0).retirement_due(now=end + 1)


def test_unparseable_expiry_never_over() -> None:
    s = RotationState("a", "b", "x", "garbage", 30)
    assert not s.overlap_over(now=T0 * 10)
    assert not s.retirement_due(now=T0 * 10)

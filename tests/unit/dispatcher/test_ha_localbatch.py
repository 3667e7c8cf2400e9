"""Several atomic writes and deletes made durable together (a fenced batch's files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.ha import localbatch


def test_writes_and_deletes_in_order_with_their_modes(tmp_path: Path) -> None:
    a, b, gone = tmp_path / "x" / "a", tmp_path / "y" / "b", tmp_path / "gone"
    gone.write_text("old")
    done = localbatch.apply([
        (a, "1", 0o600), (gone, None, 0), (a, b"2", 0o640), (b, "3", 0o644),
        (tmp_path / "absent", None, 0),
    ])  # fmt: skip
    assert done == [True, True, True, True, False]
    assert a.read_text() == "2" and a.stat().st_mode & 0o777 == 0o640
    assert b.read_text() == "3" and not gone.exists()
    leftovers = [p.name for p in tmp_path.rglob(".*.tmp")]
    assert leftovers == []


def test_a_failure_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()  # a directory where a file should go: the rename fails
    with pytest.raises(OSError):
        localbatch.apply([(tmp_path / "first", "1", 0o644), (tmp_path / "dir", "2", 0o644)])
    assert (tmp_path / "first").read_text() == "1"  # done before the failure, as in a row
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []

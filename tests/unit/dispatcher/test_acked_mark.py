"""The newest acknowledged generation kept on a member's disk (``sync/acked.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dispatcher.ha.sync.state import AckedMark


def test_the_mark_only_grows_and_survives_a_restart(tmp_path: Path) -> None:
    mark = AckedMark(str(tmp_path), lambda: "etcd-1")
    assert mark.generation == 0
    assert mark.note(7) and mark.note(5) and mark.note(7)
    assert mark.generation == 7
    doc = json.loads((tmp_path / "sync" / "acked.json").read_text())
    assert doc == {"generation": 7, "store": "etcd-1"}
    assert (tmp_path / "sync" / "acked.json").stat().st_mode & 0o777 == 0o600
    assert AckedMark(str(tmp_path), lambda: "etcd-1").generation == 7
    assert AckedMark(str(tmp_path), lambda: "").generation == 7  # etcd unreachable now


def test_a_rebuilt_etcd_forgets_the_mark(tmp_path: Path) -> None:
    AckedMark(str(tmp_path), lambda: "etcd-1").note(9)
    fresh = AckedMark(str(tmp_path), lambda: "etcd-2")  # a new cluster id: numbers restart
    assert fresh.generation == 0
    assert fresh.note(1) and json.loads((tmp_path / "sync" / "acked.json").read_text()) == {
        "generation": 1, "store": "etcd-2"}  # fmt: skip


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"generation": "x"}', b'{"generation": -3}'])
def test_a_damaged_mark_counts_as_none(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "sync").mkdir()
    (tmp_path / "sync" / "acked.json").write_bytes(raw)
    assert AckedMark(str(tmp_path), lambda: "etcd-1").generation == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_failed_write_keeps_the_old_mark_and_says_so(tmp_path: Path) -> None:
    mark = AckedMark(str(tmp_path), lambda: "etcd-1")
    assert mark.note(3)
    (tmp_path / "sync").chmod(0o500)
    try:
        assert not mark.note(4)
        assert mark.generation == 3
    finally:
        (tmp_path / "sync").chmod(0o700)
    assert mark.note(4) and mark.generation == 4

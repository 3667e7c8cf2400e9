"""Sealed store records: what an etcd writer without the cluster key cannot forge."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from cluster.signing import (
    KeyFile,
    NoClusterKey,
    RecordRejected,
    RecordSigner,
    Rejections,
    ensure_key,
    parse_key,
    write_key,
)

KEY = bytes(range(32))


def test_seal_open_round_trip_binds_kind_and_key() -> None:
    s = RecordSigner(KEY)
    raw = s.seal("request", "/c/requests/1", {"kind": "approve", "args": {"reqid": "x"}})
    assert s.open("request", "/c/requests/1", raw) == {"kind": "approve", "args": {"reqid": "x"}}
    assert s.open("request", "/c/requests/1", raw.encode()) == s.open(
        "request", "/c/requests/1", raw
    )
    with pytest.raises(RecordRejected, match="bad MAC"):
        s.open("request", "/c/requests/2", raw)  # replayed under another key
    with pytest.raises(RecordRejected, match="'request' record"):
        s.open("order", "/c/requests/1", raw)  # read as another kind
    with pytest.raises(RecordRejected, match="bad MAC"):
        RecordSigner(b"\1" * 32).open("request", "/c/requests/1", raw)  # another key


@pytest.mark.parametrize("change", ["body", "mac", "kind-in-body"])
def test_any_tampering_is_rejected(change: str) -> None:
    s = RecordSigner(KEY)
    doc = json.loads(s.seal("generation", "/c/generation", {"epoch": 3, "files": []}))
    if change == "body":
        doc["body"]["epoch"] = 10**12
    elif change == "mac":
        doc["mac"] = "0" * 64
    else:
        doc["body"]["kind"] = "x"
    with pytest.raises(RecordRejected):
        s.open("generation", "/c/generation", json.dumps(doc))


@pytest.mark.parametrize("raw", [None, b"", b"{", b"[]", b"\xff\xfe", b'{"epoch": 1}',
                                 b'{"v":2,"kind":"k","body":{},"mac":"00"}',
                                 b'{"v":1,"kind":"k","body":{},"mac":5}'])  # fmt: skip
def test_garbage_is_rejected_never_raises_anything_else(raw: bytes | None) -> None:
    with pytest.raises(RecordRejected):
        RecordSigner(KEY).open("k", "/c/k", raw)


def test_without_a_key_everything_is_refused() -> None:
    sealed = RecordSigner(KEY).seal("k", "/c/k", {"a": 1})
    s = RecordSigner(None)
    assert not s.available
    with pytest.raises(NoClusterKey):
        s.open("k", "/c/k", sealed)
    with pytest.raises(NoClusterKey):
        s.seal("k", "/c/k", {"a": 1})
    assert not s.check_mac("p", b"data", "00")


def test_mac_for_other_purposes() -> None:
    s = RecordSigner(KEY)
    m = s.mac("forward", b"payload")
    assert s.check_mac("forward", b"payload", m)
    assert not s.check_mac("forward", b"payload2", m)
    assert not s.check_mac("other", b"payload", m)


def test_rejections_count_every_one_and_log_each_key_once() -> None:
    r = Rejections(limit=3)
    logged: list[str] = []
    for _ in range(5):
        r.note(RecordRejected("request", "/c/requests/a", "bad"), lambda e: logged.append(e.key))
    assert logged == ["/c/requests/a"] and r.counts() == {"request": 5}
    for i in range(10):  # a flood of keys: memory stays bounded
        r.note(RecordRejected("order", f"/c/orders/{i}", "bad"), lambda e: logged.append(e.key))
    assert len(r._logged) <= 3 and r.total() == 15


def test_key_file_created_once_0600_and_reloaded(tmp_path: Path) -> None:
    p = tmp_path / "cluster.key"
    kf = KeyFile(p)
    assert kf() is None and "cluster.key" in kf.error
    results: list[tuple[bytes, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_key(p))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len({k for k, _ in results}) == 1 and sum(c for _, c in results) == 1
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    key = results[0][0]
    assert kf() == key and len(key) == 32
    assert not [f for f in os.listdir(tmp_path) if f != "cluster.key"]  # no temp left
    new = write_key(p)  # replaced (a generation carried a new key): read again
    assert new != key and kf() == new
    p.write_text("not a key\n")
    assert kf() is None and "64 hex digits" in kf.error
    with pytest.raises(ValueError):
        ensure_key(p)  # never overwritten
    assert p.read_text() == "not a key\n"
    with pytest.raises(ValueError, match="bytes"):
        parse_key(b"abcd")

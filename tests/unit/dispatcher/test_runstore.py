from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from dispatcher.runstore import (
    FetchOutcome,
    RunStore,
    RunStoreError,
    aggregate,
    async_record,
    pending_hosts,
    sync_record,
)

NOW = 1_900_000_000


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "runs")


def _async() -> dict[str, Any]:
    return async_record(
        "r1",
        "deploy",
        [
            {"host": "web2", "status": "accepted"},
            {"host": "web1", "status": "accepted"},
            {"host": "db1", "status": "busy", "error": "already running"},
            {"host": "db2", "status": "error", "error": "connect refused"},
            {"host": "db3"},
            {"status": "accepted"},  # no host: ignored
        ],
        submitter={"username": "alice", "source_ip": "127.0.0.1"},
        now=NOW,
    )


def test_sync_record_schema() -> None:
    rec = sync_record("r0", "s", ["a"], [{"host": "a", "exit": 0}], None, now=NOW)
    assert rec == {
        "reqid": "r0",
        "script": "s",
        "mode": "sync",
        "hosts": ["a"],
        "results": [{"host": "a", "exit": 0}],
        "completed": NOW,
        "complete": True,
    }
    with_sub = sync_record("r0", "s", [], [], {"username": "u", "source_ip": "1.2.3.4"})
    assert with_sub["submitter"] == {"username": "u", "source_ip": "1.2.3.4"}


def test_async_record_schema() -> None:
    rec = _async()
    assert rec == {
        "reqid": "r1",
        "script": "deploy",
        "mode": "async",
        "hosts": {
            "web2": {"status": "accepted"},
            "web1": {"status": "accepted"},
            "db1": {"status": "busy", "error": "already running"},
            "db2": {"status": "error", "error": "connect refused"},
            "db3": {"status": "error"},
        },
        "created": NOW,
        "pending": ["web1", "web2"],
        "complete": False,
        "submitter": {"username": "alice", "source_ip": "127.0.0.1"},
    }
    assert "submitter" not in async_record("r", "s", [], now=NOW)
    assert async_record("r", "s", [{"host": "a", "status": "busy"}])["complete"] is True


# --- aggregate --------------------------------------------------------------------


def test_aggregate_transitions() -> None:
    rec = _async()
    rec["hosts"]["web3"] = {"status": "running", "fetch_error": "old"}
    rec["hosts"]["web4"] = {"status": "accepted"}
    before = copy.deepcopy(rec)
    out = aggregate(
        rec,
        {
            "web1": FetchOutcome.done(3, "out", "err"),
            "web2": FetchOutcome.failed("timeout"),
            "web3": FetchOutcome.running(),
            "web4": FetchOutcome.not_found(),
            "db1": FetchOutcome.done(0, "x", ""),  # not pending: ignored
            "ghost": FetchOutcome.done(0, "x", ""),  # not in record: ignored
        },
    )
    assert rec == before  # pure
    assert out["hosts"]["web1"] == {"status": "done", "exit": 3, "stdout": "out", "stderr": "err"}
    assert out["hosts"]["web2"] == {"status": "accepted", "fetch_error": "timeout"}
    assert out["hosts"]["web3"] == {"status": "running"}
    assert out["hosts"]["web4"] == {"status": "expired"}
    assert out["hosts"]["db1"] == before["hosts"]["db1"]
    assert "ghost" not in out["hosts"]
    assert out["pending"] == ["web2", "web3"]
    assert out["complete"] is False


def test_aggregate_completes() -> None:
    rec = _async()
    out = aggregate(rec, {"web1": FetchOutcome.done(0, "", ""), "web2": FetchOutcome.not_found()})
    assert out["pending"] == [] and out["complete"] is True
    again = aggregate(out, {"web1": FetchOutcome.failed("x")})
    assert again == out


def test_aggregate_missing_outcome_and_error_default() -> None:
    rec = _async()
    out = aggregate(rec, {"web1": FetchOutcome("error")})
    assert out["hosts"]["web1"]["fetch_error"] == "fetch failed"
    assert out["hosts"]["web2"] == {"status": "accepted"}
    assert out["pending"] == ["web1", "web2"]


def test_aggregate_sync_unchanged() -> None:
    rec = sync_record("r0", "s", ["a"], [], now=NOW)
    out = aggregate(rec, {"a": FetchOutcome.not_found()})
    assert out == rec and out is not rec


def test_pending_hosts_tolerates_odd_records() -> None:
    assert pending_hosts({"mode": "async", "hosts": []}) == []
    assert pending_hosts({"mode": "async", "hosts": {"a": "x", "b": {"status": "running"}}}) == [
        "b"
    ]
    assert pending_hosts({"mode": "sync", "hosts": ["a"]}) == []


# --- store ------------------------------------------------------------------------


def test_save_load_mode_no_temp(store: RunStore) -> None:
    rec = _async()
    store.save(rec)
    path = store.dir / "r1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert store.load("r1") == rec
    assert json.loads(path.read_text()) == rec
    store.save(aggregate(rec, {"web1": FetchOutcome.running()}))
    assert os.listdir(store.dir) == ["r1.json"]


@pytest.mark.parametrize("reqid", ["", "../x", "a/b", "a.b", "x\n", "a b"])
def test_bad_reqids(store: RunStore, reqid: str) -> None:
    with pytest.raises(RunStoreError):
        store.path_of(reqid)
    with pytest.raises(RunStoreError):
        store.save({"reqid": reqid, "mode": "sync"})
    assert store.load(reqid) is None
    assert not store.dir.exists() or os.listdir(store.dir) == []


def test_save_without_reqid(store: RunStore) -> None:
    with pytest.raises(RunStoreError):
        store.save({"mode": "sync"})


def test_load_missing_and_corrupt(store: RunStore) -> None:
    assert store.load("nope") is None
    store.dir.mkdir(parents=True)
    (store.dir / "bad.json").write_text("{")
    (store.dir / "list.json").write_text("[]")
    assert store.load("bad") is None
    assert store.load("list") is None


def test_purge(store: RunStore) -> None:
    assert store.purge() == 0  # no directory yet
    for reqid in ["old1", "old2", "fresh"]:
        store.save(sync_record(reqid, "s", [], []))
    old = NOW - 86400 - 10
    for name in ["old1.json", "old2.json"]:
        os.utime(store.dir / name, (old, old))
    for name, mtime in [(".x.json.abc.tmp", old), (".y.json.abc.tmp", NOW), ("keep.txt", old)]:
        (store.dir / name).write_text("x")
        os.utime(store.dir / name, (mtime, mtime))
    os.utime(store.dir / "fresh.json", (NOW - 100, NOW - 100))
    assert store.purge(now=NOW) == 2
    assert sorted(os.listdir(store.dir)) == [".y.json.abc.tmp", "fresh.json", "keep.txt"]
    assert store.purge(ttl=50, now=NOW) == 1

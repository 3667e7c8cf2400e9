"""Job history: records, the local store (retention, filters, pages), the run-path hook."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import DispatcherConfig
from dispatcher.core import Dispatcher
from dispatcher.history import records as hr
from dispatcher.history.hook import record_run, refused_everywhere
from dispatcher.history.store import HistoryStore
from dispatcher.history.view import listing, show
from dispatcher.operations import Caller
from dispatcher.runlocks import acquire_all, lock_path

T0 = 1_780_000_000.0  # 2026-05-28


def rec(reqid: str, started: float, *, script: str = "uptime", user: str = "alice",
        hosts: tuple[str, ...] = ("web1", "web2"), out: str = "hi\n") -> dict[str, Any]:  # fmt: skip
    results = [{"host": h, "exit": 0, "stdout": out, "stderr": ""} for h in hosts]
    return hr.build(
        reqid=reqid, mode="sync", via="cli", script=script, args=["-v"], args_policy="keep",
        user=(user, "unix"), results=results, outcomes=dict.fromkeys(hosts, "ok"),
        started=started, finished=started + 1.5, instance="disp-a", output_max=1024,
    )  # fmt: skip


def files(d: Path) -> int:
    return sum(len(fs) for _, _, fs in os.walk(d))


# ----- records ---------------------------------------------------------------------------


def test_record_fields_counts_and_summary() -> None:
    results = [
        {"host": "a", "exit": 0, "stdout": "x" * 5000, "stderr": "e"},
        {"host": "b", "exit": -1, "error": "connection refused"},
        {"host": "c", "exit": -1, "error": "unknown agent", "status": "unknown"},
    ]
    r = hr.build(reqid="r1", mode="sync", via="api", script="s", args=["a b", "c"],
                 args_policy="hash", user=("ops", "cert"), results=results,
                 outcomes={"a": "ok", "b": "unreachable", "c": "unknown"}, started=T0,
                 finished=T0 + 2, instance="i1", output_max=100)  # fmt: skip
    assert "args" not in r
    assert r["args_sha256"] == hashlib.sha256(json.dumps(["a b", "c"]).encode()).hexdigest()
    assert r["counts"] == {"ok": 1, "failed": 0, "unreachable": 1, "denied": 0, "locked": 0,
                           "unknown": 1, "skipped": 0}  # fmt: skip
    assert r["hosts"]["a"]["stdout"] == "x" * 100 and r["hosts"]["a"]["truncated"] == ["stdout"]
    assert r["hosts"]["b"]["outcome"] == "unreachable"
    assert r["started"] == "2026-05-28T20:26:40.000Z" and r["targets"] == ["a", "b", "c"]
    s = hr.summary(r)
    assert "hosts" not in s and hr.well_formed(s)
    assert hr.key_of(s) == "1780000000000-r1"


def test_summary_caps_targets() -> None:
    many = tuple(f"h{i:04d}" for i in range(1000))
    s = hr.summary(rec("big", T0, hosts=many))
    assert len(s["targets"]) == hr.SUMMARY_TARGETS and s["targets_total"] == 1000
    assert len(json.dumps(s)) < 8192


def test_who_names_the_operator() -> None:
    assert hr.who("api", "bob", "ops-cert", "") == ("ops-cert", "cert")
    assert hr.who("api", "bob", "", "") == ("bob", "declared")
    assert hr.who("cli", "", "root", "alice") == ("alice", "unix")
    assert hr.who("cli", "", "svc", "") == ("svc", "unix")


@pytest.mark.parametrize(
    ("text", "back"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800), ("1h30m", 5400)]
)
def test_since_durations(text: str, back: int) -> None:
    assert hr.parse_since(text, now=T0) == T0 - back


def test_since_iso_and_garbage() -> None:
    assert hr.parse_since("2026-05-28T20:26:40Z") == T0
    assert hr.parse_since("2026-05-28T20:26:40") == T0
    for bad in ("", "yesterday", "5x", "12", "-1h"):
        with pytest.raises(ValueError, match="--since"):
            hr.parse_since(bad)


def test_malformed_summaries_are_not_well_formed() -> None:
    good = hr.summary(rec("r", T0))
    assert hr.well_formed(good)
    for change in ({"reqid": "../x"}, {"started": "soon"}, {"targets": "web1"},
                   {"counts": None}, {"user": 3}):  # fmt: skip
        assert not hr.well_formed({**good, **change})


# ----- store -----------------------------------------------------------------------------


def test_save_load_and_list_newest_first(tmp_path: Path) -> None:
    st = HistoryStore(tmp_path)
    for i in range(5):
        st.save(rec(f"r{i}", T0 + i), now=T0 + 10)
    assert st.load("r3") == rec("r3", T0 + 3)
    assert [s["reqid"] for _, s in st.entries()] == ["r4", "r3", "r2", "r1", "r0"]
    assert st.load("nope") is None and st.load("../etc/passwd") is None
    mode = (st.runs / "r1.json").stat().st_mode & 0o777
    assert mode == 0o640
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_filters(tmp_path: Path) -> None:
    st = HistoryStore(tmp_path)
    st.save(rec("a", T0, script="deploy", user="alice", hosts=("web1",)), now=T0)
    st.save(rec("b", T0 + 100, script="uptime", user="bob", hosts=("db1", "web1")), now=T0)
    st.save(rec("c", T0 + 200, script="deploy", user="bob", hosts=("db1",)), now=T0)

    def ids(f: hr.Filter) -> list[str]:
        return [s["reqid"] for _, s in st.entries(f)]

    assert ids(hr.Filter(script="deploy")) == ["c", "a"]
    assert ids(hr.Filter(user="bob")) == ["c", "b"]
    assert ids(hr.Filter(host="web1")) == ["b", "a"]
    assert ids(hr.Filter(since=T0 + 50)) == ["c", "b"]
    assert ids(hr.Filter(host="db1", script="deploy", user="bob", since=T0 + 150)) == ["c"]
    assert ids(hr.Filter(host="nowhere")) == []


def test_host_filter_sees_every_target_of_a_big_run(tmp_path: Path) -> None:
    st = HistoryStore(tmp_path)
    many = tuple(f"h{i:04d}" for i in range(600))
    st.save(rec("big", T0, hosts=many), now=T0)
    assert [s["reqid"] for _, s in st.entries(hr.Filter(host="h0599"))] == ["big"]


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    st = HistoryStore(tmp_path, max_runs=10, publish=True, retain_every=1)
    for i in range(25):
        st.save(rec(f"r{i:02d}", T0 + i), now=T0 + 30)
    assert [s["reqid"] for _, s in st.entries()] == [f"r{i:02d}" for i in range(24, 14, -1)]
    assert len(os.listdir(st.runs)) == 10 and len(os.listdir(st.index)) == 10
    assert len(st.pending()) == 10  # removed runs are not published later either
    assert st.load("r00") is None


def test_retention_by_age(tmp_path: Path) -> None:
    st = HistoryStore(tmp_path, max_age=3600, retain_every=1)
    st.save(rec("old", T0), now=T0)
    st.save(rec("mid", T0 + 1800), now=T0 + 1800)
    assert [s["reqid"] for _, s in st.entries()] == ["mid", "old"]
    st.save(rec("new", T0 + 4000), now=T0 + 4000)
    assert [s["reqid"] for _, s in st.entries()] == ["new", "mid"]
    assert st.load("old") is None


def test_random_retention_stays_near_the_limit(tmp_path: Path) -> None:
    random.seed(12)  # the store draws from random: the same draws every time
    st = HistoryStore(tmp_path, max_runs=20)  # retention after one write in 32, at random
    now = time.time()
    for i in range(400):
        st.save(rec(f"r{i:03d}", now - 1000 + i))
    assert len(os.listdir(st.index)) <= 20 + 32 * 6
    got = [s["reqid"] for _, s in st.entries()]  # a listing never shows more than the limit
    assert got == [f"r{i:03d}" for i in range(399, 379, -1)]
    assert len(os.listdir(st.index)) == 20


def test_corrupt_summary_is_skipped_not_fatal(tmp_path: Path) -> None:
    st = HistoryStore(tmp_path)
    st.save(rec("a", T0), now=T0)
    st.save(rec("b", T0 + 1), now=T0)
    (st.index / "1780000001000-b.json").write_text("{not json")
    assert [s["reqid"] for _, s in st.entries()] == ["a"]


def test_pages_with_a_cursor(tmp_path: Path) -> None:
    cfg = DispatcherConfig(state_dir=str(tmp_path), instance_id="disp-a").finish()
    for i in range(7):
        HistoryStore(tmp_path).save(rec(f"r{i}", T0 + i), now=T0 + 10)
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page = listing(cfg, hr.Filter(), 3, cursor)
        seen += [s["reqid"] for s in page.runs]
        cursor = page.next
        if cursor is None:
            break
    assert seen == [f"r{i}" for i in range(6, -1, -1)]


def test_show_without_etcd(tmp_path: Path) -> None:
    cfg = DispatcherConfig(state_dir=str(tmp_path), instance_id="disp-a").finish()
    HistoryStore(tmp_path).save(rec("r1", T0), now=T0)
    assert show(cfg, "r1")["hosts"]["web1"]["stdout"] == "hi\n"
    with pytest.raises(LookupError, match="no run zz"):
        show(cfg, "zz")


# ----- the run-path hook -----------------------------------------------------------------


def refused_results(hosts: list[str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    res = [{"host": h, "script": "x", "exit": -1, "error": "script not permitted"} for h in hosts]
    return res, dict.fromkeys(hosts, "denied")


def test_refused_everywhere() -> None:
    res, oc = refused_results(["a", "b"])
    assert refused_everywhere(res, oc)
    assert refused_everywhere(
        [*res, {"host": "zz", "error": "unknown agent"}], {**oc, "zz": "unknown"}
    )
    assert not refused_everywhere([*res, {"host": "c", "exit": 0}], {**oc, "c": "ok"})
    denied_by_agent = [{"host": "a", "exit": -1, "error": "forbidden"}]
    assert not refused_everywhere(denied_by_agent, {"a": "denied"})
    assert not refused_everywhere([], {})


def test_hook_records_a_cli_run(tmp_path: Path) -> None:
    cfg = DispatcherConfig(state_dir=str(tmp_path), instance_id="disp-a").finish()
    d = Dispatcher(cfg)
    caller = Caller(kind="cli", identity="root", sudo_user="alice")
    res = [{"host": "web1", "exit": 0, "stdout": "up\n", "stderr": ""}]
    refused = record_run(d, caller, reqid="abc", script="uptime", args=["-p"], async_=False,
                         results=res, outcomes={"web1": "ok"}, started=time.time())  # fmt: skip
    assert refused is False
    got = show(cfg, "abc")
    assert got["user"] == "alice" and got["unix_user"] == "root" and got["via"] == "cli"
    assert got["args"] == ["-p"] and got["instance"] == "disp-a"
    assert got["counts"]["ok"] == 1 and got["hosts"]["web1"]["stdout"] == "up\n"


def test_a_thousand_made_up_scripts_leave_bounded_files(tmp_path: Path) -> None:
    """Each refused run is counted: no record, no lock file (the run took its locks)."""
    cfg = DispatcherConfig(state_dir=str(tmp_path), instance_id="disp-a").finish()
    d = Dispatcher(cfg)
    caller = Caller(kind="api", username="mallory")
    for i in range(1000):
        script = f"made-up-{i}"
        pairs = [("web1", script), ("web2", script)]
        acquire_all(cfg.locks_dir, pairs).release()  # as do_run does
        res, oc = refused_results(["web1", "web2"])
        assert record_run(d, caller, reqid=f"r{i}", script=script, args=[], async_=False,
                          results=res, outcomes=oc, started=time.time())  # fmt: skip
    assert os.listdir(cfg.locks_dir) == []
    assert files(tmp_path) <= 3  # refused.json and its lock file
    doc = json.loads((tmp_path / "history" / "refused.json").read_text())
    assert doc["count"] == 1000 and doc["last_script"] == "made-up-999"


def test_discard_never_removes_a_held_lock(tmp_path: Path) -> None:
    from dispatcher.runlocks import discard

    with acquire_all(tmp_path, [("h", "s")]):
        assert discard(tmp_path, [("h", "s")]) == 0
        assert lock_path(tmp_path, "h", "s").exists()
    assert discard(tmp_path, [("h", "s"), ("never", "made")]) == 1
    assert not lock_path(tmp_path, "h", "s").exists()


# ----- the API routes ----------------------------------------------------------------------


def test_api_runs_ask_the_hook_for_action_history(tmp_path: Path) -> None:
    """``GET /runs`` and ``/runs/{reqid}`` list and show, and a hook that allows the API
    but not ``history`` gets a 403 with nothing listed."""
    import asyncio

    import httpx

    from dispatcher.api.app import create_app

    hook = tmp_path / "hook.sh"
    hook.write_text('#!/bin/sh\n[ "$ENVEXEC_ACTION" = history ] && [ -e "$0.deny" ] && exit 3\n'
                    "exit 0\n")  # fmt: skip
    hook.chmod(0o755)
    cfg = DispatcherConfig(state_dir=str(tmp_path), ca_dir=str(tmp_path / "ca"),
                           instance_id="disp-a", auth_hook=str(hook)).finish()  # fmt: skip
    HistoryStore(tmp_path).save(rec("r1", time.time() - 60))
    app = create_app(Dispatcher(cfg))

    async def go() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            page = (await http.get("/runs", params={"host": "web2", "since": "1h"})).json()
            assert [s["reqid"] for s in page["runs"]] == ["r1"] and page["next"] is None
            assert "hosts" not in page["runs"][0]
            got = (await http.get("/runs/r1")).json()
            assert got["hosts"]["web1"]["stdout"] == "hi\n"
            assert (await http.get("/runs/nope")).status_code == 404
            assert (await http.get("/runs", params={"limit": 0})).status_code in (400, 422)
            Path(f"{hook}.deny").touch()
            for path in ("/runs", "/runs/r1"):
                r = await http.get(path)
                assert r.status_code == 403 and "r1" not in r.text, r.text

    asyncio.run(go())

"""Job history across instances: two ``ctrl-exec-api`` over TLS on a real etcd, a real agent.

A ``ced run`` on instance A's host and an API run on instance B both appear in ``ced
history`` on either host (A's daemon publishes the summary of the CLI run, sealed, in
etcd); ``ced show`` of A's run on B fetches A's outputs from A's peer route (A's
certificate serial checked); ``GET /runs`` pages and filters; made-up script names leave
no lock file or run record; after A stops, B says plainly that the owner is unreachable
(exit 1) and still lists the run. One cluster for the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import ENV, Cluster, ClusterSpec, Inst, running_cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    scripts = {"echo-args": str(script_dir / "echo-args.sh")}
    spec = ClusterSpec(agents={"web1": "127.0.0.2"}, scripts=scripts, names=("a", "b"),
                       tls=True, proxy_protocol=False)  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("hist"), spec) as c:
        yield c


@pytest.fixture(scope="module")
def runs(lab: Cluster) -> dict[str, str]:
    """A CLI run on A's host and an API run on B: their reqids."""
    a, b = lab.insts["a"], lab.insts["b"]
    cmd = [
        sys.executable,
        "-m",
        "dispatcher.ced",
        "--config",
        str(a.config),
        "--json",
        "run",
        "web1",
        "echo-args",
        "--",
        "from-a",
    ]  # Cluster.ced puts --config after the "--"
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)["results"][0]["reqid"]
    with lab.client(b) as http:
        resp = http.post("/run", json={"hosts": ["web1"], "script": "echo-args",
                                       "args": ["from-b"]})  # fmt: skip
        assert resp.status_code == 200, resp.text
        api = resp.json()["reqid"]
    return {"cli": cli, "api": api}


def history(lab: Cluster, inst: Inst, *args: str) -> list[dict[str, Any]]:
    r = lab.ced(inst, "history", "--json", *args)
    assert r.returncode == 0, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout)
    return out


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(200):
        if check():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    raise AssertionError(f"timed out: {what}")


def test_cli_and_api_runs_are_listed_on_every_instance(lab: Cluster, runs: dict[str, str]) -> None:
    t0 = time.monotonic()
    for inst in lab.insts.values():
        eventually(lambda i=inst: {runs["cli"], runs["api"]} <= {  # type: ignore[misc]
            s["reqid"] for s in history(lab, i)}, 20, f"both runs listed on {inst.name}")  # fmt: skip
    print(f"[history] both runs listed on both instances after {time.monotonic() - t0:.2f} s")
    listed = {s["reqid"]: s for s in history(lab, lab.insts["b"])}
    cli, api = listed[runs["cli"]], listed[runs["api"]]
    for s in (cli, api):
        assert {"reqid", "script", "user", "targets", "counts", "started", "finished",
                "instance"} <= set(s)  # fmt: skip
        assert s["script"] == "echo-args" and s["targets"] == ["web1"]
        assert s["counts"]["ok"] == 1 and s["started"] <= s["finished"]
    assert cli["instance"] == "inst-a" and cli["via"] == "cli" and cli["user_source"] == "unix"
    assert cli["args"] == ["from-a"]
    assert api["instance"] == "inst-b" and api["via"] == "api"
    assert (api["user"], api["user_source"]) == ("chaos-operator", "cert")
    newest_first = [s["reqid"] for s in history(lab, lab.insts["a"])]
    assert newest_first.index(runs["api"]) < newest_first.index(runs["cli"])
    only_api = history(lab, lab.insts["a"], "--user", "chaos-operator", "--since", "1h")
    assert [s["reqid"] for s in only_api] == [runs["api"]]
    assert history(lab, lab.insts["a"], "--host", "db9") == []


def test_show_fetches_the_output_from_the_owner(lab: Cluster, runs: dict[str, str]) -> None:
    b = lab.insts["b"]
    r = lab.ced(b, "show", runs["cli"], "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["instance"] == "inst-a"
    assert "arg1=[from-a]" in rec["hosts"]["web1"]["stdout"]
    assert rec["hosts"]["web1"]["exit"] == 0 and rec["hosts"]["web1"]["outcome"] == "ok"
    text = lab.ced(b, "show", runs["cli"])
    assert text.returncode == 0 and "arg1=[from-a]" in text.stdout
    with lab.client(lab.insts["a"]) as http:  # the API of A, about B's run
        got = http.get(f"/runs/{runs['api']}")
        assert got.status_code == 200, got.text
        assert "arg1=[from-b]" in got.json()["hosts"]["web1"]["stdout"]
        assert http.get("/runs/0123456789abcdef").status_code == 404


def test_get_runs_pages_and_filters(lab: Cluster, runs: dict[str, str]) -> None:
    with lab.client(lab.insts["b"]) as http:
        first = http.get("/runs", params={"script": "echo-args", "limit": 1}).json()
        assert first["ok"] and len(first["runs"]) == 1 and first["next"]
        second = http.get("/runs", params={"script": "echo-args", "limit": 1,
                                           "cursor": first["next"]}).json()  # fmt: skip
        both = [first["runs"][0]["reqid"], second["runs"][0]["reqid"]]
        assert sorted(both) == sorted(runs.values())
        assert http.get("/runs", params={"since": "soon"}).status_code == 400
        assert http.get("/runs", params={"script": "nothing-like-it"}).json()["runs"] == []


def test_made_up_script_names_leave_no_files(lab: Cluster, runs: dict[str, str]) -> None:
    b = lab.insts["b"]

    def count() -> int:
        return sum(len(files) for _, _, files in os.walk(b.state))

    before = count()
    with lab.client(b) as http:
        for i in range(100):
            r = http.post("/run", json={"hosts": ["web1"], "script": f"made-up-{i}"})
            assert r.status_code == 200 and r.json()["counts"]["denied"] == 1, r.text
    assert count() <= before + 2  # the refused counter (and its lock file), no more
    assert not [n for n in os.listdir(b.state / "locks") if "made-up" in n]
    refused = json.loads((b.state / "history" / "refused.json").read_text())
    assert refused["count"] == 100
    print(f"[history] 100 made-up script names: {count() - before} new file(s) on B")


def test_owner_stopped_is_said_plainly(lab: Cluster, runs: dict[str, str]) -> None:
    a, b = lab.insts["a"], lab.insts["b"]
    a.stop()
    r = lab.ced(b, "show", runs["cli"])
    assert r.returncode == 1
    assert "inst-a" in r.stderr and "unreachable" in r.stderr, r.stderr
    assert "kept only there" in r.stderr
    j = lab.ced(b, "show", runs["cli"], "--json")
    assert j.returncode == 1 and json.loads(j.stdout)["error"] == "owner unreachable"
    assert runs["cli"] in {s["reqid"] for s in history(lab, b)}  # still listed (etcd)
    with lab.client(b) as http:
        got = http.get(f"/runs/{runs['cli']}")
        assert got.status_code == 503 and got.json()["error"] == "owner unreachable"

"""Rolling execution against real agents: ``ced run|ping --batch/--max-fail/--fail-fast``
and the API's ``POST /run`` with ``batch``/``max_fail`` (dispatcher/rolling.py).

Five agent processes (127.0.0.2..6), registered as h1..h5. Their ``roll`` script writes
its start and end times to ``<logs>/<host>.log`` and sleeps; ``roll-fail`` does the same
but fails at once on h1. The timestamps the scripts themselves wrote prove the waves:
never more than ``--batch`` hosts at once, a wave starts only when the previous one ended,
and a host the failure budget skipped wrote nothing at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.apidaemon import Daemon, make_daemon
from ops.lab.net import wait_listening
from ops.lab.pki import Issued, TestCA
from tests.integration.test_ced import ced, one_json, write_conf

pytestmark = pytest.mark.integration

HOSTS = [f"h{i}" for i in range(1, 6)]
SLEEP_S = 0.5
ROLL = """#!/bin/sh
echo "start $(date +%s.%N)" >> {log}
{body}
echo "end $(date +%s.%N)" >> {log}
"""
OK_BODY = f"sleep {SLEEP_S}"
FAIL_BODY = 'echo "h1 breaks" >&2; echo "end $(date +%s.%N)" >> {log}; exit 1'


@dataclass
class Fleet:
    tmp: Path
    logs: Path
    conf: Path
    serial_conf: Path  # max_parallel = 1
    agents: list[AgentProc]
    api: Daemon

    def clear(self) -> None:
        for f in self.logs.glob("*.log"):
            f.unlink()

    def spans(self) -> dict[str, tuple[float, float]]:
        """Each host's (start, end) as its script wrote them."""
        out = {}
        for f in self.logs.glob("*.log"):
            stamps = dict(line.split() for line in f.read_text().splitlines())
            out[f.stem] = (float(stamps["start"]), float(stamps["end"]))
        return out


def _script(path: Path, log: Path, body: str) -> str:
    path.write_text(ROLL.format(log=log, body=body.format(log=log)))
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, pki: TestCA, dispatcher_cert: Issued
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("ced-rolling")
    logs = tmp / "logs"
    logs.mkdir()
    agents = []
    for i, name in enumerate(HOSTS):
        d = tmp / name
        d.mkdir()
        log = logs / f"{name}.log"
        scripts = {"roll": _script(d / "roll.sh", log, OK_BODY),
                   "roll-fail": _script(d / "roll-fail.sh", log,
                                        FAIL_BODY if name == "h1" else OK_BODY)}  # fmt: skip
        agents.append(make_agent(d / "agent", pki, {"disp": dispatcher_cert}, scripts,
                                 host=f"127.0.0.{i + 2}"))  # fmt: skip
    state = tmp / "state"
    reg = Registry(state / "agents")
    for name, a in zip(HOSTS, agents, strict=True):
        reg.register(name, ip=a.host, port=a.port, lookup_by="ip",
                     expiry="Jan  1 00:00:00 2099 GMT", tags={"tier": "roll"})  # fmt: skip
    conf = write_conf(tmp / "ctrl-exec.conf", pki.dir, state)
    serial = write_conf(tmp / "serial.conf", pki.dir, state, max_parallel="1")
    api = make_daemon(tmp, "api", pki.dir, state / "agents", {"api_auth_default": "allow"})
    try:
        for a in agents:
            a.start(wait=False)
        api.start()
        for a in agents:
            wait_listening(a.host, a.port, a.proc)
        api.wait_healthy()
        yield Fleet(tmp, logs, conf, serial, agents, api)
    finally:
        code = api.stop()
        for a in agents:
            a.stop()
    assert code == 0


def _peak(spans: dict[str, tuple[float, float]]) -> int:
    """The most scripts running at one instant."""
    edges = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()],
                   key=lambda x: (x[0], x[1]))  # fmt: skip
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_batch_two_never_runs_more_than_two_at_once(fleet: Fleet) -> None:
    fleet.clear()
    t0 = time.monotonic()
    p = ced("--json", "run", "--batch", "2", *HOSTS, "roll", conf=fleet.conf)
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    doc = one_json(p)
    waves = {r["host"]: r["wave"] for r in doc["results"]}
    assert waves == {"h1": 1, "h2": 1, "h3": 2, "h4": 2, "h5": 3}
    assert doc["counts"]["ok"] == 5 and doc["counts"]["skipped"] == 0
    assert doc["rolling"] == {"batch": "2", "max_fail": None, "waves": 3, "waves_started": 3,
                              "stopped": False, "skipped": 0}  # fmt: skip
    spans = fleet.spans()
    assert sorted(spans) == HOSTS
    assert _peak(spans) == 2
    for before, after in ((("h1", "h2"), ("h3", "h4")), (("h3", "h4"), ("h5",))):
        ended = max(spans[h][1] for h in before)
        started = min(spans[h][0] for h in after)
        assert started >= ended, (before, after, spans)  # the next wave waited
    print(
        f"[rolling] --batch 2 on 5 hosts: peak concurrency {_peak(spans)} (scripts' own "
        f"timestamps), 3 waves, wall {wall:.2f}s ({SLEEP_S}s script)"
    )


def test_a_failure_in_wave_one_stops_wave_two(fleet: Fleet) -> None:
    fleet.clear()
    p = ced("--json", "run", "--batch", "2", "--max-fail", "1", *HOSTS, "roll-fail",
            conf=fleet.conf)  # fmt: skip
    assert p.returncode == 1, p.stderr
    doc = one_json(p)
    by = {r["host"]: r for r in doc["results"]}
    assert by["h1"]["exit"] == 1 and by["h2"]["exit"] == 0  # the running one finished
    for h in ("h3", "h4", "h5"):
        assert by[h]["status"] == "skipped" and by[h]["exit"] == -1
        assert by[h]["error"] == "not started: --max-fail 1 reached (1 failed or unreachable)"
    assert doc["counts"] == {"ok": 1, "failed": 1, "unreachable": 0, "denied": 0, "locked": 0,
                             "unknown": 0, "skipped": 3}  # fmt: skip
    assert doc["rolling"]["stopped"] is True and doc["rolling"]["waves_started"] == 1
    assert sorted(fleet.spans()) == ["h1", "h2"]  # h3..h5 never ran a thing
    print(
        "[rolling] --batch 2 --max-fail 1, h1 fails in wave 1: h3, h4, h5 skipped "
        "(no script start written), exit 1"
    )


def test_fail_fast_one_at_a_time_text_output_and_recap(fleet: Fleet) -> None:
    fleet.clear()
    p = ced("run", "--fail-fast", "h1", "h2", "h3", "roll-fail", conf=fleet.serial_conf)
    assert p.returncode == 1, p.stderr
    assert "==> h1  [FAIL  exit:1" in p.stdout
    assert ("==> h2  [SKIPPED  not started: --max-fail 1 reached (1 failed or unreachable)]"
            in p.stdout)  # fmt: skip
    recap = [ln for ln in p.stderr.splitlines() if not ln.startswith(("ts=", "<"))]
    assert any(ln.startswith("--- 3 hosts in ") and ln.endswith(
        "0 ok, 1 failed, 0 unreachable, 0 denied, 0 locked, 0 unknown, 2 skipped")
        for ln in recap), recap  # fmt: skip
    assert ("waves: 1/1 started, --max-fail 1: stopped, 2 host(s) never started (skipped)"
            in recap)  # fmt: skip
    assert "skipped: h2, h3" in recap
    assert sorted(fleet.spans()) == ["h1"]


def test_ndjson_and_progress_show_the_waves(fleet: Fleet) -> None:
    fleet.clear()
    p = ced("run", "--stream", "--batch", "50%", "--tags", "tier=roll", "roll", conf=fleet.conf)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert sorted((x["host"], x["wave"], x["outcome"]) for x in lines) == [
        ("h1", 1, "ok"), ("h2", 1, "ok"), ("h3", 1, "ok"), ("h4", 2, "ok"), ("h5", 2, "ok")]  # fmt: skip
    q = ced("run", "--batch", "3", *HOSTS, "roll", conf=fleet.conf,
            env={"CED_PROGRESS": "1"})  # fmt: skip
    assert q.returncode == 0
    assert "wave 1/2: 3 hosts" in q.stderr and "wave 2/2: 2 hosts" in q.stderr
    assert "[5/5] wave 2/2  ok 5" in q.stderr
    assert "waves: 2/2 started of 3" in q.stderr


def test_ping_in_waves(fleet: Fleet) -> None:
    p = ced("--json", "ping", "--batch", "2", *HOSTS, conf=fleet.conf)
    assert p.returncode == 0, p.stderr
    doc = one_json(p)
    assert [(r["host"], r["status"], r["wave"]) for r in doc["results"]] == [
        ("h1", "ok", 1), ("h2", "ok", 1), ("h3", "ok", 2), ("h4", "ok", 2), ("h5", "ok", 3)]  # fmt: skip
    bad = ced("ping", "--max-fail", "1", *HOSTS, conf=fleet.conf)
    assert bad.returncode == 2 and "--max-fail/--fail-fast are for run" in bad.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "0"], "Error: --batch: must be at least 1 (got '0')"),
    (["--batch", "150%"], "Error: --batch: a share is at most 100% (got '150%')"),
    (["--max-fail", "abc"],
     "Error: --max-fail: expected a number of hosts N or a share N% (got 'abc')"),
    (["--fail-fast", "--max-fail", "2"],
     "Error: --fail-fast is --max-fail 1: it cannot go with --max-fail 2"),
    (["--async", "--batch", "2"],
     "Error: --batch/--max-fail/--fail-fast need a synchronous run (not --async)"),
])  # fmt: skip
def test_bad_values_are_usage_errors_and_run_nothing(
    fleet: Fleet, args: list[str], message: str
) -> None:
    fleet.clear()
    p = ced("run", *args, *HOSTS, "roll", conf=fleet.conf)
    assert p.returncode == 2 and message in p.stderr.splitlines(), p.stderr
    assert p.stdout == "" and fleet.spans() == {}
    print(f"[rolling] run {' '.join(args)}: exit 2, {message!r}")


def _post(fleet: Fleet, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=fleet.api.url, trust_env=False, timeout=30) as c:
        return c.post(path, json=body)


def test_api_run_in_waves_with_a_failure_budget(fleet: Fleet) -> None:
    fleet.clear()
    r = _post(fleet, "/run", {"hosts": HOSTS, "script": "roll-fail", "batch": 2, "max_fail": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(x["host"], x.get("status"), x["wave"]) for x in body["results"]] == [
        ("h1", None, 1), ("h2", None, 1), ("h3", "skipped", 2), ("h4", "skipped", 2),
        ("h5", "skipped", 3)]  # fmt: skip
    assert body["counts"]["skipped"] == 3 and body["counts"]["failed"] == 1
    assert body["rolling"]["stopped"] is True
    assert sorted(fleet.spans()) == ["h1", "h2"]
    fleet.clear()
    r = _post(fleet, "/run", {"tags": {"tier": "roll"}, "script": "roll", "batch": "40%"})
    assert r.status_code == 200 and r.json()["counts"]["ok"] == 5
    assert _peak(fleet.spans()) == 2
    r = _post(fleet, "/ping", {"hosts": HOSTS, "batch": 5})
    assert r.status_code == 200 and r.json()["rolling"]["waves"] == 1


@pytest.mark.parametrize(("body", "detail"), [
    ({"batch": 0}, "batch: must be at least 1 (got 0)"),
    ({"batch": "150%"}, "batch: a share is at most 100% (got '150%')"),
    ({"max_fail": "abc"}, "max_fail: expected a number of hosts N or a share N% (got 'abc')"),
    ({"fail_fast": True, "max_fail": 3}, "fail_fast is max_fail 1: it cannot go with max_fail 3"),
    ({"batch": 2, "async": True},
     "batch, max_fail and fail_fast need a synchronous run (async is false)"),
])  # fmt: skip
def test_api_bad_rolling_values_are_400_and_run_nothing(
    fleet: Fleet, body: dict[str, Any], detail: str
) -> None:
    fleet.clear()
    r = _post(fleet, "/run", {"hosts": HOSTS, "script": "roll", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid rolling options" and r.json()["detail"] == detail
    assert fleet.spans() == {}


def test_completion_offers_the_agents_scripts_from_discovery(fleet: Fleet) -> None:
    from tests.unit.dispatcher.test_ced_completion import bash_complete

    site = fleet.tmp / "completion"
    (site / "cache").mkdir(parents=True, exist_ok=True)
    conf = str(fleet.conf)
    t0 = time.monotonic()
    got = bash_complete(site, "ced", "--config", conf, "run", "h2", "")
    took = time.monotonic() - t0
    assert got == [*HOSTS, "roll", "roll-fail"]  # hosts, then the scripts h2 (and others) offer
    cached = list((site / "cache" / "ctrl-exec").glob("scripts-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["scripts"] == ["roll",
                                                                                 "roll-fail"]  # fmt: skip
    assert bash_complete(site, "ced", "--config", conf, "run", "--tags", "tier=roll",
                         "roll-") == ["roll-fail"]  # fmt: skip
    print(f"[completion] 'ced run h2 <TAB>': hosts and discovered scripts in {took:.2f}s")


def test_dry_run_shows_the_waves(fleet: Fleet) -> None:
    fleet.clear()
    p = ced("run", "--dry-run", "--batch", "2", "--fail-fast", *HOSTS, "roll", conf=fleet.conf)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines()]
    assert [(r[0], r[-1]) for r in rows] == [("h1", "1"), ("h2", "1"), ("h3", "2"), ("h4", "2"),
                                             ("h5", "3")]  # fmt: skip
    assert "5 target(s) in 3 waves, 0 unknown (dry run: nothing ran)" in p.stderr
    j = one_json(ced("--json", "run", "--dry-run", "--batch", "60%", *HOSTS, "roll",
                     conf=fleet.conf))  # fmt: skip
    assert [t["wave"] for t in j["targets"]] == [1, 1, 1, 2, 2]
    assert fleet.spans() == {}

"""``ced run``/``ping`` targeting and live output against real agents (subprocesses).

Two agent processes: a fast one on 127.0.0.2 and a slow one on 127.0.0.3 (its ``race``
script sleeps). The registry names three hosts: ``web1`` (fast, role=web), ``web2``
(slow, role=web, env=prod) and ``db1`` (the fast agent again, role=db).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent, running_agents
from ops.lab.pki import Issued, TestCA
from tests.integration.test_ced import ced, one_json, write_conf

pytestmark = pytest.mark.integration

SLOW_S = 2.0
RACE = {
    "fast": "#!/bin/sh\necho fast-done\n",
    "slow": f"#!/bin/sh\nsleep {SLOW_S}\necho slow-done\n",
}
HEAD = re.compile(r"^==> (\S+)  \[(OK|FAIL|UNKNOWN)")


@dataclass
class Fleet:
    tmp: Path
    conf: Path
    agents: list[AgentProc]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, pki: TestCA, dispatcher_cert: Issued,
    script_dir: Path,
) -> Iterator[Fleet]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("ced-fleet")
    base = {n: str(script_dir / f"{n}.sh") for n in ("echo-args", "exit3")}
    agents = []
    for kind, addr in (("fast", "127.0.0.2"), ("slow", "127.0.0.3")):
        race = tmp / f"race-{kind}.sh"
        race.write_text(RACE[kind])
        race.chmod(0o755)
        agents.append(make_agent(tmp / kind, pki, {"disp": dispatcher_cert},
                                 {**base, "race": str(race)}, host=addr))  # fmt: skip
    state = tmp / "state"
    reg = Registry(state / "agents")
    exp = "Jan  1 00:00:00 2099 GMT"
    fast, slow = agents
    reg.register("web1", ip=fast.host, port=fast.port, lookup_by="ip", expiry=exp,
                 tags={"role": "web"})  # fmt: skip
    reg.register("web2", ip=slow.host, port=slow.port, lookup_by="ip", expiry=exp,
                 tags={"role": "web", "env": "prod"})  # fmt: skip
    reg.register("db1", ip=fast.host, port=fast.port, lookup_by="ip", expiry=exp,
                 tags={"role": "db"})  # fmt: skip
    conf = write_conf(tmp / "ctrl-exec.conf", pki.dir, state)
    with running_agents(agents):
        yield Fleet(tmp, conf, agents)


def heads(stdout: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(HEAD.match, stdout.splitlines()) if m]


def test_run_by_tags(fleet: Fleet) -> None:
    p = ced("run", "--tags", "role=web", "echo-args", conf=fleet.conf)
    assert p.returncode == 0, p.stderr
    assert sorted(heads(p.stdout)) == [("web1", "OK"), ("web2", "OK")]
    j = ced("--json", "run", "--tags", "role=web,env=prod", "echo-args", conf=fleet.conf)
    doc = one_json(j)
    assert j.returncode == 0 and [r["host"] for r in doc["results"]] == ["web2"]
    assert doc["counts"] == {"ok": 1, "failed": 0, "unreachable": 0, "denied": 0, "locked": 0,
                             "unknown": 0}  # fmt: skip
    bad = ced("run", "--tags", "role", "echo-args", conf=fleet.conf)
    assert bad.returncode == 2 and "--tags: bad tag 'role'" in bad.stderr
    none = ced("run", "--tags", "role=mail", "echo-args", conf=fleet.conf)
    assert none.returncode == 2 and "no registered agent matches tags role=mail" in none.stderr
    print(f"[fleet] run --tags role=web: {sorted(heads(p.stdout))}")


def test_unknown_among_known_runs_the_rest(fleet: Fleet) -> None:
    p = ced("--json", "run", "web1", "ghost", "db1", "echo-args", conf=fleet.conf)
    assert p.returncode == 1, p.stderr
    doc = one_json(p)
    by_host = {r["host"]: r for r in doc["results"]}
    assert by_host["web1"]["exit"] == 0 and by_host["db1"]["exit"] == 0
    assert by_host["ghost"] == {"host": "ghost", "script": "echo-args", "exit": -1,
                                "status": "unknown", "error": "unknown agent", "rtt": "0ms",
                                "reqid": by_host["web1"]["reqid"]}  # fmt: skip
    assert doc["counts"]["ok"] == 2 and doc["counts"]["unknown"] == 1
    t = ced("run", "web1", "ghost", "echo-args", conf=fleet.conf)
    assert t.returncode == 1
    assert ("ghost", "UNKNOWN") in heads(t.stdout) and ("web1", "OK") in heads(t.stdout)
    assert "unknown: ghost" in t.stderr.splitlines()  # the recap


def test_strict_runs_nothing(fleet: Fleet) -> None:
    marker = fleet.tmp / "out-strict"
    p = ced("run", "--strict", "-o", str(marker), "web1", "ghost", "echo-args", conf=fleet.conf)
    assert p.returncode == 2
    assert "Error: unknown agent(s): ghost" in p.stderr.splitlines() and p.stdout == ""
    assert not marker.exists()  # nothing ran, nothing written
    g = ced("run", "--strict", "web*", "nomatch*", "echo-args", conf=fleet.conf)
    assert g.returncode == 2 and "unknown agent(s): nomatch*" in g.stderr
    # all unknown: nothing to run even without --strict (upstream's exit 2)
    a = ced("--json", "ping", "ghost", conf=fleet.conf)
    assert a.returncode == 2 and one_json(a)["ok"] == 0
    t = ced("ping", "ghost", conf=fleet.conf, env={"CED_PROGRESS": "1"})
    assert t.returncode == 2 and t.stdout == ""  # no table header for nothing
    assert ced("ping", "-o", str(marker), "web1", conf=fleet.conf).returncode == 2


def test_stream_is_completion_order(fleet: Fleet) -> None:
    t0 = time.monotonic()
    p = ced("run", "--stream", "web2", "web1", "race", conf=fleet.conf, env={"CED_PROGRESS": "1"})
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    docs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [d["host"] for d in docs] == ["web1", "web2"]  # the fast one first, though named last
    assert [d["outcome"] for d in docs] == ["ok", "ok"]
    assert docs[0]["stdout"] == "fast-done\n" and docs[1]["stdout"] == "slow-done\n"
    # neither progress nor recap with --stream, even when forced
    assert not [ln for ln in p.stderr.splitlines() if ln.startswith(("[", "--- "))]
    print(f"[fleet] --stream web2(slow) web1(fast): {[d['host'] for d in docs]} in {took:.2f}s")


def test_text_streams_and_order_host_keeps_target_order(fleet: Fleet) -> None:
    p = ced("run", "web2", "web1", "race", conf=fleet.conf, env={"CED_PROGRESS": "1"})
    assert p.returncode == 0, p.stderr
    assert heads(p.stdout) == [("web1", "OK"), ("web2", "OK")]
    progress = [ln for ln in p.stderr.splitlines() if ln.startswith("[")]
    assert progress[0].startswith("[0/2] ok 0  failed 0  unreachable 0  elapsed ")
    assert progress[-1].startswith("[2/2] ok 2  failed 0  unreachable 0  elapsed ")
    recap = [ln for ln in p.stderr.splitlines() if ln.startswith("--- ")]
    assert recap and recap[0].startswith("--- 2 hosts in ") and recap[0].endswith(
        ": 2 ok, 0 failed, 0 unreachable, 0 denied, 0 locked, 0 unknown")  # fmt: skip
    assert any(ln.startswith("slowest: web2 (") for ln in p.stderr.splitlines())
    o = ced("run", "--order", "host", "web2", "web1", "race", conf=fleet.conf)
    assert heads(o.stdout) == [("web2", "OK"), ("web1", "OK")]
    j = ced("--json", "run", "web2", "web1", "race", conf=fleet.conf, env={"CED_PROGRESS": "1"})
    assert [r["host"] for r in one_json(j)["results"]] == ["web2", "web1"]
    assert not [ln for ln in j.stderr.splitlines() if ln.startswith(("[", "--- "))]


def test_globs_stdin_dry_run_and_output_dir(fleet: Fleet) -> None:
    d = ced("run", "--dry-run", "web*", "ghost", "exit3", conf=fleet.conf)
    assert d.returncode == 1
    fast, slow = fleet.agents
    assert d.stdout.splitlines() == [f"web1  {fast.host}:{fast.port}",
                                     f"web2  {slow.host}:{slow.port}",
                                     "ghost  UNKNOWN (not a registered agent)"]  # fmt: skip
    j = ced("--json", "--dry-run", "--all", "ping", conf=fleet.conf)
    assert j.returncode == 0
    assert [t["host"] for t in one_json(j)["targets"]] == ["db1", "web1", "web2"]
    out = fleet.tmp / "out"
    p = ced("run", "-o", str(out), "-", "exit3", conf=fleet.conf, stdin="web1\n# skip\ndb1\n")
    assert p.returncode == 1
    assert sorted(heads(p.stdout)) == [("db1", "FAIL"), ("web1", "FAIL")]
    assert (out / "web1.stdout").read_text() == "about to exit 3\n"
    assert (out / "db1.stderr").read_text() == "exit3 stderr line\n"
    assert (out / "web1.exit").read_text() == "3\n"
    assert "failed: " in p.stderr


def test_ping_targets_and_counts(fleet: Fleet) -> None:
    p = ced("--json", "ping", "--tags", "env=prod", "*", "nothing-here", conf=fleet.conf)
    doc = one_json(p)
    assert p.returncode == 1, p.stderr  # an unknown name
    assert doc["counts"]["unknown"] == 1 and doc["counts"]["ok"] == 1
    assert [(r["host"], r["status"]) for r in doc["results"]] == [
        ("web2", "ok"), ("nothing-here", "unknown")]  # fmt: skip
    # the tags filtered every named agent out: only the unknown is left, nothing to do
    n = ced("--json", "ping", "--tags", "role=web", "db*", "nothing-here", conf=fleet.conf)
    assert n.returncode == 2 and "unknown agent(s): nothing-here" in one_json(n)["error"]
    q = ced("ping", "--all", conf=fleet.conf)
    assert q.returncode == 0, q.stderr
    rows = q.stdout.splitlines()
    assert rows[0].startswith("HOST") and len(rows) == 5
    assert sorted(r.split()[0] for r in rows[2:]) == ["db1", "web1", "web2"]


def test_progress_on_a_real_terminal(fleet: Fleet) -> None:
    """stderr on a pty: the progress line rewrites itself; stdout (a pipe) stays clean."""
    import os
    import pty
    import subprocess
    import sys

    from ops.lab.proc import ROOT
    from tests.integration.test_ced import CED

    master, slave = pty.openpty()
    cmd = [str(CED)] if CED.exists() else [sys.executable, "-m", "dispatcher.ced"]
    # CED_SERVER=0: on a terminal ced would start a command server for the next commands
    env = {"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT), "CED_SERVER": "0"}
    try:
        p = subprocess.run([*cmd, "--config", str(fleet.conf), "run", "web2", "web1", "race"],
                           stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                           env=env, timeout=30, text=True)  # fmt: skip
        os.close(slave)
        slave = -1
        chunks: list[bytes] = []
        for _ in range(64):  # bounded: the pty holds what the process wrote
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0
    assert "\r\x1b[K[2/2] ok 2  failed 0  unreachable 0  elapsed " in tty
    assert "--- 2 hosts in " in tty
    assert "\x1b" not in p.stdout and heads(p.stdout) == [("web1", "OK"), ("web2", "OK")]

"""A leader killed (kill -9) in the middle of ``rotate-cert``: no orphan serial survives.

Three ``ctrl-exec-api`` instances (``sync_mode = push``: each its own CA dir, registry and
``rotation.json``), one etcd, three real agents, HAProxy in front with pings flowing
through it. Every instance runs with ``CTRL_EXEC_TEST_PAUSE_AT`` naming a step of the
rotation (:func:`dispatcher.pki.rotation.pause_point`): the leader logs ``test-pause`` and
stalls there, and the test kills it with SIGKILL at exactly that point:

* ``rotation-intent``: the intent is recorded (etcd and the replicated files) and
  acknowledged; no agent was told yet;
* ``rotation-told``: every agent was told the new serial; the new cert is not installed.

Then the new leader must finish the rotation (it holds the acknowledged key pair), every
agent's trust map must end with only the serial the cluster uses, pings through HAProxy
never fail (no 403), and the ex-leader, restarted, must present the cluster's cert.
Measured (printed with ``-s``): kill to rotation finished by the new leader, kill to old
serial retired on every agent.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import trustmap
from agent.common.serial import serial_to_hex
from dispatcher.ha import rotation_intent
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import (
    ENV,
    Cluster,
    ClusterSpec,
    Inst,
    get,
    new_leader,
    running_cluster,
    wait_until,
)
from ops.lab.haproxy import HAPROXY
from ops.lab.haproxy import SKIP_REASON as HAPROXY_SKIP
from ops.lab.pki import Issued

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
    pytest.mark.skipif(HAPROXY is None, reason=HAPROXY_SKIP),
]

TTL = 2
AGENTS = {"web1": "127.0.0.2", "web2": "127.0.0.3", "web3": "127.0.0.4"}
PAUSE_ENV = "CTRL_EXEC_TEST_PAUSE_AT"


@pytest.fixture(scope="module", params=["rotation-intent", "rotation-told"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, script_dir: Path
) -> Iterator[Cluster]:
    spec = ClusterSpec(
        agents=AGENTS, scripts={"echo-args": str(script_dir / "echo-args.sh")}, ttl=TTL,
        sync_mode="push", tls=True, haproxy=True, env={PAUSE_ENV: request.param},
    )  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("rotfail"), spec) as c:
        yield c


def say(capsys: pytest.CaptureFixture[str], what: str, numbers: dict[str, Any]) -> None:
    with capsys.disabled():
        print(f"\n[rotation-failover] {what}: {json.dumps(numbers)}", flush=True)


def trusted(c: Cluster) -> dict[str, set[str]]:
    """Every agent's trusted serials (canonical hex)."""
    out = {}
    for name, agent in c.agents.items():
        entries, _ = trustmap.parse(agent.trust_map.read_text())
        out[name] = {serial_to_hex(s) for s in entries}
    return out


def intent_serial(c: Cluster) -> str | None:
    backend = c.backend(2.0)
    try:
        intent = rotation_intent.read(backend)
    finally:
        backend.close()
    return intent.new_serial if intent is not None else None


def rotation_json(inst: Inst) -> dict[str, Any]:
    path = inst.state / "rotation.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    assert isinstance(doc, dict)
    return doc


def recovered(inst: Inst) -> bool:
    """The instance logged that it finished a predecessor's rotation (not undid it)."""
    return any("ACTION=rotation-recover" in ln and "OUTCOME=completed" in ln
               for ln in inst.logtext().splitlines())  # fmt: skip


def presents(inst: Inst, serial: str) -> bool:
    """``inst`` answers /status (it may be re-executing itself) presenting ``serial``."""
    code, st = get(f"{inst.health_url}/status", 2)
    return (code == 200 and isinstance(st, dict) and not st.get("restart_pending")
            and serial_to_hex(str(st.get("cert_serial") or "")) == serial)  # fmt: skip


def paused(inst: Inst, step: str) -> bool:
    return any("ACTION=test-pause" in ln and f"STEP={step}" in ln
               for ln in inst.logtext().splitlines())  # fmt: skip


def test_leader_killed_mid_rotation_leaves_no_orphan_serial(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    c = cluster
    step = c.env[PAUSE_ENV]
    leader = c.one_leader()
    old = serial_to_hex(leader.status()["cert_serial"])
    assert all(t == {old} for t in trusted(c).values())
    follower = next(i for i in c.insts.values() if i is not leader)
    load = c.load(kinds=("ping",), max_seconds=200).start()
    ced = subprocess.Popen(  # from a follower's host; the leader carries it out, and stalls
        [sys.executable, "-m", "dispatcher.ced", "rotate-cert", "--json", "--yes",
         "--config", str(follower.config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        load.wait_requests(5, 20)
        wait_until(lambda: paused(leader, step), 60, f"the leader to pause at {step}")
        new = intent_serial(c)
        assert new is not None, "the intent is recorded in etcd before the pause"
        new = serial_to_hex(new)
        told = trusted(c)
        if step == "rotation-told":
            assert all(t == {old, new} for t in told.values()), told
        else:  # recorded and acknowledged, nobody told yet
            assert all(t == {old} for t in told.values()), told
        acked = [i for i in c.insts.values() if i is not leader
                 and serial_to_hex(rotation_json(i).get("current_serial", "")) == new]  # fmt: skip
        assert acked, "the intent's files reached a follower before the pause"
        assert rotation_json(acked[0]).get("phase") == "announcing"

        t0 = leader.signal(signal.SIGKILL)
        heir, _ = new_leader(c, leader, t0, 15)

        def finished() -> bool:
            doc = rotation_json(heir)
            return (serial_to_hex(doc.get("current_serial", "")) == new and "phase" not in doc
                    and intent_serial(c) is None and recovered(heir))  # fmt: skip

        wait_until(finished, 60, "the new leader to finish the rotation")
        took_finish = time.monotonic() - t0

        # the old serial is retired once the live members present the new one; only the
        # serial the cluster uses stays trusted on every agent
        wait_until(lambda: all(t == {new} for t in trusted(c).values()), 90,
                   "every agent to trust only the new serial")  # fmt: skip
        took_retire = time.monotonic() - t0

        # the ex-leader comes back with what it had on disk, and takes the cluster's
        c.restart(leader)
        g = c.converged(60)
        wait_until(lambda: presents(leader, new), 60, "the ex-leader to present the cluster's cert")
        assert serial_to_hex(rotation_json(leader)["current_serial"]) == new
        assert "phase" not in rotation_json(leader)
        assert leader.status()["generation"] == g.number
        load.wait_requests(10, 30)  # pings still flow after all of it
    finally:
        rep = load.stop()
        ced.kill()
        ced.wait(10)

    say(capsys, f"kill -9 at {step}", {
        "kill_to_finished_s": round(took_finish, 2), "kill_to_retired_s": round(took_retire, 2),
        **rep.summary(),
    })  # fmt: skip

    # no ping failed after its one retry, and no attempt at all met a 403
    assert not rep.failures, rep.describe()
    refused = [o for o in rep.first_failures if "403" in (o.first_error or "")
               or "serial mismatch" in (o.first_error or "")]  # fmt: skip
    assert not refused, [o.first_error for o in refused[:3]]
    # what the agents say: the new cert is trusted, the original one no longer
    heir_cert = Issued(heir.ca_dir / "dispatcher.crt", heir.ca_dir / "dispatcher.key", int(new, 16))
    for agent in c.agents.values():
        assert agent.call("POST", "/ping", {}, heir_cert).code == 200
        resp = agent.call("POST", "/ping", {}, c.dispatcher)
        assert resp.code == 403 and resp.json()["error"] == "serial mismatch"


# ----- CA rotation in the cluster ------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    spec = ClusterSpec(
        agents=AGENTS, scripts={"echo-args": str(script_dir / "echo-args.sh")}, ttl=TTL,
        sync_mode="push", tls=True, haproxy=False,
    )  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("carot"), spec) as c:
        yield c


def ced_json(c: Cluster, inst: Inst, *args: str) -> tuple[int, dict[str, Any]]:
    p = c.ced(inst, *args, "--json", "--yes", timeout=600)
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        doc = {"stdout": p.stdout, "stderr": p.stderr}
    return p.returncode, doc if isinstance(doc, dict) else {}


def test_rotate_ca_in_the_cluster(plain: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    c = plain
    for name, agent in c.agents.items():  # renewal binds the CN to the registry name
        agent.config.write_text(agent.config.read_text().replace(
            "hostname = agent.test\n", f"hostname = {name}\n"))  # fmt: skip
        agent.stop()
        agent.start()
    t0 = time.monotonic()
    doc: dict[str, Any] = {}
    for _ in range(40):  # resumable: run again while members restart to load the bundle
        rc, doc = ced_json(c, c.running()[0], "rotate-ca")
        if rc == 0 and doc.get("phase") == "drop":
            break
        time.sleep(3)
    assert doc.get("phase") == "drop", doc
    assert sorted(doc["renewed"]) == sorted(AGENTS), doc
    c.converged(120)
    for agent in c.agents.values():
        agent.hup()  # promote the renewed (new-CA) certificate
    for _ in range(40):
        rc, doc = ced_json(c, c.running()[0], "rotate-ca", "--finish")
        if rc == 0 and doc.get("phase") == "done":
            break
        time.sleep(3)
    assert doc.get("phase") == "done", doc
    took = time.monotonic() - t0
    g = c.converged(120)
    leader = c.one_leader()
    ca_pem = (leader.ca_dir / "ca.crt").read_text()
    assert ca_pem.count("BEGIN CERTIFICATE") == 1
    for inst in c.insts.values():  # every member holds the new CA only
        assert (inst.ca_dir / "ca.crt").read_text() == ca_pem, inst.name
        assert not (inst.ca_dir / "ca-old" / "ca.key").exists()
    # the agents answer the new dispatcher cert and refuse the original, old-CA one
    serial = serial_to_hex(leader.status()["cert_serial"])
    new_cert = Issued(leader.ca_dir / "dispatcher.crt", leader.ca_dir / "dispatcher.key",
                      int(serial, 16))  # fmt: skip
    for agent in c.agents.values():
        agent.ca.cert_path = leader.ca_dir / "ca.crt"
        assert agent.call("POST", "/ping", {}, new_cert).code == 200
        with pytest.raises((OSError, ValueError)):
            agent.call("POST", "/ping", {}, c.dispatcher, timeout=10)
    say(capsys, "rotate-ca in a 3-member cluster", {"seconds": round(took, 1),
                                                    "generation": g.number})  # fmt: skip


# ----- an agent down during the rotation is told later, without an operator -------------------


def test_agent_down_during_rotate_cert_is_told_once_back(
    plain: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rotate-cert`` while web3 is stopped: the others acknowledge, web3 stays pending and
    trusts only the old serial. Once web3 is back, the leader tells it again by itself (every
    10 s after a rotation), so it answers the cluster's new cert with no ``ced maintain``."""
    c = plain
    web3 = c.agents["web3"]
    web3.stop()
    try:
        rc, doc = ced_json(c, c.running()[0], "rotate-cert")
    finally:
        web3.start()
    assert rc == 0, doc
    new = serial_to_hex(str(doc.get("new_serial") or ""))
    assert new and "web3" in {f["host"] for f in doc.get("failed", [])}, doc
    assert new not in trusted(c)["web3"]
    t0 = time.monotonic()
    wait_until(lambda: new in trusted(c)["web3"], 60, "web3 told the new serial")
    told = time.monotonic() - t0
    # told by the leader of the moment (the rotation's restarts may have moved leadership);
    # it logs once its operation ended, a moment after the agent wrote its trust map
    wait_until(lambda: any("ACTION=serial-rebroadcast" in ln for i in c.insts.values()
                           for ln in i.logtext().splitlines()),
               30, "the leader's serial-rebroadcast line")  # fmt: skip
    leader = c.one_leader()

    def answers() -> bool:
        p = c.ced(leader, "ping", "web3", "--json")
        return p.returncode == 0 and '"ok"' in p.stdout

    wait_until(answers, 60, "web3 to answer a ping with the cluster's cert")
    say(capsys, "agent back after missing rotate-cert", {"told_after_s": round(told, 1)})

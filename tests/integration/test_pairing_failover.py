"""An acknowledged approval reaches the agent even when the leader dies before delivering it.

A real cluster (etcd, three ``ctrl-exec-api`` instances, lease TTL 2 s) behind HAProxy; a
real agent runs ``ctrl-exec-agent request-pairing`` against HAProxy's pairing frontend,
which routes to the leader. Injection point: while the file named by
``CTRL_EXEC_TEST_HOLD_PAIRING_DELIVERY`` exists, listeners keep decisions undelivered. The
operator approves with ``ced approve`` from a follower's host, which returns once the
approval is acknowledged (replicated, ``sync_ack``); the leader then still holds it, and is
killed with -9. The agent's connection drops; it reconnects through HAProxy with the same
request, and the new leader answers with the approval kept in the replicated ``ca_dir``.

And a request made while HAProxy has no leader in its pairing pool (every server in
maintenance: what a failover, or a leader whose health check lapses under load, looks
like from the agent: the connection closes before TLS) waits for one instead of failing:
the agent asks again until a leader is back in the pool, then its token approves it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dispatcher.pairing.server import HOLD_ENV
from ops.lab.agent import PairingAgent
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import (
    PAIRING_BACKEND,
    Cluster,
    ClusterSpec,
    new_leader,
    running_cluster,
    wait_until,
)
from ops.lab.haproxy import HAPROXY
from ops.lab.haproxy import SKIP_REASON as HAPROXY_SKIP
from ops.lab.proc import ENV, ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
    pytest.mark.skipif(HAPROXY is None, reason=HAPROXY_SKIP),
]

TTL = 2


@contextmanager
def requesting(agent: PairingAgent, port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``ctrl-exec-agent request-pairing`` through HAProxy's pairing port (stderr in the
    agent's ``pairing.log``); killed on the way out if still running."""
    with open(agent.dir / "pairing.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "request-pairing", "--config", str(agent.conf),
             "--dispatcher", "127.0.0.1", "--port", str(port), *extra],
            stdout=subprocess.PIPE, stderr=log, env=ENV, cwd=str(ROOT), start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    hold = tmp_path / "hold-delivery"
    ENV[HOLD_ENV] = str(hold)  # the instances' environment (ops.lab.proc)
    try:
        spec = ClusterSpec(agents={}, scripts={}, ttl=TTL, haproxy=True, pairing_proxy=True)
        with running_cluster(tmp_path / "ha", spec) as c:
            yield c, hold
    finally:
        ENV.pop(HOLD_ENV, None)


def test_acknowledged_approval_survives_the_leader(held: tuple[Cluster, Path],
                                                   tmp_path: Path) -> None:  # fmt: skip
    c, hold = held
    assert c.haproxy is not None
    leader = c.one_leader()
    c.haproxy.wait_status(PAIRING_BACKEND, {leader.id: "UP"})
    # HAProxy reaches the pairing listener on its PROXY v2 port (the real client address)
    assert f"127.0.0.1:{leader.pairing_proxy_port} send-proxy-v2" in c.haproxy.render()
    follower = c.followers()[0]
    agent = PairingAgent("survivor.example", "127.0.0.2", 7443, tmp_path / "agent")
    agent.write("")
    hold.touch()
    with requesting(agent, c.haproxy.pairing_port, "--timeout", "90") as proc:
        queue = leader.state / "pairing"
        pending = wait_until(lambda: list(queue.glob("*.json")), 20, "the request queued")
        reqid = pending[0].stem
        approved = c.ced(follower, "approve", reqid, timeout=60)
        assert approved.returncode == 0, approved.stdout + approved.stderr
        assert f"carried out by the cluster leader {leader.id}" in approved.stdout
        # acknowledged, and still undelivered: the injection point holds it on the leader
        wait_until(lambda: "ACTION=pair-hold" in leader.logtext(), 10, "the leader to hold")
        assert proc.poll() is None and not agent.paired
        kept = list((c.tmp / "ca" / "pairing-approved").glob("*.json"))
        assert len(kept) == 1  # in the replicated ca_dir
        t0 = leader.signal(signal.SIGKILL)
        hold.unlink()
        new, took = new_leader(c, leader, t0, 15)
        out, _ = proc.communicate(timeout=90)
        done = time.monotonic() - t0
    errs = (agent.dir / "pairing.log").read_text()
    print(f"[pairing] leader killed after the acknowledged approval: new leader in {took:.2f} s, "
          f"agent holds its certificate {done:.2f} s after the kill")  # fmt: skip
    assert proc.returncode == 0, out.decode() + errs
    assert agent.paired
    assert "reconnecting" in errs and f"request {reqid} is waiting" in errs
    assert "Pairing complete" in out.decode()
    assert "ACTION=pair-deliver" in new.logtext() and "RESUMED=approved" in new.logtext()
    assert f"PROXY_PORT={new.pairing_proxy_port}" in new.logtext()
    assert "pairing-proxy-reject" not in new.logtext() + leader.logtext()
    c.ensure_all_running()


def test_request_made_while_no_leader_is_in_the_pool_waits_for_one(
    tmp_path: Path,
) -> None:
    spec = ClusterSpec(agents={}, scripts={}, ttl=TTL, haproxy=True, pairing_proxy=True)
    with running_cluster(tmp_path / "ha", spec) as c:
        assert c.haproxy is not None
        leader = c.one_leader()
        c.haproxy.wait_status(PAIRING_BACKEND, {leader.id: "UP"})
        made = c.ced(leader, "pairing-token", "create", "--count", "1", "--expires", "10m")
        assert made.returncode == 0, made.stdout + made.stderr
        token = tmp_path / "token"
        token.write_text(made.stdout.strip().splitlines()[-1] + "\n")
        for i in c.insts.values():  # nobody in the pairing pool
            c.haproxy.set_state(PAIRING_BACKEND, i.id, "maint")
        c.haproxy.wait_status(PAIRING_BACKEND, {i.id: "MAINT" for i in c.insts.values()})
        agent = PairingAgent("patient.example", "127.0.0.2", 7443, tmp_path / "agent")
        agent.write("")
        errs = agent.dir / "pairing.log"
        with requesting(agent, c.haproxy.pairing_port, "--timeout", "60", "--token-file",
                        str(token)) as proc:  # fmt: skip
            wait_until(lambda: errs.read_text().count("asking again") >= 2 or proc.poll(), 30,
                       "the agent to ask twice")  # fmt: skip
            # on the old code request-pairing failed here: "Pairing failed: ... EOF"
            assert proc.poll() is None, errs.read_text()
            assert not list((leader.state / "pairing").glob("*.json"))  # nothing arrived
            t0 = time.monotonic()
            for i in c.insts.values():
                c.haproxy.set_state(PAIRING_BACKEND, i.id, "ready")
            out, _ = proc.communicate(timeout=60)
            took = time.monotonic() - t0
        said = errs.read_text()
        print(f"[pairing] no leader in the pool: the agent asked "
              f"{said.count('asking again') + 1} times, paired {took:.2f} s after the "
              "leader was back in the pool")  # fmt: skip
        assert proc.returncode == 0, out.decode() + said
        assert "Pairing complete" in out.decode() and agent.paired
        assert "cannot connect" in said and "Pairing failed" not in said
        assert "ACTION=pair-auto" in c.one_leader().logtext()

"""One run lock for every path: ``ced run`` on two dispatcher hosts sharing a real etcd.

Two dispatcher configs (two state dirs: two "hosts") share one etcd and one real agent
with a slow script. The lock is the cluster-wide key ``locks/<host>--<script>``, which the
API instances take as well (tests/unit/dispatcher/test_cli_runlocks.py checks a CLI run
against an instance's locks). ``ced`` binds its keys to a lease of its own (``lease_ttl``),
so a ``ced`` killed with -9 frees the lock when the lease expires. With etcd unreachable,
``ced run`` goes on under the local ``flock`` alone with a warning, as the API does, or,
with ``run_lock_without_etcd = refuse``, is refused (exit 1, ``Error: run lock
unavailable: ...``) and nothing reaches the agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.backend import EtcdBackend
from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster
from ops.lab.hacluster import ClusterSpec, running_cluster
from ops.lab.net import wait_listening
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]

CED = Path(sys.executable).parent / "ced"
TTL = 2
CLUSTER = "lockpair"


@dataclass
class Lab:
    tmp: Path
    etcd: EtcdCluster
    agent: AgentProc
    confs: list[Path]  # host A, host B
    runs: Path  # one line per start of the slow script on the agent
    release: Path  # the slow script ends once this file exists (30 s at most)

    def held(self) -> list[tuple[str, str]]:
        b = EtcdBackend(self.etcd.endpoints, cluster_name=CLUSTER, timeout=1.0)
        try:
            return b.run_locks_held()
        finally:
            b.close()

    def started(self) -> int:
        return len(self.runs.read_text().splitlines()) if self.runs.exists() else 0


def ced_cmd(conf: Path, *args: str) -> list[str]:
    cmd = [str(CED)] if CED.exists() else [sys.executable, "-m", "dispatcher.ced"]
    return [*cmd, "--config", str(conf), *args]


def ced_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT)}


def ced(conf: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ced_cmd(conf, *args), capture_output=True, text=True, env=ced_env(),
                          timeout=timeout)  # fmt: skip


def start_ced(conf: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(ced_cmd(conf, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ced_env())  # fmt: skip


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture
def lab(tmp_path: Path, pki: TestCA, dispatcher_cert: Issued) -> Iterator[Lab]:
    runs = tmp_path / "runs.log"
    release = tmp_path / "release"
    slow = tmp_path / "slow.sh"
    slow.write_text(f"#!/bin/sh\necho started >> {runs}\ni=0\n"
                    f"while [ ! -e {release} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n"
                    "echo slept\n")  # fmt: skip
    slow.chmod(0o755)
    fast = tmp_path / "fast.sh"
    fast.write_text("#!/bin/sh\necho fast\n")
    fast.chmod(0o755)
    agent = make_agent(tmp_path / "agent", pki, {"disp": dispatcher_cert},
                       {"slow": str(slow), "fast": str(fast)}, host="127.0.0.2")  # fmt: skip
    etcd = EtcdCluster(tmp_path / "etcd").start()
    confs: list[Path] = []
    try:
        for host in ("a", "b"):
            state = tmp_path / f"host-{host}"
            Registry(state / "agents").register("web1", ip=agent.host, port=agent.port,
                                                lookup_by="ip",
                                                expiry="Jan  1 00:00:00 2099 GMT")  # fmt: skip
            keys = {"ca_dir": str(pki.dir), "state_dir": str(state), "log_target": "stderr",
                    "read_timeout": "10", "etcd_endpoints": etcd.endpoints[0],
                    "cluster_name": CLUSTER, "lease_ttl": str(TTL)}  # fmt: skip
            conf = tmp_path / f"host-{host}.conf"
            conf.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
            confs.append(conf)
        agent.start(wait=False)
        wait_listening(agent.host, agent.port, agent.proc)
        yield Lab(tmp_path, etcd, agent, confs, runs, release)
    finally:
        agent.stop()
        etcd.close()


def test_ced_runs_on_two_hosts_exclude_each_other(lab: Lab) -> None:
    first = start_ced(lab.confs[0], "run", "web1", "slow")
    try:
        wait_for(lambda: lab.held() == [("web1", "slow")], 10, "host A's lock in etcd")
        # host B: another state dir, so another local flock; only etcd can refuse it
        for args in (("--json", "run", "web1", "slow"), ("--json", "run", "--async", "web1",
                                                         "slow")):  # fmt: skip
            second = ced(lab.confs[1], *args)
            assert second.returncode == 1, second.stderr
            assert json.loads(second.stdout) == {"ok": 0, "error": "locked", "code": 4,
                                                 "conflicts": ["web1:slow"]}  # fmt: skip
        text = ced(lab.confs[1], "run", "web1", "slow")
        assert text.returncode == 1
        assert "Locked: already running: web1:slow" in text.stderr
        assert first.poll() is None  # host A's run held the lock all along
        lab.release.touch()
        out, errs = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert first.returncode == 0, errs
    assert "slept" in out
    assert lab.started() == 1  # exactly one run reached the agent
    assert lab.held() == []  # released at the end (lease revoked), not after a TTL
    # the lock is free again: host B runs now
    again = ced(lab.confs[1], "--json", "run", "web1", "slow")
    assert again.returncode == 0, again.stderr
    assert lab.started() == 2


def test_killed_ced_frees_its_lock_after_the_lease_ttl(lab: Lab) -> None:
    first = start_ced(lab.confs[0], "run", "web1", "slow")
    try:
        wait_for(lambda: lab.held() == [("web1", "slow")], 10, "host A's lock in etcd")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        killed_at = time.monotonic()
        refused = ced(lab.confs[1], "--json", "run", "web1", "slow")
        assert json.loads(refused.stdout)["error"] == "locked"
        lab.release.touch()  # the killed run's script ends on the agent; its lock stays
        wait_for(lambda: lab.held() == [], TTL + 4, "lock of the killed ced to expire")
        freed = time.monotonic() - killed_at
        print(f"[lock] killed ced's lock freed {freed:.2f} s after kill -9 (lease_ttl {TTL} s)")
        assert freed <= TTL + 2
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    again = ced(lab.confs[1], "--json", "run", "web1", "slow")
    assert again.returncode == 0, again.stderr


def test_a_served_ced_takes_the_cluster_lock_and_its_killed_client_frees_it(lab: Lab) -> None:
    """Through the command server (the etcd client preloaded in its parent, forked into
    the child before any connection): the run holds the cluster lock; ``kill -9`` of the
    ``ced`` process interrupts the command, which releases the lock itself (direct, the
    lock waits for its lease to expire: the test above)."""
    from ops.lab.cedserver import Served, ced_cmd, log_pids

    served = Served(lab.tmp / "run")
    served.start()
    # a lease of 30 s: a lock freed within 5 s was released by the command, not expired
    long_lease = lab.tmp / "host-a-30s.conf"
    long_lease.write_text(lab.confs[0].read_text().replace(f"lease_ttl = {TTL}\n",
                                                           "lease_ttl = 30\n"))  # fmt: skip
    assert "lease_ttl = 30" in long_lease.read_text()
    first = subprocess.Popen([*ced_cmd(), "--config", str(long_lease), "run", "web1", "slow"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=served.env())  # fmt: skip
    try:
        wait_for(lambda: lab.held() == [("web1", "slow")], 10, "the served run's lock in etcd")
        refused = ced(lab.confs[1], "--json", "run", "web1", "slow")
        assert json.loads(refused.stdout)["error"] == "locked"
        first.kill()
        first.wait(10)
        # within 5 s: before the lease (30 s) and before read_timeout (10 s) could end it
        took = wait_for(lambda: lab.held() == [], 5, "the interrupted command's release")
        print(f"[lock] served ced killed: its command released the lock in {took:.2f} s")
        lab.release.touch()
        pid, again = served.run("--config", str(lab.confs[0]), "--json", "run", "web1", "slow")
        assert again.returncode == 0 and pid not in log_pids(again.stderr), again.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        served.stop()


def test_etcd_unreachable_ced_runs_under_the_local_lock(lab: Lab) -> None:
    lab.etcd.pause()  # SIGSTOP: connections hang until the client's timeout
    try:
        first = start_ced(lab.confs[0], "run", "web1", "slow")
        try:
            wait_for(lambda: lab.started() == 1, 15, "the run under the local lock")
            # same host (same locks_dir): the local flock still refuses a second run
            same = ced(lab.confs[0], "--json", "run", "web1", "slow")
            assert json.loads(same.stdout)["error"] == "locked"
            lab.release.touch()
            out, errs = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(10)
        assert "slept" in out
        assert first.returncode == 0, errs
        assert "ACTION=run-lock-fallback" in errs and "SCOPE=local" in errs
        t0 = time.monotonic()
        quick = ced(lab.confs[1], "--json", "run", "web1", "fast")
        frozen = time.monotonic() - t0
        assert quick.returncode == 0, quick.stderr
        # run_lock_without_etcd = refuse: fail closed, nothing reaches the agent
        strict = lab.tmp / "strict.conf"
        strict.write_text(lab.confs[1].read_text() + "run_lock_without_etcd = refuse\n")
        before = lab.started()
        refused = ced(strict, "--json", "run", "web1", "slow")
        assert refused.returncode == 1, refused.stderr
        doc = json.loads(refused.stdout)
        assert doc["ok"] == 0 and doc["error"].startswith("run lock unavailable: cluster "
                                                          "unavailable"), doc  # fmt: skip
        assert "run_lock_without_etcd = refuse" in doc["error"]
        text = ced(strict, "run", "web1", "slow")
        assert text.returncode == 1 and "Error: run lock unavailable" in text.stderr
        assert lab.started() == before
    finally:
        lab.etcd.resume()
    t0 = time.monotonic()
    assert ced(lab.confs[1], "--json", "run", "web1", "fast").returncode == 0
    up = time.monotonic() - t0
    print(f"[lock] ced run of a quick script: {up:.2f} s with etcd up, {frozen:.2f} s with "
          f"etcd frozen (local lock after the lease grant times out)")  # fmt: skip
    assert frozen < up + 2.0  # the fallback costs one store timeout (lease_ttl/4), no more


def test_api_refuses_runs_without_etcd_when_configured(tmp_path: Path, script_dir: Path) -> None:
    """The API instance follows the same rule: ``run_lock_without_etcd = refuse`` answers
    503 ``cluster unavailable`` to a run while etcd is down (ping still works)."""
    scripts = {"echo-args": str(script_dir / "echo-args.sh")}
    spec = ClusterSpec(agents={"web1": "127.0.0.2"}, scripts=scripts, ttl=TTL, names=("a",),
                       extra={"run_lock_without_etcd": "refuse"})  # fmt: skip
    with running_cluster(tmp_path / "ha", spec) as c:
        inst = c.one_leader()
        with c.client(inst) as http:
            r = http.post("/run", json={"hosts": ["web1"], "script": "echo-args", "args": ["up"]})
            assert r.status_code == 200, r.text
            c.etcd.stop_member(0)
            try:
                wait_for(lambda: inst.status()["etcd"] == "unreachable", 5, "etcd seen down")
                r = http.post("/run", json={"hosts": ["web1"], "script": "echo-args"})
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["error"] == "cluster unavailable"
                assert "run_lock_without_etcd = refuse" in body["detail"]
                assert http.post("/ping", json={"hosts": ["web1"]}).status_code == 200
            finally:
                c.etcd.start_member(0)

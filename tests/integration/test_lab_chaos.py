"""Chaos on the multi-host lab: the deployment of ``docs/deploy.md`` (:mod:`ops.lab.deployment`:
three etcd members with TLS and auth, three dispatcher hosts, two load balancers sharing a
virtual IP, two agents, the operator's host), under a steady client load through the virtual
IP from the operator's host with the operator certificate (:class:`ops.lab.chaos.VipLoad`:
``POST /ping`` and ``POST /run``, a new connection per attempt, one retry):

* kill -9 of the leader's ``ctrl-exec-api`` on its host: a new leader once its lease ran
  out (within 2 x TTL by the new leader's own ``leader_since``: the test's probing through
  the lab's namespaces lags on a loaded machine, and is printed beside it); nothing fails
  after one retry but explicit 409 ``locked`` answers for the host:script of a run the kill
  cut short (its lock lives until the victim's lease expires);
* SIGTERM of the leader (``systemctl stop``): a new leader sooner than the lease TTL (it
  hands over at once; it does not wait for its lease to expire); nothing fails after one
  retry;
* the leader's host cut off from etcd (iptables in its network namespace): a new leader;
  the old one stops leader work (``/leader`` 503) and answers 503 to leader-only requests;
  during the cut only 503 (and 409 ``locked``) answers may fail after the retry; healed, it
  rejoins as a follower of the new leader and every instance runs the same generation;
* the load balancer holding the virtual IP stopped (keepalived and HAProxy): the VIP moves
  to the other one; nothing fails after one retry.

One leader at the end of each. Failover times and failed first attempts are printed.
Each killed or stopped service is started again by the test (the lab has no ``Restart=``).
What the loopback chaos test (``test_ha_chaos.py``) still covers: SIGSTOP past the TTL with
the recorded history of fenced effects, and etcd frozen as a whole.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ops.lab import deployment, vrrp
from ops.lab.chaos import (
    HEALTH_PORT,
    VipLoad,
    api_status,
    cut,
    give_operator_cert,
    heal,
    leaders,
    wait_leader,
)
from ops.lab.hacluster import LoadReport
from ops.lab.hosts import Host, Lab, LabError, available

NEEDS = ("etcd", "haproxy", "keepalived", "openssl", "iptables", "jq", "curl")
MISSING = [t for t in NEEDS if shutil.which(t) is None]
TTL = 5.0  # lease_ttl: the default, as the guide deploys it
URL = f"https://{deployment.VIP_NAME}:7445"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.chaos,
    pytest.mark.timeout(900),  # the deployment included; ~3 min on a quiet machine
    pytest.mark.skipif(available() is not None, reason=f"no lab: {available()}"),
    pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING}"),
]

Roles = dict[str, list[Host]]


def say(capsys: pytest.CaptureFixture[str], what: str, numbers: dict[str, Any]) -> None:
    with capsys.disabled():
        print(f"\n[lab-chaos] {what}: {json.dumps(numbers)}", flush=True)


def _quiet(line: str) -> None:
    """The guide's progress: only what took long (a slow block says where the time went)."""
    if "[guide]" not in line or not line.rstrip().endswith(" s") or _seconds(line) > 5:
        print(line, flush=True)


def _seconds(line: str) -> float:
    try:
        return float(line.rstrip().rsplit(" ", 2)[-2])
    except (ValueError, IndexError):
        return 0.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Roles]]:
    t0 = time.monotonic()
    with deployment.deployed(tmp_path_factory.mktemp("labchaos"), log=_quiet) as (
        the_lab, roles, _report,
    ):  # fmt: skip
        print(f"[lab-chaos] deployed in {time.monotonic() - t0:.1f} s")
        give_operator_cert(roles["operator"][0], probe_host(roles))
        yield the_lab, roles


def probe_host(roles: Roles) -> Host:
    """Where the probes run: the dispatchers' firewall lets the load balancers in (health
    and API ports), not the operator's host (which uses the VIP). The second load
    balancer: the first holds the VIP until the last test stops it."""
    return roles["lb"][1]


def status(probe: Host, host: Host) -> dict[str, Any]:
    got = probe.run(["curl", "-sS", "--max-time", "2", f"http://{host.fqdn}:{HEALTH_PORT}/status"],
                  check=False, timeout=10)  # fmt: skip
    try:
        doc = json.loads(got.stdout)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def wait_for(what: str, timeout: float, check: Any) -> Any:
    """``check()`` until it returns something true; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise LabError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def start_api(host: Host, probe: Host, leader: str) -> None:
    """Start the instance on ``host`` again; wait until it follows ``leader``."""
    host.run("systemctl start ctrl-exec-api", env=host.env(), timeout=60)
    wait_for(f"{host.name} to follow {leader}", 30,
             lambda: status(probe, host).get("role") == "follower"
             and status(probe, host).get("leader_id") == leader)  # fmt: skip


def one_leader_at_the_end(probe: Host, disps: list[Host]) -> str:
    got = wait_for("one leader", 15, lambda: (lambda ls: ls if len(ls) == 1 else None)(
        leaders(probe, disps)))  # fmt: skip
    return str(got[0])


def assert_served(rep: LoadReport, at_least: int) -> None:
    assert rep.requests >= at_least, rep.summary()
    assert not rep.failures, f"{len(rep.failures)} failed after one retry: {rep.describe()}"


def leader_since(probe: Host, host: Host) -> float | None:
    """When ``host``'s instance took the lead it holds, by its own clock (the lab's hosts
    share this machine's clock): ``/status`` ``leader_since``."""
    since = status(probe, host).get("leader_since")
    if not isinstance(since, str):
        return None
    return dt.datetime.strptime(since, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


@dataclass
class Failover:
    old: str
    new: str
    t0: float  # time.monotonic() of the command
    took: float  # the command to the new leader's own leader_since
    seen: float  # the command to the test's probe seeing the new leader
    rep: LoadReport


def _failover(lab: tuple[Lab, Roles], command: str) -> Failover:
    the_lab, roles = lab
    ops, disps, probe = roles["operator"][0], roles["dispatcher"], probe_host(roles)
    old, _ = wait_leader(probe, disps, 15)
    host = the_lab.hosts[old]
    with VipLoad(ops, URL, deployment.AGENTS, max_seconds=90) as load:
        load.wait_requests(20, 30)
        t0, wall0 = time.monotonic(), time.time()
        # not waited for: "systemctl stop" returns once the instance has drained
        act = host.popen(["sh", "-c", command], env=host.env(), stdout=subprocess.DEVNULL)
        new, _ = wait_leader(probe, disps, TTL + 10, not_=old)
        seen = time.monotonic() - t0
        since = leader_since(probe, the_lab.hosts[new])
        assert since is not None, status(probe, the_lab.hosts[new])
        assert act.wait(60) == 0, command
        load.wait_requests(30, 40)  # HAProxy has taken the victim out meanwhile
    rep = load.report()
    start_api(host, probe, new)
    return Failover(old, new, t0, since - wall0, seen, rep)


def test_kill9_of_the_leaders_api_process(
    lab: tuple[Lab, Roles], capsys: pytest.CaptureFixture[str]
) -> None:
    f = _failover(lab, 'kill -9 "$(systemctl show -p MainPID ctrl-exec-api | cut -d= -f2)"')
    say(capsys, "kill -9 of the leader's ctrl-exec-api",
        {"old": f.old, "new": f.new, "failover_ms": round(f.took * 1000),
         "seen_by_probe_ms": round(f.seen * 1000), **f.rep.summary()})  # fmt: skip
    assert f.took < 2 * TTL, f  # the lease runs out (TTL), then the next election
    assert f.rep.requests >= 50, f.rep.summary()
    bad = f.rep.unexplained(f.t0, TTL, script="disk-usage")
    assert not bad, f"{len(bad)} failed after one retry: {LoadReport(bad).describe()}"
    assert one_leader_at_the_end(probe_host(lab[1]), lab[1]["dispatcher"]) == f.new


def test_sigterm_of_the_leader(lab: tuple[Lab, Roles], capsys: pytest.CaptureFixture[str]) -> None:
    f = _failover(lab, "systemctl stop ctrl-exec-api")
    say(capsys, "SIGTERM of the leader (systemctl stop)",
        {"old": f.old, "new": f.new, "failover_ms": round(f.took * 1000),
         "seen_by_probe_ms": round(f.seen * 1000), **f.rep.summary()})  # fmt: skip
    assert f.took < TTL, f  # handed over at once, not after the lease ran out
    assert_served(f.rep, 50)
    assert one_leader_at_the_end(probe_host(lab[1]), lab[1]["dispatcher"]) == f.new


def test_the_leaders_host_cut_off_from_etcd(
    lab: tuple[Lab, Roles], capsys: pytest.CaptureFixture[str]
) -> None:
    the_lab, roles = lab
    ops, disps, etcds = roles["operator"][0], roles["dispatcher"], roles["etcd"]
    probe = probe_host(roles)
    old, _ = wait_leader(probe, disps, 15)
    host = the_lab.hosts[old]
    refused: tuple[int, dict[str, Any]] = (0, {})
    with VipLoad(ops, URL, deployment.AGENTS, max_seconds=120) as load:
        load.wait_requests(20, 30)
        t_cut = time.monotonic()
        cut(host, etcds)
        try:
            new, _ = wait_leader(probe, disps, 3 * TTL + 5, not_=old)
            took = time.monotonic() - t_cut
            assert old not in leaders(probe, disps)
            old_status = status(probe, host)
            refused = api_status(probe, host, "GET", "/pairing")  # leader-only
            load.wait_requests(20, 40)
        finally:
            t_heal = time.monotonic()
            heal(host, etcds)
        wait_for(f"{old} to follow {new}", 30,
                 lambda: status(probe, host).get("role") == "follower"
                 and status(probe, host).get("leader_id") == new)  # fmt: skip
        t_back = time.monotonic()
        rejoined = t_back - t_heal
        gens = wait_for("every instance on one generation", 30, lambda: (
            lambda g: g if len(set(g.values())) == 1 and None not in g.values() else None)(
                {h.name: status(probe, h).get("generation") for h in disps}))  # fmt: skip
        load.wait_requests(20, 30)
    t_end = time.monotonic()
    before, during = load.report(None, t_cut), load.report(t_cut, t_back)
    after = load.report(t_back)
    say(capsys, "the leader's host cut off from etcd", {
        "old": old, "new": new, "new_leader_ms": round(took * 1000),
        "old_role_during_cut": old_status.get("role"), "leader_only_on_old": refused[0],
        "rejoined_ms": round(rejoined * 1000), "generations": gens,
        "during": during.summary(), "after": after.summary(),
        "cut_s": round(t_heal - t_cut, 1), "load_s": round(t_end - t_cut, 1),
    })  # fmt: skip
    assert took < 3 * TTL + 2, took
    assert old_status.get("role") != "leader", old_status
    assert refused[0] == 503, refused
    assert_served(before, 10)
    explained = [o for o in during.failures
                 if (o.final_error or "").startswith("HTTP 503") or o.refused_locked]  # fmt: skip
    unexplained = [o for o in during.failures if o not in explained]
    assert not unexplained, LoadReport(unexplained).describe()
    assert_served(after, 10)
    assert one_leader_at_the_end(probe, disps) == new


def test_a_load_balancer_stopped(
    lab: tuple[Lab, Roles], capsys: pytest.CaptureFixture[str]
) -> None:
    the_lab, roles = lab
    ops, disps, lbs = roles["operator"][0], roles["dispatcher"], roles["lb"]
    vip = the_lab.names[deployment.VIP_NAME]
    holder = wait_for("one holder of the VIP", 15,
                      lambda: (lambda h: h[0] if len(h) == 1 else None)(vrrp.holders(lbs, vip)))  # fmt: skip
    other = next(h for h in lbs if h is not holder)
    try:
        with VipLoad(ops, URL, deployment.AGENTS, max_seconds=60) as load:
            load.wait_requests(20, 30)
            t0 = time.monotonic()
            holder.run("systemctl stop keepalived && systemctl stop haproxy", env=holder.env())
            vrrp.wait_holder(lbs, vip, other, 15)
            moved = time.monotonic() - t0
            load.wait_requests(30, 40)
        rep = load.report()
    finally:
        holder.run("systemctl start haproxy && systemctl start keepalived", env=holder.env(),
                   check=False)  # fmt: skip
    say(capsys, f"load balancer {holder.name} stopped",
        {"vip_moved_ms": round(moved * 1000), "to": other.name, **rep.summary()})  # fmt: skip
    assert moved < 5, moved
    assert_served(rep, 50)
    one_leader_at_the_end(probe_host(roles), disps)

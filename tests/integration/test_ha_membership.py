"""Membership is exclusive, and a config cannot start a second cluster identity.

Two real ``ctrl-exec-api`` instances on a real etcd (lease TTL 2 s). Against them, more
processes that must not join: one with a taken ``instance_id`` (exit 78, naming the
holder; the holder stays in ``ced cluster status`` and keeps its very member key), one
advertising another member's address, one whose port is in use (exit 78 before it
touches the cluster, no traceback). A member key deleted by hand comes back within a
second or two; an instance killed with -9 and started again at once waits for its old
key to expire instead of refusing itself.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from agent.common import kvconf
from cluster.store import KeyValue
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import Cluster, ClusterSpec, Inst, running_cluster
from ops.lab.proc import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TTL = 2
EX_CONFIG = 78


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    spec = ClusterSpec(agents={}, scripts={}, ttl=TTL, names=("a", "b"))
    with running_cluster(tmp_path_factory.mktemp("members"), spec) as c:
        yield c
    # the members that were refused, or lost and regained their key, all ended cleanly
    assert all(code == 0 for code in c.exit_codes.values()), c.exit_codes


def member_kv(c: Cluster, instance_id: str) -> KeyValue | None:
    backend = c.backend()
    try:
        return backend.get_kv(backend.keys.member(instance_id))
    finally:
        backend.close()


def status_ids(c: Cluster) -> list[str]:
    p = c.ced(c.insts["a"], "cluster", "status", "--json", timeout=30)
    assert p.returncode == 0, p.stderr
    return [m["instance_id"] for m in json.loads(p.stdout)["members"]]


def intruder(c: Cluster, name: str, **keys: str) -> Inst:
    """A process configured as instance ``a`` with its own ports, then ``keys`` changed."""
    a = c.insts["a"]
    conf = {k: v for k, (_line, v) in kvconf.parse_flat(a.config.read_text(), "x").items()}
    state = c.tmp / f"state-{name}"
    state.mkdir()
    ports = {k: str(_free()) for k in ("api_port", "health_port", "pairing_port")}
    conf.update(ports, state_dir=str(state))
    conf.update(keys)
    inst = Inst(name, c.tmp / f"{name}.conf", c.tmp / f"{name}.log", int(conf["api_port"]),
                int(conf["health_port"]), int(conf["pairing_port"]), state, a.ca_dir,
                a.registry_dir)  # fmt: skip
    inst.config.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    return inst


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exit_of(inst: Inst, timeout: float = 30) -> int:
    inst.start()
    assert inst.proc is not None
    try:
        return inst.proc.wait(timeout)
    finally:
        inst.stop()


def test_second_process_with_a_taken_instance_id_is_refused(cluster: Cluster) -> None:
    a = cluster.insts["a"]
    before = member_kv(cluster, a.id)
    assert before is not None
    dup = intruder(cluster, "dup-a")  # instance_id inst-a, its own ports
    t0 = time.monotonic()
    assert exit_of(dup) == EX_CONFIG, dup.logtext()
    took = time.monotonic() - t0
    assert took > TTL, took  # it waited a lease TTL for a crashed predecessor's key to go
    assert a.proc is not None
    expected = (  # the api-fatal log line (KEY=value like every other line)
        f"ACTION=api-fatal REASON=\"{dup.config}: refusing to start: instance_id 'inst-a' is "
        f"already a live member of this cluster (advertising {a.url}, pid {a.proc.pid} on host "
        f"{socket.gethostname()}, since "
    )
    assert expected in dup.logtext(), dup.logtext()
    assert "Traceback" not in dup.logtext()
    # the first one is untouched: same key (same lease, same create revision), still listed
    after = member_kv(cluster, a.id)
    assert after is not None and (after.lease, after.create_rev) == (
        before.lease,
        before.create_rev,
    )
    assert status_ids(cluster) == ["inst-a", "inst-b"]
    time.sleep(TTL)  # and it stays: nothing of the intruder's is left to expire or delete
    assert member_kv(cluster, a.id) == after and a.alive
    assert a.status()["instance_id"] == "inst-a"


def test_duplicate_advertise_url_is_refused(cluster: Cluster) -> None:
    b = cluster.insts["b"]
    dup = intruder(cluster, "dup-url", instance_id="inst-z", advertise_url=b.url)
    assert exit_of(dup) == EX_CONFIG, dup.logtext()
    assert (
        f"refusing to start: advertise_url of 'inst-z' is already advertised by live member "
        f"'inst-b' (advertising {b.url}, pid "
    ) in dup.logtext(), dup.logtext()
    assert member_kv(cluster, "inst-z") is None
    assert status_ids(cluster) == ["inst-a", "inst-b"]


def test_port_in_use_exits_78_before_joining(cluster: Cluster) -> None:
    a = cluster.insts["a"]
    busy = intruder(cluster, "busy", instance_id="inst-q", health_port=str(a.health_port))
    assert exit_of(busy) == EX_CONFIG, busy.logtext()
    line = busy.config.read_text().splitlines().index(f"health_port = {a.health_port}") + 1
    assert (
        f"ctrl-exec-api: {busy.config}:{line}: health_port {a.health_port}: cannot listen on "
        f"127.0.0.1:{a.health_port}: Address already in use"
    ) in busy.logtext()
    assert "Traceback" not in busy.logtext() and "ACTION=cluster-start" not in busy.logtext()
    assert member_kv(cluster, "inst-q") is None


def test_deleted_member_key_comes_back(cluster: Cluster) -> None:
    b = cluster.insts["b"]
    backend = cluster.backend()
    try:
        key = backend.keys.member(b.id)
        old = backend.get_kv(key)
        assert old is not None and backend.delete_value(key)
        t0 = time.monotonic()
        kv = wait_until(lambda: backend.get_kv(key), 5, "the member key back")
        took = time.monotonic() - t0
    finally:
        backend.close()
    assert took < 2 * TTL, took
    assert kv.lease == old.lease  # the same session, registered again
    assert status_ids(cluster) == ["inst-a", "inst-b"]
    assert "member key of inst-b was gone; registered again" in b.logtext()


def test_killed_instance_restarted_at_once_waits_for_its_old_key(cluster: Cluster) -> None:
    b = cluster.insts["b"]
    old = member_kv(cluster, b.id)
    assert old is not None and b.proc is not None
    b.signal(signal.SIGKILL)
    assert b.proc.wait(5) == -signal.SIGKILL
    cluster.restart(b)  # healthy: its predecessor's key expired while it waited
    kv = wait_until(lambda: member_kv(cluster, b.id), 10, "inst-b registered")
    assert kv.lease != old.lease
    assert status_ids(cluster) == ["inst-a", "inst-b"]
    assert b.status()["instance_id"] == "inst-b"


def test_check_config_on_a_real_instance_config(cluster: Cluster) -> None:
    from dispatcher.config import check

    assert check(str(cluster.insts["a"].config)) == []

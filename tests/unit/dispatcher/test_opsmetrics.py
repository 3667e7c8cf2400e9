"""Run outcomes (dispatcher.runoutcome) and the Prometheus view of them and of the
instance (dispatcher.api.opsmetrics, dispatcher.ha.metrics)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cluster.backend import MemberInfo
from cluster.locks import LockConflict
from dispatcher.api.opsmetrics import MAX_SCRIPTS, OTHER, OpsCollector, RunMetrics
from dispatcher.config import DispatcherConfig
from dispatcher.core import Dispatcher
from dispatcher.ha.metrics import ClusterCollector, published_generation
from dispatcher.ha.role import RoleSnapshot
from dispatcher.operations import Caller, Denied, do_ping, do_run
from dispatcher.registry import RegistryError
from dispatcher.runoutcome import classify, report, seconds_of
from ops.lab.pki import TestCA

HOST_DOWN = "host '10.0.0.9' did not respond on port 7443 - connection refused (agent ...)"


@pytest.mark.parametrize(
    ("res", "outcome"),
    [
        ({"host": "a", "exit": 0, "stdout": "", "stderr": ""}, "ok"),
        ({"host": "a", "exit": 3, "stdout": "", "stderr": ""}, "failed"),
        ({"host": "a", "exit": -1, "stdout": "", "error": "script timed out"}, "failed"),
        ({"host": "a", "exit": -1, "error": HOST_DOWN}, "unreachable"),
        ({"host": "a", "exit": -1, "error": "TLS handshake with 'x' failed - cert"}, "unreachable"),
        ({"host": "a", "exit": -1, "error": "agent certificate does not match"}, "unreachable"),
        ({"host": "a", "exit": -1, "error": "script not permitted"}, "denied"),
        ({"host": "a", "exit": -1, "error": "not authorised: no"}, "denied"),
        ({"host": "a", "exit": -1, "error": "forbidden: serial"}, "denied"),
        ({"host": "a", "exit": -1, "error": "read timeout after 20s"}, "error"),
        ({"host": "a", "exit": -1, "error": "internal error: boom"}, "error"),
        ({"host": "a", "status": "accepted"}, "ok"),
        ({"host": "a", "status": "busy", "error": "script already running"}, "locked"),
        ({"host": "a", "status": "error", "error": HOST_DOWN}, "unreachable"),
        ({"host": "a", "status": "ok", "expiry": "x"}, "ok"),
        ({"host": "a", "status": "error", "error": "invalid JSON"}, "error"),
    ],
)
def test_classify(res: dict[str, Any], outcome: str) -> None:
    assert classify(res) == outcome


def test_seconds_of_rtt_or_fallback() -> None:
    assert seconds_of({"rtt": "250ms"}, 9.0) == 0.25
    assert seconds_of({"rtt": "junk"}, 1.5) == 1.5
    assert seconds_of({}, -1.0) == 0.0


class Boom:
    def observe(self, kind: str, script: str, host: str, outcome: str, seconds: float) -> None:
        raise RuntimeError("observer broken")


def test_report_never_raises() -> None:
    report(Boom(), "run", "s", [{"host": "a", "exit": 0, "stdout": ""}], 0.1)
    report(None, "run", "s", [{"host": "a"}], 0.1)


def _value(reg: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    v = reg.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


def test_run_metrics_count_and_bound_script_labels() -> None:
    reg = CollectorRegistry()
    names = ["a", "b", "c"]
    m = RunMetrics(reg, lambda: list(names), max_hosts=10, max_scripts=2)
    m.observe("run", "deploy", "a", "ok", 0.3)
    m.observe("run", "deploy", "b", "failed", 1.2)
    assert _value(reg, "ctrl_exec_runs_total", {"script": "deploy", "outcome": "ok"}) == 1
    hist = {"script": "deploy", "outcome": "failed", "le": "2.5"}
    assert _value(reg, "ctrl_exec_run_duration_seconds_bucket", hist) == 1
    # made-up names an agent refused never become labels
    for i in range(50):
        m.observe("run", f"guess{i}", "a", "denied", 0.01)
    assert _value(reg, "ctrl_exec_runs_total", {"script": OTHER, "outcome": "denied"}) == 50
    # at most max_scripts names; the next one that ran is "other" too
    m.observe("run", "backup", "a", "ok", 0.1)
    m.observe("run", "third", "a", "ok", 0.1)
    assert _value(reg, "ctrl_exec_runs_total", {"script": "backup", "outcome": "ok"}) == 1
    assert _value(reg, "ctrl_exec_runs_total", {"script": OTHER, "outcome": "ok"}) == 1
    text = generate_latest(reg).decode()
    assert "guess" not in text and "third" not in text
    assert MAX_SCRIPTS >= 100


def test_unreachable_gauge_follows_last_contact() -> None:
    reg = CollectorRegistry()
    names = ["a", "b"]
    m = RunMetrics(reg, lambda: list(names), max_hosts=10, clock=lambda: 1000.0)
    m.observe("ping", "", "a", "unreachable", 3.0)
    m.observe("run", "s", "b", "unreachable", 3.0)
    assert _value(reg, "ctrl_exec_agents_unreachable") == 2
    assert _value(reg, "ctrl_exec_pings_total", {"outcome": "unreachable"}) == 1
    m.observe("ping", "", "a", "ok", 0.01)
    assert _value(reg, "ctrl_exec_agents_unreachable") == 1
    assert _value(reg, "ctrl_exec_agent_last_contact_timestamp_seconds", {"host": "a"}) == 1000
    names.remove("b")  # unpaired: no longer counted
    assert _value(reg, "ctrl_exec_agents_unreachable") == 0


def test_last_contact_skipped_above_max_hosts() -> None:
    reg = CollectorRegistry()
    names = [f"h{i}" for i in range(5)]
    m = RunMetrics(reg, lambda: list(names), max_hosts=4)
    m.observe("ping", "", "h1", "ok", 0.01)
    assert reg.get_sample_value("ctrl_exec_agent_last_contact_timestamp_seconds",
                                {"host": "h1"}) is None  # fmt: skip
    names.pop()
    assert reg.get_sample_value("ctrl_exec_agent_last_contact_timestamp_seconds",
                                {"host": "h1"}) is not None  # fmt: skip


def _dispatcher(tmp_path: Path) -> tuple[Dispatcher, TestCA]:
    ca = TestCA(tmp_path / "ca")
    ca_dir = tmp_path / "ca"
    disp = ca.issue("dispatcher", days=30)
    cfg = DispatcherConfig(ca_dir=str(ca_dir), state_dir=str(tmp_path / "state"),
                           registry_dir=str(tmp_path / "agents")).finish()  # fmt: skip
    os.replace(disp.cert, cfg.cert)
    return Dispatcher(cfg), ca


def test_ops_collector_expiry_pairing_restart(tmp_path: Path) -> None:
    d, _ca = _dispatcher(tmp_path)
    d.registry.register("web1", ip="127.0.0.2", expiry="Jan  2 03:04:05 2031 GMT")
    d.registry.register("web2", ip="127.0.0.3")  # upstream record without an expiry
    pending = [False]
    reg = CollectorRegistry()
    reg.register(OpsCollector(d, lambda: pending[0]))

    def expiry(kind: str, name: str) -> float | None:
        return reg.get_sample_value("ctrl_exec_cert_expiry_timestamp_seconds",
                                    {"kind": kind, "name": name})  # fmt: skip

    assert expiry("agent", "web1") == 1925089445.0
    assert expiry("agent", "web2") is None
    disp = expiry("dispatcher", d.cfg.dispatcher_id or "dispatcher")
    assert disp is not None and 29 * 86400 < disp - time.time() < 31 * 86400
    assert expiry("ca", "ca") is not None
    assert expiry("operator", "operator-ca") is None  # not set up
    assert _value(reg, "ctrl_exec_restart_pending") == 0
    pending[0] = True
    assert _value(reg, "ctrl_exec_restart_pending") == 1
    assert _value(reg, "ctrl_exec_pairing_requests_pending") == 0
    assert _value(reg, "ctrl_exec_pairing_queue_max") == d.cfg.pairing_max_queue
    pairing = Path(d.cfg.pairing_dir)
    pairing.mkdir(parents=True)
    (pairing / "r1.json").write_text("{}")
    assert _value(reg, "ctrl_exec_pairing_requests_pending") == 1
    # a renewal rewrites the record: the new expiry shows (cache keyed by mtime and size)
    d.registry.update("web1", expiry="Feb  3 04:05:06 2032 GMT")
    assert expiry("agent", "web1") == 1959393906.0
    d.registry.delete("web1")
    assert expiry("agent", "web1") is None
    build = [s for m in reg.collect() if m.name == "ctrl_exec_build_info" for s in m.samples]
    assert len(build) == 1 and build[0].value == 1 and build[0].labels["version"]


def _snap(role: str, leader: str | None, generation: int) -> RoleSnapshot:
    return RoleSnapshot(instance_id="me", role=role, leader_id=leader, epoch=3, lease_ttl=None,
                        lease_time_left=None, generation=generation, etcd="ok",
                        backend="etcd")  # fmt: skip


def test_sync_lag_from_the_leader_member_record() -> None:
    members = [MemberInfo("me", generation=4), MemberInfo("lead", generation=9)]
    assert published_generation(_snap("follower", "lead", 4), members) == 9
    assert published_generation(_snap("leader", "me", 7), members) == 7
    assert published_generation(_snap("follower", None, 4), members) is None
    snap = _snap("follower", "lead", 4)
    reg = CollectorRegistry()
    reg.register(ClusterCollector(lambda: snap, lambda: 0, dict, lambda: members))
    assert _value(reg, "ctrl_exec_sync_lag_generations") == 5
    assert _value(reg, "ctrl_exec_sync_published_generation") == 9
    snap = _snap("unknown", None, 4)
    assert _value(reg, "ctrl_exec_sync_lag_generations") == 0
    assert reg.get_sample_value("ctrl_exec_sync_published_generation") is None


# ----- what do_run and do_ping report, before any agent call ------------------------------


class Seen:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, str]] = []

    def observe(self, kind: str, script: str, host: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append((kind, script, host, outcome))


def _ops_dispatcher(tmp_path: Path, **kw: str) -> tuple[Dispatcher, Seen]:
    cfg = DispatcherConfig(ca_dir=str(tmp_path / "ca"), state_dir=str(tmp_path / "state"),
                           **kw).finish()  # type: ignore[arg-type]  # fmt: skip
    disp = TestCA(tmp_path / "ca").issue("dispatcher")
    os.replace(disp.cert, cfg.cert)
    os.replace(disp.key, cfg.key)
    d = Dispatcher(cfg)
    d.registry.register("web1", ip="127.0.0.2")
    d.registry.register("web2", ip="127.0.0.3")
    seen = Seen()
    d.observer = seen
    return d, seen


def test_denied_by_the_dispatcher_is_reported_per_host(tmp_path: Path) -> None:
    d, seen = _ops_dispatcher(tmp_path, api_auth_default="deny")
    caller = Caller(kind="api", username="eve")
    with pytest.raises(Denied):
        asyncio.run(do_run(d, caller, ["web1", "web2"], "deploy", []))
    with pytest.raises(Denied):
        asyncio.run(do_ping(d, caller, ["web1"]))
    assert seen.calls == [("run", "deploy", "web1", "denied"), ("run", "deploy", "web2", "denied"),
                          ("ping", "", "web1", "denied")]  # fmt: skip


def test_locked_is_reported_per_host(tmp_path: Path) -> None:
    d, seen = _ops_dispatcher(tmp_path)
    held = d.locks.acquire_all([("web2", "deploy")])
    try:
        with pytest.raises(LockConflict):
            asyncio.run(do_run(d, Caller(kind="cli"), ["web1", "web2"], "deploy", []))
    finally:
        held.release()
    assert seen.calls == [("run", "deploy", "web1", "locked"), ("run", "deploy", "web2", "locked")]


def test_unknown_hosts_are_not_reported(tmp_path: Path) -> None:
    d, seen = _ops_dispatcher(tmp_path)
    with pytest.raises(RegistryError):
        asyncio.run(do_run(d, Caller(kind="cli"), ["nope"], "deploy", []))
    assert seen.calls == []


def test_sync_lag_from_the_syncer_view_first() -> None:
    """With a syncer its view (the sealed generation record it read) wins over the member
    records; before its first read nothing is published; ``diverged`` is a gauge."""
    members = [MemberInfo("me", generation=4), MemberInfo("lead", generation=99)]
    snap = _snap("follower", "lead", 4)
    view: dict[str, object] = {"state": "behind", "generation": 4, "published": 6}
    assert published_generation(snap, members, view) == 6
    assert published_generation(snap, members, {"state": "unknown", "published": 0}) is None
    reg = CollectorRegistry()
    reg.register(ClusterCollector(lambda: snap, lambda: 0, dict, lambda: members, lambda: view))
    assert _value(reg, "ctrl_exec_sync_lag_generations") == 2
    assert _value(reg, "ctrl_exec_sync_diverged") == 0
    view = {"state": "diverged", "generation": 4, "published": 4}
    assert _value(reg, "ctrl_exec_sync_lag_generations") == 0
    assert _value(reg, "ctrl_exec_sync_diverged") == 1

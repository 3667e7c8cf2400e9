"""Dispatcher cert rotation and agent cert renewal end to end, against real agent processes.

The rotation must never leave an agent without a serial it trusts (spec 6.4 is the
upstream defect we avoid), must retire the old serial (spec 6.3), and renewal must stage
a CA-signed cert bound to the registry name (spec 4.5).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import trustmap
from dispatcher.client import fanout
from dispatcher.pki import ca as pki
from dispatcher.pki import renewal, rotation
from dispatcher.pki import rotation_state as rs
from dispatcher.registry import Target, resolve
from ops.lab.agentproc import AgentProc
from ops.lab.dispatcherenv import DISPATCHER_ID, DispatcherEnv, make_env
from ops.lab.net import wait_listening
from ops.lab.pki import Issued

pytestmark = pytest.mark.integration
DAY = 86400


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ping_code(agent: AgentProc, who: Issued) -> int:
    return agent.call("POST", "/ping", {"reqid": "0123456789abcdef"}, who, timeout=10).code


def ping_body(agent: AgentProc, who: Issued) -> dict[str, Any]:
    resp = agent.call("POST", "/ping", {"reqid": "0123456789abcdef"}, who, timeout=10)
    assert resp.code == 200, resp
    body = resp.json()
    assert isinstance(body, dict)
    return body


def trusted(agent: AgentProc) -> dict[str, str]:
    entries, _ = trustmap.parse(agent.trust_map.read_text())
    return entries


def hx(serial: str | int) -> str:
    return format(serial, "x") if isinstance(serial, int) else serial


class Hammer(threading.Thread):
    """Pings one agent in a loop with the installed cert and with the original one."""

    def __init__(self, agent: AgentProc, env: DispatcherEnv) -> None:
        super().__init__(daemon=True)
        self.agent, self.env = agent, env
        self.stop_flag = threading.Event()
        self.codes: dict[str, collections.Counter[int]] = {
            "installed": collections.Counter(), "original": collections.Counter(),
        }  # fmt: skip
        self.torn = 0  # cert and key read in the middle of their replacement
        self.rounds = 0

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for label, who in (("installed", self.env.installed), ("original", self.env.original)):
                try:
                    self.codes[label][ping_code(self.agent, who)] += 1
                except ssl.SSLError as exc:
                    if "KEY_VALUES_MISMATCH" not in str(exc):
                        raise
                    self.torn += 1
            self.rounds += 1

    def __enter__(self) -> Hammer:
        self.start()
        deadline = time.monotonic() + 10
        while self.rounds < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.join(15)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DispatcherEnv]:
    e = make_env(tmp_path, delay=0.05)
    try:
        yield e
    finally:
        e.stop_all()


def records(env: DispatcherEnv) -> dict[str, dict[str, Any]]:
    return {r["hostname"]: r for r in env.d.registry.all()}


def test_rotation_lifecycle_never_loses_trust(env: DispatcherEnv, tmp_path: Path) -> None:
    d, cfg = env.d, env.d.cfg
    a = env.add_agent("alpha.test")
    b = env.add_agent("beta.test")
    late = env.add_agent("late.test", start=False)  # down during the rotation
    old = hx(env.original.serial)
    assert ping_code(a, env.installed) == 200 and ping_code(b, env.original) == 200

    t0 = time.time()
    with Hammer(a, env) as hammer:
        report = run(rotation.rotate(d))
        time.sleep(0.2)  # a few pings after the install too
    new = report["new_serial"]
    assert report["old_serial"] == old and new != old
    assert any(c in "abcdef" for c in new)
    assert report["agents_pending"] == 3
    assert sorted(report["updated"]) == ["alpha.test", "beta.test"]
    assert [f["host"] for f in report["failed"]] == ["late.test"]
    assert "connection refused" in report["failed"][0]["error"]
    # Trust never lapsed: the installed cert and the original one were accepted throughout.
    assert hammer.codes["installed"][403] == 0, hammer.codes
    assert hammer.codes["original"][403] == 0, hammer.codes
    assert hammer.codes["installed"][200] >= 3 and hammer.codes["original"][200] >= 3
    assert set(hammer.codes["installed"]) == {200} and set(hammer.codes["original"]) == {200}

    # Order: state and registry first, then the new pair installed (all via the writer).
    w = env.writer
    assert w.index("write", f"{cfg.key}.prev") < w.index("write", cfg.rotation_file)
    assert w.index("write", cfg.rotation_file) < w.index("write", cfg.cert)
    assert w.index("write", cfg.key) < w.index("write", cfg.cert)
    assert pki.cert_serial_hex(cfg.cert) == new
    assert Path(f"{cfg.cert}.prev").read_bytes() == env.original.cert.read_bytes()
    assert not Path(f"{cfg.cert}.next").exists()

    state = rs.load(cfg.rotation_file)
    assert state is not None
    assert (state.current_serial, state.previous_serial) == (new, old)
    expires = state.overlap_expires_at()
    assert expires is not None
    assert abs(expires - (t0 + cfg.cert_overlap_days * DAY)) < 120
    recs = records(env)
    for name in ("alpha.test", "beta.test"):
        assert recs[name]["serial_status"] == "current"
        assert recs[name]["dispatcher_serial"] == new
        assert recs[name]["serial_confirmed"] and recs[name]["serial_broadcast"]
    assert recs["late.test"]["serial_status"] == "pending"
    assert recs["late.test"]["dispatcher_serial"] == old

    # Both serials trusted under our identity; both certs work.
    for agent in (a, b):
        assert trusted(agent) == {old: DISPATCHER_ID, new: DISPATCHER_ID}
        assert ping_code(agent, env.installed) == 200
        assert ping_code(agent, env.original) == 200

    # Not all agents acknowledged and the overlap runs: no retirement yet.
    res = run(rotation.retire(d))
    assert res["retired"] is False and res["waiting"] == ["late.test"]
    assert rs.load(cfg.rotation_file).previous_serial == old  # type: ignore[union-attr]

    # The late agent comes up; it only trusts the old serial, which broadcast still holds.
    late.start()
    assert trusted(late) == {old: DISPATCHER_ID}
    assert ping_code(late, env.installed) == 403
    res = run(rotation.broadcast(d))
    assert res["updated"] == ["late.test"] and res["failed"] == []
    assert ping_code(late, env.installed) == 200
    assert records(env)["late.test"]["serial_status"] == "current"

    status = rotation.serial_status(d)
    assert status["state"]["current_serial"] == new
    assert {x["hostname"]: x["serial_status"] for x in status["agents"]} == {
        "alpha.test": "current", "beta.test": "current", "late.test": "current",
    }  # fmt: skip

    # Everyone acknowledged: early retirement, with the new cert.
    res = run(rotation.retire(d))
    assert res["retired"] is True and res["reason"] == "all-acknowledged", res
    assert sorted(res["removed"]) == ["alpha.test", "beta.test", "late.test"]
    for agent in (a, b, late):
        assert trusted(agent) == {new: DISPATCHER_ID}
        assert ping_code(agent, env.installed) == 200
        resp = agent.call("POST", "/ping", {"reqid": "x"}, env.original)
        assert resp.code == 403 and resp.json()["error"] == "serial mismatch"
    state = rs.load(cfg.rotation_file)
    assert state is not None and state.previous_serial is None and state.previous_retired
    raw = Path(cfg.rotation_file).read_text()
    assert "previous_serial" not in raw
    assert not Path(f"{cfg.cert}.prev").exists() and not Path(f"{cfg.key}.prev").exists()
    # Nothing left to retire.
    assert run(rotation.retire(d))["retired"] is False


def test_agent_down_for_the_whole_overlap_goes_stale(env: DispatcherEnv) -> None:
    d, cfg = env.d, env.d.cfg
    a = env.add_agent("up.test")
    env.add_agent("down.test", start=False)
    now = time.time()
    report = run(rotation.rotate(d, now=now))
    new, old = report["new_serial"], report["old_serial"]
    assert report["updated"] == ["up.test"]
    # While the overlap runs nothing is stale, and broadcast keeps failing for the dead one.
    assert rotation.expire_stale(d, now + DAY) == []
    res = run(rotation.broadcast(d, now + DAY))
    assert res["updated"] == [] and [f["host"] for f in res["failed"]] == ["down.test"]
    assert run(rotation.retire(d, now + DAY))["retired"] is False
    # After the overlap.
    after = now + (cfg.cert_overlap_days + 1) * DAY
    assert rotation.expire_stale(d, after) == ["down.test"]
    recs = records(env)
    assert recs["down.test"]["serial_status"] == "stale"
    assert recs["up.test"]["serial_status"] == "current"
    assert rotation.expire_stale(d, after) == []  # only pending agents turn stale
    res = run(rotation.retire(d, after))
    assert res["retired"] is True and res["reason"] == "overlap-expired"
    assert res["removed"] == ["up.test"]
    assert trusted(a) == {new: DISPATCHER_ID}
    assert ping_code(a, env.original) == 403 and ping_code(a, env.installed) == 200
    assert old not in trusted(a)


def test_upstream_order_would_lose_trust(env: DispatcherEnv) -> None:
    """Negative control for spec 6.4: install first, broadcast with the new cert -> 403."""
    d, cfg = env.d, env.d.cfg
    a = env.add_agent("ctl.test")
    ca = pki.load_ca(cfg.ca_dir, cfg.ca)
    cert = pki.issue_dispatcher_cert(ca, cfg.cert, cfg.key)  # upstream: overwrite in place
    new = format(cert.serial_number, "x")
    rs.save(rs.RotationState.new(new, hx(env.original.serial), 30), cfg.rotation_file, d.writer)
    d.registry.update("ctl.test", serial_status="pending")
    assert ping_code(a, env.installed) == 403
    res = run(rotation.broadcast(d))  # no kept old credentials: only the new cert is left
    assert res["updated"] == []
    assert res["failed"] == [{"host": "ctl.test", "error": "forbidden: serial mismatch"}]


def test_check_and_rotate_and_maintain(tmp_path: Path) -> None:
    env = make_env(tmp_path, cert_renewal_days=90)
    try:
        d = env.d
        a = env.add_agent("m.test")
        now = time.time()
        assert run(rotation.check_and_rotate(d, now)) is None  # 825 days left
        report = run(rotation.check_and_rotate(d, now + 800 * DAY))
        assert report is not None and report["updated"] == ["m.test"]
        # Due again at once, but the first rotation's overlap still runs: no second one.
        assert run(rotation.check_and_rotate(d, now + 800 * DAY)) is None
        # maintain: pings, broadcasts nothing, retires early (everyone acknowledged).
        out = run(rotation.maintain(d))
        assert out["ok"] == 1 and out["agents"] == 1 and out["pinged"] == 1, out
        assert out["errors"] == {}, out
        assert out["retire"]["retired"] is True, out
        assert trusted(a) == {report["new_serial"]: DISPATCHER_ID}
        assert isinstance(out["purged"], int)
    finally:
        env.stop_all()


# ----- agent certificate renewal -----------------------------------------------------------


def served_cert(agent: AgentProc, who: Issued) -> x509.Certificate:
    ctx = agent.client_ctx(who)
    with socket.create_connection((agent.host, agent.port), 5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def target(env: DispatcherEnv, name: str) -> Target:
    return resolve(env.d.registry, [name])[0]


def ping(env: DispatcherEnv, name: str) -> dict[str, Any]:
    res = run(fanout.ping_one(target(env, name), "fedcba9876543210", env.d.client_ctx(), 10))
    assert isinstance(res, dict)
    return res


def test_renewal_stages_cert_bound_to_registry_name(
    env: DispatcherEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ctrl-exec")
    d = env.d
    fresh = env.add_agent("fresh.test")  # 825 days: not due
    short = env.add_agent("short.test", days=30)  # under cert_days/2 = 182.5 days: due
    wait_listening(short.host, short.port, short.proc)
    before = served_cert(short, env.installed)

    res = ping(env, "fresh.test")
    assert res["status"] == "ok" and res["staged"] is False
    assert run(renewal.maybe_renew(d, target(env, "fresh.test"), res)) is None
    assert ping_body(fresh, env.installed)["staged"] is False

    res = ping(env, "short.test")
    assert res["status"] == "ok" and res["staged"] is False
    expiry = run(renewal.maybe_renew(d, target(env, "short.test"), res))
    assert isinstance(expiry, str)
    assert ping_body(short, env.installed)["staged"] is True
    assert records(env)["short.test"]["expiry"] == expiry
    left = renewal.expiry_epoch(expiry)
    assert left is not None and abs(left - time.time() - d.cfg.cert_days * DAY) < 600
    # Staged: a second ping does not renew again.
    assert run(renewal.maybe_renew(d, target(env, "short.test"), ping(env, "short.test"))) is None
    # The live cert is untouched until the agent reloads.
    assert served_cert(short, env.installed).serial_number == before.serial_number
    short.hup()
    after = served_cert(short, env.installed)
    assert after.serial_number != before.serial_number
    assert after.public_key() == before.public_key()  # same key: continuity
    assert pki.cert_not_after(after.public_bytes(serialization.Encoding.PEM)) == expiry
    body = ping_body(short, env.installed)
    assert body["staged"] is False and body["expiry"] == expiry
    assert "ACTION=renew-complete" in caplog.text


def test_ping_renews_over_the_blocking_client(env: DispatcherEnv) -> None:
    # What `ced ping` runs: the ping operation (renewal included) without an event loop.
    from dispatcher.client.blocking import BLOCKING
    from dispatcher.client.io import run_blocking
    from dispatcher.operations import Caller, do_ping

    agent = env.add_agent("blocking.test", days=30)
    wait_listening(agent.host, agent.port, agent.proc)
    out = run_blocking(do_ping(env.d, Caller("cli"), ["blocking.test"], renew=True, io=BLOCKING))
    res = out["results"][0]
    assert res["status"] == "ok" and res["staged"] is False
    assert ping_body(agent, env.installed)["staged"] is True
    expiry = records(env)["blocking.test"]["expiry"]
    assert expiry != res["expiry"] and renewal.expiry_epoch(expiry) is not None


def test_renewal_of_renamed_agent_fails_cleanly(
    env: DispatcherEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ctrl-exec")
    d = env.d
    agent = env.add_agent("orig.test", days=30)
    d.registry.rename("orig.test", "renamed.test")
    old_expiry = records(env)["renamed.test"]["expiry"]
    res = ping(env, "renamed.test")
    assert res["status"] == "ok"
    assert run(renewal.maybe_renew(d, target(env, "renamed.test"), res)) is None
    assert ping_body(agent, env.installed)["staged"] is False
    assert records(env)["renamed.test"]["expiry"] == old_expiry
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        m.startswith("ACTION=renew ") and "orig.test" in m and "renamed.test" in m for m in errors
    ), errors
    forced = run(renewal.renew(d, target(env, "renamed.test")))
    assert forced["status"] == "error" and "does not match 'renamed.test'" in forced["error"]

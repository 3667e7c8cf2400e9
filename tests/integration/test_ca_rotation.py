"""CA rotation (``dispatcher.pki.carotation``) end to end against real agent processes.

Pings work before, during and after every phase; an agent that has not reloaded its
renewed certificate refuses the drop of the old CA and stays listed; once the rotation is
done an agent rejects a dispatcher certificate signed by the old CA, even with a serial
its trust map holds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.common.certs import ca_fingerprint, fingerprint
from dispatcher.client import fanout
from dispatcher.pki import ca as pki
from dispatcher.pki import carotation
from dispatcher.registry import resolve
from dispatcher.reqid import new_reqid
from ops.lab.agentproc import AgentProc
from ops.lab.dispatcherenv import DISPATCHER_ID, DispatcherEnv, make_env
from ops.lab.proc import ENV

pytestmark = pytest.mark.integration


def ping_all_ok(env: DispatcherEnv) -> None:
    d = env.d
    targets = resolve(d.registry, d.registry.names(), 7443)
    reach = fanout.Reach(d.client_ctx(), 10, 4, 10)
    results = asyncio.run(fanout.ping_all(targets, new_reqid(), reach))
    assert len(results) == len(env.agents)
    assert all(r.get("status") == "ok" for r in results), results


def private_ca(agent: AgentProc) -> Path:
    """The agent gets its own copy of the CA file (it is the dispatcher's in make_env)."""
    text = agent.config.read_text()
    shared = next(ln.split("=", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("ca "))  # fmt: skip
    own = agent.root / "ca.crt"
    shutil.copy(shared, own)
    agent.config.write_text(text.replace(f"ca = {shared}\n", f"ca = {own}\n"))
    return own


def test_ca_rotation_with_real_agents(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    d = env.d
    cas = {}
    try:
        for name in ("web1", "web2"):
            agent = env.add_agent(name, start=False)
            cas[name] = private_ca(agent)
            agent.start()
        ping_all_ok(env)
        old_fp = ca_fingerprint(d.cfg.ca)
        st = asyncio.run(carotation.start(d))
        # bundle -> switch -> renew -> dispatcher, then it waits for --finish
        assert st["phase"] == "drop", st
        assert st["old_fingerprint"] == old_fp
        assert st["renewed"] == ["web1", "web2"] and st["done"] == []
        assert not st["offline"] and not st["upstream"]
        for name, path in cas.items():
            assert path.read_text().count("BEGIN CERTIFICATE") == 2, name  # old + new
        ping_all_ok(env)

        # the agents have not reloaded their renewed certs: they refuse the drop
        st = asyncio.run(carotation.advance(d, finish=True))
        assert st["phase"] == "drop" and st["pending"] == ["web1", "web2"], st
        assert all("renew first" in e for e in st["errors"].values()), st["errors"]
        ping_all_ok(env)

        for agent in env.agents.values():
            agent.hup()  # the staged cert (new CA) is promoted
        ping_all_ok(env)
        st = asyncio.run(carotation.advance(d, finish=True))
        assert st["phase"] == "done" and st["done"] == ["web1", "web2"], st
        assert not st["pending"] and not st["errors"]
        assert Path(d.cfg.ca).read_text().count("BEGIN CERTIFICATE") == 1
        new_fp = st["new_fingerprint"]
        assert pki.load_ca(d.cfg.ca_dir, d.cfg.ca).pem and new_fp != st["old_fingerprint"]
        assert not (Path(d.cfg.ca_dir) / "ca-old" / "ca.key").exists()
        for name, path in cas.items():
            assert path.read_text().count("BEGIN CERTIFICATE") == 1, name
        ping_all_ok(env)

        # an old-CA dispatcher certificate is rejected, even with a trusted serial
        for agent in env.agents.values():
            with agent.trust_map.open("a") as fh:
                fh.write(f"{env.original.serial_hex} {DISPATCHER_ID}\n")
            agent.hup()
            agent.ca.cert_path = Path(d.cfg.ca)  # the client verifies the agent's new cert
            with pytest.raises((ssl.SSLError, OSError, ValueError)):
                agent.call("POST", "/ping", {}, env.original, timeout=10)
        ping_all_ok(env)
        assert fingerprint(pki.load_ca(d.cfg.ca_dir, d.cfg.ca).cert) == new_fp
    finally:
        env.stop_all()


def ced(conf: Path, *args: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "dispatcher.ced", *args, "--json", "--yes",
                        "--config", str(conf)], capture_output=True, text=True, env=ENV,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert isinstance(doc, dict)
    return doc


def test_ced_rotate_ca_status_and_finish(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    cfg = env.d.cfg
    conf = tmp_path / "ctrl-exec.conf"
    conf.write_text(f"ca_dir = {cfg.ca_dir}\nstate_dir = {cfg.state_dir}\n"
                    f"dispatcher_id = {DISPATCHER_ID}\nread_timeout = 10\n")  # fmt: skip
    try:
        agent = env.add_agent("web1", start=False)
        private_ca(agent)
        agent.start()
        assert ced(conf, "rotate-ca", "--status")["phase"] is None
        doc = ced(conf, "rotate-ca")
        assert doc["phase"] == "drop" and doc["renewed"] == ["web1"], doc
        assert "reissue them under the new CA" in doc["operator"]
        st = ced(conf, "rotate-ca", "--status")
        assert st["phase"] == "drop" and st["pending"] == ["web1"]
        agent.hup()
        done = ced(conf, "rotate-ca", "--finish")
        assert done["phase"] == "done" and done["done"] == ["web1"], done
        ping_all_ok(env)
    finally:
        env.stop_all()

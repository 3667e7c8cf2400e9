"""Pairing tokens end to end with the real commands: ``ced pairing-token create|list|revoke``
(a subprocess, single host: carried out locally) and ``ctrl-exec-agent request-pairing
--token-file`` against a real pairing listener; the token-approved agent serves and
answers a ping. Without a token the agent pairs as upstream (pending, a code)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatcher.config import DispatcherConfig
from dispatcher.pairing import tokens as tk
from dispatcher.registry import Registry
from ops.lab.net import wait_listening
from ops.lab.proc import ENV, ROOT, wait_until
from tests.integration.test_pairing import (
    REQID_LINE,
    Events,
    Listener,
    agent_files,
    cfg,
    events,
    listen,
    ping,
    read_until,
    request_pairing,
)

pytestmark = pytest.mark.integration
__all__ = ["cfg", "events", "listen"]  # the pairing fixtures


def ced(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dispatcher.ced", "--config", str(conf), *args],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip


@pytest.fixture
def conf(cfg: DispatcherConfig, tmp_path: Path) -> Path:
    p = tmp_path / "ctrl-exec.conf"
    p.write_text(f"ca_dir = {cfg.ca_dir}\nstate_dir = {cfg.state_dir}\nlog_target = stderr\n"
                 f"dispatcher_id = {cfg.dispatcher_id}\n")  # fmt: skip
    return p


def test_ced_pairing_token_verbs(conf: Path, cfg: DispatcherConfig) -> None:
    made = ced(conf, "pairing-token", "create", "--count", "3", "--expires", "2h",
               "--tags", "role=web,env=lab")  # fmt: skip
    assert made.returncode == 0, made.stderr
    lines = made.stdout.split()
    assert len(lines) == 3 and all(tk.TOKEN_RE.fullmatch(t) for t in lines)
    assert "shown this once" in made.stderr
    stored = tk.store_path(cfg.ca_dir).read_text()
    assert not any(t in stored for t in lines)
    as_json = ced(conf, "--json", "pairing-token", "create", "--count", "1", "--expires", "90")
    doc = json.loads(as_json.stdout)
    assert doc["ok"] == 1 and tk.token_id_of(doc["tokens"][0]["token"]) == doc["tokens"][0]["id"]
    listed = json.loads(ced(conf, "--json", "pairing-token", "list").stdout)["tokens"]
    assert len(listed) == 4 and {t["state"] for t in listed} == {"unused"}
    assert "secret" not in json.dumps(listed) and not any(t in json.dumps(listed) for t in lines)
    first = str(tk.token_id_of(lines[0]))
    assert ced(conf, "pairing-token", "revoke", first).stdout.startswith("Revoked 1 ")
    gone = json.loads(ced(conf, "--json", "pairing-token", "revoke", "--all").stdout)
    assert len(gone["revoked"]) == 3
    table = ced(conf, "pairing-token", "list").stdout
    assert table.count("revoked") == 4 and "role=web,env=lab" in table
    for bad, why in [
        (["create", "--count", "0", "--expires", "1h"], "--count"),
        (["create", "--count", "2"], "Usage"),
        (["create", "--count", "2", "--expires", "9y"], "bad duration"),
        (["create", "--count", "2", "--expires", "1h", "--tags", "x"], "bad tag"),
        (["revoke"], "Usage"),
        (["revoke", "ffffffffff"], "no such token"),
        (["frob"], "Usage"),
    ]:
        p = ced(conf, "pairing-token", *bad)
        assert p.returncode != 0 and why in p.stderr + p.stdout, (bad, p.stderr)


def test_agent_pairs_with_a_token_file_then_serves(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener], events: Events
) -> None:
    lst = listen(cfg)
    tid, token = tk.new_token()
    tk.add(cfg.ca_dir, {tid: tk.token_hash(token)}, expires_in=600, tags={"role": "db"})
    a = agent_files(tmp_path / "agent")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    proc = request_pairing(a, lst.port, False, 60, "--token-file", str(token_file))
    assert proc.wait(60) == 0, (a.root / "pair.log").read_text()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    assert "Presenting a pairing token" in out and "Pairing complete" in out
    assert token not in out and token not in (a.root / "pair.log").read_text()
    assert a.cert.exists() and a.trust_map.exists()
    rec = Registry(cfg.registry_dir).get("agent1.test")
    assert rec is not None and rec["tags"] == {"role": "db"}
    assert events.has("pair-auto", token_id=tid, agent="agent1.test")
    serve = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "serve", "--config", str(a.config),
         "--allowlist", str(a.allowlist)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=str(ROOT),
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_listening("127.0.0.1", a.port, serve)
        code, body = ping(a, cfg)
        assert code == 200 and body["host"] == "agent1.test"
    finally:
        serve.terminate()
        serve.wait(10)


def test_agent_token_sources(tmp_path: Path, cfg: DispatcherConfig,
                             listen: Callable[..., Listener]) -> None:  # fmt: skip
    """``--token -`` reads stdin and ``$CTRL_EXEC_PAIRING_TOKEN`` is read; a token in argv is
    refused before anything is sent; a used token leaves the agent waiting with a code."""
    lst = listen(cfg)
    a = agent_files(tmp_path / "a1")
    argv = request_pairing(a, lst.port, False, 10, "--token", "cet1.0123456789." + "A" * 43)
    assert argv.wait(30) == 2
    assert "visible to other users" in (a.root / "pair.log").read_text()
    tid, token = tk.new_token()
    tk.add(cfg.ca_dir, {tid: tk.token_hash(token)}, expires_in=600)
    cmd = [sys.executable, "-m", "agent.cli", "request-pairing", "--config", str(a.config),
           "--dispatcher", "127.0.0.1", "--port", str(lst.port), "--timeout", "30",
           "--token", "-"]  # fmt: skip
    got = subprocess.run(cmd, input=token + "\n", capture_output=True, text=True, env=ENV,
                         cwd=str(ROOT), timeout=60)  # fmt: skip
    assert got.returncode == 0 and "Pairing complete" in got.stdout, got.stderr
    b = agent_files(tmp_path / "b1", hostname="agent2.test")
    env = {**ENV, "CTRL_EXEC_PAIRING_TOKEN": token}  # used already: waits for an operator
    proc = subprocess.Popen([*cmd[:5], str(b.config), *cmd[6:-2], "--background"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            cwd=str(ROOT), start_new_session=True)  # fmt: skip
    try:
        reqid, lines = read_until(proc, REQID_LINE)
        assert any(ln.startswith("Pairing code: ") for ln in lines)
        wait_until(lambda: (Path(cfg.pairing_dir) / f"{reqid}.json").exists(), 5, "queued")
        assert Registry(cfg.registry_dir).get("agent2.test") is None
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait(15)

"""Attacks on the operator side of the API: operators are not agents.

A real ``ctrl-exec-api`` daemon (subprocess, TLS) in front of a real agent whose one
allowlisted script leaves a side-effect file; an auth hook that appends its stdin JSON to
a file and allows everything (``api_auth_default = allow`` besides). Every refused attack
must leave no side-effect file and no new run record. The cluster attack runs through
HAProxy against instances that trust the dispatcher CA for their peers (etcd, push sync):
the agent's certificate passes the TLS handshake there and must still be refused. Each
refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import json
import shutil
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.pki import ca as dpki
from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.apidaemon import Daemon, PairingCA, make_daemon
from ops.lab.hacluster import ClusterSpec, running_cluster
from ops.lab.net import client_ssl
from ops.lab.operators import OperatorCA
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import wait_until
from tests.support.haproxy import needs_haproxy

pytestmark = pytest.mark.integration

AGENT_ADDR = "127.0.0.2"
HOOK = """#!/bin/sh
cat >> "$(dirname "$0")/hook.jsonl"
echo >> "$(dirname "$0")/hook.jsonl"
echo "$ENVEXEC_ACTION $ENVEXEC_IDENTITY" >> "$(dirname "$0")/hook.env"
exit 0
"""
SCRIPT = """#!/bin/sh
echo ran > "$1"
echo ran
"""


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """The ``[attack]`` lines reach the suite's output even when output is captured."""
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    with capsys.disabled():
        for ln in lines:
            print(ln)


@dataclass
class Env:
    tmp: Path
    ca: PairingCA
    operators: OperatorCA
    dispatcher: Issued
    agent: AgentProc
    daemons: dict[str, Daemon]
    hooks: Path

    def client(self, daemon: str, who: Issued | None) -> httpx.Client:
        ctx = client_ssl(self.ca.cert_path, who)
        return httpx.Client(base_url=self.daemons[daemon].url, verify=ctx, trust_env=False,
                            timeout=30)  # fmt: skip

    def runs(self, daemon: str) -> list[Path]:
        d = self.tmp / f"state-{daemon}" / "runs"
        return sorted(d.glob("*.json")) if d.exists() else []

    def hook_docs(self) -> list[dict[str, Any]]:
        path = self.hooks / "hook.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()]

    def marker(self, name: str) -> Path:
        return self.tmp / "markers" / name


def _hook(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hook = directory / "auth-hook"
    hook.write_text(HOOK)
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    return hook


def _script(directory: Path) -> Path:
    script = directory / "mark.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("operator-attacks")
    (tmp / "markers").mkdir()
    ca_dir = tmp / "ca"
    ca = PairingCA(ca_dir)
    operators = OperatorCA(ca_dir, tmp / "operators")
    dcert = dpki.issue_dispatcher_cert(ca.ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    dispatcher = Issued(ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key", dcert.serial_number)
    api_cert, api_key = tmp / "api.crt", tmp / "api.key"
    dpki.issue_dispatcher_cert(ca.ca, api_cert, api_key)
    hook = _hook(tmp / "hooks")
    agent = make_agent(tmp / "web1", ca, {"disp": dispatcher}, {"mark": str(_script(tmp))},
                       host=AGENT_ADDR)  # fmt: skip
    registry_dir = tmp / "agents"
    Registry(registry_dir).register("web1", ip=AGENT_ADDR, port=agent.port, lookup_by="ip")
    tls = {"api_cert": str(api_cert), "api_key": str(api_key), "auth_hook": str(hook),
           "api_auth_default": "allow"}  # fmt: skip
    daemons = {
        "open": make_daemon(tmp, "open", ca_dir, registry_dir, tls),
        "strict": make_daemon(tmp, "strict", ca_dir, registry_dir,
                              {**tls, "api_require_client_cert": "yes"}),
    }  # fmt: skip
    try:
        agent.start(wait=False)
        for d in daemons.values():
            d.start()
        for d in daemons.values():
            d.wait_healthy()
        yield Env(tmp, ca, operators, dispatcher, agent, daemons, tmp / "hooks")
    finally:
        codes = {name: d.stop() for name, d in daemons.items()}
        agent.stop()
    assert codes == dict.fromkeys(daemons, 0), codes


def _run_body(marker: Path, username: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"hosts": ["web1"], "script": "mark", "args": [str(marker)]}
    if username:
        body["username"] = username
    return body


def _refused(env: Env, daemon: str, who: Issued | None, marker: str) -> str:
    """POST /run with ``who``'s certificate: the refusal's detail; nothing ran or was
    recorded, and the auth hook never saw the request."""
    runs, hooks = env.runs(daemon), len(env.hook_docs())
    target = env.marker(marker)
    detail = ""
    try:
        with env.client(daemon, who) as c:
            r = c.post("/run", json=_run_body(target))
        assert r.status_code == 403, r.text
        detail = f"403 {r.json().get('error')}: {r.json().get('detail')}"
    except (httpx.TransportError, ssl.SSLError) as exc:
        detail = f"TLS handshake refused: {type(exc).__name__}"
    time.sleep(0.3)  # a run that slipped through would have written by now
    assert not target.exists(), "the script ran"
    assert env.runs(daemon) == runs, "a run record was written"
    assert len(env.hook_docs()) == hooks, "the request reached the auth hook"
    return detail


def test_agent_certificate_is_not_an_operator(env: Env) -> None:
    detail = _refused(env, "open", env.agent.agent_cert, "agent-cert")
    attack("agent certificate as operator certificate", detail)


def test_dispatcher_ca_certificate_is_not_an_operator(env: Env) -> None:
    forged = env.ca.issue("pretend-operator", cn="alice")  # signed by the dispatcher CA
    detail = _refused(env, "open", forged, "dispatcher-ca")
    attack("dispatcher-CA certificate named like an operator", detail)
    detail = _refused(env, "open", env.dispatcher, "dispatcher-cert")
    attack("the dispatcher's own certificate as operator certificate", detail)


def test_unknown_ca_is_refused(env: Env) -> None:
    stranger = TestCA(env.tmp / "stranger", cn="ctrl-exec operator CA").issue("m", cn="alice")
    detail = _refused(env, "open", stranger, "unknown-ca")
    attack("certificate from an unknown CA with the operator CA's name", detail)


def test_no_certificate_when_one_is_required(env: Env) -> None:
    detail = _refused(env, "strict", None, "no-cert")
    attack("no client certificate with api_require_client_cert = yes", detail)
    # the same daemon serves an operator
    with env.client("strict", env.operators.issue("carol")) as c:
        r = c.post("/run", json=_run_body(env.marker("strict-ok")))
    assert r.status_code == 200, r.text
    assert env.marker("strict-ok").exists()


def test_identity_reaches_hook_logs_and_run_record(env: Env) -> None:
    alice = env.operators.issue("alice")
    before = len(env.hook_docs())
    with env.client("open", alice) as c:
        r = c.post("/run", json=_run_body(env.marker("alice"), username="root"))
    assert r.status_code == 200, r.text
    assert env.marker("alice").exists()
    reqid = r.json()["reqid"]
    fp = dpki.fingerprint(_ca_cert(env))
    docs = env.hook_docs()[before:]
    assert {d["action"] for d in docs} == {"api", "run"}, docs
    for d in docs:  # the certificate's CN, never the body's "root"
        assert d["username"] == "alice", d
        assert d["identity"] == {"cn": "alice", "serial": alice.serial_hex,
                                 "issuer_fingerprint": fp}, d  # fmt: skip
    assert "run alice" in (env.hooks / "hook.env").read_text().splitlines()
    attack("body username 'root' beside alice's certificate", "the hook saw alice")
    record = json.loads((env.tmp / "state-open" / "runs" / f"{reqid}.json").read_text())
    assert record["identity"] == {"cn": "alice", "serial": alice.serial_hex,
                                  "issuer_fingerprint": fp}  # fmt: skip
    assert record["submitter"]["username"] == "alice"
    log = env.daemons["open"].logtext().splitlines()
    mine = [ln for ln in log if f"CERT_SERIAL={alice.serial_hex}" in ln]
    actions = {ln.split("ACTION=", 1)[1].split(" ", 1)[0] for ln in mine}
    assert {"api-request", "auth", "username-ignored"} <= actions, mine
    assert all("IDENTITY=alice" in ln for ln in mine)


def _ca_cert(env: Env) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(env.operators.cert_path.read_bytes())


@pytest.mark.parametrize("which", ["dispatcher-ca", "copy-of-dispatcher-ca", "bundle"])
def test_api_client_ca_that_signs_agents_is_refused_at_start(
    env: Env, tmp_path: Path, which: str
) -> None:
    path = env.ca.cert_path
    if which == "copy-of-dispatcher-ca":  # another file, the same CA
        path = tmp_path / "client-ca.pem"
        shutil.copy(env.ca.cert_path, path)
    elif which == "bundle":  # the operator CA with the dispatcher CA hidden behind it
        path = tmp_path / "bundle.pem"
        path.write_text(env.operators.cert_path.read_text() + env.ca.cert_path.read_text())
    daemon = make_daemon(tmp_path, "bad", env.tmp / "ca", env.tmp / "agents", {
        "api_cert": str(env.tmp / "api.crt"), "api_key": str(env.tmp / "api.key"),
        "api_client_ca": str(path),
    })  # fmt: skip
    daemon.start()
    try:
        assert daemon.proc is not None and daemon.proc.wait(30) == 78
    finally:
        daemon.stop()
    text = daemon.logtext()
    line = next(i for i, ln in enumerate(daemon.config.read_text().splitlines(), 1)
                if ln.startswith("api_client_ca"))  # fmt: skip
    assert f"{daemon.config}:{line}: api_client_ca {path} is the dispatcher CA" in text, text
    assert "Traceback" not in text
    attack(f"api_client_ca = {which}", "exit 78 at start")


# ----- through HAProxy, to instances that trust the dispatcher CA for their peers ----------


@needs_haproxy
def test_agent_certificate_through_haproxy_to_a_cluster(tmp_path: Path) -> None:
    hook = _hook(tmp_path / "hooks")
    script = _script(tmp_path)
    spec = ClusterSpec(agents={"web1": "127.0.0.2", "web2": "127.0.0.3"},
                       scripts={"mark": str(script)}, names=("a", "b"), sync_mode="push",
                       tls=True, haproxy=True, extra={"auth_hook": str(hook)})  # fmt: skip
    with running_cluster(tmp_path / "c", spec) as c:
        compromised = c.agents["web1"].agent_cert  # a managed host's own certificate
        target = tmp_path / "pwned"
        ctx = client_ssl(c.ca_cert, compromised)
        with httpx.Client(base_url=c.api_url, verify=ctx, trust_env=False, timeout=30) as h:
            r = h.post("/run", json={"hosts": ["web2"], "script": "mark",
                                     "args": [str(target)]})  # fmt: skip
        assert r.status_code == 403, r.text
        time.sleep(0.3)
        assert not target.exists()
        assert not (tmp_path / "hooks" / "hook.jsonl").exists()
        logs = "".join(i.log.read_text(errors="replace") for i in c.insts.values())
        refused = [ln for ln in logs.splitlines() if "ACTION=api-refused" in ln]
        assert any(f"CERT_SERIAL={compromised.serial_hex}" in ln and "CERT_CN=agent.test" in ln
                   for ln in refused), refused  # fmt: skip
        runs = [p for i in c.insts.values() for p in (i.state / "runs").glob("*.json")]
        assert runs == []
        attack(
            "web1's agent certificate runs a script on web2 through HAProxy",
            f"403 {r.json().get('detail')}",
        )
        # the operator certificate still works through the same path
        assert c.operator is not None
        with httpx.Client(base_url=c.api_url, verify=c.verify(), trust_env=False,
                          timeout=30) as h:  # fmt: skip
            ok = h.post("/run", json={"hosts": ["web2"], "script": "mark",
                                      "args": [str(tmp_path / "operator-ran")]})  # fmt: skip
        assert ok.status_code == 200, ok.text
        assert (tmp_path / "operator-ran").exists()


def test_peers_forward_to_the_leader_but_agents_are_refused(tmp_path: Path) -> None:
    """shared-fs cluster over TLS: a follower forwards a leader-only request with its
    dispatcher certificate (trusted for peers, passes as no operator); an agent's
    certificate from the same CA asking the follower directly is refused."""
    spec = ClusterSpec(agents={"web1": "127.0.0.2"}, scripts={}, names=("a", "b"),
                       sync_mode="shared-fs", tls=True, proxy_protocol=False)  # fmt: skip
    with running_cluster(tmp_path / "c", spec) as c:
        leader = c.one_leader(timeout=20)
        follower = next(i for i in c.running() if i is not leader)

        def listed() -> httpx.Response | None:  # a new leader answers 503 while catching up
            with c.client(follower) as h:  # the operator certificate
                got = h.get("/pairing")
            return got if got.status_code != 503 else None

        r = wait_until(listed, 30, "the leader caught up")
        assert r.status_code == 200, r.text
        assert r.json()["leader"] == leader.id
        agent = c.agents["web1"].agent_cert
        ctx = client_ssl(c.ca_cert, agent)
        with httpx.Client(base_url=follower.url, verify=ctx, trust_env=False, timeout=30) as h:
            bad = h.get("/pairing")
        assert bad.status_code == 403, bad.text
        attack("an agent certificate asks a follower for the pairing queue",
               f"403 {bad.json().get('detail')}")  # fmt: skip

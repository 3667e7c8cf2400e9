"""``ced`` as a subprocess against real agents on 127.0.0.2 and 127.0.0.3."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from dispatcher.pairing import queue as pq
from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent, running_agents
from ops.lab.net import free_port, wait_listening
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import ROOT

pytestmark = pytest.mark.integration

CED = Path(sys.executable).parent / "ced"
RUN_LINE = re.compile(r"^==> (\S+)  \[(OK|FAIL)  exit:(-?\d+)  (\d+)ms  req:([0-9a-f]{16})\]$")
SLEEP_SCRIPT = "#!/bin/sh\nsleep 3\necho slept-3\n"
WEIRD_ARG = "a b  $(id) `id`; echo x | cat && 'q' \"dq\" * ~ \\"


@dataclass
class Env:
    tmp: Path
    conf: Path
    state: Path
    agents: list[AgentProc]
    scripts: Path

    def config(self, name: str, **extra: str) -> Path:
        """Another config on the same CA and state, plus ``extra`` keys."""
        base = self.conf.read_text()
        p = self.tmp / f"{name}.conf"
        p.write_text(base + "".join(f"{k} = {v}\n" for k, v in extra.items()))
        return p


def ced(
    *args: str, conf: Path | None = None, stdin: str = "", env: dict[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = [str(CED)] if CED.exists() else [sys.executable, "-m", "dispatcher.ced"]
    if conf is not None:
        cmd += ["--config", str(conf)]
    full_env = {"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT)}
    full_env.update(env or {})
    return subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True,
                          env=full_env, timeout=timeout)  # fmt: skip


def one_json(p: subprocess.CompletedProcess[str]) -> Any:
    """stdout must be exactly one JSON document."""
    assert p.stdout.endswith("\n") and p.stdout.count("\n") == 1, p.stdout
    return json.loads(p.stdout)


def write_conf(path: Path, ca_dir: Path, state: Path, **extra: str) -> Path:
    keys = {"ca_dir": str(ca_dir), "state_dir": str(state), "log_target": "stderr",
            "read_timeout": "10", **extra}  # fmt: skip
    path.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
    return path


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, pki: TestCA, dispatcher_cert: Issued,
    script_dir: Path,
) -> Iterator[Env]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("ced")
    sleeper = tmp / "sleep-script.sh"
    sleeper.write_text(SLEEP_SCRIPT)
    sleeper.chmod(0o755)
    scripts = {n: str(script_dir / f"{n}.sh") for n in ("echo-args", "exit3", "sleep1")}
    scripts["sleep-script"] = str(sleeper)
    # pki.dir holds ca.crt, dispatcher.crt and dispatcher.key: a real ca_dir.
    assert (pki.dir / "dispatcher.crt") == dispatcher_cert.cert
    agents = [
        make_agent(tmp / f"agent{i}", pki, {"disp": dispatcher_cert}, scripts, host=addr)
        for i, addr in enumerate(["127.0.0.2", "127.0.0.3"])
    ]
    state = tmp / "state"
    reg = Registry(state / "agents")
    for i, a in enumerate(agents):
        reg.register(
            f"web{i + 1}", ip=a.host, port=a.port, lookup_by="ip", expiry="Jan  1 00:00:00 2099 GMT"
        )
    conf = write_conf(tmp / "ctrl-exec.conf", pki.dir, state)
    with running_agents(agents):
        yield Env(tmp, conf, state, agents, script_dir)


# ----- run -------------------------------------------------------------------------------


def test_run_text_output_and_args_verbatim(env: Env) -> None:
    p = ced("run", "--order", "host", "web1", "web2", "echo-args", "--", "two words", WEIRD_ARG,
            conf=env.conf)  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    heads = [(i, RUN_LINE.match(line)) for i, line in enumerate(lines)]
    heads = [(i, m) for i, m in heads if m]
    assert [m.group(1) for _, m in heads] == ["web1", "web2"], p.stdout
    assert {m.group(2) for _, m in heads} == {"OK"}
    assert heads[0][1].group(5) == heads[1][1].group(5)  # one reqid for the run
    block = lines[heads[0][0] + 1 : heads[1][0]]
    assert block[:3] == ["argc=2", "arg1=[two words]", f"arg2=[{WEIRD_ARG}]"]
    assert json.loads(block[3].removeprefix("stdin="))["args"] == ["two words", WEIRD_ARG]
    assert block[4:] == ["    STDERR: to-stderr", ""]


def test_run_json_and_options_anywhere(env: Env) -> None:
    p = ced("run", "--json", "web1", "echo-args", "--", "--json", "x", conf=env.conf)
    assert p.returncode == 0, p.stderr
    doc = one_json(p)
    assert doc["ok"] == 1 and doc["ok"] is not True
    (r,) = doc["results"]
    assert r["host"] == "web1" and r["exit"] == 0 and r["script"] == "echo-args"
    assert "arg1=[--json]\narg2=[x]\n" in r["stdout"]
    assert re.fullmatch(r"\d+ms", r["rtt"]) and re.fullmatch(r"[0-9a-f]{16}", r["reqid"])
    q = ced("--json", "run", "web1", "echo-args", conf=env.conf)
    assert q.returncode == 0 and one_json(q)["results"][0]["stdout"].startswith("argc=0\n")


def test_run_script_failure_exit_code(env: Env) -> None:
    p = ced("run", "web1", "web2", "exit3", conf=env.conf)
    assert p.returncode == 1
    assert p.stdout.count("[FAIL  exit:3  ") == 2
    assert "about to exit 3\n" in p.stdout and "    STDERR: exit3 stderr line\n" in p.stdout
    j = ced("--json", "run", "web1", "exit3", conf=env.conf)
    assert j.returncode == 1 and one_json(j)["results"][0]["exit"] == 3
    mixed = ced("run", "web1", "echo-args", conf=env.conf)
    assert mixed.returncode == 0


def test_run_agent_refusal_is_a_failure(env: Env) -> None:
    p = ced("run", "web1", "not-allowed", conf=env.conf)
    assert p.returncode == 1
    assert "[FAIL  exit:-1" in p.stdout or "[FAIL  exit:" in p.stdout


def test_unknown_agents(env: Env) -> None:
    p = ced("run", "--strict", "nosuch", "web1", "other", "echo-args", conf=env.conf)
    assert p.returncode == 2
    assert "Error: unknown agent(s): nosuch, other" in p.stderr.splitlines()
    assert p.stdout == ""
    # without --strict the known ones run and the unknown ones are reported per host
    q = ced("run", "nosuch", "web1", "other", "echo-args", conf=env.conf)
    assert q.returncode == 1
    assert "==> nosuch  [UNKNOWN  not a registered agent]" in q.stdout.splitlines()
    assert "==> other  [UNKNOWN  not a registered agent]" in q.stdout.splitlines()
    assert "[OK  exit:0  " in q.stdout
    j = ced("--json", "ping", "ghost", conf=env.conf)
    assert j.returncode == 2 and one_json(j)["ok"] == 0
    assert "unknown agent(s): ghost" in one_json(j)["error"]


def test_usage_errors(env: Env) -> None:
    assert ced("run", "web1", conf=env.conf).returncode == 2
    assert ced(conf=env.conf).returncode == 2
    p = ced("frobnicate", conf=env.conf)
    assert p.returncode == 2 and "Unknown mode 'frobnicate'" in p.stderr
    v = ced("--version")
    assert v.returncode == 0 and re.match(r"ctrl-exec-dispatcher \d+\.\d+", v.stdout)
    missing = ced("list-agents", conf=env.tmp / "nope.conf")
    assert missing.returncode == 2 and "nope.conf" in missing.stderr


# ----- ping ------------------------------------------------------------------------------


def test_ping_table_and_json(env: Env) -> None:
    p = ced("ping", "--order", "host", "web1", "web2", conf=env.conf)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"{'HOST':<30}  {'STATUS':<8}  {'RTT':<8}  {'CERT EXPIRY':<28}  VERSION"
    assert lines[1] == "-" * 85
    for line, name in zip(lines[2:], ["web1", "web2"], strict=True):
        label = f"{name} (agent.test)"  # the agent reports another name: shown as upstream
        assert line.startswith(f"{label:<30}  {'ok':<8}  "), line
        assert re.search(r"  \d+ms +  \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} GMT +  \d+\.\d+", line)
    j = ced("--json", "ping", "web2", conf=env.conf)
    doc = one_json(j)
    assert doc["ok"] == 1 and doc["results"][0]["host"] == "web2"
    assert (
        doc["results"][0]["status"] == "ok"
        and doc["results"][0]["reported_hostname"] == "agent.test"
    )


# ----- async -----------------------------------------------------------------------------


def test_async_status_wait(env: Env) -> None:
    fast = {"CED_WAIT_INTERVAL": "0.2"}
    # a 3 s script: still pending when `wait --timeout 0` asks, even on a busy machine
    p = ced("run", "--async", "web1", "web2", "sleep-script", conf=env.conf,
            env={"SUDO_USER": "carol"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    m = re.match(r"^Submitted async run  req:([0-9a-f]{16})$", p.stdout.splitlines()[0])
    assert m, p.stdout
    reqid = m.group(1)
    assert re.search(r"^==> web1  \[accepted  \d+ms\]$", p.stdout, re.M)
    record = json.loads((env.state / "runs" / f"{reqid}.json").read_text())
    me = pwd.getpwuid(os.getuid()).pw_name  # the real user, not $USER ("tester")
    assert (record["unix_user"], record["sudo_user"]) == (me, "carol"), record
    t = ced("wait", reqid, "--timeout", "0", conf=env.conf)
    assert t.returncode == 2 and "[PENDING]" in t.stdout
    s = ced("--json", "status", reqid, conf=env.conf)
    assert s.returncode == 0 and one_json(s)["ok"] == 1
    w = ced("wait", reqid, "--timeout", "20", conf=env.conf, env=fast)
    assert w.returncode == 0, w.stdout + w.stderr
    assert w.stdout.splitlines()[0] == f"Request {reqid}  (script: sleep-script)  [COMPLETE]"
    assert "==> web1  [done  exit:0]\nslept-3\n==> web2  [done  exit:0]\nslept-3\n" in w.stdout
    wj = ced("--json", "wait", reqid, conf=env.conf)
    doc = one_json(wj)
    assert doc["complete"] is True and doc["hosts"]["web2"]["exit"] == 0 and wj.returncode == 0
    f = ced("--json", "run", "--async", "web1", "exit3", conf=env.conf)
    assert f.returncode == 0
    fw = ced("wait", one_json(f)["reqid"], conf=env.conf, env=fast)
    assert fw.returncode == 1 and "==> web1  [done  exit:3]" in fw.stdout


def test_status_unknown(env: Env) -> None:
    p = ced("status", "feedfacefeedface", conf=env.conf)
    assert p.returncode == 1 and "No such request: feedfacefeedface" in p.stderr
    j = ced("--json", "wait", "feedfacefeedface", conf=env.conf)
    assert j.returncode == 1
    assert one_json(j) == {"ok": 0, "error": "not found", "reqid": "feedfacefeedface"}


# ----- locks -----------------------------------------------------------------------------


def test_lock_is_held_for_the_whole_run(env: Env) -> None:
    first = subprocess.Popen(
        [str(CED), "--config", str(env.conf), "run", "web1", "sleep-script"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            held = one_json(ced("--json", "list-locks", conf=env.conf))["locks"]
            if held:
                break
            time.sleep(0.1)
        assert held == [{"host": "web1", "script": "sleep-script"}]
        text = ced("list-locks", conf=env.conf).stdout.splitlines()
        assert text[2] == f"{'web1':<30}  sleep-script"
        p = ced("run", "web2", "web1", "sleep-script", conf=env.conf)
        assert p.returncode == 1
        assert "Locked: already running: web1:sleep-script" in p.stderr.splitlines()
        assert p.stdout == ""
        j = ced("--json", "run", "web1", "sleep-script", conf=env.conf)
        assert j.returncode == 1
        assert one_json(j) == {"ok": 0, "error": "locked", "code": 4,
                               "conflicts": ["web1:sleep-script"]}  # fmt: skip
        other = ced("run", "web2", "echo-args", conf=env.conf)  # other pairs run
        assert other.returncode == 0
    finally:
        out, _ = first.communicate(timeout=30)
    assert first.returncode == 0 and "slept-3" in out
    # web2 was not locked by the refused run: it ran nothing, and the lock is free now.
    assert ced("list-locks", conf=env.conf).stdout == "No locks currently held.\n"


# ----- auth hook -------------------------------------------------------------------------


def _hook(env: Env, name: str, body: str) -> Path:
    p = env.tmp / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_auth_hook_allow_sees_context(env: Env) -> None:
    seen = env.tmp / "hook-seen"
    hook = _hook(
        env, "allow.sh", f"env | grep ^ENVEXEC_ | sort > {seen}\ncat > {seen}.json\nexit 0\n"
    )
    conf = env.config("allow", auth_hook=str(hook))
    p = ced("--username", "alice", "run", "web1", "echo-args", "--", "x y", conf=conf,
            env={"ENVEXEC_TOKEN": "s3cret"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    ctx = json.loads((env.tmp / "hook-seen.json").read_text())
    assert ctx["action"] == "run" and ctx["script"] == "echo-args"
    assert ctx["hosts"] == ["web1"] and ctx["args"] == ["x y"]
    assert (ctx["username"], ctx["token"], ctx["source_ip"]) == ("alice", "s3cret", "127.0.0.1")
    assert re.fullmatch(r"[0-9a-f]{16}", ctx["reqid"])
    lines = seen.read_text().splitlines()
    assert "ENVEXEC_ACTION=run" in lines and "ENVEXEC_USERNAME=alice" in lines
    me = pwd.getpwuid(os.getuid()).pw_name  # a local run: the Unix user is the identity
    assert ctx["identity"] == {"cn": me, "serial": "", "issuer_fingerprint": ""}
    assert f"ENVEXEC_IDENTITY={me}" in lines
    assert all(f"UNIX_USER={me}" in ln for ln in p.stderr.splitlines() if "ACTION=" in ln)
    q = ced("ping", "web2", conf=conf)
    assert q.returncode == 0
    assert json.loads((env.tmp / "hook-seen.json").read_text())["action"] == "ping"
    assert "ACTION=auth" in p.stderr and "RESULT=pass" in p.stderr


def test_auth_hook_deny_and_timeout(env: Env) -> None:
    deny = env.config("deny", auth_hook=str(_hook(env, "deny.sh", "exit 3\n")))
    p = ced("run", "web1", "echo-args", conf=deny)
    assert p.returncode == 1 and p.stdout == ""
    assert "Denied: insufficient privilege" in p.stderr.splitlines()
    j = ced("--json", "ping", "web1", conf=deny)
    assert j.returncode == 1
    assert one_json(j) == {"ok": 0, "error": "insufficient privilege", "code": 3}
    slow = env.config("slow", auth_hook=str(_hook(env, "slow.sh", "sleep 30\n")),
                      auth_hook_timeout="1")  # fmt: skip
    t0 = time.monotonic()
    s = ced("run", "web1", "echo-args", conf=slow)
    assert time.monotonic() - t0 < 10
    assert s.returncode == 1 and "Denied: auth hook timed out" in s.stderr
    gone = env.config("gone", auth_hook=str(env.tmp / "missing-hook"))
    g = ced("run", "web1", "echo-args", conf=gone)
    assert g.returncode == 1 and "Denied: auth hook not found or not executable" in g.stderr


# ----- registry verbs --------------------------------------------------------------------


def test_list_edit_unpair(tmp_path: Path, pki: TestCA) -> None:
    state = tmp_path / "state"
    conf = write_conf(tmp_path / "c.conf", pki.dir, state)
    empty = ced("list-agents", conf=conf)
    assert empty.returncode == 0 and empty.stdout == "No registered agents.\n"
    assert one_json(ced("--json", "list-agents", conf=conf)) == []
    reg = Registry(state / "agents")
    reg.register("alpha", ip="10.0.0.1", expiry="Jan  1 00:00:00 2099 GMT", tags={"role": "web"})
    reg.register("beta", ip="10.0.0.2", port=7500, tags={"role": "db", "dc": "x"})
    p = ced("list-agents", conf=conf)
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["HOSTNAME", "IP", "PORT", "LOOKUP", "PAIRED", "CERT", "EXPIRY",
                                "DAYS", "LEFT"]  # fmt: skip
    assert lines[2].startswith(f"{'alpha':<30}  {'10.0.0.1':<16}  {'7443':<5}  {'hostname':<8}  ")
    assert lines[2].endswith("Jan  1 00:00:00 2099 GMT  " + lines[2].split()[-1])
    assert int(lines[2].split()[-1]) > 20000
    recs = one_json(ced("list-agents", "--json", conf=conf))
    assert [r["hostname"] for r in recs] == ["alpha", "beta"] and recs[1]["port"] == 7500
    f = one_json(ced("--json", "list-agents", "--tags", "role=db,dc=x", conf=conf))
    assert [r["hostname"] for r in f] == ["beta"]
    assert ced("list-agents", "--tags", "role=none", conf=conf).stdout == (
        "No agents match the tag filter.\n"
    )
    assert ced("list-agents", "--tags", "junk", conf=conf).returncode == 2

    e = ced("edit-agent", "alpha", "--rename", "gamma", "--ip", "10.9.9.9", "--agent-port",
            "8443", "--lookup-by", "ip", conf=conf)  # fmt: skip
    assert e.returncode == 0, e.stderr
    assert e.stdout == ("Updated agent 'gamma'.\n  renamed from: alpha\n  ip:        10.9.9.9\n"
                        "  port:      8443\n  lookup_by: ip\n")  # fmt: skip
    assert reg.get("alpha") is None
    assert reg.get("gamma") == {**reg.get("gamma"), "ip": "10.9.9.9", "port": 8443}  # type: ignore[dict-item]
    ej = ced("--json", "edit-agent", "beta", "--ip", "10.0.0.3", conf=conf)
    assert one_json(ej)["ip"] == "10.0.0.3"
    assert ced("edit-agent", "beta", conf=conf).returncode == 2
    clash = ced("edit-agent", "beta", "--rename", "gamma", conf=conf)
    assert clash.returncode == 1 and "Edit failed:" in clash.stderr

    u = ced("unpair", "gamma", conf=conf)
    assert u.returncode == 0
    assert u.stdout.splitlines()[:2] == [
        "Unregistered 'gamma'.",
        "WARNING: Agent certificate remains valid until: Jan  1 00:00:00 2099 GMT",
    ]
    assert reg.names() == ["beta"]
    again = ced("unpair", "gamma", conf=conf)
    assert again.returncode == 1 and "Unpair failed" in again.stderr


# ----- PKI and pairing verbs -------------------------------------------------------------


def _csr(cn: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_setup_ca_dispatcher_and_pairing_queue(tmp_path: Path) -> None:
    ca_dir, state = tmp_path / "etc", tmp_path / "state"
    conf = write_conf(tmp_path / "c.conf", ca_dir, state)
    p = ced("setup-ca", conf=conf)
    assert p.returncode == 0, p.stderr
    assert f"  Key:  {ca_dir / 'ca.key'}" in p.stdout.splitlines()
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    key_before = (ca_dir / "ca.key").read_bytes()
    again = ced("setup-ca", conf=conf)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert (ca_dir / "ca.key").read_bytes() == key_before

    d = ced("setup-ctrl-exec", conf=conf)
    assert d.returncode == 0, d.stderr
    assert (ca_dir / "dispatcher.crt").exists() and (ca_dir / "dispatcher.key").exists()

    # Pairing queue: one request approved, one denied.
    pdir = state / "pairing"
    r1 = pq.submit(pdir, hostname="host1.example", csr=_csr("host1.example"), nonce="n1",
                   source_ip="192.0.2.7")  # fmt: skip
    r2 = pq.submit(pdir, hostname="host2.example", csr=_csr("host2.example"), nonce="n2",
                   source_ip="192.0.2.8")  # fmt: skip
    lr = ced("list-requests", conf=conf)
    assert lr.returncode == 0 and r1["id"] in lr.stdout and r1["code"] in lr.stdout
    a = ced("approve", r1["id"], "--lookup-by", "ip", conf=conf)
    assert a.returncode == 0, a.stderr
    assert a.stdout.splitlines()[0] == (
        f"Approved 'host1.example' ({r1['id']}). Cert delivered on next poll."
    )
    assert "lookup_by=ip   addr=192.0.2.7:7443" in a.stdout
    assert (pdir / f"{r1['id']}.approved").exists()
    dn = ced("deny", r2["id"], conf=conf)
    assert dn.returncode == 0 and dn.stdout == f"Denied request '{r2['id']}'.\n"
    assert ced("approve", "0123456789abcdef", conf=conf).returncode == 1
    assert ced("list-requests", conf=conf).stdout == "No pending pairing requests.\n"

    # A registered agent exists now: replacing the dispatcher cert asks first.
    serial = (ca_dir / "dispatcher.crt").read_bytes()
    no = ced("setup-ctrl-exec", conf=conf, stdin="n\n")
    assert no.returncode == 0 and "Proceed? [y/N]: " in no.stdout and "Aborted." in no.stdout
    assert (ca_dir / "dispatcher.crt").read_bytes() == serial
    yes = ced("setup-ctrl-exec", "--yes", conf=conf)
    assert yes.returncode == 0 and (ca_dir / "dispatcher.crt").read_bytes() != serial

    # rotate-cert (dispatcher.pki.rotation); the one agent is unreachable, so it stays pending.
    Registry(state / "agents").update("host1.example", ip="127.0.0.1", port=free_port())
    before = (ca_dir / "dispatcher.crt").read_bytes()
    rot = ced("rotate-cert", conf=conf)
    assert rot.returncode == 0, rot.stderr
    lines = rot.stdout.splitlines()
    assert lines[0] == "Rotating dispatcher certificate..."
    assert re.fullmatch(r"New serial:      [0-9a-f]+", lines[1]) and "Agents pending:  1" in lines
    assert "  Failed:  1" in lines and (ca_dir / "dispatcher.crt").read_bytes() != before


def test_pairing_mode_start_stop(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "c.conf", tmp_path / "etc", tmp_path / "state",
                      pairing_bind="127.0.0.1")  # fmt: skip
    assert ced("setup-ca", conf=conf).returncode == 0
    assert ced("setup-ctrl-exec", conf=conf).returncode == 0
    port = free_port()
    fg = ced("pairing-mode", "--timeout", "1", "--port", str(port), conf=conf)
    assert fg.returncode == 0, fg.stderr
    assert fg.stdout.startswith(f"Pairing mode active on port {port} (auto-stops in 1s).")
    from agent.common.certs import ca_fingerprint

    fp = ca_fingerprint(tmp_path / "etc" / "ca.crt")
    assert f"--ca-fingerprint {fp}" in fg.stdout and fp.startswith("SHA256:")
    assert ced("pairing-mode", "--timeout", "601", conf=conf).returncode == 2
    st = ced("pairing-mode", "start", "--timeout", "60", "--port", str(port), conf=conf)
    assert st.returncode == 0, st.stderr
    assert f"CA fingerprint: {fp}" in st.stdout
    pidfile = tmp_path / "state" / "pairing-mode.pid"
    try:
        wait_listening("127.0.0.1", port, None, timeout=5)
        assert ced("pairing-mode", "start", "--port", str(port), conf=conf).returncode == 1
    finally:
        stop = ced("pairing-mode", "stop", conf=conf)
    assert stop.returncode == 0 and stop.stdout.startswith("Pairing mode stopped (pid ")
    deadline = time.monotonic() + 5
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()
    assert ced("pairing-mode", "stop", conf=conf).returncode == 1


# ----- rotation verbs (dispatcher.pki.rotation) -----------------------------------------------


def test_serial_status_and_maintain(env: Env, tmp_path: Path, pki: TestCA) -> None:
    s = ced("--json", "serial-status", conf=env.conf)
    assert s.returncode == 0, s.stderr
    doc = one_json(s)  # no header lines before the JSON (upstream prints them)
    assert doc["state"] is None and [a["hostname"] for a in doc["agents"]] == ["web1", "web2"]
    t = ced("serial-status", conf=env.conf)
    assert t.stdout.startswith("No rotation has been performed.\n\nHOSTNAME ")
    empty = write_conf(tmp_path / "m.conf", pki.dir, tmp_path / "state")
    m = ced("--json", "maintain", conf=empty)
    assert m.returncode == 0, m.stderr
    doc = one_json(m)
    assert (doc["ok"], doc["agents"], doc["pinged"]) == (1, 0, 0)
    mt = ced("maintain", conf=empty)
    assert mt.stdout == "Maintenance run: 0/0 agents pinged, dispatcher cert checked.\n"


@pytest.mark.parametrize("hosts", [["web1"], ["web1", "web2"]])
def test_interrupt_exits_130_and_frees_the_locks(env: Env, hosts: list[str]) -> None:
    # One host runs on the main thread, several on worker threads (dispatcher.client.blocking).
    import signal

    run = subprocess.Popen(
        [str(CED), "--config", str(env.conf), "run", *hosts, "sleep-script"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(one_json(ced("--json", "list-locks", conf=env.conf))["locks"]) == len(hosts):
                break
            time.sleep(0.05)
        time.sleep(0.2)  # the requests are out
        t0 = time.monotonic()
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130 and "Interrupted." in err
    assert time.monotonic() - t0 < 2  # not after the 3 s script
    assert ced("list-locks", conf=env.conf).stdout == "No locks currently held.\n"

"""A real agent process over real TLS: every endpoint, trust failure and bad input."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab.agentproc import AgentProc, body, make_agent
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import ROOT

pytestmark = pytest.mark.integration


def _scripts(script_dir: Path) -> dict[str, str]:
    names = ["echo-args", "exit3", "env-dump", "sleep1", "sleep-long", "big-output", "selfkill"]
    out = {n: str(script_dir / f"{n}.sh") for n in names}
    out["noexec"] = str(script_dir / "noexec.sh")
    out["missing"] = str(script_dir / "does-not-exist.sh")
    return out


@pytest.fixture
def agent(
    tmp_path: Path, pki: TestCA, dispatcher_cert: Issued, script_dir: Path
) -> Iterator[AgentProc]:
    a = make_agent(
        tmp_path / "agent",
        pki,
        {"disp-a": dispatcher_cert},
        _scripts(script_dir),
        extra={"max_output": "1000000", "script_timeout": "5"},
    )
    a.start()
    yield a
    a.stop()


def run(
    a: AgentProc, who: Issued, script: str, args: list[str] | None = None, **kw: object
) -> dict:
    req = {
        "script": script,
        "args": args or [],
        "reqid": "0123456789abcdef",
        "username": "",
        "token": "",
        **kw,
    }
    resp = a.call("POST", "/run", req, who)
    assert resp.code in (200, 202, 409)
    return body(resp)


def test_ping_fields(agent: AgentProc, dispatcher_cert: Issued) -> None:
    resp = agent.call("POST", "/ping", {"reqid": "fb1c2a17d11ce0fc"}, dispatcher_cert)
    assert resp.code == 200
    b = body(resp)
    assert set(b) == {"status", "host", "version", "expiry", "staged", "reqid"}
    assert b["status"] == "ok" and b["host"] == "agent.test" and b["staged"] is False
    assert b["reqid"] == "fb1c2a17d11ce0fc"
    assert b["expiry"].endswith(" GMT") and len(b["expiry"].split()) == 5


def test_upstream_lwp_request_bytes_and_exact_framing(
    agent: AgentProc, dispatcher_cert: Issued
) -> None:
    payload = b'{"token":"","args":["hello","two words"],"script":"echo-args","reqid":"eee58e10e0d8383d","username":""}'
    raw = (
        b"POST /run HTTP/1.1\r\nTE: deflate,gzip;q=0.3\r\nConnection: TE, close\r\n"
        b"Host: vm:7450\r\nUser-Agent: libwww-perl/6.68\r\n"
        + f"Content-Length: {len(payload)}\r\n".encode()
        + b"Content-Type: application/json\r\n\r\n"
        + payload
    )
    data = agent.raw(raw, dispatcher_cert)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.0 200 OK"
    assert lines[1:] == [b"Content-Type: application/json", f"Content-Length: {len(rest)}".encode()]
    b = json.loads(rest)
    assert b["exit"] == 0 and b["script"] == "echo-args" and b["reqid"] == "eee58e10e0d8383d"
    assert b["stdout"].startswith("argc=2\narg1=[hello]\narg2=[two words]\nstdin={")
    ctx = json.loads(b["stdout"].split("stdin=", 1)[1])
    assert set(ctx) == {
        "script",
        "args",
        "reqid",
        "peer_ip",
        "username",
        "token",
        "dispatcher",
        "timestamp",
    }
    assert ctx["dispatcher"] == "disp-a" and ctx["args"] == ["hello", "two words"]
    assert b["stderr"] == "to-stderr\n"
    assert set(b) == {"script", "exit", "stdout", "stderr", "reqid"}


def test_shell_metacharacters_arrive_literally(agent: AgentProc, dispatcher_cert: Issued) -> None:
    evil = ["; touch /tmp/pwned-ctrl-exec", "$(id)", "`id`", "a|b", "x && y", "'\"", "\n"]
    b = run(agent, dispatcher_cert, "echo-args", evil, username="alice", token="s3cret")
    for i, a in enumerate(evil[:-1], 1):
        assert f"arg{i}=[{a}]" in b["stdout"]
    assert not Path("/tmp/pwned-ctrl-exec").exists()
    ctx = json.loads(b["stdout"].split("stdin=", 1)[1])
    assert ctx["username"] == "alice" and ctx["token"] == "s3cret"


def test_exit_codes_and_env(agent: AgentProc, dispatcher_cert: Issued) -> None:
    b = run(agent, dispatcher_cert, "exit3")
    assert (
        b["exit"] == 3
        and b["stdout"] == "about to exit 3\n"
        and b["stderr"] == "exit3 stderr line\n"
    )
    assert run(agent, dispatcher_cert, "selfkill")["exit"] == 126
    assert run(agent, dispatcher_cert, "noexec")["exit"] == 127
    assert run(agent, dispatcher_cert, "missing")["exit"] == 127
    env = run(agent, dispatcher_cert, "env-dump")["stdout"]
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in env
    assert "ENVEXEC" not in env and "PYTHONPATH" not in env


def test_timeout_and_bounded_output(agent: AgentProc, dispatcher_cert: Issued) -> None:
    t0 = time.monotonic()
    b = run(agent, dispatcher_cert, "sleep-long")
    assert b["exit"] == -1 and "timed out after 5s" in b["error"]
    assert time.monotonic() - t0 < 12
    big = run(agent, dispatcher_cert, "big-output")
    assert big["exit"] == 0 and len(big["stdout"]) == 1_000_000 and big["stdout_truncated"] is True


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not-json", {"error": "invalid JSON", "exit": -1}),
        (b"[1,2]", {"error": "invalid JSON", "exit": -1}),
        (
            b'{"script":"echo-args","args":"x","reqid":"r1"}',
            {"error": "args must be an array", "reqid": "r1", "exit": -1},
        ),
        (
            b'{"script":"echo-args","args":[{"a":1}],"reqid":"r1"}',
            {"error": "args must be strings", "reqid": "r1", "exit": -1},
        ),
        (
            b'{"script":"echo-args","args":["a\\u0000b"],"reqid":"r1"}',
            {"error": "args must not contain NUL bytes", "reqid": "r1", "exit": -1},
        ),
        (b'{"script":"echo-args","reqid":5}', {"error": "reqid must be a string", "exit": -1}),
        (
            b'{"script":"not-allowed","args":[],"reqid":"r1"}',
            {"script": "not-allowed", "exit": -1, "reqid": "r1", "error": "script not permitted"},
        ),
        (
            b'{"script":"../echo-args","reqid":"r1"}',
            {"script": "../echo-args", "exit": -1, "reqid": "r1", "error": "script not permitted"},
        ),
        (
            b'{"script":"/bin/sh","reqid":"r1"}',
            {"script": "/bin/sh", "exit": -1, "reqid": "r1", "error": "script not permitted"},
        ),
        (
            b'{"script":["echo-args"],"reqid":"r1"}',
            {"script": ["echo-args"], "exit": -1, "reqid": "r1", "error": "script not permitted"},
        ),
        (
            b'{"script":"","reqid":"r1"}',
            {"script": "", "exit": -1, "reqid": "r1", "error": "script not permitted"},
        ),
    ],
)
def test_run_bad_input(
    agent: AgentProc, dispatcher_cert: Issued, payload: bytes, expected: dict
) -> None:
    raw = (
        b"POST /run HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )
    data = agent.raw(raw, dispatcher_cert)
    assert data.startswith(b"HTTP/1.0 200 OK\r\n")
    assert json.loads(data.partition(b"\r\n\r\n")[2]) == expected


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"\r\n", b"400", "empty request"),
        (b"GET /nope HTTP/1.0\r\n\r\n", b"404", "not found"),
        (b"DELETE /run HTTP/1.0\r\n\r\n", b"404", "not found"),
        (b"GET /run?x=1 HTTP/1.0\r\n\r\n", b"404", "not found"),
        (b"POST /run HTTP/1.0\r\n" + b"X-Flood: 1\r\n" * 40 + b"\r\n", b"431", "too many headers"),
        (b"POST /run HTTP/1.0\r\nContent-Length: 2000000\r\n\r\n", b"413", "request too large"),
    ],
)
def test_framing_refusals(
    agent: AgentProc, dispatcher_cert: Issued, raw: bytes, status: bytes, error: str
) -> None:
    data = agent.raw(raw, dispatcher_cert)
    assert data.split(b" ")[1] == status
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"] == error


def test_full_1mib_body_is_read_whole(agent: AgentProc, dispatcher_cert: Issued) -> None:
    # Upstream cuts bodies short at about 16 KiB; we read up to 1 MiB (one argv string is
    # capped at 128 KiB by Linux, so send several).
    args = [chr(ord("a") + i) * 110_000 for i in range(8)]
    b = run(agent, dispatcher_cert, "echo-args", args)
    assert b["exit"] == 0
    for i, arg in enumerate(args, 1):
        assert f"arg{i}=[{arg}]" in b["stdout"]


def test_untrusted_and_wrong_ca_and_no_cert(agent: AgentProc, pki: TestCA, tmp_path: Path) -> None:
    # A CA-signed cert whose serial is not in the map (the agent's own, as in the captures).
    resp = agent.call("POST", "/ping", {"reqid": "x"}, agent.agent_cert)
    assert resp.code == 403 and body(resp) == {"error": "serial mismatch", "status": "forbidden"}
    for path in ("/run", "/result/abc", "/rotate-serial"):
        method = "GET" if path.startswith("/result") else "POST"
        assert agent.call(method, path, {}, agent.agent_cert).code == 403
    cap = agent.call("GET", "/capabilities", None, agent.agent_cert)
    assert cap.code == 403 and body(cap) == {"error": "forbidden"}
    # A certificate from an unrelated CA, and no certificate at all: refused at the handshake.
    other = TestCA(tmp_path / "other").issue("intruder")
    for who in (other, None):
        with pytest.raises((ssl.SSLError, ConnectionResetError, ValueError, BrokenPipeError)):
            agent.call("POST", "/ping", {"reqid": "x"}, who)
    # ...and the listener is still serving.
    assert agent.proc is not None and agent.proc.poll() is None
    assert "ACTION=serial-reject" in agent.logtext() and "ACTION=tls-failure" in agent.logtext()


def test_revoked_serial_refused_before_request(
    agent: AgentProc, pki: TestCA, dispatcher_cert: Issued
) -> None:
    second = pki.issue("disp-revoked")
    with agent.trust_map.open("a") as fh:
        fh.write(f"{second.serial_hex} disp-a\n")
    (agent.root / "revoked").write_text(f"# revoked\n0x{second.serial_hex}\n")
    agent.hup()
    # No request at all is sent: the 403 comes before the request is read.
    ctx = agent.client_ctx(second)
    with socket.create_connection((agent.host, agent.port)) as s0, ctx.wrap_socket(s0) as s:
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.0 403 Forbidden")
    assert json.loads(data.partition(b"\r\n\r\n")[2]) == {"error": "certificate revoked"}
    assert agent.call("POST", "/ping", {}, dispatcher_cert).code == 200


def test_sighup_reload_and_broken_files_keep_last_good(
    agent: AgentProc, dispatcher_cert: Issued, pki: TestCA, script_dir: Path
) -> None:
    assert run(agent, dispatcher_cert, "newone")["error"] == "script not permitted"
    with agent.allowlist.open("a") as fh:
        fh.write(f"newone = {script_dir}/exit3.sh\n")
    agent.hup()
    assert run(agent, dispatcher_cert, "newone")["exit"] == 3
    revoked_one = pki.issue("rev2")
    with agent.trust_map.open("a") as fh:
        fh.write(f"{revoked_one.serial_hex} disp-a\n")
    (agent.root / "revoked").write_text(f"{revoked_one.serial_hex}\n")
    agent.hup()
    assert agent.call("POST", "/ping", {}, revoked_one).code == 403
    # A broken revocation list must not un-revoke anything.
    (agent.root / "revoked").write_text(f"{revoked_one.serial_hex}\nthis is not a serial\n")
    agent.allowlist.rename(agent.allowlist.with_suffix(".gone"))
    agent.hup()
    assert agent.call("POST", "/ping", {}, revoked_one).code == 403
    assert run(agent, dispatcher_cert, "newone")["exit"] == 3
    log = agent.logtext()
    assert "keeping the last good list" in log and "keeping the last good allowlist" in log
    assert "revoked:2:" in log


def test_silent_clients_do_not_block_others(agent: AgentProc, dispatcher_cert: Issued) -> None:
    # from another address: more than max_conns_per_ip (8) from the dispatcher's own would
    # be refused before TLS (tests/security/test_dos_bounds.py)
    idle = [socket.create_connection((agent.host, agent.port), source_address=("127.0.0.2", 0))
            for _ in range(20)]  # fmt: skip
    tls: list[ssl.SSLSocket] = []
    try:
        # Half of them complete the handshake and then say nothing.
        ctx = agent.client_ctx(dispatcher_cert)
        tls = [
            ctx.wrap_socket(socket.create_connection((agent.host, agent.port))) for _ in range(5)
        ]
        t0 = time.monotonic()
        assert agent.call("POST", "/ping", {}, dispatcher_cert, timeout=5).code == 200
        assert time.monotonic() - t0 < 1.0
    finally:
        for s in idle + tls:
            s.close()


def test_concurrent_runs_do_not_block_each_other(agent: AgentProc, dispatcher_cert: Issued) -> None:
    results: list[dict] = []
    threads = [
        threading.Thread(target=lambda: results.append(run(agent, dispatcher_cert, "sleep1")))
        for _ in range(8)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r["exit"] == 0 for r in results)
    assert time.monotonic() - t0 < 4.0  # serially it would take 8 s


def test_async_run_busy_result_owner(
    agent: AgentProc, dispatcher_cert: Issued, pki: TestCA
) -> None:
    first = agent.call(
        "POST",
        "/run",
        {"script": "sleep1", "args": [], "reqid": "async01", "async": True},
        dispatcher_cert,
    )
    assert first.code == 202 and body(first) == {
        "script": "sleep1",
        "status": "accepted",
        "reqid": "async01",
    }
    busy = agent.call(
        "POST",
        "/run",
        {"script": "sleep1", "args": [], "reqid": "async02", "async": True},
        dispatcher_cert,
    )
    assert busy.code == 409
    assert body(busy) == {
        "script": "sleep1",
        "status": "busy",
        "reqid": "async02",
        "error": "script already running",
    }
    bad = agent.call(
        "POST", "/run", {"script": "sleep1", "reqid": "bad id!", "async": True}, dispatcher_cert
    )
    assert body(bad)["error"] == "async run requires a valid reqid"
    running = body(agent.call("GET", "/result/async01", None, dispatcher_cert))
    assert running["status"] == "running" and running["owner"] == "disp-a"
    # Another dispatcher identity cannot see it.
    other = pki.issue("disp-b")
    with agent.trust_map.open("a") as fh:
        fh.write(f"{other.serial_hex} disp-b\n")
    agent.hup()
    hidden = agent.call("GET", "/result/async01", None, other)
    assert hidden.code == 404 and body(hidden) == {"status": "unknown", "reqid": "async01"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = body(agent.call("GET", "/result/async01", None, dispatcher_cert))
        if rec["status"] == "done":
            break
        time.sleep(0.2)
    assert rec["exit"] == 0 and rec["stdout"] == "slept\n" and rec["finished"]
    assert agent.call("GET", "/result/nope", None, dispatcher_cert).code == 404
    assert agent.call("GET", "/result/../x", None, dispatcher_cert).code == 404
    again = agent.call(
        "POST",
        "/run",
        {"script": "sleep1", "args": [], "reqid": "async03", "async": True},
        dispatcher_cert,
    )
    assert again.code == 202


def test_async_job_survives_agent_restart(agent: AgentProc, dispatcher_cert: Issued) -> None:
    r = agent.call(
        "POST",
        "/run",
        {"script": "sleep1", "args": [], "reqid": "surv01", "async": True},
        dispatcher_cert,
    )
    assert r.code == 202
    agent.stop()
    agent.start()
    time.sleep(1.5)
    rec = body(agent.call("GET", "/result/surv01", None, dispatcher_cert))
    assert rec["status"] == "done" and rec["exit"] == 0


def test_rotate_serial_add_remove(agent: AgentProc, dispatcher_cert: Issued, pki: TestCA) -> None:
    new = pki.issue("disp-a-new")
    assert agent.call("POST", "/ping", {}, new).code == 403
    r = agent.call(
        "POST",
        "/rotate-serial",
        {"serial": new.serial_hex.upper(), "action": "add"},
        dispatcher_cert,
    )
    assert body(r) == {
        "status": "ok",
        "action": "add",
        "serial": new.serial_hex,
        "dispatcher": "disp-a",
    }
    assert agent.call("POST", "/ping", {}, new).code == 200
    assert f"{new.serial_hex} disp-a" in agent.trust_map.read_text()
    # The new cert retires the old serial.
    r = agent.call(
        "POST", "/rotate-serial", {"serial": dispatcher_cert.serial_hex, "action": "remove"}, new
    )
    assert body(r)["status"] == "ok"
    assert agent.call("POST", "/ping", {}, dispatcher_cert).code == 403
    # Restore for other identities' checks: a foreign id cannot remove our serial.
    other = pki.issue("disp-c")
    with agent.trust_map.open("a") as fh:
        fh.write(f"{other.serial_hex} disp-c\n")
    agent.hup()
    r = agent.call("POST", "/rotate-serial", {"serial": new.serial_hex, "action": "remove"}, other)
    assert body(r) == {"status": "error", "error": "serial not owned by 'disp-c'"}
    for bad, err in (
        ({"action": "add"}, "serial required"),
        ({"serial": "ab", "action": "zap"}, "invalid action 'zap'"),
        ({"serial": "xyz", "action": "add"}, "invalid serial 'xyz'"),
    ):
        assert body(agent.call("POST", "/rotate-serial", bad, new))["error"] == err
    assert "ACTION=rotate DISPATCHER=disp-a" in agent.logtext()


def test_renewal_staged_then_adopted_on_sighup(
    agent: AgentProc, dispatcher_cert: Issued, pki: TestCA
) -> None:
    r = body(agent.call("POST", "/renew", {"reqid": "rn1"}, dispatcher_cert))
    assert r["status"] == "ok" and r["reqid"] == "rn1" and "BEGIN CERTIFICATE REQUEST" in r["csr"]
    # A cert for another key is refused and nothing is staged.
    foreign = pki.issue("foreign").cert.read_text()
    bad = body(
        agent.call(
            "POST", "/renew-complete", {"cert": foreign, "ca": "", "reqid": "rn1"}, dispatcher_cert
        )
    )
    assert bad["status"] == "error" and "does not match" in bad["error"]
    assert (
        body(agent.call("POST", "/renew-complete", {"reqid": "rn1"}, dispatcher_cert))["error"]
        == "cert required"
    )
    new_pem = pki.sign_csr_pem(r["csr"], days=400)
    ok = body(
        agent.call(
            "POST", "/renew-complete", {"cert": new_pem, "ca": "", "reqid": "rn1"}, dispatcher_cert
        )
    )
    assert ok == {"status": "ok", "reqid": "rn1", "staged": True}
    assert body(agent.call("POST", "/ping", {}, dispatcher_cert))["staged"] is True
    cli = [sys.executable, "-m", "agent.cli", "--config", str(agent.config)]
    assert subprocess.run([*cli, "cert-staged"], cwd=ROOT).returncode == 0
    agent.hup()
    ctx = agent.client_ctx(dispatcher_cert)
    with socket.create_connection((agent.host, agent.port)) as s0, ctx.wrap_socket(s0) as s:
        served = s.getpeercert(binary_form=True)
    from cryptography import x509

    assert served is not None
    assert (
        x509.load_der_x509_certificate(served).serial_number
        == x509.load_pem_x509_certificate(new_pem.encode()).serial_number
    )
    assert body(agent.call("POST", "/ping", {}, dispatcher_cert))["staged"] is False
    assert subprocess.run([*cli, "cert-staged"], cwd=ROOT).returncode == 1


def test_capabilities_tags_schema(
    tmp_path: Path, pki: TestCA, dispatcher_cert: Issued, script_dir: Path
) -> None:
    sd = tmp_path / "s"
    sd.mkdir()
    s = sd / "with-schema.sh"
    s.write_text("#!/bin/sh\n")
    s.chmod(0o755)
    (sd / "with-schema.sh.schema.json").write_text(json.dumps({"version": "1.2", "args": []}))
    a = make_agent(
        tmp_path / "a",
        pki,
        {"d": dispatcher_cert},
        {"with-schema": str(s), "exit3": str(script_dir / "exit3.sh")},
        allowlist_extra="bad line here\n",
    )
    a.config.write_text(a.config.read_text() + "[tags]\nrole = web\nenv = prod\n")
    a.start()
    try:
        b = body(a.call("GET", "/capabilities", None, dispatcher_cert))
    finally:
        a.stop()
    assert b["tags"] == {"role": "web", "env": "prod"}
    assert [x["name"] for x in b["scripts"]] == ["exit3", "with-schema"]
    ws = b["scripts"][1]
    assert ws["schema_version"] == "1.2" and ws["schema"]["args"] == [] and ws["executable"] is True
    assert "scripts.conf:3: malformed allowlist line skipped" in a.logtext()


def test_agent_auth_hook(
    tmp_path: Path, pki: TestCA, dispatcher_cert: Issued, script_dir: Path
) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text(
        '#!/bin/sh\ncat > /dev/null\n[ "$ENVEXEC_SCRIPT" = exit3 ] && exit 3\n'
        '[ "$ENVEXEC_DISPATCHER" = d ] || exit 1\nexit 0\n'
    )
    hook.chmod(0o755)
    a = make_agent(
        tmp_path / "a",
        pki,
        {"d": dispatcher_cert},
        {"exit3": str(script_dir / "exit3.sh"), "echo-args": str(script_dir / "echo-args.sh")},
        extra={"auth_hook": str(hook)},
    )
    a.start()
    try:
        assert run(a, dispatcher_cert, "exit3")["error"] == "not authorised: insufficient privilege"
        assert run(a, dispatcher_cert, "echo-args")["exit"] == 0
    finally:
        a.stop()
    assert "ACTION=auth AUTHACTION=run" in a.logtext()


def test_allowed_ips_and_volume_limit(
    tmp_path: Path, pki: TestCA, dispatcher_cert: Issued, script_dir: Path
) -> None:
    a = make_agent(
        tmp_path / "a", pki, {"d": dispatcher_cert}, {}, extra={"allowed_ips": "10.0.0.0/8"}
    )
    a.start()
    try:
        with pytest.raises((ssl.SSLError, ConnectionResetError, ValueError, BrokenPipeError)):
            a.call("POST", "/ping", {}, dispatcher_cert)
    finally:
        a.stop()
    assert "ACTION=ip-block PEER=127.0.0.1" in a.logtext()
    b = make_agent(
        tmp_path / "b",
        pki,
        {"d": dispatcher_cert},
        {},
        extra={"rate_limit_disable": "0", "rate_limit_volume": "3/60/300"},
    )
    b.start()
    try:
        # Trusted dispatchers are exempt from the volume count (they fan out to us)...
        assert all(b.call("POST", "/ping", {}, dispatcher_cert).code == 200 for _ in range(6))

        def attempt(who: Issued) -> int:
            try:
                return b.call("POST", "/ping", {}, who).code
            except (ssl.SSLError, ConnectionResetError, ValueError, BrokenPipeError):
                return 0

        # ...others are not: the 4th connection in the window starts a block for the IP.
        assert [attempt(b.agent_cert) for _ in range(5)] == [403, 403, 403, 0, 0]
        assert attempt(dispatcher_cert) == 0
    finally:
        b.stop()
    assert "ACTION=rate-block PEER=127.0.0.1 REASON=volume" in b.logtext()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_modes(agent: AgentProc) -> None:
    v = _cli("--version")
    assert v.returncode == 0 and v.stdout.startswith("ctrl-exec-agent 0.")
    assert _cli().returncode == 0
    assert _cli("bogus").returncode == 2
    conf = ["--config", str(agent.config), "--allowlist", str(agent.allowlist)]
    assert _cli(*conf, "paired").returncode == 0
    ps = _cli(*conf, "pairing-status")
    assert ps.returncode == 0 and ps.stdout.startswith("Paired. Certificate expires:")
    sc = _cli(*conf, "self-check")
    assert (
        sc.returncode == 0
        and "Allowlist OK (9 scripts)" in sc.stdout
        and "[NOT EXECUTABLE]" in sc.stdout
    )
    sp = _cli(*conf, "self-ping")
    assert sp.returncode == 0 and sp.stdout.startswith("PASS")
    assert _cli(*conf, "cert-staged").returncode == 1


def test_config_errors_exit_78(tmp_path: Path) -> None:
    bad = tmp_path / "agent.conf"
    bad.write_text("port = 7443\ncert = /x\nkey = /y\nca = /z\noops\n")
    r = _cli("--config", str(bad), "serve")
    assert r.returncode == 78 and f"{bad}:5:" in r.stderr and "configuration error" in r.stderr
    unpaired = tmp_path / "unpaired.conf"
    unpaired.write_text(
        f"port = 7443\ncert = {tmp_path}/a.crt\nkey = {tmp_path}/a.key\nca = {tmp_path}/ca.crt\n"
    )
    r = _cli("--config", str(unpaired), "serve")
    assert r.returncode == 78 and "not been paired" in r.stderr
    assert _cli("--config", str(unpaired), "paired").returncode == 1
    assert _cli("--config", str(unpaired), "pairing-status").returncode == 1


def test_promote_cert_cli(tmp_path: Path, pki: TestCA, dispatcher_cert: Issued) -> None:
    a = make_agent(tmp_path / "a", pki, {"d": dispatcher_cert}, {})
    conf = ["--config", str(a.config)]
    staged = a.state_dir / "agent.crt.staged"
    # An invalid staged cert (another key) is deleted and the live cert is untouched.
    staged.write_text(pki.issue("other-key").cert.read_text())
    before = a.agent_cert.cert.read_bytes()
    assert _cli(*conf, "promote-cert").returncode == 0
    assert not staged.exists() and a.agent_cert.cert.read_bytes() == before
    # A valid one (same key, our CA) replaces the live cert.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(a.agent_cert.key.read_bytes(), None)
    new = pki.sign_public_key(key.public_key(), "agent.test", days=500)
    staged.write_bytes(new.public_bytes(serialization.Encoding.PEM))
    assert _cli(*conf, "cert-staged").returncode == 0
    assert _cli(*conf, "promote-cert").returncode == 0
    assert not staged.exists()
    live = x509.load_pem_x509_certificate(a.agent_cert.cert.read_bytes())
    assert live.serial_number == new.serial_number

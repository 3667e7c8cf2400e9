"""Executor mode for real: a root ``ctrl-exec-executor``, an agent running as an unprivileged
user over real mTLS, scripts under per-script profiles (users, groups, capabilities,
read-only filesystem, no_new_privs), and the executor's refusals.

Root only (users, mount namespaces, setuid): skipped, visibly, otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.executor import protocol
from ops.lab.agentproc import (
    ENV,
    ROOT,
    AgentProc,
    as_user,
    body,
    make_agent,
    user_env,
)
from ops.lab.executorproc import (
    ExecutorProc,
    Users,
    call,
    decode_reply,
    raw_exchange,
    request,
    throwaway_users,
)
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="executor tests need root (users, mounts)"),
]

SCRIPTS = {
    # who am I, which capabilities, which limits, what came on stdin
    "ident": """#!/bin/sh
id
grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status
echo "core=$(ulimit -c) nofile=$(ulimit -n)"
printf 'stdin='; cat; echo
""",
    # try to write each path given; report per path
    "writer": """#!/bin/sh
for p in "$@"; do
  if echo x > "$p" 2>/dev/null; then echo "wrote $p"; else echo "denied $p"; fi
done
""",
    "env": "#!/bin/sh\nenv | sort\n",
    "runbin": '#!/bin/sh\nexec "$@"\n',
    "bindlow": """#!/usr/bin/python3
import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 1023))
    print("bound")
except PermissionError as exc:
    print("refused", exc)
""",
    "slow": '#!/bin/sh\nsleep 2\necho done > "$1"\necho finished\n',
    "hang": "#!/bin/sh\nsleep 30\n",
    "big": "#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\\\0' y\n",
}


@dataclass
class Host:
    base: Path
    users: Users
    ca: TestCA
    dispatcher: Issued
    scripts: Path

    @property
    def socket(self) -> Path:
        return self.base / "run" / "exec.sock"


def _profiles(h: Host) -> str:
    u = h.users
    return f"""
[profile default]
run_as = nobody

[profile team]
run_as = {u.runner.pw_name}

[profile netbind]
run_as = daemon
caps = CAP_NET_BIND_SERVICE

[profile confined]
run_as = {u.runner.pw_name}
writable = {h.base}/rw

[profile rootish]
no_new_privileges = yes

[profile broken]
run_as = nobody
writable = {h.base}/does-not-exist
"""


def _allowlist(h: Host) -> dict[str, str]:
    s = h.scripts
    return {
        "ident": f"{s}/ident",
        "ident-team": f"{s}/ident profile=team",
        "ident-net": f"{s}/ident profile=netbind",
        "ident-root": f"{s}/ident profile=rootish",
        "writer-confined": f"{s}/writer profile=confined",
        "writer-root": f"{s}/writer profile=rootish",
        "env": f"{s}/env",
        "runbin": f"{s}/runbin",
        "bindlow": f"{s}/bindlow",
        "bindlow-net": f"{s}/bindlow profile=netbind",
        "slow": f"{s}/slow profile=confined",
        "hang": f"{s}/hang",
        "big": f"{s}/big",
        "secret": f"{s}/secret",
        "ident-broken": f"{s}/ident profile=broken",
    }


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    base = Path(tempfile.mkdtemp(prefix="cexec-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        with throwaway_users(str(os.getpid() % 100000)) as users:
            for d in ("run", "rw", "ro", "open", "suid", "scripts", "pki"):
                (base / d).mkdir(mode=0o755)
            for d in ("rw", "ro"):  # the run_as user may write both as far as modes go
                os.chown(base / d, users.runner.pw_uid, users.runner.pw_gid)
            for name, text in SCRIPTS.items():
                p = base / "scripts" / name
                p.write_text(text)
                p.chmod(0o755)
            secret = base / "scripts" / "secret"
            secret.write_text("#!/bin/sh\necho secret\n")
            secret.chmod(0o700)  # root only: not executable by nobody
            shutil.copy("/usr/bin/id", base / "suid" / "id")
            (base / "suid" / "id").chmod(0o4755)
            ca = TestCA(base / "pki")
            yield Host(base, users, ca, ca.issue("dispatcher"), base / "scripts")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _agent(h: Host, name: str, executor: bool = True, user: bool = True) -> AgentProc:
    """An agent under ``base/<name>`` (its config directory is protected from scripts)."""
    extra = {"script_timeout": "4", "max_output": "100000"}
    if executor:
        extra["executor_socket"] = str(h.socket)
    scripts = {n: v.split()[0] for n, v in _allowlist(h).items()}
    a = make_agent(h.base / name, h.ca, {"disp-a": h.dispatcher}, scripts, extra=extra)
    # Profile annotations and sections (make_agent writes bare paths and top-level keys).
    a.allowlist.write_text("".join(f"{n} = {v}\n" for n, v in _allowlist(h).items()))
    with open(a.config, "a") as fh:
        fh.write(_profiles(h))
    a.root.chmod(0o755)
    agent_user = h.users.agent
    for p in (a.state_dir, a.agent_cert.key):
        os.chown(p, agent_user.pw_uid, agent_user.pw_gid)
    for p in a.state_dir.iterdir():
        os.chown(p, agent_user.pw_uid, agent_user.pw_gid)
    a.user = agent_user.pw_name if user else None
    return a


@pytest.fixture(scope="module")
def stack(host: Host) -> Iterator[tuple[ExecutorProc, AgentProc]]:
    a = _agent(host, "agent")
    ex = ExecutorProc(a.config, a.allowlist, host.socket, host.users.agent.pw_name,
                      host.base / "executor.log")  # fmt: skip
    try:
        ex.start()
        a.start()
        yield ex, a
    finally:
        a.stop()
        ex.stop()


def run(a: AgentProc, who: Issued, script: str, args: list[str] | None = None,
        **kw: Any) -> dict[str, Any]:  # fmt: skip
    req = {"script": script, "args": args or [], "reqid": "exec-test-1", "username": "u",
           "token": "", **kw}  # fmt: skip
    resp = a.call("POST", "/run", req, who, timeout=40)
    assert resp.code in (200, 202), resp
    return body(resp)


def _status_field(out: str, key: str) -> str:
    m = re.search(rf"^{key}:\s*(\S+)", out, re.M)
    assert m, out
    return m.group(1)


# ----- identity, groups, capabilities, limits, environment ------------------------------


def test_agent_runs_unprivileged_and_socket_is_private(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    a = stack[1]
    assert a.proc is not None
    status = Path(f"/proc/{a.proc.pid}/status").read_text()
    assert _status_field(status, "Uid") == str(host.users.agent.pw_uid)
    st_ = host.socket.stat()
    assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_uid == host.users.agent.pw_uid


def test_default_profile_runs_as_nobody_without_caps(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    b = run(stack[1], host.dispatcher, "ident")
    assert b["exit"] == 0, b
    out = b["stdout"]
    assert out.startswith("uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"), out
    for key in ("CapEff", "CapBnd", "CapAmb"):
        assert int(_status_field(out, key), 16) == 0, out
    assert _status_field(out, "NoNewPrivs") == "1"
    assert "core=0 nofile=1024" in out
    ctx = out.split("stdin=", 1)[1]
    assert '"script":"ident"' in ctx and '"dispatcher":"disp-a"' in ctx and '"username":"u"' in ctx


def test_run_as_user_gets_its_supplementary_groups(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    b = run(stack[1], host.dispatcher, "ident-team")
    assert b["exit"] == 0, b
    first = b["stdout"].splitlines()[0]
    r = host.users.runner
    assert first.startswith(f"uid={r.pw_uid}({r.pw_name}) gid={r.pw_gid}({r.pw_name}) "), first
    assert f"({host.users.group})" in first, first


def test_caps_become_ambient_and_bound_the_set(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    b = run(stack[1], host.dispatcher, "ident-net")
    out = b["stdout"]
    assert out.startswith("uid=1(daemon) "), b
    bit = 1 << 10  # CAP_NET_BIND_SERVICE
    for key in ("CapEff", "CapBnd", "CapAmb"):
        assert int(_status_field(out, key), 16) == bit, out
    # ... and they work: only the profile with the capability binds a port below 1024.
    bound = run(stack[1], host.dispatcher, "bindlow-net")
    assert bound["stdout"].strip() == "bound", bound["stderr"]
    assert run(stack[1], host.dispatcher, "bindlow")["stdout"].startswith("refused")


def test_profile_without_run_as_is_root_with_no_capabilities(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    out = run(stack[1], host.dispatcher, "ident-root")["stdout"]
    assert out.startswith("uid=0(root) "), out
    assert int(_status_field(out, "CapBnd"), 16) == 0 and int(_status_field(out, "CapEff"), 16) == 0


def test_environment_is_clean(host: Host, stack: tuple[ExecutorProc, AgentProc]) -> None:
    out = run(stack[1], host.dispatcher, "env")["stdout"]
    names = {line.split("=", 1)[0] for line in out.splitlines() if "=" in line}
    assert {"PATH", "HOME", "USER", "LOGNAME"} <= names
    assert names <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "PWD"}, names
    assert "USER=nobody" in out and "HOME=/nonexistent" in out


# ----- filesystem ---------------------------------------------------------------------


def test_writes_only_where_the_profile_allows(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    b = host.base
    marker = f"/tmp/cexec-private-{os.getpid()}"
    targets = [f"{b}/rw/ok", f"{b}/ro/no", marker, f"{stack[1].state_dir}/planted"]
    out = run(stack[1], host.dispatcher, "writer-confined", targets)["stdout"]
    assert f"wrote {b}/rw/ok" in out, out
    assert f"denied {b}/ro/no" in out, out  # owned by run_as: only the mount forbids it
    assert f"wrote {marker}" in out, out  # a private /tmp ...
    assert not os.path.exists(marker)  # ... that the host never sees
    assert f"denied {stack[1].state_dir}/planted" in out
    assert (b / "rw" / "ok").stat().st_uid == host.users.runner.pw_uid
    assert not (b / "ro" / "no").exists()


def test_agent_directories_are_read_only_even_for_root(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    a = stack[1]
    targets = [f"{host.base}/open/by-root", f"{a.state_dir}/planted", f"{a.root}/planted"]
    out = run(a, host.dispatcher, "writer-root", targets)["stdout"]
    assert f"wrote {host.base}/open/by-root" in out, out  # no writable list: unrestricted
    assert f"denied {a.state_dir}/planted" in out and f"denied {a.root}/planted" in out, out
    assert not (a.state_dir / "planted").exists()


def test_setuid_binary_cannot_regain_root(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    suid = str(host.base / "suid" / "id")
    # Control: outside the executor the setuid bit does make nobody root on this filesystem.
    ctl = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          suid, "-u"], capture_output=True, text=True, timeout=10)  # fmt: skip
    assert ctl.stdout.strip() == "0", ctl
    b = run(stack[1], host.dispatcher, "runbin", [suid, "-u"])
    assert b["exit"] == 0, b
    assert b["stdout"].strip() == "65534", b


def test_script_not_executable_by_run_as_is_126(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    b = run(stack[1], host.dispatcher, "secret")
    assert b["exit"] == 126, b
    assert "cannot be executed by the profile's run_as user (nobody)" in b["stderr"], b


def test_a_profile_that_cannot_be_applied_fails_closed(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    b = run(stack[1], host.dispatcher, "ident-broken")
    assert b["exit"] == 126 and b["stdout"] == "", b
    assert b["stderr"] == (
        "executor: profile could not be applied: "
        f"writable path {host.base}/does-not-exist does not exist\n"
    )


# ----- limits, async ---------------------------------------------------------------------


def test_same_limits_as_direct_mode(host: Host, stack: tuple[ExecutorProc, AgentProc]) -> None:
    big = run(stack[1], host.dispatcher, "big")
    assert big["exit"] == 0 and len(big["stdout"]) == 100000 and big["stdout_truncated"] is True
    t0 = time.monotonic()
    hang = run(stack[1], host.dispatcher, "hang")
    assert hang["exit"] == -1 and "timed out after 4s" in hang["error"], hang
    assert time.monotonic() - t0 < 15


def test_async_run_goes_through_the_executor(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    a = stack[1]
    reqid = f"async{os.getpid()}"
    acc = run(a, host.dispatcher, "ident-team", reqid=reqid, **{"async": True})
    assert acc["status"] == "accepted", acc

    def done() -> dict[str, Any] | None:
        r = a.call("GET", f"/result/{reqid}", None, host.dispatcher)
        rec = body(r) if r.code == 200 else None
        return rec if rec and rec.get("status") == "done" else None

    rec = wait_until(done, 20, "the async record")
    assert rec["exit"] == 0, rec
    assert rec["stdout"].startswith(f"uid={host.users.runner.pw_uid}("), rec


def test_capabilities_report_profiles(host: Host, stack: tuple[ExecutorProc, AgentProc]) -> None:
    resp = stack[1].call("GET", "/capabilities", None, host.dispatcher)
    assert resp.code == 200
    got = {s["name"]: s["profile"] for s in body(resp)["scripts"]}
    assert got["ident"] == "default" and got["ident-net"] == "netbind"
    assert got["writer-confined"] == "confined"


def test_self_check_reports_profile_and_run_as(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    a = stack[1]
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "self-check", "--config", str(a.config),
         "--allowlist", str(a.allowlist)],
        capture_output=True, text=True, timeout=30, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out
    text = out.stdout
    assert f"Script 'ident': {host.scripts}/ident  (profile: default) [ok]" in text
    assert f"Script 'secret': {host.scripts}/secret  (profile: default) [NOT EXECUTABLE]" in text
    assert "not executable by nobody: no read and execute permission" in text
    assert "runs as daemon (uid 1, gid 1); run_as daemon, caps CAP_NET_BIND_SERVICE" in text


# ----- the executor's own refusals ------------------------------------------------------


def test_executor_refuses_other_uids(host: Host, stack: tuple[ExecutorProc, AgentProc]) -> None:
    with pytest.raises(PermissionError):  # the socket's mode keeps others out ...
        raw_exchange(host.socket, b"", 65534)
    reply = call(host.socket, request("ident"), 0)  # ... and root, who passes modes, is refused
    assert reply["exit"] == -1 and reply["error"] == "peer uid 0 is not allowed", reply
    assert "ACTION=exec-reject" in stack[0].logtext()


def test_executor_refuses_unknown_scripts_and_profiles(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    a = stack[1]
    uid = host.users.agent.pw_uid
    reply = call(host.socket, request("not-listed"), uid)
    assert reply["exit"] == -1 and reply["error"] == "executor: script not permitted", reply
    ok = call(host.socket, request("ident", stdin='{"k":1}'), uid)
    assert ok["exit"] == 0 and 'stdin={"k":1}' in ok["stdout"], ok
    # The allowlist gains a script whose profile does not exist: the executor re-reads
    # the file and refuses it, whatever the agent thinks.
    before = a.allowlist.read_text()
    try:
        a.allowlist.write_text(before + f"ghost = {host.scripts}/ident profile=nosuch\n")
        reply = call(host.socket, request("ghost"), uid)
        assert reply["exit"] == -1 and reply["error"] == "executor: undefined profile 'nosuch'"
    finally:
        a.allowlist.write_text(before)


def test_executor_refuses_malformed_and_oversized_frames(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    uid = host.users.agent.pw_uid
    cases = {
        struct.pack(">I", protocol.MAX_REQUEST + 1) + b"{}": "over the",
        struct.pack(">I", 0xFFFFFFFF): "over the",
        struct.pack(">I", 100) + b'{"v":1': "cut short",
        struct.pack(">I", 4) + b"\xff\xfe[]": "not UTF-8 JSON",
        struct.pack(">I", 2) + b"[]": "not a JSON object",
        protocol.encode({"v": 2, "script": "ident", "args": []}): "version",
        protocol.encode({**request("ident"), "args": ["a\0b"]}): "NUL",
        protocol.encode({**request("ident"), "script": "../ident"}): "allowlist name",
        protocol.encode({**request("ident"), "args": "x"}): "args must be a list",
        b"\x00\x00": "closed before a frame",
    }
    for data, why in cases.items():
        reply = decode_reply(raw_exchange(host.socket, data, uid))
        assert reply["exit"] == -1 and why in reply["error"], (data[:40], reply)
    assert stack[0].alive


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda b: struct.pack(">I", len(b)) + b, st.binary(max_size=200)),
        st.builds(
            lambda o: protocol.encode(o),
            st.dictionaries(
                st.sampled_from(["v", "script", "args", "stdin", "reqid", "dispatcher", "x"]),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(),
                    st.text(max_size=20),
                    st.lists(st.text(max_size=5), max_size=3),
                ),
                max_size=7,
            ),
        ),
    )
)
def test_fuzzed_frames_never_run_anything_and_never_kill_it(
    host: Host, stack: tuple[ExecutorProc, AgentProc], junk: bytes
) -> None:
    out = raw_exchange(host.socket, junk, host.users.agent.pw_uid, timeout=15)
    reply = decode_reply(out)
    # Only a well-formed request for a listed script may run; everything else is refused.
    if reply["exit"] != -1:
        obj = json.loads(junk[4:])
        assert protocol.parse_request(obj).script in _allowlist(host), (junk, reply)
    assert stack[0].alive


def test_executor_survives_the_agents_death_mid_run(
    host: Host, stack: tuple[ExecutorProc, AgentProc]
) -> None:
    ex, a = stack
    marker = host.base / "rw" / f"slow-{os.getpid()}"
    result: dict[str, Any] = {}

    def call_slow() -> None:
        try:
            result["body"] = run(a, host.dispatcher, "slow", [str(marker)])
        except Exception as exc:  # the agent dies under this request
            result["error"] = exc

    t = threading.Thread(target=call_slow)
    t.start()
    wait_until(lambda: _running(host.scripts / "slow"), 10, "the slow run to start", step=0.05)
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait(10)
    t.join(15)
    assert "error" in result, result
    # The executor lives on; the orphaned run completes and is logged, its result dropped.
    wait_until(marker.exists, 10, "the orphaned run to finish")
    wait_until(lambda: "ACTION=exec-orphan" in ex.logtext(), 10, "the orphan log line")
    assert ex.alive
    a.start()  # a new agent process is served as before
    assert run(a, host.dispatcher, "ident")["exit"] == 0


def _running(path: Path) -> bool:
    """Some process runs the script at ``path`` (its command line names it)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    return True
            except OSError:
                pass
    return False


# ----- the agent's side -------------------------------------------------------------------


def test_agent_refuses_to_start_with_an_undefined_profile(host: Host) -> None:
    a = _agent(host, "agent-badprofile")
    a.allowlist.write_text(a.allowlist.read_text() + f"ghost = {host.scripts}/ident profile=nope\n")
    out = subprocess.run(
        [*as_user(a.user), "-m", "agent.cli", "serve", "--config", str(a.config),
         "--allowlist", str(a.allowlist)],
        capture_output=True, text=True, timeout=30, env=user_env(a.user),
    )  # fmt: skip
    assert out.returncode == 78, out
    assert "script 'ghost': profile 'nope' is not defined" in out.stderr


def test_agent_reports_an_unreachable_executor(host: Host) -> None:
    a = _agent(host, "agent-noexec")
    absent = host.base / "run" / "absent.sock"
    a.config.write_text(a.config.read_text().replace(str(host.socket), str(absent)))
    try:
        a.start()
        b = run(a, host.dispatcher, "ident")
        assert b["exit"] == -1 and b["error"].startswith("executor unreachable:"), b
    finally:
        a.stop()


def test_without_executor_the_agent_runs_scripts_itself(host: Host) -> None:
    a = _agent(host, "agent-direct", executor=False)
    try:
        a.start()
        b = run(a, host.dispatcher, "ident-net")  # profiles are inert in direct mode
        agent_user = host.users.agent
        assert b["stdout"].startswith(f"uid={agent_user.pw_uid}({agent_user.pw_name}) "), b
        assert "profiles are inert without executor_socket" in a.logtext()
    finally:
        a.stop()

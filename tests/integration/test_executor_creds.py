"""What a script starts with under the executor, field by field: the credentials switched
in the spawner's child (:mod:`agent.executor.creds`) against each profile and against
the util-linux reference (``setpriv ... -- env``, :meth:`Plan.command`); the script is the
executor's own child with only fds 0-2; the spawner comes back when it dies; the mount
table watch.

Root only, like ``test_executor.py`` (whose module fixtures it reuses).
"""

# ruff: noqa: F811 - the fixtures of test_executor.py, imported, are parameters here

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import profiles
from agent.executor.sandbox import MountWatch, Plan
from ops.lab.executorproc import ExecutorProc, call, request
from ops.lab.proc import wait_until
from tests.integration.test_executor import Host, host, stack  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="executor tests need root (users, mounts)"),
]

FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
STATUS = f"""#!/usr/bin/python3
import os
want = {FIELDS!r}
for line in open("/proc/self/status"):
    if line.split(":")[0] in want:
        print(line.rstrip())
print("PPid:", os.getppid())
print("fds:", sorted(int(f) for f in os.listdir("/proc/self/fd")))
"""
PROFILES = {"status-default": "default", "status-team": "team", "status-net": "netbind",
            "status-root": "rootish"}  # fmt: skip
Stack = tuple[ExecutorProc, object]


@pytest.fixture(scope="module")
def status(host: Host, stack: Stack) -> Iterator[Path]:
    """A script printing its own credentials, listed under four profiles (the executor
    re-reads the allowlist when it changes)."""
    path = host.scripts / "status"
    path.write_text(STATUS)
    path.chmod(0o755)
    allowlist = stack[1].allowlist  # type: ignore[attr-defined]
    before = allowlist.read_text()
    allowlist.write_text(
        before + "".join(f"{n} = {path} profile={p}\n" for n, p in PROFILES.items())
    )
    try:
        yield path
    finally:
        allowlist.write_text(before)


def _run(host: Host, name: str) -> dict[str, str]:
    reply = call(host.socket, request(name), host.users.agent.pw_uid)
    assert reply["exit"] == 0, reply
    return dict(re.findall(r"^(\w+):\s*(.*)$", reply["stdout"], re.M))


def _caps(*names: str) -> str:
    return f"{sum(1 << profiles.CAPABILITIES.index(n) for n in names):016x}"


def test_each_capability_set_and_no_new_privs_match_the_profile_exactly(
    host: Host, stack: Stack, status: Path
) -> None:
    none, net = _caps(), _caps("CAP_NET_BIND_SERVICE")
    want = {  # name: (uid, CapInh = CapPrm = CapEff = CapBnd = CapAmb)
        "status-default": (65534, none), "status-team": (host.users.runner.pw_uid, none),
        "status-net": (1, net), "status-root": (0, none),
    }  # fmt: skip
    for name, (uid, caps) in want.items():
        got = _run(host, name)
        assert got["Uid"].split() == [str(uid)] * 4, (name, got)
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert got[key] == caps, (name, key, got)
        assert got["NoNewPrivs"] == "1", (name, got)


def test_credentials_are_those_of_the_setpriv_reference(
    host: Host, stack: Stack, status: Path
) -> None:
    """The same script started the old way (``setpriv ... -- env -- script``, which the
    executor used before) gets the same ids, groups, five capability sets and
    no_new_privs."""
    a = stack[1]
    cfg_text = a.config.read_text()  # type: ignore[attr-defined]
    for name, prof_name in PROFILES.items():
        prof = _profile(cfg_text, prof_name)
        plan = Plan(prof, profiles.resolve_user(prof.run_as))
        ref = subprocess.run(plan.command(str(status), []), env=plan.env(), cwd="/",
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert ref.returncode == 0, ref
        want = dict(re.findall(r"^(\w+):\s*(.*)$", ref.stdout, re.M))
        got = _run(host, name)
        assert {k: got[k] for k in FIELDS} == {k: want[k] for k in FIELDS}, name


def _profile(cfg_text: str, name: str) -> profiles.Profile:
    section = cfg_text.split(f"[profile {name}]\n", 1)[1].split("\n[", 1)[0]
    entries = {k.strip(): (1, v.strip()) for k, v in
               (line.split("=", 1) for line in section.splitlines() if "=" in line)}  # fmt: skip
    return profiles.parse({name: entries}, "agent.conf", [])[name]


def test_the_script_is_the_executors_child_with_only_stdio(
    host: Host, stack: Stack, status: Path
) -> None:
    got = _run(host, "status-default")
    assert stack[0].proc is not None
    assert got["PPid"] == str(stack[0].proc.pid), got  # clone3(CLONE_PARENT)
    assert got["fds"] == "[0, 1, 2, 3]", got  # 3: the listing's own directory


def test_a_killed_spawner_is_replaced(host: Host, stack: Stack, status: Path) -> None:
    ex = stack[0]
    assert ex.proc is not None
    assert _run(host, "status-default")["Uid"]
    spawners = _spawners(ex.proc.pid)
    assert spawners, "no spawner under the executor"
    for pid in spawners:
        os.kill(pid, 9)
    wait_until(lambda: not set(spawners) & set(_spawners(ex.proc.pid, live=True)), 10,
               "the spawners to die")  # fmt: skip
    assert _run(host, "status-default")["Uid"].split()[0] == "65534"
    assert ex.alive
    # The dead ones were reaped: no zombie is left under the executor.
    assert not [p for p in _children(ex.proc.pid) if _state(p) == "Z"]


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _spawners(pid: int, live: bool = False) -> list[int]:
    out = []
    for kid in _children(pid):
        try:
            cmd = Path(f"/proc/{kid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"agent.executor.spawner" in cmd and (not live or _state(kid) != "Z"):
            out.append(kid)
    return out


def test_mount_watch_sees_mounts_and_unmounts() -> None:
    w = MountWatch()
    try:
        before = w.current()
        assert w.current() is before  # nothing changed: not read again
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
            subprocess.run(["mount", "-t", "tmpfs", "cexec-watch", d], check=True)
            try:
                assert f" {d} ".encode() in w.current()
            finally:
                subprocess.run(["umount", d], check=True)
            assert w.current() == before
    finally:
        w.close()

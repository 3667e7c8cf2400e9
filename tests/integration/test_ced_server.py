"""``ced`` through its command server: the same results as run directly, with the client's
arguments, stdin, working directory, umask, environment and signals; a killed client
interrupts its command; changed code and idleness end the server; a server is started
only from a terminal (or when asked). Real agents, real processes, a real pty."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent, running_agents
from ops.lab.cedserver import Served, ced_cmd, ced_python, log_pids
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import ROOT
from tests.integration.test_ced import WEIRD_ARG, ced, write_conf

pytestmark = pytest.mark.integration

SLEEPER = "#!/bin/sh\nsleep 8\necho slept\n"
VOLATILE = re.compile(r"\d+ms|[0-9a-f]{16}|\d{4}-\d\d-\d\dT[\d:.]+Z|in \d+\.\ds")


@dataclass
class Fleet:
    tmp: Path
    conf: Path
    state: Path


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, pki: TestCA, dispatcher_cert: Issued,
    script_dir: Path,
) -> Iterator[Fleet]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("cedserver")
    sleeper = tmp / "sleeper.sh"
    sleeper.write_text(SLEEPER)
    sleeper.chmod(0o755)
    scripts = {n: str(script_dir / f"{n}.sh") for n in ("echo-args", "exit3")}
    scripts["sleeper"] = str(sleeper)
    agents: list[AgentProc] = [
        make_agent(tmp / f"agent{i}", pki, {"disp": dispatcher_cert}, scripts, host=addr)
        for i, addr in enumerate(["127.0.0.2", "127.0.0.3"])
    ]
    state = tmp / "state"
    reg = Registry(state / "agents")
    for i, a in enumerate(agents):
        reg.register(f"web{i + 1}", ip=a.host, port=a.port, lookup_by="ip",
                     expiry="Jan  1 00:00:00 2099 GMT")  # fmt: skip
    conf = write_conf(tmp / "ctrl-exec.conf", pki.dir, state)
    with running_agents(agents):
        yield Fleet(tmp, conf, state)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with Served(tmp_path / "run") as s:
        yield s


def normal(text: str) -> str:
    return VOLATILE.sub("#", text)


def children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            kids |= {int(x) for x in f.read().split()}
    return kids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


# ----- the same command, the same result -------------------------------------------------


def test_served_commands_give_what_direct_ones_give(fleet: Fleet, served: Served) -> None:
    conf = str(fleet.conf)
    cases = [
        ["run", "--order", "host", "web1", "web2", "echo-args", "--", "two words", WEIRD_ARG],
        ["run", "web1", "exit3"],  # the script fails: exit 1
        ["run", "--strict", "web1", "nosuch-host", "echo-args"],  # exit 2
        ["--json", "run", "web1", "web2", "echo-args", "--", "x"],
        ["--json", "ping", "web1", "web2"],
        ["run"],  # a usage error
        ["list-agents"],
    ]
    for args in cases:
        direct = ced("--config", conf, *args)
        pid, p = served.run("--config", conf, *args)
        assert p.returncode == direct.returncode, (args, p.stderr, direct.stderr)
        if "--json" in args:
            a, b = json.loads(p.stdout), json.loads(direct.stdout)
            assert a.keys() == b.keys() and a.get("counts") == b.get("counts"), args
        else:
            assert normal(p.stdout) == normal(direct.stdout), args
        assert pid not in log_pids(p.stderr), f"{args}: the server's child runs it, not ced"
        if "web2" in args and args[0] == "run":  # a run that reached agents logged its lines
            assert log_pids(p.stderr), args
    assert served.pid() is not None


def test_stdin_cwd_umask_and_environment_are_the_clients(
    fleet: Fleet, served: Served, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # no --config: CTRL_EXEC_CONFIG from the client's environment; targets on stdin;
    # -o relative to the client's working directory, files made with the client's umask
    pid, p = served.run("run", "-o", "out", "-", "echo-args", "--", "hi", stdin="web1\nweb2\n",
                        cwd=work, CTRL_EXEC_CONFIG=str(fleet.conf))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert pid not in log_pids(p.stderr)
    for host in ("web1", "web2"):
        out = work / "out" / f"{host}.stdout"
        assert "hi" in out.read_text()
    script = "umask 077; exec " + " ".join(ced_cmd()) + " run -o out2 web1 echo-args -- x"
    env = served.env(CTRL_EXEC_CONFIG=str(fleet.conf))
    subprocess.run(["/bin/sh", "-c", script], cwd=work, env=env, check=True,
                   capture_output=True)  # fmt: skip
    assert (work / "out2" / "web1.stdout").stat().st_mode & 0o077 == 0


# ----- signals and a vanished client -----------------------------------------------------


def _start_sleeper(fleet: Fleet, served: Served) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*ced_cmd(), "--config", str(fleet.conf), "run", "web1", "sleeper"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=served.env())  # fmt: skip
    server = served.pid()
    assert server is not None
    # the command runs once a second child appears (one always waits for the next command)
    assert wait_for(lambda: len(children(server)) >= 2, 10), "the command did not start"
    time.sleep(0.5)  # it reached the agent
    return proc


def test_ctrl_c_on_the_client_interrupts_the_command(fleet: Fleet, served: Served) -> None:
    proc = _start_sleeper(fleet, served)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "Interrupted." in err
    assert time.monotonic() - t0 < 5  # before the 8 s script could have ended
    assert "slept" not in out


def test_a_killed_client_interrupts_its_command_and_frees_the_lock(
    fleet: Fleet, served: Served
) -> None:
    server = served.pid()
    assert server is not None
    assert wait_for(lambda: children(server), 5)
    waiting = children(server)  # the child that will take the command
    proc = _start_sleeper(fleet, served)
    running = waiting & children(server)
    assert running
    proc.kill()
    proc.wait()
    # within 5 s: before the 8 s script (and read_timeout) could end the command
    assert wait_for(lambda: not any(alive(c) for c in running), 5), "the command kept running"
    locks = ced("--config", str(fleet.conf), "list-locks")
    assert "sleeper" not in locks.stdout, locks.stdout


# ----- when there is no server, or it must go ----------------------------------------------


def test_changed_code_sends_the_command_home_and_ends_the_server(
    fleet: Fleet, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    for pkg in ("agent", "dispatcher", "cluster"):
        shutil.copytree(ROOT / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    s = Served(tmp_path / "run", pythonpath=code)
    server = s.start()
    try:
        pid, p = s.run("--config", str(fleet.conf), "run", "web1", "echo-args", "--", "a")
        assert p.returncode == 0 and pid not in log_pids(p.stderr), p.stderr
        changed = code / "dispatcher" / "ced" / "run.py"
        os.utime(changed, (time.time(), changed.stat().st_mtime + 5))
        pid, p = s.run("--config", str(fleet.conf), "run", "web1", "echo-args", "--", "b")
        assert p.returncode == 0, p.stderr
        assert log_pids(p.stderr) == {pid}, "a stale server must not run the command"
        assert "b" in p.stdout
        assert wait_for(lambda: not alive(server), 5), "the stale server did not exit"
    finally:
        s.stop()


def test_an_idle_server_exits(tmp_path: Path) -> None:
    s = Served(tmp_path / "run", idle=1)
    server = s.start()
    assert wait_for(lambda: not alive(server), 10)
    assert not os.path.exists(s.socket), "an idle server removes its socket"


def test_only_a_terminal_starts_a_server(fleet: Fleet, tmp_path: Path) -> None:
    s = Served(tmp_path / "run")
    env = {k: v for k, v in s.env().items() if k != "CED_SERVER"}
    p = subprocess.run([*ced_cmd(), "--config", str(fleet.conf), "ping", "web1"], env=env,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stderr
    time.sleep(1.0)
    assert s.pid() is None and not os.path.exists(s.socket), "a script started a server"
    # the same command on a terminal starts one, for the next command
    main, sub = pty.openpty()
    proc = subprocess.Popen([*ced_cmd(), "--config", str(fleet.conf), "ping", "web1"], env=env,
                            stdin=sub, stdout=sub, stderr=sub)  # fmt: skip
    os.close(sub)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([main], [], [], 0.1)[0]:
            try:
                os.read(main, 65536)
            except OSError:
                break
    assert proc.wait(timeout=10) == 0
    os.close(main)
    try:
        assert wait_for(lambda: s.pid() is not None and os.path.exists(s.socket), 20)
    finally:
        s.stop()


def test_another_network_namespace_has_another_server(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare as root")
    code = "from dispatcher.ced.entry import server_key; print(server_key())"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    here = subprocess.run([ced_python(), "-c", code], env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip
    there = subprocess.run(["unshare", "--net", ced_python(), "-c", code], env=env,
                           capture_output=True, text=True)  # fmt: skip
    if there.returncode != 0:
        pytest.skip(f"unshare --net failed: {there.stderr.strip()}")
    assert here.stdout != there.stdout


def test_server_status_and_stop(served: Served) -> None:
    server = served.pid()
    assert server is not None
    _, p = served.run("server")
    assert p.returncode == 0 and f"running, pid {server}" in p.stdout, p.stdout
    _, p = served.run("--json", "server", "status")
    doc = json.loads(p.stdout)
    assert doc["running"] is True and doc["pid"] == server and doc["socket"] == served.socket
    _, p = served.run("server", "stop")  # served by the server it stops
    assert p.returncode == 0 and f"stopped (pid {server})" in p.stdout, p.stdout + p.stderr
    assert wait_for(lambda: not alive(server), 5)
    _, p = served.run("server", "status")  # ran by ced itself, and starts no server
    assert p.returncode == 1 and "not running" in p.stdout, p.stdout
    time.sleep(1.0)
    assert served.pid() is None
    _, p = served.run("server", "bogus")
    assert p.returncode == 2


def test_a_config_edit_applies_to_the_next_served_command(fleet: Fleet, served: Served) -> None:
    """Every command reads the config afresh: a typo is reported (file:line, exit 2) by the
    very next command, and its fix applies as soon, with no server restart."""
    server = served.pid()
    conf = served.runtime.parent / "edited.conf"
    good = fleet.conf.read_text()
    conf.write_text(good + "etcd_endpoint = http://10.0.0.9:2379\n")
    pid, p = served.run("--config", str(conf), "ping", "web1")
    assert p.returncode == 2 and f"{conf}:" in p.stderr and "etcd_endpoints" in p.stderr, p.stderr
    conf.write_text(good)
    pid, p = served.run("--config", str(conf), "ping", "web1")
    assert p.returncode == 0 and pid not in log_pids(p.stderr), p.stderr
    assert served.pid() == server


def test_a_server_killed_mid_command_lets_the_command_finish(fleet: Fleet, served: Served) -> None:
    """kill -9 of the server: the running command is its own process and ends normally;
    the child waiting for the next command exits; the next server replaces the socket."""
    server = served.pid()
    assert server is not None
    assert wait_for(lambda: children(server), 5)
    proc = _start_sleeper(fleet, served)
    waiting = children(server)
    os.kill(server, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "slept" in out, err
    assert wait_for(lambda: not any(alive(c) for c in waiting), 10), "orphans stayed"
    replaced = served.start()  # the socket file is stale: a new server takes its place
    assert replaced != server
    pid, p = served.run("--config", str(fleet.conf), "ping", "web1")
    assert p.returncode == 0 and pid not in log_pids(p.stderr), p.stderr

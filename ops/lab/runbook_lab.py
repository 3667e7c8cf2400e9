"""The local cluster the runbooks run against (their test, and an operator rehearsing).

Everything lives under one directory (``LAB_DIR``) on free loopback ports:

* a 3-member etcd, each member started from its own config file
  (``etcd/m1.yml``: ``etcd --config-file``), so a runbook can restart one on its data dir;
* the CA and dispatcher identity made by the real ``ced setup-ca`` / ``ced setup-ctrl-exec``
  under ``etc/ctrl-exec.conf`` (``$CED_CONFIG``); the shared state paths ``ca/`` and
  ``state/`` (``sync_mode = shared-fs``);
* three ``ctrl-exec-api`` instances ``i1``-``i3`` (``etc/instances/iN.conf``: the base
  config plus the instance's id and ports), TLS API, PROXY v2 port, health port, pairing
  port, lease TTL 2 s;
* HAProxy in master-worker mode with the configuration ``ced cluster haproxy-config``
  prints (its stats socket and bind address localised with ``sed``, as the add-instance
  runbook does);
* two agents ``web1`` (127.0.0.2) and ``web2`` (127.0.0.3) paired through HAProxy with
  ``ctrl-exec-agent request-pairing`` and ``ced approve``.

Processes of the control plane (etcd, instances, HAProxy) are started and stopped by the
lab's site adapter ``ops/lab/site.sh`` (pidfiles in ``run/``), the same functions the
runbooks call; the agents are the data plane and are started here. :meth:`RunbookLab.env`
is the environment the runbooks expect (see ``ops/runbooks/README.md``).

Rehearse a runbook by hand::

    .venv/bin/python -m ops.lab.runbook_lab      # prints: . /tmp/ctrl-exec-lab-XXXX/env.sh
    . /tmp/ctrl-exec-lab-XXXX/env.sh; . "$CED_RUNBOOKS/lib.sh"
    ced --config "$CED_CONFIG" cluster status

Ctrl-C (or SIGTERM) stops every process of the lab and removes the directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ops.lab.agent import PairingAgent
from ops.lab.etcd import Member
from ops.lab.haproxy import socket_path
from ops.lab.net import free_port, http_get, wait_listening
from ops.lab.proc import processes, terminate, wait_until

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "ops" / "lab" / "site.sh"
RUNBOOKS = ROOT / "ops" / "runbooks"
BIN = Path(sys.executable).parent  # ced, ctrl-exec-api, ctrl-exec-agent of this venv
TTL = 2
INSTANCES = ("i1", "i2", "i3")
ETCD_MEMBERS = ("m1", "m2", "m3")
AGENTS = {"web1": "127.0.0.2", "web2": "127.0.0.3"}
NEEDS = ("etcd", "etcdctl", "haproxy", "socat", "jq", "curl", "openssl", "setsid")
SCRIPT = '#!/bin/sh\necho "hello from $(hostname): $*"\n'


class LabError(RuntimeError):
    pass


_wait = functools.partial(wait_until, step=0.1, error=LabError)


def missing_tools() -> list[str]:
    """Programs the lab needs that are not installed (``ops/setup.sh`` installs them)."""
    missing = [t for t in NEEDS if shutil.which(t) is None]
    missing += [t for t in ("ced", "ctrl-exec-api", "ctrl-exec-agent") if not (BIN / t).exists()]
    return missing


@dataclass
class LabInstance:
    id: str
    api: int
    health: int
    pairing: int
    proxy: int

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health}"


class RunbookLab:
    """See the module docstring. ``start()``, then ``stop()``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster_name = f"lab{secrets.token_hex(4)}"
        for d in ("etc/instances", "ca", "state", "etcd", "haproxy", "run", "logs", "agents",
                  "backup", "tmp"):  # fmt: skip
            (root / d).mkdir(parents=True, exist_ok=True)
        self.etcd = [Member(n, free_port(), free_port(), root / "etcd" / f"{n}.data",
                            root / "logs" / f"etcd-{n}.log") for n in ETCD_MEMBERS]  # fmt: skip
        self.instances = [
            LabInstance(i, free_port(), free_port(), free_port(), free_port()) for i in INSTANCES
        ]
        self.new_instance = LabInstance("i4", free_port(), free_port(), free_port(), free_port())
        self.lb_api, self.lb_pairing = free_port(), free_port()
        self.haproxy_sock, self._sock_dir = socket_path(root / "haproxy" / "admin.sock", "rbhap-")
        self.agents: list[PairingAgent] = []
        self._pairing_sessions: list[int] = []

    # ----- paths and environment ----------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.root / "etc" / "ctrl-exec.conf"

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc" / "instances"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def shared_paths(self) -> list[Path]:
        return [self.ca_dir, self.root / "state"]

    def env(self) -> dict[str, str]:
        """What an operator exports before following a runbook (README.md, Environment)."""
        new = self.new_instance
        return {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": str(ROOT),
            "LAB_DIR": str(self.root),
            "CED_RUNBOOKS": str(RUNBOOKS),
            "CED_SITE": str(SITE),
            "CED_CONFIG": str(self.config),
            "CED_CONF_DIR": str(self.conf_dir),
            "CED_INSTANCES": " ".join(f"{i.id}={i.health_url}" for i in self.instances),
            "CED_CA": str(self.ca_dir / "ca.crt"),
            "CED_OPERATOR_CERT": str(self.root / "etc" / "runbook-operator.crt"),
            "CED_OPERATOR_KEY": str(self.root / "etc" / "runbook-operator.key"),
            "CED_LB_API": f"127.0.0.1:{self.lb_api}",
            "CED_BACKUP_DIR": str(self.root / "backup"),
            "CED_SHARED_PATHS": " ".join(str(p) for p in self.shared_paths),
            "HAPROXY_SOCK": str(self.haproxy_sock),
            "HAPROXY_BIND": "127.0.0.1",
            "ETCDCTL_API": "3",
            "ETCDCTL_ENDPOINTS": ",".join(m.client_url for m in self.etcd),
            "ETCD_MEMBERS": " ".join(f"{m.name}={m.client_url}" for m in self.etcd),
            "NEW_INSTANCE": new.id,
            "NEW_HOST": "127.0.0.1",
            "NEW_API_PORT": str(new.api),
            "NEW_HEALTH_PORT": str(new.health),
            "NEW_PAIRING_PORT": str(new.pairing),
            "NEW_PROXY_PORT": str(new.proxy),
            "TMPDIR": str(self.root / "tmp"),
        }

    def full_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CED_", "ETCDCTL_"))}
        env.update(self.env())
        return env

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        """Run ``script`` with bash -euo pipefail, the lab env and the runbook lib sourced."""
        prog = f'. "$CED_RUNBOOKS/lib.sh"\n{script}\n'
        r = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", prog], capture_output=True, text=True,
            env=self.full_env(), cwd=self.root, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise LabError(f"lab command failed ({r.returncode}): {script}\n{r.stdout}{r.stderr}")
        return r.stdout

    def ced(self, *args: str, timeout: float = 60) -> str:
        return self.sh(shlex.join(["ced", "--config", str(self.config), *args]), timeout)

    # ----- start ------------------------------------------------------------------------

    def start(self) -> RunbookLab:
        self._write_etcd()
        self.sh('for m in $(etcd_names); do etcd_start "$m"; done')
        self.wait_etcd()
        self._write_config()
        self.ced("setup-ca")
        self.ced("setup-ctrl-exec")
        self._operator_cert()
        for inst in self.instances:
            self.write_instance_config(inst)
        self.sh('for id in $(instance_ids); do instance_start "$id"; done')
        self.wait_control_plane(haproxy=False)
        self._start_haproxy()
        self._pair_agents()
        self.wait_agents()
        return self

    def _write_etcd(self) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.etcd)
        token = f"{self.cluster_name}-etcd"
        for m in self.etcd:
            settings = "".join(f"{k}: {v}\n" for k, v in m.settings(initial, token, "new").items())
            (self.root / "etcd" / f"{m.name}.yml").write_text(
                settings + "pre-vote: true\nenable-grpc-gateway: true\nlogger: zap\n"
                "log-outputs: [stderr]\n"
            )

    def wait_etcd(self, timeout: float = 30) -> None:
        def healthy() -> bool:
            return all(
                http_get(f"{m.client_url}/health", 0.5) == (200, {"health": "true"})
                for m in self.etcd
            )

        _wait(healthy, timeout, "a healthy 3-member etcd")

    def _write_config(self) -> None:
        ca, state = self.ca_dir, self.root / "state"
        hook = self.root / "etc" / "auth-hook"
        hook.write_text('#!/bin/sh\n# lab: allow every operator, log who asked for what\n'
                        f'echo "$ENVEXEC_ACTION $ENVEXEC_SOURCE_IP $ENVEXEC_USERNAME" '
                        f'>> "{self.root}/logs/auth-hook.log"\nexit 0\n')  # fmt: skip
        hook.chmod(0o755)
        self.config.write_text(
            "# ctrl-exec.conf of the runbook lab: the CLI's config and the base of every\n"
            "# instance's config (etc/instances/ID.conf = this file + the instance's keys)\n"
            f"ca_dir = {ca}\nstate_dir = {state}\nsync_mode = shared-fs\n"
            "dispatcher_id = lab-dispatcher\nlog_target = stderr\n"
            f"etcd_endpoints = {','.join(m.client_url for m in self.etcd)}\n"
            f"cluster_name = {self.cluster_name}\nlease_ttl = {TTL}\n"
            "# the load balancer's ports (what `ced cluster haproxy-config` binds)\n"
            f"api_port = {self.lb_api}\npairing_port = {self.lb_pairing}\n"
            f"api_bind = 127.0.0.1\napi_cert = {ca}/dispatcher.crt\n"
            f"api_key = {ca}/dispatcher.key\n"
            f"api_proxy_sources = 127.0.0.1\nauth_hook = {hook}\nread_timeout = 20\n"
            "health_bind = 127.0.0.1\npairing_bind = 127.0.0.1\n"
        )

    def write_instance_config(self, inst: LabInstance) -> Path:
        path = self.conf_dir / f"{inst.id}.conf"
        path.write_text(
            self.config.read_text() + f"# instance {inst.id}\ninstance_id = {inst.id}\n"
            f"api_port = {inst.api}\nhealth_port = {inst.health}\n"
            f"pairing_port = {inst.pairing}\napi_proxy_port = {inst.proxy}\n"
            f"advertise_url = https://127.0.0.1:{inst.api}\n"
        )
        return path

    def _operator_cert(self) -> None:
        """The operator CA and an operator client certificate (CN runbook-operator), as an
        SRE makes them: ``ced setup-operator-ca``, ``ced issue-operator``."""
        self.ced("setup-operator-ca")
        self.ced("issue-operator", "runbook-operator", "--out", str(self.root / "etc"))

    def _start_haproxy(self) -> None:
        self.sh(
            'ced --config "$CED_CONFIG" cluster haproxy-config --full --bind "$HAPROXY_BIND" |\n'
            '  sed -e "s|/run/haproxy/ctrl-exec.sock|$HAPROXY_SOCK|" > "$LAB_DIR/haproxy/haproxy.cfg"\n'
            'haproxy -c -q -f "$LAB_DIR/haproxy/haproxy.cfg"\nlab_haproxy_start'
        )
        wait_listening("127.0.0.1", self.lb_api, None, 15)
        self.wait_haproxy()

    # ----- state checks -------------------------------------------------------------------

    def leaders(self) -> list[str]:
        return [i.id for i in self.instances if http_get(f"{i.health_url}/leader", 1)[0] == 200]

    def wait_control_plane(self, timeout: float = 40, haproxy: bool = True) -> str:
        """Every instance healthy, exactly one leader, every member registered; the leader."""
        _wait(lambda: all(http_get(f"{i.health_url}/health", 1)[0] == 200 for i in self.instances),
              timeout, "every instance healthy")  # fmt: skip

        def one() -> str | None:
            first = self.leaders()
            if len(first) != 1:
                return None
            time.sleep(0.1)
            return first[0] if self.leaders() == first else None

        leader: str = _wait(one, timeout, "exactly one leader")

        def members() -> bool:
            try:
                doc = json.loads(self.ced("cluster", "status", "--json", timeout=15))
            except (LabError, ValueError):
                return False
            return sorted(m["instance_id"] for m in doc["members"]) == list(INSTANCES)

        _wait(members, timeout, f"members {INSTANCES} registered", step=0.3)
        if haproxy:
            self.wait_haproxy(timeout)
        return leader

    def haproxy_up(self, backend: str) -> list[str]:
        out = self.sh(f"haproxy_up {shlex.quote(backend)}", check=False)
        return out.split()

    def wait_haproxy(self, timeout: float = 20) -> None:
        want = sorted(INSTANCES)
        _wait(lambda: self.haproxy_up("be_ctrl_exec_api") == want, timeout,
              f"HAProxy API backend with {want} up")  # fmt: skip
        _wait(lambda: self.haproxy_up("be_ctrl_exec_pairing") == self.leaders(), timeout,
              "HAProxy pairing backend on the leader only")  # fmt: skip

    # ----- agents -----------------------------------------------------------------------

    def _pair_agents(self) -> None:
        script = self.root / "agents" / "hello.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        for name, addr in AGENTS.items():
            a = PairingAgent(name, addr, free_port(addr), self.root / "agents" / name)
            self.agents.append(a.write(f"hello = {script}\n"))
        env = self.full_env()
        agent = str(BIN / "ctrl-exec-agent")
        waiting: list[tuple[PairingAgent, subprocess.Popen[bytes]]] = []
        for a in self.agents:
            argv = [agent, *a.request_pairing_args(self.lb_pairing)]
            with open(a.pairing_out, "wb") as out, open(a.dir / "pairing.log", "wb") as lg:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=lg,
                                     env=env, start_new_session=True)  # fmt: skip
            waiting.append((a, p))
            self._pairing_sessions.append(p.pid)  # its --background child stays in it
        for a, p in waiting:
            failed = a.read_pairing(p.wait(60))  # the foreground part: request id printed, it forks
            if failed:
                raise LabError(failed)
        listed = json.loads(self.ced("list-requests", "--json"))
        queue = {r["id"]: r.get("code") for r in listed["requests"]}
        for a in self.agents:
            if queue.get(a.reqid) != a.code:
                raise LabError(f"{a.name}: pairing code {a.code} is not in the queue: {queue}")
            self.ced("approve", a.reqid, "--ip", a.addr, "--lookup-by", "ip")
        for a in self.agents:
            _wait(lambda a=a: a.paired, 20, f"{a.name} to store its certificate")  # type: ignore[misc]
            with open(a.dir / "agent.log", "ab") as lg:
                a.proc = subprocess.Popen([agent, *a.serve_args()], stdin=subprocess.DEVNULL,
                                          stdout=lg, stderr=lg, env=env,
                                          start_new_session=True)  # fmt: skip
        for a in self.agents:
            wait_listening(a.addr, a.port, a.proc, 20)

    def wait_agents(self, timeout: float = 20) -> None:
        def answer() -> bool:
            try:
                doc = json.loads(self.ced("ping", "--json", *AGENTS, timeout=30))
            except (LabError, ValueError):
                return False
            return [r.get("status") for r in doc["results"]] == ["ok"] * len(AGENTS)

        _wait(answer, timeout, "every agent to answer ced ping", step=0.5)

    # ----- between runbooks ---------------------------------------------------------------

    def restore_baseline(self, timeout: float = 40) -> str:
        """Whatever a runbook left: every etcd member and instance i1-i3 running, i4 gone,
        HAProxy up; waits for the healthy cluster and returns the leader."""
        self.sh(
            'for m in $(etcd_names); do _lab_alive "etcd-$m" || etcd_start "$m"; done\n'
            "_lab_alive haproxy || lab_haproxy_start\n"
            f"instance_stop {self.new_instance.id}\n"
            'for id in $(instance_ids); do _lab_alive "$id" || instance_start "$id"; done'
        )
        self.wait_etcd(timeout)
        return self.wait_control_plane(timeout)

    # ----- stop ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process of the lab: agents (and what is left of their pairing
        clients), HAProxy, then the instances (SIGTERM: they deregister while etcd still
        runs), then etcd (SIGKILL). Only processes whose command line names the lab
        directory are signalled."""
        for a in self.agents:
            terminate(a.proc)
        for sid in self._pairing_sessions:
            _kill_session(sid)
        run = self.root / "run"
        pidfiles = sorted(run.glob("*.pid")) if run.exists() else []
        marker = str(self.root)
        for group in (
            [p for p in pidfiles if p.stem == "haproxy"],
            [p for p in pidfiles if p.stem != "haproxy" and not p.stem.startswith("etcd-")],
            [p for p in pidfiles if p.stem.startswith("etcd-")],
        ):
            etcd = bool(group) and group[0].stem.startswith("etcd-")
            _stop_pids([_pid_of(p) for p in group], marker, kill=etcd)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)


@contextlib.contextmanager
def running_lab(root: Path) -> Iterator[RunbookLab]:
    """A started lab under ``root``; every process of it is stopped by PID at the end."""
    lab = RunbookLab(root)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


def lab_diagnostics(lab: RunbookLab, lines: int = 25) -> str:
    """The tail of every instance's and HAProxy's log (for a failure message)."""
    out = []
    for log in sorted((lab.root / "logs").glob("*.log")):
        if log.name.startswith("etcd-"):
            continue
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"=== {log.name}\n" + "\n".join(text))
    return "\n".join(out)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (one we created with start_new_session)."""
    for pid, fields in processes():
        if len(fields) > 3 and int(fields[3]) == sid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _ours(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def _pid_of(pidfile: Path) -> int:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return 0


def _stop_pids(pids: list[int], marker: str, kill: bool = False) -> None:
    """Signal every process of ``pids`` that is one of the lab's (its command line names
    the lab directory): SIGTERM (SIGKILL with ``kill``); SIGKILL what is left after 15 s."""
    ours = [p for p in pids if p and _ours(p, marker)]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(_ours(p, marker) for p in ours):
        if time.monotonic() > deadline:
            for pid in ours:
                if _ours(pid, marker):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--keep", action="store_true", help="keep the lab directory at the end")
    args = ap.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"missing: {' '.join(missing)} (run ops/setup.sh)", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="ctrl-exec-lab-"))
    lab = RunbookLab(root)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        lab.start()
        env_file = root / "env.sh"
        env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in lab.env().items()))
        print(f"lab ready: . {env_file}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        print(f"lab failed: {exc}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        lab.stop()
        if args.keep:
            print(f"lab directory kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

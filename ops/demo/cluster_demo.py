"""Main job: the real thing on one machine, end to end.

In a temporary directory:

1. ``ced setup-ca`` and ``ced setup-ctrl-exec`` (the real CLI) make the CA and the
   dispatcher identity under a generated ``ctrl-exec.conf``;
2. a 3-member etcd on loopback ports, on TLS (a lab CA; client certificates required)
   with authentication: user ``ctrl-exec`` whose role reads and writes
   ``/ctrl-exec-demo/`` only (``--plain-etcd``: plain HTTP, no auth; without etcd
   installed, the embedded backend);
3. three ``ctrl-exec-api`` instances sharing the state paths (``sync_mode = shared-fs``;
   without etcd one instance: the embedded backend serves one instance per state dir),
   each with a TLS API port, a PROXY v2 API port, a health port and a pairing port;
4. HAProxy configured by ``dispatcher.haproxy.render`` (what ``ced cluster haproxy-config``
   prints) in TCP passthrough: the API frontend balances over every ready instance and
   sends PROXY v2 headers, the pairing frontend goes to the instance whose ``/leader``
   answers 200;
5. three agents on 127.0.0.2-4 pair through HAProxy with ``ctrl-exec-agent
   request-pairing --background``; the demo checks each pairing code against
   ``ced list-requests`` and approves with ``ced approve``, then starts the agents;
6. a script runs on every agent through HAProxy's API frontend (``POST /run``) from a
   client bound to 127.0.0.9: the auth hook and the instance log see 127.0.0.9, not
   HAProxy; the run record answers ``GET /status/{reqid}`` through HAProxy;
7. ``ced ping`` of every agent, then the cluster status.

Every process is stopped at the end, on failure and on Ctrl-C. Exit status 0 means every
step worked. ``--keep`` keeps the work directory; ``--free-ports`` uses free ports instead
of the documented ones (17444-17467, 7544/7545, 17443 on the agents).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from dispatcher.haproxy import Member  # noqa: E402
from ops.lab.agent import PairingAgent  # noqa: E402
from ops.lab.etcd import ETCD, EtcdCluster, secure_etcd  # noqa: E402
from ops.lab.haproxy import API_BACKEND, PAIRING_BACKEND, HAProxy  # noqa: E402
from ops.lab.net import client_ssl, free_port, port_free, wait_listening  # noqa: E402
from ops.lab.pki import Issued  # noqa: E402
from ops.lab.proc import ApiProcess, processes, terminate  # noqa: E402

AGENT_ADDRS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
AGENT_PORT = 17443
CLIENT_ADDR = "127.0.0.9"  # the operator's "workstation"
CLUSTER = "ctrl-exec-demo"  # cluster_name: the etcd role covers /ctrl-exec-demo/ only
HAPROXY_API, HAPROXY_PAIRING = 7545, 7544
SCRIPT = """#!/bin/sh
echo "hello from $(hostname) as $(id -un); args: $*"
printf 'context: '; cat; echo
"""
AUTH_HOOK = """#!/bin/sh
# Demo auth hook: record who asked for what, from where; allow everything.
echo "$ENVEXEC_ACTION source_ip=$ENVEXEC_SOURCE_IP user=$ENVEXEC_USERNAME identity=$ENVEXEC_IDENTITY" >> "{log}"
exit 0
"""
T0 = time.monotonic()


class DemoError(Exception):
    pass


def say(text: str = "") -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {text}" if text else "", flush=True)


def indent(text: str, prefix: str = "    ") -> None:
    for line in text.rstrip("\n").splitlines():
        print(prefix + line, flush=True)


def tool(name: str, module: str) -> list[str]:
    """The console script next to this Python (what an operator runs), else ``-m``."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", module]


CED = tool("ced", "dispatcher.ced")
API = tool("ctrl-exec-api", "dispatcher.api.daemon")
AGENT = tool("ctrl-exec-agent", "agent.cli")


@dataclass
class Instance(ApiProcess):
    name: str
    api_port: int
    health_port: int
    pairing_port: int
    proxy_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def member(self) -> Member:
        return Member(self.name, "127.0.0.1", self.api_port, self.health_port,
                      self.pairing_port, self.proxy_port)  # fmt: skip


@dataclass
class Demo:
    work: Path
    free_ports: bool
    plain_etcd: bool = False
    env: dict[str, str] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    agents: list[PairingAgent] = field(default_factory=list)
    etcd: EtcdCluster | None = None
    haproxy: HAProxy | None = None
    pairing_fallback: Instance | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        for d in ("etc", "state", "logs", "agents"):
            (self.work / d).mkdir(parents=True, exist_ok=True)

    @property
    def base_conf(self) -> Path:
        return self.work / "ctrl-exec.conf"

    # ----- helpers -----------------------------------------------------------------

    def run(self, argv: Sequence[str], show: str, check: bool = True,
            quiet: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command to completion, print it as an operator would type it, and its output."""
        say(f"$ {show}")
        r = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=60)
        if not quiet:
            indent(r.stdout)
        if r.returncode != 0:
            indent(r.stderr, "    ! ")
            if check:
                raise DemoError(f"`{show}` exited {r.returncode}")
        return r

    def spawn(self, argv: Sequence[str], log: Path,
              stdout: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        with open(log, "ab") as err, open(stdout or os.devnull, "ab") as out:
            p = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 env=self.env, start_new_session=True)  # fmt: skip
        self.started.append(p)
        return p

    def ced(self, *args: str, check: bool = True, quiet: bool = False,
            conf: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        c = conf or self.base_conf
        return self.run([*CED, *args, "--config", str(c)], f"ced {' '.join(args)}", check, quiet)

    def ports(self, preferred: list[int], host: str = "127.0.0.1") -> list[int]:
        if not self.free_ports and all(port_free(host, p) for p in preferred):
            return preferred
        if not self.free_ports:
            say(f"  (some of {preferred} on {host} are taken: using free ports instead)")
        return [free_port(host) for _ in preferred]

    # ----- steps -------------------------------------------------------------------

    def pki(self) -> None:
        hook_log = self.work / "logs" / "auth-hook.log"
        hook = self.work / "etc" / "auth-hook"
        hook.write_text(AUTH_HOOK.format(log=hook_log))
        hook.chmod(0o755)
        etc, state = self.work / "etc", self.work / "state"
        # cluster keys only with etcd: without etcd_endpoints they are a config error
        cluster = (
            "".join(f"{k} = {v}\n" for k, v in self.etcd.client_conf().items())
            + f"cluster_name = {CLUSTER}\nsync_mode = shared-fs\n"
            if self.etcd
            else ""
        )
        self.base_conf.write_text(
            "# ctrl-exec.conf of the demo cluster: shared by the CLI and the three instances\n"
            f"ca_dir = {etc}\nstate_dir = {state}\n"
            f"dispatcher_id = demo-dispatcher\nlog_target = stderr\n{cluster}"
            f"api_bind = 127.0.0.1\napi_cert = {etc}/dispatcher.crt\n"
            f"api_key = {etc}/dispatcher.key\n"  # operators: etc/operator-ca.crt, no key needed
            f"api_proxy_sources = 127.0.0.1\nauth_hook = {hook}\nread_timeout = 20\n"
            f"health_bind = 127.0.0.1\npairing_bind = 127.0.0.1\n"
        )
        say(f"config: {self.base_conf}")
        self.ced("setup-ca")
        self.ced("setup-ctrl-exec")
        self.ced("setup-operator-ca")  # operators are not agents: their own CA
        self.ced("issue-operator", "demo-operator", "--out", str(etc))

    def start_etcd(self) -> None:
        if ETCD is None:
            say("etcd is not installed (apt-get install etcd-server): embedded backend")
            return
        if self.plain_etcd:
            say("starting a 3-member etcd on loopback (plain HTTP, no authentication)")
            self.etcd = EtcdCluster(self.work / "etcd", size=3).start()
        else:
            say("starting a 3-member etcd on loopback: TLS (client certificates required) and "
                f"authentication, user ctrl-exec with readwrite on /{CLUSTER}/ only")  # fmt: skip
            self.etcd = secure_etcd(self.work / "etcd", f"/{CLUSTER}/", size=3).start()
        say(f"  etcd healthy: {', '.join(self.etcd.endpoints)}")

    def start_instances(self) -> None:
        # without etcd the embedded backend serves one instance per state dir: run one
        for n in (1, 2, 3) if self.etcd else (1,):
            base = 17444 + 10 * (n - 1)
            pairing, api, health, proxy = self.ports([base, base + 1, base + 2, base + 3])
            conf = self.work / "etc" / f"instance{n}.conf"
            identity = (
                f"instance_id = i{n}\nadvertise_url = https://127.0.0.1:{api}\n"
                if self.etcd
                else ""
            )
            conf.write_text(
                self.base_conf.read_text() + f"# instance i{n}\n{identity}api_port = {api}\n"
                f"health_port = {health}\npairing_port = {pairing}\napi_proxy_port = {proxy}\n"
            )
            log = self.work / "logs" / f"i{n}.log"
            self.instances.append(Instance(f"i{n}", api, health, pairing, proxy, conf, log))
        for inst in self.instances:
            say(f"$ ctrl-exec-api --config {inst.config}   "
                f"(api {inst.api_port}, proxy {inst.proxy_port}, health {inst.health_port}, "
                f"pairing {inst.pairing_port})")  # fmt: skip
            inst.start(API, self.env)
        for inst in self.instances:
            try:
                inst.wait_healthy(30)
            except (RuntimeError, TimeoutError) as exc:
                raise DemoError(str(exc)) from exc
        say(f"  all {len(self.instances)} instances healthy")

    def start_haproxy(self) -> None:
        api, pairing = self.ports([HAPROXY_API, HAPROXY_PAIRING])
        self.haproxy = HAProxy(self.work / "haproxy", [i.member for i in self.instances],
                               api_port=api, pairing_port=pairing, proxy_protocol=True)  # fmt: skip
        say(f"$ haproxy -db -f {self.haproxy.config}   (API {api}, pairing {pairing})")
        self.haproxy.start()
        for line in self.haproxy.config.read_text().splitlines():
            if line.strip().startswith(("bind ", "server ")):
                print(f"    {line.strip()}", flush=True)
        want = {i.name: "UP" for i in self.instances}
        self.haproxy.wait_status(API_BACKEND, want)
        say(f"  {API_BACKEND}: {self.haproxy.statuses(API_BACKEND)}")

    def statuses(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with httpx.Client(trust_env=False, timeout=2) as c:
            for inst in self.instances:
                out[inst.name] = c.get(f"{inst.health_url}/status").json()
        return out

    def leader(self) -> Instance:
        """The instance that leads; with the embedded backend every one says it does."""
        assert self.haproxy is not None
        deadline = time.monotonic() + 20
        while True:
            docs = self.statuses()
            leaders = [i for i in self.instances if docs[i.name].get("role") == "leader"]
            if len(leaders) == 1:
                lead = leaders[0]
                doc = docs[lead.name]
                say(f"leader: {lead.name} (epoch {doc.get('epoch')}, "
                    f"backend {doc.get('backend', '?')})")  # fmt: skip
                break
            if leaders and all(docs[i.name].get("backend") == "local" for i in leaders):
                lead = leaders[0]
                say(f"  the instances run the embedded (single-host) backend, each its own "
                    f"leader: pairing goes to {lead.name} only")  # fmt: skip
                for other in self.instances:
                    if other is not lead:
                        self.haproxy.set_state(PAIRING_BACKEND, other.name, "maint")
                break
            if time.monotonic() > deadline:
                raise DemoError(f"no single leader: {json.dumps(docs)}")
            time.sleep(0.1)
        # servers start UP in HAProxy until their first check: wait for the followers to drop
        want = {i.name: "UP" if i is lead else ("DOWN", "MAINT") for i in self.instances}
        self.haproxy.wait_status(PAIRING_BACKEND, want)
        say(f"  {PAIRING_BACKEND}: {self.haproxy.statuses(PAIRING_BACKEND)}")
        return lead

    def pairing_listener(self, lead: Instance) -> None:
        """The leader's pairing port; started with ``ced pairing-mode`` if it has none."""
        try:
            wait_listening("127.0.0.1", lead.pairing_port, None, timeout=3)
            say(f"  {lead.name} listens for pairing on {lead.pairing_port}")
            return
        except TimeoutError:
            pass
        say(f"  {lead.name} does not serve pairing itself: starting `ced pairing-mode` "
            f"on its pairing port (shared state paths)")  # fmt: skip
        self.ced("pairing-mode", "start", "--port", str(lead.pairing_port), "--timeout", "120",
                 conf=lead.config)  # fmt: skip
        self.pairing_fallback = lead

    def request_pairing(self) -> None:
        assert self.haproxy is not None
        script = self.work / "hello.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        for n, addr in enumerate(AGENT_ADDRS, 1):
            (port,) = self.ports([AGENT_PORT], addr)
            a = PairingAgent(f"agent{n}.demo", addr, port, self.work / "agents" / f"agent{n}")
            self.agents.append(a.write(f"hello = {script}\n", "[tags]\nrole = demo\n"))
        procs = []
        for a in self.agents:
            args = a.request_pairing_args(self.haproxy.pairing_port)
            say(f"$ ctrl-exec-agent {' '.join(args)}")
            procs.append(self.spawn([*AGENT, *args], a.dir / "pairing.log", a.pairing_out))
        for a, p in zip(self.agents, procs, strict=True):
            failed = a.read_pairing(p.wait(60))  # the foreground part: reqid printed, it forks
            if failed:
                raise DemoError(failed)
            say(f"  {a.name} ({a.addr}): pairing code {a.code}, request {a.reqid}")

    def approve(self) -> None:
        self.ced("list-requests")
        listed = json.loads(self.ced("list-requests", "--json", quiet=True).stdout)
        codes = {r["id"]: r.get("code") for r in listed["requests"]}
        for a in self.agents:
            if codes.get(a.reqid) != a.code:
                raise DemoError(f"{a.name}: code {a.code} does not match the queue "
                                f"({codes.get(a.reqid)})")  # fmt: skip
            # the agent reached us through HAProxy from 127.0.0.1: say where it lives
            self.ced("approve", a.reqid, "--ip", a.addr, "--lookup-by", "ip")
        for a in self.agents:
            deadline = time.monotonic() + 20
            while not a.paired:
                if time.monotonic() > deadline:
                    raise DemoError(f"{a.name} never stored its certificate: "
                                    f"{(a.dir / 'pairing.log').read_text()}")  # fmt: skip
                time.sleep(0.05)
            say(f"  {a.name}: paired (certificate stored, dispatcher trusted)")

    def start_agents(self) -> None:
        for a in self.agents:
            say(f"$ ctrl-exec-agent serve --config {a.conf}   ({a.addr}:{a.port})")
            a.proc = self.spawn([*AGENT, *a.serve_args()], a.dir / "agent.log")
        for a in self.agents:
            try:
                wait_listening(a.addr, a.port, a.proc, 20)
            except (RuntimeError, TimeoutError) as exc:
                raise DemoError(f"{a.name}: {exc}: {(a.dir / 'agent.log').read_text()}") from exc

    def run_through_haproxy(self) -> None:
        assert self.haproxy is not None
        etc = self.work / "etc"
        operator = Issued(etc / "demo-operator.crt", etc / "demo-operator.key", 0)
        ctx = client_ssl(etc / "ca.crt", operator)
        transport = httpx.HTTPTransport(verify=ctx, local_address=CLIENT_ADDR)
        url = self.haproxy.api_url
        body = {"hosts": [a.name for a in self.agents], "script": "hello",
                "args": ["one", "two words"], "username": "demo"}  # fmt: skip
        say(f"POST {url}/run from {CLIENT_ADDR} (through HAProxy): {json.dumps(body)}")
        with httpx.Client(base_url=url, transport=transport, trust_env=False, timeout=30) as c:
            r = c.post("/run", json=body)
            if r.status_code != 200:
                raise DemoError(f"/run answered {r.status_code}: {r.text}")
            out = r.json()
            ok = True
            for res in out["results"]:
                good = res.get("exit") == 0
                ok = ok and good
                print(
                    f"==> {res.get('host')}  [{'OK' if good else 'FAIL'}  exit:{res.get('exit')}]"
                )
                indent(str(res.get("stdout", "")))
                if res.get("error"):
                    indent(str(res["error"]), "    ! ")
            if not ok or len(out["results"]) != len(self.agents):
                raise DemoError("the script did not succeed on every agent")
            reqid = out["reqid"]
        transport = httpx.HTTPTransport(verify=ctx, local_address=CLIENT_ADDR)
        with httpx.Client(base_url=url, transport=transport, trust_env=False, timeout=30) as c:
            st = c.get(f"/status/{reqid}")  # a new connection: any instance answers it
            if st.status_code != 200 or not st.json().get("complete"):
                raise DemoError(f"/status/{reqid}: {st.status_code} {st.text}")
            say(f"GET {url}/status/{reqid}: complete={st.json()['complete']} "
                f"mode={st.json().get('mode')}")  # fmt: skip
        time.sleep(0.3)  # the log lines are written through a queue
        for inst in self.instances:
            for ln in inst.log.read_text().splitlines():
                if "ACTION=api-request" in ln and ("PATH=/run" in ln or "PATH=/status" in ln):
                    say(f"  served by {inst.name}: {ln.split(': ', 1)[-1]}")
        hook = (self.work / "logs" / "auth-hook.log").read_text().splitlines()
        for ln in dict.fromkeys(hook):
            say(f"  auth hook saw: {ln}")
        if not any(f"source_ip={CLIENT_ADDR}" in ln for ln in hook):
            raise DemoError(f"the auth hook never saw {CLIENT_ADDR}: {hook}")
        if any("source_ip=127.0.0.1" in ln for ln in hook):
            raise DemoError(f"the auth hook saw HAProxy's address instead of the client: {hook}")
        if not any("user=demo-operator identity=demo-operator" in ln for ln in hook):
            raise DemoError(f"the auth hook never saw the operator certificate's CN: {hook}")

    def ping(self) -> None:
        self.ced("ping", *[a.name for a in self.agents])

    def cluster_status(self) -> None:
        argv = [*CED, "cluster", "status", "--config", str(self.base_conf)]
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=30)
        if r.returncode != 0:
            raise DemoError(f"ced cluster status failed ({r.returncode}): {r.stderr.strip()}")
        say("$ ced cluster status")
        indent(r.stdout)

    # ----- teardown ----------------------------------------------------------------

    def stop(self) -> None:
        for a in self.agents:
            terminate(a.proc)
        if self.pairing_fallback is not None:
            with contextlib.suppress(Exception):
                self.ced("pairing-mode", "stop", check=False, quiet=True,
                         conf=self.pairing_fallback.config)  # fmt: skip
        if self.haproxy is not None:  # first: waiting pairing clients see the end at once
            self.haproxy.stop()
        for inst in self.instances:
            inst.stop(10)
        for p in self.started:
            terminate(p)
        if self.etcd is not None:
            self.etcd.close()
        _reap_orphans({p.pid for p in self.started})


def _become_subreaper() -> None:
    """Adopt our orphaned grandchildren (``--background`` pairing clients, ``ced
    pairing-mode``), so the cleanup can find and stop them by PID."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap_orphans(known: set[int]) -> None:
    """Stop our children that we did not start ourselves (orphans we adopted)."""
    me = str(os.getpid())
    pids = [pid for pid, f in processes() if pid not in known and len(f) > 1 and f[1] == me]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done or time.monotonic() > deadline:
                if not done:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                break
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--free-ports", action="store_true", help="use free ports only")
    ap.add_argument("--plain-etcd", action="store_true",
                    help="run etcd on plain HTTP without authentication")  # fmt: skip
    args = ap.parse_args(argv)
    _become_subreaper()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as well
    work = Path(tempfile.mkdtemp(prefix="ctrl-exec-cluster-"))
    say(f"work dir: {work}")
    demo = Demo(work, args.free_ports, args.plain_etcd)
    ok = interrupted = False
    try:
        demo.start_etcd()
        demo.pki()
        demo.start_instances()
        demo.start_haproxy()
        lead = demo.leader()
        demo.pairing_listener(lead)
        demo.request_pairing()
        demo.approve()
        demo.start_agents()
        demo.run_through_haproxy()
        demo.ping()
        demo.cluster_status()
        ok = True
    except DemoError as exc:
        say(f"FAILED: {exc}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        say("stopping agents, instances, HAProxy and etcd")
        demo.stop()
        if (ok or interrupted) and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work dir kept: {work}")
    if interrupted:
        say("cluster demo: interrupted")
        return 130
    say("cluster demo: OK" if ok else "cluster demo: FAILED")
    return 0 if ok else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

"""Generations, rolling restarts and certificate rotation in a real HA cluster.

Three ``ctrl-exec-api`` instances with *their own* state paths (``sync_mode = push``: the
files travel from the leader over mTLS), a one-member etcd (lease TTL 2 s), two real
agents and a real HAProxy in front (the configuration ``ced cluster haproxy-config``
prints). Measured (printed with ``-s``): rotation end to end under load, requests that
failed at the first attempt, time for a killed follower to converge.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from cluster.backend import EtcdBackend
from dispatcher import pairing_queue as pq
from dispatcher import pki
from dispatcher.config import load as load_config
from dispatcher.ha.manifest import Generation, Layout, Scanner, manifest_hash
from dispatcher.haproxy import Member
from dispatcher.registry import Registry
from dispatcher.statewrite import LocalWriter
from ops.lab.haproxy import API_BACKEND, HAPROXY, HAProxy
from ops.lab.haproxy import SKIP_REASON as HAPROXY_SKIP
from tests.support.agentproc import ROOT, AgentProc, free_port, make_agent
from tests.support.dispatcherenv import DispatcherCA
from tests.support.etcdcluster import ETCD, SKIP_REASON, EtcdCluster
from tests.support.pki import Issued

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
    pytest.mark.skipif(HAPROXY is None, reason=HAPROXY_SKIP),
]

TTL = 2
DRAIN = 1.0
NAMES = ("a", "b", "c")
AGENTS = {"web1": "127.0.0.2", "web2": "127.0.0.3"}
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
MEASURED: dict[str, Any] = {}


def get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as c:
            r = c.get(url)
    except httpx.TransportError:
        return 0, None
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@dataclass
class Inst:
    name: str
    root: Path
    api_port: int
    health_port: int
    pairing_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def id(self) -> str:
        return f"inst-{self.name}"

    @property
    def config(self) -> Path:
        return self.root / "ctrl-exec.conf"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def registry(self) -> Path:
        return self.root / "agents"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "instance.log"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def member(self) -> Member:
        return Member(self.id, "127.0.0.1", self.api_port, self.health_port, self.pairing_port)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.api.daemon", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log, env=ENV, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.logtext()}")
            if get(f"{self.health_url}/ready", 0.5)[0] == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready: {self.logtext()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def status(self) -> dict[str, Any]:
        code, body = get(f"{self.health_url}/status", 2)
        assert code == 200, (self.name, code, body)
        return dict(body)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def manifest(self) -> dict[str, str]:
        """``{logical path: sha256}`` of every synced file of this instance."""
        layout = Layout(load_config(str(self.config)))
        return {p: e.sha256 for p, e in Scanner(layout).scan().items()}


@dataclass
class Cluster:
    tmp: Path
    etcd: EtcdCluster
    name: str
    insts: dict[str, Inst]
    agents: dict[str, AgentProc]
    haproxy: HAProxy
    original: Issued  # the first dispatcher cert and key, kept outside every instance
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    def running(self) -> list[Inst]:
        return [i for i in self.insts.values() if i.alive]

    def leader(self, timeout: float = 15) -> Inst:
        def one() -> Inst | None:
            found = [i for i in self.running() if get(f"{i.health_url}/leader", 1)[0] == 200]
            return found[0] if len(found) == 1 else None

        inst: Inst = wait_until(one, timeout, "exactly one leader")
        return inst

    def followers(self) -> list[Inst]:
        lead = self.leader()
        return [i for i in self.running() if i is not lead]

    def backend(self) -> EtcdBackend:
        return EtcdBackend(self.etcd.endpoints, cluster_name=self.name, timeout=2.0)

    def published(self) -> Generation:
        b = self.backend()
        try:
            kv = b.get_kv(b.keys.generation)
        finally:
            b.close()
        assert kv is not None
        return Generation.from_json(kv.value)

    def converged(self, timeout: float = 30) -> Generation:
        """Wait until every running instance runs the published generation."""

        def same() -> Generation | None:
            g = self.published()
            gens = {i.name: get(f"{i.health_url}/status", 2)[1] for i in self.running()}
            ok = all(isinstance(v, dict) and v["generation"] == g.number for v in gens.values())
            return g if ok else None

        g: Generation = wait_until(same, timeout, "every instance on the published generation")
        return g

    def verify(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tmp / "boot" / "etc" / "ca.crt"))
        ctx.check_hostname = False
        return ctx

    def ced(self, inst: Inst, *args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher.cli", *args, "--config", str(inst.config)],
            capture_output=True, text=True, env=ENV, timeout=timeout,
        )  # fmt: skip


def _conf(c: dict[str, str]) -> str:
    return "".join(f"{k} = {v}\n" for k, v in c.items())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("hasync")
    etcd = EtcdCluster(tmp / "etcd", size=1).start()
    boot = tmp / "boot"
    ca = pki.create_ca(boot / "etc")
    dcert = pki.issue_dispatcher_cert(ca, boot / "etc" / "dispatcher.crt",
                                      boot / "etc" / "dispatcher.key")  # fmt: skip
    keep = tmp / "original"
    keep.mkdir()
    shutil.copy(boot / "etc" / "dispatcher.crt", keep / "dispatcher.crt")
    shutil.copy(boot / "etc" / "dispatcher.key", keep / "dispatcher.key")
    original = Issued(keep / "dispatcher.crt", keep / "dispatcher.key", dcert.serial_number)
    agent_ca = DispatcherCA(ca, tmp / "agent-certs")
    scripts = {n: str(script_dir / f"{n}.sh") for n in ("echo-args",)}
    agents = {name: make_agent(tmp / name, agent_ca, {"disp": original}, scripts, host=addr)
              for name, addr in AGENTS.items()}  # fmt: skip
    reg = Registry(boot / "agents", LocalWriter())
    for name, agent in agents.items():
        reg.register(name, ip=agent.host, port=agent.port, lookup_by="ip",
                     dispatcher_serial=original.serial_hex)  # fmt: skip
    name = f"sync{secrets.token_hex(4)}"
    insts: dict[str, Inst] = {}
    for n in NAMES:
        inst = Inst(n, tmp / f"inst-{n}", free_port(), free_port(), free_port())
        shutil.copytree(boot, inst.root)  # every instance starts from the same files
        inst.state.mkdir()
        etc = inst.etc
        inst.config.write_text(_conf({
            "ca_dir": str(etc), "state_dir": str(inst.state), "registry_dir": str(inst.registry),
            "api_bind": "127.0.0.1", "api_port": str(inst.api_port),
            "api_cert": str(etc / "dispatcher.crt"), "api_key": str(etc / "dispatcher.key"),
            "api_client_ca": str(etc / "ca.crt"), "advertise_url": inst.url,
            "health_bind": "127.0.0.1", "health_port": str(inst.health_port),
            "pairing_bind": "127.0.0.1", "pairing_port": str(inst.pairing_port),
            "instance_id": inst.id, "etcd_endpoints": ",".join(etcd.endpoints),
            "cluster_name": name, "lease_ttl": str(TTL), "api_auth_default": "allow",
            "log_target": "stderr", "read_timeout": "10", "sync_mode": "push",
            "drain_wait": str(DRAIN), "dispatcher_id": "disp",
        }))  # fmt: skip
        insts[n] = inst
    hap = HAProxy(tmp / "haproxy", [i.member for i in insts.values()])
    c = Cluster(tmp, etcd, name, insts, agents, hap, original)
    try:
        for a in agents.values():
            a.start(wait=False)
        for inst in insts.values():
            inst.start()
        for inst in insts.values():
            inst.wait_ready()
        hap.start()
        hap.wait_status(API_BACKEND, {i.id: "UP" for i in insts.values()})
        c.leader()
        c.converged()
        yield c
    finally:
        c.exit_codes = {i.name: i.stop() for i in insts.values()}
        hap.stop()
        for a in agents.values():
            a.stop()
        etcd.close()
        if MEASURED:
            print("\nHA sync measurements:", json.dumps(MEASURED))
    assert all(code == 0 for code in c.exit_codes.values()), c.exit_codes


# ----- generations --------------------------------------------------------------------------


def test_every_instance_runs_the_published_generation(cluster: Cluster) -> None:
    leader = cluster.leader()
    g = cluster.converged()
    assert g.leader == leader.id and g.epoch == leader.status()["epoch"]
    # secrets never go into the store: only hashes of the files
    raw = cluster.published().to_json()
    for secret in ("ca.key", "dispatcher.key"):
        assert f"ca/{secret}" in g.files
        assert (leader.etc / secret).read_text() not in raw
    assert "BEGIN" not in raw
    want = leader.manifest()
    assert manifest_hash_of(want) == manifest_hash_of({p: e.sha256 for p, e in g.files.items()})
    for inst in cluster.running():
        st = inst.status()
        assert st["generation"] == g.number and st["sync_mode"] == "push"
        assert st["cert_serial"] == cluster.original.serial_hex and not st["restart_pending"]
        assert inst.manifest() == want, inst.name
    p = cluster.ced(leader, "cluster", "status", "--json")
    doc = json.loads(p.stdout)
    assert doc["generation"] == g.number
    assert {m["generation"] for m in doc["members"]} == {g.number}


def manifest_hash_of(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def _fetch(inst: Inst, path: str, generation: int, cert: Issued | None,
           ctx: ssl.SSLContext) -> httpx.Response:  # fmt: skip
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    with httpx.Client(verify=ctx, trust_env=False, timeout=5) as c:
        return c.get(f"{inst.url}/cluster/files/{path}", params={"generation": generation})


def test_peer_file_route_needs_the_dispatcher_certificate(cluster: Cluster) -> None:
    leader = cluster.leader()
    g = cluster.published()
    # an operator (no client certificate, auth hook "allow") gets nothing
    r = _fetch(leader, "ca/ca.key", g.number, None, cluster.verify())
    assert r.status_code == 403 and "dispatcher certificate" in r.json()["detail"]
    # a certificate of the same CA that is not the dispatcher's: an agent's
    agent = cluster.agents["web1"].agent_cert
    r = _fetch(leader, "ca/ca.key", g.number, agent, cluster.verify())
    assert r.status_code == 403
    assert "ACTION=peer-denied" in leader.logtext()
    # the dispatcher certificate: the file, which matches the manifest
    r = _fetch(leader, "ca/ca.crt", g.number, cluster.original, cluster.verify())
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == g.files["ca/ca.crt"].sha256
    r = _fetch(leader, "ca/ca.crt", g.number - 1, cluster.original, cluster.verify())
    assert r.status_code == 409
    r = _fetch(leader, "ca/../../etc/passwd", g.number, cluster.original, cluster.verify())
    assert r.status_code in (404, 409)


# ----- certificate rotation under load ---------------------------------------------------------


class Load:
    """``POST /ping`` of both agents through HAProxy, back to back, one retry allowed."""

    def __init__(self, url: str, verify: ssl.SSLContext, hosts: list[str]) -> None:
        self.client = httpx.Client(base_url=url, verify=verify, trust_env=False, timeout=15)
        self.hosts = hosts
        self.requests = 0
        self.first_failures: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _attempt(self) -> str | None:
        try:
            r = self.client.post("/ping", json={"hosts": self.hosts})
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if r.status_code != 200:
            return f"HTTP {r.status_code} {r.text[:200]}"
        bad = [x for x in r.json()["results"] if x.get("status") != "ok"]
        return f"ping: {bad}"[:300] if bad else None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.requests += 1
            first = self._attempt()
            if first is not None:
                self.first_failures.append(first)
                again = self._attempt()
                if again is not None:
                    self.failures.append(again)
            time.sleep(0.01)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()


def _served_serial(port: int, ca: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), 5) as raw, ca.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def test_rotation_under_load_through_haproxy(cluster: Cluster) -> None:
    old = cluster.original.serial_hex
    follower = cluster.followers()[0]
    load = Load(cluster.haproxy.api_url, cluster.verify(), list(AGENTS)).start()
    try:
        time.sleep(1.0)
        assert load.requests > 5 and not load.failures, load.failures
        t0 = time.monotonic()
        # from a follower's host: the leader carries it out
        p = cluster.ced(follower, "rotate-cert", "--json", "--yes")
        took = time.monotonic() - t0
        assert p.returncode == 0, p.stdout + p.stderr
        doc = json.loads(p.stdout)
        new = doc["new_serial"]
        assert doc["ok"] == 1 and doc["old_serial"] == old and new != old
        assert doc["cluster"]["converged"] is True
        rotated_by = cluster.insts[doc["leader"][-1]]
        assert rotated_by is not follower
        MEASURED["rotation_cli_s"] = round(took, 2)

        def retired() -> bool:
            lead = cluster.leader()
            state = json.loads((lead.state / "rotation.json").read_text())
            return "previous_serial" not in state and state["current_serial"] == new

        wait_until(retired, 30, "the old serial to be retired")
        MEASURED["rotation_end_to_end_s"] = round(time.monotonic() - t0, 2)
        cluster.converged()
        time.sleep(1.0)  # the load keeps going on the retired state
    finally:
        load.stop()
    MEASURED["load_requests"] = load.requests
    MEASURED["load_first_attempt_failures"] = len(load.first_failures)
    MEASURED["load_failures"] = len(load.failures)
    if load.first_failures:
        MEASURED["first_failure_examples"] = load.first_failures[:3]
    assert not load.failures, load.failures
    assert load.requests > 50

    # every instance presents the new serial: /status, its API port, and through HAProxy
    for inst in cluster.insts.values():
        st = inst.status()
        assert st["cert_serial"] == new and not st["restart_pending"], (inst.name, st)
        assert _served_serial(inst.api_port, cluster.verify()) == new
        assert "ACTION=restart-exec" in inst.logtext(), inst.name
        assert json.loads((inst.state / "rotation.json").read_text())["current_serial"] == new
    assert _served_serial(cluster.haproxy.api_port, cluster.verify()) == new
    leader = cluster.leader()
    want = leader.manifest()
    assert "ca/dispatcher.crt.prev" not in want  # the kept old pair is gone after retirement
    for inst in cluster.insts.values():
        assert inst.manifest() == want, inst.name

    # agents trust only the new serial now
    new_cert = Issued(leader.etc / "dispatcher.crt", leader.etc / "dispatcher.key", int(new, 16))
    for agent in cluster.agents.values():
        resp = agent.call("POST", "/ping", {}, cluster.original)
        assert resp.code == 403 and resp.json()["error"] == "serial mismatch"
        assert agent.call("POST", "/ping", {}, new_cert).code == 200
    # only the leader that rotated signed anything; no follower ever did
    for inst in cluster.insts.values():
        signed = [ln for ln in inst.logtext().splitlines() if "ACTION=ca-sign " in ln]
        if inst is rotated_by:
            assert signed and all("dispatcher" in ln for ln in signed)
        else:
            assert not signed, (inst.name, signed)


# ----- a follower killed during sync, a follower down during a generation ----------------------


def _out_of_band(leader: Inst, count: int, size: int) -> None:
    """Files in the leader's ca_dir written by hand (the leader's rescan publishes them)."""
    bundle = leader.etc / "bundle"
    bundle.mkdir(exist_ok=True)
    for i in range(count):
        tmp = bundle / f".part-{i:04d}.tmp"
        tmp.write_bytes(secrets.token_bytes(size))
        os.replace(tmp, bundle / f"part-{i:04d}.bin")


def test_follower_killed_during_sync_converges(cluster: Cluster) -> None:
    leader = cluster.leader()
    victim = cluster.followers()[0]
    before = cluster.converged()
    before_files = victim.manifest()
    assert victim.stop() == 0
    _out_of_band(leader, 600, 4096)
    g = wait_until(lambda: (x := cluster.published()).number > before.number
                   and len([p for p in x.files if p.startswith("ca/bundle/")]) == 600 and x,
                   15, "the leader to publish the new files")  # fmt: skip
    stage = victim.etc / "bundle" / ".ctrl-exec-sync"  # next to the targets: same filesystem
    victim.start()
    staged = wait_until(lambda: stage.is_dir() and len(os.listdir(stage)) >= 30 and stage,
                        30, "the follower to stage files", step=0.002)  # fmt: skip
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(5)
    n_staged = len(os.listdir(staged))
    assert n_staged < 600, "the sync finished before the kill"
    # no partial file: every live file is the old or the new version, whole
    live = victim.manifest()
    for path, sha in live.items():
        assert sha == before_files.get(path) or sha == g.files[path].sha256, path
    swapped = [p.name for p in (victim.etc / "bundle").iterdir() if not p.name.startswith(".")]
    assert swapped == []  # nothing is swapped in before every file is staged
    applied = json.loads((victim.state / "sync" / "applied.json").read_text())
    assert applied["generation"] < g.number
    t0 = time.monotonic()
    victim.start()
    victim.wait_ready()
    wait_until(lambda: victim.status()["generation"] >= g.number, 30, "the victim to converge")
    MEASURED["killed_follower_converged_s"] = round(time.monotonic() - t0, 2)
    MEASURED["killed_after_staged_files"] = n_staged
    assert not stage.exists()
    assert victim.manifest() == cluster.leader().manifest()
    assert "ACTION=sync-stage-cleanup" in victim.logtext()


def test_follower_down_during_a_generation_catches_up(cluster: Cluster) -> None:
    leader = cluster.leader()
    other = cluster.followers()[-1]
    before = cluster.converged().number
    assert other.stop() == 0
    shutil.rmtree(leader.etc / "bundle")  # removed by hand on the leader: published too
    g = wait_until(lambda: (x := cluster.published()).number > before
                   and not any(p.startswith("ca/bundle/") for p in x.files) and x,
                   15, "a generation without the bundle")  # fmt: skip
    assert (other.etc / "bundle").is_dir()
    other.start()
    other.wait_ready()
    assert other.status()["generation"] >= g.number  # /ready waited for the first sync
    assert not (other.etc / "bundle").exists()
    assert other.manifest() == leader.manifest()
    cluster.converged()


def test_generation_and_order_from_an_old_epoch_are_refused(cluster: Cluster) -> None:
    leader = cluster.leader()
    followers = cluster.followers()
    current = cluster.converged()
    assert current.epoch > 1
    # a forged generation from epoch 1 that would delete an agent's registry record
    files = {p: e for p, e in current.files.items() if p != "registry/web1.json"}
    stale = Generation(current.number + 1, 1, "nobody", manifest_hash(files), files,
                       time.time())  # fmt: skip
    order = {"order": "restart", "id": "forged", "epoch": 1, "generation": current.number,
             "leader": "nobody"}  # fmt: skip
    pids = {i.name: i.proc.pid for i in followers if i.proc is not None}
    b = cluster.backend()
    try:
        b.put_value(b.keys.generation, stale.to_json())  # unfenced: only a test can do this
        b.put_value(b.keys.order(followers[0].id), json.dumps(order))
    finally:
        b.close()
    for inst in followers:
        wait_until(lambda i=inst: "ACTION=sync-refused" in i.logtext()
                   and f"GENERATION={stale.number}" in i.logtext(), 10, "the refusal")  # fmt: skip
        assert (inst.registry / "web1.json").exists()
    wait_until(lambda: "ACTION=order-refused" in followers[0].logtext(), 10, "order refused")
    # the leader notices the store does not hold its generation and publishes again
    g = cluster.converged()
    assert g.epoch == leader.status()["epoch"] and "registry/web1.json" in g.files
    assert {i.name: i.proc.pid for i in followers if i.proc is not None} == pids
    for inst in followers:
        assert inst.manifest() == leader.manifest()
        st = inst.status()
        assert not st["draining"] and st["generation"] == g.number


# ----- pairing decisions from any instance's CLI ---------------------------------------------


def _csr(cn: str) -> str:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))  # fmt: skip
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_pairing_decided_from_a_follower_cli_by_the_leader(cluster: Cluster) -> None:
    leader = cluster.leader()
    follower = cluster.followers()[0]
    queue = leader.state / "pairing"
    one = pq.submit(queue, hostname="paired-1", csr=_csr("paired-1"), nonce="n-1",
                    source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
    two = pq.submit(queue, hostname="paired-2", csr=_csr("paired-2"), nonce="n-2",
                    source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
    p = cluster.ced(follower, "list-requests", "--json")
    assert p.returncode == 0, p.stderr
    assert {r["id"] for r in json.loads(p.stdout)["requests"]} >= {one["id"], two["id"]}
    p = cluster.ced(follower, "approve", one["id"], "--lookup-by", "ip", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] == 1 and doc["hostname"] == "paired-1" and doc["leader"] == leader.id
    p = cluster.ced(follower, "deny", two["id"], "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["leader"] == leader.id, p.stderr
    p = cluster.ced(follower, "approve", two["id"])
    assert p.returncode == 1 and "no pending request" in (p.stdout + p.stderr).lower()
    # the leader wrote the record; every follower got it through a generation
    record = leader.registry / "paired-1.json"
    assert record.exists() and not (follower.state / "pairing" / f"{one['id']}.json").exists()
    cluster.converged()
    sha = hashlib.sha256(record.read_bytes()).hexdigest()
    for inst in cluster.running():
        assert hashlib.sha256((inst.registry / "paired-1.json").read_bytes()).hexdigest() == sha
    # the leader signed; no follower did
    assert "CN=paired-1" in leader.logtext()
    for inst in cluster.followers():
        assert "CN=paired-1" not in inst.logtext(), inst.name

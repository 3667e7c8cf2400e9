"""A real HA cluster on one machine: etcd, three ``ctrl-exec-api`` instances, agents, HAProxy.

Shared by ``tests/integration/test_ha_instances.py``, ``tests/integration/test_ha_sync.py``,
``tests/integration/test_ha_chaos.py`` and ``bench/failover_bench.py``; free of pytest so
the benchmark can use it as well.

:func:`running_cluster` brings up, under one directory:

* a real etcd of ``etcd_size`` members (:mod:`ops.lab.etcd`), by default on TLS with
  authentication and a role limited to the cluster's prefix (``etcd_secure``);
* a dispatcher CA and certificate (``dispatcher.pki.ca``), and real agents (one per entry
  of ``agents``, each on its own loopback address) that trust it and are registered;
* ``ctrl-exec-api`` instances (:class:`ops.lab.proc.ApiProcess`), each with its own state
  dir (run records, locks, pairing queue), all in one etcd cluster with the given lease
  TTL. With ``sync_mode = "shared-fs"`` they share the CA dir, the registry and
  ``rotation.json`` (as on a shared filesystem); with ``"push"`` each starts from its own
  copy of the CA dir and the registry and keeps ``rotation.json`` in its state dir (the
  files travel from the leader over mTLS);
* with ``tls``: the API over TLS (the dispatcher certificate; operator client
  certificates from the operator CA, ``ops.lab.operators``), plus a PROXY v2 API port per instance unless
  ``proxy_protocol`` is off;
* with ``haproxy``: HAProxy configured by ``dispatcher.haproxy.render`` (what ``ced cluster
  haproxy-config`` prints) through :mod:`ops.lab.haproxy`, TCP passthrough, PROXY v2 to
  the instances when they have a PROXY port (with ``pairing_proxy``: the pairing port too).

Everything is stopped by PID at the end; :attr:`Cluster.exit_codes` then holds each
instance's exit status (0 after its SIGTERM drain).

:class:`Load` is a client thread sending ``POST /ping`` and ``POST /run`` through the
HAProxy API frontend at a steady pace, one retry allowed, and recording every outcome;
:func:`history_violations` checks a recorded history of leader-only effects.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cluster.backend import EffectRecord, EtcdBackend
from cluster.signing import KEY_FILE, RecordRejected, RecordSigner, parse_key, write_key
from dispatcher.ha.manifest import Generation, ManifestError, decode_generation
from dispatcher.haproxy import Member
from dispatcher.pki import ca as pki
from dispatcher.registry import Registry
from dispatcher.statewrite import LocalWriter
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.dispatcherenv import DispatcherCA
from ops.lab.etcd import EtcdCluster, secure_etcd
from ops.lab.haproxy import API_BACKEND, PAIRING_BACKEND, HAProxy
from ops.lab.net import client_ssl, free_port
from ops.lab.net import http_get as get
from ops.lab.operators import OperatorCA
from ops.lab.pairing import make_csr, pair_request, read_framed
from ops.lab.pki import Issued
from ops.lab.proc import ENV, ApiProcess, WaitTimeout, wait_until

__all__ = ["API_BACKEND", "ENV", "PAIRING_BACKEND", "Cluster", "ClusterSpec", "Inst", "Load",
           "LoadReport", "Outcome", "WaitTimeout", "get", "history_violations", "make_csr",
           "new_leader", "pair_request", "pairing_listening", "read_framed", "running_cluster",
           "wait_until"]  # fmt: skip

# an instance (re)started after a fault: a fresh interpreter that joins etcd and binds; on
# a loaded 2-core machine that took over 20 s once (CI), and the checks that follow are
# what the tests assert, not this wait
HEALED_WITHIN = 60.0

# ----- instances ---------------------------------------------------------------------------


@dataclass
class Inst(ApiProcess):
    name: str
    config: Path
    log: Path
    api_port: int
    health_port: int
    pairing_port: int
    state: Path
    ca_dir: Path  # shared by every instance with sync_mode shared-fs, else its own
    registry_dir: Path  # likewise
    proxy_port: int = 0
    scheme: str = "http"
    proc: subprocess.Popen[bytes] | None = None
    pairing_proxy_port: int = 0  # the PROXY v2 pairing port (0: none)

    @property
    def id(self) -> str:
        return f"inst-{self.name}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.api_port}"

    @property
    def member(self) -> Member:
        """This instance as HAProxy's configuration generator sees it."""
        return Member(self.id, "127.0.0.1", self.api_port, self.health_port, self.pairing_port,
                      self.proxy_port, self.pairing_proxy_port)  # fmt: skip

    def status(self) -> dict[str, Any]:
        code, body = get(f"{self.health_url}/status", 2)
        assert code == 200, (self.name, code, body)
        return dict(body)


# ----- the cluster ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    agents: Mapping[str, str]  # registered name -> loopback address of a real agent
    scripts: Mapping[str, str]  # the agents' allowlist: name -> script path
    ttl: int = 2
    etcd_size: int = 1
    etcd_secure: bool = True  # etcd on TLS with auth, a role on /<cluster_name>/ only
    names: tuple[str, ...] = ("a", "b", "c")
    sync_mode: str = "shared-fs"  # or "push": each instance its own CA dir and registry
    tls: bool = False  # API over TLS (operator client certs)
    proxy_protocol: bool = True  # with tls: a PROXY v2 API port per instance, used by HAProxy
    haproxy: bool = False  # HAProxy in front (dispatcher.haproxy.render)
    pairing_proxy: bool = False  # a PROXY v2 pairing port per instance, used by HAProxy
    extra: Mapping[str, str] = field(default_factory=dict)  # more ctrl-exec.conf keys
    env: Mapping[str, str] = field(default_factory=dict)  # more environment (test hooks)
    cluster_key: bool = True  # start with <ca_dir>/cluster.key (else the first leader makes it)


@dataclass
class Cluster:
    tmp: Path
    etcd: EtcdCluster
    name: str
    insts: dict[str, Inst]
    agents: dict[str, AgentProc]  # registered name -> the agent
    dispatcher: Issued  # the first dispatcher certificate, kept apart (a rotation replaces it)
    registry_dir: Path  # the registry the cluster started with (shared-fs: every instance's)
    ttl: int = 2
    operator: Issued | None = None  # an operator client certificate (with tls)
    haproxy: HAProxy | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # added to every instance's environment

    @property
    def ca_cert(self) -> Path:
        return self.tmp / "ca" / "ca.crt"

    @property
    def signer(self) -> RecordSigner:
        """The cluster key the instances started with (what a dispatcher host holds), else
        the one the first leader made."""
        path = self.tmp / "ca" / KEY_FILE
        if not path.exists():
            path = next(i.ca_dir / KEY_FILE for i in self.insts.values()
                        if (i.ca_dir / KEY_FILE).exists())  # fmt: skip
        return RecordSigner(parse_key(path.read_bytes()))

    def running(self) -> list[Inst]:
        return [i for i in self.insts.values() if i.alive]

    def leaders(self, among: list[Inst] | None = None) -> list[Inst]:
        return [i for i in (among or self.running()) if get(f"{i.health_url}/leader", 1)[0] == 200]

    def one_leader(self, timeout: float = 10.0) -> Inst:
        """Exactly one instance answers /leader 200 (checked twice, 100 ms apart)."""

        def check() -> Inst | None:
            first = self.leaders()
            if len(first) != 1:
                return None
            time.sleep(0.1)
            second = self.leaders()
            return first[0] if [i.name for i in second] == [first[0].name] else None

        leader: Inst = wait_until(check, timeout, "exactly one leader", 0.05)
        return leader

    def followers(self) -> list[Inst]:
        leader = self.one_leader()
        return [i for i in self.running() if i is not leader]

    def ensure_all_running(self) -> None:
        """Start every instance that is not running; wait until each is healthy (and, with
        HAProxy, until HAProxy sends it traffic again)."""
        for i in self.insts.values():
            if not i.alive:
                i.start(env={**ENV, **self.env})
        for i in self.insts.values():
            i.wait_healthy(HEALED_WITHIN)
        if self.haproxy is not None:
            self.haproxy.wait_status(API_BACKEND, {i.id: "UP" for i in self.insts.values()})

    def restart(self, inst: Inst) -> None:
        """Start a stopped instance again and wait until it serves (through HAProxy too)."""
        assert not inst.alive, f"{inst.name} is still running"
        inst.start(env={**ENV, **self.env})
        inst.wait_healthy(HEALED_WITHIN)
        if self.haproxy is not None:
            self.haproxy.wait_status(API_BACKEND, {inst.id: "UP"})

    def ced(self, inst: Inst, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``ced ARGS --config CONFIG`` of ``inst``, as run on its host."""
        return subprocess.run(
            [sys.executable, "-m", "dispatcher.ced", *args, "--config", str(inst.config)],
            capture_output=True, text=True, env=ENV, timeout=timeout,
        )  # fmt: skip

    def backend(self, timeout: float = 1.0) -> EtcdBackend:
        return EtcdBackend(self.etcd.endpoints, cluster_name=self.name, timeout=timeout,
                           **self.etcd.client_kwargs())  # fmt: skip

    def effects(self) -> list[EffectRecord]:
        backend = self.backend()
        try:
            return backend.effects()
        finally:
            backend.close()

    def _generation(self) -> Generation | None:
        backend = self.backend(2.0)
        try:
            kv = backend.get_kv(backend.keys.generation)
            if kv is None:
                return None

            def chunks(shas: Sequence[str]) -> dict[str, bytes]:
                got = {s: backend.get_value(backend.keys.generation_chunk(s)) for s in shas}
                return {s: v for s, v in got.items() if v is not None}

            try:  # a record an attack test forged is no generation: wait for the genuine one
                body = self.signer.open("generation", backend.keys.generation, kv.value)
                return decode_generation(json.dumps(body), chunks)
            except (RecordRejected, ManifestError):
                return None
        finally:
            backend.close()

    def published(self) -> Generation:
        """The generation the leader published in etcd."""
        g = self._generation()
        assert g is not None, "no generation published"
        return g

    def converged(self, timeout: float = 30) -> Generation:
        """Wait until a generation is published and every running instance runs it."""

        def same() -> Generation | None:
            g = self._generation()
            if g is None:
                return None
            gens = {i.name: get(f"{i.health_url}/status", 2)[1] for i in self.running()}
            ok = all(isinstance(v, dict) and v["generation"] == g.number for v in gens.values())
            return g if ok else None

        g: Generation = wait_until(same, timeout, "every instance on the published generation")
        return g

    def verify(self) -> ssl.SSLContext:
        """Client context towards the API: the CA, the operator certificate if any."""
        return client_ssl(self.ca_cert, self.operator)

    def client(self, inst: Inst, timeout: float = 30) -> httpx.Client:
        """A client of one instance's API port."""
        if inst.scheme == "https":
            return httpx.Client(base_url=inst.url, verify=self.verify(), trust_env=False,
                                timeout=timeout)  # fmt: skip
        return httpx.Client(base_url=inst.url, trust_env=False, timeout=timeout)

    @property
    def api_url(self) -> str:
        """HAProxy's API frontend."""
        assert self.haproxy is not None, "this cluster runs no HAProxy"
        scheme = "https" if next(iter(self.insts.values())).scheme == "https" else "http"
        return f"{scheme}://127.0.0.1:{self.haproxy.api_port}"

    def api_client(self, timeout: float = 30) -> httpx.Client:
        """A client of HAProxy's API frontend (any instance answers)."""
        verify: ssl.SSLContext | bool = self.verify() if self.api_url.startswith("https") else True
        return httpx.Client(base_url=self.api_url, verify=verify, trust_env=False,
                            timeout=timeout)  # fmt: skip

    def load(self, **kw: Any) -> Load:
        """A :class:`Load` through HAProxy over every agent (not started)."""
        verify: ssl.SSLContext | bool = self.verify() if self.api_url.startswith("https") else True
        return Load(self.api_url, verify, list(self.agents), **kw)


def _instance_conf(spec: ClusterSpec, inst: Inst, shared: Mapping[str, str]) -> str:
    conf = {
        **shared, "ca_dir": str(inst.ca_dir), "registry_dir": str(inst.registry_dir),
        "state_dir": str(inst.state), "api_port": str(inst.api_port),
        "health_port": str(inst.health_port), "pairing_port": str(inst.pairing_port),
        "instance_id": inst.id,
    }  # fmt: skip
    if spec.tls:  # operators: <ca_dir>/operator-ca.crt, trusted without configuration
        conf.update(api_cert=str(inst.ca_dir / "dispatcher.crt"),
                    api_key=str(inst.ca_dir / "dispatcher.key"))  # fmt: skip
    if inst.proxy_port:
        conf["api_proxy_port"] = str(inst.proxy_port)
        conf["api_proxy_sources"] = "127.0.0.1"
    if inst.pairing_proxy_port:
        conf["pairing_proxy_port"] = str(inst.pairing_proxy_port)
        conf["api_proxy_sources"] = "127.0.0.1"
    conf.update(spec.extra)
    return "".join(f"{k} = {v}\n" for k, v in conf.items())


@contextlib.contextmanager
def running_cluster(tmp: Path, spec: ClusterSpec) -> Iterator[Cluster]:
    """Bring the cluster of ``spec`` up under ``tmp``; stop everything on the way out."""
    cluster_name = f"ha{secrets.token_hex(4)}"
    if spec.etcd_secure:
        etcd = secure_etcd(tmp / "etcd", f"/{cluster_name}/", size=spec.etcd_size).start()
    else:
        etcd = EtcdCluster(tmp / "etcd", size=spec.etcd_size).start()
    ca_dir = tmp / "ca"
    ca = pki.create_ca(ca_dir)
    dcert = pki.issue_dispatcher_cert(ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    if spec.cluster_key:
        write_key(ca_dir / KEY_FILE)  # the cluster key: every instance starts with a copy
    keep = tmp / "original"
    keep.mkdir()
    for f in ("dispatcher.crt", "dispatcher.key"):
        shutil.copy(ca_dir / f, keep / f)
    dispatcher = Issued(keep / "dispatcher.crt", keep / "dispatcher.key", dcert.serial_number)
    agent_ca = DispatcherCA(ca, tmp / "agent-certs")
    operator = OperatorCA(ca_dir, tmp / "operators").issue("chaos-operator") if spec.tls else None
    agents = {name: make_agent(tmp / name, agent_ca, {"disp": dispatcher}, dict(spec.scripts),
                               host=addr) for name, addr in spec.agents.items()}  # fmt: skip
    registry_dir = tmp / "agents"
    registry_dir.mkdir(parents=True, exist_ok=True)  # a cluster without agents too
    reg = Registry(registry_dir, LocalWriter())
    for name, agent in agents.items():
        reg.register(name, ip=agent.host, port=agent.port, lookup_by="ip",
                     dispatcher_serial=dispatcher.serial_hex)  # fmt: skip
    name = cluster_name
    shared = {
        "api_bind": "127.0.0.1", "health_bind": "127.0.0.1", "pairing_bind": "127.0.0.1",
        **etcd.client_conf(), "cluster_name": name,
        "lease_ttl": str(spec.ttl), "api_auth_default": "allow", "log_target": "stderr",
        "read_timeout": "10", "sync_mode": spec.sync_mode, "dispatcher_id": "disp",
    }  # fmt: skip
    if spec.sync_mode == "shared-fs":
        shared["rotation_file"] = str(tmp / "rotation.json")
    insts: dict[str, Inst] = {}
    for n in spec.names:
        state = tmp / f"state-{n}"
        state.mkdir()
        inst_ca, inst_registry = ca_dir, registry_dir
        if spec.sync_mode == "push":  # every instance starts from its own copy of the files
            inst_ca, inst_registry = tmp / f"ca-{n}", tmp / f"agents-{n}"
            shutil.copytree(ca_dir, inst_ca)
            shutil.copytree(registry_dir, inst_registry)
        inst = Inst(n, tmp / f"{n}.conf", tmp / f"{n}.log", free_port(), free_port(),
                    free_port(), state, inst_ca, inst_registry,
                    proxy_port=free_port() if spec.tls and spec.proxy_protocol else 0,
                    scheme="https" if spec.tls else "http",
                    pairing_proxy_port=free_port() if spec.pairing_proxy else 0)  # fmt: skip
        inst.config.write_text(_instance_conf(spec, inst, shared))
        insts[n] = inst
    c = Cluster(tmp, etcd, name, insts, agents, dispatcher, registry_dir, ttl=spec.ttl,
                operator=operator, env=dict(spec.env))  # fmt: skip
    try:
        for a in agents.values():
            a.start(wait=False)
        if spec.haproxy:
            members = [i.member for i in insts.values()]
            proxied = (spec.tls and spec.proxy_protocol) or spec.pairing_proxy
            c.haproxy = HAProxy(tmp / "haproxy", members, proxy_protocol=proxied).start()
        c.ensure_all_running()
        yield c
    finally:
        c.exit_codes = {i.name: i.stop() for i in insts.values()}
        if c.haproxy is not None:
            c.haproxy.stop()
        for a in agents.values():
            a.stop()
        etcd.close()


# ----- failover helpers ------------------------------------------------------------------------


def new_leader(cluster: Cluster, old: Inst, t0: float, timeout: float) -> tuple[Inst, float]:
    """The instance that answers /leader 200 after ``old`` went, and how long it took."""
    others = [i for i in cluster.insts.values() if i is not old and i.alive]
    new: list[Inst] = wait_until(lambda: cluster.leaders(others), timeout, "a new leader", 0.01)
    took = time.monotonic() - t0
    assert len(new) == 1, [i.name for i in new]
    return new[0], took


def pairing_listening(inst: Inst) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", inst.pairing_port), timeout=0.5):
            return True
    except OSError:
        return False


def history_violations(
    effects: Sequence[EffectRecord], leaders: Mapping[int, str] | None = None
) -> list[str]:
    """What is wrong with a recorded history of leader-only effects (empty: nothing).

    Epochs are create revisions of the leader key, so epoch ``E`` lasts from revision ``E``
    until the next epoch begins. Every effect must have been committed within its epoch
    (never before it, never at or after the revision where a newer epoch began), all
    effects of one epoch by one instance, and that instance the leader of the epoch when
    ``leaders`` (epoch -> instance id, as observed) names it.
    """
    epochs = sorted({e.epoch for e in effects} | set(leaders or {}))
    problems: list[str] = []
    actors: dict[int, set[str]] = {}
    for e in effects:
        actors.setdefault(e.epoch, set()).add(e.instance_id)
        what = f"{e.effect} by {e.instance_id} under epoch {e.epoch} at revision {e.revision}"
        if e.revision < e.epoch:
            problems.append(f"{what}: before its epoch began")
        later = [x for x in epochs if x > e.epoch]
        if later and e.revision >= later[0]:
            problems.append(f"{what}: after epoch {later[0]} began")
        if leaders and e.epoch in leaders and leaders[e.epoch] != e.instance_id:
            problems.append(f"{what}: epoch {e.epoch} was led by {leaders[e.epoch]}")
    for epoch, who in sorted(actors.items()):
        if len(who) > 1:
            problems.append(f"epoch {epoch}: effects by {sorted(who)}")
    return problems


# ----- client load through HAProxy --------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One logical request of the load: its first attempt and, if needed, the one retry."""

    n: int
    kind: str  # "ping" or "run"
    target: str  # the agent of a run ("" for a ping: every agent)
    started: float  # monotonic time the first attempt began
    latency: float  # seconds until the final answer (both attempts)
    first_error: str | None  # None: the first attempt was served
    final_error: str | None  # None: served (first attempt or retry)

    @property
    def ended(self) -> float:
        return self.started + self.latency

    @property
    def cut(self) -> bool:
        """The first attempt got no HTTP answer at all (connection cut or refused)."""
        return self.first_error is not None and not self.first_error.startswith("HTTP ")

    @property
    def refused_locked(self) -> bool:
        """Failed after the retry with an explicit 409 ``locked``: the host:script lock of
        a run still held (by a crashed instance: until its session lease expires)."""
        err = self.final_error or ""
        return err.startswith("HTTP 409") and '"error":"locked"' in err

    def conflicts(self) -> list[str]:
        """The ``host:script`` pairs a 409 ``locked`` answer named."""
        if not self.refused_locked:
            return []
        try:
            return list(json.loads((self.final_error or "").split(": ", 1)[1])["conflicts"])
        except (ValueError, KeyError, IndexError):
            return []


@dataclass
class LoadReport:
    outcomes: list[Outcome]

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    @property
    def first_failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.first_error is not None]

    @property
    def failures(self) -> list[Outcome]:
        """Requests that failed even after the retry."""
        return [o for o in self.outcomes if o.final_error is not None]

    @property
    def lost(self) -> list[Outcome]:
        """Failures after the retry other than an explicit 409 ``locked`` refusal."""
        return [o for o in self.failures if not o.refused_locked]

    @property
    def locked(self) -> list[Outcome]:
        """Failures after the retry that were explicit 409 ``locked`` refusals."""
        return [o for o in self.failures if o.refused_locked]

    def unexplained(self, crash: float, ttl: float, script: str = "echo-args") -> list[Outcome]:
        """Failures after the retry, except what a crash at ``crash`` (monotonic) explains.

        An instance killed during a run leaves that host:script lock in etcd until its
        session lease expires (at most ``ttl`` after its last keep-alive, plus etcd's
        half-second expiry check): the retry of the cut run, and new runs of the same
        host:script, are refused with an explicit 409 ``locked`` meanwhile. Those are
        explained when their pair is one of a run whose first attempt was cut and they
        began before ``crash + ttl + 1``; any other failure is not.
        """
        cut = {f"{o.target}:{script}" for o in self.outcomes if o.kind == "run" and o.cut}
        return [o for o in self.failures
                if not (o.refused_locked and o.started < crash + ttl + 1
                        and set(o.conflicts()) <= cut)]  # fmt: skip

    def errors(self) -> Counter[str]:
        """First-attempt errors by kind (the status or exception, without details)."""
        return Counter(_error_class(o.first_error) for o in self.first_failures)

    def latency(self, q: float) -> float:
        lat = sorted(o.latency for o in self.outcomes)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "first_attempt_failures": len(self.first_failures),
            "failures_after_retry": len(self.failures),
            "of_which_409_locked": len(self.locked),
            "first_attempt_errors": dict(self.errors()),
            "latency_p50_ms": round(self.latency(0.5) * 1000, 1),
            "latency_max_ms": round(self.latency(1.0) * 1000, 1),
        }

    def describe(self, limit: int = 10) -> str:
        """The failed requests, for an assertion message."""
        bad = self.failures or self.first_failures
        return "; ".join(f"#{o.n} {o.kind} {o.target}: first={o.first_error!r} "
                         f"final={o.final_error!r}" for o in bad[:limit])  # fmt: skip


def _error_class(err: str | None) -> str:
    if err is None:
        return ""
    return err.split(":", 1)[0]


class Load:
    """A client thread: ``POST /ping`` (every agent) and ``POST /run`` (one agent, in turn)
    alternately through HAProxy (only pings with ``kinds=("ping",)``), one new TLS
    connection per attempt, one retry allowed.

    Bounded: at most ``max_requests`` requests and ``max_seconds`` s, each attempt at most
    ``timeout`` s. ``interval`` is the pause between the end of one request and the next.
    """

    def __init__(
        self,
        url: str,
        verify: ssl.SSLContext | bool,
        hosts: list[str],
        *,
        script: str = "echo-args",
        kinds: tuple[str, ...] = ("run", "ping"),
        interval: float = 0.02,
        timeout: float = 10.0,
        retry_delay: float = 0.05,
        max_requests: int = 5000,
        max_seconds: float = 120.0,
    ) -> None:
        self.url = url
        self.hosts = hosts
        self.script = script
        self.kinds = kinds
        self.interval = interval
        self.retry_delay = retry_delay
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        # "Connection: close": every attempt is a new connection, balanced anew by HAProxy
        self._client = httpx.Client(base_url=url, verify=verify, trust_env=False,
                                    timeout=timeout, headers={"Connection": "close"})  # fmt: skip
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ha-load", daemon=True)
        self.crashed: BaseException | None = None

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        self._thread.join(30)
        self._client.close()
        return self.report()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def report(self, start: float | None = None, end: float | None = None) -> LoadReport:
        """Outcomes of the requests under way at some time in ``[start, end)`` (monotonic
        times): a request in flight when ``start`` came counts."""
        with self._lock:
            out = list(self._outcomes)
        return LoadReport([o for o in out if (start is None or o.ended >= start)
                           and (end is None or o.started < end)])  # fmt: skip

    def count(self) -> int:
        with self._lock:
            return len(self._outcomes)

    def wait_requests(self, n: int, timeout: float) -> None:
        """Wait until ``n`` more requests have been answered."""
        want = self.count() + n
        wait_until(lambda: self.count() >= want or not self.running, timeout,
                   f"{n} load requests")  # fmt: skip
        if self.crashed is not None:
            raise RuntimeError(f"the load thread crashed: {self.crashed!r}")
        assert self.count() >= want, "the load stopped early (its bounds)"

    # -- the thread --------------------------------------------------------------------------

    def _attempt(self, n: int, kind: str, host: str) -> str | None:
        """One attempt; None when it was served correctly, else what went wrong."""
        if kind == "ping":
            body: dict[str, Any] = {"hosts": self.hosts}
        else:
            body = {"hosts": [host], "script": self.script, "args": [f"r{n}"]}
        try:
            r = self._client.post(f"/{kind}", json=body)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:300]}"
        try:
            results = r.json()["results"]
        except (ValueError, KeyError, TypeError):
            return f"bad answer: {r.text[:300]}"
        if kind == "ping":
            bad = [x for x in results if x.get("status") != "ok"]
            if bad or len(results) != len(self.hosts):
                return f"ping error: {bad or results}"[:300]
        else:
            res = results[0] if len(results) == 1 else {}
            if res.get("exit") != 0 or f"arg1=[r{n}]" not in str(res.get("stdout", "")):
                return f"run error: {res or results}"[:300]
        return None

    def _one(self, n: int) -> Outcome:
        kind = self.kinds[n % len(self.kinds)]
        host = "" if kind == "ping" else self.hosts[(n // 2) % len(self.hosts)]
        t0 = time.monotonic()
        first = final = self._attempt(n, kind, host)
        if first is not None:
            self._stop.wait(self.retry_delay)
            final = self._attempt(n, kind, host)
        return Outcome(n, kind, host, t0, time.monotonic() - t0, first, final)

    def _run(self) -> None:
        started = time.monotonic()
        n = 0
        try:
            while not self._stop.is_set() and n < self.max_requests:
                if time.monotonic() - started > self.max_seconds:
                    break
                n += 1
                outcome = self._one(n)
                with self._lock:
                    self._outcomes.append(outcome)
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by wait_requests
            self.crashed = exc

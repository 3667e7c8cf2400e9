"""``ced cluster status|switchover|haproxy-config``, and the leader's hand for other verbs.

Each cluster verb talks to the coordination store of the config (etcd, or the embedded
local backend in ``state_dir``) directly, so it works from any dispatcher host with the
etcd client credentials, needs no API credentials, and needs no instance to be healthy:

* ``status [--json]``: the leader, its epoch, the published generation and every member
  (role, state, generation applied, cert serial, version, advertise URL);
* ``switchover [--json]``: asks the leader of the current epoch to resign (a request key
  it watches), waits for a new epoch and reports who leads now. If the leader does not act
  within two lease TTLs its election lease is revoked (forced); fencing makes that safe;
* ``switchover --to MEMBER``: the same, in favour of one member: the leader checks that it
  is live, serving and on the current generation, and the others leave it the campaign;
* ``history [--json]``: every change of leader on record, newest first: term, epoch, when,
  from, to, why (:mod:`cluster.history`);
* ``pause [--reason TEXT]`` / ``resume``: maintenance mode (:mod:`cluster.maintenance`):
  no automatic restarts or periodic leader work while paused;
* ``haproxy-config [--full] [--bind ADDR,...]``: a working HAProxy configuration
  (:mod:`dispatcher.haproxy`) for every instance of the roster, down ones included: only
  the ctrl-exec sections (for a shared load balancer), or a whole file with ``--full``;
* ``forget ID``: take a removed instance out of the roster (refused while it is live);
* ``adopt-local ID --yes``: a leader that lacks the published generation waits for a member
  that has it; this lets it publish its own files instead (those changes are lost);
* ``keepalived-config``: the keepalived (VRRP) configuration of one of two load balancers
  sharing a virtual IP (:mod:`dispatcher.keepalived`); it needs no store.

``rotate-cert`` in a cluster waits until every member presents the new serial
(:func:`wait_converged`).

Failures print ``ced cluster: <what>`` on stderr (and ``{"ok":0,...}`` with ``--json``),
exit 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from cluster import history, maintenance
from cluster.errors import BackendUnavailable
from dispatcher.ced.invocation import Invocation
from dispatcher.ced.output import err, out, out_json, table
from dispatcher.errors import ExitCode, UsageError
from dispatcher.ha.actions import requested_by

if TYPE_CHECKING:
    from cluster.backend import KVBackend, LeaderInfo, MemberInfo
    from cluster.signing import RecordSigner
    from dispatcher.config import DispatcherConfig
    from dispatcher.haproxy import Member

T = TypeVar("T")

PROG = "ced cluster"
CLI_TIMEOUT = 2.0  # per etcd call: an operator would rather wait than see a false alarm


def _signer(cfg: DispatcherConfig) -> RecordSigner | None:
    """The cluster key (records the instances act on are sealed with it), on etcd only."""
    if not cfg.etcd_endpoints:
        return None
    from dispatcher.ha.records import Records

    return Records.for_ca_dir(cfg.ca_dir).signer


def _backend(cfg: DispatcherConfig) -> KVBackend:
    from dispatcher.ha.coordination import backend_from_config

    return backend_from_config(cfg, timeout=CLI_TIMEOUT)


def _fail(as_json: bool, msg: str, **extra: Any) -> ExitCode:
    if as_json:
        out_json({"ok": 0, "error": msg, **extra})
    err(f"{PROG}: {msg}" + (f": {extra['detail']}" if "detail" in extra else ""))
    return ExitCode.FAILURE


USAGE = ("usage: ced cluster status [--json] | switchover [--to MEMBER] | history [--json] | "
         "pause [--reason TEXT] | resume | haproxy-config [--full] [--bind ADDR,...] | "
         "forget INSTANCE_ID | adopt-local INSTANCE_ID --yes | keepalived-config --vip IP "
         "--interface IF --address OWN_IP --peer PEER_IP [--priority N] [--router-id N]")  # fmt: skip


def subverbs() -> dict[str, Callable[[Invocation], ExitCode]]:
    """Every ``ced cluster`` sub-verb and its handler."""
    return {"status": cluster_status, "switchover": cluster_switchover,
            "history": cluster_history, "pause": cluster_pause, "resume": cluster_resume,
            "haproxy-config": cluster_haproxy_config,
            "keepalived-config": cluster_keepalived_config, "forget": cluster_forget,
            "adopt-local": cluster_adopt_local}  # fmt: skip


def cmd_cluster(inv: Invocation) -> ExitCode:
    """``ced cluster status | switchover | history | pause | resume | haproxy-config``."""
    verb = inv.words[0] if inv.words else ""
    inv.d  # noqa: B018  (the config is read, and checked, before the sub-verb)
    handler = subverbs().get(verb)
    if handler is None:
        raise UsageError(USAGE)
    return handler(inv)


# ----- status ------------------------------------------------------------------------------


def _member_doc(m: MemberInfo, leader: LeaderInfo | None) -> dict[str, Any]:
    return {
        "instance_id": m.instance_id,
        "role": "leader" if leader is not None and leader.instance_id == m.instance_id
        else "follower",
        "state": m.state,
        "advertise_url": m.advertise_url,
        "version": m.version,
        "cert_serial": m.cert_serial,
        "generation": m.generation,
        "restart_pending": m.restart_pending,
        "health_port": m.health_port,
        "pairing_port": m.pairing_port,
    }  # fmt: skip


def status_document(cfg: DispatcherConfig, backend: KVBackend) -> dict[str, Any]:
    """The ``cluster status --json`` document (raises BackendUnavailable)."""
    from dispatcher.ha.coordination import lease_ttl

    leader = backend.leader()
    members = sorted(backend.members(), key=lambda m: m.instance_id)
    return {
        "ok": 1,
        "cluster": cfg.cluster_name,
        "backend": backend.kind,
        "endpoints": list(cfg.etcd_endpoints),
        "leader": leader.instance_id if leader is not None else None,
        "epoch": leader.epoch if leader is not None else None,
        "generation": backend.generation(),
        "lease_ttl": lease_ttl(cfg),
        "paused": asdict(p) if (p := maintenance.read(backend)) is not None else None,
        "members": [_member_doc(m, leader) for m in members],
    }


def cluster_status(inv: Invocation) -> ExitCode:
    """Print the cluster's members, leader, epoch and generation."""
    cfg = inv.d.cfg
    doc = _in_store(inv, lambda b: status_document(cfg, b))
    if isinstance(doc, ExitCode):
        return doc
    if inv.json:
        out_json(doc)
        return ExitCode.OK
    where = ",".join(doc["endpoints"]) if doc["backend"] == "etcd" else cfg.state_dir
    leader = f"leader {doc['leader']}, epoch {doc['epoch']}" if doc["leader"] else "no leader"
    out(f"cluster {doc['cluster']} ({doc['backend']} {where}): {leader}, "
        f"generation {doc['generation']}, {len(doc['members'])} member(s)")  # fmt: skip
    if doc["paused"]:
        out(f"PAUSED by {doc['paused']['by']}: {doc['paused']['reason'] or '(no reason)'} "
            "- no automatic restarts or maintenance until 'ced cluster resume'")  # fmt: skip
    if doc["members"]:
        rows = [["INSTANCE", "ROLE", "STATE", "GEN", "CERT-SERIAL", "VERSION", "API"]]
        rows += [[m["instance_id"], m["role"], m["state"], str(m["generation"]),
                  m["cert_serial"] or "-", m["version"] or "-", m["advertise_url"] or "-"]
                 for m in doc["members"]]  # fmt: skip
        for line in table(rows):
            out(line)
    return ExitCode.OK


# ----- switchover --------------------------------------------------------------------------


def _wait_new_leader(backend: KVBackend, old_epoch: int, timeout: float) -> LeaderInfo | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = backend.leader()
        except BackendUnavailable:
            info = None
        if info is not None and info.epoch != old_epoch:
            return info
        time.sleep(0.05)
    return None


def _switch(inv: Invocation, backend: KVBackend, ttl: int) -> dict[str, Any] | ExitCode:
    """Ask the leader to resign (force it when it does not); the report or a failure."""
    from dispatcher.ha import switchover

    try:
        old = backend.leader()
        if old is None:
            return _fail(inv.json, "no leader to switch over from")
        to = inv.ns.to or ""
        if to:
            problem = (f"{to} leads already" if to == old.instance_id else
                       switchover.target_problem(backend.members(), to, backend.generation()))  # fmt: skip
            if problem is not None:
                return _fail(inv.json, f"cannot switch over to {to}", detail=problem)
        t0 = time.monotonic()
        switchover.post_request(backend, old, requested_by(), to, _signer(inv.d.cfg))
    except BackendUnavailable as exc:
        return _fail(inv.json, "cluster unavailable", detail=str(exc))
    new = _wait_new_leader(backend, old.epoch, 2 * ttl + 1)
    forced = False
    if new is None:
        err(f"{PROG}: {old.instance_id} did not resign within {2 * ttl + 1} s; "
            "revoking its election lease")  # fmt: skip
        try:
            backend.resign(old.lease)
        except BackendUnavailable as exc:
            return _fail(inv.json, "cluster unavailable", detail=str(exc))
        forced = True
        new = _wait_new_leader(backend, old.epoch, ttl + 2)
    took = round(time.monotonic() - t0, 3)
    if new is None:
        return _fail(inv.json, "no new leader elected", old_leader=old.instance_id,
                     old_epoch=old.epoch)  # fmt: skip
    if to and new.instance_id != to:
        return _fail(inv.json, f"{new.instance_id} took over, not {to}", leader=new.instance_id,
                     epoch=new.epoch, old_leader=old.instance_id, forced=forced)  # fmt: skip
    return {"ok": 1, "old_leader": old.instance_id, "old_epoch": old.epoch,
            "leader": new.instance_id, "epoch": new.epoch, "forced": forced,
            "seconds": took}  # fmt: skip


def cluster_switchover(inv: Invocation) -> ExitCode:
    """Ask the leader to resign and wait until a new epoch leads."""
    from dispatcher.ha.coordination import lease_ttl

    cfg = inv.d.cfg
    backend = _backend(cfg)
    try:
        doc = _switch(inv, backend, lease_ttl(cfg))
    finally:
        backend.close()
    if isinstance(doc, ExitCode):
        return doc
    if inv.json:
        out_json(doc)
    else:
        how = " (forced)" if doc["forced"] else ""
        out(f"switchover{how}: {doc['old_leader']} (epoch {doc['old_epoch']}) -> "
            f"{doc['leader']} (epoch {doc['epoch']}) in {doc['seconds']} s")  # fmt: skip
    return ExitCode.OK


# ----- history, pause, resume ----------------------------------------------------------------


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at else "-"


def _in_store(inv: Invocation, fn: Callable[[KVBackend], T]) -> T | ExitCode:
    """``fn(backend)`` on the config's store; an unreachable store is a failure."""
    backend = _backend(inv.d.cfg)
    try:
        return fn(backend)
    except BackendUnavailable as exc:
        return _fail(inv.json, "cluster unavailable", detail=str(exc))
    finally:
        backend.close()


def cluster_history(inv: Invocation) -> ExitCode:
    """Every change of leader on record, newest first."""
    terms = _in_store(inv, history.terms)
    if isinstance(terms, ExitCode):
        return terms
    if inv.json:
        out_json({"ok": 1, "history": [{**asdict(t), "time": _when(t.at)} for t in terms]})
        return ExitCode.OK
    rows = [["TERM", "EPOCH", "TIME", "FROM", "TO", "REASON"]]
    rows += [[str(t.term), str(t.epoch), _when(t.at), t.previous or "-", t.leader, t.reason]
             for t in terms]  # fmt: skip
    for line in table(rows):
        out(line)
    return ExitCode.OK


def cluster_pause(inv: Invocation) -> ExitCode:
    signer = _signer(inv.d.cfg)
    p = _in_store(inv, lambda b: maintenance.pause(b, requested_by(), inv.ns.reason or "", signer))
    if isinstance(p, ExitCode):
        return p
    if inv.json:
        out_json({"ok": 1, "paused": asdict(p)})
    else:
        out(f"cluster paused by {p.by}: no automatic restarts or maintenance until "
            "'ced cluster resume' (election, run/ping and operator actions go on)")  # fmt: skip
    return ExitCode.OK


def cluster_resume(inv: Invocation) -> ExitCode:
    was = _in_store(inv, maintenance.resume)
    if isinstance(was, ExitCode):
        return was
    if inv.json:
        out_json({"ok": 1, "was_paused": was})
    else:
        out("cluster resumed" if was else "the cluster was not paused")
    return ExitCode.OK


# ----- haproxy-config ----------------------------------------------------------------------


def haproxy_members(cfg: DispatcherConfig, members: list[MemberInfo]) -> list[Member]:
    """:class:`dispatcher.haproxy.Member` of each member with a usable advertise URL."""
    from dispatcher.haproxy import Member

    found = []
    for m in sorted(members, key=lambda m: m.instance_id):
        parts = urlsplit(m.advertise_url)
        if not parts.hostname:
            continue
        port = parts.port or (443 if parts.scheme == "https" else cfg.api_port)
        found.append(Member(
            instance_id=m.instance_id, host=parts.hostname, api_port=port,
            health_port=m.health_port or cfg.health_port,
            pairing_port=m.pairing_port or cfg.pairing_port, proxy_port=m.proxy_port,
            pairing_proxy_port=m.pairing_proxy_port,
        ))  # fmt: skip
    return found


def cluster_haproxy_config(inv: Invocation) -> ExitCode:
    """Print an HAProxy configuration for every instance of the roster (down ones too)."""
    import sys

    from dispatcher.haproxy import render

    cfg = inv.d.cfg
    backend = _backend(cfg)
    try:
        members = haproxy_members(cfg, _configured(cfg, backend))
    except BackendUnavailable as exc:
        return _fail(False, "cluster unavailable", detail=str(exc))
    finally:
        backend.close()
    if not members:
        return _fail(False, "no members registered (is any ctrl-exec-api running?)")
    proxy = any(m.proxy_port or m.pairing_proxy_port for m in members)
    binds = [b.strip() for b in (inv.ns.bind or "0.0.0.0").split(",") if b.strip()]
    sys.stdout.write(render(members, api_port=cfg.api_port, pairing_port=cfg.pairing_port,
                            proxy_protocol=proxy, bind=binds, full=bool(inv.ns.full),
                            pairing_timeout=cfg.pairing_timeout))  # fmt: skip
    return ExitCode.OK


def _configured(cfg: DispatcherConfig, backend: KVBackend) -> list[MemberInfo]:
    """Live members plus the roster's (:mod:`dispatcher.ha.roster`; etcd only)."""
    if backend.kind != "etcd":
        return backend.members()
    from dispatcher.ha import roster
    from dispatcher.ha.records import Records

    return roster.configured(backend, Records.for_ca_dir(cfg.ca_dir))


def cluster_adopt_local(inv: Invocation) -> ExitCode:
    """``cluster adopt-local ID``: let leader ID publish its own files over a published
    generation no reachable member has (it waits otherwise; the changes it lacks are lost)."""
    from dispatcher.ha.records import Records
    from dispatcher.ha.sync import adopt

    target = inv.words[1] if len(inv.words) > 1 else ""
    if not target:
        raise UsageError("usage: ced cluster adopt-local INSTANCE_ID --yes")
    if not inv.ns.yes:
        return _fail(inv.json, "adopt-local loses every change of the generations that "
                     f"{target} never applied: add --yes")  # fmt: skip
    records = Records.for_ca_dir(inv.d.cfg.ca_dir)
    if records.problem is not None:
        return _fail(inv.json, records.problem)

    def grant(b: KVBackend) -> int:
        leader = b.leader()
        if leader is None or leader.instance_id != target:
            return -1
        generation = b.generation()
        adopt.grant(b, records, target, generation, requested_by())
        return generation

    got = _in_store(inv, grant)
    if isinstance(got, ExitCode):
        return got
    if got < 0:
        return _fail(inv.json, f"{target} does not lead: only a leader waiting for a "
                     "generation it lacks can adopt its own files")  # fmt: skip
    if inv.json:
        out_json({"ok": 1, "instance_id": target, "generation": got})
    else:
        out(f"{target} may now publish its own files over generation {got}")
    return ExitCode.OK


def cluster_forget(inv: Invocation) -> ExitCode:
    """``cluster forget ID``: take a removed instance out of the roster (not while live)."""
    from dispatcher.ha import roster

    target = inv.words[1] if len(inv.words) > 1 else ""
    if not target:
        raise UsageError("usage: ced cluster forget INSTANCE_ID")

    def forget(b: KVBackend) -> str:
        if any(m.instance_id == target for m in b.members()):
            return "live"
        return "forgotten" if roster.forget(b, target) else "unknown"

    got = _in_store(inv, forget)
    if isinstance(got, ExitCode):
        return got
    if got == "live":
        return _fail(inv.json, f"{target} is a live member: stop it first")
    if inv.json:
        out_json({"ok": 1, "instance_id": target, "result": got})
    else:
        out(f"{target}: {'removed from the roster' if got == 'forgotten' else 'not in the roster'}")
    return ExitCode.OK


def cluster_keepalived_config(inv: Invocation) -> ExitCode:
    """Print the keepalived configuration of one load balancer of a pair."""
    import sys

    from dispatcher.keepalived import KeepalivedConfigError, render

    ns = inv.ns
    missing = [f"--{n}" for n in ("vip", "interface", "address", "peer") if not getattr(ns, n)]
    if missing:
        raise UsageError(f"ced cluster keepalived-config: missing {', '.join(missing)}")
    try:
        text = render(
            vip=ns.vip, interface=ns.interface, address=ns.address, peers=list(ns.peer),
            priority=ns.priority or 100, router_id=ns.router_id or 74,
        )  # fmt: skip
    except KeepalivedConfigError as exc:
        raise UsageError(f"ced cluster keepalived-config: {exc}") from None
    sys.stdout.write(text)
    return ExitCode.OK


# ----- rotation in a cluster: convergence -------------------------------------------------


def members(inv: Invocation) -> list[str]:
    """The instance ids registered in the cluster right now ([] when unreachable)."""
    backend = _backend(inv.d.cfg)
    try:
        return sorted(m.instance_id for m in backend.members())
    except BackendUnavailable:
        return []
    finally:
        backend.close()


def _behind(
    backend: KVBackend, want: str, generation: int, expected: list[str]
) -> tuple[list[MemberInfo], list[str]]:
    """The members now, and those not yet presenting serial ``want`` on ``generation``."""
    from agent.common.serial import serial_to_hex

    try:
        found = backend.members()
    except BackendUnavailable:
        found = []
    behind = sorted(m.instance_id for m in found
                    if serial_to_hex(m.cert_serial) != want or m.restart_pending
                    or m.generation < generation or m.state != "serving")  # fmt: skip
    present = {m.instance_id for m in found}
    behind += sorted(f"{i} (absent)" for i in expected if i not in present)
    return found, behind


def wait_converged(
    inv: Invocation, serial: str, generation: int, timeout: float, expected: list[str]
) -> dict[str, Any]:
    """Wait until every member (at least the ``expected`` ones, which were there when the
    rotation began) presents ``serial`` (restarted) on ``generation`` or later."""
    from agent.common.serial import serial_to_hex

    want = serial_to_hex(serial)
    t0 = time.monotonic()
    last = ""
    backend = _backend(inv.d.cfg)
    try:
        while True:
            found, behind = _behind(backend, want, generation, expected)
            if found and not behind:
                return {"converged": True, "seconds": round(time.monotonic() - t0, 2),
                        "members": sorted(m.instance_id for m in found)}  # fmt: skip
            text = f"waiting for {', '.join(behind) or 'the members'} to present {serial}"
            if text != last and not inv.json:
                err(f"  {text}")
                last = text
            if time.monotonic() - t0 > timeout:
                return {"converged": False, "seconds": round(time.monotonic() - t0, 2),
                        "waiting": behind}  # fmt: skip
            time.sleep(0.2)
    finally:
        backend.close()

"""``ced cluster status|switchover|haproxy-config``: cluster verbs read from the store.

Each verb talks to the coordination store of the config (etcd, or the embedded local
backend in ``state_dir``) directly, so it works from any dispatcher host with the etcd
client credentials, needs no API credentials, and needs no instance to be healthy:

* ``status [--json]``: the leader, its epoch, the published generation and every member
  (role, state, generation applied, cert serial, version, advertise URL);
* ``switchover [--json]``: asks the leader of the current epoch to resign (a request key
  it watches), waits for a new epoch and reports who leads now. If the leader does not act
  within two lease TTLs its election lease is revoked (forced); fencing makes that safe;
* ``haproxy-config``: a working HAProxy configuration (:mod:`dispatcher.haproxy`) for the
  registered members.

Text goes to stdout, diagnostics to stderr; ``--json`` prints exactly one JSON document
(upstream's ``"ok":1`` / ``"ok":0`` integers). Exit status 0 on success, 1 on failure.
Runnable alone: ``python -m dispatcher.cluster_cli status --config PATH [--json]``.
"""

from __future__ import annotations

import argparse
import json as _json
import sys
import time
from typing import IO, Any
from urllib.parse import urlsplit

from agent.common.errors import ConfigError
from cluster.backend import KVBackend, LeaderInfo, MemberInfo
from cluster.errors import BackendUnavailable
from dispatcher.config import DEFAULT_CONFIG, DispatcherConfig, load
from dispatcher.ha.coordination import backend_from_config, lease_ttl

PROG = "ced cluster"
CLI_TIMEOUT = 2.0  # per etcd call: an operator would rather wait than see a false alarm


def _out_json(obj: Any, out: IO[str]) -> None:
    out.write(_json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    out.flush()


def _fail(msg: str, as_json: bool, out: IO[str], err: IO[str], **extra: Any) -> int:
    if as_json:
        _out_json({"ok": 0, "error": msg, **extra}, out)
    print(f"{PROG}: {msg}" + (f": {extra['detail']}" if "detail" in extra else ""), file=err)
    return 1


def _backend(cfg: DispatcherConfig) -> KVBackend:
    return backend_from_config(cfg, timeout=CLI_TIMEOUT)


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
        "members": [_member_doc(m, leader) for m in members],
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def cluster_status(
    cfg: DispatcherConfig, json: bool = False, *, out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:  # fmt: skip
    """Print the cluster's members, leader, epoch and generation."""
    out, err = out or sys.stdout, err or sys.stderr
    backend = _backend(cfg)
    try:
        doc = status_document(cfg, backend)
    except BackendUnavailable as exc:
        return _fail("cluster unavailable", json, out, err, detail=str(exc))
    finally:
        backend.close()
    if json:
        _out_json(doc, out)
        return 0
    where = ",".join(doc["endpoints"]) if doc["backend"] == "etcd" else cfg.state_dir
    leader = f"leader {doc['leader']}, epoch {doc['epoch']}" if doc["leader"] else "no leader"
    lines = [f"cluster {doc['cluster']} ({doc['backend']} {where}): {leader}, "
             f"generation {doc['generation']}, {len(doc['members'])} member(s)"]  # fmt: skip
    if doc["members"]:
        rows = [["INSTANCE", "ROLE", "STATE", "GEN", "CERT-SERIAL", "VERSION", "API"]]
        rows += [[m["instance_id"], m["role"], m["state"], str(m["generation"]),
                  m["cert_serial"] or "-", m["version"] or "-", m["advertise_url"] or "-"]
                 for m in doc["members"]]  # fmt: skip
        lines += _table(rows)
    out.write("\n".join(lines) + "\n")
    return 0


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


def cluster_switchover(
    cfg: DispatcherConfig, json: bool = False, *, out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:  # fmt: skip
    """Ask the leader to resign and wait until a new epoch leads."""
    from dispatcher.ha import switchover

    out, err = out or sys.stdout, err or sys.stderr
    ttl = lease_ttl(cfg)
    backend = _backend(cfg)
    try:
        try:
            old = backend.leader()
            if old is None:
                return _fail("no leader to switch over from", json, out, err)
            t0 = time.monotonic()
            switchover.post_request(backend, old)
        except BackendUnavailable as exc:
            return _fail("cluster unavailable", json, out, err, detail=str(exc))
        new = _wait_new_leader(backend, old.epoch, 2 * ttl + 1)
        forced = False
        if new is None:
            print(f"{PROG}: {old.instance_id} did not resign within {2 * ttl + 1} s; "
                  "revoking its election lease", file=err)  # fmt: skip
            try:
                backend.resign(old.lease)
            except BackendUnavailable as exc:
                return _fail("cluster unavailable", json, out, err, detail=str(exc))
            forced = True
            new = _wait_new_leader(backend, old.epoch, ttl + 2)
        took = round(time.monotonic() - t0, 3)
        if new is None:
            return _fail("no new leader elected", json, out, err, old_leader=old.instance_id,
                         old_epoch=old.epoch)  # fmt: skip
    finally:
        backend.close()
    doc = {"ok": 1, "old_leader": old.instance_id, "old_epoch": old.epoch,
           "leader": new.instance_id, "epoch": new.epoch, "forced": forced,
           "seconds": took}  # fmt: skip
    if json:
        _out_json(doc, out)
    else:
        how = " (forced)" if forced else ""
        out.write(f"switchover{how}: {old.instance_id} (epoch {old.epoch}) -> "
                  f"{new.instance_id} (epoch {new.epoch}) in {took} s\n")  # fmt: skip
    return 0


def haproxy_members(cfg: DispatcherConfig, members: list[MemberInfo]) -> list[Any]:
    """:class:`dispatcher.haproxy.Member` of each member with a usable advertise URL."""
    from dispatcher.haproxy import Member

    out = []
    for m in sorted(members, key=lambda m: m.instance_id):
        parts = urlsplit(m.advertise_url)
        if not parts.hostname:
            continue
        port = parts.port or (443 if parts.scheme == "https" else cfg.api_port)
        out.append(Member(
            instance_id=m.instance_id, host=parts.hostname, api_port=port,
            health_port=m.health_port or cfg.health_port,
            pairing_port=m.pairing_port or cfg.pairing_port, proxy_port=m.proxy_port,
        ))  # fmt: skip
    return out


def cluster_haproxy_config(
    cfg: DispatcherConfig, *, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    """Print an HAProxy configuration for the members registered right now."""
    from dispatcher.haproxy import render

    out, err = out or sys.stdout, err or sys.stderr
    backend = _backend(cfg)
    try:
        members = haproxy_members(cfg, backend.members())
    except BackendUnavailable as exc:
        return _fail("cluster unavailable", False, out, err, detail=str(exc))
    finally:
        backend.close()
    if not members:
        return _fail("no members registered (is any ctrl-exec-api running?)", False, out, err)
    proxy = any(m.proxy_port for m in members)
    out.write(render(members, api_port=cfg.api_port, pairing_port=cfg.pairing_port,
                     proxy_protocol=proxy))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dispatcher.cluster_cli",
                                 description="ctrl-exec cluster verbs")  # fmt: skip
    ap.add_argument("verb", choices=["status", "switchover", "haproxy-config"])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="ctrl-exec.conf path")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        return _fail(str(exc), args.json, sys.stdout, sys.stderr)
    if args.verb == "status":
        return cluster_status(cfg, args.json)
    if args.verb == "switchover":
        return cluster_switchover(cfg, args.json)
    return cluster_haproxy_config(cfg)


if __name__ == "__main__":
    sys.exit(main())

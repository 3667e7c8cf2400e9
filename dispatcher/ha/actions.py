"""Leader-only actions: the one home of every change to leader-owned state.

Each action is one typed function ``fn(d, *, arg: type, ...) -> data`` (``data`` is a
JSON document) listed in :data:`ACTIONS`. Three paths reach it, and all three call
:func:`perform`, which runs the function under one fenced operation (the epoch it began
with is the epoch of every write and log line; see :class:`~dispatcher.ha.writer.FencedWriter`)
and returns one :class:`ActionResult`:

* ``ced`` on a host without ``etcd_endpoints``: :func:`request` performs it locally (the
  embedded backend makes this host the leader, as upstream on one host);
* ``ced`` in a cluster: :func:`request` posts it to the leader through the store
  (:mod:`dispatcher.ha.leader_requests`); the leader's request loop
  (:class:`~dispatcher.ha.leaderwork.LeaderWork`) looks the name up in :data:`ACTIONS`
  and calls :func:`perform`;
* the API (``/pairing/...``): the leader calls :func:`perform`; a follower forwards the
  HTTP request to the leader (:mod:`dispatcher.api.leadergate`).

In a cluster a change is acknowledged only once the generation carrying it is applied by
the members ``sync_ack`` asks for (:mod:`dispatcher.ha.replication`); the result names
that generation.

Arguments arriving from the store are checked against the function's annotations
(:func:`bind`) before anything runs: an unknown action, an unknown argument or a value of
the wrong type is refused with :class:`ActionFailed`, never a crash of the caller's loop.
"""

from __future__ import annotations

import functools
import inspect
import os
import socket
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import CtrlExecError
from dispatcher.core import Dispatcher  # at run time: bind() resolves the annotations


class ActionFailed(CtrlExecError):
    """The action was refused or failed; the message is for the operator."""


@dataclass(frozen=True)
class ActionResult:
    name: str
    data: Any  # the action's JSON document
    leader: str = ""  # the instance that carried it out ("" on a single host)
    epoch: int | None = None  # the epoch it was committed under (None on a single host)
    generation: int | None = None  # the generation that carries the change (cluster)


@dataclass(frozen=True)
class Action:
    name: str
    operation: str  # the fenced operation's name (effects history, logs)
    fn: Callable[..., Any]
    bootstrap: bool = False  # may run locally while the cluster has no member at all
    phased: bool = False  # runs its own fenced operations, each acknowledged (rotate-cert)


# ----- the actions ---------------------------------------------------------------------


def approve(
    d: Dispatcher, *, reqid: str, lookup_by: str | None = None, ip: str | None = None,
    agent_port: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Sign the queued CSR, register the agent, leave the approval for the agent."""
    from dispatcher.pairing import queue as pq

    res = pq.approve(d.cfg, reqid, lookup_by=lookup_by, ip=ip, agent_port=agent_port,
                     writer=d.writer)  # fmt: skip
    return {"reqid": res.reqid, "hostname": res.name, "lookup_by": res.lookup_by,
            "ip": res.ip, "port": res.port, "addr": res.addr, "expiry": res.expiry,
            "dispatcher_serial": res.dispatcher_serial, "record": res.record,
            "warnings": res.warnings}  # fmt: skip


def deny(d: Dispatcher, *, reqid: str, reason: str = "rejected by operator") -> dict[str, Any]:
    from dispatcher.pairing import queue as pq

    pq.deny(d.cfg, reqid, writer=d.writer, reason=reason or "rejected by operator")
    return {"reqid": reqid}


def list_requests(d: Dispatcher) -> list[dict[str, Any]]:
    """The pending pairing requests, without CSR and nonce, with what approval would do
    (CSR CN, the IP it registers, the source IP, whether the name is already registered:
    :func:`dispatcher.pairing.queue.describe`)."""
    from dispatcher.pairing import queue as pq

    pending = pq.describe(pq.list_pending(d.cfg.pairing_dir, writer=d.writer), d.registry)
    return [{k: v for k, v in r.items() if k not in ("csr", "nonce")} for r in pending]


def token_create(
    d: Dispatcher, *, hashes: str, expires_in: int, tags: str = "", re_pair: bool = False
) -> dict[str, Any]:
    """Store new pairing tokens' hashes (``hashes``: JSON ``{id: sha256}``, made by ``ced``:
    the clear tokens never reach the leader nor etcd; :mod:`dispatcher.pairing.tokens`)."""
    import json

    from dispatcher.pairing import tokens

    try:
        entries = json.loads(hashes)
    except ValueError:
        raise ActionFailed("pairing-token-create: hashes must be a JSON object") from None
    if not isinstance(entries, dict):
        raise ActionFailed("pairing-token-create: hashes must be a JSON object")
    ids = tokens.add(d.cfg.ca_dir, entries, expires_in=expires_in,
                     tags=tokens.parse_tags(tags), re_pair=re_pair, writer=d.writer)  # fmt: skip
    return {"ids": ids, "expires_in": expires_in}


def token_list(d: Dispatcher) -> list[dict[str, Any]]:
    from dispatcher.pairing import tokens

    return tokens.listing(d.cfg.ca_dir)


def token_revoke(d: Dispatcher, *, ids: str = "", every: bool = False) -> dict[str, Any]:
    """Revoke the comma-separated ``ids``, or every unused token (``every``)."""
    from dispatcher.pairing import tokens

    chosen = [i for i in ids.split(",") if i] if not every else None
    if chosen is not None and not chosen:
        raise ActionFailed("pairing-token-revoke: name token ids, or --all")
    return {"revoked": tokens.revoke(d.cfg.ca_dir, chosen, writer=d.writer)}


def unpair(d: Dispatcher, *, name: str) -> dict[str, Any]:
    from agent.common import logfmt
    from dispatcher.registry import RegistryError

    reg = d.registry
    record = reg.get(name)
    if record is None or not reg.delete(name):
        raise RegistryError(f"no registry entry for '{name}'")
    expiry = record.get("expiry") or "unknown"
    logfmt.event("unpair", agent=name, expiry=expiry)
    return {"hostname": name, "expiry": expiry}


def edit_agent(
    d: Dispatcher, *, name: str, rename: str | None = None, ip: str | None = None,
    port: int | None = None, lookup_by: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Rename and/or change address fields of a registered agent; the new record."""
    from agent.common import logfmt
    from dispatcher.statewrite import batched

    changes = {k: v for k, v in (("ip", ip), ("port", port), ("lookup_by", lookup_by))
               if v is not None}  # fmt: skip
    if rename is None and not changes:
        raise ActionFailed("nothing to change")
    reg = d.registry
    record: dict[str, Any] | None
    with reg.locked():
        if rename is not None:
            with batched(d.writer):  # the new record and the old one's removal: one commit
                record = reg.rename(name, rename)
        else:
            record = reg.get(name)
        if changes:  # reads the record back: after the batch
            record = reg.update(rename or name, **changes)
    if record is None:
        raise ActionFailed(f"no registry entry for '{name}'")
    fields: dict[str, Any] = {k: record.get(k) for k in changes}
    if rename is not None:
        fields["renamed_from"] = name
    logfmt.event("edit-agent", agent=record.get("hostname"), **fields)
    return record


def _cluster_key(d: Dispatcher) -> str:
    """Create ``<ca_dir>/cluster.key`` (0600, through the writer: replicated with the CA
    files) unless it exists; its path. Records the instances act on are sealed with it."""
    import secrets

    from cluster.signing import KEY_BYTES, KEY_FILE

    path = Path(d.cfg.ca_dir) / KEY_FILE
    if not path.exists():
        d.writer.write(path, secrets.token_bytes(KEY_BYTES).hex() + "\n", 0o600)
    return str(path)


def setup_ca(d: Dispatcher) -> dict[str, Any]:
    from dispatcher.pki import ca as pki

    ca_dir = Path(d.cfg.ca_dir)
    pki.create_ca(ca_dir, writer=d.writer)
    return {"key": str(ca_dir / "ca.key"), "cert": str(ca_dir / "ca.crt"),
            "cluster_key": _cluster_key(d)}  # fmt: skip


def setup_operator_ca(d: Dispatcher, *, replace: bool = False) -> dict[str, Any]:
    """The operators' own CA under ``ca_dir`` (:mod:`dispatcher.pki.operatorca`);
    ``replace``: a new one instead of the existing one (revokes every operator cert)."""
    from dispatcher.pki import operatorca
    from dispatcher.pki.ca import fingerprint

    ca = operatorca.create_operator_ca(d.cfg.ca_dir, writer=d.writer, replace=replace)
    return {"key": str(operatorca.key_path(d.cfg.ca_dir)), "cert": str(ca.cert_path),
            "fingerprint": fingerprint(ca.cert)}  # fmt: skip


def setup_dispatcher(d: Dispatcher) -> dict[str, Any]:
    from dispatcher.pki import ca as pki

    cfg = d.cfg
    ca = pki.load_ca(cfg.ca_dir, cfg.ca or None)
    from dispatcher.pki.names import cert_names

    cert = pki.issue_dispatcher_cert(ca, cfg.cert, cfg.key, writer=d.writer, names=cert_names(cfg))
    return {"key": cfg.key, "cert": cfg.cert, "serial": f"{cert.serial_number:x}",
            "cluster_key": _cluster_key(d)}  # fmt: skip


def rotate_cert(d: Dispatcher) -> dict[str, Any]:
    """Intent first in a cluster (:mod:`dispatcher.ha.rotation_intent`), else in one go."""
    import asyncio

    from dispatcher.ha.writer import FencedWriter
    from dispatcher.pki import rotation

    if isinstance(d.writer, FencedWriter):
        from dispatcher.ha import rotation_intent

        return rotation_intent.rotate(d)
    return asyncio.run(rotation.rotate(d))


def rotate_ca(d: Dispatcher, *, mode: str = "run") -> dict[str, Any]:
    """CA rotation (:mod:`dispatcher.pki.carotation`): ``run`` starts or resumes it,
    ``finish`` also drops the old CA, ``status`` only reports."""
    import asyncio

    from dispatcher.ha.writer import FencedWriter
    from dispatcher.pki import carotation

    if mode not in ("run", "finish", "status"):
        raise ActionFailed(f"rotate-ca: unknown mode {mode!r}")
    if mode == "status":
        return carotation.status(d)
    if isinstance(d.writer, FencedWriter):
        from dispatcher.ha import rotation_intent

        return rotation_intent.rotate_ca(d, finish=mode == "finish")
    carotation.record(d)
    return asyncio.run(carotation.advance(d, finish=mode == "finish"))


REBROADCAST_TIMEOUT = 5.0  # per agent: serial-changing actions wait for the round


def broadcast(d: Dispatcher) -> dict[str, Any]:
    """Tell the agents that have not acknowledged the current serial (after a rotation
    some could not be reached) with the credentials they still trust. Each agent gets
    ``REBROADCAST_TIMEOUT`` s, not ``read_timeout``: rotations and the other actions that
    change serials wait for the round (:mod:`dispatcher.ha.leaderwork`), and an agent
    missed now (powered off) is told at the next round."""
    import asyncio

    from dispatcher.pki import rotation

    return asyncio.run(rotation.broadcast(d, timeout=min(REBROADCAST_TIMEOUT, d.cfg.read_timeout)))


def maintain(d: Dispatcher) -> dict[str, Any]:
    import asyncio

    from dispatcher.pki import rotation

    return asyncio.run(rotation.maintain(d))


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("approve", "pairing-approve", approve),
        Action("deny", "pairing-deny", deny),
        Action("list-requests", "pairing-list", list_requests),
        Action("pairing-token-create", "pairing-token-create", token_create),
        Action("pairing-token-list", "pairing-token-list", token_list),
        Action("pairing-token-revoke", "pairing-token-revoke", token_revoke),
        Action("unpair", "agent-unpair", unpair),
        Action("edit-agent", "agent-edit", edit_agent),
        Action("setup-ca", "setup-ca", setup_ca, bootstrap=True),
        Action("setup-operator-ca", "setup-operator-ca", setup_operator_ca, bootstrap=True),
        Action("setup-ctrl-exec", "setup-dispatcher", setup_dispatcher, bootstrap=True),
        Action("rotate-cert", "cert-rotate", rotate_cert, phased=True),
        Action("rotate-ca", "ca-rotate", rotate_ca, phased=True),
        Action("broadcast", "serial-broadcast", broadcast),
        Action("maintain", "maintain", maintain),
    )
}


# ----- argument checking -----------------------------------------------------------------


def _accepts(hint: Any, value: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return False


@functools.cache
def _signature(fn: Callable[..., Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword-only parameters of an action function, and their annotations."""
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}  # fmt: skip
    return params, typing.get_type_hints(fn)


def bind(action: Action, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` checked against the action's keyword parameters (names and types)."""
    if not isinstance(args, dict):
        raise ActionFailed(f"{action.name}: arguments must be an object")
    params, hints = _signature(action.fn)
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ActionFailed(f"{action.name}: unknown argument(s) {', '.join(unknown)}")
    for name, p in params.items():
        if name not in args:
            if p.default is inspect.Parameter.empty:
                raise ActionFailed(f"{action.name}: missing argument {name}")
            continue
        if not _accepts(hints[name], args[name]):
            raise ActionFailed(f"{action.name}: argument {name} has the wrong type")
    return args


def lookup(name: str) -> Action:
    action = ACTIONS.get(name)
    if action is None:
        raise ActionFailed(f"unknown action {name!r}")
    return action


# ----- carrying it out -------------------------------------------------------------------


def perform(d: Dispatcher, name: str, args: dict[str, Any] | None = None) -> ActionResult:
    """Carry out ``name`` here, under one fenced operation when this process fences.

    Raises the action's own errors (pairing, registry, PKI, not leader, cluster
    unavailable) for the caller to map; :class:`ActionFailed` for bad names/arguments.
    """
    from dispatcher.ha.writer import FencedWriter

    action = lookup(name)
    kwargs = bind(action, dict(args or {}))
    writer = d.writer
    if not isinstance(writer, FencedWriter):
        return ActionResult(name, action.fn(d, **kwargs))
    if action.phased:  # its own operations and acknowledgements; its document says which
        data = action.fn(d, **kwargs)
        generation = data.pop("generation", None) if isinstance(data, dict) else None
        return ActionResult(name, data, leader=d.cfg.instance_id, epoch=writer.epoch(),
                            generation=generation)  # fmt: skip
    rep = d.replication
    before, changes = (rep.generation, rep.changes) if rep is not None else (0, 0)
    with writer.operation(action.operation) as epoch:
        data = action.fn(d, **kwargs)
    generation = None
    if rep is not None:  # a replicated change is acknowledged once applied (sync_ack)
        generation = (rep.acknowledge(before, epoch) if rep.changes != changes
                      else rep.generation)  # fmt: skip
    return ActionResult(name, data, leader=d.cfg.instance_id, epoch=epoch, generation=generation)


def requested_by(user: str = "") -> str:
    """Who asks, for the leader's log: ``ced:<user>@<host>``."""
    who = user or os.environ.get("SUDO_USER") or os.environ.get("USER", "")
    return f"ced:{who}@{socket.gethostname()}"


def request(
    d: Dispatcher, name: str, args: dict[str, Any] | None = None, *,
    requested_by: str = "", timeout: float = 120.0,
) -> ActionResult:  # fmt: skip
    """Have the leader carry out ``name``: locally without etcd, else through the store.

    Raises :class:`ActionFailed` with the operator's message (the original error chained).
    """
    action = lookup(name)
    if not d.cfg.etcd_endpoints:
        return _local(d, action, args)
    from agent.common import logfmt
    from cluster.errors import BackendUnavailable
    from cluster.signing import NoClusterKey
    from dispatcher.ha import leader_requests
    from dispatcher.ha.coordination import backend_from_config
    from dispatcher.ha.records import Records

    signer = Records.for_ca_dir(d.cfg.ca_dir).signer  # requests are sealed with the cluster key
    backend = backend_from_config(d.cfg, timeout=2.0)
    try:
        if backend.leader() is None:
            if action.bootstrap and not backend.members():
                return _local(d, action, args)  # no instance runs yet: bootstrap here
            raise ActionFailed("Error: the cluster has no leader right now; try again shortly")
        rid = leader_requests.post(backend, signer, name, dict(args or {}), requested_by)
        logfmt.event("leader-request-sent", id=rid, kind=name)  # the leader logs the same REQID
        doc = leader_requests.wait(backend, signer, rid, timeout)
    except NoClusterKey as exc:
        raise ActionFailed(
            f"Error: this host holds no cluster key ({d.cfg.ca_dir}/cluster.key): requests "
            "to the leader are sealed with it; run this on a dispatcher host of the cluster"
        ) from exc
    except BackendUnavailable as exc:
        raise ActionFailed(f"Error: cluster unavailable: {exc}") from exc
    except (leader_requests.RequestFailed, TimeoutError) as exc:
        raise ActionFailed(f"Error: {exc}") from exc
    finally:
        backend.close()
    if not doc.get("ok"):
        raise ActionFailed(str(doc.get("error") or "the leader refused the request"))
    epoch, generation = doc.get("epoch"), doc.get("generation")
    return ActionResult(name, doc.get("result"), leader=str(doc.get("leader") or ""),
                        epoch=int(epoch) if epoch is not None else None,
                        generation=int(generation) if generation is not None else None)  # fmt: skip


def _local(d: Dispatcher, action: Action, args: dict[str, Any] | None) -> ActionResult:
    try:
        return perform(d, action.name, args)
    except ActionFailed:
        raise
    except CtrlExecError as exc:
        raise ActionFailed(str(exc)) from exc

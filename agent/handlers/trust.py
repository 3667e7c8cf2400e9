"""Trust and certificates: ``POST /rotate-serial``, ``/renew``, ``/renew-complete`` and
``/ca-bundle`` (ours: CA rotation; upstream agents answer 404 and are reported as such).

All of them are gated by the trusted-dispatcher map like every other endpoint (upstream
exempts ``/renew*``, which let any CA-signed certificate fetch a CSR or stage a cert).

``cryptography`` (via :mod:`agent.common.certs`, :mod:`agent.cabundle`) is imported only by
the renewal and bundle handlers.
"""

from __future__ import annotations

import logging

from agent import trustmap
from agent.common import logfmt
from agent.common.serial import serial_to_hex
from agent.handlers.base import AgentState, Peer, Reply, gate, hook, parse_json, reqid_of

ev = logfmt.event


async def rotate_serial(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    obj = parse_json(body)
    if (denied := gate(peer, reqid_of(obj))) is not None:
        return denied
    assert peer.dispatcher is not None
    if not isinstance(obj, dict):
        return 200, {"status": "error", "error": "invalid JSON"}
    serial, action = obj.get("serial"), obj.get("action")
    if not isinstance(serial, str) or not serial:
        return 200, {"status": "error", "error": "serial required"}
    if action not in ("add", "remove"):
        return 200, {"status": "error", "error": f"invalid action '{action}'"}
    canon = serial_to_hex(serial)
    if not canon or len(canon) > 64:
        return 200, {"status": "error", "error": f"invalid serial '{serial}'"}
    if agent.cfg.auth_hook:
        token = obj.get("token") if isinstance(obj.get("token"), str) else ""
        d = await hook(agent, "rotate", peer, args=[action, serial], token=str(token))
        if not d.allowed:
            ev("rotate-deny", logging.WARNING, peer=peer.ip, reason=d.reason,
               dispatcher=peer.dispatcher)  # fmt: skip
            return 403, {"error": f"not authorised: {d.reason}"}
    path = agent.cfg.trusted_dispatchers_path
    try:
        if action == "add":
            trustmap.add(path, serial, peer.dispatcher)
        else:
            trustmap.remove(path, serial, peer.dispatcher)
    except PermissionError as exc:
        ev("rotate-fail", logging.WARNING, peer=peer.ip, reason=str(exc),
           dispatcher=peer.dispatcher)  # fmt: skip
        return 200, {"status": "error", "error": str(exc)}
    except (OSError, ValueError) as exc:
        ev("rotate-fail", logging.ERROR, peer=peer.ip, reason=str(exc))
        return 200, {"status": "error", "error": f"could not update map: {exc}"}
    agent.reload_trust()
    ev("rotate", dispatcher=peer.dispatcher, serial_action=action, serial=canon,
       peer=peer.ip)  # fmt: skip
    return 200, {"status": "ok", "action": action, "serial": canon,
                 "dispatcher": peer.dispatcher}  # fmt: skip


async def renew(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    from agent.common import certs

    reqid = reqid_of(parse_json(body))
    if (denied := gate(peer, reqid)) is not None:
        return denied
    try:
        key = certs.load_key(agent.cfg.key)
    except (OSError, ValueError, AssertionError) as exc:
        ev("renew", logging.ERROR, peer=peer.ip, error=f"agent key not available: {exc}")
        return 200, {"status": "error", "error": "agent key not available"}
    try:
        csr = certs.make_csr(key, agent.cfg.host)
    except ValueError as exc:
        ev("renew", logging.ERROR, peer=peer.ip, error=str(exc))
        return 200, {"status": "error", "error": "could not generate CSR"}
    ev("renew", peer=peer.ip, reqid=reqid, status="csr-generated")
    return 200, {"status": "ok", "csr": csr, "reqid": reqid}


async def renew_complete(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    from agent.common import certs

    obj = parse_json(body)
    reqid = reqid_of(obj)
    if (denied := gate(peer, reqid)) is not None:
        return denied
    cert = obj.get("cert") if isinstance(obj, dict) else None
    if not isinstance(cert, str) or not cert.strip():
        return 200, {"status": "error", "error": "cert required"}
    try:
        certs.validate_for_key(cert.encode(), agent.cfg.ca, agent.cfg.key)
        certs.stage(cert.encode(), agent.cfg.cert_staging_path)
    except (ValueError, OSError) as exc:
        ev("renew-complete", logging.WARNING, peer=peer.ip, reqid=reqid, error=str(exc))
        return 200, {"status": "error", "error": str(exc)}
    ev("renew-complete", peer=peer.ip, reqid=reqid, status="cert-staged")
    return 200, {"status": "ok", "reqid": reqid, "staged": True}


async def ca_bundle(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    """``{"action": "add", "bundle": PEM}`` or ``{"action": "drop", "fingerprint": ...}``:
    change the CA file (checked by :mod:`agent.cabundle`), then trust exactly it."""
    obj = parse_json(body)
    if (denied := gate(peer, reqid_of(obj))) is not None:
        return denied
    if not isinstance(obj, dict):
        return 200, {"status": "error", "error": "invalid JSON"}
    action = obj.get("action")
    if action not in ("add", "drop"):
        return 200, {"status": "error", "error": f"invalid action '{action}'"}
    if agent.cfg.auth_hook:
        token = obj.get("token") if isinstance(obj.get("token"), str) else ""
        d = await hook(agent, "ca-bundle", peer, args=[str(action)], token=str(token))
        if not d.allowed:
            ev("ca-bundle-deny", logging.WARNING, peer=peer.ip, reason=d.reason,
               dispatcher=peer.dispatcher)  # fmt: skip
            return 403, {"error": f"not authorised: {d.reason}"}
    from cryptography import x509

    from agent import cabundle
    from agent.common.certs import fingerprint

    path = agent.cfg.ca
    try:
        current = cabundle.load(path)
        if action == "add":
            cas = cabundle.merged(current, str(obj.get("bundle") or ""))
        else:
            try:
                own: x509.Certificate | None = cabundle.load(agent.cfg.cert)[0]
            except (OSError, ValueError, IndexError):
                own = None
            caller = x509.load_der_x509_certificate(peer.cert_der) if peer.cert_der else None
            cas = cabundle.dropped(current, str(obj.get("fingerprint") or ""), own, caller)
        changed = [fingerprint(c) for c in cas] != [fingerprint(c) for c in current]
        if changed:
            cabundle.write(path, cas)
        agent.reload_ca()  # also when the file already said so (changed by another hand)
    except cabundle.BundleError as exc:
        ev("ca-bundle-fail", logging.WARNING, peer=peer.ip, reason=str(exc),
           dispatcher=peer.dispatcher)  # fmt: skip
        return 200, {"status": "error", "error": str(exc)}
    except (OSError, ValueError) as exc:
        ev("ca-bundle-fail", logging.ERROR, peer=peer.ip, reason=str(exc))
        return 200, {"status": "error", "error": f"could not update the CA file: {exc}"}
    fps = [fingerprint(c) for c in cas]
    ev("ca-bundle", dispatcher=peer.dispatcher, bundle_action=action, cas=",".join(fps),
       changed=int(changed), peer=peer.ip)  # fmt: skip
    return 200, {"status": "ok", "action": action, "cas": fps, "changed": changed}

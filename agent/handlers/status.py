"""``POST /ping`` and ``GET /capabilities``."""

from __future__ import annotations

import logging
import os
from typing import Any

from agent.common import logfmt
from agent.handlers.base import AgentState, Peer, Reply, gate, hook, parse_json, reqid_of
from agent.version import __version__

ev = logfmt.event


async def ping(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    reqid = reqid_of(parse_json(body))
    if (denied := gate(peer, reqid)) is not None:
        return denied
    ev("ping", peer=peer.ip, dispatcher=peer.dispatcher, reqid=reqid)
    return 200, {
        "status": "ok",
        "host": agent.cfg.host,
        "version": __version__,
        "expiry": agent.expiry,
        "staged": os.path.exists(agent.cfg.cert_staging_path),
        "reqid": reqid,
    }


async def capabilities(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    if peer.dispatcher is None:
        reason = "serial-mismatch" if agent.trusted else "no trusted dispatchers stored"
        ev("capabilities-deny", logging.WARNING, peer=peer.ip, reason=reason)
        return 403, {"error": "forbidden"}
    if agent.cfg.auth_hook:
        d = await hook(agent, "discovery", peer)
        if not d.allowed:
            ev("capabilities-deny", logging.WARNING, peer=peer.ip, reason=d.reason)
            return 403, {"error": "not authorised"}
    from agent import schema

    scripts = []
    for name in sorted(agent.scripts):
        s = agent.scripts[name]
        item: dict[str, Any] = {
            "name": name, "path": s.path, "profile": s.profile,
            "executable": os.path.isfile(s.path) and os.access(s.path, os.X_OK),
        }  # fmt: skip
        sc = schema.load_sidecar(s.path)
        if sc is not None:
            item["schema"], item["schema_version"] = sc
        scripts.append(item)
    ev("capabilities", peer=peer.ip, dispatcher=peer.dispatcher, scripts=len(scripts))
    return 200, {"status": "ok", "host": agent.cfg.host, "version": __version__,
                 "scripts": scripts, "tags": dict(agent.cfg.tags)}  # fmt: skip

"""The one check of the peer routes (``/cluster/files/...``, ``/cluster/runs/...``): a TLS
client certificate presenting a dispatcher serial of the cluster (current or previous),
verified by the handshake against the dispatcher CA; never plain HTTP, never the auth hook."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from agent.common import logfmt
from agent.common.serial import serial_to_hex
from dispatcher.api.deps import peer_ip
from dispatcher.api.errors import error
from dispatcher.api.peercert import state_of


async def refused_peer(request: Request, sync: Any) -> Response | None:
    """None when the caller is a dispatcher of this cluster, else the 403 to answer (logged
    ``peer-denied``). ``sync`` is the instance's sync service (its ``peer_serials``)."""
    peer = state_of(request.scope.get("state"))
    if not peer["tls_version"]:
        return error(403, "forbidden", "peer routes need TLS")
    serial = serial_to_hex(peer["peer_serial"] or "")
    allowed = await asyncio.to_thread(sync.peer_serials)
    if not serial or serial not in allowed:
        logfmt.event("peer-denied", path=request.url.path, peer=peer_ip(request.scope),
                     serial=serial or "-", reason="not a dispatcher serial of the cluster")  # fmt: skip
        return error(403, "forbidden", "a dispatcher certificate of this cluster is required")
    return None

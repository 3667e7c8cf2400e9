"""``GET /cluster/files/{path}?generation=N``: one file of config generation N, for the
followers that sync (:mod:`dispatcher.ha.sync`). Not in the OpenAPI document.

Allowed only for a client certificate presenting the cluster's current or previous
dispatcher serial, verified by the TLS handshake against the dispatcher CA; never through
the auth hook (the gate skips it for :data:`~dispatcher.api.routes.PEER_PREFIX`), never
on plain HTTP. 409 when this instance does not run generation N (or the file changed
since), 404 when the file is not part of it.

``POST /cluster/files/``: the leader pushes a generation it just published, with the
changed files (:mod:`dispatcher.ha.sync.push`); the same peer check. 200 with the
generation this instance runs once it is applied, 409 when it is refused (the member then
fetches it as usual).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dispatcher.api.deps import StateDep
from dispatcher.api.errors import error
from dispatcher.api.peerroute import refused_peer
from dispatcher.api.routes import PEER_PREFIX

router = APIRouter()


async def _peer_sync(request: Request, state: Any, verb: str) -> tuple[Any, Response | None]:
    """This instance's syncer and None, or None and the answer refusing the request (no
    syncer: 404; not a peer presenting the cluster's dispatcher serial: the peer check's)."""
    sync = state.ha.sync if state.ha is not None else None
    if sync is None:
        return None, error(404, "not found", f"this instance {verb} no generations")
    return sync, await refused_peer(request, sync)


@router.post(PEER_PREFIX, include_in_schema=False)
async def cluster_push(request: Request, state: StateDep) -> Response:
    from dispatcher.ha.sync.push import PushRefused

    sync, refused = await _peer_sync(request, state, "applies")
    if refused is not None:
        return refused
    body = await request.body()
    try:
        generation = await asyncio.to_thread(sync.receive_push, body)
    except PushRefused as exc:
        return error(409, "conflict", str(exc))
    return JSONResponse({"generation": generation})


@router.get(PEER_PREFIX + "{path:path}", include_in_schema=False)
async def cluster_file(
    path: str, request: Request, state: StateDep, generation: int = -1
) -> Response:
    sync, refused = await _peer_sync(request, state, "publishes")
    if refused is not None:
        return refused
    status, data, entry = await asyncio.to_thread(sync.serve, path, generation)
    if status != 200 or entry is None or not isinstance(data, bytes):
        err = "conflict" if status == 409 else "not found"
        return error(status, err, str(data))
    return Response(data, media_type="application/octet-stream", headers={
        "X-Ctrl-Exec-Sha256": entry.sha256, "X-Ctrl-Exec-Mode": format(entry.mode, "o"),
        "X-Ctrl-Exec-Generation": str(generation),
    })  # fmt: skip

"""``POST /cluster/switchover``: the leader resigns and a peer takes over.

Callable on every instance (action ``cluster`` of the auth hook). A switchover asked of a
follower is posted through the store, which the leader watches, so it needs no
forwarding; with the store unreachable it fails at once with 503 ``cluster unavailable``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from cluster.errors import BackendUnavailable
from dispatcher.api.errors import UNAVAILABLE
from dispatcher.api.leadergate import ClusterCallDep, not_leader, unavailable
from dispatcher.api.models import Credentials, SwitchoverResponse
from dispatcher.api.routes import TAG_CLUSTER

router = APIRouter()


@router.post(
    "/cluster/switchover", operation_id="cluster_switchover", tags=[TAG_CLUSTER],
    summary="The leader resigns; a peer takes over",
    responses={200: {"model": SwitchoverResponse}, **UNAVAILABLE},
)  # fmt: skip
async def cluster_switchover(call: ClusterCallDep, body: Credentials | None = None) -> Response:
    node = call.node()
    await call.authorise("cluster", body)
    by = f"api:{call.source_ip}@{node.instance_id}"
    try:
        out = await asyncio.to_thread(node.request_switchover, by)
    except BackendUnavailable as exc:
        node.health.mark_failed(exc)
        return unavailable(str(exc))
    except LookupError as exc:
        return not_leader(str(exc))
    return JSONResponse({"ok": True, **out})

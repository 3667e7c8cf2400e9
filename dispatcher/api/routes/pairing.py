"""Pairing decisions, leader-only and callable on every instance (leader gate:
:mod:`dispatcher.api.leadergate`).

* ``GET /pairing``: the pending pairing requests (no CSR, no nonce);
* ``POST /pairing/{reqid}/approve`` (``lookup_by``, ``ip``, ``agent_port`` optional);
* ``POST /pairing/{reqid}/deny`` (``reason`` optional).

The leader does the work through :func:`dispatcher.ha.actions.perform`: every write goes
through the fenced writer under the epoch captured when the action began, and that epoch
is in the answer and in every log line.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from agent.common import logfmt
from cluster.errors import NotLeader
from dispatcher.api.errors import ERR, UNAVAILABLE, Responses, error
from dispatcher.api.leadergate import ClusterCallDep, not_leader, unavailable
from dispatcher.api.models import (
    ApproveRequest,
    DecisionResponse,
    DenyRequest,
    PairingListResponse,
)
from dispatcher.api.routes import TAG_CLUSTER
from dispatcher.errors import ClusterUnavailableError, NotLeaderError
from dispatcher.ha import actions
from dispatcher.ha.replication import NotAcknowledged
from dispatcher.pairing import queue as pq

if TYPE_CHECKING:
    from dispatcher.ha.node import HANode

router = APIRouter()

DECISION: Responses = {
    200: {"model": DecisionResponse},
    404: {**ERR, "description": "no such request"},
    409: {**ERR, "description": "already decided"},
    **UNAVAILABLE,
}


def decision_errors(exc: Exception, node: HANode) -> JSONResponse:
    """The answer to an action that failed on this instance (``node``'s)."""
    cause = exc.__context__ if isinstance(exc, pq.PairingQueueError) else exc
    if isinstance(cause, ClusterUnavailableError):
        return unavailable(str(cause))
    if isinstance(cause, NotLeaderError | NotLeader):
        return not_leader(str(cause), *node.leader_hint())
    if isinstance(exc, NotAcknowledged):
        return error(503, "not acknowledged", str(exc))
    if isinstance(exc, pq.NoSuchRequest):
        return error(404, "no such request", str(exc))
    if isinstance(exc, pq.PairingQueueError):
        status = 409 if "already been decided" in str(exc) else 400
        return error(status, "pairing refused", str(exc))
    raise exc


_REFUSALS = (pq.PairingQueueError, NotLeaderError, ClusterUnavailableError, NotAcknowledged)


async def _perform(
    call: ClusterCallDep, node: HANode, name: str, args: dict[str, Any] | None = None
) -> actions.ActionResult | JSONResponse:
    """Carry out a leader-only action here (off the event loop); a refusal's answer."""
    try:
        return await asyncio.to_thread(actions.perform, call.d, name, args)
    except _REFUSALS as exc:
        return decision_errors(exc, node)


@router.get(
    "/pairing", operation_id="pairing_list", tags=[TAG_CLUSTER],
    summary="Pending pairing requests (leader-only; forwarded by followers)",
    responses={200: {"model": PairingListResponse}, **UNAVAILABLE},
)  # fmt: skip
async def pairing_list(call: ClusterCallDep) -> Response:
    node = await call.lead("pairing", None)
    res = await _perform(call, node, "list-requests")
    if isinstance(res, JSONResponse):
        return res
    return JSONResponse({"ok": True, "leader": node.instance_id, "epoch": res.epoch,
                         "requests": res.data})  # fmt: skip


@router.post(
    "/pairing/{reqid}/approve", operation_id="pairing_approve", tags=[TAG_CLUSTER],
    summary="Approve a pairing request: sign, register, deliver (leader-only)",
    responses=DECISION,
)  # fmt: skip
async def pairing_approve(
    reqid: str, call: ClusterCallDep, body: ApproveRequest | None = None
) -> Response:
    b = body or ApproveRequest()
    node = await call.lead("pairing", b, reqid)
    args = {"reqid": reqid, "lookup_by": b.lookup_by, "ip": b.ip,
            "agent_port": b.agent_port}  # fmt: skip
    res = await _perform(call, node, "approve", args)
    if isinstance(res, JSONResponse):
        return res
    doc = res.data
    logfmt.event("pair-approve-api", reqid=reqid, agent=doc["hostname"],
                 epoch=res.epoch, instance=node.instance_id)  # fmt: skip
    return JSONResponse({
        "ok": True, "reqid": reqid, "status": "approved", "leader": node.instance_id,
        "epoch": res.epoch, "agent": doc["hostname"], "ip": doc["ip"],
        "port": doc["port"], "lookup_by": doc["lookup_by"], "expiry": doc["expiry"],
        "dispatcher_serial": doc["dispatcher_serial"], "warnings": doc["warnings"],
    })  # fmt: skip


@router.post(
    "/pairing/{reqid}/deny", operation_id="pairing_deny", tags=[TAG_CLUSTER],
    summary="Deny a pairing request (leader-only)",
    responses=DECISION,
)  # fmt: skip
async def pairing_deny(
    reqid: str, call: ClusterCallDep, body: DenyRequest | None = None
) -> Response:
    b = body or DenyRequest()
    node = await call.lead("pairing", b, reqid)
    args = {"reqid": reqid, "reason": b.reason}
    res = await _perform(call, node, "deny", args)
    if isinstance(res, JSONResponse):
        return res
    return JSONResponse({"ok": True, "reqid": reqid, "status": "denied",
                         "leader": node.instance_id, "epoch": res.epoch})  # fmt: skip

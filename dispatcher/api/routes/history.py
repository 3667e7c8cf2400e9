"""``GET /runs`` and ``GET /runs/{reqid}``: the job history of every instance; and the
peers' route ``GET /cluster/runs/{reqid}`` (this instance's full record, for an instance
whose operator asked ``ced show`` or ``GET /runs/{reqid}`` about a run made here).

Both public routes ask the auth hook for action ``history`` (with the reqid for one run;
without a hook ``api_auth_default`` decides), besides the gate's ``api`` check: the
history carries arguments and outputs of every operator's runs.

The peer route is allowed only for a client certificate presenting one of the cluster's
dispatcher serials, over TLS, never through the auth hook (as ``/cluster/files/``).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from cluster.errors import BackendUnavailable
from dispatcher.api import models as m
from dispatcher.api.deps import ApiCall, CallDep, StateDep
from dispatcher.api.errors import BAD_REQUEST, ERR, FORBIDDEN, NOT_FOUND, denial, error
from dispatcher.api.peerroute import refused_peer
from dispatcher.api.routes import PEER_RUNS, TAG_STATUS
from dispatcher.history import records as hr
from dispatcher.history.owner import OwnerUnreachable, RecordGone
from dispatcher.history.store import for_config
from dispatcher.history.view import listing, show
from dispatcher.operations import Denied, authorise

router = APIRouter()


async def refused(call: ApiCall, reqid: str = "") -> Response | None:
    """The auth hook's answer to action ``history``: None when allowed, else the 403."""
    try:
        await authorise(call.d, call.caller("", call.bearer), "history", reqid=reqid)
    except Denied as exc:
        return denial(exc, call.d.cfg.auth_deny_generic)
    return None


@router.get(
    "/runs",
    operation_id="runs",
    tags=[TAG_STATUS],
    summary="Job history of every instance, newest first (paginated)",
    responses={200: {"model": m.RunsPage}, **BAD_REQUEST, **FORBIDDEN},
)
async def runs(
    call: CallDep,
    host: str | None = None,
    script: str | None = None,
    since: str | None = Query(None, description="a duration back (30m, 2h, 7d) or ISO 8601"),
    user: str | None = None,
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = Query(None, pattern=r"^\d{13}-[A-Za-z0-9_-]{1,64}$"),
) -> Response:
    if (no := await refused(call)) is not None:
        return no
    try:
        flt = hr.Filter(host, script, hr.parse_since(since) if since else None, user)
    except ValueError as exc:
        return error(400, "invalid request", str(exc))
    page = await asyncio.to_thread(listing, call.d.cfg, flt, limit, cursor)
    return JSONResponse({"ok": True, "runs": page.runs, "next": page.next,
                         "warnings": page.warnings})  # fmt: skip


@router.get(
    "/runs/{reqid}",
    operation_id="run_record",
    tags=[TAG_STATUS],
    summary="One run of the history with each host's output (from the instance that ran it)",
    responses={
        200: {"model": m.RunRecord},
        **FORBIDDEN,
        **NOT_FOUND,
        503: {**ERR, "description": "the instance that ran it (or etcd) is unreachable"},
    },
)
async def run_record(reqid: str, call: CallDep) -> Response:
    if not hr.valid_reqid(reqid):
        return error(404, "not found", f"no run {reqid}")
    if (no := await refused(call, reqid)) is not None:
        return no
    try:
        rec = await asyncio.to_thread(show, call.d.cfg, reqid)
    except (LookupError, RecordGone) as exc:
        return error(404, "not found", str(exc))
    except OwnerUnreachable as exc:
        return error(503, "owner unreachable", str(exc))
    except BackendUnavailable as exc:
        return error(503, "cluster unavailable", str(exc))
    return JSONResponse({"ok": True, **rec})


@router.get(PEER_RUNS + "{reqid}", include_in_schema=False)
async def peer_run(reqid: str, request: Request, state: StateDep) -> Response:
    sync = state.ha.sync if state.ha is not None else None
    if sync is None:
        return error(404, "not found", "this instance keeps no cluster history")
    refused = await refused_peer(request, sync)
    if refused is not None:
        return refused
    rec = await asyncio.to_thread(for_config(state.d.cfg).load, reqid)
    if rec is None:
        return error(404, "not found", f"no run {reqid} here")
    return JSONResponse(rec)

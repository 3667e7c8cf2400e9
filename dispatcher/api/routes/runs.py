"""``POST /ping``, ``POST /run``, ``GET|POST /discovery``, ``GET /status/{reqid}``.

Each route hands the body and the caller (:class:`~dispatcher.api.deps.ApiCall`) to
:mod:`dispatcher.operations`, which authorises the action (``ping``, ``run``,
``discovery``, ``status``) itself, and maps the operations' exceptions to upstream's
answers (:func:`operation_error`).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dispatcher.api import models as m
from dispatcher.api.deps import ApiCall, CallDep
from dispatcher.api.errors import (
    BAD_REQUEST,
    CONFLICT,
    ERR,
    FORBIDDEN,
    NOT_FOUND,
    denial,
    error,
)
from dispatcher.api.routes import TAG_RUN, TAG_STATUS
from dispatcher.operations import Denied, do_discovery, do_ping, do_run, do_status
from dispatcher.registry import RegistryError
from dispatcher.rolling import Rolling
from dispatcher.runlocks import LockConflict, LockUnavailable
from dispatcher.runstore import RunStoreError
from dispatcher.targets import Selection, is_glob, tags_of

REQID_RE = re.compile(r"[a-f0-9]{1,64}")  # ours are 16; bounded so no path is ever too long
OPERATION_ERRORS = (Denied, LockConflict, LockUnavailable, RegistryError, ValueError)

router = APIRouter()


def operation_error(exc: Exception, generic: bool) -> JSONResponse:
    """Upstream's answer to an exception of :data:`OPERATION_ERRORS`."""
    if isinstance(exc, Denied):
        return denial(exc, generic)
    if isinstance(exc, LockConflict):
        return error(409, "locked", code=4, conflicts=list(exc.conflicts))
    if isinstance(exc, LockUnavailable):  # run_lock_without_etcd = refuse, etcd down
        return error(503, "cluster unavailable", str(exc))
    if isinstance(exc, RegistryError):
        return _unknown_agent(exc)
    return error(400, "invalid request", str(exc))  # fan-out limits such as "too many hosts"


def _unknown_agent(exc: RegistryError) -> JSONResponse:
    msg = str(exc)
    prefix = "unknown agent(s): "
    if msg.startswith(prefix):
        return error(404, "unknown agent", f"not a registered agent: {msg[len(prefix) :]}")
    if msg.startswith("no registered agent matches"):
        return error(404, "unknown agent", msg)
    return error(400, "invalid host", msg)


def selection(body: m.Targets) -> Selection | JSONResponse:
    """The body's targets, or upstream's 400 when there are none (or bad tags)."""
    if not body.hosts and not body.tags and not body.all_:
        return error(400, "hosts must be a non-empty array", "give hosts, tags or all")
    try:
        tags = tags_of(body.tags) if body.tags else ()
    except ValueError as exc:
        return error(400, "invalid tags", str(exc))
    plain = not tags and not body.all_ and not any(is_glob(h) for h in body.hosts)
    strict = body.strict if body.strict is not None else plain
    return Selection(tuple(body.hosts), tags, body.all_, strict)


API_NAMES = ("batch", "max_fail", "fail_fast")


def rolling(body: m.RunRequest | m.PingRequest) -> Rolling | JSONResponse | None:
    """The body's rolling policy, or a 400 naming the bad value."""
    max_fail = body.max_fail if isinstance(body, m.RunRequest) else None
    fail_fast = body.fail_fast if isinstance(body, m.RunRequest) else False
    try:
        policy = Rolling.parse(body.batch, max_fail, fail_fast, API_NAMES)
    except ValueError as exc:
        return error(400, "invalid rolling options", str(exc))
    if policy is not None and isinstance(body, m.RunRequest) and body.async_:
        return error(400, "invalid rolling options",
                     "batch, max_fail and fail_fast need a synchronous run (async is false)")  # fmt: skip
    return policy


def _rolled(out: dict[str, Any]) -> dict[str, Any]:
    return {"rolling": out["rolling"]} if "rolling" in out else {}


@router.post(
    "/ping",
    operation_id="ping",
    tags=[TAG_RUN],
    summary="Ping agents",
    responses={200: {"model": m.PingResponse}, **BAD_REQUEST, **FORBIDDEN, **NOT_FOUND},
)
async def ping(body: m.PingRequest, call: CallDep) -> Response:
    sel = selection(body)
    if isinstance(sel, JSONResponse):
        return sel
    policy = rolling(body)
    if isinstance(policy, JSONResponse):
        return policy
    try:
        out = await do_ping(call.d, call.caller(body.username, body.token), body.hosts,
                            select_=sel, rolling=policy)  # fmt: skip
        return JSONResponse({"ok": True, "results": out["results"], "counts": out["counts"],
                             **_rolled(out)})  # fmt: skip
    except OPERATION_ERRORS as exc:
        return operation_error(exc, call.d.cfg.auth_deny_generic)


@router.post(
    "/run",
    operation_id="run",
    tags=[TAG_RUN],
    summary="Run an allowlisted script on agents (sync, or async with 202)",
    responses={
        200: {"model": m.RunResponse, "description": "Synchronous run finished"},
        202: {"model": m.AsyncSubmitResponse, "description": "Async run submitted"},
        **BAD_REQUEST,
        **FORBIDDEN,
        **NOT_FOUND,
        **CONFLICT,
    },
)
async def run(body: m.RunRequest, call: CallDep) -> Response:
    sel = selection(body)
    if isinstance(sel, JSONResponse):
        return sel
    policy = rolling(body)
    if isinstance(policy, JSONResponse):
        return policy
    try:
        out = await do_run(
            call.d, call.caller(body.username, body.token), body.hosts, body.script, body.args,
            async_=body.async_, record_sync=not body.async_, select_=sel, rolling=policy,
        )  # fmt: skip
        if body.async_:
            return JSONResponse(
                {"ok": True, "reqid": out["reqid"], "async": True, "results": out["results"],
                 "counts": out["counts"]},
                status_code=202,
            )  # fmt: skip
        return JSONResponse({"ok": True, "reqid": out["reqid"], "results": out["results"],
                             "counts": out["counts"], **_rolled(out)})  # fmt: skip
    except OPERATION_ERRORS as exc:
        return operation_error(exc, call.d.cfg.auth_deny_generic)


async def _discover(call: ApiCall, body: m.DiscoveryRequest | None) -> Response:
    try:
        caller = call.caller(body.username if body else "", body.token if body else "")
        out = await do_discovery(call.d, caller, body.hosts if body else None)
        return JSONResponse({"ok": True, "hosts": out["hosts"]})
    except OPERATION_ERRORS as exc:
        return operation_error(exc, call.d.cfg.auth_deny_generic)


_DISCOVERY_DOC: dict[str, Any] = {
    "tags": [TAG_RUN],
    "responses": {200: {"model": m.DiscoveryResponse}, **BAD_REQUEST, **FORBIDDEN, **NOT_FOUND},
}


@router.get("/discovery", operation_id="discovery_get", summary="Capabilities of every agent",
            **_DISCOVERY_DOC)  # fmt: skip
async def discovery_get(call: CallDep) -> Response:
    return await _discover(call, None)


@router.post("/discovery", operation_id="discovery", summary="Capabilities of some agents",
             **_DISCOVERY_DOC)  # fmt: skip
async def discovery_post(call: CallDep, body: m.DiscoveryRequest | None = None) -> Response:
    return await _discover(call, body)


@router.get(
    "/status/{reqid}",
    operation_id="status",
    tags=[TAG_STATUS],
    summary="Result of a run (async results fetched from the agents)",
    responses={
        200: {"model": m.StatusResponse},
        404: {**ERR, "description": "Unknown reqid, or not the submitter's"},
        500: {**ERR, "description": "cannot read result"},
        **FORBIDDEN,
    },
)
async def status(reqid: str, request: Request, call: CallDep) -> Response:
    if not REQID_RE.fullmatch(reqid):
        return error(404, "not found", f"no route for GET {request.url.path}")
    token = call.bearer
    missing = error(404, "not found", f"no result for reqid {reqid}")
    try:
        call.d.runstore.purge()
        record = await do_status(call.d, call.caller("", token), reqid)
    except Denied:
        return missing  # upstream answers a refused owner check like an unknown reqid
    except (RunStoreError, OSError) as exc:
        return error(500, "cannot read result", str(exc))
    if record is None:
        return missing
    record = {k: v for k, v in record.items() if k != "submitter"}
    return JSONResponse({"ok": True, **record})

"""Error answers of the API: upstream's body, the exception handlers, the OpenAPI entries.

Every error is ``{"ok": false, "error": ..., ["detail": ...], ...}`` (:func:`error`).
FastAPI's own failures are rewritten to it: a validation error answers 400 with
upstream's message for the field (never 422), an unknown route or method 404, a disk
refusing a write (read-only, full) 503 ``storage unavailable`` naming the file, anything
unexpected 500 ``internal error`` with an ``api-error`` log line. A dependency or helper
that has to end a request early raises :class:`Answer` with the response to send.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.common import logfmt
from dispatcher.api.models import ErrorResponse
from dispatcher.operations import Denied

#: errnos of a disk that refuses writes: answered 503 ``storage unavailable``, not 500
STORAGE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO})

Responses = dict[int | str, dict[str, Any]]
ERR: dict[str, Any] = {"model": ErrorResponse}
BAD_REQUEST: Responses = {400: {**ERR, "description": "Bad request"}}
FORBIDDEN: Responses = {403: {**ERR, "description": "Denied by the auth hook"}}
NOT_FOUND: Responses = {404: {**ERR, "description": "Unknown agent or run"}}
CONFLICT: Responses = {409: {**ERR, "description": "host:script already running (code 4)"}}
UNAVAILABLE: Responses = {
    503: {**ERR, "description": "not leader (with the leader) or cluster unavailable"}
}


def error(status: int, err: str, detail: str | None = None, **extra: Any) -> JSONResponse:
    """An upstream error body ``{"ok":false,"error",["detail"],...}``."""
    body: dict[str, Any] = {"ok": False, "error": err}
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status)


def denial(exc: Denied, generic: bool) -> JSONResponse:
    """403 for a refused authorisation (``auth_deny_generic``: without the reason)."""
    if generic:
        return error(403, "forbidden")
    return error(403, exc.reason, code=exc.code)


class Answer(Exception):
    """Ends the request with ``response`` (raised by dependencies and route helpers)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


_FIELD_MESSAGES = {
    "hosts": "hosts must be a non-empty array",
    "script": "script name required (alphanumeric and hyphens only)",
    "args": "args must be an array",
    "async": "async must be a boolean",
    "username": "username must be a string",
    "token": "token must be a string",
}


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """Upstream's 400 ``error`` (and a ``detail``) for FastAPI's validation errors."""
    for e in errors:
        loc = tuple(e.get("loc") or ())
        kind = e.get("type", "")
        if kind == "json_invalid":
            return "invalid JSON body", str(e.get("msg") or "") or None
        if loc == ("body",):
            if kind == "missing":
                return "request body required", None
            return "invalid JSON body", "body must be a JSON object"
        if len(loc) >= 2 and loc[0] == "body" and str(loc[1]) in _FIELD_MESSAGES:
            return _FIELD_MESSAGES[str(loc[1])], str(e.get("msg") or "") or None
    first = errors[0] if errors else {}
    return "invalid request", str(first.get("msg") or "") or None


async def on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    err, detail = validation_message(list(exc.errors()))
    return error(400, err, detail)


async def on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405):
        return error(404, "not found", f"no route for {request.method} {request.url.path}")
    return error(exc.status_code, str(exc.detail))


async def on_internal(request: Request, exc: Exception) -> Response:
    from cluster.errors import BackendUnavailable

    if isinstance(exc, BackendUnavailable):  # etcd down or restarting: try again, not a bug
        logfmt.event("api-unavailable", logging.WARNING, path=request.url.path, error=exc)
        return error(503, "cluster unavailable", str(exc))
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        # this host's disk refused a write (read-only, full): not a bug, and another
        # instance may serve it; say what and where, as the log does
        where = f" ({exc.filename})" if exc.filename else ""
        logfmt.event("api-storage", logging.ERROR, path=request.url.path, error=exc)
        return error(503, "storage unavailable", f"{exc.strerror}{where}")
    logfmt.event("api-error", logging.ERROR, path=request.url.path, error=exc)
    return error(500, "internal error", type(exc).__name__)


async def on_answer(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Answer)
    return exc.response

"""The coordination store down or restarting is a 503 the client may retry, not a 500."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request

from cluster.errors import BackendUnavailable
from dispatcher.api.errors import on_internal


def _request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/pairing/x/approve",
                    "headers": [], "query_string": b""})  # fmt: skip


def test_store_unavailable_is_503() -> None:
    resp = asyncio.run(on_internal(_request(), BackendUnavailable("etcd: all endpoints down")))
    assert resp.status_code == 503
    body = json.loads(bytes(resp.body))
    assert body["error"] == "cluster unavailable" and "all endpoints down" in body["detail"]


def test_a_bug_stays_a_500() -> None:
    resp = asyncio.run(on_internal(_request(), KeyError("x")))
    assert resp.status_code == 500

"""``dispatcher.api.errors.on_internal``: what an unexpected exception answers."""

from __future__ import annotations

import asyncio
import errno
import json
from typing import Any

import pytest
from starlette.requests import Request

from cluster.errors import BackendUnavailable
from dispatcher.api import errors


def answer(exc: Exception) -> tuple[int, dict[str, Any]]:
    request = Request({"type": "http", "method": "POST", "path": "/run", "headers": []})
    response = asyncio.run(errors.on_internal(request, exc))
    return response.status_code, json.loads(bytes(response.body))


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_disk_refusing_a_write_is_503_naming_the_file(code: int) -> None:
    exc = OSError(code, "refused", "/var/lib/ctrl-exec/runs/abc.json")
    status, body = answer(exc)
    assert status == 503
    assert body == {"ok": False, "error": "storage unavailable",
                    "detail": "refused (/var/lib/ctrl-exec/runs/abc.json)"}  # fmt: skip


def test_other_os_errors_and_bugs_stay_500_without_details() -> None:
    assert answer(OSError(errno.EACCES, "denied", "/x")) == (
        500, {"ok": False, "error": "internal error", "detail": "PermissionError"})  # fmt: skip
    assert answer(KeyError("secret"))[0] == 500
    assert answer(KeyError("secret"))[1]["detail"] == "KeyError"


def test_etcd_down_is_503_cluster_unavailable() -> None:
    status, body = answer(BackendUnavailable("etcd get: no member answered"))
    assert (status, body["error"]) == (503, "cluster unavailable")

"""The checked-in OpenAPI document must match what the application generates."""

from __future__ import annotations

import json

from dispatcher.api.openapi_dump import SPEC_PATH, generate, render


def test_checked_in_spec_matches_the_app() -> None:
    on_disk = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    live = generate()
    assert live == on_disk, "run `python -m dispatcher.api.openapi_dump` and commit the result"
    assert SPEC_PATH.read_text(encoding="utf-8") == render(live)


def test_spec_documents_every_upstream_operation() -> None:
    spec = generate()
    ops = {
        (method.upper(), path): op["operationId"]
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    assert ops == {
        ("GET", "/"): "index",
        ("GET", "/health"): "health",
        ("POST", "/ping"): "ping",
        ("POST", "/run"): "run",
        ("GET", "/discovery"): "discovery_get",
        ("POST", "/discovery"): "discovery",
        ("GET", "/status/{reqid}"): "status",
        # the job history of every instance (dispatcher/api/routes/history.py)
        ("GET", "/runs"): "runs",
        ("GET", "/runs/{reqid}"): "run_record",
        ("GET", "/openapi-live.json"): "openapi_live",
        # leader-only cluster actions, callable on every instance (dispatcher/api/routes/pairing.py)
        ("GET", "/pairing"): "pairing_list",
        ("POST", "/pairing/{reqid}/approve"): "pairing_approve",
        ("POST", "/pairing/{reqid}/deny"): "pairing_deny",
        ("POST", "/cluster/switchover"): "cluster_switchover",
    }
    assert all(op.get("tags") for item in spec["paths"].values() for op in item.values())
    schemas = spec["components"]["schemas"]
    for name in ("HealthResponse", "PingRequest", "RunRequest", "RunResponse",
                 "AsyncSubmitResponse", "StatusResponse", "DiscoveryResponse",
                 "ErrorResponse"):  # fmt: skip
        assert name in schemas
    assert "HTTPValidationError" not in schemas  # validation errors answer 400, not 422
    assert "async" in schemas["RunRequest"]["properties"]

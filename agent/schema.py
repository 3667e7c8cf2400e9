"""Schema sidecars: ``<script>.schema.json`` advertised on ``/capabilities`` (spec 2.4)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

MAX_SIDECAR = 64 * 1024
VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def load_sidecar(script_path: str) -> tuple[dict[str, Any], str] | None:
    """Return ``(schema, schema_version)`` or None when absent or unusable."""
    path = script_path + ".schema.json"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SIDECAR + 1)
    except OSError:
        return None
    if len(data) > MAX_SIDECAR:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    version = obj.get("version")
    if isinstance(version, str) and VERSION_RE.match(version) and not version.startswith("sha256:"):
        return obj, version
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return obj, "sha256:" + hashlib.sha256(canon).hexdigest()[:12]

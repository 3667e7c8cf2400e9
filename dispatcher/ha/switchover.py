"""Planned switchover requests through the cluster store (no API credentials needed).

Anyone with access to the store (``ced cluster switchover``, or a follower asked through
the API) writes ``/<cluster>/switchover`` naming the epoch that should end, bound to a
short lease so a request nobody acts on vanishes. The leader's monitor reads the key
every half second: when it names its own epoch it resigns (revokes its election lease,
holds off one TTL so a peer takes over) and deletes the key; a request naming an older
epoch is stale and deleted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from cluster.backend import KVBackend, LeaderInfo

REQUEST_TTL = 15  # seconds a request stays in the store when no leader acts on it


def post_request(backend: KVBackend, leader: LeaderInfo, requested_by: str = "") -> dict[str, Any]:
    """Ask the leader of ``leader.epoch`` to resign; returns the request document."""
    doc = {
        "epoch": leader.epoch,
        "leader": leader.instance_id,
        "requested_by": requested_by or f"{socket.gethostname()}:{os.getpid()}",
        "at": time.time(),
    }
    lease = backend.lease_grant(REQUEST_TTL)
    backend.put_value(backend.keys.switchover, json.dumps(doc, sort_keys=True), lease.id)
    return doc


def read_request(backend: KVBackend) -> dict[str, Any] | None:
    raw = backend.get_value(backend.keys.switchover)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"epoch": 0}
    return doc if isinstance(doc, dict) else {"epoch": 0}

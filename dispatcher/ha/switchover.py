"""Planned switchover requests through the cluster store (no API credentials needed).

Anyone with access to the store (``ced cluster switchover``, or a follower asked through
the API) writes ``/<cluster>/switchover`` naming the epoch that should end, bound to a
short lease so a request nobody acts on vanishes. The leader's monitor reads the key
every half second: when it names its own epoch it resigns (revokes its election lease,
holds off one TTL so a peer takes over) and deletes the key; a request naming an older
epoch is stale and deleted. ``to`` names the member that should take over: the leader
checks that it is a live member serving the current generation, then resigns with a
handover note naming it, so the others leave the campaign to it (:mod:`cluster.history`).

On etcd the request is sealed with the cluster key (``signer``; kind ``switchover``): a
request that fails verification is deleted unread (``read_request`` tells ``on_reject``),
so a store writer without the key cannot make the leader resign.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from cluster.backend import KVBackend, LeaderInfo, MemberInfo
from cluster.signing import RecordRejected, RecordSigner

KIND = "switchover"

REQUEST_TTL = 15  # seconds a request stays in the store when no leader acts on it


def post_request(
    backend: KVBackend, leader: LeaderInfo, requested_by: str = "", to: str = "",
    signer: RecordSigner | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Ask the leader of ``leader.epoch`` to resign (in favour of member ``to``, if given);
    returns the request document."""
    doc = {
        "epoch": leader.epoch,
        "leader": leader.instance_id,
        "to": to,
        "requested_by": requested_by or f"{socket.gethostname()}:{os.getpid()}",
        "at": time.time(),
    }
    key = backend.keys.switchover
    value = signer.seal(KIND, key, doc) if signer is not None else json.dumps(doc, sort_keys=True)
    lease = backend.lease_grant(REQUEST_TTL)
    backend.put_value(key, value, lease.id)
    return doc


def target_problem(members: list[MemberInfo], to: str, generation: int) -> str | None:
    """Why member ``to`` cannot take over now (None: it can)."""
    found = [m for m in members if m.instance_id == to]
    if not found:
        return f"{to} is not a live member"
    m = found[0]
    if m.state != "serving":
        return f"{to} is {m.state}, not serving"
    if m.restart_pending:
        return f"{to} has a restart pending"
    if m.generation < generation:
        return f"{to} runs generation {m.generation}, not the current {generation}"
    return None


def read_request(backend: KVBackend, signer: RecordSigner | None = None,
                 on_reject: Callable[[RecordRejected], None] | None = None,
                 ) -> dict[str, Any] | None:  # fmt: skip
    """The request, or None; ``{"epoch": 0}`` (stale: to be deleted) when it does not
    parse or, with a ``signer``, fails verification."""
    key = backend.keys.switchover
    raw = backend.get_value(key)
    if not raw:
        return None
    if signer is not None:
        try:
            doc = signer.open(KIND, key, raw)
        except RecordRejected as exc:
            if on_reject is not None:
                on_reject(exc)
            return {"epoch": 0}
        return doc if isinstance(doc, dict) else {"epoch": 0}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"epoch": 0}
    return doc if isinstance(doc, dict) else {"epoch": 0}

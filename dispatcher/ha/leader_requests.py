"""Requests for the leader through the cluster store (``ced`` verbs in a cluster).

Every leader-only action of :mod:`dispatcher.ha.actions` (approve, deny, list-requests,
unpair, edit-agent, setup-*, rotate-cert, maintain) goes through the leader. With
``etcd_endpoints`` configured the CLI never does them locally: it
writes ``/<cluster>/requests/<id>`` (bound to a lease of :data:`REQUEST_TTL`, so a request
nobody takes vanishes) and waits for ``/<cluster>/results/<id>``. The leader claims a
request with a fenced transaction (the result key says ``running`` under its epoch, the
request key is deleted), carries it out under that epoch and writes the result, fenced
again. The requester deletes the result once read; the leader prunes results nobody read
after :data:`RESULT_KEEP` seconds.

Like ``ced cluster switchover``, this needs the store's credentials (which are the
cluster's admin credentials), no API credentials, and works from any dispatcher host.
This module stays light (no etcd client, no web framework).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from typing import Any

from cluster.backend import KVBackend

REQUEST_TTL = 60  # seconds a request waits in the store for a leader to take it
RESULT_KEEP = 3600  # seconds the leader keeps a result nobody collected


class RequestFailed(Exception):
    """No result: no leader took the request, or the leader changed while running it."""


def post(backend: KVBackend, kind: str, args: dict[str, Any], requested_by: str = "") -> str:
    """Queue a request for the leader; its id (``kind``: a name of
    :data:`dispatcher.ha.actions.ACTIONS`, checked by the caller and by the leader)."""
    rid = f"{int(time.time() * 1000):x}-{secrets.token_hex(6)}"
    doc = {"id": rid, "kind": kind, "args": args, "at": time.time(),
           "requested_by": requested_by or f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
    lease = backend.lease_grant(REQUEST_TTL)
    backend.put_value(backend.keys.request(rid), json.dumps(doc, sort_keys=True), lease.id)
    return rid


def wait(backend: KVBackend, rid: str, timeout: float, poll: float = 0.05) -> dict[str, Any]:
    """The leader's result document (``ok``, ``result`` or ``error``, ``leader``,
    ``epoch``); raises :class:`RequestFailed` or TimeoutError."""
    deadline = time.monotonic() + timeout
    claimed_by: int | None = None
    while True:
        raw = backend.get_value(backend.keys.result(rid))
        doc: dict[str, Any] | None = None
        if raw is not None:
            try:
                loaded = json.loads(raw)
                doc = loaded if isinstance(loaded, dict) else None
            except ValueError:
                doc = None
        if doc is not None and doc.get("state") == "done":
            backend.delete_value(backend.keys.result(rid))
            return doc
        if doc is not None:
            claimed_by = int(doc.get("epoch") or 0)
            leader = backend.leader()
            if leader is None or leader.epoch != claimed_by:
                raise RequestFailed(
                    f"the leader of epoch {claimed_by} ({doc.get('leader')}) stopped leading "
                    "while carrying out the request; its outcome is unknown"
                )
        elif (
            claimed_by is None
            and backend.get_value(backend.keys.request(rid)) is None
            and backend.get_value(backend.keys.result(rid)) is None
        ):
            raise RequestFailed("the request expired before a leader took it")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from the leader within {timeout:g} s")
        time.sleep(poll)

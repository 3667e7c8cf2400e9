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

This needs the store's credentials and the cluster key (``<ca_dir>/cluster.key``, on
dispatcher hosts only): requests and results are sealed with it
(:mod:`cluster.signing`, kinds ``request``/``result``, bound to their store keys), so a
store writer without the key can neither ask the leader for anything nor fake its answer.
A request is valid for :data:`REQUEST_TTL` seconds after it was made (``at``); the leader
carries out each request id once. No API credentials; works from any dispatcher host.
This module stays light (no etcd client, no web framework).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Any

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from cluster.backend import KVBackend
from cluster.signing import RecordRejected, RecordSigner

REQUEST = "request"  # record kinds (dispatcher.ha.records uses the same names)
RESULT = "result"

REQUEST_TTL = 60  # seconds a request waits in the store for a leader to take it
RESULT_KEEP = 3600  # seconds the leader keeps a result nobody collected


class RequestFailed(CtrlExecError):
    """No result: no leader took the request, or the leader changed while running it."""


def post(backend: KVBackend, signer: RecordSigner, kind: str, args: dict[str, Any],
         requested_by: str = "") -> str:  # fmt: skip
    """Queue a request for the leader, sealed with the cluster key; its id (``kind``: a
    name of :data:`dispatcher.ha.actions.ACTIONS`, checked by the caller and the leader)."""
    rid = f"{int(time.time() * 1000):x}-{secrets.token_hex(6)}"
    doc = {"id": rid, "kind": kind, "args": args, "at": time.time(),
           "requested_by": requested_by or f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
    if reqid := logfmt.current_reqid():  # the leader logs the request under the asker's id
        doc["reqid"] = reqid
    key = backend.keys.request(rid)
    sealed = signer.seal(REQUEST, key, doc)  # before the lease: no key, nothing written
    lease = backend.lease_grant(REQUEST_TTL)
    backend.put_value(key, sealed, lease.id)
    return rid


def fresh(doc: dict[str, Any], now: float | None = None) -> bool:
    """A request made less than :data:`REQUEST_TTL` s ago (30 s of clock skew allowed)."""
    try:
        at = float(doc.get("at", 0))
    except (TypeError, ValueError):
        return False
    now = time.time() if now is None else now
    return now - REQUEST_TTL <= at <= now + 30


def wait(backend: KVBackend, signer: RecordSigner, rid: str, timeout: float,
         poll: float = 0.05) -> dict[str, Any]:  # fmt: skip
    """The leader's result document (``ok``, ``result`` or ``error``, ``leader``,
    ``epoch``), verified; raises :class:`RequestFailed` or TimeoutError. A result that
    fails verification is ignored (the genuine one is still awaited)."""
    deadline = time.monotonic() + timeout
    claimed_by: int | None = None
    key = backend.keys.result(rid)
    while True:
        raw = backend.get_value(key)
        doc: dict[str, Any] | None = None
        if raw is not None:
            try:
                loaded = signer.open(RESULT, key, raw)
                doc = loaded if isinstance(loaded, dict) and loaded.get("id") == rid else None
            except RecordRejected:
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

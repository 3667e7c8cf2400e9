"""The full record of a run another instance made: fetched from that instance.

The summary in etcd names the owner (``instance``); the cluster roster gives its
advertised API URL. The request goes over mTLS with the dispatcher certificate, and the
owner's certificate must carry one of the cluster's dispatcher serials
(:func:`dispatcher.ha.peer.connect_checked`, as forwarding does) before a byte is sent.
The owner answers on its peer route ``GET /cluster/runs/<reqid>``
(:mod:`dispatcher.api.routes.history`). When it cannot be reached the caller is told so
plainly (:class:`OwnerUnreachable`): the output lives only there.
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

from agent.common.errors import CtrlExecError
from agent.common.serial import serial_to_hex
from cluster.backend import KVBackend
from dispatcher.config import DispatcherConfig
from dispatcher.ha import roster
from dispatcher.ha.peer import base_path, connect_checked
from dispatcher.ha.records import Records

PEER_PATH = "/cluster/runs/"  # the owner's peer route (dispatcher certificate only)
MAX_RECORD = 64 * 1024 * 1024  # a record larger than this is refused


class OwnerUnreachable(CtrlExecError):
    """The instance that ran the job (and keeps its output) cannot be reached."""


class RecordGone(CtrlExecError):
    """The owner answered, but keeps no record of the run (retention removed it)."""


def server_serials(cfg: DispatcherConfig) -> set[str]:
    """Serials an owner's API may present: the dispatcher certificate (and the previous
    one during a rotation overlap), or this cluster's own API certificate."""
    from dispatcher.pki.ca import cert_serial_hex  # cryptography: only for ced show

    out: set[str] = set()
    for path in (cfg.cert, f"{cfg.cert}.prev", cfg.api_cert):
        if not path:
            continue
        try:
            s = serial_to_hex(cert_serial_hex(path))
        except (OSError, ValueError):
            continue
        if s:
            out.add(s)
    return out


def owner_url(backend: KVBackend, records: Records, instance: str) -> str:
    for m in roster.configured(backend, records):
        if m.instance_id == instance:
            return m.advertise_url
    return ""


def fetch(cfg: DispatcherConfig, backend: KVBackend, records: Records,
          summary: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:  # fmt: skip
    """The owner's full record of ``summary``'s run; :class:`OwnerUnreachable` or
    :class:`RecordGone` otherwise."""
    reqid, instance = str(summary["reqid"]), str(summary["instance"])
    url = owner_url(backend, records, instance)
    who = f"instance {instance}"
    if not url:
        raise OwnerUnreachable(
            f"run {reqid} was made by {who}, which is not in the cluster roster: its output "
            "is kept only there"
        )
    try:
        conn = connect_checked(cfg, url, timeout, lambda: server_serials(cfg), "history")
    except (OSError, ssl.SSLError) as exc:
        raise OwnerUnreachable(
            f"run {reqid} was made by {who} ({url}), which is unreachable: {exc}; its output "
            "is kept only there"
        ) from None
    try:
        conn.request("GET", f"{base_path(url)}{PEER_PATH}{reqid}")
        resp = conn.getresponse()
        data = resp.read(MAX_RECORD + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise OwnerUnreachable(f"run {reqid}: {who} ({url}) did not answer: {exc}") from None
    finally:
        conn.close()
    if resp.status == 404:
        raise RecordGone(f"run {reqid}: {who} keeps no record of it any more (retention)")
    if resp.status != 200 or len(data) > MAX_RECORD:
        raise OwnerUnreachable(f"run {reqid}: {who} ({url}) answered HTTP {resp.status}")
    try:
        rec = json.loads(data)
    except ValueError:
        raise OwnerUnreachable(f"run {reqid}: {who} ({url}) sent no JSON record") from None
    if not isinstance(rec, dict) or rec.get("reqid") != reqid or rec.get("instance") != instance:
        raise OwnerUnreachable(f"run {reqid}: {who} ({url}) sent a record of another run")
    return rec

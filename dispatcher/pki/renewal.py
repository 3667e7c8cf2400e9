"""Automatic renewal of agent certificates (spec 4.5).

After a successful ping the dispatcher renews an agent whose certificate has less than
``cert_days / 2`` days left and has nothing staged yet:

1. ``POST /renew {"reqid"}``: the agent answers with a CSR made from its existing key;
2. the CSR is signed for ``cert_days`` days with the CN bound to the **registry name**
   (an agent renamed with ``edit-agent --rename`` therefore fails, as upstream);
3. ``POST /renew-complete {"cert", "ca", "reqid"}``: the agent validates and stages it
   (its live cert is untouched until it is restarted or sent SIGHUP);
4. the registry ``expiry`` is updated through the dispatcher's state writer, and the new
   serial is recorded as ``cert_serial_next``: until the agent adopts the staged cert,
   both its old and its new certificate pass the client's pin check.

The CSR must carry the pinned public key (renewal keeps the agent's key), so an impostor
answering ``/renew`` cannot get a certificate for the agent's name. :func:`pin_contacts`
(the leader's ``maintain``, after its pings) pins records that have no pins yet (upstream
records) on their first successful contact and promotes ``cert_serial_next`` once the
agent presents it.

In a cluster only the leader renews: a follower (or ``ced`` with ``etcd_endpoints``)
that sees a renewal due logs ``renew-deferred`` and leaves it to the leader's
maintenance.

Every failure is logged as ``renew`` (ERR) and never raised: the ping result stands.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from agent.certinfo import identity_der
from agent.common import logfmt
from agent.common.errors import CtrlExecError
from dispatcher.client.io import AgentIO, resolve_io
from dispatcher.client.wire import AgentRequest
from dispatcher.reqid import new_reqid

if TYPE_CHECKING:
    from dispatcher.client.wire import AgentReply, TargetLike
    from dispatcher.core import Dispatcher

DAY = 86400
ev = logfmt.event


class RenewError(CtrlExecError):
    """One renewal step failed; the message is fit for the log and the CLI."""


def expiry_epoch(expiry: object) -> float | None:
    """Epoch seconds of an openssl-format ``notAfter`` (``Jun  7 16:28:00 2027 GMT``)."""
    if not isinstance(expiry, str) or not expiry.strip():
        return None
    from agent.common.certs import parse_openssl_date

    try:
        return parse_openssl_date(expiry).timestamp()
    except ValueError:
        return None


def is_staged(value: object) -> bool:
    """The ``staged`` flag of a ping answer (JSON true, or 1/"1"/"true" from older agents)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def renewal_due(ping_result: dict[str, Any], cert_days: int, now: float | None = None) -> bool:
    """Spec 4.5 trigger: ping ok, expiry known, nothing staged, under cert_days/2 left."""
    if ping_result.get("status") != "ok" or is_staged(ping_result.get("staged")):
        return False
    expires = expiry_epoch(ping_result.get("expiry"))
    if expires is None:
        return False
    now = time.time() if now is None else now
    return (expires - now) < (cert_days / 2) * DAY


def _check_csr_key(d: Dispatcher, name: str, csr_pem: str) -> None:
    """RenewError unless the CSR's public key is the one pinned for ``name`` (if any)."""
    from cryptography import x509

    from dispatcher.pki import ca as pki

    rec = d.registry.get(name) or {}
    pinned = rec.get("pubkey_sha256")
    if not isinstance(pinned, str) or not pinned:
        return
    try:
        key = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
    except ValueError as exc:
        raise RenewError(f"/renew failed: unreadable CSR: {exc}") from None
    got = pki.public_key_sha256(key)
    if got != pinned:
        raise RenewError(
            f"signing refused: CSR public key {got[:16]} is not the pinned key {pinned[:16]}"
        )


def pin_contacts(
    d: Dispatcher, observed: dict[str, tuple[str, str]], ok: set[str] | None = None
) -> list[str]:
    """Leader only: pin unpinned records to the certificate their agent presented, and
    promote ``cert_serial_next`` once the agent presents it (its renewal completed).

    ``observed`` maps registry names to the ``(serial, pubkey_sha256)`` seen on a
    successful contact (``fanout.Reach.observed``); ``ok`` limits it to those names.
    Returns the names whose record changed. Never raises (a failure is logged).
    """
    refused = d.signing_refused()
    if refused is not None:
        if observed:
            ev("pin-deferred", agents=len(observed), reason=refused)
        return []
    changed: list[str] = []
    for name, (serial, pubkey) in sorted(observed.items()):
        if ok is not None and name not in ok:
            continue
        try:
            rec = d.registry.get(name)
            if rec is None:
                continue
            if not rec.get("cert_serial"):
                d.registry.update(name, cert_serial=serial, pubkey_sha256=pubkey,
                                  cert_serial_next="")  # fmt: skip
                ev("pinned", host=name, serial=serial, pubkey=pubkey[:16])
                changed.append(name)
            elif serial == rec.get("cert_serial_next") and serial != rec.get("cert_serial"):
                d.registry.update(name, cert_serial=serial, cert_serial_next="",
                                  pubkey_sha256=pubkey)  # fmt: skip
                ev("pin-renewed", host=name, serial=serial, previous=rec.get("cert_serial"))
                changed.append(name)
        except Exception as exc:  # pinning never breaks maintain
            ev("pin-error", logging.ERROR, host=name, error=f"{exc.__class__.__name__}: {exc}")
    return changed


def _target(t: TargetLike) -> str:
    return f"{t.address}:{t.port}"


def _ok_body(reply: AgentReply, step: str) -> dict[str, Any]:
    if reply.error:
        raise RenewError(f"{step} failed: {reply.error}")
    body = reply.body
    if body is None:
        raise RenewError(f"{step} failed: invalid JSON response")
    if body.get("status") != "ok":
        raise RenewError(f"{step} failed: {body.get('error') or body.get('status')}")
    return body


async def renew(d: Dispatcher, target: TargetLike, *, io: AgentIO | None = None) -> dict[str, Any]:
    """Renew ``target``'s certificate now (no due check); never raises.

    Returns ``{"host", "status": "ok", "expiry", "reqid"}`` or
    ``{"host", "status": "error", "error", "reqid"}``.
    """
    from dispatcher.pki import ca as pki

    cfg = d.cfg
    call = resolve_io(io).call
    reqid = new_reqid()
    where = _target(target)
    ev("renew", target=where, reqid=reqid, status="starting")
    try:
        ctx = d.client_ctx()
        reply = await call(AgentRequest.to(target, "POST", "/renew", {"reqid": reqid}, ctx,
                                           cfg.read_timeout))  # fmt: skip
        csr = _ok_body(reply, "/renew").get("csr")
        if not isinstance(csr, str) or not csr.strip():
            raise RenewError("/renew failed: agent sent no CSR")
        ca = pki.load_ca(cfg.ca_dir, cfg.ca)
        _check_csr_key(d, target.name, csr)
        try:
            cert_pem = pki.sign_csr(ca, csr, days=cfg.cert_days, expected_cn=target.name)
        except pki.PKIError as exc:
            hint = ""
            if "common name" in str(exc):
                hint = " (agent renamed in the registry? re-pair it under its own name)"
            raise RenewError(f"signing refused: {exc}{hint}") from None
        body = {"cert": cert_pem, "ca": ca.pem, "reqid": reqid}
        reply = await call(AgentRequest.to(target, "POST", "/renew-complete", body, ctx,
                                           cfg.read_timeout))  # fmt: skip
        _ok_body(reply, "/renew-complete")
        expiry = pki.cert_not_after(cert_pem)
        new_serial, _ = identity_der(ssl.PEM_cert_to_DER_cert(cert_pem))
        d.registry.update(target.name, expiry=expiry, cert_serial_next=new_serial)
    except Exception as exc:  # renewal never breaks the ping that triggered it
        error = str(exc) if isinstance(exc, CtrlExecError) else f"{exc.__class__.__name__}: {exc}"
        ev("renew", logging.ERROR, target=where, reqid=reqid, error=error)
        return {"host": target.name, "status": "error", "error": error, "reqid": reqid}
    ev("renew-complete", target=where, reqid=reqid, expiry=expiry)
    return {"host": target.name, "status": "ok", "expiry": expiry, "reqid": reqid}


async def maybe_renew(
    d: Dispatcher,
    target: TargetLike,
    ping_result: dict[str, Any],
    now: float | None = None,
    *,
    io: AgentIO | None = None,
) -> str | None:
    """Renew if the ping says it is due; the new expiry on success, else None."""
    try:
        if not renewal_due(ping_result, d.cfg.cert_days, now):
            return None
    except Exception as exc:  # a malformed ping answer must not break ping_all
        ev("renew", logging.ERROR, target=_target(target), error=f"bad ping result: {exc}")
        return None
    refused = d.signing_refused()
    if refused is not None:  # a follower (or ``ced`` in a cluster) leaves it to the leader
        ev("renew-deferred", target=_target(target), agent=target.name, reason=refused)
        return None
    result = await renew(d, target, io=io)
    expiry = result.get("expiry")
    return expiry if result.get("status") == "ok" and isinstance(expiry, str) else None

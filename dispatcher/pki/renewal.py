"""Automatic renewal of agent certificates (spec 4.5).

After a successful ping the dispatcher renews an agent whose certificate has less than
``cert_days / 2`` days left and has nothing staged yet:

1. ``POST /renew {"reqid"}``: the agent answers with a CSR made from its existing key;
2. the CSR is signed for ``cert_days`` days with the CN bound to the **registry name**
   (an agent renamed with ``edit-agent --rename`` therefore fails, as upstream);
3. ``POST /renew-complete {"cert", "ca", "reqid"}``: the agent validates and stages it
   (its live cert is untouched until it is restarted or sent SIGHUP);
4. the registry ``expiry`` is updated through the dispatcher's state writer.

In a cluster only the leader renews: a follower (or ``ced`` with ``etcd_endpoints``)
that sees a renewal due logs ``renew-deferred`` and leaves it to the leader's
maintenance.

Every failure is logged as ``renew`` (ERR) and never raised: the ping result stands.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

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
        d.registry.update(target.name, expiry=expiry)
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

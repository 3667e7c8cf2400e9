"""Signed assertions of who asked, for requests a follower forwards to the leader.

A follower never forwards an operator's credentials (``Authorization`` header, body
``token``, client certificate): it authorised the request itself, then sends the leader
an assertion sealed with the cluster key (:meth:`cluster.signing.RecordSigner.mac`):

``{"by", "who": {"cn", "serial", "issuer"}, "username", "ip", "method", "path",
"body_sha256", "ts", "nonce", "reqid"}``

``reqid`` is the request's id on the follower: the leader logs the request under it, so
one grep follows the request across both (:func:`claimed_reqid` reads it before the
assertion is checked, for the lines logged until then).

The leader accepts it only when the MAC verifies, it is less than :data:`VALID` seconds
old (or at most :data:`SKEW` in the future), its nonce was not seen before, and method,
path and body hash are those of the request it came with (and, on TLS, only from a peer
whose certificate carries a dispatcher serial of the cluster: checked by the caller). The
request is then treated as coming from the asserted operator (the leader's auth hook
still runs, without the token).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.signing import RecordSigner, canonical
from dispatcher.reqid import REQID_RE

HEADER = "x-ctrl-exec-assertion"
PURPOSE = "forward"
VALID = 30.0  # seconds an assertion is accepted after it was made
SKEW = 5.0  # seconds it may come from the future (clocks of two hosts)


class AssertionRefused(Exception):
    """The forwarded request carries no valid assertion; the message says why."""


@dataclass(frozen=True)
class Asserted:
    by: str  # the forwarding instance
    cn: str  # operator identity of the original client certificate ("" for none)
    serial: str
    issuer: str  # SHA256:<hex> of the CA that issued the operator certificate
    username: str
    ip: str
    reqid: str = ""


def body_hash(body: bytes | None) -> str:
    return hashlib.sha256(body or b"").hexdigest()


def make(signer: RecordSigner, *, by: str, who: dict[str, str], username: str, ip: str,
         method: str, path: str, body: bytes | None, now: float | None = None,
         reqid: str = "") -> str:  # fmt: skip
    """The header value: ``base64url(canonical JSON) "." hex MAC``."""
    doc = {"by": by, "who": who, "username": username, "ip": ip, "method": method.upper(),
           "path": path, "body_sha256": body_hash(body),
           "ts": time.time() if now is None else now, "nonce": secrets.token_hex(16)}  # fmt: skip
    if reqid:
        doc["reqid"] = reqid
    raw = canonical(doc)
    return base64.urlsafe_b64encode(raw).decode() + "." + signer.mac(PURPOSE, raw)


@dataclass
class Nonces:
    """Nonces seen within :data:`VALID` (+ skew): a replayed assertion is refused."""

    clock: Callable[[], float] = time.time
    limit: int = 100_000
    _seen: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _claims: int = 0

    def claim(self, nonce: str) -> bool:
        now = self.clock()
        with self._lock:
            self._claims += 1
            if len(self._seen) >= self.limit or self._claims % 256 == 0:  # forget expired
                self._seen = {n: t for n, t in self._seen.items() if now - t < VALID + SKEW}
            if nonce in self._seen:
                return False
            if len(self._seen) >= self.limit:
                return False  # flooded with valid assertions: refuse rather than forget
            self._seen[nonce] = now
            return True


def check(signer: RecordSigner, value: str, *, method: str, path: str, body: bytes | None,
          nonces: Nonces, now: float | None = None) -> Asserted:  # fmt: skip
    """The asserted caller; :class:`AssertionRefused` unless everything holds."""
    enc, dot, mac = value.strip().partition(".")
    if not dot or not enc or not mac:
        raise AssertionRefused("malformed assertion")
    try:
        raw = base64.urlsafe_b64decode(enc.encode())
        doc: Any = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise AssertionRefused("malformed assertion") from None
    if not signer.available:
        raise AssertionRefused("this instance holds no cluster key")
    if not isinstance(doc, dict) or not signer.check_mac(PURPOSE, canonical(doc), mac):
        raise AssertionRefused("assertion not sealed with the cluster key")
    now = time.time() if now is None else now
    try:
        ts, nonce = float(doc["ts"]), str(doc["nonce"])
        who = doc.get("who") or {}
        if not isinstance(who, dict):
            raise TypeError("who")
    except (KeyError, TypeError, ValueError):
        raise AssertionRefused("malformed assertion") from None
    if not now - VALID <= ts <= now + SKEW:
        raise AssertionRefused(f"assertion expired ({now - ts:.0f} s old)")
    if doc.get("method") != method.upper() or doc.get("path") != path:
        raise AssertionRefused("assertion made for another request")
    if doc.get("body_sha256") != body_hash(body):
        raise AssertionRefused("assertion made for another body")
    if not nonces.claim(nonce):
        raise AssertionRefused("assertion replayed")
    return Asserted(by=str(doc.get("by", "")), cn=str(who.get("cn", "")),
                    serial=str(who.get("serial", "")), issuer=str(who.get("issuer", "")),
                    username=str(doc.get("username", "")), ip=str(doc.get("ip", "")),
                    reqid=_reqid(doc.get("reqid")))  # fmt: skip


def _reqid(value: object) -> str:
    return value if isinstance(value, str) and REQID_RE.fullmatch(value) else ""


def claimed_reqid(value: str) -> str:
    """The reqid an assertion names, NOT checked (only to label log lines until
    :func:`check` runs); ``""`` when there is none or it is malformed."""
    enc = value.strip().partition(".")[0]
    if not enc or len(enc) > 8192:
        return ""
    try:
        doc: Any = json.loads(base64.urlsafe_b64decode(enc.encode()))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return ""
    return _reqid(doc.get("reqid")) if isinstance(doc, dict) else ""

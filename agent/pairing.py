"""Agent side of pairing (spec 5.1): key + CSR, two responses on one TLS connection.

The pairing port is server-auth TLS that the agent does not verify by default; trust comes
from the operator comparing the 6-digit code shown on both sides, and the agent prints the
fingerprint of the CA it accepted so the operator can compare that too.

With a pinned CA (``request-pairing --ca-fingerprint SHA256:<hex>``, the value ``ced
pairing-mode`` prints) the agent, before it sends anything, requires the listener's TLS
chain to hold a CA certificate with that fingerprint which issued the listener's
certificate (neither expired); our dispatcher sends its CA after its certificate, an upstream
0.12.x dispatcher sends its certificate alone and cannot be pinned. The approval's CA must
then be that same CA. Whether pinned or not, the approved certificate must be issued by
the approval's CA and carry the agent's own public key.

Pairing tokens (beyond upstream): ``request-pairing --token-file F`` (or ``--token -``
for stdin, or ``$CTRL_EXEC_PAIRING_TOKEN``) sends a token from ``ced pairing-token create``
in the request's ``pairing_token`` field; our dispatcher approves the request at once when
the token is valid, an upstream dispatcher ignores the field. Without a token the request
is exactly upstream's.

Reconnection (beyond upstream): when the connection drops while the agent waits for the
decision (the dispatcher that held it died or stopped leading; behind a load balancer the
next connection reaches the new leader), :func:`wait_reconnecting` connects again and
sends the same request (same CSR, same nonce) up to ``RECONNECTS`` times with a growing
pause (capped at ``BACKOFF_MAX``), within the approval timeout: the time is the bound, so
an outage longer than a few tries (a pairing rate limit blocking the agent's address for
minutes after a storm of reconnections, a load balancer whose leader check flaps) is
waited out when it ends in time. Our dispatcher answers it as the same request: still
pending, or approved (an approval survives the leader), so an acknowledged approval
ends with the agent holding its certificate. After a failover a request that was still
pending is new to the new leader and waits for the operator again. An upstream (Perl)
agent does not reconnect: its ``request-pairing`` fails and must be run again.

The first connection is retried too (:func:`submit_retrying`): when nothing answered yet
(the TLS handshake or the request met a closed connection, a reset or a refusal to take
requests now: a load balancer with no leader in its pool for a moment, a leader under
load whose health check lapsed, a listener restarting), the agent asks again with a
growing, jittered pause until the approval timeout ends, instead of failing at once. What
is final stays final at once: a CA that does not match the pin, a refused or denied
request, a name that does not resolve, nothing listening on a direct address.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import trustmap
from agent.common import certs
from agent.common.errors import CtrlExecError
from agent.common.fsutil import atomic_write
from agent.common.tlsconf import client_context
from agent.common.wire import dumps, parse_head


class PairingError(CtrlExecError):
    """Pairing failed; ``denied`` tells a denial from a transport or protocol failure."""

    def __init__(self, message: str, denied: bool = False):
        super().__init__(message)
        self.denied = denied


class ConnectionLost(PairingError):
    """The pairing connection ended without a decision: asking again may succeed."""


RECONNECTS = 128  # more than the approval timeout (600 s at most) allows at BACKOFF_MAX
TOKEN_FIELD = "pairing_token"  # in the request body; upstream dispatchers ignore it
TOKEN_ENV = "CTRL_EXEC_PAIRING_TOKEN"
MAX_TOKEN = 256
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0
# answers that mean "this dispatcher cannot take the request now", not "no"
RETRY_REASONS = ("pairing mode stopped", "pairing unavailable, try again later")


@dataclass
class PairingRequest:
    hostname: str
    csr: str
    key_pem: bytes
    nonce: str
    code: str


def prepare(hostname: str, key_type: str) -> PairingRequest:
    key = certs.new_key(key_type)
    csr = certs.make_csr(key, hostname)
    return PairingRequest(hostname, csr, certs.key_pem(key), secrets.token_hex(16),
                          certs.pairing_code(csr))  # fmt: skip


def read_token(token_file: str | None, token: str | None, env: Mapping[str, str]) -> str:
    """The pairing token to present ("" for none): from ``--token-file F``, from stdin with
    ``--token -``, else from ``$CTRL_EXEC_PAIRING_TOKEN``. A token given in clear on the
    command line is refused (argv is visible to every user of the host)."""
    if token is not None and token != "-":
        raise PairingError("--token takes only '-' (read it from stdin): a token on the "
                           "command line is visible to other users; use --token-file F")  # fmt: skip
    if token_file is not None and token is not None:
        raise PairingError("give --token-file or --token -, not both")
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise PairingError(f"cannot read the token file {token_file}: {exc}") from None
    elif token == "-":
        text = sys.stdin.readline(MAX_TOKEN + 2)
    else:
        text = env.get(TOKEN_ENV, "")
    value = text.strip()
    if (token_file is not None or token == "-") and not value:
        raise PairingError("the pairing token is empty")
    if len(value) > MAX_TOKEN or any(not (c.isascii() and c.isprintable()) or c.isspace()
                                     for c in value):  # fmt: skip
        raise PairingError("the pairing token is malformed (one line of printable ASCII)")
    return value


def peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent (DER, leaf first), unverified. Python 3.13 has
    ``get_unverified_chain``; 3.10-3.12 have it on the internal object; else the leaf."""
    getter = getattr(sock, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        try:
            chain = getter() or []
        except (AttributeError, ValueError, ssl.SSLError):
            chain = []
        out = [c if isinstance(c, bytes) else c.public_bytes(2) for c in chain]  # 2: DER
        if out:
            return out
    leaf = sock.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def check_pinned_chain(chain: list[bytes], pin: str) -> None:
    """PairingError unless ``chain`` holds a CA with fingerprint ``pin`` that issued the
    leaf (``chain[0]``), neither expired."""
    from cryptography import x509

    if not chain:
        raise PairingError("the pairing listener presented no certificate")
    by_fp = {certs.fingerprint(der): der for der in chain[1:]}
    if pin not in by_fp:
        if len(chain) == 1:
            raise PairingError(
                "the pairing listener sent its certificate without its CA, so the pinned CA "
                "cannot be checked (an upstream 0.12.x dispatcher does this): nothing was sent"
            )
        got = ", ".join(by_fp) or "(none)"
        raise PairingError(f"the dispatcher CA does not match --ca-fingerprint {pin} "
                           f"(the listener offered {got}): nothing was sent")  # fmt: skip
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        ca = x509.load_der_x509_certificate(by_fp[pin])
    except ValueError:
        raise PairingError("the pairing listener sent an unreadable certificate") from None
    _check_issued(leaf, ca, "the pairing listener's certificate")


def _check_issued(cert: Any, ca: Any, what: str) -> None:
    import datetime as dt

    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # InvalidSignature is not a ValueError
        raise PairingError(f"{what} is not issued by the dispatcher CA "
                           f"({exc.__class__.__name__})") from None  # fmt: skip
    # expiry only: upstream issues certificates valid from "now", and the agent's clock
    # may run a little behind the dispatcher's
    now = dt.datetime.now(dt.UTC)
    for c, name in ((cert, what), (ca, "the dispatcher CA")):
        if now >= c.not_valid_after_utc:
            raise PairingError(f"{name} has expired")


def check_approval(result: dict[str, Any], req: PairingRequest, pin: str | None) -> str:
    """The approval's CA fingerprint, once the CA matches ``pin`` (when given) and the
    certificate is issued by that CA for the agent's own key; PairingError otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        ca = x509.load_pem_x509_certificate(result["ca"].encode())
        cert = x509.load_pem_x509_certificate(result["cert"].encode())
    except ValueError:
        raise PairingError("pairing result holds an unreadable certificate") from None
    fp = certs.fingerprint(ca)
    if pin is not None and fp != pin:
        raise PairingError(f"the approval's CA {fp} does not match --ca-fingerprint {pin}: "
                           "nothing stored")  # fmt: skip
    _check_issued(cert, ca, "the approved certificate")
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(req.key_pem, password=None)
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise PairingError("the approved certificate is not for this agent's key")
    return fp


def probe(host: str, port: int, timeout: float = 5.0) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        raise PairingError(f"dispatcher '{host}' did not resolve - check the name") from None
    except ConnectionRefusedError:
        raise PairingError(
            f"nothing listens on {host}:{port} - is pairing mode running on the dispatcher?"
        ) from None
    except OSError as exc:
        raise PairingError(f"cannot reach {host}:{port}: {exc}") from None


def _read_response(fh: Any) -> dict[str, Any]:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = fh.readline(16384)
        if not line:
            raise ConnectionLost("dispatcher closed the pairing connection")
        head += line
        if line in (b"\n",):
            break
    _, headers = parse_head(head.rstrip(b"\r\n"))
    if "content-length" not in headers:
        raise PairingError("pairing response without Content-Length")
    body = fh.read(int(headers["content-length"]))
    try:
        obj = json.loads(body)
    except ValueError:
        raise PairingError("pairing response is not JSON") from None
    if not isinstance(obj, dict):
        raise PairingError("pairing response is not a JSON object")
    return obj


class Session:
    """One pairing connection: :meth:`submit` returns the reqid, :meth:`wait` the result."""

    def __init__(self, host: str, port: int, timeout: float = 660.0, ca_pin: str | None = None):
        self.host, self.port = host, port
        self.ca_pin = ca_pin
        self.ca_fingerprint = ""  # of the approval's CA, once :meth:`wait` accepted it
        raw = socket.create_connection((host, port), timeout=30)
        raw.settimeout(timeout)
        self.sock: ssl.SSLSocket = client_context(None).wrap_socket(raw)
        if ca_pin is not None:
            try:
                check_pinned_chain(peer_chain(self.sock), ca_pin)
            except PairingError:
                self.sock.close()
                raise
        self.fh = self.sock.makefile("rb")

    def close(self) -> None:
        self.fh.close()
        self.sock.close()

    def submit(self, req: PairingRequest, hints: dict[str, Any]) -> str:
        body = {"hostname": req.hostname, "csr": req.csr, "nonce": req.nonce, **hints}
        if "ip" not in body:
            body["ip"] = self.sock.getsockname()[0]
        data = dumps(body)
        head = (f"POST /pair HTTP/1.0\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
        self.sock.sendall(head.encode() + data)
        first = _read_response(self.fh)
        if first.get("status") != "pending":
            reason = first.get("reason") or first.get("status")
            if reason in RETRY_REASONS:
                raise ConnectionLost(f"pairing refused: {reason}")
            raise PairingError(f"pairing refused: {reason}")
        return str(first.get("reqid", ""))

    def wait(self, req: PairingRequest) -> dict[str, Any]:
        try:
            second = _read_response(self.fh)
        except TimeoutError:
            raise PairingError("timed out waiting for approval") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionLost(f"pairing connection lost: {exc}") from None
        if second.get("status") != "approved":
            reason = second.get("reason") or "denied"
            if reason in RETRY_REASONS:
                raise ConnectionLost(f"pairing interrupted: {reason}")
            raise PairingError(f"pairing denied: {reason}", denied=True)
        if second.get("nonce") != req.nonce:
            raise PairingError("nonce mismatch in pairing result")
        for k in ("cert", "ca"):
            if not isinstance(second.get(k), str) or "BEGIN CERTIFICATE" not in second[k]:
                raise PairingError(f"pairing result has no usable '{k}'")
        self.ca_fingerprint = check_approval(second, req, self.ca_pin)
        return second


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _attempt(
    host: str,
    port: int,
    pin: str | None,
    req: PairingRequest,
    hints: dict[str, Any],
    deadline: float,
) -> tuple[Session, str]:
    """One connection carrying ``req``: the session and its reqid once the dispatcher
    answered ``pending``. ConnectionLost when asking again may succeed (nothing answered,
    or "try again later"); PairingError when it is final."""
    try:  # a pinned CA that does not match raises PairingError: final
        session = Session(host, port, timeout=max(1.0, deadline - time.monotonic()),
                          ca_pin=pin)  # fmt: skip
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionLost(f"cannot connect: {exc}") from None
    try:
        return session, session.submit(req, hints)
    except PairingError:
        session.close()
        raise
    except (OSError, ssl.SSLError) as exc:
        session.close()
        raise ConnectionLost(f"pairing connection lost: {exc}") from None


def submit_retrying(
    host: str,
    port: int,
    req: PairingRequest,
    hints: dict[str, Any],
    timeout: float,
    *,
    ca_pin: str | None = None,
    say: Callable[[str], None] = _say,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> tuple[Session, str]:
    """A session on which ``req`` is pending, and its reqid: the first connection, asked
    again while nothing answered (see the module docstring) with pauses growing from
    ``BACKOFF_FIRST`` to ``BACKOFF_MAX`` (each 0.75-1.25 times that, so agents cut off
    together do not come back together), until ``timeout`` s have passed. PairingError when
    it is final or the time is up (naming what the last attempt met)."""
    deadline = time.monotonic() + timeout
    pause = BACKOFF_FIRST
    tries = 0
    while True:
        try:
            return _attempt(host, port, ca_pin, req, hints, deadline)
        except ConnectionLost as exc:
            lost = exc
        tries += 1
        wait = pause * (0.75 + jitter() / 2)
        if deadline - time.monotonic() <= wait:
            raise PairingError(f"{lost} (gave up after {tries} attempts in {timeout:.0f} s)")
        say(f"{lost}; asking again in {wait:.1f} s (attempt {tries + 1})...")
        sleep(wait)
        pause = min(pause * 2, BACKOFF_MAX)


def wait_reconnecting(
    session: Session,
    req: PairingRequest,
    hints: dict[str, Any],
    timeout: float,
    *,
    reconnects: int = RECONNECTS,
    say: Callable[[str], None] = _say,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, Any], Session]:
    """The decision, waiting on ``session`` and, when the connection drops, on new
    connections carrying the same request (see the module docstring); returns the result
    and the session it came on. PairingError when denied, timed out or out of retries."""
    deadline = time.monotonic() + timeout
    pause = BACKOFF_FIRST
    tries = 0
    while True:
        try:
            return session.wait(req), session
        except ConnectionLost as exc:
            lost: PairingError = exc
        session.close()
        while True:
            tries += 1
            left = deadline - time.monotonic()
            if tries > reconnects or left <= pause:
                raise PairingError(f"{lost} (gave up after {tries - 1} reconnects)")
            say(f"{lost}; reconnecting in {pause:.1f} s ({tries}/{reconnects})...")
            sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX)
            try:
                session, reqid = _attempt(session.host, session.port, session.ca_pin, req,
                                          hints, deadline)  # fmt: skip
            except ConnectionLost as exc:
                lost = exc
                continue
            say(f"Reconnected: request {reqid} is waiting for approval.")
            break


def store(
    result: dict[str, Any], req: PairingRequest, cert: str, key: str, ca: str, trust_path: str
) -> None:
    """Write cert, key and CA where the config says, then trust the approving dispatcher."""
    for p in (cert, key, ca):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(key, req.key_pem, 0o640)
    atomic_write(cert, result["cert"], 0o640)
    atomic_write(ca, result["ca"], 0o644)
    serial = str(result.get("dispatcher_serial") or "")
    if serial:
        ident = str(result.get("dispatcher_id") or "") or serial
        Path(trust_path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        trustmap.add(trust_path, serial, ident)


def preflight(paths: list[str]) -> None:
    for p in paths:
        d = Path(p).parent
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PairingError(f"cannot create {d}: {exc}") from None
        if not os.access(d, os.W_OK):
            raise PairingError(f"{d} is not writable - run as root or fix its permissions")

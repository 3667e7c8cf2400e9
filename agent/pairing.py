"""Agent side of pairing (spec 5.1): key + CSR, two responses on one TLS connection.

The pairing port is server-auth TLS that the agent does not verify; trust comes from the
operator comparing the 6-digit code shown on both sides.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
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
            raise PairingError("dispatcher closed the pairing connection")
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

    def __init__(self, host: str, port: int, timeout: float = 660.0):
        self.host, self.port = host, port
        raw = socket.create_connection((host, port), timeout=30)
        raw.settimeout(timeout)
        self.sock: ssl.SSLSocket = client_context(None).wrap_socket(raw)
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
            raise PairingError(f"pairing refused: {first.get('reason') or first.get('status')}")
        return str(first.get("reqid", ""))

    def wait(self, req: PairingRequest) -> dict[str, Any]:
        try:
            second = _read_response(self.fh)
        except TimeoutError:
            raise PairingError("timed out waiting for approval") from None
        if second.get("status") != "approved":
            raise PairingError(f"pairing denied: {second.get('reason') or 'denied'}", denied=True)
        if second.get("nonce") != req.nonce:
            raise PairingError("nonce mismatch in pairing result")
        for k in ("cert", "ca"):
            if not isinstance(second.get(k), str) or "BEGIN CERTIFICATE" not in second[k]:
                raise PairingError(f"pairing result has no usable '{k}'")
        return second


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

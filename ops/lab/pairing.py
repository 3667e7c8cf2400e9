"""The pairing protocol from the agent's side, raw: what ``request-pairing`` sends to 7444.

A request is one framed ``POST /pair`` (HTTP/1.0 head, JSON body); the listener answers
``pending`` at once and the decision later on the same connection, each answer framed
the same way.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ops.lab.net import client_ssl


def make_csr(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))  # fmt: skip
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def frame(body: bytes, path: str = "/pair") -> bytes:
    """``body`` as one request of the pairing protocol."""
    return (f"POST {path} HTTP/1.0\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def read_response(fh: IO[bytes]) -> tuple[int, bytes, bytes]:
    """One framed response: ``(code, head, body)``; reads exactly Content-Length bytes."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = fh.readline()
        assert line, f"connection closed after {head!r}"
        head += line
    m = re.search(rb"Content-Length: (\d+)", head)
    if m is None:  # a ValueError the callers count as a failed request, with what came
        raise ValueError(f"a response without Content-Length: {head[:300]!r}")
    return int(head.split()[1]), head, fh.read(int(m.group(1)))


def read_framed(fh: IO[bytes]) -> dict[str, Any]:
    """One framed response's JSON body."""
    body: dict[str, Any] = json.loads(read_response(fh)[2])
    return body


@contextmanager
def pairing_request(
    port: int, ca: Path, hostname: str, nonce: str | None = None, timeout: float = 5.0,
    csr: str | None = None,
) -> Iterator[tuple[dict[str, Any], IO[bytes]]]:  # fmt: skip
    """Send one pairing request (from ``ip`` 127.0.0.9) to ``127.0.0.1:port``: the first
    answer and the stream the decision will come on; hang up (the listener withdraws the
    request) on the way out."""
    body = json.dumps({"hostname": hostname, "csr": csr or make_csr(hostname),
                       "nonce": nonce or secrets.token_hex(4), "ip": "127.0.0.9"}).encode()  # fmt: skip
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with client_ssl(ca).wrap_socket(raw) as s:
        s.sendall(frame(body))
        with s.makefile("rb") as fh:
            yield read_framed(fh), fh


def pair_request(
    port: int, ca: Path, hostname: str, timeout: float = 5.0, csr: str | None = None
) -> dict[str, Any]:
    """The first answer to one pairing request, then hang up. Raises ``OSError`` or
    ``AssertionError`` on failure."""
    with pairing_request(port, ca, hostname, timeout=timeout, csr=csr) as (first, _):
        return first

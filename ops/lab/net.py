"""Loopback ports and clients: pick free ports, wait until something listens, GET a URL,
talk TLS to a ctrl-exec port."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CertKey(Protocol):
    """A certificate and its key (``ops.lab.pki.Issued`` is one)."""

    cert: Path
    key: Path


#: where :func:`free_port` picks: below the kernel's ephemeral range (32768 up by default),
#: above the well-known ports the tests and the product use (7443-7448, 2379-2380)
PICK_FROM = 20000
_picked: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, outside the kernel's ephemeral range.

    Not the kernel's choice (``bind`` to port 0): that comes from the ephemeral range, the
    one the kernel also takes the source port of every outgoing connection from, so
    between this call and the listener's ``bind`` a connection made by anything else
    running (a parallel test worker) could take it ("is not a free port number", seen in
    a full run). A port below that range is never handed out by the kernel; it is picked
    at random, checked by binding it, and never given twice by this process."""
    import random

    low = _ephemeral_low()
    if low - PICK_FROM >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):  # bounded: most of the range is free
            port = rng.randrange(PICK_FROM, low)
            if port in _picked:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _picked.add(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_listening(
    host: str, port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15
) -> None:
    """Wait until ``host:port`` accepts a TCP connection (fail early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """``GET url`` (never through a proxy): (status, JSON body or text); (0, None) when
    nothing answered."""
    try:
        try:
            with _NO_PROXY.open(url, timeout=timeout) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, data = exc.code, exc.read()
    except (OSError, http.client.HTTPException):
        return 0, None
    text = data.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def client_ssl(ca: Path | str, who: CertKey | None = None) -> ssl.SSLContext:
    """A TLS client context towards a ctrl-exec API or pairing port: trusts ``ca``, checks
    no host name (the dispatcher certificate names none), presents ``who`` if given."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if who is not None:
        ctx.load_cert_chain(str(who.cert), str(who.key))
    return ctx


def served_serial(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> int:
    """The serial number of the certificate the TLS server on ``host:port`` presents."""
    with socket.create_connection((host, port), 5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return x509.load_der_x509_certificate(der).serial_number

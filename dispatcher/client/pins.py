"""Which certificate an agent must present: the registry's pins, checked per connection.

A registry record carries ``cert_serial`` and ``pubkey_sha256`` (written at approval,
and at renewal ``cert_serial_next`` too, until the agent adopts its renewed cert). The
client checks the certificate the agent presented right after the handshake and before
a byte of the request is written (:meth:`Pins.check`): any other certificate, however
CA-signed, gets a per-host error and nothing. A record without pins (an upstream record,
or one paired before pinning) is accepted; the leader pins it on first successful contact
(``dispatcher.pki.renewal.pin_contacts``).

Standard library only (``ced run`` stays import-light): the serial and the public-key
fingerprint come from the DER by :func:`agent.certinfo.identity_der`.
"""

from __future__ import annotations

import threading
from typing import Any

from agent.certinfo import identity_der
from agent.common import logfmt
from agent.common.errors import ProtocolError
from agent.common.records import record
from agent.common.serial import serial_to_hex


class PinMismatch(ProtocolError):
    """The agent presented a certificate the registry does not know for it."""


@record(frozen=True)
class Pins:
    """The serials (current, and a renewed one not yet adopted) and key an agent may show."""

    serials: tuple[str, ...]
    pubkey_sha256: str

    def check(self, der: bytes | None) -> tuple[str, str]:
        """``(serial, pubkey_sha256)`` of ``der``; :class:`PinMismatch` unless pinned."""
        serial, pubkey = peer_identity(der)
        if serial not in self.serials:
            raise PinMismatch(
                f"agent certificate does not match the registry (serial {serial}, "
                f"expected {' or '.join(self.serials)})"
            )
        if self.pubkey_sha256 and pubkey != self.pubkey_sha256:
            raise PinMismatch(
                f"agent certificate does not match the registry (public key {pubkey[:16]}, "
                f"expected {self.pubkey_sha256[:16]})"
            )
        return serial, pubkey


def peer_identity(der: bytes | None) -> tuple[str, str]:
    if not der:
        raise PinMismatch("agent presented no certificate")
    try:
        return identity_der(der)
    except ValueError as exc:
        raise PinMismatch(f"agent certificate unreadable: {exc}") from None


def from_record(rec: dict[str, Any]) -> Pins | None:
    """The pins of a registry record; None when it has none (upstream record)."""
    serials = [serial_to_hex(str(rec.get(k) or "")) for k in ("cert_serial", "cert_serial_next")]
    kept = tuple(s for s in serials if s)
    if not serials[0]:
        return None
    pubkey = rec.get("pubkey_sha256")
    return Pins(kept, pubkey.lower() if isinstance(pubkey, str) else "")


class Counters:
    """Pin checks of this process, for ``/metrics`` (thread-safe increments)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.mismatches = 0
        self.unpinned = 0
        self._unpinned_logged: set[str] = set()

    def mismatch(self, name: str, address: str, error: str) -> None:
        with self._lock:
            self.mismatches += 1
        logfmt.event("pin-mismatch", logfmt.ERROR, agent=name, target=address, error=error)

    def accepted_unpinned(self, name: str) -> None:
        """An unpinned record was accepted: logged once per agent name per process."""
        with self._lock:
            self.unpinned += 1
            if name in self._unpinned_logged or len(self._unpinned_logged) >= 100_000:
                return
            self._unpinned_logged.add(name)
        logfmt.event("pin-absent", logfmt.WARNING, agent=name,
                     reason="registry record has no certificate pin; accepted until the "
                     "leader pins it")  # fmt: skip


COUNTERS = Counters()

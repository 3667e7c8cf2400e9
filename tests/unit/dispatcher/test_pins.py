"""Agent certificate pins: the stdlib DER walker agrees with ``cryptography``; a record's
pins; the check that refuses any other certificate; linear target resolution."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from agent.certinfo import identity_der
from dispatcher.client.pins import PinMismatch, Pins, from_record
from dispatcher.pki.ca import public_key_sha256
from dispatcher.registry import Registry, RegistryError, resolve
from dispatcher.statewrite import LocalWriter


def _cert(key: object, serial: int, version_v1: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.test")])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(serial)  # type: ignore[attr-defined]
         .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))  # fmt: skip
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        rsa.generate_private_key(65537, 2048),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["ec", "rsa", "ed25519"],
)
@pytest.mark.parametrize("serial", [1, 0x7F, 0x80, 0xFF00, (1 << 159) - 1])
def test_identity_der_matches_cryptography(key: object, serial: int) -> None:
    cert = _cert(key, serial)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert identity_der(der) == (format(serial, "x"), public_key_sha256(cert.public_key()))


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x03\x02\x01\x01", b"\x04\x00" * 4])
def test_identity_der_rejects_junk(junk: bytes) -> None:
    with pytest.raises(ValueError):
        identity_der(junk)


def test_pins_check() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = _cert(key, 0xABC).public_bytes(serialization.Encoding.DER)
    fp = public_key_sha256(key.public_key())
    assert Pins(("abc",), fp).check(der) == ("abc", fp)
    assert Pins(("123", "abc"), fp).check(der) == ("abc", fp)  # during a renewal
    with pytest.raises(PinMismatch, match=r"serial abc, expected 123\)"):
        Pins(("123",), fp).check(der)
    with pytest.raises(PinMismatch, match="public key"):
        Pins(("abc",), "0" * 64).check(der)
    with pytest.raises(PinMismatch, match="no certificate"):
        Pins(("abc",), fp).check(None)


def test_from_record() -> None:
    assert from_record({"hostname": "a"}) is None  # upstream record: unpinned
    assert from_record({"cert_serial": "", "cert_serial_next": "ab"}) is None
    assert from_record({"cert_serial": "0A", "pubkey_sha256": "FF"}) == Pins(("a",), "ff")
    assert from_record({"cert_serial": "a", "cert_serial_next": "b", "pubkey_sha256": "f"}) == (
        Pins(("a", "b"), "f"))  # fmt: skip


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "agents", LocalWriter())


def test_registry_pin_fields_validated(reg: Registry) -> None:
    reg.register("a", ip="10.0.0.1", cert_serial="ab12", pubkey_sha256="ff" * 32)
    rec = reg.get("a")
    assert rec is not None and rec["cert_serial"] == "ab12" and rec["cert_serial_next"] == ""
    with pytest.raises(RegistryError, match="lower-case hex"):
        reg.update("a", cert_serial="../x")
    with pytest.raises(RegistryError, match="must be a string"):
        reg.update("a", pubkey_sha256=12)
    t = resolve(reg, ["a"])[0]
    assert t.pins == Pins(("ab12",), "ff" * 32)


def test_resolve_is_linear_and_names_few_unknowns(reg: Registry) -> None:
    for i in range(50):
        reg.register(f"h{i}", ip="10.0.0.1")
    refs = [f"h{i % 50}" for i in range(40_000)]
    t0 = time.monotonic()
    out = resolve(reg, refs)
    assert len(out) == 50 and out[0].pins is None
    assert time.monotonic() - t0 < 5.0  # quadratic: over 10 s
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as ei:
        resolve(reg, [f"ghost{i}" for i in range(40_000)])
    assert time.monotonic() - t0 < 5.0  # quadratic: over 10 s
    assert str(ei.value).endswith("(and 39980 more)") and len(str(ei.value)) < 400


class _D:
    """What pin_contacts and the CSR check use of a Dispatcher."""

    def __init__(self, reg: Registry, refused: str | None = None) -> None:
        self.registry = reg
        self.refused = refused

    def signing_refused(self) -> str | None:
        return self.refused


def _csr(key: ec.EllipticCurvePrivateKey, cn: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))  # fmt: skip
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_renewal_csr_must_carry_the_pinned_key(reg: Registry) -> None:
    from dispatcher.pki.renewal import RenewError, _check_csr_key

    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    reg.register(
        "a", ip="10.0.0.1", cert_serial="1", pubkey_sha256=public_key_sha256(key.public_key())
    )
    d: Any = _D(reg)
    _check_csr_key(d, "a", _csr(key, "a"))  # the agent's own key: fine
    with pytest.raises(RenewError, match="is not the pinned key"):
        _check_csr_key(d, "a", _csr(other, "a"))
    reg.register("b", ip="10.0.0.2")  # unpinned: nothing to compare
    _check_csr_key(d, "b", _csr(other, "b"))


def test_pin_contacts_pins_promotes_and_defers(reg: Registry) -> None:
    from dispatcher.pki.renewal import pin_contacts

    reg.register("old", ip="10.0.0.1")
    reg.register("ren", ip="10.0.0.2", cert_serial="a1", pubkey_sha256="ff")
    reg.update("ren", cert_serial_next="b2")
    reg.register("same", ip="10.0.0.3", cert_serial="c3", pubkey_sha256="ee")
    seen = {"old": ("d4", "dd"), "ren": ("b2", "ff"), "same": ("c3", "ee"), "gone": ("e5", "11")}
    before = {n: reg.get(n) for n in ("old", "ren", "same")}
    follower: Any = _D(reg, refused="not the leader")
    assert pin_contacts(follower, seen) == []  # followers write nothing
    assert {n: reg.get(n) for n in before} == before
    assert pin_contacts(_D(reg), seen, ok={"old", "ren", "same"}) == ["old", "ren"]  # type: ignore[arg-type]
    old, ren = reg.get("old"), reg.get("ren")
    assert old is not None and (old["cert_serial"], old["pubkey_sha256"]) == ("d4", "dd")
    assert ren is not None and (ren["cert_serial"], ren["cert_serial_next"]) == ("b2", "")
    assert reg.get("same") == before["same"]

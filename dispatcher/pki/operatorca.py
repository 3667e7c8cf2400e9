"""The operators' own CA: operators are not agents (DESIGN.md section 3).

* ``ced setup-operator-ca`` (a leader-only action: ``ca_dir`` is replicated) writes
  ``<ca_dir>/operator-ca.key`` (0600) and ``operator-ca.crt``: EC P-256, ``/CN=ctrl-exec
  operator CA``, made by :func:`dispatcher.pki.ca.create_self_signed` like the dispatcher CA.
* ``ced issue-operator NAME [--days N] [--out DIR]`` signs a client certificate for an
  operator or an automation account: a new EC P-256 key, CN = NAME, ``clientAuth`` only
  (no ``serverAuth``: an operator certificate cannot serve as an agent or a dispatcher),
  ``DIR/NAME.crt`` and ``DIR/NAME.key`` (0600) written atomically; existing files are
  never overwritten. It needs only the operator CA key, so it signs locally and writes only
  to ``DIR``; the ``operator-issued`` log line names CN, serial, days and the Unix user.
* The API trusts ``operator-ca.crt`` without further configuration
  (:mod:`dispatcher.api.operatorcerts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.common import logfmt
from agent.common.fsutil import atomic_write
from dispatcher.pki.ca import (
    CA,
    PKIError,
    create_self_signed,
    key_bytes,
    leaf,
    load_ca,
)
from dispatcher.statewrite import StateWriter, default_writer

OPERATOR_CA_CN = "ctrl-exec operator CA"
OPERATOR_CA_CERT = "operator-ca.crt"
OPERATOR_CA_KEY = "operator-ca.key"
DEFAULT_DAYS = 365
MAX_DAYS = 825
# an operator or automation account: a letter or digit first, then letters, digits and
# ``._@-``, at most 64 characters (safe as a file name, a log value and an env value)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def cert_path(ca_dir: str | Path) -> Path:
    return Path(ca_dir) / OPERATOR_CA_CERT


def key_path(ca_dir: str | Path) -> Path:
    return Path(ca_dir) / OPERATOR_CA_KEY


def create_operator_ca(
    ca_dir: str | Path, days: int = 3650, writer: StateWriter | None = None,
    replace: bool = False,
) -> CA:  # fmt: skip
    """Write the operator CA key and cert under ``ca_dir``; refuses to overwrite the key
    unless ``replace`` (``setup-operator-ca --replace``: a new operator CA, so every
    operator certificate the old one issued stops working, as after a suspected
    compromise of ``ca_dir``)."""
    if replace:
        w = writer or default_writer()
        w.delete(key_path(ca_dir))
        w.delete(cert_path(ca_dir))
    return create_self_signed(key_path(ca_dir), cert_path(ca_dir), OPERATOR_CA_CN, days, writer)


def load_operator_ca(ca_dir: str | Path) -> CA:
    return load_ca(ca_dir, key_name=OPERATOR_CA_KEY, setup_verb="setup-operator-ca")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise PKIError(
            f"invalid operator name {name!r}: 1-64 characters, letters, digits and ._@- "
            "(a letter or digit first)"
        )
    return name


@dataclass(frozen=True)
class IssuedOperator:
    cn: str
    serial: str  # lower-case hex
    days: int
    cert: Path
    key: Path


def issue_operator(
    ca_dir: str | Path, name: str, days: int = DEFAULT_DAYS, out_dir: str | Path = ".",
    issued_by: dict[str, str] | None = None,
) -> IssuedOperator:  # fmt: skip
    """Sign a client certificate for ``name``; ``out_dir/name.crt`` and ``.key`` (0600).

    ``issued_by`` (``unix_user``, ``sudo_user``: who ran ``ced``) goes into the
    ``operator-issued`` log line."""
    check_name(name)
    if not 1 <= days <= MAX_DAYS:
        raise PKIError(f"--days must be 1..{MAX_DAYS}, got {days}")
    out = Path(out_dir)
    if not out.is_dir():
        raise PKIError(f"output directory {out} does not exist")
    crt, kp = out / f"{name}.crt", out / f"{name}.key"
    for p in (crt, kp):
        if p.exists():
            raise PKIError(f"{p} already exists; refusing to overwrite it")
    ca = load_operator_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = leaf(ca, key.public_key(), name, days, usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    atomic_write(kp, key_bytes(key), 0o600)
    atomic_write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    serial = format(cert.serial_number, "x")
    fields: dict[str, Any] = {"cn": name, "serial": serial, "days": days, **(issued_by or {})}
    logfmt.event("operator-issued", **fields)
    return IssuedOperator(name, serial, days, crt, kp)

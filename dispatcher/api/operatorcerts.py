"""Who may be an operator: certificates of the operator CA (and ``api_client_ca``), never
an agent's or a dispatcher's (DESIGN.md section 3: operators are not agents).

* :func:`operator_cas`: the CA files the API trusts for operators:
  ``<ca_dir>/operator-ca.crt`` when it exists (no configuration needed) and
  ``api_client_ca`` when set;
* :func:`check_client_ca`: ``api_client_ca`` may not be a CA that signs agents: the
  dispatcher CA (same certificate, or same subject and key) or the issuer of the
  dispatcher certificate is refused at start (a :class:`ConfigError` naming the key's
  ``file:line``, so ``ctrl-exec-api`` exits 78);
* :class:`OperatorTrust`: the operator identity (CN, serial, issuer fingerprint) of a
  verified client certificate, or None when no operator CA issued it (an agent's
  certificate, a peer's dispatcher certificate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent.common.certs import fingerprint
from agent.common.errors import ConfigError
from dispatcher.config import DispatcherConfig
from dispatcher.pki import operatorca

CACHE_MAX = 1024  # identities of recently seen certificates (one verification each)


@dataclass(frozen=True)
class CertIdentity:
    """The identity of a client certificate: what the hook, the logs and records see."""

    cn: str
    serial: str  # lower-case hex
    issuer_fingerprint: str  # SHA256:<hex> of the issuing CA certificate

    def doc(self) -> dict[str, str]:
        return {"cn": self.cn, "serial": self.serial,
                "issuer_fingerprint": self.issuer_fingerprint}  # fmt: skip


def common_name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        return cert.subject.rfc4514_string()
    value = cns[0].value
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _load(path: str | Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def dispatcher_ca_path(cfg: DispatcherConfig) -> Path:
    return Path(cfg.ca) if cfg.ca else Path(cfg.ca_dir) / "ca.crt"


def operator_cas(cfg: DispatcherConfig) -> list[str]:
    """CA files whose certificates name operators (may be empty)."""
    out: list[str] = []
    own = operatorca.cert_path(cfg.ca_dir)
    if own.is_file():
        out.append(str(own))
    if cfg.api_client_ca:
        out.append(cfg.api_client_ca)
    return out


def _public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued(child: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_client_ca(cfg: DispatcherConfig) -> None:
    """Refuse an ``api_client_ca`` that signs agents or the dispatcher (ConfigError)."""
    if not cfg.api_client_ca:
        return
    try:
        candidates = _load(cfg.api_client_ca)
    except (OSError, ValueError) as exc:
        raise cfg.error("api_client_ca", f"cannot read api_client_ca: {exc}") from None
    signers: list[tuple[x509.Certificate, str]] = []
    ca_path = dispatcher_ca_path(cfg)
    try:
        signers += [(c, f"the dispatcher CA {ca_path}") for c in _load(ca_path)]
    except (OSError, ValueError):
        pass  # no dispatcher CA yet: nothing it could have signed
    dispatcher_cert: x509.Certificate | None = None
    try:
        dispatcher_cert = x509.load_pem_x509_certificate(Path(cfg.cert).read_bytes())
    except (OSError, ValueError):
        pass
    for cand in candidates:
        for signer, what in signers:
            same = fingerprint(cand) == fingerprint(signer) or (
                cand.subject == signer.subject and _public_der(cand) == _public_der(signer)
            )
            if same:
                raise cfg.error("api_client_ca", _refusal(cfg, what))
        if dispatcher_cert is not None and _issued(dispatcher_cert, cand):
            what = f"the CA that signed the dispatcher certificate {cfg.cert}"
            raise cfg.error("api_client_ca", _refusal(cfg, what))


def _refusal(cfg: DispatcherConfig, what: str) -> str:
    return (
        f"api_client_ca {cfg.api_client_ca} is {what}, which signs agents: an agent's "
        "certificate would be accepted as an operator's. Operators need their own CA: "
        "run 'ced setup-operator-ca' (trusted without configuration) and remove "
        "api_client_ca, or point it at a CA that signs operators only"
    )


class OperatorTrust:
    """The operator CAs of this API, and the identity of a client certificate."""

    def __init__(self, cas: list[x509.Certificate]) -> None:
        self.cas = [(ca, fingerprint(ca)) for ca in cas]
        self._seen: dict[bytes, CertIdentity | None] = {}

    @classmethod
    def from_config(cls, cfg: DispatcherConfig) -> OperatorTrust:
        certs: list[x509.Certificate] = []
        for path in operator_cas(cfg):
            try:
                certs += _load(path)
            except (OSError, ValueError) as exc:
                key = "api_client_ca" if path == cfg.api_client_ca else "ca_dir"
                raise cfg.error(key, f"cannot read operator CA {path}: {exc}") from None
        return cls(certs)

    def identify(self, der: bytes | None) -> CertIdentity | None:
        """The operator identity of a (TLS-verified) certificate; None if no operator CA
        issued it or there is none."""
        if not der:
            return None
        if der in self._seen:
            return self._seen[der]
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        found: CertIdentity | None = None
        for ca, fp in self.cas:
            if cert.issuer == ca.subject and _issued(cert, ca):
                found = CertIdentity(common_name(cert), format(cert.serial_number, "x"), fp)
                break
        if len(self._seen) >= CACHE_MAX:
            self._seen.clear()
        self._seen[der] = found
        return found


def describe(der: bytes) -> tuple[str, str, str]:
    """CN, hex serial and issuer (RFC 4514) of any certificate, for a refusal's log line."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "?", "?", "?"
    return common_name(cert), format(cert.serial_number, "x"), cert.issuer.rfc4514_string()


def no_trust_problem(cfg: DispatcherConfig) -> ConfigError | None:
    """``api_require_client_cert`` needs TLS and some operator CA to verify against."""
    if not cfg.api_require_client_cert:
        return None
    if not (cfg.api_cert and cfg.api_key):
        return cfg.error("api_require_client_cert",
                         "api_require_client_cert = yes needs api_cert and api_key (TLS)")  # fmt: skip
    if not operator_cas(cfg):
        return cfg.error(
            "api_require_client_cert",
            f"api_require_client_cert = yes but no operator CA: run 'ced setup-operator-ca' "
            f"(writes {operatorca.cert_path(cfg.ca_dir)}) or set api_client_ca",
        )
    return None

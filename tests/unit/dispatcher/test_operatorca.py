"""The operator CA: its files, the certificates it issues, the ced verbs, and how the API
tells an operator's certificate from an agent's (operators are not agents)."""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.common import authhook
from agent.common.certs import fingerprint
from agent.common.errors import ConfigError
from dispatcher.api.operatorcerts import OperatorTrust, check_client_ca, no_trust_problem
from dispatcher.config import DispatcherConfig
from dispatcher.core import Dispatcher
from dispatcher.ha import actions
from dispatcher.operations import Caller
from dispatcher.pki import ca as pki
from dispatcher.pki import operatorca
from dispatcher.runstore import async_record, sync_record


@pytest.fixture
def d(tmp_path: Path) -> Dispatcher:
    conf = tmp_path / "ctrl-exec.conf"
    conf.write_text(
        f"ca_dir = {tmp_path / 'etc'}\nstate_dir = {tmp_path / 'state'}\nlog_target = stderr\n"
    )
    cfg = DispatcherConfig(path=str(conf), ca_dir=str(tmp_path / "etc"),
                           state_dir=str(tmp_path / "state")).finish()  # fmt: skip
    d = Dispatcher(cfg)
    actions.request(d, "setup-ca")
    actions.request(d, "setup-ctrl-exec")
    return d


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def test_setup_operator_ca_is_a_leader_action_and_refuses_to_overwrite(d: Dispatcher) -> None:
    assert actions.lookup("setup-operator-ca").bootstrap
    res = actions.request(d, "setup-operator-ca").data
    key, cert = Path(res["key"]), Path(res["cert"])
    assert key == Path(d.cfg.ca_dir) / "operator-ca.key" and key.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(cert.read_bytes())
    assert ca.subject.rfc4514_string() == "CN=ctrl-exec operator CA"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert res["fingerprint"] == fingerprint(ca)
    before = key.read_bytes()
    with pytest.raises(actions.ActionFailed, match="refusing to overwrite"):
        actions.request(d, "setup-operator-ca")
    assert key.read_bytes() == before


def test_replacing_the_operator_ca_revokes_every_operator_certificate(
    d: Dispatcher, tmp_path: Path
) -> None:
    first = actions.request(d, "setup-operator-ca").data
    out = tmp_path / "out"
    out.mkdir()
    old = operatorca.issue_operator(d.cfg.ca_dir, "alice", 30, out)
    old_der = x509.load_pem_x509_certificate(old.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert OperatorTrust.from_config(d.cfg).identify(old_der) is not None
    with pytest.raises(actions.ActionFailed, match="unknown argument"):
        actions.request(d, "setup-operator-ca", {"replce": True})
    with pytest.raises(actions.ActionFailed, match="wrong type"):
        actions.request(d, "setup-operator-ca", {"replace": "yes"})
    second = actions.request(d, "setup-operator-ca", {"replace": True}).data
    assert second["fingerprint"] != first["fingerprint"]
    assert Path(second["key"]).stat().st_mode & 0o777 == 0o600
    assert (
        OperatorTrust.from_config(d.cfg).identify(old_der) is None
    )  # the old certificate: no operator
    new_out = tmp_path / "new"
    new_out.mkdir()
    new = operatorca.issue_operator(d.cfg.ca_dir, "alice", 30, new_out)
    new_der = x509.load_pem_x509_certificate(new.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    ident = OperatorTrust.from_config(d.cfg).identify(new_der)
    assert ident is not None and ident.cn == "alice"


def test_issue_operator_writes_a_client_only_certificate(d: Dispatcher, tmp_path: Path) -> None:
    actions.request(d, "setup-operator-ca")
    out = tmp_path / "out"
    out.mkdir()
    issued = operatorca.issue_operator(d.cfg.ca_dir, "deploy-bot", 30, out)
    assert issued.cert == out / "deploy-bot.crt" and issued.key.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "deploy-bot"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # never a server (agent) cert
    assert format(cert.serial_number, "x") == issued.serial
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= life <= dt.timedelta(days=30, minutes=6)
    ca = x509.load_pem_x509_certificate(operatorca.cert_path(d.cfg.ca_dir).read_bytes())
    cert.verify_directly_issued_by(ca)
    before = issued.key.read_bytes()
    with pytest.raises(pki.PKIError, match="refusing to overwrite"):
        operatorca.issue_operator(d.cfg.ca_dir, "deploy-bot", 30, out)
    assert issued.key.read_bytes() == before


@pytest.mark.parametrize("name", ["", "-x", "../etc/x", "a b", "x" * 65, "é", ".hidden"])
def test_operator_names_are_checked(d: Dispatcher, tmp_path: Path, name: str) -> None:
    actions.request(d, "setup-operator-ca")
    with pytest.raises(pki.PKIError, match="invalid operator name"):
        operatorca.issue_operator(d.cfg.ca_dir, name, 30, tmp_path)
    assert not list(tmp_path.glob("*.crt"))


def test_issue_operator_needs_the_operator_ca_and_sane_days(d: Dispatcher, tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match="run setup-operator-ca"):
        operatorca.issue_operator(d.cfg.ca_dir, "alice", 30, tmp_path)
    actions.request(d, "setup-operator-ca")
    for days in (0, 826):
        with pytest.raises(pki.PKIError, match="--days"):
            operatorca.issue_operator(d.cfg.ca_dir, "alice", days, tmp_path)
    with pytest.raises(pki.PKIError, match="does not exist"):
        operatorca.issue_operator(d.cfg.ca_dir, "alice", 30, tmp_path / "nowhere")


def _ced(*args: str) -> subprocess.CompletedProcess[str]:
    """``ced`` in its own process (it sets up its log sink; this process keeps its own)."""
    return subprocess.run([sys.executable, "-m", "dispatcher.ced", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SUDO_USER": "carol"})  # fmt: skip


def test_ced_verbs(d: Dispatcher, tmp_path: Path) -> None:
    conf = d.cfg.path
    r = _ced("--config", conf, "setup-operator-ca")
    assert r.returncode == 0 and "operator-ca.crt" in r.stdout, r.stderr
    out = tmp_path / "ops"
    out.mkdir()
    r = _ced(
        "--config", conf, "--json", "issue-operator", "alice", "--days", "7", "--out", str(out)
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["cn"] == "alice" and doc["days"] == 7 and Path(doc["cert"]).exists()
    (line,) = [ln for ln in r.stderr.splitlines() if "ACTION=operator-issued" in ln]
    user = pwd.getpwuid(os.getuid()).pw_name
    for field in ("CN=alice", f"SERIAL={doc['serial']}", "DAYS=7", f"UNIX_USER={user}",
                  "SUDO_USER=carol"):  # fmt: skip
        assert field in line, line
    assert _ced("--config", conf, "issue-operator").returncode == 2  # NAME missing: usage
    before = (Path(d.cfg.ca_dir) / "operator-ca.crt").read_bytes()
    r = _ced("--config", conf, "setup-operator-ca", "--replace", "--yes")
    assert r.returncode == 0 and "Replacing the operator CA" in r.stdout, r.stderr
    assert (Path(d.cfg.ca_dir) / "operator-ca.crt").read_bytes() != before


def _cfg(d: Dispatcher, **kw: str) -> DispatcherConfig:
    return DispatcherConfig(path=d.cfg.path, ca_dir=d.cfg.ca_dir, state_dir=d.cfg.state_dir,
                            **kw).finish()  # type: ignore[arg-type]  # fmt: skip


def test_api_client_ca_that_signs_the_dispatcher_is_refused(d: Dispatcher, tmp_path: Path) -> None:
    actions.request(d, "setup-operator-ca")
    ca_crt = str(Path(d.cfg.ca_dir) / "ca.crt")
    with pytest.raises(ConfigError, match="is the dispatcher CA"):
        check_client_ca(_cfg(d, api_client_ca=ca_crt, cert=d.cfg.cert))
    # the same CA key re-issued under the same name (another certificate, same signer)
    ca = pki.load_ca(d.cfg.ca_dir)
    now = dt.datetime.now(dt.UTC)
    again = (
        x509.CertificateBuilder().subject_name(ca.cert.subject).issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key()).serial_number(12345)  # type: ignore[arg-type]
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )  # fmt: skip
    reissued = tmp_path / "reissued.pem"
    reissued.write_bytes(again.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="is the dispatcher CA"):
        check_client_ca(_cfg(d, api_client_ca=str(reissued), cert=d.cfg.cert))
    # a ``ca`` that points elsewhere: the signer of the dispatcher certificate still shows
    other = pki.create_ca(tmp_path / "other")
    with pytest.raises(ConfigError, match="signed the dispatcher certificate"):
        check_client_ca(_cfg(d, api_client_ca=ca_crt, cert=d.cfg.cert, ca=str(other.cert_path)))
    # the operator CA, or none, is fine
    check_client_ca(_cfg(d, api_client_ca=str(operatorca.cert_path(d.cfg.ca_dir))))
    check_client_ca(_cfg(d))


def test_require_client_cert_needs_tls_and_an_operator_ca(d: Dispatcher) -> None:
    p = no_trust_problem(_cfg(d, api_require_client_cert=True))  # type: ignore[arg-type]
    assert p is not None and "needs api_cert and api_key" in str(p)
    tls = {"api_cert": d.cfg.cert, "api_key": d.cfg.key}
    p = no_trust_problem(_cfg(d, api_require_client_cert=True, **tls))  # type: ignore[arg-type]
    assert p is not None and "setup-operator-ca" in str(p)
    actions.request(d, "setup-operator-ca")
    assert no_trust_problem(_cfg(d, api_require_client_cert=True, **tls)) is None  # type: ignore[arg-type]


def test_only_operator_ca_certificates_name_an_operator(d: Dispatcher, tmp_path: Path) -> None:
    actions.request(d, "setup-operator-ca")
    trust = OperatorTrust.from_config(d.cfg)
    issued = operatorca.issue_operator(d.cfg.ca_dir, "alice", 30, tmp_path)
    who = trust.identify(_der(issued.cert))
    op_ca = x509.load_pem_x509_certificate(operatorca.cert_path(d.cfg.ca_dir).read_bytes())
    assert who is not None and who.doc() == {
        "cn": "alice", "serial": issued.serial, "issuer_fingerprint": fingerprint(op_ca)
    }  # fmt: skip
    assert trust.identify(_der(Path(d.cfg.cert))) is None  # the dispatcher's own
    # an agent's (dispatcher CA) and one from a CA that only copies the operator CA's name
    key = ec.generate_private_key(ec.SECP256R1())
    agent = pki.leaf(pki.load_ca(d.cfg.ca_dir), key.public_key(), "web1", 30)
    assert trust.identify(agent.public_bytes(serialization.Encoding.DER)) is None
    fake = pki.create_self_signed(tmp_path / "f.key", tmp_path / "f.crt", "ctrl-exec operator CA")
    forged = pki.leaf(fake, key.public_key(), "alice", 30)
    assert trust.identify(forged.public_bytes(serialization.Encoding.DER)) is None
    assert trust.identify(None) is None and trust.identify(b"junk") is None


def test_identity_reaches_the_hook_context_and_run_records() -> None:
    api = Caller("api", username="alice", identity="alice", cert_serial="ab",
                 issuer_fingerprint="SHA256:00")  # fmt: skip
    ctx = authhook.build_context("run", username=api.username, identity=api.identity_doc())
    assert ctx["identity"] == {"cn": "alice", "serial": "ab", "issuer_fingerprint": "SHA256:00"}
    env = authhook.build_env(ctx, base={})
    assert env["ENVEXEC_IDENTITY"] == "alice" and env["ENVEXEC_USERNAME"] == "alice"
    anon = authhook.build_context("run")
    assert anon["identity"] is None and authhook.build_env(anon, {})["ENVEXEC_IDENTITY"] == ""
    rec = sync_record("r1", "s", ["h"], [], {"username": "alice", "source_ip": "x"},
                      attribution=api.attribution())  # fmt: skip
    assert rec["identity"]["cn"] == "alice" and rec["submitter"]["username"] == "alice"
    cli = Caller("cli", username="bob", identity="root", sudo_user="bob")
    assert cli.attribution() == {"unix_user": "root", "sudo_user": "bob"}
    assert cli.identity_doc() == {"cn": "root", "serial": "", "issuer_fingerprint": "",
                                  "sudo_user": "bob"}  # fmt: skip
    rec = async_record("r2", "s", [{"host": "h", "status": "accepted"}],
                       attribution={**cli.attribution(), "reqid": "forged", "mode": "x"})  # fmt: skip
    assert rec["unix_user"] == "root" and rec["reqid"] == "r2" and rec["mode"] == "async"


def test_a_new_operator_ca_makes_members_restart(d: Dispatcher) -> None:
    """The API loads the operator CA into its TLS trust store at start: one arriving by
    replication is loaded material that differs (``restart_pending``)."""
    from dispatcher.ha.manifest import material

    before = material(d.cfg)
    assert before["operator_ca"] == "-"
    actions.request(d, "setup-operator-ca")
    after = material(d.cfg)
    assert after["operator_ca"] != "-" and after != before


def test_check_config_names_the_api_client_ca_line(d: Dispatcher) -> None:
    from dispatcher.config import check

    conf = Path(d.cfg.path)
    ca_crt = Path(d.cfg.ca_dir) / "ca.crt"
    conf.write_text(conf.read_text() + f"api_cert = {d.cfg.cert}\napi_key = {d.cfg.key}\n"
                    f"api_client_ca = {ca_crt}\n")  # fmt: skip
    problems = check(str(conf))
    assert [p for p in problems if p.startswith(f"{conf}:6: api_client_ca {ca_crt} is the ")]

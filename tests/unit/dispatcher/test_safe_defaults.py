"""Multi-host defaults: the API certificate names the host (or ``api_names``), the
config path comes from ``$CTRL_EXEC_CONFIG``, and a plain-HTTP API that other hosts reach
is warned about."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from dispatcher.config import instance_warnings, load
from dispatcher.pki import ca as pki
from dispatcher.pki.names import cert_names, host_names, san_entries

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ctrl-exec.conf"
    path.write_text(f"state_dir = {tmp_path}/state\nca_dir = {tmp_path}/ca\n{text}")
    return path


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def test_the_dispatcher_certificate_carries_api_names(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, "api_names = ctrl-exec.example.org, disp1.example.org,"
                                   " 192.0.2.10, CTRL-EXEC.example.org.\n")))  # fmt: skip
    assert cert_names(cfg) == [pki.DISPATCHER_CN, "ctrl-exec.example.org", "disp1.example.org",
                               "192.0.2.10", "CTRL-EXEC.example.org."]  # fmt: skip
    ca = pki.create_ca(tmp_path / "ca")
    cert = pki.issue_dispatcher_cert(ca, tmp_path / "d.crt", tmp_path / "d.key",
                                     names=cert_names(cfg))  # fmt: skip
    # lower-cased, without the trailing dot, without duplicates; addresses as IP entries
    assert sans(cert) == [pki.DISPATCHER_CN, "ctrl-exec.example.org", "disp1.example.org",
                          "192.0.2.10"]  # fmt: skip
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        pki.DISPATCHER_CN)  # fmt: skip


def test_without_api_names_the_certificate_names_this_host(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, "")))
    names = cert_names(cfg)
    assert names == [pki.DISPATCHER_CN, *host_names()]
    assert socket.getfqdn() in names or socket.gethostname() in names
    for n in names[1:]:
        if n[0].isdigit() or ":" in n:
            assert not ipaddress.ip_address(n).is_loopback


def test_san_entries() -> None:
    assert san_entries(["a.example", "A.example.", "::1", "10.0.0.1", "10.0.0.1"]) == [
        ("dns", "a.example"), ("ip", "::1"), ("ip", "10.0.0.1")]  # fmt: skip


def test_a_plain_http_api_on_the_network_is_warned_about(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, "api_bind = 0.0.0.0\n")))
    (warning,) = instance_warnings(cfg)
    assert f"{cfg.path}:3: the API listens on 0.0.0.0 in plain HTTP" in warning
    assert instance_warnings(load(str(write(tmp_path, "api_bind = 127.0.0.1\n")))) == []
    assert instance_warnings(load(str(write(tmp_path, "")))) == []  # default: loopback


def test_ctrl_exec_config_in_the_environment(tmp_path: Path) -> None:
    bad = write(tmp_path, "etcd_endpiont = x\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), CTRL_EXEC_CONFIG=str(bad))
    for argv in ([sys.executable, "-m", "dispatcher.ced", "check-config"],
                 [sys.executable, "-m", "dispatcher.api.daemon", "--check-config"],
                 [sys.executable, "-m", "dispatcher.ced", "list-agents"]):  # fmt: skip
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode in (2, 78), (argv, p.stderr)
        assert f"{bad}:3: unknown key 'etcd_endpiont'" in p.stderr, (argv, p.stderr)


def test_check_config_prints_the_warning_and_passes(tmp_path: Path) -> None:
    path = write(tmp_path, "api_bind = 0.0.0.0\n")
    p = subprocess.run([sys.executable, "-m", "dispatcher.api.daemon", "--check-config",
                        "--config", str(path)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stderr and "plain HTTP" in p.stderr

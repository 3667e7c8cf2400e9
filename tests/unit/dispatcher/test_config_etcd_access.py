"""etcd access keys: plain HTTP only on loopback unless ``etcd_insecure``, ``etcd_user``
with ``etcd_password_file``, a password file nobody else reads (docs/trust-model.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from cluster.credentials import PasswordFileError, read_password_file
from dispatcher.config import check, instance_problems, load
from dispatcher.ha.coordination import etcd_password

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ctrl-exec.conf"
    path.write_text(f"# ctrl-exec.conf\nstate_dir = {tmp_path}/state\n{text}")
    return str(path)


def error_of(path: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(path)
    return str(err.value)


def secret(tmp_path: Path, mode: int = 0o600, text: str = "s3cret\n") -> Path:
    path = tmp_path / "etcd.password"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "endpoints",
    ["http://10.0.0.5:2379", "10.0.0.5:2379", "https://10.0.0.4:2379, http://etcd2.example.net"],
)
def test_plain_http_off_loopback_is_an_error(tmp_path: Path, endpoints: str) -> None:
    path = write(tmp_path, f"cluster_name = c\netcd_endpoints = {endpoints}\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:4: etcd endpoint ")
    assert "is plain HTTP on a non-loopback address" in msg and "etcd_insecure = yes" in msg


def test_etcd_insecure_accepts_plain_http(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "etcd_endpoints = http://10.0.0.5:2379\netcd_insecure = yes\n"))
    assert cfg.etcd_insecure is True and cfg.etcd_endpoints == ["http://10.0.0.5:2379"]


@pytest.mark.parametrize(
    "endpoints",
    ["http://127.0.0.1:2379", "localhost:2379", "http://[::1]:2379", "https://10.0.0.5:2379"],
)
def test_loopback_or_tls_needs_no_insecure(tmp_path: Path, endpoints: str) -> None:
    assert load(write(tmp_path, f"etcd_endpoints = {endpoints}\n")).etcd_insecure is False


def test_user_and_password_file_go_together(tmp_path: Path) -> None:
    base = "etcd_endpoints = https://10.0.0.5:2379\n"
    path = write(tmp_path, base + "etcd_user = ctrl-exec\n")
    assert error_of(path) == (
        f"{path}:4: etcd_user needs etcd_password_file (a file whose first line is the "
        "password, mode 0600)"
    )
    path = write(tmp_path, base + f"etcd_password_file = {tmp_path}/p\n")
    assert error_of(path) == f"{path}:4: etcd_password_file needs etcd_user"


def test_a_readable_password_file_is_refused_naming_its_line(tmp_path: Path) -> None:
    pw = secret(tmp_path, 0o644)
    text = f"etcd_endpoints = https://10.0.0.5:2379\netcd_user = ce\netcd_password_file = {pw}\n"
    path = write(tmp_path, text)
    cfg = load(path)  # ced on an operator host may not read it: checked for an instance only
    problems = [str(p) for p in instance_problems(cfg)]
    want = f"{path}:5: etcd_password_file: {pw} is accessible by others (mode 0644)"
    assert any(p.startswith(want) for p in problems), problems
    assert any(p.startswith(want) for p in check(path))
    with pytest.raises(ConfigError) as err:  # where the backend is built, the same error
        etcd_password(cfg)
    assert str(err.value).startswith(want)
    pw.chmod(0o640)  # owner and service group: fine
    assert etcd_password(cfg) == "s3cret"
    assert not [p for p in check(path) if "etcd_password_file" in p]


def test_missing_and_empty_password_files(tmp_path: Path) -> None:
    with pytest.raises(PasswordFileError, match="cannot read"):
        read_password_file(str(tmp_path / "nope"))
    with pytest.raises(PasswordFileError, match="is empty"):
        read_password_file(str(secret(tmp_path, text="\n")))
    with pytest.raises(PasswordFileError, match="not a regular file"):
        read_password_file(str(tmp_path))
    assert read_password_file(str(secret(tmp_path, text="pw with spaces \nsecond\n"))) == (
        "pw with spaces "
    )


def test_missing_etcd_tls_files_are_instance_problems(tmp_path: Path) -> None:
    text = (f"etcd_endpoints = https://127.0.0.1:2379\netcd_cacert = {tmp_path}/ca.crt\n"
            f"etcd_cert = {tmp_path}/c.crt\netcd_key = {tmp_path}/c.key\n")  # fmt: skip
    path = write(tmp_path, text)
    problems = [str(p) for p in instance_problems(load(path))]
    for line, key in ((4, "etcd_cacert"), (5, "etcd_cert"), (6, "etcd_key")):
        want = f"{path}:{line}: {key} {getattr(load(path), key)} does not exist"
        assert want in problems, problems


def test_check_config_reports_them_and_exits_78(tmp_path: Path) -> None:
    pw = secret(tmp_path, 0o604)
    text = (f"etcd_endpoints = http://10.0.0.5:2379\netcd_user = ce\n"
            f"etcd_password_file = {pw}\n")  # fmt: skip
    path = write(tmp_path, text)
    for argv in (
        [sys.executable, "-m", "dispatcher.api.daemon", "--check-config", "--config", path],
        [sys.executable, "-m", "dispatcher.ced", "check-config", "--config", path],
    ):
        p = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=60)
        assert p.returncode == 78, p.stderr
        assert f"{path}:3: etcd endpoint http://10.0.0.5:2379 is plain HTTP" in p.stderr
        assert "Traceback" not in p.stderr
    path = write(tmp_path, text.replace("http://", "https://"))
    p = subprocess.run([sys.executable, "-m", "dispatcher.api.daemon", "--check-config",
                        "--config", path], capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip
    assert p.returncode == 78
    assert f"{path}:5: etcd_password_file: {pw} is accessible by others (mode 0604)" in p.stderr

"""Profile parsing and checks (``[profile NAME]`` of agent.conf) and who may run what."""

from __future__ import annotations

import os
import pwd
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import profiles
from agent.common.errors import ConfigError
from agent.config import load

BASE = "port = 7443\ncert = /c.crt\nkey = /c.key\nca = /ca.crt\n"


def _load(tmp_path: Path, text: str) -> tuple[str, dict[str, profiles.Profile], list[str]]:
    p = tmp_path / "agent.conf"
    p.write_text(BASE + "executor_socket = /run/x.sock\n" + text)
    cfg = load(str(p))
    return str(p), cfg.profile_defs, cfg.warnings


def test_full_profile(tmp_path: Path) -> None:
    _, defs, warnings = _load(
        tmp_path,
        "[profile web]\nrun_as = www-data\ncaps = CAP_NET_BIND_SERVICE, CAP_CHOWN CAP_CHOWN\n"
        "writable = /var/www:/srv//x/\nno_new_privileges = no\nsandbox = 1\n[profile default]\n",
    )
    web = defs["web"]
    assert web == profiles.Profile(
        "web", "www-data", ("CAP_NET_BIND_SERVICE", "CAP_CHOWN"), ("/var/www", "/srv/x"), False
    )
    assert defs["default"] == profiles.Profile("default")  # root, no caps, nnp on
    assert any("profile 'web': unknown key 'sandbox' ignored" in w for w in warnings)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("run_as = 1bad", "invalid run_as '1bad'"),
        ("run_as = a b", "invalid run_as 'a b'"),
        ("run_as = 4294967296", "run_as uid 4294967296 is out of range"),
        ("caps = NET_ADMIN", "invalid capability 'NET_ADMIN' (expected CAP_*)"),
        ("caps = CAP_FLY", "unknown capability 'CAP_FLY'"),
        ("writable = /ok:relative", "writable path must be absolute: 'relative'"),
    ],
)
def test_bad_values_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "agent.conf"
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, f"[profile p]\n{line}\n")
    assert str(exc.value) == f"{path}:7: profile 'p': {message}"


@pytest.mark.parametrize(("value", "on"), [("1", True), ("yes", True), ("ON", True),
                                           ("0", False), ("off", False), ("", False)])  # fmt: skip
def test_no_new_privileges_values(tmp_path: Path, value: str, on: bool) -> None:
    _, defs, _ = _load(tmp_path, f"[profile p]\nno_new_privileges = {value}\n")
    assert defs["p"].no_new_privileges is on


def test_uid_bounds_accept_the_largest(tmp_path: Path) -> None:
    _, defs, _ = _load(tmp_path, "[profile p]\nrun_as = 4294967295\n")
    assert defs["p"].run_as == "4294967295"


def test_undefined_profiles_are_listed() -> None:
    defs = {"default": profiles.Profile("default")}
    assert profiles.undefined({"a": "default", "b": "web"}, defs) == [
        "script 'b': profile 'web' is not defined in agent.conf"
    ]


def test_resolve_user() -> None:
    root = profiles.resolve_user("")
    assert (root.name, root.uid, root.gid) == ("root", 0, 0)
    nobody = profiles.resolve_user("nobody")
    assert nobody.uid == pwd.getpwnam("nobody").pw_uid and nobody.gid in nobody.groups
    assert profiles.resolve_user("0").name == "root"
    ghost = profiles.resolve_user("3999999999")  # no passwd entry: gid = uid, as upstream
    assert (ghost.uid, ghost.gid, ghost.groups) == (3999999999, 3999999999, (3999999999,))
    with pytest.raises(KeyError, match="unknown run_as user 'no-such-user-x'"):
        profiles.resolve_user("no-such-user-x")


def _user(uid: int, gid: int, groups: tuple[int, ...] = ()) -> profiles.RunAs:
    return profiles.RunAs("u", uid, gid, (gid, *groups))


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own temp root is 0700)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def test_can_execute_follows_mode_bits(open_dir: Path) -> None:
    d = open_dir / "d"
    d.mkdir()
    script = d / "s.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    binary = d / "b"
    binary.write_bytes(b"\x7fELF")
    owner = os.stat(script).st_uid
    other = _user(owner + 12345, 54321)
    script.chmod(0o755)
    d.chmod(0o755)
    assert profiles.can_execute(str(script), other) == ""
    script.chmod(0o711)  # an interpreter must read a #! script
    assert "no read and execute permission" in profiles.can_execute(str(script), other)
    binary.chmod(0o711)  # a binary needs execute only
    assert profiles.can_execute(str(binary), other) == ""
    script.chmod(0o750)
    group_member = _user(owner + 12345, 54321, (os.stat(script).st_gid,))
    assert profiles.can_execute(str(script), group_member) == ""
    assert profiles.can_execute(str(script), other) != ""
    script.chmod(0o755)
    d.chmod(0o700)
    assert profiles.can_execute(str(script), other) == f"directory {d} is not searchable"
    d.chmod(0o755)
    assert profiles.can_execute(str(d / "missing"), other) == "No such file or directory"
    root = _user(0, 0)
    script.chmod(0o644)
    assert profiles.can_execute(str(script), root, dac_override=True) != ""  # needs an x bit
    script.chmod(0o700)
    assert profiles.can_execute(str(script), _user(owner, 0)) == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_without_dac_override_is_bound_by_mode_bits(open_dir: Path) -> None:
    script = open_dir / "s.sh"
    script.write_text("#!/bin/sh\n")
    os.chown(script, 4242, 4242)
    script.chmod(0o700)
    root = _user(0, 0)
    assert profiles.can_execute(str(script), root) == (
        "no read and execute permission (mode 0700, owner 4242:4242)"
    )
    assert profiles.can_execute(str(script), root, dac_override=True) == ""


def test_describe() -> None:
    p = profiles.Profile("p", "nobody", ("CAP_KILL",), ("/srv",), True)
    assert (
        profiles.describe(p)
        == "run_as nobody, caps CAP_KILL, writable /srv and /tmp, no_new_privileges"
    )
    assert "run_as root, caps none, writable: all but" in profiles.describe(profiles.Profile("q"))

from __future__ import annotations

from pathlib import Path

import pytest

from agent.common import kvconf
from agent.common.errors import ConfigError
from agent.config import load


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "agent.conf"
    p.write_text(text)
    return str(p)


BASE = "port = 7443\ncert = /c.crt\nkey = /c.key\nca = /ca.crt\n"


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE))
    assert cfg.port == 7443 and cfg.bind == "0.0.0.0"
    assert cfg.trusted_dispatchers_path == "/var/lib/ctrl-exec-agent/ctrl-exec-dispatchers"
    assert cfg.rate_limit_volume.limit == 10 and not cfg.rate_limit_disable


def test_state_dir_sets_defaults_explicit_keys_win(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE + "state_dir = /s\nasync_runs_dir = /r\n"))
    assert cfg.trusted_dispatchers_path == "/s/ctrl-exec-dispatchers"
    assert cfg.async_runs_dir == "/r"
    assert cfg.cert_staging_path == "/s/agent.crt.staged"


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "\n# fine\nthis is not a pair\n")
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert f"{path}:7:" in str(exc.value)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Missing 'ca'"):
        load(_write(tmp_path, "port = 1\ncert = a\nkey = b\n"))


def test_bad_port_and_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=":1:"):
        load(_write(tmp_path, BASE.replace("7443", "99999")))
    with pytest.raises(ConfigError, match="stdin_timeout"):
        load(_write(tmp_path, BASE + "stdin_timeout = soon\n"))
    with pytest.raises(ConfigError, match="rate_limit_volume"):
        load(_write(tmp_path, BASE + "rate_limit_volume = 10/60\n"))


def test_inline_hash_is_part_of_value(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE + "[tags]\nrole = web # not a comment\n"))
    assert cfg.tags == {"role": "web # not a comment"}


def test_unknown_key_warns_with_suggestion(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE + "rate_limit_disabel = 1\n"))
    assert any("did you mean 'rate_limit_disable'" in w for w in cfg.warnings)
    assert not cfg.rate_limit_disable


def test_executor_socket_is_taken_and_must_be_absolute(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE + "executor_socket = /run/x.sock\n[profile default]\n"))
    assert cfg.executor_socket == "/run/x.sock" and "default" in cfg.profile_defs
    assert not any("inert" in w for w in cfg.warnings)
    path = _write(tmp_path, BASE + "executor_socket = run/x.sock\n")
    with pytest.raises(ConfigError, match=f"^{path}:5: executor_socket must be an absolute"):
        load(path)


def test_profiles_without_executor_are_inert_with_a_warning(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE + "[profile default]\nrun_as = nobody\n"))
    assert cfg.executor_socket == ""
    assert any("profiles are inert without executor_socket" in w for w in cfg.warnings)


def test_auth_hook_must_be_executable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth_hook"):
        load(_write(tmp_path, BASE + f"auth_hook = {tmp_path}/nope\n"))


def test_allowed_ips_bad_entries_dropped(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE + "allowed_ips = 10.0.0.0/8, bogus, 127.0.0.1\n"))
    assert cfg.allowed_ips is not None and len(cfg.allowed_ips) == 2
    assert any("bogus" in w for w in cfg.warnings)


def test_profiles_and_sections(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE + "[profile default]\nrun_as = nobody\n[other]\nx = 1\n"))
    assert cfg.profiles == {"default": {"run_as": "nobody"}}


def test_flat_dialect_ignores_indented_lines() -> None:
    out = kvconf.parse_flat("a = 1\n  b = 2\n\t# c\n#d = 4\ne=5\n", "f")
    assert out == {"a": (1, "1"), "e": (5, "5")}
    with pytest.raises(ConfigError, match="f:2:"):
        kvconf.parse_flat("a = 1\nnope\n", "f")


def test_is_true() -> None:
    assert kvconf.is_true("1") and kvconf.is_true("yes") and kvconf.is_true("Y")
    assert not kvconf.is_true("0") and not kvconf.is_true("no") and not kvconf.is_true(None)


def test_connection_slot_keys(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, BASE))
    assert (cfg.max_conns_per_ip, cfg.dispatcher_reserved_slots) == (8, 16)
    cfg = load(_write(tmp_path, BASE + "max_children = 10\nmax_conns_per_ip = 0\n"))
    assert (cfg.max_conns_per_ip, cfg.dispatcher_reserved_slots) == (0, 2)  # default scaled
    path = _write(tmp_path, BASE + "max_children = 10\ndispatcher_reserved_slots = 10\n")
    with pytest.raises(ConfigError, match=r":\d+: dispatcher_reserved_slots \(10\) must be below"):
        load(path)

"""``ced``'s entry point and its server's request format (:mod:`dispatcher.ced.entry`,
:func:`dispatcher.ced.cmdserver.decode_request`), without processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispatcher.ced import entry
from dispatcher.ced.cmdserver import decode_request


def test_a_request_carries_arguments_and_environment_exactly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    odd = ["", "two words", "a=b", "line\nbreak", "tab\tx", "caf\udce9", "--", "-"]
    monkeypatch.setenv("WITH_EQUALS", "x=y=z")
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.chdir(tmp_path)
    raw = entry.encode_request(odd)
    size = int.from_bytes(raw[:4], "big")
    assert size == len(raw) - 4
    cwd, umask, argv, env = decode_request(raw[4:])
    assert argv == odd
    assert cwd == str(tmp_path)
    assert env["WITH_EQUALS"] == "x=y=z" and env["EMPTY"] == ""
    assert env == dict(os.environ)
    mask = os.umask(0)
    os.umask(mask)
    assert umask == mask


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b.replace(entry.PROTOCOL.encode(), b"ced-cmd/0", 1),  # another protocol
        lambda b: b.replace(b"\n", b"\n/elsewhere", 1),  # another server key
        lambda b: b[: b.index(b"\0", b.index(b"\0") + 1)],  # cut short
        lambda b: b"",
    ],
)
def test_a_request_not_ours_is_refused(mangle: object) -> None:
    body = entry.encode_request(["ping", "web1"])[4:]
    with pytest.raises(ValueError):
        decode_request(mangle(body))  # type: ignore[operator]


def test_the_argument_count_must_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", {})
    body = entry.encode_request(["ping", "web1"])[4:]
    fields = body.split(b"\0")
    fields[4] = b"3"  # claims one argument more than it carries
    with pytest.raises(ValueError, match="truncated"):
        decode_request(b"\0".join(fields))


def test_the_socket_lives_in_a_private_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(rt))
    path = entry.socket_path(make=True)
    assert path is not None and path.startswith(f"{rt}/ctrl-exec/ced-")
    assert (rt / "ctrl-exec").stat().st_mode & 0o777 == 0o700
    # an XDG_RUNTIME_DIR others can write to is not used
    rt.chmod(0o777)
    other = entry.runtime_dir(make=False)
    assert other is None or not other.startswith(str(rt))


def test_the_key_names_the_interpreter_code_and_place() -> None:
    key = entry.server_key()
    assert entry.code_root() in key
    if os.path.exists("/proc/self/ns/net"):
        assert os.readlink("/proc/self/ns/net") in key


def test_a_socket_path_too_long_for_sun_path_means_no_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    deep.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    assert entry.socket_path(make=True) is None  # ced runs every command itself


def test_a_ced_under_interpreter_options_runs_its_command_itself() -> None:
    import subprocess
    import sys

    code = "from dispatcher.ced.entry import _special_interpreter as s; print(s())"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": entry.code_root()}
    for opts, expect in (([], "False"), (["-X", "importtime"], "True"), (["-W", "error"], "True"),
                         (["-O"], "True")):  # fmt: skip
        p = subprocess.run([sys.executable, *opts, "-c", code], env=env, capture_output=True,
                           text=True, check=True)  # fmt: skip
        assert p.stdout.strip() == expect, opts

"""``agent.common.sdnotify``: the readiness datagram systemd's ``Type=notify`` waits for."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.common import sdnotify


def test_sends_states_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1", "STATUS=listening") is True
        assert s.recv(4096) == b"READY=1\nSTATUS=listening"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ctrl-exec-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert s.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "relative/path"])
def test_nothing_without_a_usable_socket(
    value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_a_gone_socket_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("READY=1") is False


def test_units_wait_for_readiness() -> None:
    units = Path(__file__).resolve().parents[2] / "ops" / "systemd"
    for name in ("ctrl-exec-agent", "ctrl-exec-executor", "ctrl-exec-api"):
        text = (units / f"{name}.service").read_text()
        assert "\nType=notify\n" in text, name

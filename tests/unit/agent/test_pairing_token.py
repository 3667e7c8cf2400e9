"""Where ``request-pairing`` takes its pairing token from, and what it refuses."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent.pairing import TOKEN_ENV, PairingError, read_token

TOKEN = "cet1.0123456789." + "A" * 43


def test_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert read_token(str(f), None, {}) == TOKEN
    monkeypatch.setattr("sys.stdin", io.StringIO(TOKEN + "\nmore\n"))
    assert read_token(None, "-", {}) == TOKEN
    assert read_token(None, None, {TOKEN_ENV: f" {TOKEN} "}) == TOKEN
    assert read_token(None, None, {}) == ""  # no token: upstream's pairing


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(PairingError, match="visible to other users"):
        read_token(None, TOKEN, {})
    with pytest.raises(PairingError, match="not both"):
        read_token(str(tmp_path / "t"), "-", {})
    with pytest.raises(PairingError, match="cannot read"):
        read_token(str(tmp_path / "missing"), None, {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(PairingError, match="empty"):
        read_token(str(empty), None, {})
    two = tmp_path / "two"
    two.write_text("a b\n")
    with pytest.raises(PairingError, match="malformed"):
        read_token(str(two), None, {})
    with pytest.raises(PairingError, match="malformed"):
        read_token(None, None, {TOKEN_ENV: "x" * 300})

"""Pairing-mode text and command parsing (spec 5.4)."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.pairing.prompt import (
    SINGLE_PROMPT,
    Command,
    format_list,
    format_request,
    format_table,
    parse_command,
    prompt,
    recommendation,
)


def _rec(**kw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": "0123456789abcdef", "hostname": "web1.example.net", "ip": "10.0.0.5",
        "source_ip": "10.0.0.5", "code": "042917", "received": "2026-01-02T03:04:05Z",
        "reverse_dns": "web1.example.net", "reverse_confirmed": 1, "lookup_by": None,
        "port": 7443, "csr": "x", "nonce": "n",
    }  # fmt: skip
    rec.update(kw)
    return rec


def test_announcement() -> None:
    lines = format_request(_rec())
    assert lines[0] == "Pairing request from web1.example.net (10.0.0.5) - ID: 0123456789abcdef"
    assert lines[1] == "  Code: 042917"
    assert "  Received: 2026-01-02T03:04:05Z" in lines
    assert "  Reported name: web1.example.net" in lines
    assert "  Source IP: 10.0.0.5" in lines
    assert not any(x.startswith("  Reported IP") for x in lines)
    assert "  Reverse DNS: web1.example.net (forward-confirmed)" in lines
    assert "lookup_by=hostname is safe" in lines[-1]


def test_announcement_reported_ip_and_unconfirmed_dns() -> None:
    lines = format_request(_rec(ip="192.0.2.4", reverse_dns="", reverse_confirmed=0,
                                lookup_by="ip"))  # fmt: skip
    assert lines[0].startswith("Pairing request from web1.example.net (192.0.2.4)")
    assert "  Reported IP: 192.0.2.4" in lines
    assert "  Reverse DNS: (none)" in lines
    assert "  Agent hints: lookup_by=ip port=7443" in lines
    assert "--lookup-by ip" in lines[-1]
    unconf = format_request(_rec(reverse_confirmed=0))
    assert "  Reverse DNS: web1.example.net (NOT forward-confirmed)" in unconf
    assert "other.example" in recommendation(_rec(reverse_dns="other.example"))


def test_prompts() -> None:
    assert prompt(1) == SINGLE_PROMPT == "Accept, Deny, or Skip? [a/d/s]: "
    assert prompt(2) == "Command (a1/d1/a2/d2/list/quit): "
    assert prompt(3).startswith("Command (a1/d1/a2/d2/a3/d3/")


@pytest.mark.parametrize(
    ("line", "pending", "want"),
    [
        ("a", 1, Command("approve", 0)),
        ("d", 1, Command("deny", 0)),
        (" A ", 1, Command("approve", 0)),
        ("a2", 3, Command("approve", 1)),
        ("d3", 3, Command("deny", 2)),
        ("s", 1, Command("skip")),
        ("skip", 2, Command("skip")),
        ("l", 2, Command("list")),
        ("list", 0, Command("list")),
        ("q", 2, Command("quit")),
        ("quit", 1, Command("quit")),
    ],
)
def test_parse_valid(line: str, pending: int, want: Command) -> None:
    assert parse_command(line, pending) == want


@pytest.mark.parametrize(
    ("line", "pending", "error"),
    [
        ("a", 2, "say which"),
        ("d", 3, "say which"),
        ("a4", 3, "no request number 4"),
        ("a0", 3, "no request number 0"),
        ("a", 0, "no pending"),
        ("ax", 2, "unknown command"),
        ("x", 1, "unknown command"),
        ("approve", 1, "unknown command"),
        ("", 1, "no command"),
    ],
)
def test_parse_invalid(line: str, pending: int, error: str) -> None:
    cmd = parse_command(line, pending)
    assert cmd.action == "invalid" and cmd.index is None
    assert error in cmd.error


def test_lists() -> None:
    recs = [_rec(), _rec(id="fedcba9876543210", hostname="db1", code="000001",
                         reverse_confirmed=0)]  # fmt: skip
    lines = format_list(recs)
    assert lines[1] == ("  1. web1.example.net (10.0.0.5)  code 042917  ID: 0123456789abcdef")
    assert lines[2].startswith("  2. db1 ")
    assert format_list([]) == ["No pending pairing requests."]
    table = format_table(recs)
    assert table[0].split() == ["ID", "CSR", "CN", "REGISTER", "IP", "SOURCE", "IP",
                                "REGISTERED", "REVERSE", "DNS", "CODE"]  # fmt: skip
    assert "web1.example.net *" in table[3]
    assert table[2].split()[-1] == "042917"


def test_table_and_announcement_show_what_approval_does() -> None:
    described = _rec(csr_cn="web1.example.net", approve_ip="192.0.2.4", source_ip="10.0.0.5",
                     registered=True, registered_ip="10.0.0.7",
                     ip_registered_to=["db1.example.net"])  # fmt: skip
    row = format_table([described])[2]
    cols = row.split()
    assert cols[:6] == ["0123456789abcdef", "web1.example.net", "192.0.2.4", "!", "10.0.0.5",
                        "yes"]  # fmt: skip
    assert "(10.0.0.7)" in row
    lines = format_request(described)
    assert "  Certificate CN: web1.example.net" in lines
    assert "  Approval registers IP: 192.0.2.4" in lines
    assert "  Already registered: yes (10.0.0.7)" in lines
    assert "  WARNING: 192.0.2.4 is registered to: db1.example.net" in lines
    fresh = format_table([_rec(csr_cn="web1.example.net", approve_ip="10.0.0.5",
                               registered=False, registered_ip=None, ip_registered_to=[])])  # fmt: skip
    assert fresh[2].split()[4] == "no"


def test_agent_supplied_text_cannot_paint_the_terminal() -> None:
    evil = _rec(reverse_dns="x\x1b[2J\nApproved!", hostname="h\u202eevil")
    for line in [*format_request(evil), *format_table([evil]), *format_list([evil])]:
        assert "\x1b" not in line and "\n" not in line and "\u202e" not in line

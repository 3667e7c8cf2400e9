"""Text and command parsing for ``ced pairing-mode`` (spec 5.4) and ``list-requests``.

Pure functions over queue records (the dicts :mod:`dispatcher.pairing.queue` writes, plus
what :func:`dispatcher.pairing.queue.describe` adds: ``csr_cn``, ``approve_ip``,
``registered``, ``registered_ip``, ``ip_registered_to``), so the interactive loop itself
stays a thin shell around them. Every value an agent or DNS supplied is shown with control
and invisible characters escaped, so a request cannot paint over the operator's terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from agent.common.logfmt import escape_text

Action = Literal["approve", "deny", "skip", "list", "quit", "invalid"]

SINGLE_PROMPT = "Accept, Deny, or Skip? [a/d/s]: "


@dataclass(frozen=True)
class Command:
    action: Action
    index: int | None = None  # 0-based position in the pending list (approve/deny)
    error: str = ""


def _s(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return "" if value is None else escape_text(str(value))


def _registered(record: dict[str, Any]) -> str:
    """``no``, ``yes (<ip>)``, or empty when the record was not described."""
    if "registered" not in record:
        return ""
    if not record.get("registered"):
        return "no"
    return f"yes ({_s(record, 'registered_ip') or '?'})"


def recommendation(record: dict[str, Any]) -> str:
    """Which ``lookup_by`` to use, judged from the reverse DNS of the source address."""
    name = _s(record, "hostname").rstrip(".").lower()
    rdns = _s(record, "reverse_dns").rstrip(".").lower()
    confirmed = bool(record.get("reverse_confirmed"))
    if rdns and confirmed and rdns == name:
        return "Recommendation: name and address agree - lookup_by=hostname is safe."
    if rdns and confirmed:
        return (
            f"Recommendation: the address belongs to '{rdns}', not the reported name - "
            "check the code carefully; consider --lookup-by ip."
        )
    return (
        "Recommendation: the name could not be confirmed by DNS - compare the code, and "
        "consider --lookup-by ip."
    )


def format_request(record: dict[str, Any]) -> list[str]:
    """The announcement of one request, one string per line."""
    host, ip, src = _s(record, "hostname"), _s(record, "ip"), _s(record, "source_ip")
    lines = [
        f"Pairing request from {host} ({ip or src}) - ID: {_s(record, 'id')}",
        f"  Code: {_s(record, 'code')}",
        f"  Received: {_s(record, 'received')}",
        f"  Reported name: {host}",
        f"  Source IP: {src}",
    ]
    if ip and ip != src:
        lines.append(f"  Reported IP: {ip}")
    if "csr_cn" in record:
        lines.append(f"  Certificate CN: {_s(record, 'csr_cn') or '(none)'}")
    if "approve_ip" in record:
        lines.append(f"  Approval registers IP: {_s(record, 'approve_ip')}")
    if "registered" in record:
        lines.append(f"  Already registered: {_registered(record)}")
    others = [escape_text(str(n)) for n in record.get("ip_registered_to") or []]
    if others:
        lines.append(f"  WARNING: {_s(record, 'approve_ip')} is registered to: {', '.join(others)}")
    rdns = _s(record, "reverse_dns")
    if rdns:
        state = "forward-confirmed" if record.get("reverse_confirmed") else "NOT forward-confirmed"
        lines.append(f"  Reverse DNS: {rdns} ({state})")
    else:
        lines.append("  Reverse DNS: (none)")
    hints = []
    if record.get("lookup_by"):
        hints.append(f"lookup_by={_s(record, 'lookup_by')}")
    if record.get("port"):
        hints.append(f"port={_s(record, 'port')}")
    if hints:
        lines.append(f"  Agent hints: {' '.join(hints)}")
    lines.append(f"  {recommendation(record)}")
    return lines


def format_list(records: list[dict[str, Any]]) -> list[str]:
    """Numbered list of pending requests (numbers are what ``aN``/``dN`` take)."""
    if not records:
        return ["No pending pairing requests."]
    out = ["Pending pairing requests:"]
    for n, r in enumerate(records, 1):
        out.append(
            f"  {n}. {_s(r, 'hostname')} ({_s(r, 'ip') or _s(r, 'source_ip')})  "
            f"code {_s(r, 'code')}  ID: {_s(r, 'id')}"
        )
    return out


def prompt(pending: int) -> str:
    """The prompt for ``pending`` undecided requests."""
    if pending <= 1:
        return SINGLE_PROMPT
    cmds = "/".join(f"a{n}/d{n}" for n in range(1, pending + 1))
    return f"Command ({cmds}/list/quit): "


def parse_command(line: str, pending: int) -> Command:
    """Parse one typed command against ``pending`` undecided requests."""
    text = line.strip().lower()
    if text in ("s", "skip"):
        return Command("skip")
    if text in ("l", "list"):
        return Command("list")
    if text in ("q", "quit"):
        return Command("quit")
    if not text:
        return Command("invalid", error="no command given")
    verb, num = text[0], text[1:]
    if verb not in ("a", "d"):
        return Command("invalid", error=f"unknown command '{line.strip()}'")
    action: Action = "approve" if verb == "a" else "deny"
    if pending < 1:
        return Command("invalid", error="no pending requests")
    if not num:
        if pending == 1:
            return Command(action, 0)
        return Command(
            "invalid", error=f"{pending} requests pending - say which: {verb}1..{verb}{pending}"
        )
    if not num.isdigit():
        return Command("invalid", error=f"unknown command '{line.strip()}'")
    n = int(num)
    if not 1 <= n <= pending:
        return Command("invalid", error=f"no request number {n} (1..{pending})")
    return Command(action, n - 1)


def format_table(records: list[dict[str, Any]]) -> list[str]:
    """``list-requests``: one row per request, what approval will do beside what the
    agent claims: ``ID CSR CN REGISTER IP SOURCE IP REGISTERED REVERSE DNS CODE``."""
    if not records:
        return ["No pending pairing requests."]
    fmt = "{:<16} {:<28} {:<16} {:<16} {:<20} {:<24} {}"
    head = fmt.format("ID", "CSR CN", "REGISTER IP", "SOURCE IP", "REGISTERED", "REVERSE DNS",
                      "CODE")  # fmt: skip
    out = [head, "-" * len(head)]
    warn = False
    for r in records:
        rdns = _s(r, "reverse_dns")
        if rdns and not r.get("reverse_confirmed"):
            rdns += " *"
        cn = _s(r, "csr_cn") or _s(r, "hostname")
        if _s(r, "csr_cn") and _s(r, "csr_cn") != _s(r, "hostname"):
            cn += " (!=" + _s(r, "hostname") + ")"
        register_ip = _s(r, "approve_ip") or _s(r, "ip") or _s(r, "source_ip")
        if r.get("ip_registered_to"):
            register_ip += " !"
            warn = True
        out.append(fmt.format(_s(r, "id"), cn, register_ip, _s(r, "source_ip"),
                              _registered(r) or "-", rdns or "-", _s(r, "code")))  # fmt: skip
    out.append("")
    out.append("* reverse DNS not forward-confirmed.")
    if warn:
        out.append("! that address is already registered to another agent.")
    out.append("Compare the CODE with the agent's output, check REGISTER IP against SOURCE IP,")
    out.append("  then: ctrl-exec-dispatcher approve <ID>   or   ctrl-exec-dispatcher deny <ID>")
    return out

"""What every handler shares: the peer, the agent state it reads, the serial gate."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent import allowlist
from agent.common import authhook, logfmt
from agent.config import AgentConfig

REQID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # names a file: bounded
ev = logfmt.event

Reply = tuple[int, dict[str, Any]]


@dataclass
class Peer:
    ip: str
    serial: str  # canonical hex, "" when the client sent no certificate
    dispatcher: str | None = None
    cert_der: bytes = b""  # the client certificate (DER), b"" without one


class AgentState(Protocol):
    """The server state handlers read (:class:`agent.server.AgentServer` is one)."""

    cfg: AgentConfig
    scripts: dict[str, allowlist.Script]
    trusted: dict[str, str]
    expiry: str

    def reload_trust(self) -> None: ...

    def reload_ca(self) -> None: ...


Handler = Callable[[AgentState, Peer, bytes, str], Awaitable[Reply]]


def gate(peer: Peer, reqid: str = "") -> Reply | None:
    """403 unless the peer presented a trusted dispatcher's certificate."""
    if peer.dispatcher is None:
        ev("serial-reject", logging.WARNING, peer=peer.ip, peer_serial=peer.serial,
           reqid=reqid or "(none)")  # fmt: skip
        return 403, {"error": "serial mismatch", "status": "forbidden"}
    return None


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return None


def reqid_of(obj: Any) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("reqid"), str):
        return str(obj["reqid"])
    return ""


async def hook(agent: AgentState, action: str, peer: Peer, **kw: Any) -> authhook.Decision:
    """Ask the configured auth hook; log the decision."""
    ctx = authhook.build_context(
        action, source_ip=peer.ip, dispatcher=peer.dispatcher or "",
        dispatcher_serial=peer.serial, **kw,
    )  # fmt: skip
    d = await authhook.call(agent.cfg.auth_hook, ctx, agent.cfg.auth_hook_timeout)
    ev("auth", logging.INFO if d.allowed else logging.WARNING,
       result="pass" if d.allowed else "deny", authaction=action,
       user=kw.get("username") or "(none)", ip=peer.ip,
       reason=None if d.allowed else d.reason, dispatcher=peer.dispatcher)  # fmt: skip
    return d

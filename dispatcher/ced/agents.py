"""``ced list-agents``, ``edit-agent``, ``unpair`` and ``list-locks``: the registry and locks."""

from __future__ import annotations

import sys
from typing import Any

from dispatcher.ced.invocation import Invocation
from dispatcher.ced.output import days_left, out, out_json
from dispatcher.errors import ExitCode, Fail, UsageError


def _parse_tags(spec: str) -> dict[str, str]:
    want: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"Invalid --tags filter: expected key=value, got '{part}'")
        want[key.strip()] = value.strip()
    if not want:
        raise UsageError("Invalid --tags filter: empty")
    return want


def cmd_list_agents(inv: Invocation) -> ExitCode:
    want = _parse_tags(inv.ns.tags) if inv.ns.tags is not None else None
    agents = inv.d.registry.all()
    if want is not None:
        agents = [
            a for a in agents
            if isinstance(a.get("tags"), dict)
            and all(a["tags"].get(k) == v for k, v in want.items())
        ]  # fmt: skip
    if inv.json:
        out_json(agents)
        return ExitCode.OK
    if not agents:
        out("No agents match the tag filter." if want is not None else "No registered agents.")
        return ExitCode.OK
    fmt = "{:<30}  {:<16}  {:<5}  {:<8}  {:<22}  {:<24}  {}"
    out(fmt.format("HOSTNAME", "IP", "PORT", "LOOKUP", "PAIRED", "CERT EXPIRY", "DAYS LEFT"))
    out("-" * 125)
    for a in agents:
        out(fmt.format(str(a.get("hostname", "?")), str(a.get("ip") or "?"),
                       str(a.get("port") or 7443), str(a.get("lookup_by") or "hostname"),
                       str(a.get("paired") or "?"), str(a.get("expiry") or "?"),
                       days_left(a.get("expiry"))))  # fmt: skip
    return ExitCode.OK


def _edit_changes(inv: Invocation) -> dict[str, Any]:
    """The field changes ``edit-agent`` asks for (UsageError when none or invalid)."""
    ns = inv.ns
    changes: dict[str, Any] = {}
    if ns.ip is not None:
        if not ns.ip:
            raise UsageError("--ip must not be empty")
        changes["ip"] = ns.ip
    if ns.agent_port is not None:
        if not 1 <= ns.agent_port <= 65535:
            raise UsageError("--agent-port must be a port number (1-65535)")
        changes["port"] = ns.agent_port
    if ns.lookup_by is not None:
        changes["lookup_by"] = ns.lookup_by
    if ns.rename is None and not changes:
        raise UsageError("Nothing to change. Pass at least one of --rename, --ip, "
                         "--agent-port, --lookup-by.")  # fmt: skip
    return changes


def _apply_edit(inv: Invocation, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    from dispatcher.errors import LeaderOnlyRefused
    from dispatcher.registry import RegistryError

    rename = inv.ns.rename
    reg = inv.d.registry
    try:
        with reg.locked():
            current = name
            record: dict[str, Any] | None = None
            if rename is not None:
                record = reg.rename(name, rename)
                current = rename
            if changes:
                record = reg.update(current, **changes)
    except (RegistryError, LeaderOnlyRefused) as exc:
        raise Fail(f"Edit failed: {exc}") from None
    assert record is not None
    return record


def cmd_edit_agent(inv: Invocation) -> ExitCode:
    from agent.common import logfmt

    inv.need(1, "edit-agent <name> [--rename <new>] [--ip <addr>] [--agent-port <n>] "
                "[--lookup-by ip|hostname]")  # fmt: skip
    name, rename = inv.words[0], inv.ns.rename
    changes = _edit_changes(inv)
    record = _apply_edit(inv, name, changes)
    fields: dict[str, Any] = {k: record.get(k) for k in changes}
    if rename is not None:
        fields["renamed_from"] = name
    logfmt.event("edit-agent", agent=record.get("hostname"), **fields)
    if inv.json:
        out_json(record)
        return ExitCode.OK
    out(f"Updated agent '{record.get('hostname')}'.")
    if rename is not None:
        out(f"  renamed from: {name}")
    out(f"  ip:        {record.get('ip') or ''}")
    out(f"  port:      {record.get('port') or 7443}")
    out(f"  lookup_by: {record.get('lookup_by') or 'hostname'}")
    return ExitCode.OK


def cmd_unpair(inv: Invocation) -> ExitCode:
    from agent.common import logfmt
    from dispatcher.errors import LeaderOnlyRefused
    from dispatcher.registry import RegistryError

    inv.need(1, "unpair <hostname>")
    name = inv.words[0]
    reg = inv.d.registry
    try:
        record = reg.get(name)
        if record is None:
            raise RegistryError(f"no registry entry for '{name}'")
        if sys.stdin.isatty() and not inv.ns.yes and not inv.confirm(f"Unpair '{name}'?"):
            out("Aborted.")
            return ExitCode.OK
        reg.delete(name)
    except (RegistryError, LeaderOnlyRefused) as exc:
        raise Fail(f"Unpair failed: {exc}") from None
    expiry = record.get("expiry") or "unknown"
    logfmt.event("unpair", agent=name, expiry=expiry)
    if inv.json:
        out_json({"ok": 1, "hostname": name, "expiry": expiry})
        return ExitCode.OK
    out(f"Unregistered '{name}'.")
    out(f"WARNING: Agent certificate remains valid until: {expiry}")
    out("Decommission the agent promptly or add its serial to the revocation list.")
    return ExitCode.OK


def cmd_list_locks(inv: Invocation) -> ExitCode:
    held = inv.d.locks.list_held()
    if inv.json:
        out_json({"ok": 1, "locks": [{"host": h, "script": s} for h, s in held]})
        return ExitCode.OK
    if not held:
        out("No locks currently held.")
        return ExitCode.OK
    out(f"{'HOST':<30}  SCRIPT")
    out("-" * 50)
    for h, s in held:
        out(f"{h:<30}  {s}")
    return ExitCode.OK

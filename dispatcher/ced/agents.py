"""``ced list-agents``, ``edit-agent``, ``unpair`` and ``list-locks``: the registry and locks.

``edit-agent`` and ``unpair`` are leader-only actions (:mod:`dispatcher.ha.actions`).
"""

from __future__ import annotations

import sys

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


def _check_edit(inv: Invocation) -> None:
    """UsageError when ``edit-agent`` asks for no change or an invalid one."""
    ns = inv.ns
    if ns.ip is not None and not ns.ip:
        raise UsageError("--ip must not be empty")
    if ns.agent_port is not None and not 1 <= ns.agent_port <= 65535:
        raise UsageError("--agent-port must be a port number (1-65535)")
    if ns.rename is None and ns.ip is None and ns.agent_port is None and ns.lookup_by is None:
        raise UsageError("Nothing to change. Pass at least one of --rename, --ip, "
                         "--agent-port, --lookup-by.")  # fmt: skip


def cmd_edit_agent(inv: Invocation) -> ExitCode:
    inv.need(1, "edit-agent <name> [--rename <new>] [--ip <addr>] [--agent-port <n>] "
                "[--lookup-by ip|hostname]")  # fmt: skip
    name, ns = inv.words[0], inv.ns
    _check_edit(inv)
    args = {"name": name, "rename": ns.rename, "ip": ns.ip, "port": ns.agent_port,
            "lookup_by": ns.lookup_by}  # fmt: skip
    record = inv.leader_action("edit-agent", args, failed="Edit failed: ").data
    if inv.json:
        out_json(record)
        return ExitCode.OK
    out(f"Updated agent '{record.get('hostname')}'.")
    if ns.rename is not None:
        out(f"  renamed from: {name}")
    out(f"  ip:        {record.get('ip') or ''}")
    out(f"  port:      {record.get('port') or 7443}")
    out(f"  lookup_by: {record.get('lookup_by') or 'hostname'}")
    return ExitCode.OK


def cmd_unpair(inv: Invocation) -> ExitCode:
    from dispatcher.registry import RegistryError

    inv.need(1, "unpair <hostname>")
    name = inv.words[0]
    try:
        if inv.d.registry.get(name) is None:
            raise RegistryError(f"no registry entry for '{name}'")
    except RegistryError as exc:
        raise Fail(f"Unpair failed: {exc}") from None
    if sys.stdin.isatty() and not inv.ns.yes and not inv.confirm(f"Unpair '{name}'?"):
        out("Aborted.")
        return ExitCode.OK
    doc = inv.leader_action("unpair", {"name": name}, failed="Unpair failed: ").data
    expiry = doc["expiry"]
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
